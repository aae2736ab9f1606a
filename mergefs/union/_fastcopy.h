/* The copy-up of a lower regular file, or directory, in one call (included once,
 * by _fastpath.c, after overlay_private): ``copy_up_file`` and ``copy_up_dir``
 * (below), which upper.Upper.copy_up_file and copy_up_dir call where the module
 * is built (fastpath.compiled), else Upper.stage_file (stage_dir) then
 * Upper.publish do the same in Python. The same syscalls in the same order, and
 * the same rules (U4, A1, A3, U8; upper.py's docstring). A regular file:
 *
 *   open the lower file beneath its directory (openat2, no symlink followed), fstat
 *   (no longer a regular file: ESTALE); an unnamed file in the work dir (O_TMPFILE)
 *   made with the file's mode where that needs no chmod (``made``: the umask keeps
 *   it, no set-id or sticky bit, the work dir's owner known); its data
 *   (copy_file_range, else sendfile: the pair of filesystems remembered in
 *   ``no_range`` once refused); chown unless made with the right owner, chmod
 *   unless made with the right mode; the content xattrs (the overlay format's own
 *   left out); the inode number to keep (``ino_xattr``, U8; not where the upper
 *   has no such xattrs); atime and mtime; then linked into the upper's directory,
 *   whose times are put back afterwards (a copy-up is no change of the parent).
 *
 * What it leaves to Python, before anything is made or after undoing it (None):
 * a work dir without O_TMPFILE, and an xattr the upper refuses (Python copies
 * again and reports it, A3). A name taken in the upper (a whiteout there) gives
 * the complete copy back unlinked (``linked`` False): Python renames it over.
 * Any other failure leaves nothing (the unnamed file goes with its fd) and raises
 * OSError with the errno.
 *
 * It runs with the GIL held, as the hooks do. ``linkat(fd, "", AT_EMPTY_PATH)``
 * links the copy where the process may (CAP_DAC_READ_SEARCH), else the
 * /proc/self/fd path as Python does (remembered once refused). */

#include <sys/sendfile.h>

static int empty_path_links = 1;    /* 0: linkat AT_EMPTY_PATH refused (ENOENT) */
static int openat2_works = 1;       /* 0: ENOSYS (an old kernel, valgrind) */

/* ``path`` opened beneath ``root`` following no symlink, as syscalls.open_beneath:
 * openat2, or where the kernel has none, one component at a time (O_NOFOLLOW). */
static int open_beneath(int root, const char *path, int flags)
{
    struct open_how how = {.flags = (unsigned long long)(flags | O_NOFOLLOW | O_CLOEXEC),
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
                                      RESOLVE_NO_MAGICLINKS};
    if (openat2_works) {
        int fd = (int)syscall(SYS_openat2, root, path, &how, sizeof(how));
        if (fd >= 0 || errno != ENOSYS)
            return fd;
        openat2_works = 0;
    }
    const int dir_flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
    int fd = openat(root, ".", dir_flags);
    const char *part = path, *slash;
    while (fd >= 0 && (slash = strchr(part, '/'))) {
        char name[NAME_MAX + 1];
        size_t len = (size_t)(slash - part);
        int next = -1;
        if (len > NAME_MAX)
            errno = ENAMETOOLONG;
        else {
            memcpy(name, part, len);
            name[len] = 0;
            next = openat(fd, name, dir_flags);
        }
        int err = errno;
        close(fd);
        errno = err;
        fd = next;
        part = slash + 1;
    }
    if (fd < 0)
        return -1;
    int last = openat(fd, part, (int)how.flags), err = errno;
    close(fd);
    errno = err;
    return last;
}

struct copy_job {
    int src_dir, work, dst_dir, with_data, xattrs, ranged, has_number, sync;
    const char *name, *leaf, *ino_xattr;
    unsigned not_exact;
    long long owner_uid, owner_gid;     /* -1: what the work dir gives is not known */
    char number[24];
    /* out */
    int fd, refused_range, refused_xattr, no_tmpfile, linked;
    struct stat st, copy;
};

static int xattr_refused(int e)      /* attrs.XATTR_REFUSED: reported, not fatal (A3) */
{
    return e == EPERM || e == ENOTSUP || e == EOPNOTSUPP || e == EACCES || e == EINVAL;
}

