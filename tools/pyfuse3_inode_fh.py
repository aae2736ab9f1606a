#!/usr/bin/env python3
"""Build pyfuse3 so that read/readdir/write/fsync receive the inode when fh is 0.

    python tools/pyfuse3_inode_fh.py --install    # patch the pyfuse3 of this interpreter (bootstrap)
    python tools/pyfuse3_inode_fh.py --build DIR  # a patched copy in DIR/pyfuse3 (PYTHONPATH=DIR)

Why (docs/architecture.md, "Serving paths"): layers are immutable, so a read-only
union answers open/opendir with ENOSYS ("no-open") and the kernel stops
sending OPEN/RELEASE/OPENDIR and caches pages and listings itself: warm
`tar` of 100k files drops from 3.2x kernel overlayfs to below it. Stock
pyfuse3 3.5.0 hands read()/readdir() only the file handle, which is 0 under
no-open, never the inode. This build changes five lines of pyfuse3's
generated C (``fh ? fh : inode`` in read, readdirplus, write, write_buf and
fsync), asks for FUSE_CAP_CACHE_SYMLINKS, and turns FUSE_CAP_ATOMIC_O_TRUNC
off when the ``Operations`` object says ``atomic_o_trunc = False`` (a
no-open writable mount: the kernel then sends ``open(O_TRUNC)`` as a SETATTR
of size 0, which reaches the server; with the capability on, the truncation
would ride on the OPEN that no-open never sends). It then compiles it against
libfuse3 (gcc, libfuse3-dev). A marker file beside the module tells
``mergefs.union.server`` to serve mounts no-open (writable ones only with a
v4 build, the first whose writes get the inode). It refuses a pyfuse3 whose
generated C is not the expected one, and mergefs then keeps real opens
(correct, slower). The change is small enough to propose upstream ("pass the
inode to the handlers of an open file when there is no fh").

v5 adds hooks for mergefs's C fast path: the C callbacks of GETATTR, SETATTR,
READ, WRITE (write and write_buf), FSYNC, GETXATTR (and LISTXATTR, v6)
first call the matching function pointer of an exported struct
``mergefs_fast`` (mergefs/union/_fasthooks.h); one that returns 1 has replied, and pyfuse3
makes no coroutine for the request. The struct also points at pyfuse3's
session and pending coroutine, so the extension can run the request loop in
C while requests need no Python (``drain``, used by fuseloop.py). The pointers are NULL until
mergefs/union/_fastpath.c (built by ``--fastpath``) fills them in: a v5 build
alone behaves as v4. A server accepts v4 builds (no fast path then).
v6 adds the LISTXATTR hook (hooks struct version 3, the field appended); the
fast path still runs on a v5 build, without serving LISTXATTR.
v7 adds LOOKUP and MKNOD hooks and fills in two pointers of its own (struct
version 4): ``context`` (pyfuse3's RequestContext of a request) and
``entry_param`` (the reply struct inside an EntryAttributes), so the fast
path can call a plain Python handler for a request and answer it without
pyfuse3's coroutine (the "direct" handlers of _fastpath.c); on a v5 or v6
build it runs without them.
v8 adds the READDIRPLUS hook (struct version 5): the fast path fills a
listing's reply buffer in C (lstat of the files Python has no attributes
for, ``fuse_add_direntry_plus``) from the entries the Python side chose and
counted; on a v7 build it runs without it.
v9 adds the MKDIR, UNLINK, RMDIR, SYMLINK, RENAME, LINK, SETXATTR,
REMOVEXATTR and FORGET (and FORGET_MULTI) hooks and a third helper of
pyfuse3's own (struct version 6): ``setattr_args``, the ``(EntryAttributes,
SetattrFields)`` pyfuse3 hands its setattr handler for a SETATTR, so the fast
path calls the Python handlers of the namespace requests, of FORGET, and of
the SETATTRs and FSYNCs it does not answer itself (a directory, a lower file,
a file whose fd it does not hold) without a coroutine; on a v8 build it runs
without them.

The build also bakes pyfuse3's version string into its pure-Python part
(``_pyfuse3.py``): stock pyfuse3 3.5.0 looks its own version up through
``importlib.metadata`` at every import, which scans site-packages and loads
the email parser, ~45 M instructions (~9%) of a mount's path to its first
answer (README, "Mount latency"). The build reads the version once, the same
way, and writes it as a constant (``__version__`` is unchanged). That part is
exact too: it refuses a ``_pyfuse3.py`` whose lookup is not the expected
lines. The marker's first line names the patch version; ``--install``
rebuilds an install marked with an older one (a server accepts either: the
marker vouches for the inode-fh module, which both versions have).
"""
from __future__ import annotations

