/* LOOKUPs of names a live parent's listing at hand has, answered in C (included
 * once, by _fastpath.c, after ``lookup_listed``; set_named).
 *
 * ``ops.lookup`` of such a name takes the node from the listing
 * (``UnionView.lookup_or_none``), counts one lookup of its inode
 * (``InodeTable.entry``) and answers its attributes. Two common cases need no
 * Python, and are served here with the same answer and the same count:
 *
 * - the inode is live, named by exactly this parent and name (its own name,
 *   not another of a hardlink's), and the table serves it (a file C holds the
 *   fd of, an upper directory's O_PATH fd: ``usable_entry``, which checks its
 *   node and sources are still the ones set, and that it is not unlinked): the
 *   kernel revalidating a dentry it holds (a rename's source, ``LOOKUP_EXCL``),
 *   as dpkg makes it do for every ``NAME.dpkg-new``. Its attributes by fstat
 *   (``attributes``: a merged directory's nlink 1, U1), ``inode.lookups`` + 1;
 * - a live upper non-directory the table holds no fd for, or named otherwise
 *   (``upper_entry_named``: lstat'ed in its parent's upper directory, counted
 *   by InodeTable.entry itself);
 * - a non-directory no inode or a lazy record of this very listing holds
 *   (inodes.py, "lazy entry"): lstat'ed in the directory that holds its entry
 *   (``WritableView.entry_dir(parent, node)``, a kept fd, never closed here)
 *   and counted in ``lazy`` as a READDIRPLUS entry is (``count_lazy``): no
 *   Inode until a request for it reaches Python (dpkg looks up every file it
 *   replaces; ``ls -l``, ``stat`` of files not listed).
 *
 * The number is ``number_of`` (the table's ``number_for`` where the answer is
 * plain). Anything else (a directory not live, a number Python must decide, a
 * live inode named otherwise or not in the table, an lstat that fails, an
 * entry whose type is not the listing's) goes on to the direct handler. */
static PyObject *named_claims, *named_lazy, *named_dir_fn, *named_entry_fn, *s_lookups;
static long made_up = -1;           /* the upper's layer index (set_renamed) */

/* ``p`` as an entry reply for inode ``n`` with the attributes in it (squashed as
 * the mount shows them) and ``timeout``. */
static void entry_reply(struct fuse_entry_param *p, uint64_t n, double timeout)
{
    p->ino = p->attr.st_ino = n;
    if (squash_uid >= 0)
        p->attr.st_uid = (uid_t)squash_uid;
    if (squash_gid >= 0)
        p->attr.st_gid = (gid_t)squash_gid;
    p->attr_timeout = attr_timeout;
    p->entry_timeout = timeout;
}

/* The live inode ``ino`` and its listing at hand (new references), if it has
 * one (a dict; of exactly ``type`` unless that is NULL): 0, else -1 with
 * nothing set and no exception left. */
static int live_listing(fuse_ino_t ino, PyObject *type, PyObject **inode, PyObject **children)
{
    PyObject *key = PyLong_FromUnsignedLongLong(ino);
    *inode = key ? Py_XNewRef(PyDict_GetItemWithError(live_table, key)) : NULL;
    Py_XDECREF(key);
    *children = *inode ? PyObject_GetAttr(*inode, s_children) : NULL;
    if (!*children || !PyDict_Check(*children) ||
        (type && (PyObject *)Py_TYPE(*children) != type)) {
        PyErr_Clear();
        Py_CLEAR(*inode);
        Py_CLEAR(*children);
        return -1;
    }
    return 0;
}

/* One more lookup of the live ``inode`` (Inode.lookups += 1); -1: not counted. */
static int count_live(PyObject *inode)
{
    PyObject *c = PyObject_GetAttr(inode, s_lookups);
    long long n = c ? PyLong_AsLongLong(c) : -1;
    Py_XDECREF(c);
    PyObject *more = n > 0 && !PyErr_Occurred() ? PyLong_FromLongLong(n + 1) : NULL;
    int failed = !more || PyObject_SetAttr(inode, s_lookups, more) < 0;
    Py_XDECREF(more);
    return failed ? -1 : 0;
}

