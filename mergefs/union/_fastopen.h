/* The first READ of a regular file with no entry, opened here (included once, by
 * _fastpath.c, after the table and before usable_entry).
 *
 * Without this, such a READ calls Python's ``miss`` (ops._open_for_c): the lazy
 * record made into an Inode, the path resolved through the layers, the file
 * opened (fdcache.FdCache.content_fd), its entry handed to the table. ``tar -c``
 * of a mount reads every file once: ~27k of those per run. Here the READ is
 * served from what the inode table already knows: the lazy record of a file
 * the kernel was handed by a READDIRPLUS filled in C (``lazy[number] = [count,
 * parent, name, node]``, inodes.py), or a live Inode (its ``_parent``,
 * ``_name``, ``node``), and the parent's directory in the file's layer (a fd
 * kept here per (parent Inode, layer), asked of Python's ``dir_opener(parent,
 * layer)`` once, ops._layer_dir). The file is opened below that directory by
 * its one name, O_NOFOLLOW, read-only, as view.open_content opens it, and used
 * only if fstat finds a regular file with the node's inode number in that layer
 * and a single link; anything else (a hardlink, a name that meanwhile names
 * another file, an Inode unlinked or with other names, any error) leaves the
 * READ to Python as before.
 *
 * The fd is the Python cache's, counted like the ones it opens: it goes into
 * ``FdCache.fds`` (an OrderedDict, number -> (fd, node, False)) after the
 * oldest are closed while the cache is full (FdCache.keep's eviction, done
 * here the same way), so a FORGET, a copy-up (``cached`` finds another node),
 * a pin or the cache's close closes it as any other. The table's entry of a
 * lazy record (F_LAZY) holds the record itself in place of an Inode and
 * serves while ``lazy[number]`` is that record (anything Python does with the
 * number makes its Inode first, which takes the record out); once the Inode is
 * made, the entry serves on as an ordinary one if that Inode is on the same
 * node and not unlinked, and never again otherwise (Python then closes the fd
 * and opens the file it finds now, as after a copy-up).
 */

#define F_LAZY 32u  /* the entry's ``inode`` is a lazy record of fastopen_lazy, not an Inode */

static PyObject *fastopen_lazy, *fastopen_live, *fastopen_fds, *fastopen_dir_fn;
static Py_ssize_t fastopen_max_fds;
static long fastopen_up = -1;             /* the upper's layer index, -1: none */
static PyObject *s_others, *s_popitem;

#define FASTOPEN_DIRS 64    /* directories kept open, direct-mapped by (parent, layer) */
static struct {
    PyObject *parent;       /* a strong reference: the key's identity stays its own */
    long layer;
    int fd;
} fastopen_dirs[FASTOPEN_DIRS];

static void fastopen_forget_dirs(void)
{
    for (int i = 0; i < FASTOPEN_DIRS; i++)
        if (fastopen_dirs[i].parent) {
            close(fastopen_dirs[i].fd);
            Py_CLEAR(fastopen_dirs[i].parent);
        }
}

/* The directory of ``parent`` in ``layer`` (kept, or opened by Python's
 * dir_opener and kept); -1 when it cannot be had. */
static int fastopen_dir(PyObject *parent, PyObject *layer_obj, long layer)
{
    size_t h = (((uintptr_t)parent >> 4) ^ ((size_t)layer * 0x9E3779B9u)) & (FASTOPEN_DIRS - 1);
    if (fastopen_dirs[h].parent == parent && fastopen_dirs[h].layer == layer)
        return fastopen_dirs[h].fd;
    PyObject *args[2] = {parent, layer_obj};
    PyObject *r = PyObject_Vectorcall(fastopen_dir_fn, args, 2, NULL);
    long fd = r ? PyLong_AsLong(r) : -1;
    Py_XDECREF(r);
    if (PyErr_Occurred()) {             /* a bug: reported, the READ left to Python */
        PyErr_WriteUnraisable(fastopen_dir_fn);
        return -1;
    }
    if (fd < 0)
        return -1;
    if (fastopen_dirs[h].parent) {
        close(fastopen_dirs[h].fd);
        Py_DECREF(fastopen_dirs[h].parent);
    }
    fastopen_dirs[h].parent = Py_NewRef(parent);
    fastopen_dirs[h].layer = layer;
    fastopen_dirs[h].fd = (int)fd;
    return (int)fd;
}