import argparse
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mergefs.union import server  # noqa: E402

PATCHED_HANDLERS = ("fuse_read", "fuse_readdirplus", "fuse_write", "fuse_write_buf", "fuse_fsync")
PATCH_MARK = ("v9: fh 0 -> inode in read/readdir/write/fsync; FUSE_CAP_CACHE_SYMLINKS; "
              "atomic_o_trunc off on request; version baked into _pyfuse3.py; "
              "mergefs_fast hooks (6: session, retval, listxattr, lookup, mknod, "
              "context, entry_param, readdirplus, mkdir, unlink, rmdir, symlink, rename, "
              "link, setxattr, removexattr, forget, forget_multi, setattr_args)\n")
# v5: the C callbacks of these requests first call the matching hook of the
# exported ``mergefs_fast`` (mergefs/union/_fasthooks.h), which mergefs's C fast
# path fills in (mergefs/union/_fastpath.c); a hook that replied ends the request.
HOOKED = {"fuse_getattr": "getattr(__pyx_v_req, __pyx_v_ino, __pyx_v_fi)",
          "fuse_setattr": "setattr(__pyx_v_req, __pyx_v_ino, __pyx_v_stat, __pyx_v_to_set, "
                          "__pyx_v_fi)",
          "fuse_read": "read(__pyx_v_req, __pyx_v_ino, __pyx_v_size, __pyx_v_off, __pyx_v_fi)",
          "fuse_write": "write(__pyx_v_req, __pyx_v_ino, __pyx_v_buf, __pyx_v_size, "
                        "__pyx_v_off, __pyx_v_fi)",
          "fuse_write_buf": "write_buf(__pyx_v_req, __pyx_v_ino, __pyx_v_bufv, __pyx_v_off, "
                            "__pyx_v_fi)",
          "fuse_fsync": "fsync(__pyx_v_req, __pyx_v_ino, __pyx_v_datasync, __pyx_v_fi)",
          "fuse_getxattr": "getxattr(__pyx_v_req, __pyx_v_ino, __pyx_v_name, __pyx_v_size)",
          "fuse_listxattr": "listxattr(__pyx_v_req, __pyx_v_ino, __pyx_v_size)",
          "fuse_lookup": "lookup(__pyx_v_req, __pyx_v_parent, __pyx_v_name)",
          "fuse_mknod": "mknod(__pyx_v_req, __pyx_v_parent, __pyx_v_name, __pyx_v_mode, "
                        "__pyx_v_rdev)",
          "fuse_readdirplus": "readdirplus(__pyx_v_req, __pyx_v_ino, __pyx_v_size, __pyx_v_off, "
                              "__pyx_v_fi)",
          # v9: the namespace requests
          "fuse_mkdir": "mkdir(__pyx_v_req, __pyx_v_parent, __pyx_v_name, __pyx_v_mode)",
          "fuse_unlink": "unlink(__pyx_v_req, __pyx_v_parent, __pyx_v_name)",
          "fuse_rmdir": "rmdir(__pyx_v_req, __pyx_v_parent, __pyx_v_name)",
          "fuse_symlink": "symlink(__pyx_v_req, __pyx_v_link, __pyx_v_parent, __pyx_v_name)",
          "fuse_rename": "rename(__pyx_v_req, __pyx_v_parent, __pyx_v_name, __pyx_v_newparent, "
                         "__pyx_v_newname, __pyx_v_flags)",
          "fuse_link": "link(__pyx_v_req, __pyx_v_ino, __pyx_v_newparent, __pyx_v_newname)",
          "fuse_setxattr": "setxattr(__pyx_v_req, __pyx_v_ino, __pyx_v_cname, __pyx_v_cvalue, "
                           "__pyx_v_size, __pyx_v_flags)",
          "fuse_removexattr": "removexattr(__pyx_v_req, __pyx_v_ino, __pyx_v_name)",
          "fuse_forget": "forget(__pyx_v_req, __pyx_v_ino, __pyx_v_nlookup)",
          "fuse_forget_multi": "forget_multi(__pyx_v_req, __pyx_v_count, __pyx_v_forgets)"}