/* The live ``inode`` of ``parent/name`` (``node``), if the table serves it: 1 and
 * ``p`` filled, else 0. */
static int held_entry(PyObject *inode, uint64_t n, PyObject *parent, PyObject *name,
                      PyObject *node, struct fuse_entry_param *p)
{
    entry_t *e = usable_entry(n, NULL, 1);
    if (!e || e->inode != inode || e->node != node || (e->flags & F_LAZY))
        return 0;
    PyObject *was = PyObject_GetAttr(inode, s_parent_);
    PyObject *leaf = was == parent ? PyObject_GetAttr(inode, s_name_) : NULL;
    int same = leaf && PyBytes_CheckExact(leaf) &&
               PyObject_RichCompareBool(leaf, name, Py_EQ) == 1;
    Py_XDECREF(was);
    Py_XDECREF(leaf);
    PyErr_Clear();
    if (!same || attributes(e, n, &p->attr) < 0)
        return 0;
    return count_live(inode) == 0;
}

/* A non-directory nothing live holds (``record``: its lazy record, or NULL): 1
 * and ``p`` filled (counted in the lazy records), else 0. */
static int lazy_entry(PyObject *number, PyObject *record, PyObject *parent, PyObject *name,
                      PyObject *node, long kind, struct fuse_entry_param *p)
{
    if (record && !same_listing(record, parent, name, node))
        return 0;
    long fd = entry_dir_of(named_dir_fn, parent, node);
    if (fd < 0 || fstatat((int)fd, PyBytes_AS_STRING(name), &p->attr, AT_SYMLINK_NOFOLLOW) != 0 ||
        (long)(p->attr.st_mode & S_IFMT) != kind)
        return 0;                        /* Python looks (and answers what it finds) */
    return count_lazy(named_lazy, number, record, parent, name, node) == 0;
}

/* A live non-directory of the upper that ``held_entry`` does not answer (no fd in
 * the table; another of a hardlink's names, as after dpkg's backup link; a
 * name made again): lstat'ed in its parent's upper directory (the table's
 * O_PATH fd), then counted by ``entry(parent, name, node, number)``
 * (InodeTable.entry: it makes this name the inode's own, as ops.lookup has
 * it): 1 and ``p`` filled, else 0 (nothing counted). */
