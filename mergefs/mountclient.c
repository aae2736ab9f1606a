/* The mount program for containers/storage through a running mount service, in C:
 * `mergefs-overlayfs -o OPTIONS TARGET` with a `service[=SOCK]` option sends its
 * argv (hex: no escaping), working directory and mount namespace to SOCK as one
 * `mount-argv` request and exits with the reply's code; the service checks the
 * options with the same code as the Python program (mergefs/mounthelper.py) and
 * mounts. Anything else -- no service option, another command line, a service
 * that does not answer -- execs the Python program FALLBACK with the same argv,
 * which does what `mergefs` does (and words the error). Written and compiled by
 * `mergefs views install-program` (mergefs/mounthelper.py, install_program). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef FALLBACK
#error "compile with -DFALLBACK=\"/path/to/the/python/program\""
#endif
#define DEFAULT_SERVICE "/run/mergefs/mount.sock"

static void fallback(char **argv) {
    argv[0] = FALLBACK;
    execv(FALLBACK, argv);
    perror("mergefs: error: cannot run " FALLBACK);
    exit(70);
}

/* SOCK of a `service` or `service=SOCK` option in any -o argument, else NULL */
static const char *service_of(int argc, char **argv) {
    const char *found = NULL;
    for (int i = 1; i < argc; i++) {
        const char *opts = NULL;
        if (strcmp(argv[i], "-o") == 0 && i + 1 < argc)
            opts = argv[++i];
        else if (strncmp(argv[i], "-o", 2) == 0 && argv[i][2])
            opts = argv[i] + 2;
        for (const char *p = opts; p && *p;) {
            const char *end = strchr(p, ',');
            size_t n = end ? (size_t)(end - p) : strlen(p);
            if (n == 7 && strncmp(p, "service", 7) == 0)
                found = DEFAULT_SERVICE;
            else if (n > 8 && strncmp(p, "service=", 8) == 0)
                found = strndup(p + 8, n - 8);
            p = end ? end + 1 : NULL;
        }
    }
    return found;
}

static char *buf;
static size_t len, cap;

static void put(const char *s, size_t n);
#define PUTS(s) put((s), strlen(s))

static void put(const char *s, size_t n) {
    if (len + n + 1 > cap) {
        cap = (len + n + 1) * 2;
        buf = realloc(buf, cap);
        if (!buf) exit(70);
    }
    memcpy(buf + len, s, n);
    len += n;
}

static void put_hex(const char *s) {
    static const char digits[] = "0123456789abcdef";
    PUTS("\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char two[2] = {digits[*p >> 4], digits[*p & 15]};
        put(two, 2);
    }
    PUTS("\"");
}

int main(int argc, char **argv) {
    const char *sock = service_of(argc, argv);
    if (!sock || strlen(sock) >= sizeof(((struct sockaddr_un *)0)->sun_path))
        fallback(argv);
    char cwd[4096], ns[256];
    ssize_t nsn = readlink("/proc/self/ns/mnt", ns, sizeof ns - 1);
    if (!getcwd(cwd, sizeof cwd) || nsn < 0)
        fallback(argv);
    ns[nsn] = 0;
    PUTS("{\"op\": \"mount-argv\", \"argv\": [");
    for (int i = 1; i < argc; i++) {
        if (i > 1) PUTS(", ");
        put_hex(argv[i]);
    }
    PUTS("], \"cwd\": ");
    put_hex(cwd);
    PUTS(", \"mntns\": ");
    put_hex(ns);
    PUTS("}\n");

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, sock);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
        fallback(argv);                 /* it says that the service does not answer */
    for (size_t off = 0; off < len;) {
        ssize_t n = write(fd, buf + off, len - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) fallback(argv);
        off += n;
    }
    char reply[65536];
    size_t got = 0;
    while (got < sizeof reply - 1 && (got == 0 || reply[got - 1] != '\n')) {
        ssize_t n = read(fd, reply + got, sizeof reply - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += n;
    }
    reply[got] = 0;
    if (strncmp(reply, "{\"ok\": true", 11) == 0)
        return 0;
    /* {"ok": false, "kind": K, "error": MSG, "exit": N}: the message is written
     * ASCII-only by the service (json.dumps), so \" \\ and \uXXXX are all there is */
    const char *exit_at = strstr(reply, "\"exit\": ");
    int code = exit_at ? atoi(exit_at + 8) : 1;
    const char *msg = strstr(reply, "\"error\": \"");
    fputs("mergefs: error: ", stderr);
    for (const char *p = msg ? msg + 10 : "no reply from the service\""; *p && *p != '"'; p++) {
        if (*p == '\\' && p[1] == 'u') {
            unsigned c = (unsigned)strtoul((char[5]){p[2], p[3], p[4], p[5], 0}, NULL, 16);
            if (c < 0x80) fputc(c, stderr);
            else if (c < 0x800) { fputc(0xc0 | c >> 6, stderr); fputc(0x80 | (c & 63), stderr); }
            else { fputc(0xe0 | c >> 12, stderr); fputc(0x80 | (c >> 6 & 63), stderr);
                   fputc(0x80 | (c & 63), stderr); }
            p += 5;
        } else if (*p == '\\' && p[1]) {
            p++;
            fputc(*p == 'n' ? '\n' : *p == 't' ? '\t' : *p, stderr);
        } else {
            fputc(*p, stderr);
        }
    }
    fputc('\n', stderr);
    return code ? code : 1;
}
