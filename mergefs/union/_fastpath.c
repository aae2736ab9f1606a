/* The C fast path of a union mount (docs/architecture.md, "Serving paths").
 *
 * The patched pyfuse3 (tools/pyfuse3_inode_fh.py, v5) calls the hooks of its
 * exported ``mergefs_fast`` at the top of its C callbacks for GETATTR,
 * SETATTR, READ, WRITE, FSYNC and GETXATTR (and LISTXATTR, v6; LOOKUP and
 * MKNOD, v7; READDIRPLUS, v8; MKDIR, UNLINK, RMDIR, SYMLINK, RENAME, LINK,
 * SETXATTR, REMOVEXATTR and FORGET, v9; an older build runs without the hooks
 * it lacks). This module
 * fills them in and answers those requests itself, without a Python
 * coroutine, for the regular files whose content fd the Python side holds
 * (ops' no-open fd cache, mergefs/union/fdcache.py): a table (_fasttable.h)
 * from FUSE inode number to that fd; GETATTR also for the upper directories
 * whose O_PATH fd the cache keeps (F_DIR: fstat; their own nlink, or 1 for a
 * directory merged with lower layers, F_MERGED, as kernel overlayfs and
 * ops.entry_attributes show it, U1). A READ with no entry opens the file here (_fastopen.h,
 * set_fastopen) or asks Python to open it first (set_miss).
 * All namespace logic (lookup, create, unlink, rename, readdir, copy-up)
 * stays in Python; with a v7 build, GETATTR the table does not serve, LOOKUP
 * and MKNOD call the Python handler directly, without pyfuse3's coroutine
 * ("direct" handlers, set_direct; with a v9 build the namespace requests,
 * FORGET, and the SETATTRs and FSYNCs the table does not serve too); with a
 * v8 build, READDIRPLUS walks the
 * pass Python gives and answers the files itself, their lookups counted in the
 * inode table's lazy records (set_readdir); a LOOKUP of a name that its live
 * parent's merged listing (at hand in Python) lacks is answered "no such name"
 * here (set_listed). ``drain`` runs the request loop itself
 * while requests need no coroutine.
 *
 * Ownership: the fd belongs to the Python cache, which drops the entry here
 * before it closes the fd. An entry holds strong references to the Python
 * Inode and to the Node it was set for; a request is served only while
 * ``inode.node is node`` and ``not inode.unlinked`` (a copy-up, a rename over
 * it or an unlink changes those: the request falls through to Python, which
 * sorts it out), and only for no-open requests (fh 0).
 *
 * After a change (setattr, write) it drops Python's cached attributes of the
 * inode (``inode.attr = None``, which drops ``inode.entry`` too) and, after a
 * chown, its cached xattr names. Every case it does not handle exactly as the
 * Python handlers would falls through (hook returns 0). The hooks run on
 * pyfuse3's thread with the GIL held, as the Python handlers do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/limits.h>
#include <linux/openat2.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "_fasthooks.h"

#define F_WRITE 1u   /* the fd is read-write, on the upper file: writes and setattr */
#define F_UPPER 2u   /* the file is in the upper: fsync syncs it */
#define F_DIR 4u     /* an O_PATH fd on an upper directory: GETATTR only, while the
                      * inode's sources equal the entry's */
#define F_MERGED 8u  /* with F_DIR: lower layers serve it too (sources > 1): nlink 1 (U1) */
#define F_HANDLE 16u /* keyed by a file handle, not an inode number: the fd of an open
                      * of the views mount (views.py, real opens), served for requests
                      * that carry that handle (set_handles) */
#define F_FRESH 64u  /* with F_HANDLE: GETATTR replied with attr timeout 0 (views.py: a shared
                      * gid whose readers are split between a view's copy and the lower file) */

#include "_fasttable.h"

static struct mergefs_fast_hooks *hooks;
static double attr_timeout;

/* Inode's ``_parent`` and ``_name`` (the slots behind its properties), interned
 * once by the first setter that reads them (``intern_names``: 0, or -1 raised). */
static PyObject *s_parent_, *s_name_;

static int intern_names(void)
{
    if (!s_parent_ && !(s_parent_ = PyUnicode_InternFromString("_parent")))
        return -1;
    if (!s_name_ && !(s_name_ = PyUnicode_InternFromString("_name")))
        return -1;
    return 0;
}
static long long squash_uid = -1, squash_gid = -1;
static int volatile_sync;

enum { OP_GETATTR, OP_SETATTR, OP_READ, OP_WRITE, OP_FSYNC, OP_GETXATTR, OP_LISTXATTR,
       OP_GETATTR_DIR, OP_GETATTR_MERGED, OP_GETATTR_DIRECT, OP_LOOKUP_DIRECT, OP_MKNOD_DIRECT,
       OP_READDIRPLUS, OP_GETXATTR_DIRECT, OP_WRITE_COPIED, OP_MKDIR_DIRECT, OP_UNLINK_DIRECT,
       OP_RMDIR_DIRECT, OP_SYMLINK_DIRECT, OP_RENAME_DIRECT, OP_LINK_DIRECT, OP_SETATTR_DIRECT,
       OP_SETXATTR_DIRECT, OP_REMOVEXATTR_DIRECT, OP_FORGET_DIRECT, OP_FSYNC_DIRECT,
       OP_LOOKUP_LISTED, OP_READ_OPENED, OP_LOOKUP_NAMED, OP_MKNOD_MADE, OP_RENAME_MADE, OP_SETATTR_DIR, OP_MKDIR_MADE, OP_N };
static const char *op_names[OP_N] = {"getattr", "setattr", "read", "write", "fsync", "getxattr",
                                     "listxattr", "getattr_dir", "getattr_merged_dir",
                                     "getattr_direct", "lookup_direct",
                                     "mknod_direct", "readdirplus", "getxattr_direct",
                                     "write_copied", "mkdir_direct", "unlink_direct",
                                     "rmdir_direct", "symlink_direct", "rename_direct",
                                     "link_direct", "setattr_direct", "setxattr_direct",
                                     "removexattr_direct", "forget_direct", "fsync_direct",
                                     "lookup_listed", "read_opened", "lookup_named",
                                     "mknod_made", "rename_made",
                                     "setattr_dir", "mkdir_made"};
static unsigned long long served[OP_N];
static PyObject *s_node, *s_unlinked, *s_attr, *s_xattrs, *s_sources, *s_children;

/* set_handles(True): a request with a file handle looks up an F_HANDLE entry
 * under that handle (the views mount, whose handle numbers never meet its
 * inode numbers); else such a request is never served from the table */
static int handle_keys;

static char *buffer;
static size_t buffer_size;
/* The shared reply buffer at least ``size`` bytes long; -1 when out of memory
 * (the request then falls through to Python). */
static int reserve(size_t size)
{
    if (size > buffer_size) {
        char *b = realloc(buffer, size);
        if (!b)
            return -1;
        buffer = b;
        buffer_size = size;
    }
    return 0;
}

/* Python's ``miss(number)``: called on a READ of an inode with no entry; it may
 * open the file's content fd and set an entry (ops: the no-open read path
 * without pyfuse3's coroutine and error wrapper around it). */
static PyObject *miss_fn;

/* The "direct" handlers (v7 builds): plain Python callables, ``getattr(number)``,
 * ``lookup(parent, name, ctx)`` and ``mknod(parent, name, mode, rdev, ctx)``,
 * that run the Operations' handler and return its EntryAttributes, or an errno
 * (they never raise: errors.direct). C calls them for the requests its table
 * does not serve and answers, so such a request costs no coroutine, no
 * RequestContext-less detour through pyfuse3's async wrappers and no trip back
 * to the Python loop; the answer is the handler's own. v9 builds add the
 * namespace requests, with the Operations' arguments (pyfuse3's handlers.pxi):
 * ``mkdir(parent, name, mode, ctx)``, ``symlink(parent, name, target, ctx)`` and
 * ``link(number, new_parent, new_name, ctx)`` answer an entry (counted by the
 * kernel as a lookup, as from pyfuse3); ``unlink``/``rmdir(parent, name, ctx)``,
 * ``rename(parent, name, new_parent, new_name, flags, ctx)``,
 * ``setxattr(number, name, value, ctx)`` and ``removexattr(number, name, ctx)``
 * None; ``setattr(number, attr, fields, fh, ctx)`` (the SETATTRs the table does
 * not serve: directories, lower files, ...) the new attributes; and, without a
 * ctx, ``forget([(number, nlookup), ...])`` (no reply but "none") and
 * ``fsync(fh_or_number, datasync)`` (the FSYNCs the table does not serve) None. */
enum { D_GETATTR, D_LOOKUP, D_MKNOD, D_MKDIR, D_UNLINK, D_RMDIR, D_SYMLINK, D_RENAME, D_LINK,
       D_SETATTR, D_SETXATTR, D_REMOVEXATTR, D_FORGET, D_FSYNC, D_N };
static const char *direct_names[D_N] = {"getattr", "lookup", "mknod", "mkdir", "unlink", "rmdir",
                                        "symlink", "rename", "link", "setattr", "setxattr",
                                        "removexattr", "forget", "fsync"};
static PyObject *direct_fn[D_N];

/* Is ``field`` within the attached build's hooks struct? */
#define HAS_HOOK(field) (hooks->size >= offsetof(struct mergefs_fast_hooks, field) + \
                         sizeof(hooks->field))

/* -- per request ------------------------------------------------------------ */

/* Is ``inode.NAME`` still the object ``was`` (``equal``: an equal one)? */
static int still(PyObject *inode, PyObject *name, PyObject *was, int equal)
{
    PyObject *now = PyObject_GetAttr(inode, name);
    if (!now) {
        PyErr_Clear();
        return 0;
    }
    int same = now == was;
    if (!same && equal && (same = PyObject_RichCompareBool(now, was, Py_EQ)) < 0) {
        PyErr_Clear();
        same = 0;
    }
    Py_DECREF(now);
    return same;
}

/* -- the first READ of a file with no entry, opened in C ------------------------ */
#include "_fastopen.h"

/* The entry that may serve a request on ``ino``: a no-open request (fh 0) on
 * an inode (or, set_handles, a request with the file handle of an F_HANDLE
 * entry) still served by the node and not unlinked (a directory: only for
 * ``dirs``, and while the inode's sources are the same layers: a listing read
 * again sets an equal tuple); else NULL (Python). */
static entry_t *usable_entry(fuse_ino_t ino, struct fuse_file_info *fi, int dirs)
{
    entry_t *e;
    if (fi && fi->fh) {
        if (!handle_keys || !(e = find(fi->fh)) || !(e->flags & F_HANDLE))
            return NULL;
    } else if ((e = find(ino)) && (e->flags & F_HANDLE))
        return NULL;
    if (!e || ((e->flags & F_DIR) && !dirs))
        return NULL;
    if (e->flags & F_LAZY)
        return fastopen_current(e) ? e : NULL;
    if (!still(e->inode, s_node, e->node, 0))
        return NULL;
    if ((e->flags & F_DIR) && !still(e->inode, s_sources, e->sources, 1))
        return NULL;
    PyObject *unlinked = PyObject_GetAttr(e->inode, s_unlinked);
    if (!unlinked) {
        PyErr_Clear();
        return NULL;
    }
    int gone = unlinked != Py_False;
    Py_DECREF(unlinked);
    return gone ? NULL : e;
}

