"""The live union mount: merged layers served by a pyfuse3 server on trio.

Modules: ``inodes`` (InodeTable: stable numbers, lookup counts), ``view``
(the merged view per inode, cached; read-only), ``writable``, ``rename`` and
``dirmove`` (copy-up, whiteouts, renames -- a merged directory is moved by
copying its subtree -- into an overlay-format upper), ``upper`` (the
disk writes of the upper and work dirs), ``errors`` (the one error translator
and the request counters), ``ops`` (the ``Operations`` subclass), ``server``
(``serve()``, the detached server, unmount and stale-mount cleanup).

Caching decision (DESIGN.md, "Performance levers"). Layers are immutable, so
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

* stock pyfuse3 (the default install): real opens, as above -- correct and
  cached, about fuse-overlayfs speed warm;
* a pyfuse3 build whose read/readdir glue passes the inode when fh is 0 (two
  lines of its generated C; ``tools/bench_union.py`` builds one with gcc and
  libfuse3-dev and marks it with a ``MERGEFS_INODE_FH`` file): read-only mounts
  then run no-open (``UnionOperations(no_open=True)``). Writable mounts keep
  real opens either way (a write must find its fd).

Whether to ship that build (built at install time by bootstrap, or proposed
upstream as "pass the inode to read/readdir") is left to the lead: it needs a
compiler at install time and a pinned pyfuse3 version whose generated C
matches the patch (the builder refuses anything else).
"""
from .ops import UnionOperations
from .server import clean_stale, is_mounted, serve, start, unmount
from .view import UnionView
from .writable import WritableView

__all__ = ["UnionOperations", "UnionView", "WritableView", "clean_stale", "is_mounted",
           "serve", "start", "unmount"]