HOOKS_HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "mergefs", "union", "_fasthooks.h")
STATE = ("static struct fuse_session *__pyx_v_7pyfuse3_session;",   # what the hooks point at
         "static PyObject *__pyx_v_7pyfuse3_py_retval = 0;")
FIRST_PROTO = ("static void __pyx_f_7pyfuse3_fuse_getattr(fuse_req_t, fuse_ino_t, "
               "struct fuse_file_info *); /*proto*/")
# The Operations attribute "atomic_o_trunc" (absent: true, libfuse's default)
ATOMIC_O_TRUNC = (
    " { PyObject *mergefs_a = PyObject_GetAttrString(__pyx_v_7pyfuse3_operations,"
    " \"atomic_o_trunc\"); if (mergefs_a == NULL) PyErr_Clear();"
    " else { if (PyObject_Not(mergefs_a) == 1)"
    " __pyx_v_conn->want &= ~((unsigned int)FUSE_CAP_ATOMIC_O_TRUNC);"
    " Py_DECREF(mergefs_a); } }")
VERSION_LOOKUP = (
    "from importlib.metadata import PackageNotFoundError, version as package_version\n",
    "# Version information\n"
    "try:\n"
    "    __version__ = package_version('pyfuse3')\n"
    "except PackageNotFoundError:\n"
    "    __version__ = 'unknown'\n",
)
BAKED = "# Version information (baked in by mergefs's tools/pyfuse3_inode_fh.py)\n"


def bake_version(text: str, version: str) -> str:
    """``_pyfuse3.py``'s source with its ``importlib.metadata`` lookup replaced
    by the constant ``version``; already baked text is returned as it is.
    Raises RuntimeError on any other source."""
    if BAKED in text and "importlib.metadata" not in text:
        return text
    if any(text.count(part) != 1 for part in VERSION_LOOKUP):
        raise RuntimeError("this pyfuse3's _pyfuse3.py does not look its version up "
                           "the expected way")
    text = text.replace(VERSION_LOOKUP[0], "")
    return text.replace(VERSION_LOOKUP[1], BAKED + f"__version__ = {version!r}\n")