static int upper_entry_named(fuse_ino_t parent_ino, PyObject *parent, PyObject *name,
                             PyObject *node, long kind, PyObject *number,
                             struct fuse_entry_param *p)
{
    PyObject *layers = PyTuple_GET_ITEM(node, 1);
    if (!named_entry_fn || made_up < 0 || !PyTuple_Check(layers) ||
        PyTuple_GET_SIZE(layers) != 1 || PyLong_AsLong(PyTuple_GET_ITEM(layers, 0)) != made_up) {
        PyErr_Clear();
        return 0;
    }
    entry_t *e = usable_entry(parent_ino, NULL, 1);
    if (!e || !(e->flags & F_DIR) || e->inode != parent ||
        fstatat(e->fd, PyBytes_AS_STRING(name), &p->attr, AT_SYMLINK_NOFOLLOW) != 0 ||
        (long)(p->attr.st_mode & S_IFMT) != kind)
        return 0;
    PyObject *args[5] = {NULL, parent, name, node, number};
    PyObject *r = PyObject_Vectorcall(named_entry_fn, args + 1,
                                      4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    int counted = r && !PyLong_Check(r);     /* (an int: the errno of a bug) */
    if (!r)
        PyErr_WriteUnraisable(named_entry_fn);
    Py_XDECREF(r);
    PyErr_Clear();
    return counted;
}

static int lookup_named(fuse_req_t req, fuse_ino_t parent_ino, const char *cname)
{
    PyObject *parent, *children, *name = NULL, *node = NULL, *number = NULL;
    if (live_listing(parent_ino, NULL, &parent, &children) < 0)
        return 0;
    int answered = 0;
    if (!(name = PyBytes_FromString(cname)))
        goto out;
    node = PyDict_GetItemWithError(children, name);
    if (!node || !PyTuple_Check(node) || PyTuple_GET_SIZE(node) < 3)
        goto out;
    Py_INCREF(node);
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(node, 0));
    uint64_t n = number_of(node, named_numbers, named_claims);
    if (!n || PyErr_Occurred() || !(number = PyLong_FromUnsignedLongLong(n)))
        goto out;
    struct fuse_entry_param p;
    memset(&p, 0, sizeof(p));
    PyObject *inode = PyDict_GetItemWithError(live_table, number);
    if (inode) {
        Py_INCREF(inode);
        answered = held_entry(inode, n, parent, name, node, &p);
        Py_DECREF(inode);
        if (!answered && kind != S_IFDIR)
            answered = upper_entry_named(parent_ino, parent, name, node, kind, number, &p);
    } else if (!PyErr_Occurred() && kind != S_IFDIR && named_dir_fn) {
        PyObject *record = PyDict_GetItemWithError(named_lazy, number);
        if (!PyErr_Occurred()) {
            Py_XINCREF(record);
            answered = lazy_entry(number, record, parent, name, node, kind, &p);
            Py_XDECREF(record);
        }
    }
    if (answered) {
        entry_reply(&p, n, named_timeout);   /* (attributes() squashed a held one) */
        served[OP_LOOKUP_NAMED]++;
        fuse_reply_entry(req, &p);
    }
out:
    PyErr_Clear();
    Py_XDECREF(number);
    Py_XDECREF(node);
    Py_XDECREF(name);
    Py_XDECREF(children);
    Py_DECREF(parent);
    return answered;
}

static PyObject *named_sorted, *lower_has_fn, *pin_fn;
static int dir_setattr;

static void clear_named(void)
{
    dir_setattr = 0;
    Py_CLEAR(named_entry_fn);
    Py_CLEAR(renamed_fn);
    Py_CLEAR(lower_has_fn);
    Py_CLEAR(pin_fn);
    Py_CLEAR(made_fn);
    Py_CLEAR(named_sorted);
    Py_CLEAR(named_numbers);
    Py_CLEAR(named_claims);
    Py_CLEAR(named_lazy);
    Py_CLEAR(named_dir_fn);
}

/* set_named(numbers, claims, lazy, entry_dir, entry, entry_timeout) -> bool: the
 * inode table's ``_numbers``, ``_claims`` and ``lazy`` dicts, WritableView.entry_dir
 * and InodeTable.entry (None: no live upper file answered by lstat), for
 * ``lookup_named`` (it needs ``set_listed``'s live
 * table too); numbers None: no LOOKUP answered here. */
static PyObject *py_set_named(PyObject *self, PyObject *args)
{
    PyObject *numbers, *claims, *lazy, *fn;
    double timeout;
    PyObject *entry;
    if (!PyArg_ParseTuple(args, "OOOOOd", &numbers, &claims, &lazy, &fn, &entry, &timeout))
        return NULL;
    if (numbers != Py_None && (!PyDict_Check(numbers) || !PyDict_Check(claims) ||
                               !PyDict_Check(lazy))) {
        PyErr_SetString(PyExc_TypeError, "set_named: dicts or None");
        return NULL;
    }
    if (!s_lookups && !(s_lookups = PyUnicode_InternFromString("lookups")))
        return NULL;
    if (intern_names() < 0)
        return NULL;
    if (!hooks || !HAS_HOOK(entry_param))      /* the builds with a LOOKUP hook */
        Py_RETURN_FALSE;
    clear_named();
    if (numbers != Py_None) {
        named_numbers = Py_NewRef(numbers);
        named_claims = Py_NewRef(claims);
        named_lazy = Py_NewRef(lazy);
        named_dir_fn = fn == Py_None ? NULL : Py_NewRef(fn);
        named_entry_fn = entry == Py_None ? NULL : Py_NewRef(entry);
    }
    named_timeout = timeout;
    Py_RETURN_TRUE;
}