/* lsetxattr of ``name`` in directory ``dir`` by its /proc/self/fd path */
static int set_named_xattr(int dir, const char *name, const char *attr, const char *value,
                           size_t size)
{
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof(path), "/proc/self/fd/%d/%s", dir, name) >= sizeof(path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return lsetxattr(path, attr, value, size, 0);
}

/* The content xattrs of ``sfd`` onto ``fd`` (or, ``fd`` -1, onto ``name`` in
 * directory ``dir``): 0 done, 1 the upper refused one (Python does the copy-up
 * again and reports it), -1 failed (errno). */
static int copy_xattrs(int sfd, int fd, int dir, const char *name)
{
    ssize_t n = flistxattr(sfd, NULL, 0);
    if (n <= 0)
        return n < 0 && errno != ENOTSUP && errno != EOPNOTSUPP ? -1 : 0;
    char *names = malloc((size_t)n), *value = malloc(XATTR_SIZE_MAX);
    int r = -1;
    if (!names || !value) {
        errno = ENOMEM;
        goto out;
    }
    if ((n = flistxattr(sfd, names, (size_t)n)) < 0)
        goto out;
    r = 0;
    for (ssize_t i = 0; i < n && !r; i += (ssize_t)strlen(names + i) + 1) {
        const char *attr = names + i;
        if (overlay_private(attr))
            continue;
        ssize_t v = fgetxattr(sfd, attr, value, XATTR_SIZE_MAX);
        if (v < 0) {
            if (errno != ENODATA && errno != ENOTSUP && errno != EOPNOTSUPP)
                r = -1;
            continue;
        }
        if ((fd >= 0 ? fsetxattr(fd, attr, value, (size_t)v, 0)
                     : set_named_xattr(dir, name, attr, value, (size_t)v)) < 0)
            r = xattr_refused(errno) ? 1 : -1;
    }
out:
    free(names);
    free(value);
    return r;
}

/* The data: copy_file_range, else sendfile from where the first left off (as
 * syscalls.copy_data). */
static int copy_bytes(struct copy_job *j, int sfd)
{
    off_t size = j->st.st_size, copied = 0;
    while (copied < size) {
        ssize_t n = -1;
        if (j->ranged) {
            n = copy_file_range(sfd, NULL, j->fd, NULL, (size_t)(size - copied), 0);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0) {
                if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
                    return -1;
                j->ranged = 0;
                j->refused_range = 1;
            }
        }
        if (n < 0) {
            size_t want = (size_t)(size - copied);
            n = sendfile(j->fd, sfd, NULL, want < (1u << 30) ? want : (1u << 30));
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -1;
        }
        if (n == 0)
            break;
        copied += n;
    }
    return 0;
}

#define FAIL(step) goto fail        /* ``step``: what failed, for the reader */

/* linkat of the open copy by its /proc/self/fd path, as Upper._place does */
static int link_by_proc(struct copy_job *j)
{
    char proc[32];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", j->fd);
    return linkat(AT_FDCWD, proc, j->dst_dir, j->leaf, AT_SYMLINK_FOLLOW);
}

/* The whole copy (see above). 0: done (j->fd open; j->linked unless the name
 * was taken); 1: left to Python (nothing made); -1: failed (errno; nothing made,
 * or, as in Python, a copy linked whose parent's times could not be put back).
 * ``no_range``: the set of source devices copy_file_range refused. */