def build(dest: str) -> str:
    """Build the installed pyfuse3 into DEST/pyfuse3 with read, readdir, write and
    fsync given the inode when the kernel's fh is 0 (the "no-open" lever,
    docs/architecture.md).

    The generated C that pyfuse3 ships is patched in five places (the ``fh =
    fi.fh`` of each handler in PATCHED_HANDLERS), its init asks for
    FUSE_CAP_CACHE_SYMLINKS and drops FUSE_CAP_ATOMIC_O_TRUNC when the
    operations say so, and it is compiled against libfuse3; a marker file
    tells mergefs.union.server to answer open/opendir with ENOSYS. Needs gcc
    and libfuse3-dev. Returns DEST.
    """
    import pyfuse3
    pkg = os.path.join(dest, "pyfuse3")
    marker = os.path.join(pkg, server.INODE_FH_MARKER)
    if _marked(marker):
        return dest
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(os.path.dirname(pyfuse3.__file__), pkg,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    src = os.path.join(pkg, "__init__.c")
    lines = open(src).read().split("\n")
    patched, current = 0, None
    for i, line in enumerate(lines):
        m = re.match(r"static void __pyx_f_7pyfuse3_(\w+)\(fuse_req_t __pyx_v_req, "
                     r"(CYTHON_UNUSED )?(fuse_ino_t|const char \*|size_t).*\) \{$", line)
        if m:
            current = m.group(1)
            if current in HOOKED:
                op = HOOKED[current]
                lines[i] = line + (f" if (mergefs_fast.{op.split('(')[0]} && "
                                   f"mergefs_fast.{op}) return;")
                patched += 1
        elif current in PATCHED_HANDLERS and line.strip() == "__pyx_t_4 = __pyx_v_fi->fh;":
            lines[i] = "  __pyx_t_4 = __pyx_v_fi->fh ? __pyx_v_fi->fh : (uint64_t) __pyx_v_ino;"
            patched, current = patched + 1, None
    init = ("  __pyx_v_conn->want = (__pyx_v_conn->want & "
            "(~((unsigned int)FUSE_CAP_READDIRPLUS_AUTO)));")
    if init in lines:   # symlinks never change in place: let the kernel cache targets
        lines[lines.index(init)] = init + (" if (__pyx_v_conn->capable & FUSE_CAP_CACHE_SYMLINKS)"
                                           " __pyx_v_conn->want |= FUSE_CAP_CACHE_SYMLINKS;"
                                           + ATOMIC_O_TRUNC)
        patched += 1
    if FIRST_PROTO in lines and all(d in lines[:lines.index(FIRST_PROTO)] for d in STATE):
        lines[lines.index(FIRST_PROTO)] = hooks_definition() + "\n" + FIRST_PROTO
        patched += 1
    wanted = len(PATCHED_HANDLERS) + len(HOOKED) + 2
    if patched != wanted:
        raise RuntimeError(f"patched {patched} of {wanted} places: "
                           "this pyfuse3's generated C is not the expected one")
    open(src, "w").write("\n".join(lines) + HELPERS)
    _bake(pkg)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                           capture_output=True, text=True).stdout.split()
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-I" + sysconfig.get_paths()["include"],
                    "-DFUSE_USE_VERSION=35", src, "-o", os.path.join(pkg, "__init__" + ext),
                    *flags], check=True)
    so = os.path.join(pkg, "__init__" + ext)
    open(marker, "w").write(PATCH_MARK + "sha256 " + server.module_digest(so) + "\n")
    return dest


def hooks_definition() -> str:
    """The hooks' struct (mergefs/union/_fasthooks.h) and the exported instance: no
    hooks yet, pyfuse3's own helpers (defined at the end of the file, HELPERS)."""
    with open(HOOKS_HEADER) as f:
        header = f.read()
    return header + ("static PyObject *mergefs_context(fuse_req_t);\n"
                     "static const struct fuse_entry_param *mergefs_entry_param(PyObject *);\n"
                     "static PyObject *mergefs_setattr_args(const struct stat *, int);\n"
                     '__attribute__((visibility("default"))) struct mergefs_fast_hooks '
                     'mergefs_fast = {.version = MERGEFS_FAST_HOOKS_VERSION, '
                     '.size = sizeof(struct mergefs_fast_hooks), '
                     '.session = &__pyx_v_7pyfuse3_session, '
                     '.retval = &__pyx_v_7pyfuse3_py_retval, '
                     '.context = mergefs_context, .entry_param = mergefs_entry_param, '
                     '.setattr_args = mergefs_setattr_args};')