/* Is the F_LAZY entry ``e`` still right? Its record still the lazy one; or the
 * Inode made from it on the same node and not unlinked (the entry becomes an
 * ordinary one). */
static int fastopen_current(entry_t *e)
{
    PyObject *number = fastopen_lazy ? PyLong_FromUnsignedLongLong(e->number) : NULL;
    if (!number) {
        PyErr_Clear();
        return 0;
    }
    int ok = 0;
    PyObject *inode = NULL, *node = NULL, *unlinked = NULL;
    PyObject *record = PyDict_GetItemWithError(fastopen_lazy, number);
    if (record) {
        ok = record == e->inode;
        goto out;
    }
    if (PyErr_Occurred() || !(inode = PyDict_GetItemWithError(fastopen_live, number)))
        goto out;
    Py_INCREF(inode);
    node = PyObject_GetAttr(inode, s_node);
    unlinked = node ? PyObject_GetAttr(inode, s_unlinked) : NULL;
    if (!unlinked || unlinked != Py_False)
        goto out;
    if (node != e->node && PyObject_RichCompareBool(node, e->node, Py_EQ) != 1)
        goto out;
    Py_SETREF(e->inode, Py_NewRef(inode));
    Py_SETREF(e->node, Py_NewRef(node));
    e->flags &= ~F_LAZY;
    ok = 1;
out:
    Py_XDECREF(unlinked);
    Py_XDECREF(node);
    Py_XDECREF(inode);
    Py_DECREF(number);
    PyErr_Clear();
    return ok;
}

/* ``fds[number] = (fd, node, False)`` after FdCache.keep's eviction; -1 (nothing
 * kept, the caller closes ``fd``) when the cache cannot take it. */
static int fastopen_keep(PyObject *number, int fd, PyObject *node)
{
    while (PyDict_GET_SIZE(fastopen_fds) >= fastopen_max_fds) {
        PyObject *old = PyObject_CallMethodOneArg(fastopen_fds, s_popitem, Py_False);
        if (!old || !PyTuple_Check(old) || PyTuple_GET_SIZE(old) != 2 ||
            !PyTuple_Check(PyTuple_GET_ITEM(old, 1))) {
            Py_XDECREF(old);
            return -1;
        }
        unsigned long long gone = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(old, 0));
        long gone_fd = PyLong_AsLong(PyTuple_GET_ITEM(PyTuple_GET_ITEM(old, 1), 0));
        Py_DECREF(old);
        if (PyErr_Occurred())
            return -1;
        drop_number(gone);              /* FdCache._close: the table first, then the fd */
        close((int)gone_fd);
    }
    PyObject *fdo = PyLong_FromLong(fd);
    PyObject *got = fdo ? PyTuple_Pack(3, fdo, node, Py_False) : NULL;
    Py_XDECREF(fdo);
    int failed = !got || PyObject_SetItem(fastopen_fds, number, got) < 0;
    Py_XDECREF(got);
    return failed ? -1 : 0;
}

/* The entry for a READ of ``ino`` that has none, made here as above; NULL:
 * Python's miss (or Python's read) decides. */