static entry_t *usable(fuse_ino_t ino, struct fuse_file_info *fi)
{
    return usable_entry(ino, fi, 0);
}

/* Python's cached attributes of the inode are stale now (its xattr names too
 * after a chown, which removes security.capability). */
static void changed(entry_t *e, int xattrs)
{
    if (PyObject_SetAttr(e->inode, s_attr, Py_None) < 0)
        PyErr_Clear();
    if (xattrs && PyObject_SetAttr(e->inode, s_xattrs, Py_None) < 0)
        PyErr_Clear();
}

/* fstat of the entry's fd as the mount shows it (ops.entry_attributes: a
 * merged directory's nlink is 1, any other entry's its own). */
static int attributes(entry_t *e, fuse_ino_t ino, struct stat *st)
{
    if (fstat(e->fd, st) != 0 || !((e->flags & F_DIR) ? S_ISDIR(st->st_mode)
                                                       : S_ISREG(st->st_mode)))
        return -1;
    st->st_ino = ino;
    if (e->flags & F_MERGED)
        st->st_nlink = 1;
    if (squash_uid >= 0)
        st->st_uid = (uid_t)squash_uid;
    if (squash_gid >= 0)
        st->st_gid = (gid_t)squash_gid;
    return 0;
}

enum { ANSWER_ENTRY, ANSWER_ATTR, ANSWER_NONE };

/* Reply with what a direct handler returned (a new reference, or NULL: it raised
 * anyway, a bug of the wrapper: EIO, as pyfuse3 would answer a failed handler):
 * an errno; else, by ``kind``, an EntryAttributes as an entry or as attributes,
 * or None as success (UNLINK, RENAME, ...: an errno 0). */
static void answer(fuse_req_t req, PyObject *fn, PyObject *r, int kind)
{
    const struct fuse_entry_param *p = NULL;
    int err = EIO;
    if (!r)
        PyErr_WriteUnraisable(fn);
    else if (PyLong_CheckExact(r)) {
        long e = PyLong_AsLong(r);
        if (e > 0 && e < 4096)
            err = (int)e;
        else
            PyErr_Clear();
    } else if (kind == ANSWER_NONE && r == Py_None)
        err = 0;
    else if (kind == ANSWER_NONE || !(p = hooks->entry_param(r))) {
        PyErr_Format(PyExc_TypeError, "direct handler returned %.100s", Py_TYPE(r)->tp_name);
        PyErr_WriteUnraisable(fn);
    }
    if (!p)
        fuse_reply_err(req, err);
    else if (kind == ANSWER_ENTRY)
        fuse_reply_entry(req, p);
    else
        fuse_reply_attr(req, &p->attr, p->attr_timeout);
    Py_XDECREF(r);
}

static int h_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    entry_t *e = usable_entry(ino, fi, 1);
    if (e && attributes(e, ino, &st) == 0) {
        served[(e->flags & F_MERGED) ? OP_GETATTR_MERGED
               : (e->flags & F_DIR) ? OP_GETATTR_DIR : OP_GETATTR]++;
        fuse_reply_attr(req, &st, (e->flags & F_FRESH) ? 0 : attr_timeout);
        return 1;
    }
    PyObject *fn = direct_fn[D_GETATTR];
    if (!fn)
        return 0;
    PyObject *number = PyLong_FromUnsignedLongLong(ino);
    if (!number) {
        PyErr_Clear();
        return 0;
    }
    served[OP_GETATTR_DIRECT]++;
    answer(req, fn, PyObject_CallOneArg(fn, number), ANSWER_ATTR);
    Py_DECREF(number);
    return 1;
}

#define MAX_ARGS 5      /* of a direct handler, its ctx not counted (setattr, rename) */

/* Call direct handler ``which`` with ``args[1..n]`` (new references, any of them
 * NULL when it could not be made: all released here) and the request's
 * RequestContext, and answer as ``kind``. 0 (not answered: pyfuse3 goes on)
 * only before the handler ran. ``args[0]`` is free (PY_VECTORCALL_ARGUMENTS_OFFSET). */
static int call_direct(fuse_req_t req, int which, int op, int kind, PyObject **args, size_t n)
{
    PyObject *fn = direct_fn[which];
    int ready = fn != NULL;
    for (size_t i = 1; i <= n; i++)
        ready = ready && args[i];
    if (ready)
        ready = (args[++n] = hooks->context(req)) != NULL;
    else
        args[++n] = NULL;
    if (ready) {
        served[op]++;
        Py_INCREF(fn);                  /* the handler may replace it (set_direct) */
        answer(req, fn, PyObject_Vectorcall(fn, args + 1, n | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                            NULL), kind);
        Py_DECREF(fn);
    } else
        PyErr_Clear();
    for (size_t i = 1; i <= n; i++)
        Py_XDECREF(args[i]);
    return ready;
}

/* A direct handler's ``(parent, name, *more)`` answered as ``kind``: more1/more2
 * new references (NULL: none; or could not be made, when ``more`` says so). */
static int direct_named(fuse_req_t req, int which, int op, int kind, fuse_ino_t parent,
                        const char *name, int more, PyObject *more1, PyObject *more2)
{
    if (!direct_fn[which]) {
        Py_XDECREF(more1);
        Py_XDECREF(more2);
        return 0;
    }
    PyObject *args[MAX_ARGS + 2] = {NULL, PyLong_FromUnsignedLongLong(parent),
                                    PyBytes_FromString(name), more1, more2};
    return call_direct(req, which, op, kind, args, 2 + more);
}

/* set_listed(live, timeout): the inode table's live inodes (``InodeTable._live``,
 * number -> Inode) and the entry timeout of a negative answer. A LOOKUP whose
 * parent is live with its merged listing at hand (``Inode.children``, a dict:
 * SortedDict) and a name that listing lacks is answered "no such name" here,
 * as ``ops.lookup`` would (``UnionView.lookup_or_none``: a listing at hand is
 * the answer for any name; nothing counted, nothing read). Any other LOOKUP
 * goes on to the direct handler. Package managers and compilers look up many
 * new names (``x.dpkg-new``, ``x.dpkg-tmp``) before they make them. */
static PyObject *live_table;
static double negative_timeout;

static int lookup_listed(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    PyObject *key = PyLong_FromUnsignedLongLong(parent);
    PyObject *inode = key ? PyDict_GetItemWithError(live_table, key) : NULL;
    Py_XDECREF(key);
    if (!inode) {
        PyErr_Clear();
        return 0;
    }
    Py_INCREF(inode);
    PyObject *children = PyObject_GetAttr(inode, s_children);
    Py_DECREF(inode);
    int has = 1;
    if (children && PyDict_Check(children)) {
        PyObject *n = PyBytes_FromString(name);
        has = n ? PyDict_Contains(children, n) : -1;
        Py_XDECREF(n);
    }
    Py_XDECREF(children);
    if (has < 0 || !children)
        PyErr_Clear();
    if (has != 0)
        return 0;
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));       /* ino 0: a negative entry the kernel may cache */
    e.entry_timeout = negative_timeout;
    served[OP_LOOKUP_LISTED]++;
    fuse_reply_entry(req, &e);
    return 1;
}

static int lookup_named(fuse_req_t req, fuse_ino_t parent, const char *name);  /* _fastns.h */
static int mknod_made(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode);
static int mkdir_made(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode);
static int rename_made(fuse_req_t req, fuse_ino_t parent, const char *name,
                       fuse_ino_t new_parent, const char *new_name);
static entry_t *dir_to_set(fuse_ino_t ino, int to_set, struct fuse_file_info *fi, int *fd);
static PyObject *named_numbers, *made_fn, *renamed_fn;
static double named_timeout;

static int h_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (live_table && lookup_listed(req, parent, name))
        return 1;
    if (live_table && named_numbers && lookup_named(req, parent, name))
        return 1;
    return direct_named(req, D_LOOKUP, OP_LOOKUP_DIRECT, ANSWER_ENTRY, parent, name, 0, NULL,
                        NULL);
}

static int h_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    if (!direct_fn[D_MKNOD])
        return 0;
    if (S_ISREG(mode) && live_table && made_fn && mknod_made(req, parent, name, mode))
        return 1;
    return direct_named(req, D_MKNOD, OP_MKNOD_DIRECT, ANSWER_ENTRY, parent, name, 2,
                        PyLong_FromUnsignedLong(mode), PyLong_FromUnsignedLongLong(rdev));
}

/* -- the namespace requests (v9 builds): the direct handlers, as pyfuse3 calls them */

static int h_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    if (!direct_fn[D_MKDIR])
        return 0;
    mode = (mode & ~(mode_t)S_IFMT) | S_IFDIR;     /* as pyfuse3's fuse_mkdir_async */
    if (live_table && made_fn && mkdir_made(req, parent, name, mode))
        return 1;
    return direct_named(req, D_MKDIR, OP_MKDIR_DIRECT, ANSWER_ENTRY, parent, name, 1,
                        PyLong_FromUnsignedLong(mode), NULL);
}

static int h_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    return direct_named(req, D_UNLINK, OP_UNLINK_DIRECT, ANSWER_NONE, parent, name, 0, NULL,
                        NULL);
}

static int h_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    return direct_named(req, D_RMDIR, OP_RMDIR_DIRECT, ANSWER_NONE, parent, name, 0, NULL,
                        NULL);
}

static int h_symlink(fuse_req_t req, const char *target, fuse_ino_t parent, const char *name)
{
    if (!direct_fn[D_SYMLINK])
        return 0;
    return direct_named(req, D_SYMLINK, OP_SYMLINK_DIRECT, ANSWER_ENTRY, parent, name, 1,
                        PyBytes_FromString(target), NULL);
}

static int h_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t new_parent,
                    const char *new_name, unsigned int flags)
{
    if (!direct_fn[D_RENAME])
        return 0;
    if (!flags && live_table && named_numbers && renamed_fn &&
        rename_made(req, parent, name, new_parent, new_name))
        return 1;
    PyObject *args[MAX_ARGS + 2] = {NULL, PyLong_FromUnsignedLongLong(parent),
                                    PyBytes_FromString(name),
                                    PyLong_FromUnsignedLongLong(new_parent),
                                    PyBytes_FromString(new_name), PyLong_FromUnsignedLong(flags)};
    return call_direct(req, D_RENAME, OP_RENAME_DIRECT, ANSWER_NONE, args, 5);
}

static int h_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t new_parent, const char *new_name)
{
    if (!direct_fn[D_LINK])
        return 0;
    PyObject *args[MAX_ARGS + 2] = {NULL, PyLong_FromUnsignedLongLong(ino),
                                    PyLong_FromUnsignedLongLong(new_parent),
                                    PyBytes_FromString(new_name)};
    return call_direct(req, D_LINK, OP_LINK_DIRECT, ANSWER_ENTRY, args, 3);
}

/* XATTR_CREATE/XATTR_REPLACE: pyfuse3 asks the getxattr handler first; those
 * stay with its coroutine (rare: tar and dpkg set with flags 0). */