/* -- MKNOD of a regular file in an upper directory the table serves ------------
 * ``ops.mknod`` of a regular file (the kernel's open(O_CREAT) on a no-open
 * mount) makes the file in place in the parent's upper directory
 * (``WritableView._make``, ``Upper.make_in_place``) and keeps its fd for the
 * writes that follow. Where the parent is live, its listing at hand (a
 * SortedDict that is its own: ``named_sorted``, not a view's shared one)
 * lacks the name and the table serves the parent (an upper directory's O_PATH
 * fd: ``usable_entry``, so its node and sources are the ones set), the file
 * is made here with the same syscalls: openat(O_CREAT|O_EXCL|O_NOFOLLOW) with
 * its final mode when the request's owner is the server's own and the umask
 * keeps the mode (no set-id or sticky bit: ``made_not_exact``), else mode 0
 * then fchown and fchmod; the group is the parent's when it is set-gid.
 * ``made(parent, name, st_ino, fd)`` (ops._made_in_c) then does Python's
 * bookkeeping (the listing, the inode table, the fd cache, which hands the fd
 * to this table) and returns the inode number, or an errno; the reply is the
 * fstat made here. MKDIR the same way (mkdirat, the parent's set-gid bit
 * kept, fchownat/fchmodat by name; ``made`` with fd -1 also has the table
 * serve the new directory, as ops.mkdir). EEXIST (a whiteout there: staged and renamed over it) and
 * anything else unusual go to the direct handler, which decides as before. */
static long long made_uid = -1, made_gid = -1;
static unsigned made_not_exact = 07777;
static double made_timeout;

