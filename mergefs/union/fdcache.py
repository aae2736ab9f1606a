"""The content fds of a no-open mount, kept per inode (docs/architecture.md, "Serving paths").

Under no-open the kernel sends no OPEN/RELEASE, so read/write/fsync arrive
with the inode number and no handle. ``FdCache`` keeps an fd per inode:

- ``fds``: number -> (fd, node it is on, writable), the last ``max_fds`` used;
  an entry counts only while the inode is still served by that node (a
  copy-up or a rename over it changes ``inode.node``), checked at each use.
- ``pinned``: number -> (fd, node, "rw"|"ro"|"path", on an upper file?), the
  fd of a file unlinked (or renamed over) while the kernel may hold it open,
  kept until its FORGET, never evicted; a "path" pin is an O_PATH fd,
  reopened through /proc/self/fd at its first use.

The C fast path (``fast``, mergefs/union/_fastpath.c, when loaded) serves
GETATTR/SETATTR/READ/WRITE/FSYNC/GETXATTR/LISTXATTR of the regular files in ``fds``
through the same fds: this cache owns them and tells the C table of every
entry it adds, replaces, moves to ``pinned`` or closes, before closing. The
first WRITE of a file with no writable fd there (a lower file: its copy-up)
C hands to ``write_for_c``, then writes through the fd it made.
The first READ of a regular file with no fd there C opens itself where it
can (mergefs/union/_fastopen.h: from the lazy record or Inode, below the
parent's directory in the file's layer) and puts the fd in ``fds`` as
``content_fd`` would, evicting the oldest the same way: from then on it is
this cache's like any other (closed on forget, replaced after a copy-up).
It also keeps ``dirs``: number -> (O_PATH fd, node, sources) of an upper
directory (the last ``max_dirs``), whose GETATTR C answers with ``fstat`` (nlink 1
if it is merged with lower layers): the kernel asks for a directory's
attributes again after every name made in it (once per file of an untar) and
after every copy-up into it (the append step).

How many fds it keeps (``fd_budget``): FD_CACHE files and DIR_FDS directories
where the process may open that many, for which it raises its soft
RLIMIT_NOFILE toward the hard limit once (as fuse-overlayfs raises its own);
256 and 64 under a limit of 1024 it cannot raise. A file's fd kept from its
creation to its fsync is what lets C answer that fsync: ``dpkg -i`` writes
all of a package's files (2,000 for perl-modules), then fsyncs and renames
each; with 256 kept, 2,206 of its 2,357 fsyncs came to Python, each reopening
the file.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from ..layer import DIR, REG
from .inodes import Inode

FD_CACHE = 4096          # at most (``fd_budget``)
DIR_FDS = 4096
FD_RESERVE = 1024        # fds left for the rest: layers, the upper's dirs, pinned files
SMALL = (256, 64)        # (files, dirs) where the fd limit leaves no room for more


def fd_budget(want: int = FD_CACHE + DIR_FDS + FD_RESERVE) -> tuple[int, int]:
    """(files, directories) an ``FdCache`` may keep open: raises this process's soft
    RLIMIT_NOFILE toward ``want`` first, as far as the hard limit allows."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError):
                pass
    room = (want if soft == resource.RLIM_INFINITY else soft) - FD_RESERVE
    return (min(FD_CACHE, max(SMALL[0], room // 2)), min(DIR_FDS, max(SMALL[1], room // 2)))


class FdCache:
    def __init__(self, view):
        self.view = view
        # Oldest first (evicted first). OrderedDicts: a dict's first item, after
        # many were popped from its front, is found by a scan over their slots
        # (``next(iter(d))`` cost ~14k instructions per eviction in ``tar -c``).
        self.fds: OrderedDict[int, tuple] = OrderedDict()
        self.pinned: dict[int, tuple] = {}
        self.dirs: OrderedDict[int, tuple] = OrderedDict()
        self.fast = None                   # the C fast path's table (fastpath.load())
        self.max_fds, self.max_dirs = fd_budget()

    def close(self) -> None:
        if self.fast is not None:
            from . import fastpath
            fastpath.unload()
            self.fast = None
        for cache in (self.fds, self.pinned):
            for got in cache.values():
                os.close(got[0])
            cache.clear()
        for got in self.dirs.values():
            os.close(got[0])
        self.dirs.clear()

    def __bool__(self) -> bool:
        return bool(self.fds or self.pinned or self.dirs)

    def cached(self, inode: Inode, write: bool) -> int:
        """The inode's kept fd, -1 if none fits: pinned first, then the cache,
        whose entry must be on the inode's current node and writable if ``write``."""
        number, node = inode.number, inode.node
        if self.pinned:
            got = self.pinned.get(number)
            if got is not None:
                if got[2] == "rw" or got[2] == "ro" and not write:
                    return got[0]
                if got[3]:
                    return self._reopen_pinned(number, got, write)
                # a lower file's read fd, asked for a write: a detached copy (-1)
        got = self.fds.pop(number, None)
        if got is not None:
            if (got[1] is node or got[1] == node) and (got[2] or not write):
                if got[1] is not node:       # an equal node now: the C table needs this one
                    got = (got[0], node, got[2])
                    self._serve(inode, got)
                self.fds[number] = got       # the most recently used now
                return got[0]
            self._close(number, got[0])
        return -1

    def keep(self, inode: Inode, fd: int, writable: bool) -> None:
        if inode.unlinked:                  # its only way in now: never evicted
            self._close_pin(inode.number)
            self.pinned[inode.number] = (fd, inode.node, "rw" if writable else "ro",
                                         self.view.writable and inode.node.top == self.view.up)
            return
        if len(self.fds) >= self.max_fds:
            oldest, got = self.fds.popitem(last=False)
            self._close(oldest, got[0])
        old = self.fds.pop(inode.number, None)
        if old is not None:
            self._close(inode.number, old[0])
        got = self.fds[inode.number] = (fd, inode.node, writable)
        self._serve(inode, got)

    def _serve(self, inode: Inode, got: tuple) -> None:
        """Hand a regular file's cache entry to the C fast path."""
        if self.fast is not None and inode.kind == REG:
            view = self.view
            upper = view.writable and got[1].layers[0] == view.up
            flags = (self.fast.WRITE if got[2] else 0) | (self.fast.UPPER if upper else 0)
            self.fast.set(inode.number, got[0], flags, inode, got[1])

    def _close(self, number: int, fd: int) -> None:
        if self.fast is not None:
            self.fast.drop(number)
        os.close(fd)

    def _close_pin(self, number: int) -> None:
        old = self.pinned.pop(number, None)
        if old is not None:
            os.close(old[0])

    def _reopen_pinned(self, number: int, got: tuple, write: bool) -> int:
        """A pinned upper file opened again through its fd (the name is gone):
        read-write if the server may, else read-only for a read."""
        fd, node = got[0], got[1]
        path = f"/proc/self/fd/{fd}"
        try:
            new, mode = os.open(path, os.O_RDWR | os.O_CLOEXEC), "rw"
        except PermissionError:
            if write:
                raise
            new, mode = os.open(path, os.O_RDONLY | os.O_CLOEXEC), "ro"
        os.close(fd)
        self.pinned[number] = (new, node, mode, True)
        return new

    def drop(self, number: int) -> None:
        got = self.fds.pop(number, None)
        if got is not None:
            self._close(number, got[0])
        self._close_pin(number)
        got = self.dirs.pop(number, None)
        if got is not None:
            self._close(number, got[0])

    def serve_dir(self, inode: Inode) -> None:
        """Let C answer GETATTR of ``inode`` if it is a directory of the upper whose
        ``sources`` are known (the upper first): an O_PATH fd on it, which follows
        it through renames, flagged MERGED when lower layers serve it too (nlink
        1, as ``view.merged`` and kernel overlayfs say, U1; else its own). C
        answers while the inode's node is the object it is now, its sources an
        equal tuple and it is not removed; any change of those (a copy-up, a
        rename, an opaque or redirected directory, a listing read again that
        found other layers) makes Python answer (and call this again)."""
        sources = inode.sources
        got = self.dirs.get(inode.number)
        if got is not None and got[1] is inode.node and got[2] == sources and \
                not inode.unlinked:
            return                  # C serves it (or it changed in a way C sees)
        view = self.view
        if self.fast is None or inode.kind != DIR or not view.writable or \
                inode.parent is None or inode.unlinked or not sources or \
                sources[0] != view.up or inode.node.top != view.up:
            return
        if got is not None:         # another node or other sources now
            self._close(inode.number, self.dirs.pop(inode.number)[0])
        pfd, name = view._upper_entry(inode)
        try:
            fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pfd)
        except OSError:
            return                  # Python answers, as before
        if len(self.dirs) >= self.max_dirs:
            oldest, got = self.dirs.popitem(last=False)
            self._close(oldest, got[0])
        self.dirs[inode.number] = (fd, inode.node, sources)
        flags = self.fast.DIR | (self.fast.MERGED if len(sources) > 1 else 0)
        self.fast.set(inode.number, fd, flags, inode, inode.node, sources)

    def content_fd(self, inode: Inode) -> int:
        """No-open reads: an fd per inode, the last ``max_fds`` of them kept open."""
        fd = self.cached(inode, False)
        if fd < 0:
            fd = self.view.open_content(inode)
            self.keep(inode, fd, False)
        return fd

    def write_fd(self, inode: Inode, writer, for_write: bool = False) -> int:
        """No-open writes: the inode's fd on its upper file. The first write to a
        lower file copies it up (kernel overlayfs does at open for write); a lower
        file unlinked while held open gets a copy of its own, never published.
        ``for_write``: asked by a WRITE request (``Writable._copied_up``)."""
        fd = self.cached(inode, True)
        if fd < 0:
            fd = writer.detached_copy(inode) if inode.unlinked and inode.node.top != writer.up \
                else writer.open_for_write(inode, os.O_RDWR, for_write)
            self.keep(inode, fd, True)
        return fd

    def write_for_c(self, number: int, failed: int = 0) -> None:
        """The C fast path has a no-open WRITE of inode ``number`` and no writable fd
        for it (``_fastpath.set_copyup``): what ``ops.write`` does before its
        pwrite, here the copy-up of a lower file (``write_fd`` for a WRITE) and
        the fd handed to C, which then writes (an error: the kernel is told what
        the copy-up changed, as ops.write does). ``failed``: C's write to the
        copy made here failed with that errno: the kernel is told now."""
        inode, view = self.view.inodes.get(number), self.view
        try:
            if not failed:
                self.write_fd(inode, view, True)
                return
        except OSError:
            view.attrs_changed(number)
            raise
        finally:
            inode.attr = None
        view.attrs_changed(number)

    def pin(self, parent: Inode, name: bytes) -> None:
        """No-open, before ``parent/name`` is unlinked or renamed over: the kernel may
        hold the file open with no handle here, so keep an fd on its upper file until
        its FORGET (a lower file stays readable in its layer; nothing to keep). A
        cached fd is kept as it is; else an O_PATH one (cheap: ``rm -rf`` pins every
        file), opened for reading or writing only if the kernel comes back for it."""
        view = self.view
        node = view.child(parent, name)
        if node is None or node.kind != REG or node.top != view.up:
            return
        inode = view.inodes.live(view.inodes.number_for(node))
        if inode is None or inode.number in self.pinned:
            return
        got = self.fds.pop(inode.number, None)
        if got is not None and self.fast is not None:
            self.fast.drop(inode.number)     # C serves no unlinked file
        if got is not None and (got[1] is node or got[1] == node):
            self.pinned[inode.number] = (got[0], node, "rw" if got[2] else "ro", True)
            return
        if got is not None:
            os.close(got[0])
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=view.upper.borrow_dir(parent.path))
        self.pinned[inode.number] = (fd, node, "path", True)