static int h_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                      size_t size, int flags)
{
    if (!direct_fn[D_SETXATTR] || flags || size > PY_SSIZE_T_MAX)
        return 0;
    PyObject *args[MAX_ARGS + 2] = {NULL, PyLong_FromUnsignedLongLong(ino),
                                    PyBytes_FromString(name),
                                    PyBytes_FromStringAndSize(value, (Py_ssize_t)size)};
    return call_direct(req, D_SETXATTR, OP_SETXATTR_DIRECT, ANSWER_NONE, args, 3);
}

static int h_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    if (!direct_fn[D_REMOVEXATTR])
        return 0;
    PyObject *args[MAX_ARGS + 2] = {NULL, PyLong_FromUnsignedLongLong(ino),
                                    PyBytes_FromString(name)};
    return call_direct(req, D_REMOVEXATTR, OP_REMOVEXATTR_DIRECT, ANSWER_NONE, args, 2);
}

/* A SETATTR the table does not serve, by the setattr handler (v9 builds: pyfuse3
 * makes its arguments, ``setattr_args``); fh None without a file info, as pyfuse3. */
static int setattr_direct(fuse_req_t req, fuse_ino_t ino, struct stat *a, int to_set,
                          struct fuse_file_info *fi)
{
    if (!direct_fn[D_SETATTR] || !HAS_HOOK(setattr_args) || !hooks->setattr_args)
        return 0;
    PyObject *pair = hooks->setattr_args(a, to_set);
    PyObject *args[MAX_ARGS + 2] = {NULL, PyLong_FromUnsignedLongLong(ino), NULL, NULL,
                                    fi ? PyLong_FromUnsignedLongLong(fi->fh) : Py_NewRef(Py_None)};
    if (pair) {
        args[2] = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
        args[3] = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
        Py_DECREF(pair);
    }
    return call_direct(req, D_SETATTR, OP_SETATTR_DIRECT, ANSWER_ATTR, args, 4);
}

/* FORGET and FORGET_MULTI: ``forget([(number, nlookup), ...])`` as pyfuse3 calls it,
 * then the reply "none" (pyfuse3 replies before its coroutine runs; the kernel
 * waits for nothing either way). Its result is not looked at: errors.direct
 * has logged a bug. */
static int forget_direct(fuse_req_t req, size_t count, const struct fuse_forget_data *forgets)
{
    PyObject *fn = direct_fn[D_FORGET], *list = fn ? PyList_New((Py_ssize_t)count) : NULL;
    if (!list) {
        PyErr_Clear();
        return 0;
    }
    for (size_t i = 0; i < count; i++) {
        PyObject *pair = Py_BuildValue("(KK)", (unsigned long long)forgets[i].ino,
                                       (unsigned long long)forgets[i].nlookup);
        if (!pair) {
            Py_DECREF(list);
            PyErr_Clear();
            return 0;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, pair);
    }
    served[OP_FORGET_DIRECT]++;
    Py_INCREF(fn);
    PyObject *r = PyObject_CallOneArg(fn, list);
    if (!r)
        PyErr_WriteUnraisable(fn);
    Py_XDECREF(r);
    Py_DECREF(fn);
    Py_DECREF(list);
    fuse_reply_none(req);
    return 1;
}

static int h_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    struct fuse_forget_data one = {.ino = ino, .nlookup = nlookup};
    return forget_direct(req, 1, &one);
}

static int h_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    return forget_direct(req, count, forgets);
}

/* An FSYNC the table does not serve (no fd for it): ``fsync(fh, datasync)`` with
 * what pyfuse3 passes as fh (the patch's: the inode number when fh is 0). */
static int fsync_direct(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    PyObject *fn = direct_fn[D_FSYNC];
    if (!fn)
        return 0;
    PyObject *args[2] = {PyLong_FromUnsignedLongLong(fi && fi->fh ? fi->fh : ino),
                         PyBool_FromLong(datasync)};
    if (!args[0]) {
        Py_DECREF(args[1]);
        PyErr_Clear();
        return 0;
    }
    served[OP_FSYNC_DIRECT]++;
    Py_INCREF(fn);
    answer(req, fn, PyObject_Vectorcall(fn, args, 2, NULL), ANSWER_NONE);
    Py_DECREF(fn);
    Py_DECREF(args[0]);
    Py_DECREF(args[1]);
    return 1;
}

/* -- READDIRPLUS (v8 builds) --------------------------------------------------
 * Python's ``readdir(number, offset, size)`` (ops._readdir_direct) says what a
 * no-open READDIRPLUS walks, as a tuple (the P_* fields below; or an errno):
 * the names ``keys[start:]`` that the listing ``current`` still has, each
 * answered while it fits, with the next offset ``base | position + 1``.
 * A non-directory whose number the inode table does not hold live is answered
 * here: lstat in the parent's directory of its layer (``opener(layer)``: an fd,
 * closed here afterwards, or -errno), its attributes as ops.entry_attributes
 * makes them (squashed ownership), and the kernel's lookup counted in the
 * table's ``lazy`` dict, number -> [count, parent, name, node]
 * (mergefs/union/inodes.py, "lazy entry"; no Python Inode until a request
 * for it reaches Python). Every other entry (a directory, a live inode, a
 * lazy record under another name or node, a number only Python can give)
 * goes to ``slow(name, node, fd)``, which counts it and returns its
 * EntryAttributes (None: gone from its layer, skipped; an int: an errno).
 * An entry whose lstat fails is left out, uncounted: the kernel's lookup
 * counts stay exact. ``unlisted(numbers)`` takes back the counts of entries
 * ``slow`` counted that did not fit after all (cannot happen: C measures
 * each entry before it asks). */
static PyObject *readdir_fn, *unlisted_fn;
static double entry_timeout;

enum { P_PARENT, P_KEYS, P_START, P_BASE, P_CURRENT, P_LIVE, P_LAZY, P_NUMBERS, P_CLAIMS,
       P_OPEN, P_SLOW, P_N };

#define XINO_SHIFT 54                                     /* inodes.XINO_SHIFT */
#define MAX_LAYER ((1ll << (64 - XINO_SHIFT)) - 2)        /* inodes.MAX_LAYER */
#define MAX_LAYER_FDS 64

/* inodes.InodeTable.number_for where the answer is plain: a key in ``numbers``
 * or its xino number not claimed by another key; 0: Python decides (slow). */
static uint64_t number_of(PyObject *node, PyObject *numbers, PyObject *claims)
{
    PyObject *layers = PyTuple_GET_ITEM(node, 1), *inos = PyTuple_GET_ITEM(node, 2);
    if (!PyTuple_Check(layers) || !PyTuple_Check(inos) || !PyTuple_GET_SIZE(layers) ||
        !PyTuple_GET_SIZE(inos))
        return 0;
    PyObject *l = PyTuple_GET_ITEM(layers, 0), *i = PyTuple_GET_ITEM(inos, 0), *key = NULL;
    long long layer = PyLong_AsLongLong(l);
    unsigned long long ino = PyLong_AsUnsignedLongLong(i);
    uint64_t number = 0;
    if (PyErr_Occurred())
        goto out;
    if (PyDict_GET_SIZE(numbers) || PyDict_GET_SIZE(claims)) {
        if (!(key = PyTuple_Pack(2, l, i)))
            goto out;
    }
    if (PyDict_GET_SIZE(numbers)) {
        PyObject *n = PyDict_GetItemWithError(numbers, key);
        if (n) {
            number = PyLong_AsUnsignedLongLong(n);
            goto out;
        }
        if (PyErr_Occurred())
            goto out;
    }
    if (ino >> XINO_SHIFT || layer < 0 || layer >= MAX_LAYER)
        goto out;
    number = (uint64_t)(layer + 1) << XINO_SHIFT | ino;
    if (PyDict_GET_SIZE(claims)) {
        PyObject *n = PyLong_FromUnsignedLongLong(number), *claim;
        claim = n ? PyDict_GetItemWithError(claims, n) : NULL;
        Py_XDECREF(n);
        if (PyErr_Occurred() || (claim && PyObject_RichCompareBool(claim, key, Py_EQ) != 1))
            number = 0;
    }
out:
    Py_XDECREF(key);
    if (PyErr_Occurred() || number == (uint64_t)-1) {
        PyErr_Clear();
        return 0;
    }
    return number;
}

/* Is ``record`` (a lazy record) this listing of ``parent/name`` with ``node``? */
static int same_listing(PyObject *record, PyObject *parent, PyObject *name, PyObject *node)
{
    if (!PyList_CheckExact(record) || PyList_GET_SIZE(record) != 4 ||
        PyList_GET_ITEM(record, 1) != parent)
        return 0;
    PyObject *n = PyList_GET_ITEM(record, 2), *was = PyList_GET_ITEM(record, 3);
    if (n != name && PyObject_RichCompareBool(n, name, Py_EQ) != 1)
        return 0;
    if (was != node && PyObject_RichCompareBool(was, node, Py_EQ) != 1)
        return 0;
    return !PyErr_Occurred();
}

/* One more lookup of lazy entry ``number`` (``record``: its record, or NULL: a
 * new one). -1: not counted (out of memory). */
static int count_lazy(PyObject *lazy, PyObject *number, PyObject *record, PyObject *parent,
                      PyObject *name, PyObject *node)
{
    if (record) {
        PyObject *c = PyList_GET_ITEM(record, 0);
        long long n = PyLong_AsLongLong(c);
        PyObject *more = n >= 0 && !PyErr_Occurred() ? PyLong_FromLongLong(n + 1) : NULL;
        if (!more)
            return -1;
        PyList_SetItem(record, 0, more);
        return 0;
    }
    PyObject *one = PyLong_FromLong(1), *r = one ? PyList_New(4) : NULL;
    if (!r) {
        Py_XDECREF(one);
        return -1;
    }
    PyList_SET_ITEM(r, 0, one);
    PyList_SET_ITEM(r, 1, Py_NewRef(parent));
    PyList_SET_ITEM(r, 2, Py_NewRef(name));
    PyList_SET_ITEM(r, 3, Py_NewRef(node));
    int failed = PyDict_SetItem(lazy, number, r);
    Py_DECREF(r);
    return failed;
}

struct layer_fds {
    int n;
    long layer[MAX_LAYER_FDS];
    int fd[MAX_LAYER_FDS];
};

/* The parent's directory in ``layer`` (opened once per request); -errno. */
static int layer_fd(struct layer_fds *fds, PyObject *opener, PyObject *layer_obj)
{
    long layer = PyLong_AsLong(layer_obj);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return -EIO;
    }
    for (int i = 0; i < fds->n; i++)
        if (fds->layer[i] == layer)
            return fds->fd[i];
    if (fds->n == MAX_LAYER_FDS)
        return -EMFILE;
    PyObject *r = PyObject_CallOneArg(opener, layer_obj);
    long fd = r ? PyLong_AsLong(r) : -EIO;
    Py_XDECREF(r);
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(opener);
        return -EIO;
    }
    if (fd < 0)
        return (int)fd;
    fds->layer[fds->n] = layer;
    fds->fd[fds->n++] = (int)fd;
    return (int)fd;
}

/* Fill ``buf`` (``size`` bytes) with the entries of the walk ``w`` (the tuple
 * above); returns the bytes used, or -errno when it failed before any entry
 * (an error after some: the entries so far). ``req`` is only passed on to
 * fuse_add_direntry_plus, which does not use it (walk() calls this with NULL). */
