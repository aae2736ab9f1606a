/* A writable mount's /dev/fuse reads and writes through libfuse's custom io, for
 * FUSE_HANDLE_KILLPRIV_V2 (included once, by _fastpath.c, after the table).
 *
 * Without it the kernel asks before each write whether the file has a
 * security.capability to drop (a GETXATTR per write(2)), and refreshes the mode
 * (a GETATTR) before each chown, so that it can clear the set-id bits itself:
 * three of the ten requests tar's calls send for one untarred file. With
 * FUSE_HANDLE_KILLPRIV_V2 the superblock is SB_NOSEC (a file's first write
 * asks, the next ones do not) and the kernel leaves the set-id bits to the
 * server: a chown clears them as chown(2) clears them in the upper; a WRITE,
 * a truncating SETATTR or an OPEN with O_TRUNC by a caller without CAP_FSETID
 * carries a flag (FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID,
 * FUSE_OPEN_KILL_SUIDGID), and the server clears the set-id bits the kernel
 * would have cleared.
 *
 * libfuse 3.14 neither offers the flag nor passes those request flags on, so
 * the reads and writes of the session go through here
 * (fuse_session_custom_io, installed by ``set_io`` before the kernel's INIT is
 * read, which also keeps libfuse from splicing requests past this read):
 * - the INIT request says whether the kernel offers the flag; the INIT reply
 *   gets it when ``set_killpriv`` gave the function that clears the bits
 *   (ops._kill_suidgid) by then;
 * - each request with a kill flag is seen before libfuse dispatches it, so the
 *   bits go before the write, as the kernel's own file_remove_privs does: the
 *   file's fd in the table tells whether it has a set-id bit (an fstat); when
 *   it has, or there is no fd, Python clears what the kernel would have
 *   cleared (the set-group-ID bit of a file that is not group-executable only
 *   when the caller is not in the file's group: the kernel's rule, which
 *   FUSE_HANDLE_KILLPRIV_V2 leaves out) as a SETATTR of the mode would (a
 *   copy-up first for a lower file) and drops the kernel's cached
 *   attributes. */

#include <linux/fuse.h>
#include <sys/uio.h>

static PyObject *kill_fn;                 /* ops._kill_suidgid, or NULL */
static int kill_offered, kill_on;         /* the kernel offered the flag; it was agreed */
static uint64_t init_unique;              /* the INIT request's, until its reply */

/* A request of a caller without CAP_FSETID that may have to clear set-id bits:
 * Python's ``kill_fn(number, gid, pid)`` (the caller's, for the set-group-ID
 * bit of a file that is not group-executable) decides, unless the table's fd
 * shows a file with no set-id bit. */
static void kill_suidgid(const struct fuse_in_header *in)
{
    entry_t *e = find(in->nodeid);
    struct stat st;
    if (e && !(e->flags & (F_DIR | F_HANDLE)) && fstat(e->fd, &st) == 0 &&
        S_ISREG(st.st_mode) && !(st.st_mode & (S_ISUID | S_ISGID)))
        return;                           /* the common case: nothing to clear */
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *r = PyObject_CallFunction(kill_fn, "KIi", (unsigned long long)in->nodeid,
                                        (unsigned int)in->gid, (int)in->pid);
    if (!r)
        PyErr_WriteUnraisable(kill_fn);   /* a bug: the function logs its own errors */
    Py_XDECREF(r);
    PyGILState_Release(gil);
}

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    ssize_t n = read(fd, buf, len);
    if (n < (ssize_t)sizeof(struct fuse_in_header))
        return n;
    const struct fuse_in_header *in = buf;
    char *arg = (char *)buf + sizeof *in;
    size_t room = (size_t)n - sizeof *in;
    switch (in->opcode) {
    case FUSE_INIT:
        if (room >= offsetof(struct fuse_init_in, flags) + sizeof(uint32_t)) {
            const struct fuse_init_in *i = (const void *)arg;
            init_unique = in->unique;
            kill_offered = i->major == 7 && i->minor >= 33 &&
                           (i->flags & FUSE_HANDLE_KILLPRIV_V2);
        }
        break;
    case FUSE_WRITE:
        if (kill_on && room >= sizeof(struct fuse_write_in) &&
            (((const struct fuse_write_in *)(const void *)arg)->write_flags &
             FUSE_WRITE_KILL_SUIDGID))
            kill_suidgid(in);
        break;
    case FUSE_SETATTR:
        if (kill_on && room >= sizeof(struct fuse_setattr_in)) {
            struct fuse_setattr_in *s = (void *)arg;
            if (s->valid & FATTR_KILL_SUIDGID) {
                /* a truncation by a caller without CAP_FSETID; a chown carries the
                 * flag whoever calls, and the upper's own chown clears what the
                 * kernel clears for the caller (suid; sgid if group-executable
                 * or the caller is not in the new group, which an owner is) */
                if (!(s->valid & (FATTR_UID | FATTR_GID)))
                    kill_suidgid(in);
                /* libfuse would pass the bit on (its FUSE_SET_ATTR_KILL_SUID),
                 * and the handlers take a SETATTR with a bit they do not know to
                 * Python */
                s->valid &= ~FATTR_KILL_SUIDGID;
            }
        }
        break;
    case FUSE_OPEN:
        if (kill_on && room >= sizeof(struct fuse_open_in) &&
            (((const struct fuse_open_in *)(const void *)arg)->open_flags &
             FUSE_OPEN_KILL_SUIDGID))
            kill_suidgid(in);
        break;
    }
    return n;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    if (init_unique && count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header) &&
        ((struct fuse_out_header *)iov[0].iov_base)->unique == init_unique) {
        init_unique = 0;
        struct fuse_init_out *o = iov[1].iov_base;
        if (!((struct fuse_out_header *)iov[0].iov_base)->error && kill_offered && kill_fn &&
            iov[1].iov_len >= offsetof(struct fuse_init_out, flags) + sizeof(uint32_t)) {
            o->flags |= FUSE_HANDLE_KILLPRIV_V2;
            kill_on = 1;
        }
    }
    return writev(fd, iov, count);
}

/* set_io() -> bool: this session's reads and writes through here from now on
 * (call it before the kernel's INIT is read: after pyfuse3.init) */
static PyObject *py_set_io(PyObject *self, PyObject *unused)
{
    static const struct fuse_custom_io io = {.writev = io_writev, .read = io_read};
    if (!hooks || !*hooks->session)
        Py_RETURN_FALSE;
    struct fuse_session *se = *hooks->session;
    init_unique = 0;
    kill_offered = kill_on = 0;
    Py_CLEAR(kill_fn);                    /* a new session: agreed by its own set_killpriv */
    if (fuse_session_custom_io(se, &io, fuse_session_fd(se)) != 0)
        Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* set_killpriv(fn): agree FUSE_HANDLE_KILLPRIV_V2 in the INIT reply, if the kernel
 * offers it, and call fn(number, gid, pid) where a set-id bit may have to go
 * (None: do not) */
static PyObject *py_set_killpriv(PyObject *self, PyObject *fn)
{
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "set_killpriv: a callable or None");
        return NULL;
    }
    Py_XSETREF(kill_fn, fn == Py_None ? NULL : Py_NewRef(fn));
    if (!kill_fn)
        kill_on = 0;
    Py_RETURN_NONE;
}
