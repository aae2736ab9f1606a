"""The live union mount: merged layers served by a pyfuse3 server on trio.

Modules: ``inodes`` (InodeTable: stable numbers, lookup counts), ``view``
(the merged view per inode, cached; read-only), ``writable``, ``rename`` and
``dirmove`` (copy-up, whiteouts, renames -- a merged directory is moved by
copying its subtree -- into an overlay-format upper), ``upper`` (the
disk writes of the upper and work dirs), ``errors`` (the one error translator
and the request counters), ``ops`` (the ``Operations`` subclass), ``server``
(``serve()``, the detached server, unmount and stale-mount cleanup).

Caching decision (docs/architecture.md, "Serving paths"). Layers are immutable, so
entries, attributes and negative lookups are cached by the kernel for a day,
files are opened with ``keep_cache`` (pages survive close/open), readdirplus
carries attributes and counts as a lookup, FLUSH is answered ENOSYS once, and
the server stats each entry once. What remains per warm ``open(2)`` is one
OPEN + RELEASE, and per listing OPENDIR + READDIRPLUS + RELEASEDIR: pyfuse3's
``opendir`` cannot ask for FOPEN_CACHE_DIR.

The bigger lever, "no-open" (ENOSYS from open/opendir: the kernel then caches
pages and listings itself and sends neither), cannot be served by stock
pyfuse3 3.5.0: it hands ``read()``/``readdir()`` only the fh, which is 0
under no-open, never the inode. mergefs supports both:

* stock pyfuse3: real opens, as above -- correct and cached, about
  fuse-overlayfs speed warm;
* the inode-fh build of pyfuse3 that ``tools/bootstrap.sh`` installs
  (``tools/pyfuse3_inode_fh.py``: five lines of its generated C pass the inode
  when fh is 0 -- read, readdir, write, fsync -- and its init can turn atomic
  O_TRUNC off; compiled against libfuse3; a marker beside the module names
  the module's sha256 and the patch version): mounts then run no-open
  (``UnionOperations(no_open=True)``), writable ones with a v4 build or later
  (``ops.py``: fds per inode, copy-up at the first write, readdir snapshots).
  ``MERGEFS_NO_OPEN=0`` forces real opens.

Decision: ship the patched build, built at install time (bootstrap already
needs gcc and libfuse3-dev to build pyfuse3 at all), and fall back to real
opens whenever it is absent or stale, since the fallback is only slower. The
change is small and meant for upstream ("pass the inode to the handlers of an
open file when there is no fh"); once pyfuse3 has it, the patch step goes away.
"""
import importlib

# Resolved on first use (PEP 562): ``mergefs mount`` imports ``server`` without
# pyfuse3 and trio, which ``ops`` would pull in.
_EXPORTS = {"UnionOperations": "ops", "UnionView": "view", "WritableView": "writable",
            "clean_stale": "server", "is_mounted": "server", "serve": "server",
            "start": "server", "unmount": "server"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = ["UnionOperations", "UnionView", "WritableView", "clean_stale", "is_mounted",
           "serve", "start", "unmount"]