static long fill_plus(fuse_req_t req, char *buf, size_t size, PyObject *w)
{
    if (!PyTuple_Check(w) || PyTuple_GET_SIZE(w) != P_N)
        return -EIO - 10000;
    PyObject *parent = PyTuple_GET_ITEM(w, P_PARENT), *keys = PyTuple_GET_ITEM(w, P_KEYS),
             *current = PyTuple_GET_ITEM(w, P_CURRENT), *live = PyTuple_GET_ITEM(w, P_LIVE),
             *lazy = PyTuple_GET_ITEM(w, P_LAZY), *numbers = PyTuple_GET_ITEM(w, P_NUMBERS),
             *claims = PyTuple_GET_ITEM(w, P_CLAIMS), *opener = PyTuple_GET_ITEM(w, P_OPEN),
             *slow = PyTuple_GET_ITEM(w, P_SLOW);
    Py_ssize_t start = PyLong_AsSsize_t(PyTuple_GET_ITEM(w, P_START));
    long long base = PyLong_AsLongLong(PyTuple_GET_ITEM(w, P_BASE));
    if (PyErr_Occurred() || !PyList_Check(keys) || !PyDict_Check(current) ||
        !PyDict_Check(live) || !PyDict_Check(lazy) || !PyDict_Check(numbers) ||
        !PyDict_Check(claims) || start < 0)
        return -EIO - 10000;
    struct layer_fds fds = {0};
    size_t used = 0;
    int err = 0;
    for (Py_ssize_t k = start; k < PyList_GET_SIZE(keys) && !err; k++) {
        PyObject *name = PyList_GET_ITEM(keys, k);
        PyObject *node = PyDict_GetItemWithError(current, name);
        if (!node) {
            if (PyErr_Occurred())
                err = -EIO - 10000;
            continue;                         /* removed since the snapshot */
        }
        const char *cname = PyBytes_AsString(name);
        if (!cname || !PyTuple_Check(node) || PyTuple_GET_SIZE(node) < 3) {
            err = -EIO - 10000;
            break;
        }
        Py_INCREF(name);
        Py_INCREF(node);
        off_t next = (off_t)(base | (k + 1));
        size_t len = fuse_add_direntry_plus(req, NULL, 0, cname, NULL, 0);
        PyObject *number = NULL, *record = NULL, *r = NULL;
        if (len > size - used)
            goto full;
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(node, 0));
        uint64_t n = kind == S_IFDIR ? 0 : number_of(node, numbers, claims);
        PyErr_Clear();
        /* the fd first: opener is Python, ``record`` (borrowed) is used right away */
        int fd = layer_fd(&fds, opener, PyTuple_GET_ITEM(PyTuple_GET_ITEM(node, 1), 0));
        if (fd < 0) {
            err = fd;
            goto done;
        }
        int fast = 0;
        if (n) {
            if (!(number = PyLong_FromUnsignedLongLong(n)))
                goto fail;
            fast = !PyDict_GetItemWithError(live, number);
            record = fast ? PyDict_GetItemWithError(lazy, number) : NULL;
            if (PyErr_Occurred())
                goto fail;
            if (record && !same_listing(record, parent, name, node))
                fast = 0;
            PyErr_Clear();
        }
        struct fuse_entry_param p;
        const struct fuse_entry_param *pp = &p;
        if (fast) {
            memset(&p, 0, sizeof(p));
            if (fstatat(fd, cname, &p.attr, AT_SYMLINK_NOFOLLOW) != 0)
                goto done;                    /* gone from its layer: left out */
            p.ino = p.attr.st_ino = n;
            if (squash_uid >= 0)
                p.attr.st_uid = (uid_t)squash_uid;
            if (squash_gid >= 0)
                p.attr.st_gid = (gid_t)squash_gid;
            p.attr_timeout = attr_timeout;
            p.entry_timeout = entry_timeout;
            if (count_lazy(lazy, number, record, parent, name, node) < 0)
                goto fail;
        } else {
            PyObject *fdo = PyLong_FromLong(fd);
            PyObject *args[3] = {name, node, fdo};
            r = fdo ? PyObject_Vectorcall(slow, args, 3, NULL) : NULL;
            Py_XDECREF(fdo);
            if (!r) {
                PyErr_WriteUnraisable(slow);
                err = -EIO;
                goto done;
            }
            if (r == Py_None)
                goto done;
            if (PyLong_CheckExact(r)) {
                long e = PyLong_AsLong(r);
                err = e > 0 && e < 4096 ? (int)-e : -EIO;
                PyErr_Clear();
                goto done;
            }
            if (!(pp = hooks->entry_param(r))) {
                PyErr_Format(PyExc_TypeError, "slow returned %.100s", Py_TYPE(r)->tp_name);
                PyErr_WriteUnraisable(slow);
                err = -EIO;
                goto done;
            }
        }
        len = fuse_add_direntry_plus(req, buf + used, size - used, cname, pp, next);
        if (len > size - used) {              /* measured above: cannot happen */
            if (!fast && unlisted_fn) {
                PyObject *gone = Py_BuildValue("[K]", (unsigned long long)pp->ino);
                PyObject *u = gone ? PyObject_CallOneArg(unlisted_fn, gone) : NULL;
                if (!u)
                    PyErr_WriteUnraisable(unlisted_fn);
                Py_XDECREF(u);
                Py_XDECREF(gone);
            }
            goto full;
        }
        used += len;
        goto done;
fail:
        PyErr_Clear();
        err = -ENOMEM;
        goto done;
full:
        err = 1;
done:
        Py_XDECREF(r);
        Py_XDECREF(number);
        Py_DECREF(name);
        Py_DECREF(node);
    }
    for (int i = 0; i < fds.n; i++)
        close(fds.fd[i]);
    if (err < -10000) {
        PyErr_SetString(PyExc_TypeError, "readdir walk of an unexpected shape");
        PyErr_WriteUnraisable(readdir_fn ? readdir_fn : Py_None);
        err = -EIO;
    }
    return err < 0 && !used ? err : (long)used;
}

static int h_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         struct fuse_file_info *fi)
{
    if (!readdir_fn || (fi && fi->fh) || reserve(size) < 0)
        return 0;
    PyObject *args[3] = {PyLong_FromUnsignedLongLong(ino), PyLong_FromLongLong(off),
                         PyLong_FromSize_t(size)};
    if (!args[0] || !args[1] || !args[2]) {
        for (int i = 0; i < 3; i++)
            Py_XDECREF(args[i]);
        PyErr_Clear();
        return 0;
    }
    served[OP_READDIRPLUS]++;
    PyObject *r = PyObject_Vectorcall(readdir_fn, args, 3, NULL);
    for (int i = 0; i < 3; i++)
        Py_DECREF(args[i]);
    if (r && PyLong_CheckExact(r)) {            /* an errno */
        long e = PyLong_AsLong(r);
        PyErr_Clear();
        fuse_reply_err(req, e > 0 && e < 4096 ? (int)e : EIO);
    } else if (!r) {                            /* a bug of the wrapper */
        PyErr_WriteUnraisable(readdir_fn);
        fuse_reply_err(req, EIO);
    } else {
        long n = fill_plus(req, buffer, size, r);
        if (n < 0)
            fuse_reply_err(req, (int)-n);
        else
            fuse_reply_buf(req, buffer, (size_t)n);
    }
    Py_XDECREF(r);
    return 1;
}

/* walk(w, size) -> bytes: the READDIRPLUS reply ``w`` (what ops._readdir_direct
 * returns) makes, or -errno as an int; for tests, no request needed. */
static PyObject *py_walk(PyObject *self, PyObject *args)
{
    PyObject *w;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "On", &w, &size))
        return NULL;
    if (!hooks || !hooks->entry_param || size < 0 || reserve((size_t)size) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "no pyfuse3 with mergefs_fast hooks attached");
        return NULL;
    }
    long n = fill_plus(NULL, buffer, (size_t)size, w);
    return n < 0 ? PyLong_FromLong(n) : PyBytes_FromStringAndSize(buffer, n);
}

#define KNOWN_SET (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | \
                   FUSE_SET_ATTR_SIZE | FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | \
                   FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME)

/* WritableView.setattr's order on the upper file: size, owner, mode, times;
 * a time not asked for is kept; *_NOW is the realtime clock, as pyfuse3 fills it. */
static int apply(int fd, const struct stat *a, int to_set)
{
    if ((to_set & FUSE_SET_ATTR_SIZE) && ftruncate(fd, a->st_size) != 0)
        return -1;
    if ((to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) &&
        fchown(fd, (to_set & FUSE_SET_ATTR_UID) ? a->st_uid : (uid_t)-1,
               (to_set & FUSE_SET_ATTR_GID) ? a->st_gid : (gid_t)-1) != 0)
        return -1;
    if ((to_set & FUSE_SET_ATTR_MODE) && fchmod(fd, a->st_mode & 07777) != 0)
        return -1;
    if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME |
                  FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)) {
        struct timespec ts[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}}, now;
        if ((to_set & (FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)) &&
            clock_gettime(CLOCK_REALTIME, &now) != 0)
            return -1;
        if (to_set & FUSE_SET_ATTR_ATIME)
            ts[0] = a->st_atim;
        else if (to_set & FUSE_SET_ATTR_ATIME_NOW)
            ts[0] = now;
        if (to_set & FUSE_SET_ATTR_MTIME)
            ts[1] = a->st_mtim;
        else if (to_set & FUSE_SET_ATTR_MTIME_NOW)
            ts[1] = now;
        if (futimens(fd, ts) != 0)
            return -1;
    }
    return 0;
}

static int h_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *a, int to_set,
                     struct fuse_file_info *fi)
{
    struct stat st;
    entry_t *e = (to_set & ~KNOWN_SET) ? NULL : usable(ino, fi);
    int fd = e && (e->flags & F_WRITE) ? e->fd : -1, dir = 0;
    if (fd < 0 && (e = dir_to_set(ino, to_set, fi, &fd)))
        dir = 1;                       /* an upper directory, opened (_fastns.h) */
    if (fd < 0)                        /* a lower file is copied up first: Python (U4) */
        return setattr_direct(req, ino, a, to_set, fi);
    served[dir ? OP_SETATTR_DIR : OP_SETATTR]++;
    int failed = apply(fd, a, to_set), err = errno;
    if (dir)
        close(fd);
    changed(e, to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID));
    if (failed)
        fuse_reply_err(req, err);
    else if (attributes(e, ino, &st) < 0)
        fuse_reply_err(req, errno ? errno : EIO);
    else
        fuse_reply_attr(req, &st, attr_timeout);
    return 1;
}

/* -- GETXATTR and the first WRITE of a file the table does not serve --------------
 * The kernel asks for ``security.capability`` before the first write to a file
 * (and a chown); that first write of a lower file copies it up. Neither has an
 * entry here yet: ``getxattr(number, name)`` (ops.getxattr as a direct handler:
 * the value, or an errno) answers the first without pyfuse3's coroutine, and
 * ``write_miss(number, 0)`` (fdcache.FdCache.write_for_c: the copy-up, and the
 * copy's writable fd handed to this table; None, or an errno) lets C write the
 * second itself; if that write fails, ``write_miss(number, errno)`` tells the
 * kernel what the copy-up changed (ops.write does the same). set_copyup.
 * Counted as getxattr_direct and write_copied (not also as write). */