# v7: what the fast path needs of pyfuse3 to call a handler without a coroutine
# (mergefs/union/_fastpath.c, the "direct" handlers): the RequestContext pyfuse3
# builds for a request, and the fuse_entry_param inside an EntryAttributes.
HELPERS = """
static PyObject *mergefs_context(fuse_req_t req)
{
    return __pyx_f_7pyfuse3_get_request_context(req);
}
static const struct fuse_entry_param *mergefs_entry_param(PyObject *o)
{
    if (!__Pyx_TypeCheck(o, __pyx_mstate_global->__pyx_ptype_7pyfuse3_EntryAttributes))
        return NULL;
    return &((struct __pyx_obj_7pyfuse3_EntryAttributes *)o)->fuse_param;
}
/* v9: what fuse_setattr_async makes of a SETATTR for the setattr handler, made
 * the same way: the stat in an EntryAttributes (a *_NOW time: the realtime
 * clock's) and the SetattrFields of to_set. */
static PyObject *mergefs_setattr_args(const struct stat *stat, int to_set)
{
    struct timespec now = {0, 0};
    if ((to_set & (FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)) &&
        clock_gettime(CLOCK_REALTIME, &now) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *entry = PyObject_CallNoArgs(
        (PyObject *)__pyx_mstate_global->__pyx_ptype_7pyfuse3_EntryAttributes);
    PyObject *fields = PyObject_CallNoArgs(
        (PyObject *)__pyx_mstate_global->__pyx_ptype_7pyfuse3_SetattrFields);
    PyObject *pair = entry && fields ? PyTuple_Pack(2, entry, fields) : NULL;
    if (pair) {
        struct stat *attr = ((struct __pyx_obj_7pyfuse3_EntryAttributes *)entry)->attr;
        struct __pyx_obj_7pyfuse3_SetattrFields *f =
            (struct __pyx_obj_7pyfuse3_SetattrFields *)fields;
        memcpy(attr, stat, sizeof(struct stat));
        if (!(to_set & FUSE_SET_ATTR_ATIME) && (to_set & FUSE_SET_ATTR_ATIME_NOW))
            attr->st_atim = now;
        if (!(to_set & FUSE_SET_ATTR_MTIME) && (to_set & FUSE_SET_ATTR_MTIME_NOW))
            attr->st_mtim = now;
#define MERGEFS_FIELD(name, set) Py_SETREF(f->name, Py_NewRef((set) ? Py_True : Py_False))
        MERGEFS_FIELD(update_atime, to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW));
        MERGEFS_FIELD(update_mtime, to_set & (FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW));
        MERGEFS_FIELD(update_ctime, to_set & FUSE_SET_ATTR_CTIME);
        MERGEFS_FIELD(update_mode, to_set & FUSE_SET_ATTR_MODE);
        MERGEFS_FIELD(update_uid, to_set & FUSE_SET_ATTR_UID);
        MERGEFS_FIELD(update_gid, to_set & FUSE_SET_ATTR_GID);
        MERGEFS_FIELD(update_size, to_set & FUSE_SET_ATTR_SIZE);
#undef MERGEFS_FIELD
    }
    Py_XDECREF(entry);
    Py_XDECREF(fields);
    return pair;
}
"""


def _bake(pkg: str) -> None:
    from importlib.metadata import version
    py = os.path.join(pkg, "_pyfuse3.py")
    with open(py) as f:
        text = bake_version(f.read(), version("pyfuse3"))
    with open(py, "w") as f:
        f.write(text)


def _marked(marker: str) -> bool:
    """A finished build of this patch version: its marker names its module's digest."""
    try:
        text = open(marker).read()
    except FileNotFoundError:
        return False
    so = [n for n in os.listdir(os.path.dirname(marker)) if n.endswith(".so")]
    return text.startswith(PATCH_MARK) and len(so) == 1 and \
        text.split()[-1] == server.module_digest(os.path.join(os.path.dirname(marker), so[0]))