static int made_in(fuse_req_t req, fuse_ino_t parent_ino, const char *cname, mode_t mode,
                   int is_dir)
{
    PyObject *parent, *children, *name = NULL;
    if (live_listing(parent_ino, named_sorted, &parent, &children) < 0)
        return 0;
    int answered = 0, fd = -1;
    if (!(name = PyBytes_FromString(cname)) || PyDict_Contains(children, name) != 0)
        goto out;
    entry_t *e = usable_entry(parent_ino, NULL, 1);
    struct stat pst, st;
    if (!e || !(e->flags & F_DIR) || e->inode != parent || fstat(e->fd, &pst) != 0)
        goto out;
    int dir = e->fd;                  /* (e is not used after Python ran: the table may move) */
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    uid_t uid = ctx->uid;
    gid_t gid = (pst.st_mode & S_ISGID) ? pst.st_gid : ctx->gid;
    if (is_dir)
        mode |= pst.st_mode & S_ISGID;      /* as WritableView._make */
    int final = (long long)uid == made_uid && (long long)gid == made_gid &&
                !(mode & made_not_exact);
    mode_t made = final ? (mode & 07777) : 0;
    if (is_dir)
        fd = mkdirat(dir, cname, made) == 0 ? -2 : -1;    /* -2: made, no fd */
    else
        fd = openat(dir, cname, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, made);
    if (fd == -1) {
        if (errno == EEXIST)
            goto out;                     /* a whiteout (or a race): Python */
        answered = 1;
        fuse_reply_err(req, errno);
        goto out;
    }
    int ok = final && (is_dir ? fstatat(dir, cname, &st, AT_SYMLINK_NOFOLLOW) : fstat(fd, &st))
             == 0 && st.st_uid == uid && st.st_gid == gid && (st.st_mode & 07777) == made;
    if (!ok && (is_dir ? fchownat(dir, cname, uid, gid, AT_SYMLINK_NOFOLLOW) != 0 ||
                         fchmodat(dir, cname, mode & 07777, 0) != 0 ||
                         fstatat(dir, cname, &st, AT_SYMLINK_NOFOLLOW) != 0
                       : fchown(fd, uid, gid) != 0 || fchmod(fd, mode & 07777) != 0 ||
                         fstat(fd, &st) != 0)) {
        int err = errno;
        if (fd >= 0)
            close(fd);
        fd = -1;
        unlinkat(dir, cname, is_dir ? AT_REMOVEDIR : 0);  /* the view is unchanged */
        answered = 1;
        fuse_reply_err(req, err);
        goto out;
    }
    PyObject *args[5] = {NULL, PyLong_FromUnsignedLongLong(parent_ino), Py_NewRef(name),
                         PyLong_FromUnsignedLongLong(st.st_ino), PyLong_FromLong(is_dir ? -1 : fd)};
    PyObject *r = args[1] && args[3] && args[4] ?
        PyObject_Vectorcall(made_fn, args + 1, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL) : NULL;
    for (int i = 1; i < 5; i++)
        Py_XDECREF(args[i]);
    unsigned long long n = r && PyLong_CheckExact(r) ? PyLong_AsUnsignedLongLong(r) : 0;
    Py_XDECREF(r);
    if (!r)
        PyErr_WriteUnraisable(made_fn);
    PyErr_Clear();
    answered = 1;
    if (n < 4096) {                       /* an errno (or a bug: EIO); the fd was not kept */
        if (fd >= 0)
            close(fd);
        fd = -1;
        fuse_reply_err(req, n > 0 ? (int)n : EIO);
        goto out;
    }
    fd = -1;                              /* the fd cache's now */
    struct fuse_entry_param p;
    memset(&p, 0, sizeof(p));
    p.attr = st;
    entry_reply(&p, n, made_timeout);
    served[is_dir ? OP_MKDIR_MADE : OP_MKNOD_MADE]++;
    fuse_reply_entry(req, &p);
out:
    PyErr_Clear();
    Py_XDECREF(name);
    Py_XDECREF(children);
    Py_DECREF(parent);
    return answered;
}

static int mknod_made(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    return made_in(req, parent, name, mode, 0);
}

static int mkdir_made(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    return made_in(req, parent, name, mode, 1);
}

/* set_made(made, sorted_type, uid, gid, not_exact, entry_timeout) -> bool:
 * ``made(parent, name, st_ino, fd)`` for ``made_in`` (None: no MKNOD or MKDIR
 * made here), the listing type it may add to, the server's own uid and gid and the
 * mode bits creating cannot set exactly (Upper._creator, Upper._not_exact). */
static PyObject *py_set_made(PyObject *self, PyObject *args)
{
    PyObject *fn, *type;
    long long uid, gid;
    unsigned int not_exact;
    double timeout;
    if (!PyArg_ParseTuple(args, "OOLLId", &fn, &type, &uid, &gid, &not_exact, &timeout))
        return NULL;
    if (!hooks || !HAS_HOOK(entry_param))
        Py_RETURN_FALSE;
    Py_CLEAR(made_fn);
    Py_CLEAR(named_sorted);
    if (fn != Py_None) {
        made_fn = Py_NewRef(fn);
        named_sorted = Py_NewRef(type);
    }
    made_uid = uid;
    made_gid = gid;
    made_not_exact = not_exact;
    made_timeout = timeout;
    Py_RETURN_TRUE;
}

/* ``fn(*args[1:n + 1])`` (``args[0]`` free for the vectorcall offset) of a direct
 * handler that returns None or an errno: 0, the errno, or EIO (an exception:
 * printed as unraisable). */