static PyObject *getxattr_fn, *write_miss_fn;

/* Reply to a GETXATTR of ``size`` with a value (bytes), as pyfuse3 does: its
 * length for size 0, ERANGE when it does not fit. */
static void reply_value(fuse_req_t req, PyObject *fn, PyObject *r, size_t size)
{
    int err = EIO;
    if (r && PyBytes_Check(r)) {
        size_t len = (size_t)PyBytes_GET_SIZE(r);
        if (size == 0)
            fuse_reply_xattr(req, len);
        else if (len <= size)
            fuse_reply_buf(req, PyBytes_AS_STRING(r), len);
        else
            fuse_reply_err(req, ERANGE);
        Py_DECREF(r);
        return;
    }
    if (r && PyLong_CheckExact(r)) {
        long e = PyLong_AsLong(r);
        if (e > 0 && e < 4096)
            err = (int)e;
        else
            PyErr_Clear();
    } else {
        if (r)
            PyErr_Format(PyExc_TypeError, "getxattr returned %.100s", Py_TYPE(r)->tp_name);
        PyErr_WriteUnraisable(fn);
    }
    Py_XDECREF(r);
    fuse_reply_err(req, err);
}

static int getxattr_direct(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    PyObject *fn = getxattr_fn;
    if (!fn)
        return 0;
    PyObject *args[2] = {PyLong_FromUnsignedLongLong(ino), PyBytes_FromString(name)};
    if (!args[0] || !args[1]) {
        Py_XDECREF(args[0]);
        Py_XDECREF(args[1]);
        PyErr_Clear();
        return 0;
    }
    served[OP_GETXATTR_DIRECT]++;
    Py_INCREF(fn);                  /* the handler may replace it (set_copyup) */
    reply_value(req, fn, PyObject_Vectorcall(fn, args, 2, NULL), size);
    Py_DECREF(fn);
    Py_DECREF(args[0]);
    Py_DECREF(args[1]);
    return 1;
}

/* Python's write_miss(number, err): None (done), an errno, or NULL (raised, a
 * bug: reported). -1 when it could not be called. */
static long call_write_miss(fuse_ino_t ino, int err)
{
    PyObject *args[2] = {PyLong_FromUnsignedLongLong(ino), PyLong_FromLong(err)};
    PyObject *r = args[0] && args[1] ? PyObject_Vectorcall(write_miss_fn, args, 2, NULL) : NULL;
    int called = args[0] && args[1];
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    if (!called) {
        PyErr_Clear();
        return -1;
    }
    long e = 0;
    if (!r) {
        PyErr_WriteUnraisable(write_miss_fn);
        e = EIO;
    } else if (PyLong_CheckExact(r)) {
        e = PyLong_AsLong(r);
        if (e <= 0 || e >= 4096) {
            PyErr_Clear();
            e = EIO;
        }
    }
    Py_XDECREF(r);
    return e;
}

/* The writable entry a no-open WRITE goes through, made by ``write_miss`` when
 * there is none (``*copied`` 1 then). NULL: answered already (``*replied``, the
 * copy-up's error) or left to pyfuse3 (no write_miss; an fd the table does
 * not serve, e.g. a file unlinked while held open). */
static entry_t *writable(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                         int *copied, int *replied)
{
    entry_t *e = usable(ino, fi);
    *copied = *replied = 0;
    if (e && (e->flags & F_WRITE))
        return e;
    if (!write_miss_fn || (fi && fi->fh))
        return NULL;
    long err = call_write_miss(ino, 0);
    if (err < 0)
        return NULL;
    if (err > 0) {
        fuse_reply_err(req, (int)err);
        *replied = 1;
        return NULL;
    }
    e = usable(ino, fi);
    if (!e || !(e->flags & F_WRITE))
        return NULL;
    *copied = 1;
    return e;
}

/* The write after a copy-up failed: Python tells the kernel (see above). */
static void write_failed(fuse_ino_t ino, int copied, int err)
{
    if (copied && write_miss_fn && call_write_miss(ino, err ? err : EIO) < 0)
        PyErr_Clear();
}

/* No entry for a READ: ask Python to open the file (its errors: Python's read
 * handler answers, it meets them again). */
static entry_t *opened(fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (!miss_fn || (fi && fi->fh) || find(ino))
        return NULL;
    PyObject *number = PyLong_FromUnsignedLongLong(ino);
    PyObject *r = number ? PyObject_CallOneArg(miss_fn, number) : NULL;
    Py_XDECREF(number);
    if (!r) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(r);
    return usable(ino, fi);
}

static int h_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                  struct fuse_file_info *fi)
{
    entry_t *e = usable(ino, fi);
    int fresh = !e && (e = fastopen(ino, fi)) != NULL;      /* counted as read_opened */
    if (!e)
        e = opened(ino, fi);
    if (!e)
        return 0;
    if (reserve(size) < 0)
        return 0;
    served[fresh ? OP_READ_OPENED : OP_READ]++;
    ssize_t n = pread(e->fd, buffer, size, off);
    if (n < 0)
        fuse_reply_err(req, errno);
    else
        fuse_reply_buf(req, buffer, (size_t)n);
    return 1;
}

static int h_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                   struct fuse_file_info *fi)
{
    int copied, replied;
    entry_t *e = writable(req, ino, fi, &copied, &replied);
    if (!e)
        return replied;     /* else pyfuse3: Python's write (and its copy-up) */
    served[copied ? OP_WRITE_COPIED : OP_WRITE]++;
    ssize_t n = pwrite(e->fd, buf, size, off);
    int err = errno;
    changed(e, 0);
    if (n < 0) {
        write_failed(ino, copied, err);
        fuse_reply_err(req, err);
    } else
        fuse_reply_write(req, (size_t)n);
    return 1;
}

static int h_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                       struct fuse_file_info *fi)
{
    int copied, replied;
    entry_t *e = writable(req, ino, fi, &copied, &replied);
    if (!e)
        return replied;
    served[copied ? OP_WRITE_COPIED : OP_WRITE]++;
    struct fuse_bufvec dst = FUSE_BUFVEC_INIT(fuse_buf_size(bufv));
    dst.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    dst.buf[0].fd = e->fd;
    dst.buf[0].pos = off;
    ssize_t n = fuse_buf_copy(&dst, bufv, 0);
    changed(e, 0);
    if (n < 0) {
        write_failed(ino, copied, (int)-n);
        fuse_reply_err(req, (int)-n);
    } else
        fuse_reply_write(req, (size_t)n);
    return 1;
}

static int h_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    entry_t *e = usable(ino, fi);
    if (!e)
        return fsync_direct(req, ino, datasync, fi);
    served[OP_FSYNC]++;
    /* a lower file has nothing to sync (kernel overlayfs syncs only an upper
     * file); "volatile" mounts sync nothing */
    int failed = 0;
    if (!volatile_sync && (e->flags & F_UPPER))
        failed = (datasync ? fdatasync(e->fd) : fsync(e->fd)) != 0;
    fuse_reply_err(req, failed ? errno : 0);
    return 1;
}

/* mergefs.layer.is_overlay_private: the overlay format's own names */
static int overlay_private(const char *name)
{
    return !strncmp(name, "trusted.overlay.", 16) || !strncmp(name, "user.overlay.", 13);
}

static int getxattr_at(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size);

/* A GETXATTR's answer as pyfuse3 gives it: the errno of ``n`` < 0, the length
 * for a size 0 request, else the value. */
static void reply_xattr(fuse_req_t req, ssize_t n, int err, size_t size, const char *value)
{
    served[OP_GETXATTR]++;
    if (n < 0)
        fuse_reply_err(req, err);
    else if (size == 0)
        fuse_reply_xattr(req, (size_t)n);
    else
        fuse_reply_buf(req, value, (size_t)n);
}

static int h_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (overlay_private(name)) {        /* as kernel overlayfs answers its own prefix */
        served[OP_GETXATTR]++;
        fuse_reply_err(req, EOPNOTSUPP);
        return 1;
    }
    entry_t *e = usable(ino, NULL);
    if (!e)     /* no fd here: in C where the entry is known (_fastcopy.h), else Python */
        return getxattr_at(req, ino, name, size) || getxattr_direct(req, ino, name, size);
    if (size > XATTR_SIZE_MAX)
        size = XATTR_SIZE_MAX;          /* no value is longer */
    if (reserve(size) < 0)
        return 0;
    ssize_t n = fgetxattr(e->fd, name, size ? buffer : NULL, size);
    if (n < 0 && errno != ENODATA && errno != ERANGE)
        return getxattr_direct(req, ino, name, size);   /* anything else: Python's rules */
    reply_xattr(req, n, errno, size, buffer);
    return 1;
}

/* The names as ops.listxattr gives them (view.xattr_names): the file's, less
 * the overlay format's own; none where the filesystem has no xattrs. Then as
 * pyfuse3 replies: the length for size 0, ERANGE when it does not fit. */
static int h_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    entry_t *e = usable(ino, NULL);
    if (!e)
        return 0;
    ssize_t n = flistxattr(e->fd, NULL, 0);
    if (n > 0) {
        if (reserve((size_t)n) < 0)
            return 0;
        n = flistxattr(e->fd, buffer, (size_t)n);
    }
    if (n < 0) {
        if (errno != ENOTSUP)
            return 0;                   /* a name added meanwhile (ERANGE), ...: Python */
        n = 0;
    }
    size_t len = 0;                     /* the visible names, moved to the front */
    for (ssize_t i = 0; i < n;) {
        size_t one = strnlen(buffer + i, (size_t)(n - i)) + 1;
        if (!overlay_private(buffer + i)) {
            memmove(buffer + len, buffer + i, one);
            len += one;
        }
        i += (ssize_t)one;
    }
    served[OP_LISTXATTR]++;
    if (size == 0)
        fuse_reply_xattr(req, len);
    else if (len <= size)
        fuse_reply_buf(req, buffer, len);
    else
        fuse_reply_err(req, ERANGE);
    return 1;
}

/* -- the copy-up of a lower regular file (upper.Upper.copy_up_file) ----------------- */
#include "_fastcopy.h"
#include "_fastns.h"
#include "_fastio.h"

/* -- the request loop -------------------------------------------------------------- */

/* pyfuse3's loop pays a Python coroutine (its wait for the fd) per request,
 * more than a request served here costs. drain(budget, timeout_ms) waits for
 * the fd (poll, at most timeout_ms each time, without the GIL) and reads and
 * dispatches requests itself, at most ``budget`` of them (``wake``: an fd
 * that ends the wait too): those a hook serves
 * end here; the first one that reaches pyfuse3's Python side leaves its
 * coroutine in py_retval, which drain hands back for the caller to await (as
 * pyfuse3's loop does). None: the fd stayed quiet for timeout_ms, a signal
 * came, the session ended, or the budget is spent (pyfuse3's own loop goes
 * on from there). */
static struct fuse_buf drain_buf;