static entry_t *fastopen(fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (!fastopen_fds || (fi && fi->fh) || find(ino))
        return NULL;
    PyObject *number = PyLong_FromUnsignedLongLong(ino);
    PyObject *owner = NULL, *parent = NULL, *name = NULL, *node = NULL, *v = NULL;
    entry_t *e = NULL;
    int fd = -1;
    unsigned flags = 0;
    if (!number)
        goto out;
    PyObject *record = PyDict_GetItemWithError(fastopen_lazy, number);
    if (record) {
        if (!PyList_CheckExact(record) || PyList_GET_SIZE(record) != 4)
            goto out;
        owner = Py_NewRef(record);
        parent = Py_NewRef(PyList_GET_ITEM(record, 1));
        name = Py_NewRef(PyList_GET_ITEM(record, 2));
        node = Py_NewRef(PyList_GET_ITEM(record, 3));
        flags = F_LAZY;
    } else {
        PyObject *inode = PyErr_Occurred() ? NULL : PyDict_GetItemWithError(fastopen_live, number);
        if (!inode)
            goto out;
        owner = Py_NewRef(inode);
        /* no other name (a hardlink's), not unlinked */
        if (!(v = PyObject_GetAttr(owner, s_others)) || v != Py_None)
            goto out;
        Py_SETREF(v, PyObject_GetAttr(owner, s_unlinked));
        if (v != Py_False || !(parent = PyObject_GetAttr(owner, s_parent_)) ||
            parent == Py_None || !(name = PyObject_GetAttr(owner, s_name_)) ||
            !(node = PyObject_GetAttr(owner, s_node)))
            goto out;
    }
    if (!PyBytes_Check(name) || !PyTuple_Check(node) || PyTuple_GET_SIZE(node) < 3)
        goto out;
    PyObject *layers = PyTuple_GET_ITEM(node, 1), *inos = PyTuple_GET_ITEM(node, 2);
    if (PyLong_AsLong(PyTuple_GET_ITEM(node, 0)) != S_IFREG || !PyTuple_Check(layers) ||
        !PyTuple_Check(inos) || !PyTuple_GET_SIZE(layers) || !PyTuple_GET_SIZE(inos))
        goto out;
    PyObject *layer_obj = PyTuple_GET_ITEM(layers, 0);
    long layer = PyLong_AsLong(layer_obj);
    unsigned long long want = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(inos, 0));
    if (PyErr_Occurred() || PyDict_Contains(fastopen_fds, number) != 0)
        goto out;                       /* an fd of Python's (no entry): Python's */
    int dir = fastopen_dir(parent, layer_obj, layer);
    if (dir < 0)
        goto out;
    struct stat st;
    fd = openat(dir, PyBytes_AS_STRING(name), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_ino != want ||
        st.st_nlink != 1)
        goto out;
    if (layer == fastopen_up)
        flags |= F_UPPER;
    if (put(ino, fd, flags, owner, node, NULL) < 0)
        goto out;
    if (fastopen_keep(number, fd, node) < 0) {
        drop_number(ino);
        goto out;
    }
    fd = -1;                            /* the cache's now */
    e = find(ino);
out:
    if (fd >= 0)
        close(fd);
    Py_XDECREF(v);
    Py_XDECREF(node);
    Py_XDECREF(name);
    Py_XDECREF(parent);
    Py_XDECREF(owner);
    Py_XDECREF(number);
    PyErr_Clear();
    return e;
}

/* set_fastopen(lazy, live, fds, max_fds, up, dir_opener) -> bool; None for lazy:
 * off (every directory kept is closed). */
static PyObject *py_set_fastopen(PyObject *self, PyObject *args)
{
    PyObject *lazy, *live, *fds, *dir_fn;
    Py_ssize_t max_fds;
    long up;
    if (!PyArg_ParseTuple(args, "OOOnlO", &lazy, &live, &fds, &max_fds, &up, &dir_fn))
        return NULL;
    fastopen_forget_dirs();
    if (lazy == Py_None) {
        Py_CLEAR(fastopen_lazy);
        Py_CLEAR(fastopen_live);
        Py_CLEAR(fastopen_fds);
        Py_CLEAR(fastopen_dir_fn);
        Py_RETURN_FALSE;
    }
    if (!PyDict_Check(lazy) || !PyDict_Check(live) || !PyDict_Check(fds) || max_fds < 1 ||
        !PyCallable_Check(dir_fn)) {
        PyErr_SetString(PyExc_TypeError, "set_fastopen: dicts, a count and a callable");
        return NULL;
    }
    if (intern_names() < 0)
        return NULL;
    if (!s_popitem && (!(s_others = PyUnicode_InternFromString("others")) ||
                       !(s_popitem = PyUnicode_InternFromString("popitem"))))
        return NULL;
    if (!hooks)
        Py_RETURN_FALSE;
    Py_XSETREF(fastopen_lazy, Py_NewRef(lazy));
    Py_XSETREF(fastopen_live, Py_NewRef(live));
    Py_XSETREF(fastopen_fds, Py_NewRef(fds));
    Py_XSETREF(fastopen_dir_fn, Py_NewRef(dir_fn));
    fastopen_max_fds = max_fds;
    fastopen_up = up;
    Py_RETURN_TRUE;
}
