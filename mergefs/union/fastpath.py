"""Loads the C fast path of a union mount (``_fastpath.c``; docs/architecture.md,
"Serving paths").

It serves GETATTR, SETATTR, READ, WRITE, FSYNC and GETXATTR (and LISTXATTR
with a v6 build) of the regular files whose content fd the no-open fd cache
(fdcache.py) holds, and GETATTR of the upper directories (merged ones too) it keeps an
O_PATH fd for, from C hooks that a v5 build of pyfuse3 calls before it
makes a coroutine for a request (tools/pyfuse3_inode_fh.py). With a v7 build
it also calls the plain Python handlers of LOOKUP, MKNOD and the GETATTRs it
cannot serve itself, without pyfuse3's coroutine (ops._direct); with a v8
build it walks no-open READDIRPLUS passes and answers their files itself
(ops._readdir_direct), and calls ``ops.getxattr`` for inodes it has no fd for
and ``FdCache.write_for_c`` for the copy-up at a lower file's first WRITE
(``set_copyup``), and answers a LOOKUP of a name its live parent's listing at hand
lacks itself (``set_listed``: the inode table's live inodes; ``fast_lookup_listed``),
and one it has whose inode is live and served by its table, or a file no Inode
holds yet (``set_named``, _fastns.h; ``fast_lookup_named``), and makes the
new regular files of a MKNOD and the directories of a MKDIR in an upper
directory its table serves, the
bookkeeping left to ``ops._made_in_c`` (``set_made``; ``fast_mknod_made``),
renames upper files the kernel holds by that name and upper-only
directories where no whiteout is needed (``set_renamed``, the bookkeeping in
``WritableView.renamed``; ``fast_rename_made``), and sets the owner, mode and
times of the upper directories its table serves (``set_dir_setattr``;
``fast_setattr_dir``);
with a v9 build it calls the namespace handlers too (mkdir,
unlink, rmdir, symlink, rename, link, setxattr, removexattr), ``forget``, and
``setattr`` and ``fsync`` for what it does not answer itself (directories,
lower files, files whose fd it does not hold: ops.DIRECT).
``layer_links`` (a layer's hardlinked names, for linknames), ``openat2``
(syscalls.open_beneath), ``copy_up_file`` and ``copy_up_dir`` (the copy-up of a
lower regular file or directory, upper.Upper.copy_up_file/copy_up_dir;
_fastcopy.h) need no pyfuse3 build. Without the
compiled module, with an older pyfuse3 build or with ``MERGEFS_FASTPATH=0``,
every request goes through the Python handlers, which give the same answers.
A module compiled from other sources than the ones beside it (a checkout that
moved since ``tools/bootstrap.sh``) is refused the same way, with one warning:
its functions may take other arguments (``sources_identity``).
The views mount (views.py) loads it too: direct LOOKUP, GETATTR, MKNOD and
GETXATTR handlers of its own, and READ, GETATTR and FSYNC of its (real) opens
from entries kept under the file handle (``HANDLE``, ``set_handles``);
``drain`` then also returns when trio's own fd is readable (its third argument).
``drain`` spins a little before it sleeps while requests come back to back
(``spin_poll`` in the C: on a VM, waking a sleeping server costs more than
most requests do); ``MERGEFS_SPIN_US`` bounds the spin (default
``SPIN_US``, 0 for a server bound to one CPU; 0: never spin).
``MERGEFS_FASTPATH_LOOP=0`` keeps pyfuse3's own request loop (no ``drain``),
``MERGEFS_FASTPATH_DIRECT=0`` pyfuse3's coroutines for the direct handlers,
for comparisons.
"""
from __future__ import annotations

import logging
import os

# (not .errors' logger object: that module imports pyfuse3, and with it trio, which
# the mount command that builds a view before it forks the server never needs)
log = logging.getLogger("mergefs.union")

SOURCES = ("_fastpath.c", "_fasthooks.h", "_fasttable.h", "_fastcopy.h", "_fastopen.h",
           "_fastns.h", "_fastio.h")
SPIN_US = 200         # the haltpoll governor's default bound


def spin_us() -> int:
    """The bound of drain's spin: ``MERGEFS_SPIN_US`` (microseconds, 0: never spin),
    ``SPIN_US`` when unset or not a number. Unset, 0 for a server that may run on
    one CPU only (taskset, a cpuset): the requester then waits for that CPU, and
    a spin there only delays it (`dpkg -i` in one CPU: 1.81 s spinning, 1.32 s
    not; docs/performance.md)."""
    value = os.environ.get("MERGEFS_SPIN_US")
    if value is None:
        return SPIN_US if len(os.sched_getaffinity(0)) > 1 else 0
    try:
        return max(0, int(value))
    except ValueError:
        log.warning("MERGEFS_SPIN_US=%r is not a number of microseconds: %d used",
                    value, SPIN_US)
        return SPIN_US


def sources_identity(here: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """Name, size and mtime of each C source: what the build compiles into the
    module (``_fastpath.SOURCES``) and a server compares before using it. A
    stat per file, no hashing: a mount's start-up pays for it."""
    parts = []
    for name in SOURCES:
        st = os.stat(os.path.join(here, name))
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)


