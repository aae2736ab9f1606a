"""The live union mount: merged layers served by a pyfuse3 server on trio.

Modules: ``inodes`` (InodeTable: numbers, lookup counts), ``view`` (the merged
view per inode, cached; read-only), ``writable`` (copy-up, whiteouts into an
overlay-format upper), ``upper`` (the disk writes of the upper/work dirs),
``errors`` (the one error translator), ``ops`` (the ``Operations`` subclass),
``server`` (``serve()`` and the detached mount lifecycle).

Caching decision (DESIGN.md, "Performance levers"): pyfuse3 3.5.0 hands
``read()`` and ``readdir()`` only the file handle, never the inode, so
answering ``open``/``opendir`` with ENOSYS ("no-open", fh 0) cannot be served
by an unpatched pyfuse3. mergefs keeps real opens: ``open`` returns a handle
that maps to (inode, fd) with ``keep_cache=True``, so the kernel keeps pages
across opens; entry and attribute timeouts are a day (layers are immutable);
readdirplus carries attributes and counts as a lookup. The remaining cost over
no-open is one OPEN + RELEASE per open(2) and one OPENDIR + READDIRPLUS +
RELEASEDIR per listing (pyfuse3's ``opendir`` cannot ask for FOPEN_CACHE_DIR).
A patched build would remove those; it is not done because it needs a build
toolchain at install time and a fork of pyfuse3 to maintain.
"""
