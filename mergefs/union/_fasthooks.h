/* The hooks the patched pyfuse3 (tools/pyfuse3_inode_fh.py, v5; v6 adds
 * LISTXATTR; v7 LOOKUP, MKNOD and two helpers of pyfuse3's own; v8 READDIRPLUS;
 * v9 MKDIR, UNLINK, RMDIR, SYMLINK, RENAME, LINK, SETXATTR, REMOVEXATTR, FORGET
 * and a third helper) calls at the top
 * of its C request callbacks, before it makes a coroutine for the request.
 * A hook returns 1 when it replied to the request, 0 to let pyfuse3 go on as
 * usual (the Python handler). NULL hooks: stock behaviour. The patch inserts
 * this file's text into pyfuse3's generated C and exports ``mergefs_fast``
 * (its last two fields point at pyfuse3's session and pending coroutine);
 * mergefs/union/_fastpath.c finds it with dlsym and fills it in. Change the
 * layout only together with MERGEFS_FAST_HOOKS_VERSION, and only by appending:
 * the fast path still attaches to a version-2, -3, -4 or -5 build (the struct up
 * to ``retval``, ``listxattr``, ``entry_param`` or ``readdirplus``,
 * MERGEFS_FAST_HOOKS_V2_SIZE / _V3_SIZE / _V4_SIZE / _V5_SIZE) and serves it
 * without the hooks that build lacks. */
#ifndef MERGEFS_FAST_HOOKS_H
#define MERGEFS_FAST_HOOKS_H
#define MERGEFS_FAST_HOOKS_VERSION 6
struct mergefs_fast_hooks {
    unsigned int version;     /* MERGEFS_FAST_HOOKS_VERSION of the pyfuse3 build */
    unsigned int size;        /* sizeof(struct mergefs_fast_hooks) there */
    int (*getattr)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
    int (*setattr)(fuse_req_t, fuse_ino_t, struct stat *, int, struct fuse_file_info *);
    int (*read)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
    int (*write)(fuse_req_t, fuse_ino_t, const char *, size_t, off_t, struct fuse_file_info *);
    int (*write_buf)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t, struct fuse_file_info *);
    int (*fsync)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);
    int (*getxattr)(fuse_req_t, fuse_ino_t, const char *, size_t);
    /* pyfuse3's own state, for a request loop in C (_fastpath.drain): its
     * session, and ``py_retval``, where a callback leaves the coroutine of a
     * request that Python serves (the loop must await it) */
    struct fuse_session **session;
    PyObject **retval;
    /* version 3 */
    int (*listxattr)(fuse_req_t, fuse_ino_t, size_t);
    /* version 4 */
    int (*lookup)(fuse_req_t, fuse_ino_t, const char *);
    int (*mknod)(fuse_req_t, fuse_ino_t, const char *, mode_t, dev_t);
    /* filled in by pyfuse3 itself (never NULL in a version-4 build): the
     * RequestContext of a request (a new reference), and the reply struct of
     * an EntryAttributes (NULL for any other object) */
    PyObject *(*context)(fuse_req_t);
    const struct fuse_entry_param *(*entry_param)(PyObject *);
    /* version 5 */
    int (*readdirplus)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
    /* version 6: the namespace requests (their arguments as libfuse's) */
    int (*mkdir)(fuse_req_t, fuse_ino_t, const char *, mode_t);
    int (*unlink)(fuse_req_t, fuse_ino_t, const char *);
    int (*rmdir)(fuse_req_t, fuse_ino_t, const char *);
    int (*symlink)(fuse_req_t, const char *, fuse_ino_t, const char *);
    int (*rename)(fuse_req_t, fuse_ino_t, const char *, fuse_ino_t, const char *, unsigned int);
    int (*link)(fuse_req_t, fuse_ino_t, fuse_ino_t, const char *);
    int (*setxattr)(fuse_req_t, fuse_ino_t, const char *, const char *, size_t, int);
    int (*removexattr)(fuse_req_t, fuse_ino_t, const char *);
    int (*forget)(fuse_req_t, fuse_ino_t, uint64_t);
    int (*forget_multi)(fuse_req_t, size_t, struct fuse_forget_data *);
    /* filled in by pyfuse3 (never NULL in a version-6 build): the
     * ``(EntryAttributes, SetattrFields)`` its setattr handler is called with for
     * a SETATTR's stat and to_set (a new reference; NULL and an exception set
     * when the clock cannot be read for a *_NOW time) */
    PyObject *(*setattr_args)(const struct stat *, int);
};
#define MERGEFS_FAST_HOOKS_V2_SIZE offsetof(struct mergefs_fast_hooks, listxattr)
#define MERGEFS_FAST_HOOKS_V3_SIZE offsetof(struct mergefs_fast_hooks, lookup)
#define MERGEFS_FAST_HOOKS_V4_SIZE offsetof(struct mergefs_fast_hooks, readdirplus)
#define MERGEFS_FAST_HOOKS_V5_SIZE offsetof(struct mergefs_fast_hooks, mkdir)
#endif