/* Spinning before sleeping. On a VM whose idle vCPUs halt at once, waking a
 * sleeping server costs more than the server's work on most requests: the
 * requester's IPI exits to the host, and the host reschedules the halted vCPU
 * (~50 us here, against ~10 us for a whole round trip when the requester and
 * the server share a CPU). While requests come back to back, a server that
 * polls the fd for a little while after each reply sees the next one without
 * being woken. How long adapts the way the kernel's haltpoll governor does:
 * a wait that ended in the spin keeps the window; one that slept but got a
 * request within ``spin_max`` doubles it (from SPIN_START_NS); one longer
 * than that (the requester does something else, or nothing) halves it, and
 * below SPIN_START_NS it is 0. So an idle server, or one whose requests come
 * further apart than ``spin_max``, does not spin at all; one under a stream
 * spins at most the gap between two requests. The spin yields the CPU between
 * polls, so a requester waiting for this CPU runs first; when a yield comes
 * back later than ``spin_max`` the CPUs are busy (no idle one to wake): the
 * window drops to 0. ``set_spin(0)``: never. */
#define SPIN_START_NS 10000L
static long spin_max_ns = 0, spin_ns = 0;
static unsigned long long spin_waits, spin_hits, spin_sleeps, spin_contended;
static unsigned long long spin_missed_ns;    /* spun in waits that then slept */

static long ns_since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* poll(2) of ``p`` (GIL released by the caller), spinning first as above. */
static int spin_poll(struct pollfd *p, nfds_t n, int timeout)
{
    if (spin_max_ns <= 0)
        return poll(p, n, timeout);
    int ready = poll(p, n, 0);
    if (ready != 0)
        return ready;
    spin_waits++;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long spun = 0;
    while (spin_ns > 0) {
        ready = poll(p, n, 0);
        if (ready != 0) {
            spin_hits++;
            return ready;
        }
        if (spun >= spin_ns)
            break;
        /* a requester runnable on this CPU goes first (it then sends its request
         * and sleeps, and this spin meets it); something else that keeps the CPU
         * longer than the bound means the CPUs are busy: no idle one to wake,
         * so sleep and stop spinning until sleeps are short again */
        sched_yield();
        long now = ns_since(&t0);
        if (now - spun > spin_max_ns) {
            spin_ns = 0;
            spin_contended++;
            break;
        }
        spun = now;
    }
    spin_sleeps++;
    spin_missed_ns += spun;
    ready = poll(p, n, timeout);
    if (ready > 0 && ns_since(&t0) <= spin_max_ns)
        spin_ns = spin_ns ? (spin_ns * 2 < spin_max_ns ? spin_ns * 2 : spin_max_ns)
                          : SPIN_START_NS;
    else if ((spin_ns /= 2) < SPIN_START_NS)
        spin_ns = 0;
    return ready;
}

static PyObject *py_set_spin(PyObject *self, PyObject *args)
{
    long us;
    if (!PyArg_ParseTuple(args, "l", &us))
        return NULL;
    spin_max_ns = us > 0 ? us * 1000L : 0;
    spin_ns = 0;
    Py_RETURN_NONE;
}

static PyObject *py_spin_stats(PyObject *self, PyObject *args)
{
    int reset = 0;
    if (!PyArg_ParseTuple(args, "|p", &reset))
        return NULL;
    PyObject *d = Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:l,s:l}", "waits", spin_waits,
                                "hits", spin_hits, "sleeps", spin_sleeps,
                                "contended", spin_contended,
                                "missed_us", spin_missed_ns / 1000,
                                "window_us", spin_ns / 1000, "max_us", spin_max_ns / 1000);
    if (d && reset)
        spin_waits = spin_hits = spin_sleeps = spin_contended = spin_missed_ns = 0;
    return d;
}

static PyObject *py_drain(PyObject *self, PyObject *args)
{
    long budget;
    int timeout, ready, wake = -1;
    if (!PyArg_ParseTuple(args, "li|i", &budget, &timeout, &wake))
        return NULL;
    if (!hooks || !*hooks->session)
        Py_RETURN_NONE;
    struct fuse_session *se = *hooks->session;
    /* p[1]: ``wake`` (optional; the views service: trio's epoll fd), readable when
     * something waits for trio (a control connection, a thread's result): return */
    struct pollfd p[2] = {{.fd = fuse_session_fd(se), .events = POLLIN},
                          {.fd = wake, .events = POLLIN}};
    for (long n = 0; n < budget; n++) {
        if (fuse_session_exited(se))
            break;
        Py_BEGIN_ALLOW_THREADS
        ready = spin_poll(p, wake >= 0 ? 2 : 1, timeout);
        Py_END_ALLOW_THREADS
        if (ready < 1 || !(p[0].revents & POLLIN) || (wake >= 0 && p[1].revents))
            break;          /* quiet, a signal (Python handles it), the fd failed, or
                             * trio has work */
        int res = fuse_session_receive_buf(se, &drain_buf);
        if (res == -EINTR)
            break;
        if (res <= 0)
            break;          /* pyfuse3's loop meets the end or the error itself */
        Py_XSETREF(*hooks->retval, Py_NewRef(Py_None));
        fuse_session_process_buf(se, &drain_buf);
        PyObject *pending = *hooks->retval;
        if (pending && pending != Py_None) {
            *hooks->retval = Py_NewRef(Py_None);
            return pending;
        }
    }
    Py_RETURN_NONE;
}

/* -- the names of a layer's hardlinked files (linknames.py) -----------------------
 * layer_links(fd) -> {inode number: (path, ...)}: the non-directories of the
 * layer whose root is open as ``fd`` that have two names or more in it, by the
 * d_ino of their getdents entries, with their paths relative to the root in the
 * order the walk met them; what linknames._scan_python gives, without a Python
 * object per entry and without the GIL. Each directory is opened below its
 * parent's fd (O_NOFOLLOW: a symlink the layer holds is never followed). */
struct lname { uint64_t ino; size_t off; };
struct lscan {
    struct lname *v;
    size_t n, cap;
    char *arena;                /* the paths, NUL-terminated, at lname.off */
    size_t used, size;
    char path[PATH_MAX];        /* the entry being looked at */
};

static int lscan_add(struct lscan *s, uint64_t ino, size_t len)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 4096;
        struct lname *v = realloc(s->v, cap * sizeof(*v));
        if (!v)
            return -1;
        s->v = v;
        s->cap = cap;
    }
    if (s->used + len + 1 > s->size) {
        size_t size = s->size ? s->size * 2 : 1 << 18;
        while (size < s->used + len + 1)
            size *= 2;
        char *a = realloc(s->arena, size);
        if (!a)
            return -1;
        s->arena = a;
        s->size = size;
    }
    memcpy(s->arena + s->used, s->path, len + 1);
    s->v[s->n].ino = ino;
    s->v[s->n++].off = s->used;
    s->used += len + 1;
    return 0;
}

/* Walk the directory open as ``fd`` (its path: s->path[0:len]); -1 and errno set
 * on a failure. */
static int lscan_dir(struct lscan *s, int fd, size_t len)
{
    enum { BUF = 32768 };
    char *buf = malloc(BUF);
    if (!buf)
        return -1;
    for (;;) {
        ssize_t n = getdents64(fd, buf, BUF);
        if (n <= 0) {
            free(buf);
            return n < 0 ? -1 : 0;
        }
        for (ssize_t at = 0; at < n;) {
            struct dirent64 *d = (struct dirent64 *)(buf + at);
            at += d->d_reclen;
            const char *name = d->d_name;
            if (name[0] == '.' && (!name[1] || (name[1] == '.' && !name[2])))
                continue;
            size_t nlen = strlen(name), full = len + (len ? 1 : 0) + nlen;
            if (full >= PATH_MAX) {
                errno = ENAMETOOLONG;
                goto fail;
            }
            char *p = s->path + len;
            if (len)
                *p++ = '/';
            memcpy(p, name, nlen + 1);
            unsigned char type = d->d_type;
            if (type == DT_UNKNOWN) {
                struct stat st;
                if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
                    goto fail;
                type = S_ISDIR(st.st_mode) ? DT_DIR : DT_REG;
            }
            if (type != DT_DIR) {
                if (lscan_add(s, d->d_ino, full) < 0)
                    goto fail;
                continue;
            }
            int sub = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub < 0)
                goto fail;
            int r = lscan_dir(s, sub, full), err = errno;
            close(sub);
            errno = err;
            if (r < 0)
                goto fail;
        }
    }
fail:
    free(buf);
    return -1;
}

static int lname_order(const void *a, const void *b)
{
    const struct lname *x = a, *y = b;
    if (x->ino != y->ino)
        return x->ino < y->ino ? -1 : 1;
    return x->off < y->off ? -1 : x->off > y->off;     /* the walk's order */
}

static PyObject *py_layer_links(PyObject *self, PyObject *arg)
{
    int fd = PyLong_AsLong(arg), failed, err = 0;
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct lscan *s = calloc(1, sizeof(*s));
    if (!s)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    int dup_fd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);   /* its own offset */
    failed = dup_fd < 0 || lscan_dir(s, dup_fd, 0) < 0;
    err = errno;
    if (dup_fd >= 0)
        close(dup_fd);
    if (!failed)
        qsort(s->v, s->n, sizeof(*s->v), lname_order);
    Py_END_ALLOW_THREADS
    PyObject *out = failed ? NULL : PyDict_New();
    if (failed) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    for (size_t i = 0; out && i < s->n;) {
        size_t j = i + 1;
        while (j < s->n && s->v[j].ino == s->v[i].ino)
            j++;
        if (j - i > 1) {
            PyObject *names = PyTuple_New((Py_ssize_t)(j - i));
            PyObject *key = names ? PyLong_FromUnsignedLongLong(s->v[i].ino) : NULL;
            for (size_t k = i; key && k < j; k++) {
                PyObject *b = PyBytes_FromString(s->arena + s->v[k].off);
                if (!b) {
                    Py_CLEAR(key);
                    break;
                }
                PyTuple_SET_ITEM(names, (Py_ssize_t)(k - i), b);
            }
            if (!key || PyDict_SetItem(out, key, names) < 0)
                Py_CLEAR(out);
            Py_XDECREF(key);
            Py_XDECREF(names);
        }
        i = j;
    }
    free(s->v);
    free(s->arena);
    free(s);
    return out;
}

/* -- one layer directory's entries (layer.read_layer_dir) ----------------------- */