def stale(module) -> str | None:
    """Why ``module`` (the compiled ``_fastpath``) must not serve, or None."""
    built = getattr(module, "SOURCES", "")
    try:
        now = sources_identity()
    except OSError as e:            # an installed copy without its sources: trust it
        return None if built else f"cannot check its sources ({e})"
    return None if built == now else "built from other sources than these"


# ``_fastpath.drain`` once the fast path is on: fuseloop's wait for the next
# request lets C read and serve requests first (no coroutine per request)
drain = None


_COMPILED: dict = {}


def compiled(name: str):
    """``_fastpath.NAME`` if the compiled module is there, built from these sources
    (``stale``) and has it, else None (looked for once per name): the plain
    functions other modules use without the fast path being on."""
    if name not in _COMPILED:
        try:
            from . import _fastpath
            _COMPILED[name] = None if stale(_fastpath) else getattr(_fastpath, name, None)
        except ImportError:
            _COMPILED[name] = None
    return _COMPILED[name]


def load(attr_timeout: float, squash: tuple, volatile: bool):
    """The enabled C table (the ``_fastpath`` module), or None: no fast path."""
    if os.environ.get("MERGEFS_FASTPATH") == "0":
        return None
    try:
        from . import _fastpath
    except ImportError as e:
        log.warning("no C fast path (%s): tools/pyfuse3_inode_fh.py --fastpath builds it", e)
        return None
    why = stale(_fastpath)
    if why:
        log.warning("no C fast path: the module was %s (tools/bootstrap.sh rebuilds it)", why)
        return None
    import pyfuse3
    try:
        if not _fastpath.attach(pyfuse3.__file__):
            log.info("no C fast path: this pyfuse3 build has no mergefs_fast hooks "
                     "of this version (tools/pyfuse3_inode_fh.py --install)")
            return None
        uid, gid = (-1 if s is None else s for s in squash)
        loop = _fastpath.drain
        _fastpath.enable(attr_timeout, uid, gid, volatile)
        _fastpath.set_spin(spin_us())
    except Exception as e:             # a module built from other sources: never fail a mount
        log.warning("no C fast path: %s (tools/pyfuse3_inode_fh.py --fastpath rebuilds it)", e)
        return None
    global drain
    drain = loop if os.environ.get("MERGEFS_FASTPATH_LOOP") != "0" else None
    from .. import syscalls
    syscalls.fast_openat2 = _fastpath.openat2
    return _fastpath


def prepare_io() -> bool:
    """Route the reads and writes of the session pyfuse3.init just made through C
    (``_fastio.h``), so that a writable mount can agree FUSE_HANDLE_KILLPRIV_V2
    with the kernel once ``ops.init`` gives the function that clears set-id bits
    (``set_killpriv``). Call it before pyfuse3.main reads the kernel's INIT.
    False, and libfuse's own reads and writes: no compiled module built from
    these sources, or ``MERGEFS_KILLPRIV=0`` (for comparisons). Independent of
    the fast path's table and hooks (``MERGEFS_FASTPATH=0`` and real opens too)."""
    if os.environ.get("MERGEFS_KILLPRIV") == "0":
        return False
    set_io = compiled("set_io")
    if set_io is None:
        return False
    import pyfuse3
    from . import _fastpath
    try:
        return _fastpath.attach(pyfuse3.__file__) and set_io()
    except Exception as e:             # never fail a mount: libfuse's reads then
        log.warning("no C reads for FUSE_HANDLE_KILLPRIV_V2: %s", e)
        return False


def agree_killpriv(fn) -> None:
    """The INIT reply agrees FUSE_HANDLE_KILLPRIV_V2 if ``prepare_io`` routed this
    session through C and the kernel offers it; ``fn(number, gid, pid)`` then
    clears a file's set-id bits before a write or truncation by a caller
    without CAP_FSETID (ops._kill_suidgid). Call it before the INIT reply
    (ops.init)."""
    set_killpriv = compiled("set_killpriv")
    if set_killpriv is not None:
        set_killpriv(fn)


def unload() -> None:
    """Serve nothing in C any more (the mount is closing): hooks, table and loop."""
    global drain
    drain = None
    from . import _fastpath
    _fastpath.disable()


def stats(reset: bool = True) -> dict:
    """Requests the C fast path served since the last reset, as ``fast_NAME`` counts
    (``reset``: and start counting from zero again)."""
    try:
        from . import _fastpath
    except ImportError:
        return {}
    return {f"fast_{k}": v for k, v in _fastpath.stats(reset).items() if v}


def request_counts(reset: bool = False) -> dict:
    """Requests served by the Python handlers and (``fast_*``) by C, since the last reset."""
    from .errors import REQUESTS
    counts = dict(REQUESTS, **stats(reset))
    if reset:
        REQUESTS.clear()
    return counts


def log_counts() -> None:
    """A server's answer to SIGUSR1: one log line ``requests {json}`` with the counts
    since the last one, and one ``waits {json}`` (``spin_stats``)."""
    import json
    log.info("requests %s", json.dumps(request_counts(True), sort_keys=True))
    log.info("waits %s", json.dumps(spin_stats()))


def spin_stats(reset: bool = True) -> dict:
    """``drain``'s waits since the last reset: ``waits`` (the fd was empty), ``hits``
    (a spin ended the wait), ``sleeps``, and the spin's current ``window_us`` and
    bound ``max_us``; {} without the module."""
    try:
        from . import _fastpath
    except ImportError:
        return {}
    return _fastpath.spin_stats(reset)