static int copy_up(struct copy_job *j, PyObject *no_range)
{
    int sfd = open_beneath(j->src_dir, j->name, O_RDONLY), err, r;
    j->fd = -1;
    if (sfd < 0)
        return -1;
    if (fstat(sfd, &j->st) < 0)
        FAIL("fstat");
    if (!S_ISREG(j->st.st_mode)) {       /* the layer changed under us */
        errno = ESTALE;
        FAIL("open");
    }
    mode_t mode = j->st.st_mode & 07777;
    int made = !(mode & j->not_exact) && j->owner_uid >= 0;
    j->fd = openat(j->work, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, made ? mode : 0600);
    if (j->fd < 0) {
        if (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL) {
            j->no_tmpfile = 1;
            close(sfd);
            return 1;
        }
        FAIL("O_TMPFILE");
    }
    if (j->with_data && j->st.st_size) {
        PyObject *dev = PyLong_FromUnsignedLongLong((unsigned long long)j->st.st_dev);
        if (!dev || (r = PySet_Contains(no_range, dev)) < 0) {
            Py_XDECREF(dev);
            PyErr_Clear();
            r = 0;
            dev = NULL;
        }
        j->ranged = !r;
        if (copy_bytes(j, sfd) < 0) {
            Py_XDECREF(dev);
            FAIL("copy");
        }
        if (j->refused_range && dev && PySet_Add(no_range, dev) < 0)
            PyErr_Clear();
        Py_XDECREF(dev);
    }
    if ((!made || (long long)j->st.st_uid != j->owner_uid ||
         (long long)j->st.st_gid != j->owner_gid) && fchown(j->fd, j->st.st_uid, j->st.st_gid) < 0)
        FAIL("chown");
    if (!made && fchmod(j->fd, mode) < 0)
        FAIL("chmod");
    if (j->xattrs) {
        if ((r = copy_xattrs(sfd, j->fd, -1, NULL)) < 0)
            FAIL("xattrs");
        if (r > 0) {
            j->refused_xattr = 1;
            close(j->fd);
            close(sfd);
            j->fd = -1;
            return 1;
        }
    }
    if (j->has_number && fsetxattr(j->fd, j->ino_xattr, j->number, strlen(j->number), 0) < 0 &&
        errno != ENOTSUP && errno != EOPNOTSUPP && errno != EPERM)
        FAIL("record number");
    struct timespec times[2] = {j->st.st_atim, j->st.st_mtim};
    if (futimens(j->fd, times) < 0)
        FAIL("utime");
    if (j->sync && fsync(j->fd) < 0)   /* on disk before a name shows it (Upper.sync_copies) */
        FAIL("fsync");
    close(sfd);
    sfd = -1;
    struct stat parent;
    if (fstat(j->fd, &j->copy) < 0)
        FAIL("fstat");
    if (fstat(j->dst_dir, &parent) < 0)
        FAIL("fstat parent");
    if (!empty_path_links)
        r = link_by_proc(j);
    else if ((r = linkat(j->fd, "", j->dst_dir, j->leaf, AT_EMPTY_PATH)) < 0 && errno == ENOENT &&
             (r = link_by_proc(j)) == 0)
        empty_path_links = 0;        /* refused without CAP_DAC_READ_SEARCH: ENOENT */
    if (r < 0) {
        if (errno == EEXIST)
            return 0;                   /* a whiteout there: Python places it */
        FAIL("link");
    }
    j->linked = 1;
    struct timespec ptimes[2] = {parent.st_atim, parent.st_mtim};
    if (futimens(j->dst_dir, ptimes) < 0)
        FAIL("utime parent");
    return 0;
fail:
    err = errno;
    if (sfd >= 0)
        close(sfd);
    if (j->fd >= 0)
        close(j->fd);
    j->fd = -1;
    errno = err;
    return -1;
}

/* The job's ``owner`` ((uid, gid) or None) and ``number`` (an int or None): -1
 * with an exception set when they are not of that form. */