struct layer_dirent64 {       /* getdents64's record */
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* The S_IFMT kind of a getdents entry: from d_type, or an lstat where the
 * filesystem gives none (DT_UNKNOWN) or it is a character device (an overlay
 * whiteout is one with device number 0/0: kind 0 then). -1: gone meanwhile. */
static long dent_kind(int fd, const struct layer_dirent64 *d, int overlay)
{
    switch (d->d_type) {
    case DT_DIR: return S_IFDIR;
    case DT_REG: return S_IFREG;
    case DT_LNK: return S_IFLNK;
    case DT_FIFO: return S_IFIFO;
    case DT_SOCK: return S_IFSOCK;
    case DT_BLK: return S_IFBLK;
    case DT_CHR:
        if (!overlay)
            return S_IFCHR;
        break;
    default:
        break;
    }
    struct stat st;
    if (fstatat(fd, d->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return errno == ENOENT ? -1 : -2;
    if (overlay && S_ISCHR(st.st_mode) && st.st_rdev == 0)
        return 0;
    return st.st_mode & S_IFMT;
}

/* layer_entries(fd, Entry, oci, overlay) -> (entries, whiteouts, oci_opaque):
 * ``entries`` {name: Entry(kind, ino)}, ``whiteouts`` a set of names, read
 * with getdents64 on ``fd`` itself (a directory the caller opened for this and
 * closes next: its offset moves; no dup, no rewind, no DirEntry per name). */
static PyObject *py_layer_entries(PyObject *self, PyObject *args)
{
    int fd, oci, overlay;
    PyTypeObject *etype;
    if (!PyArg_ParseTuple(args, "iO!pp", &fd, &PyType_Type, &etype, &oci, &overlay))
        return NULL;
    PyObject *entries = PyDict_New(), *whiteouts = PySet_New(NULL);
    int opaque = 0;
    char buf[32768] __attribute__((aligned(8)));
    if (!entries || !whiteouts)
        goto fail;
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buf, sizeof(buf));
        if (n < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        if (n == 0)
            break;
        for (long off = 0; off < n;) {
            struct layer_dirent64 *d = (struct layer_dirent64 *)(buf + off);
            off += d->d_reclen;
            const char *name = d->d_name;
            if (name[0] == '.' && (!name[1] || (name[1] == '.' && !name[2])))
                continue;
            size_t len = strlen(name);
            if (oci && len >= 4 && memcmp(name, ".wh.", 4) == 0) {
                if (strcmp(name, ".wh..wh..opq") == 0) {
                    opaque = 1;
                    continue;
                }
                PyObject *w = PyBytes_FromStringAndSize(name + 4, (Py_ssize_t)len - 4);
                if (!w || PySet_Add(whiteouts, w) < 0) {
                    Py_XDECREF(w);
                    goto fail;
                }
                Py_DECREF(w);
                continue;
            }
            long kind = dent_kind(fd, d, overlay);
            if (kind == -1)
                continue;
            if (kind == -2) {
                PyErr_SetFromErrno(PyExc_OSError);
                goto fail;
            }
            PyObject *key = PyBytes_FromStringAndSize(name, (Py_ssize_t)len);
            if (!key)
                goto fail;
            if (kind == 0) {
                int r = PySet_Add(whiteouts, key);
                Py_DECREF(key);
                if (r < 0)
                    goto fail;
                continue;
            }
            PyObject *e = etype->tp_alloc(etype, 2);
            PyObject *k = e ? PyLong_FromLong(kind) : NULL;
            PyObject *i = k ? PyLong_FromUnsignedLongLong(d->d_ino) : NULL;
            if (!i) {
                Py_XDECREF(k);
                Py_XDECREF(e);
                Py_DECREF(key);
                goto fail;
            }
            PyTuple_SET_ITEM(e, 0, k);
            PyTuple_SET_ITEM(e, 1, i);
            int r = PyDict_SetItem(entries, key, e);
            Py_DECREF(key);
            Py_DECREF(e);
            if (r < 0)
                goto fail;
        }
    }
    return Py_BuildValue("(NNO)", entries, whiteouts, opaque ? Py_True : Py_False);
fail:
    Py_XDECREF(entries);
    Py_XDECREF(whiteouts);
    return NULL;
}

/* -- the Python API ------------------------------------------------------------ */

/* openat2(root_fd, path, flags, mode) -> fd: mergefs.syscalls.open_beneath's
 * openat2 (RESOLVE_BENEATH, no symlinks, no magic links) without ctypes, whose
 * call and open_how struct cost more than the system call (a no-open READ opens
 * every file it reads this way). OSError as os.open raises it. */
static PyObject *py_openat2(PyObject *self, PyObject *args)
{
    int root;
    PyObject *path;
    unsigned long long flags, mode = 0;
    if (!PyArg_ParseTuple(args, "iSK|K", &root, &path, &flags, &mode))
        return NULL;
    struct open_how how = {.flags = flags, .mode = mode,
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
                                      RESOLVE_NO_MAGICLINKS};
    long fd = syscall(SYS_openat2, root, PyBytes_AS_STRING(path), &how, sizeof(how));
    if (fd < 0)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
    return PyLong_FromLong(fd);
}

static PyObject *py_attach(PyObject *self, PyObject *arg)
{
    const char *path = PyUnicode_AsUTF8(arg);
    if (!path)
        return NULL;
    void *so = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (!so)
        Py_RETURN_FALSE;
    struct mergefs_fast_hooks *h = dlsym(so, "mergefs_fast");
    dlclose(so);                        /* NOLOAD took a reference; the module keeps it */
    /* this version, version 5 (a v8 pyfuse3 build: no namespace hooks), 4 (v7: no
     * READDIRPLUS hook either), 3 (v6: no LOOKUP/MKNOD hooks, no direct handlers
     * either) or 2 (v5: no LISTXATTR hook either) */
    if (!h || !((h->version == MERGEFS_FAST_HOOKS_VERSION &&
                 h->size == sizeof(struct mergefs_fast_hooks)) ||
                (h->version == 5 && h->size == MERGEFS_FAST_HOOKS_V5_SIZE) ||
                (h->version == 4 && h->size == MERGEFS_FAST_HOOKS_V4_SIZE) ||
                (h->version == 3 && h->size == MERGEFS_FAST_HOOKS_V3_SIZE) ||
                (h->version == 2 && h->size == MERGEFS_FAST_HOOKS_V2_SIZE)))
        Py_RETURN_FALSE;
    hooks = h;
    Py_RETURN_TRUE;
}

/* Point pyfuse3's hooks at this module's handlers (``on``) or back to NULL:
 * those of the attached build's struct (HAS_HOOK). */
static void install(int on)
{
#define SET_HOOK(name) (hooks->name = on ? h_##name : NULL)
    SET_HOOK(getattr);
    SET_HOOK(setattr);
    SET_HOOK(read);
    SET_HOOK(write);
    SET_HOOK(write_buf);
    SET_HOOK(fsync);
    SET_HOOK(getxattr);
    if (HAS_HOOK(listxattr))
        SET_HOOK(listxattr);
    if (HAS_HOOK(entry_param)) {
        SET_HOOK(lookup);
        SET_HOOK(mknod);
    }
    if (HAS_HOOK(readdirplus))
        SET_HOOK(readdirplus);
    if (HAS_HOOK(setattr_args)) {     /* v9: the namespace requests */
        SET_HOOK(mkdir);
        SET_HOOK(unlink);
        SET_HOOK(rmdir);
        SET_HOOK(symlink);
        SET_HOOK(rename);
        SET_HOOK(link);
        SET_HOOK(setxattr);
        SET_HOOK(removexattr);
        SET_HOOK(forget);
        SET_HOOK(forget_multi);
    }
#undef SET_HOOK
}

static void clear_direct(void)
{
    for (int i = 0; i < D_N; i++)
        Py_CLEAR(direct_fn[i]);
}

static PyObject *py_enable(PyObject *self, PyObject *args)
{
    int vol;
    if (!PyArg_ParseTuple(args, "dLLp", &attr_timeout, &squash_uid, &squash_gid, &vol))
        return NULL;
    if (!hooks) {
        PyErr_SetString(PyExc_RuntimeError, "no pyfuse3 with mergefs_fast hooks attached");
        return NULL;
    }
    volatile_sync = vol;
    install(1);
    Py_RETURN_NONE;
}

static PyObject *py_set_miss(PyObject *self, PyObject *fn)
{
    Py_XSETREF(miss_fn, fn == Py_None ? NULL : Py_NewRef(fn));
    Py_RETURN_NONE;
}

/* set_direct(**handlers) -> tuple: use these direct handlers, by request name
 * (getattr, lookup, mknod, mkdir, unlink, rmdir, symlink, rename, link, setattr,
 * setxattr, removexattr, forget, fsync; None or left out: that request goes through pyfuse3
 * as before), and return the names the attached build calls them for: none
 * (and nothing set) older than v7, the first three with a v7 or v8 build. */
static PyObject *py_set_direct(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *names[D_N + 1];
    PyObject *fn[D_N] = {NULL};
    for (int i = 0; i < D_N; i++)
        names[i] = (char *)direct_names[i];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOOOOOOOOOOOO", names, &fn[0], &fn[1],
                                     &fn[2], &fn[3], &fn[4], &fn[5], &fn[6], &fn[7], &fn[8],
                                     &fn[9], &fn[10], &fn[11], &fn[12], &fn[13]))
        return NULL;
    if (!hooks || !HAS_HOOK(entry_param) || !hooks->context || !hooks->entry_param)
        return PyTuple_New(0);
    int all = HAS_HOOK(setattr_args) && hooks->setattr_args;
    PyObject *used = PyList_New(0);
    if (!used)
        return NULL;
    for (int i = 0; i < D_N; i++) {
        PyObject *f = fn[i] && fn[i] != Py_None && (all || i <= D_MKNOD) ? fn[i] : NULL;
        Py_XSETREF(direct_fn[i], Py_XNewRef(f));
        PyObject *name = f ? PyUnicode_FromString(direct_names[i]) : NULL;
        if (f && (!name || PyList_Append(used, name) < 0)) {
            Py_XDECREF(name);
            Py_DECREF(used);
            return NULL;
        }
        Py_XDECREF(name);
    }
    PyObject *out = PyList_AsTuple(used);
    Py_DECREF(used);
    return out;
}

/* set_readdir(readdir, unlisted, entry_timeout) -> bool: fill READDIRPLUS
 * replies in C with what ``readdir`` chooses (None: pyfuse3 serves them as
 * before); False, and nothing set, when the attached build cannot (older than v8). */
static PyObject *py_set_readdir(PyObject *self, PyObject *args)
{
    PyObject *fn, *unlisted;
    double timeout;
    if (!PyArg_ParseTuple(args, "OOd", &fn, &unlisted, &timeout))
        return NULL;
    if (!hooks || !HAS_HOOK(readdirplus) || !hooks->entry_param)
        Py_RETURN_FALSE;
    Py_XSETREF(readdir_fn, fn == Py_None ? NULL : Py_NewRef(fn));
    Py_XSETREF(unlisted_fn, unlisted == Py_None ? NULL : Py_NewRef(unlisted));
    entry_timeout = timeout;
    Py_RETURN_TRUE;
}

static PyObject *py_set_listed(PyObject *self, PyObject *args)
{
    PyObject *live;
    double timeout;
    if (!PyArg_ParseTuple(args, "Od", &live, &timeout))
        return NULL;
    if (live != Py_None && !PyDict_Check(live)) {
        PyErr_SetString(PyExc_TypeError, "set_listed: a dict or None");
        return NULL;
    }
    if (!hooks || !HAS_HOOK(entry_param))      /* the builds with a LOOKUP hook */
        Py_RETURN_FALSE;
    Py_XSETREF(live_table, live == Py_None ? NULL : Py_NewRef(live));
    negative_timeout = timeout;
    Py_RETURN_TRUE;
}

/* set_copyup(getxattr, write_miss) -> bool: the handlers of GETXATTR and of the
 * first WRITE of files the table does not serve (see above; None: pyfuse3
 * serves those as before); False, and nothing set, with no hooks attached. */
