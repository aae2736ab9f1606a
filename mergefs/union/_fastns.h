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
static PyObject *named_claims, *named_lazy, *named_dir_fn, *s_lookups;

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
    PyObject *args[2] = {parent, node};
    PyObject *r = PyObject_Vectorcall(named_dir_fn, args, 2, NULL);
    long fd = r && PyLong_CheckExact(r) ? PyLong_AsLong(r) : -1;
    Py_XDECREF(r);
    PyErr_Clear();
    if (fd < 0 || fstatat((int)fd, PyBytes_AS_STRING(name), &p->attr, AT_SYMLINK_NOFOLLOW) != 0 ||
        (long)(p->attr.st_mode & S_IFMT) != kind)
        return 0;                        /* Python looks (and answers what it finds) */
    if (squash_uid >= 0)
        p->attr.st_uid = (uid_t)squash_uid;
    if (squash_gid >= 0)
        p->attr.st_gid = (gid_t)squash_gid;
    return count_lazy(named_lazy, number, record, parent, name, node) == 0;
}

static int lookup_named(fuse_req_t req, fuse_ino_t parent_ino, const char *cname)
{
    PyObject *key = PyLong_FromUnsignedLongLong(parent_ino);
    PyObject *parent = key ? PyDict_GetItemWithError(live_table, key) : NULL;
    Py_XDECREF(key);
    if (!parent) {
        PyErr_Clear();
        return 0;
    }
    Py_INCREF(parent);
    PyObject *children = PyObject_GetAttr(parent, s_children), *name = NULL, *node = NULL,
             *number = NULL;
    int answered = 0;
    if (!children || !PyDict_Check(children) || !(name = PyBytes_FromString(cname)))
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
    } else if (!PyErr_Occurred() && kind != S_IFDIR && named_dir_fn) {
        PyObject *record = PyDict_GetItemWithError(named_lazy, number);
        if (!PyErr_Occurred()) {
            Py_XINCREF(record);
            answered = lazy_entry(number, record, parent, name, node, kind, &p);
            Py_XDECREF(record);
        }
    }
    if (answered) {
        p.ino = p.attr.st_ino = n;
        p.attr_timeout = attr_timeout;
        p.entry_timeout = named_timeout;
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

static void clear_named(void)
{
    Py_CLEAR(named_numbers);
    Py_CLEAR(named_claims);
    Py_CLEAR(named_lazy);
    Py_CLEAR(named_dir_fn);
}

/* set_named(numbers, claims, lazy, entry_dir, entry_timeout) -> bool: the inode
 * table's ``_numbers``, ``_claims`` and ``lazy`` dicts and
 * WritableView.entry_dir, for ``lookup_named`` (it needs ``set_listed``'s live
 * table too); numbers None: no LOOKUP answered here. */
static PyObject *py_set_named(PyObject *self, PyObject *args)
{
    PyObject *numbers, *claims, *lazy, *fn;
    double timeout;
    if (!PyArg_ParseTuple(args, "OOOOd", &numbers, &claims, &lazy, &fn, &timeout))
        return NULL;
    if (numbers != Py_None && (!PyDict_Check(numbers) || !PyDict_Check(claims) ||
                               !PyDict_Check(lazy))) {
        PyErr_SetString(PyExc_TypeError, "set_named: dicts or None");
        return NULL;
    }
    if (!s_lookups && !(s_lookups = PyUnicode_InternFromString("lookups")))
        return NULL;
    if (!s_parent_ && !(s_parent_ = PyUnicode_InternFromString("_parent")))
        return NULL;
    if (!s_name_ && !(s_name_ = PyUnicode_InternFromString("_name")))
        return NULL;
    if (!hooks || !HAS_HOOK(entry_param))      /* the builds with a LOOKUP hook */
        Py_RETURN_FALSE;
    clear_named();
    if (numbers != Py_None) {
        named_numbers = Py_NewRef(numbers);
        named_claims = Py_NewRef(claims);
        named_lazy = Py_NewRef(lazy);
        named_dir_fn = fn == Py_None ? NULL : Py_NewRef(fn);
    }
    named_timeout = timeout;
    Py_RETURN_TRUE;
}