static int job_owner_number(struct copy_job *j, PyObject *owner, PyObject *number)
{
    j->owner_uid = j->owner_gid = -1;
    if (owner != Py_None && !PyArg_ParseTuple(owner, "LL", &j->owner_uid, &j->owner_gid))
        return -1;
    if (number != Py_None) {
        unsigned long long n = PyLong_AsUnsignedLongLong(number);
        if (n == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        snprintf(j->number, sizeof(j->number), "%llu", n);
        j->has_number = 1;
    }
    return 0;
}

/* OSError of errno, naming the source */
static PyObject *job_error(struct copy_job *j)
{
    int err = errno;
    PyObject *name = PyBytes_FromString(j->name);
    errno = err;
    PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    Py_XDECREF(name);
    return NULL;
}

/* copy_up_file(src_dir, name, work, dst_dir, leaf, with_data, xattrs, not_exact,
 *              owner, ino_xattr, number, no_range[, sync])
 *   -> (fd, the copy's st_ino, the lower file's st_nlink, linked), or (None, why):
 * Python's path ("no O_TMPFILE", "xattr refused"). ``owner``: (uid, gid) what the
 * work dir gives a new file, or None; ``number``: the inode number to record, or
 * None; ``no_range``: a set of source st_dev values, added to here; ``sync``: fsync
 * the copy before it is linked in. */
static PyObject *py_copy_up_file(PyObject *self, PyObject *args)
{
    struct copy_job j = {0};
    PyObject *owner, *number, *no_range;
    if (!PyArg_ParseTuple(args, "iyiiyppIOsOO!|p", &j.src_dir, &j.name, &j.work, &j.dst_dir,
                          &j.leaf, &j.with_data, &j.xattrs, &j.not_exact, &owner, &j.ino_xattr,
                          &number, &PySet_Type, &no_range, &j.sync))
        return NULL;
    if (strchr(j.name, '/') || !strcmp(j.name, ".") || !strcmp(j.name, "..") || !*j.name ||
        strchr(j.leaf, '/') || !*j.leaf) {
        PyErr_SetString(PyExc_ValueError, "copy_up_file takes one name in each directory");
        return NULL;
    }
    if (job_owner_number(&j, owner, number) < 0)
        return NULL;
    int r = copy_up(&j, no_range);
    if (r < 0)
        return job_error(&j);
    if (r > 0)
        return Py_BuildValue("(Os)", Py_None, j.no_tmpfile ? "no O_TMPFILE" : "xattr refused");
    return Py_BuildValue("(iKkO)", j.fd, (unsigned long long)j.copy.st_ino,
                         (unsigned long)j.st.st_nlink, j.linked ? Py_True : Py_False);
}

/* -- a lower directory (no children): Upper.stage_dir then Upper.publish ----------
 * The directory opened beneath its layer's root (``open_beneath``),
 * fstat; made in the work dir as ``tmp`` (its own mode where that needs no chmod,
 * else 0700); chown and chmod where needed; its content xattrs and the number to
 * record (lsetxattr through /proc/self/fd, as Python); its times; renamed into the
 * upper's directory (RENAME_NOREPLACE) and its lstat read there; the parent's times
 * put back. A name taken (a whiteout there): left staged as ``tmp`` for Python to
 * place; a refused xattr: undone, Python's path. */

/* 0: done (*placed 1, or 0: staged as tmp, the name taken); 1: left to Python
 * (nothing made); -1: failed (errno; nothing made, or a directory renamed in whose
 * parent's times could not be put back, as in Python). */
static int copy_up_dir(struct copy_job *j, const char *tmp, int *placed)
{
    int made_dir = 0, err, r;
    *placed = 0;
    int sfd = open_beneath(j->src_dir, j->name, O_RDONLY | O_DIRECTORY);
    if (sfd < 0)
        return -1;
    if (fstat(sfd, &j->st) < 0)
        goto fail;
    if (!S_ISDIR(j->st.st_mode)) {       /* the layer changed under us */
        errno = ESTALE;
        goto fail;
    }
    mode_t mode = j->st.st_mode & 07777;
    int made = !(mode & j->not_exact) && j->owner_uid >= 0;
    if (mkdirat(j->work, tmp, made ? mode : 0700) < 0)
        goto fail;
    made_dir = 1;
    if ((!made || (long long)j->st.st_uid != j->owner_uid ||
         (long long)j->st.st_gid != j->owner_gid) &&
        fchownat(j->work, tmp, j->st.st_uid, j->st.st_gid, AT_SYMLINK_NOFOLLOW) < 0)
        goto fail;
    if (!made && fchmodat(j->work, tmp, mode, 0) < 0)
        goto fail;
    if (j->xattrs) {
        if ((r = copy_xattrs(sfd, -1, j->work, tmp)) < 0)
            goto fail;
        if (r > 0) {
            j->refused_xattr = 1;
            unlinkat(j->work, tmp, AT_REMOVEDIR);
            close(sfd);
            return 1;
        }
    }
    if (j->has_number &&
        set_named_xattr(j->work, tmp, j->ino_xattr, j->number, strlen(j->number)) < 0 &&
        errno != ENOTSUP && errno != EOPNOTSUPP && errno != EPERM)
        goto fail;
    struct timespec times[2] = {j->st.st_atim, j->st.st_mtim};
    if (utimensat(j->work, tmp, times, AT_SYMLINK_NOFOLLOW) < 0)
        goto fail;
    close(sfd);
    sfd = -1;
    struct stat parent;
    if (fstat(j->dst_dir, &parent) < 0)
        goto fail;
    if (syscall(SYS_renameat2, j->work, tmp, j->dst_dir, j->leaf, RENAME_NOREPLACE) < 0) {
        if (errno == EEXIST)
            return 0;                   /* a whiteout there: Python places it */
        goto fail;
    }
    made_dir = 0;                       /* it is the upper's now */
    *placed = 1;
    r = fstatat(j->dst_dir, j->leaf, &j->copy, AT_SYMLINK_NOFOLLOW);
    err = errno;
    struct timespec ptimes[2] = {parent.st_atim, parent.st_mtim};
    if (futimens(j->dst_dir, ptimes) < 0 || r < 0) {
        if (r < 0)
            errno = err;
        return -1;
    }
    return 0;
fail:
    err = errno;
    if (sfd >= 0)
        close(sfd);
    if (made_dir)
        unlinkat(j->work, tmp, AT_REMOVEDIR);
    errno = err;
    return -1;
}

/* copy_up_dir(src_root, path, work, tmp, dst_dir, leaf, xattrs, not_exact, owner,
 *             ino_xattr, number) -> (the copy's st_ino, placed) or (None, why) */
static PyObject *py_copy_up_dir(PyObject *self, PyObject *args)
{
    struct copy_job j = {0};
    PyObject *owner, *number;
    const char *tmp;
    int placed;
    if (!PyArg_ParseTuple(args, "iyiyiypIOsO", &j.src_dir, &j.name, &j.work, &tmp, &j.dst_dir,
                          &j.leaf, &j.xattrs, &j.not_exact, &owner, &j.ino_xattr, &number))
        return NULL;
    if (!*j.name || strchr(tmp, '/') || !*tmp || strchr(j.leaf, '/') || !*j.leaf) {
        PyErr_SetString(PyExc_ValueError, "copy_up_dir takes a path, and one name in the upper");
        return NULL;
    }
    if (job_owner_number(&j, owner, number) < 0)
        return NULL;
    int r = copy_up_dir(&j, tmp, &placed);
    if (r < 0)
        return job_error(&j);
    if (r > 0)
        return Py_BuildValue("(Os)", Py_None, "xattr refused");
    return Py_BuildValue("(KO)", (unsigned long long)j.copy.st_ino, placed ? Py_True : Py_False);
}

/* -- GETXATTR of a file the table has no fd for -----------------------------------
 * The kernel asks for ``security.capability`` before the first write to a file
 * and before a chown: for a lower file that is the request just before its
 * copy-up, and the table holds no fd for it yet. ``getxattr_at`` answers it
 * as ops.getxattr would (view.getxattr: the value of the name on the entry in
 * its top layer, read through its directory; none, ENODATA, where the
 * filesystem has no xattrs), for a non-directory the inode table holds live
 * (not unlinked) or lazily (inodes.py, "lazy entry": no Inode is made for it):
 * its parent, name and node from there, the fd of the directory that holds
 * the entry from ``entry_dir(parent, node)`` (WritableView.entry_dir: an fd its
 * caches keep, never closed here; -1: none), then one lgetxattr through
 * /proc/self/fd. Anything else (a directory, the root, a file unlinked while
 * held open, an error other than ENODATA, ENOTSUP or ERANGE) returns 0: the
 * caller hands it to Python's handler. The overlay format's own names never
 * come here (h_getxattr answers them first). set_xattr_at. */
static PyObject *xattr_live, *xattr_lazy, *entry_dir_fn;

/* parent, name and node (new references) of inode ``ino``: 0, or -1 (none: not
 * known, a directory, unlinked ...; no exception left set) */
static int entry_of(fuse_ino_t ino, PyObject **parent, PyObject **leaf, PyObject **node)
{
    *parent = *leaf = *node = NULL;
    PyObject *number = PyLong_FromUnsignedLongLong(ino);
    PyObject *inode = number ? PyDict_GetItemWithError(xattr_live, number) : NULL;
    if (inode) {
        Py_INCREF(inode);
        PyObject *unlinked = PyObject_GetAttr(inode, s_unlinked);
        if (unlinked == Py_False) {
            *node = PyObject_GetAttr(inode, s_node);
            *parent = *node ? PyObject_GetAttr(inode, s_parent_) : NULL;
            *leaf = *parent ? PyObject_GetAttr(inode, s_name_) : NULL;
        }
        Py_XDECREF(unlinked);
        Py_DECREF(inode);
    } else if (number && !PyErr_Occurred()) {
        PyObject *record = PyDict_GetItemWithError(xattr_lazy, number);
        if (record && PyList_CheckExact(record) && PyList_GET_SIZE(record) == 4) {
            *parent = Py_NewRef(PyList_GET_ITEM(record, 1));
            *leaf = Py_NewRef(PyList_GET_ITEM(record, 2));
            *node = Py_NewRef(PyList_GET_ITEM(record, 3));
        }
    }
    Py_XDECREF(number);
    int ok = *leaf && PyBytes_Check(*leaf) && *parent != Py_None && PyTuple_Check(*node) &&
             PyTuple_GET_SIZE(*node) >= 3 &&
             PyLong_AsLong(PyTuple_GET_ITEM(*node, 0)) != S_IFDIR && !PyErr_Occurred();
    PyErr_Clear();
    if (!ok) {
        Py_CLEAR(*parent);
        Py_CLEAR(*leaf);
        Py_CLEAR(*node);
        return -1;
    }
    return 0;
}

/* ``fn(parent, node)`` (WritableView.entry_dir): the kept fd of the directory
 * that holds the entry, or -1 (any error cleared). */
static long entry_dir_of(PyObject *fn, PyObject *parent, PyObject *node)
{
    PyObject *args[2] = {parent, node};
    PyObject *r = PyObject_Vectorcall(fn, args, 2, NULL);
    long fd = r && PyLong_CheckExact(r) ? PyLong_AsLong(r) : -1;
    Py_XDECREF(r);
    PyErr_Clear();
    return fd;
}

static int getxattr_at(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    PyObject *parent, *leaf, *node;
    if (!entry_dir_fn || entry_of(ino, &parent, &leaf, &node) < 0)
        return 0;
    long fd = entry_dir_of(entry_dir_fn, parent, node);
    char path[PATH_MAX];
    int answered = 0;
    if (fd >= 0 && (size_t)snprintf(path, sizeof(path), "/proc/self/fd/%ld/%s", fd,
                                    PyBytes_AS_STRING(leaf)) < sizeof(path) &&
        reserve(size > XATTR_SIZE_MAX ? XATTR_SIZE_MAX : size) == 0) {
        if (size > XATTR_SIZE_MAX)
            size = XATTR_SIZE_MAX;          /* no value is longer */
        ssize_t n = lgetxattr(path, name, size ? buffer : NULL, size);
        int err = n < 0 ? errno : 0;
        if (err == ENOTSUP || err == EOPNOTSUPP)
            err = ENODATA;                  /* syscalls.getxattr: no such value */
        if (n >= 0 || err == ENODATA || err == ERANGE) {
            answered = 1;
            reply_xattr(req, n, err, size, buffer);
        }
    }
    Py_DECREF(parent);
    Py_DECREF(leaf);
    Py_DECREF(node);
    return answered;
}

static void clear_xattr_at(void)
{
    Py_CLEAR(xattr_live);
    Py_CLEAR(xattr_lazy);
    Py_CLEAR(entry_dir_fn);
}

/* set_xattr_at(live, lazy, entry_dir) -> bool: the inode table's live and lazy
 * entries (dicts by number) and WritableView.entry_dir, for ``getxattr_at``;
 * entry_dir None: none answered there (the caller's Python handler answers). */
static PyObject *py_set_xattr_at(PyObject *self, PyObject *args)
{
    PyObject *live, *lazy, *fn;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyDict_Type, &live, &PyDict_Type, &lazy, &fn) ||
        intern_names() < 0)
        return NULL;
    if (!hooks)
        Py_RETURN_FALSE;
    clear_xattr_at();
    if (fn != Py_None) {
        xattr_live = Py_NewRef(live);
        xattr_lazy = Py_NewRef(lazy);
        entry_dir_fn = Py_NewRef(fn);
    }
    Py_RETURN_TRUE;
}