static PyObject *py_set_copyup(PyObject *self, PyObject *args)
{
    PyObject *get, *miss;
    if (!PyArg_ParseTuple(args, "OO", &get, &miss))
        return NULL;
    if (!hooks)
        Py_RETURN_FALSE;
    Py_XSETREF(getxattr_fn, get == Py_None ? NULL : Py_NewRef(get));
    Py_XSETREF(write_miss_fn, miss == Py_None ? NULL : Py_NewRef(miss));
    Py_RETURN_TRUE;
}

/* set_handles(on): serve requests that carry a file handle from the F_HANDLE
 * entries set under that handle (the views mount's opens) */
static PyObject *py_set_handles(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    handle_keys = on;
    Py_RETURN_NONE;
}

static PyObject *py_disable(PyObject *self, PyObject *unused)
{
    handle_keys = 0;
    Py_CLEAR(miss_fn);
    Py_CLEAR(readdir_fn);
    Py_CLEAR(unlisted_fn);
    Py_CLEAR(getxattr_fn);
    Py_CLEAR(write_miss_fn);
    Py_CLEAR(live_table);
    Py_CLEAR(fastopen_lazy);
    Py_CLEAR(fastopen_live);
    Py_CLEAR(fastopen_fds);
    Py_CLEAR(fastopen_dir_fn);
    Py_CLEAR(kill_fn);
    kill_on = 0;
    fastopen_forget_dirs();
    clear_xattr_at();
    clear_named();
    clear_direct();
    if (hooks)
        install(0);
    clear_table();
    Py_RETURN_NONE;
}

static PyObject *py_set(PyObject *self, PyObject *args)
{
    unsigned long long number;
    int fd;
    unsigned flags;
    PyObject *inode, *node, *sources = NULL;
    if (!PyArg_ParseTuple(args, "KiIOO|O", &number, &fd, &flags, &inode, &node, &sources))
        return NULL;
    if (!number || fd < 0 || !(flags & F_DIR) != !sources) {
        PyErr_SetString(PyExc_ValueError,
                        "inode number 0, negative fd, or sources without DIR (or DIR without)");
        return NULL;
    }
    if (put(number, fd, flags, inode, node, sources) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_drop(PyObject *self, PyObject *arg)
{
    unsigned long long number = PyLong_AsUnsignedLongLong(arg);
    if (number == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    drop_number(number);
    Py_RETURN_NONE;
}

static PyObject *py_clear(PyObject *self, PyObject *unused)
{
    clear_table();
    Py_RETURN_NONE;
}

static PyObject *py_get(PyObject *self, PyObject *arg)
{
    unsigned long long number = PyLong_AsUnsignedLongLong(arg);
    if (number == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    entry_t *e = find(number);
    if (!e)
        Py_RETURN_NONE;
    return Py_BuildValue("(iI)", e->fd, e->flags);
}

static PyObject *py_size(PyObject *self, PyObject *unused)
{
    return PyLong_FromSize_t(used);
}

static PyObject *py_stats(PyObject *self, PyObject *args)
{
    int reset = 0;
    if (!PyArg_ParseTuple(args, "|p", &reset))
        return NULL;
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < OP_N; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(served[i]);
        if (!v || PyDict_SetItemString(d, op_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
        if (reset)
            served[i] = 0;
    }
    return d;
}

static PyMethodDef methods[] = {
    {"attach", py_attach, METH_O,
     "attach(pyfuse3_module_path) -> bool: find the pyfuse3 build's mergefs_fast hooks"},
    {"enable", py_enable, METH_VARARGS,
     "enable(attr_timeout, squash_uid, squash_gid, volatile): serve from now on "
     "(-1: no squash)"},
    {"disable", py_disable, METH_NOARGS, "stop serving; forget every entry"},
    {"set_direct", (PyCFunction)(void (*)(void))py_set_direct, METH_VARARGS | METH_KEYWORDS,
     "set_direct(**handlers) -> names: the direct handlers by request name (getattr, lookup, "
     "mknod: v7 builds; mkdir, unlink, rmdir, symlink, rename, link, setattr, setxattr, "
     "removexattr, forget, fsync: v9); the names the build calls them for"},
    {"set_readdir", py_set_readdir, METH_VARARGS,
     "set_readdir(readdir, unlisted, entry_timeout) -> bool: READDIRPLUS replies filled "
     "in C (v8 builds)"},
    {"set_dir_setattr", py_set_dir_setattr, METH_O,
     "set_dir_setattr(on) -> bool: SETATTRs of upper directories the table serves "
     "answered in C (_fastns.h)"},
    {"set_renamed", py_set_renamed, METH_VARARGS,
     "set_renamed(renamed, lower_has, pin, up) -> bool: RENAMEs of upper files the kernel holds "
     "by that name where no whiteout is needed, renamed in C (_fastns.h; renamed None: none)"},
    {"set_made", py_set_made, METH_VARARGS,
     "set_made(made, sorted_type, uid, gid, not_exact, entry_timeout) -> bool: MKNODs of regular files "
     "and MKDIRs in upper directories the table serves made in C (_fastns.h; made None: none)"},
    {"set_named", py_set_named, METH_VARARGS,
     "set_named(numbers, claims, lazy, entry_dir, entry, entry_timeout) -> bool: LOOKUPs of "
     "names a live parent's listing has, of inodes the table serves or no Inode holds, "
     "answered in C (_fastns.h; None: none)"},
    {"set_listed", py_set_listed, METH_VARARGS,
     "set_listed(live, entry_timeout) -> bool: LOOKUPs of names a live parent's listing "
     "lacks answered in C (None: none)"},
    {"openat2", py_openat2, METH_VARARGS,
     "openat2(root_fd, path, flags, mode=0) -> fd: beneath root_fd, following no symlink"},
    {"walk", py_walk, METH_VARARGS,
     "walk(w, size) -> bytes or -errno: the READDIRPLUS reply the walk ``w`` makes (tests)"},
    {"set_copyup", py_set_copyup, METH_VARARGS,
     "set_copyup(getxattr, write_miss) -> bool: GETXATTR and first WRITEs of files with "
     "no entry, without pyfuse3's coroutine"},
    {"set_xattr_at", py_set_xattr_at, METH_VARARGS,
     "set_xattr_at(live, lazy, entry_dir) -> bool: GETXATTR of files the table has no fd "
     "for read in C, through the directory fd entry_dir(parent, node) gives"},
    {"layer_entries", py_layer_entries, METH_VARARGS,
     "layer_entries(dir_fd, Entry, oci, overlay) -> ({name: Entry(kind, ino)}, whiteouts, "
     "oci_opaque): one layer directory read with getdents64 on dir_fd (moves its offset)"},
    {"copy_up_file", py_copy_up_file, METH_VARARGS,
     "copy_up_file(src_dir, name, work, dst_dir, leaf, with_data, xattrs, not_exact, owner, "
     "ino_xattr, number, no_range) -> (fd, st_ino, lower st_nlink, linked) or (None, why): "
     "a lower regular file copied into the upper (Upper.copy_up_file)"},
    {"copy_up_dir", py_copy_up_dir, METH_VARARGS,
     "copy_up_dir(src_root, path, work, tmp, dst_dir, leaf, xattrs, not_exact, owner, "
     "ino_xattr, number) -> (st_ino, placed) or (None, why): a lower directory (no children) "
     "copied into the upper (Upper.copy_up_dir)"},
    {"layer_links", py_layer_links, METH_O,
     "layer_links(root_fd) -> {inode number: (path, ...)}: a layer's non-directories "
     "with two names or more (linknames)"},
    {"set_fastopen", py_set_fastopen, METH_VARARGS,
     "set_fastopen(lazy, live, fds, max_fds, up, dir_opener) -> bool: the first READ of a "
     "file with no entry opened in C, its fd put in ``fds`` (None: off)"},
    {"set_io", py_set_io, METH_NOARGS,
     "set_io() -> bool: the session's /dev/fuse reads and writes go through C from now on "
     "(before the kernel's INIT is read), for FUSE_HANDLE_KILLPRIV_V2"},
    {"set_killpriv", py_set_killpriv, METH_O,
     "set_killpriv(fn): the INIT reply agrees FUSE_HANDLE_KILLPRIV_V2 if the kernel offers it; "
     "fn(number, gid, pid) then clears a file's set-id bits before a write or truncation by "
     "a caller without CAP_FSETID (None: off)"},
    {"set_miss", py_set_miss, METH_O,
     "set_miss(fn): fn(number) may set an entry when a READ finds none (None: no call)"},
    {"set", py_set, METH_VARARGS,
     "set(number, fd, flags, inode, node[, sources]): serve inode ``number`` through ``fd`` "
     "(borrowed: drop it before closing the fd; sources: a DIR's, for GETATTR)"},
    {"drop", py_drop, METH_O, "drop(number): forget the entry, if any (closes nothing)"},
    {"clear", py_clear, METH_NOARGS, "forget every entry (closes nothing)"},
    {"get", py_get, METH_O, "get(number) -> (fd, flags) or None"},
    {"size", py_size, METH_NOARGS, "how many entries"},
    {"stats", py_stats, METH_VARARGS, "stats(reset=False) -> requests served, by name"},
    {"set_spin", py_set_spin, METH_VARARGS,
     "set_spin(max_us): drain polls the fd up to max_us (adaptive) before sleeping; 0: never"},
    {"spin_stats", py_spin_stats, METH_VARARGS,
     "spin_stats(reset=False) -> {waits, hits, sleeps, contended, window_us, max_us}: "
     "drain's waits that found the fd empty, those a spin ended, those that slept, "
     "spins cut short by a busy CPU"},
    {"drain", py_drain, METH_VARARGS,
     "drain(budget, timeout_ms[, wake_fd]) -> the coroutine of a request for Python to "
     "await, or None"},
    {"set_handles", py_set_handles, METH_O,
     "set_handles(on): requests with a file handle served from the HANDLE entries set "
     "under that handle"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", NULL, -1, methods};

/* The identity of the sources this module was compiled from (fastpath.SOURCES:
   name, size and mtime of each), passed by the build: a server refuses a module
   built from other sources, whose functions may take other arguments. */
#ifndef MERGEFS_FAST_SOURCES
#define MERGEFS_FAST_SOURCES ""
#endif

PyMODINIT_FUNC PyInit__fastpath(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    s_node = PyUnicode_InternFromString("node");
    s_unlinked = PyUnicode_InternFromString("unlinked");
    s_attr = PyUnicode_InternFromString("attr");
    s_xattrs = PyUnicode_InternFromString("xattrs");
    s_sources = PyUnicode_InternFromString("sources");
    s_children = PyUnicode_InternFromString("children");
    if (!s_node || !s_unlinked || !s_attr || !s_xattrs || !s_sources || !s_children ||
        PyModule_AddIntConstant(m, "WRITE", F_WRITE) < 0 ||
        PyModule_AddIntConstant(m, "UPPER", F_UPPER) < 0 ||
        PyModule_AddIntConstant(m, "DIR", F_DIR) < 0 ||
        PyModule_AddIntConstant(m, "MERGED", F_MERGED) < 0 ||
        PyModule_AddIntConstant(m, "HANDLE", F_HANDLE) < 0 ||
        PyModule_AddIntConstant(m, "FRESH", F_FRESH) < 0 ||
        PyModule_AddStringConstant(m, "SOURCES", MERGEFS_FAST_SOURCES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