def install() -> str:
    """Patch the pyfuse3 this interpreter imports, in place (its compiled module only)."""
    import pyfuse3
    pkg = os.path.dirname(pyfuse3.__file__)
    marker = os.path.join(pkg, server.INODE_FH_MARKER)
    if server.pyfuse3_passes_inode() and _current(marker):
        _note_identity(marker, pyfuse3.__file__)
        return f"{pkg}: already the inode-fh build"
    with tempfile.TemporaryDirectory() as tmp:
        built = os.path.join(build(tmp), "pyfuse3")
        for name in os.listdir(built):
            if name.endswith(".so"):
                # Rename over it, never write into it: this process (and any
                # running server) has the old module mapped; rewriting that
                # inode in place would SIGBUS them.
                shutil.copy2(os.path.join(built, name), os.path.join(pkg, name + ".new"))
                os.replace(os.path.join(pkg, name + ".new"), os.path.join(pkg, name))
        shutil.copy2(os.path.join(built, server.INODE_FH_MARKER), marker + ".new")
        os.replace(marker + ".new", marker)
        # the module's pure-Python part, compiled now so no server compiles it
        shutil.copy2(os.path.join(built, "_pyfuse3.py"), os.path.join(pkg, "_pyfuse3.py.new"))
        os.replace(os.path.join(pkg, "_pyfuse3.py.new"), os.path.join(pkg, "_pyfuse3.py"))
        py_compile.compile(os.path.join(pkg, "_pyfuse3.py"), doraise=True)
    _note_identity(marker, pyfuse3.__file__)
    return f"{pkg}: installed the inode-fh build"


def _current(marker: str) -> bool:
    """Is the install marked with this patch version (older ones are rebuilt)?"""
    try:
        with open(marker) as f:
            return f.read().startswith(PATCH_MARK)
    except FileNotFoundError:
        return False


def _note_identity(marker: str, so: str) -> None:
    """Add ``file DEV:INO:SIZE:MTIME:CTIME`` of the checked module before the
    digest line, so servers need not hash it again while it is unchanged."""
    lines = [ln for ln in open(marker).read().splitlines() if not ln.startswith("file ")]
    if lines[-1].split() != ["sha256", server.module_digest(so)]:
        return
    text = "\n".join(lines[:-1] + [f"file {server.module_identity(so)}", lines[-1]]) + "\n"
    with open(marker + ".new", "w") as f:
        f.write(text)
    os.replace(marker + ".new", marker)


def build_fastpath() -> str:
    """Compile mergefs/union/_fastpath.c (the C fast path that fills in the v5
    hooks) beside its source, unless the module there was built from these
    very sources (``fastpath.sources_identity``, which it carries and a server
    checks). Needs gcc, python3-dev and libfuse3-dev. Returns the module's path."""
    from mergefs.union import fastpath
    here = os.path.dirname(HOOKS_HEADER)
    so = os.path.join(here, "_fastpath" + sysconfig.get_config_var("EXT_SUFFIX"))
    sources = [os.path.join(here, n) for n in fastpath.SOURCES]
    identity = fastpath.sources_identity(here)
    if os.path.exists(so) and _built_from(so) == identity:
        return so
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                           capture_output=True, text=True).stdout.split()
    tmp = so + ".new"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                    f'-DMERGEFS_FAST_SOURCES="{identity}"',
                    "-I" + sysconfig.get_paths()["include"], sources[0], "-o", tmp, *flags],
                   check=True)
    os.replace(tmp, so)      # never rewrite a module a running server has mapped
    return so


def _built_from(so: str) -> str:
    """The sources identity compiled into the module ``so`` ("" if none or unloadable),
    read in a child: a module once imported cannot be unloaded from this one."""
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('_fastpath', sys.argv[1]);"
            " m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(getattr(m, 'SOURCES', ''))")
    r = subprocess.run([sys.executable, "-c", code, so], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--install", action="store_true")
    g.add_argument("--build", metavar="DIR")
    g.add_argument("--fastpath", action="store_true",
                   help="build mergefs/union/_fastpath (the C fast path) if out of date")
    args = ap.parse_args()
    if args.fastpath:
        print(build_fastpath())
    else:
        print(install() if args.install else build(args.build))
    return 0


if __name__ == "__main__":
    sys.exit(main())