static int errno_call(PyObject *fn, PyObject **args, size_t n)
{
    PyObject *r = PyObject_Vectorcall(fn, args + 1, n | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    int err = r == Py_None ? 0 : r && PyLong_CheckExact(r) ? (int)PyLong_AsLong(r) : EIO;
    if (!r)
        PyErr_WriteUnraisable(fn);
    Py_XDECREF(r);
    return err;
}

/* -- RENAME of an upper file the kernel holds by that name ----------------------
 * ``ops.rename`` of an upper file (dpkg's NAME.dpkg-new into place) whose live
 * inode carries exactly that name renames it inside the upper and updates the
 * view (rename._move, nothing copied up). So it does a directory the upper
 * alone serves (node and sources: dpkg's DIR.dpkg-new) to a name that shows
 * nothing, where nothing below shows at either name (no whiteout, no opaque
 * mark; Python then drops its cached fds of both paths). Here, where both parents are live
 * with their own listings at hand (``named_sorted``) and served by the table
 * (their upper O_PATH fds), the source is a non-directory of the upper layer
 * (``made_up``) whose live inode is named so, nothing below the upper shows at
 * the old name (no whiteout needed: a parent served by the upper alone, else
 * ``lower_has(parent, name)`` says False) and the new name shows nothing or a
 * non-directory of another inode (an upper file the kernel holds pinned
 * first, as ops.rename pins it), the rename is one renameat here, then
 * ``renamed(parent, name, new_parent, new_name, inode, dst)`` (the Inodes,
 * the source's live Inode and the node shown at the new name or None:
 * WritableView.renamed) updates the listings and the inode table. Needs
 * ``set_named``'s tables; everything else goes to the direct handler. */

/* The live directory ``ino``, its listing (exact ``named_sorted``) and its table
 * fd: 0, or -1 (new references in *inode, *children only on 0). */
static int served_dir(fuse_ino_t ino, PyObject **inode, PyObject **children, int *fd)
{
    if (live_listing(ino, named_sorted, inode, children) < 0)
        return -1;
    entry_t *e = usable_entry(ino, NULL, 1);
    if (!e || !(e->flags & F_DIR) || e->inode != *inode) {
        Py_CLEAR(*inode);
        Py_CLEAR(*children);
        return -1;
    }
    *fd = e->fd;
    return 0;
}

/* Is ``inode`` live, not unlinked, named ``parent/name`` and served by ``node``? */
static int named_so(PyObject *inode, PyObject *parent, PyObject *name, PyObject *node)
{
    PyObject *was = PyObject_GetAttr(inode, s_parent_);
    PyObject *leaf = was == parent ? PyObject_GetAttr(inode, s_name_) : NULL;
    PyObject *now = leaf ? PyObject_GetAttr(inode, s_node) : NULL;
    PyObject *unlinked = now == node ? PyObject_GetAttr(inode, s_unlinked) : NULL;
    int same = unlinked == Py_False && PyBytes_CheckExact(leaf) &&
               PyObject_RichCompareBool(leaf, name, Py_EQ) == 1;
    Py_XDECREF(was);
    Py_XDECREF(leaf);
    Py_XDECREF(now);
    Py_XDECREF(unlinked);
    PyErr_Clear();
    return same;
}

/* Is the directory ``inode`` served by the upper alone (its ``sources``)? */
static int only_upper(PyObject *inode)
{
    PyObject *sources = PyObject_GetAttr(inode, s_sources);
    int only = sources && PyTuple_Check(sources) && PyTuple_GET_SIZE(sources) == 1 &&
               PyLong_AsLong(PyTuple_GET_ITEM(sources, 0)) == made_up;
    Py_XDECREF(sources);
    PyErr_Clear();
    return only;
}

/* Does anything below the upper show at ``parent/name``? 1, 0, or -1 (unknown) */
static int below(PyObject *parent, PyObject *name)
{
    if (only_upper(parent))
        return 0;
    PyObject *args[2] = {parent, name};
    PyObject *r = PyObject_Vectorcall(lower_has_fn, args, 2, NULL);
    int has = r == Py_False ? 0 : r == Py_True ? 1 : -1;
    Py_XDECREF(r);
    PyErr_Clear();
    return has;
}

/* A node (kind, layers, inos) of the upper layer: a non-directory, or a
 * directory the upper alone serves (``*dir`` 1): its number, or 0. */
static uint64_t upper_entry(PyObject *node, int *dir)
{
    if (!node || !PyTuple_Check(node) || PyTuple_GET_SIZE(node) < 3)
        return 0;
    PyObject *layers = PyTuple_GET_ITEM(node, 1);
    *dir = PyLong_AsLong(PyTuple_GET_ITEM(node, 0)) == S_IFDIR;
    if (!PyTuple_Check(layers) || PyTuple_GET_SIZE(layers) != 1 ||
        PyLong_AsLong(PyTuple_GET_ITEM(layers, 0)) != made_up || PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return number_of(node, named_numbers, named_claims);
}

/* A node the view shows at the new name: may it be renamed over here? A
 * non-directory of another number (an inode the kernel holds for it loses that
 * name in ``renamed``): 1; 2 when it is an upper file the kernel holds, which
 * ``pin`` (ops.rename's: FdCache.pin) keeps an fd on first; else 0. */
static int replaceable(PyObject *dst, uint64_t n)
{
    PyObject *layers = PyTuple_Check(dst) && PyTuple_GET_SIZE(dst) >= 3 ?
        PyTuple_GET_ITEM(dst, 1) : NULL;
    if (!layers || !PyTuple_Check(layers) || !PyTuple_GET_SIZE(layers) ||
        PyLong_AsLong(PyTuple_GET_ITEM(dst, 0)) == S_IFDIR || PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    int lower = PyLong_AsLong(PyTuple_GET_ITEM(layers, 0)) != made_up;
    uint64_t m = number_of(dst, named_numbers, named_claims);
    PyObject *number = m && m != n ? PyLong_FromUnsignedLongLong(m) : NULL;
    int ok = number && !PyErr_Occurred();
    int held = ok && !lower && (PyDict_Contains(live_table, number) != 0 ||
                                PyDict_Contains(named_lazy, number) != 0);
    Py_XDECREF(number);
    PyErr_Clear();
    return !ok ? 0 : held ? 2 : 1;
}

static int rename_made(fuse_req_t req, fuse_ino_t p1, const char *n1, fuse_ino_t p2,
                       const char *n2)
{
    PyObject *parent1 = NULL, *children1 = NULL, *parent2 = NULL, *children2 = NULL;
    PyObject *name1 = NULL, *name2 = NULL, *src = NULL, *dst = NULL, *inode = NULL,
             *number = NULL;
    int fd1, fd2, answered = 0;
    if (served_dir(p1, &parent1, &children1, &fd1) < 0 ||
        served_dir(p2, &parent2, &children2, &fd2) < 0 ||
        !(name1 = PyBytes_FromString(n1)) || !(name2 = PyBytes_FromString(n2)))
        goto out;
    src = Py_XNewRef(PyDict_GetItemWithError(children1, name1));
    int dir = 0;
    uint64_t n = upper_entry(src, &dir);
    if (!n || !(number = PyLong_FromUnsignedLongLong(n)))
        goto out;
    inode = Py_XNewRef(PyDict_GetItemWithError(live_table, number));
    if (!inode || !named_so(inode, parent1, name1, src))
        goto out;
    dst = Py_XNewRef(PyDict_GetItemWithError(children2, name2));
    int over = dst ? (dir ? 0 : replaceable(dst, n)) : 1;
    if (PyErr_Occurred() || !over || below(parent1, name1) != 0 ||
        (dir && (below(parent2, name2) != 0 || !only_upper(inode))))
        goto out;
    answered = 1;
    if (over == 2) {                      /* the kernel may hold it open: an fd kept */
        PyObject *args[3] = {NULL, parent2, name2};
        int err = errno_call(pin_fn, args, 2);
        if (err) {
            fuse_reply_err(req, err > 0 && err < 4096 ? err : EIO);
            goto out;
        }
    }
    if (renameat(fd1, n1, fd2, n2) != 0) {
        fuse_reply_err(req, errno);
        goto out;
    }
    PyObject *args[7] = {NULL, parent1, name1, parent2, name2, inode, dst ? dst : Py_None};
    int err = errno_call(renamed_fn, args, 6);
    served[OP_RENAME_MADE]++;
    fuse_reply_err(req, err > 0 && err < 4096 ? err : err ? EIO : 0);
out:
    PyErr_Clear();
    Py_XDECREF(number);
    Py_XDECREF(inode);
    Py_XDECREF(dst);
    Py_XDECREF(src);
    Py_XDECREF(name2);
    Py_XDECREF(name1);
    Py_XDECREF(children2);
    Py_XDECREF(parent2);
    Py_XDECREF(children1);
    Py_XDECREF(parent1);
    return answered;
}

/* set_renamed(renamed, lower_has, pin, up) -> bool: ``renamed(parent, name,
 * new_parent, new_name, inode, dst)`` for ``rename_made`` (None: no RENAME here),
 * WritableView.lower_has, ``pin(parent, name)`` (FdCache.pin: None or an
 * errno) and the upper's layer index. */
static PyObject *py_set_renamed(PyObject *self, PyObject *args)
{
    PyObject *fn, *has, *pin;
    long up;
    if (!PyArg_ParseTuple(args, "OOOl", &fn, &has, &pin, &up))
        return NULL;
    if (!hooks || !HAS_HOOK(entry_param))
        Py_RETURN_FALSE;
    Py_CLEAR(renamed_fn);
    Py_CLEAR(lower_has_fn);
    Py_CLEAR(pin_fn);
    if (fn != Py_None) {
        renamed_fn = Py_NewRef(fn);
        lower_has_fn = Py_NewRef(has);
        pin_fn = Py_NewRef(pin);
    }
    made_up = up;
    Py_RETURN_TRUE;
}

/* -- SETATTR of an upper directory the table serves ------------------------------
 * chown, chmod and utimes of a directory (dpkg sets all three on each one it
 * makes) go to WritableView.setattr, which changes the upper directory by name
 * in its parent (owner, mode, times: ``apply``'s order) and reads its
 * attributes again. For a directory the table serves (an upper one: its
 * O_PATH fd, ``usable_entry`` with dirs) h_setattr makes the same calls
 * (``apply``) through the directory opened again from that fd
 * (``dir_to_set``: the entry, the new fd in *fd, which the caller closes),
 * drops Python's cached attributes (``changed``) and replies with its fstat
 * (``attributes``: nlink 1 when merged, U1). A size, a file handle, a
 * directory the server cannot open, anything else: the direct handler. */
#define DIR_SET (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | \
                 FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW | \
                 FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME)

static entry_t *dir_to_set(fuse_ino_t ino, int to_set, struct fuse_file_info *fi, int *fd)
{
    if (!dir_setattr || (to_set & ~DIR_SET) || (fi && fi->fh))
        return NULL;
    entry_t *e = usable_entry(ino, NULL, 1);
    if (!e || !(e->flags & F_DIR) || (e->flags & F_LAZY))
        return NULL;
    *fd = openat(e->fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    return *fd < 0 ? NULL : e;
}

/* set_dir_setattr(on) -> bool: SETATTRs of the upper directories the table serves
 * answered here (``dir_to_set``; a writable mount's). */
static PyObject *py_set_dir_setattr(PyObject *self, PyObject *arg)
{
    dir_setattr = PyObject_IsTrue(arg) == 1;
    PyErr_Clear();
    if (!hooks)
        Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}
