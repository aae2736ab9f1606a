"""The pyfuse3 ``Operations`` of the union: thin translators over the view.

Each handler turns FUSE arguments into one call on the ``UnionView`` (read)
or ``WritableView`` (write) and the result into pyfuse3 types; errors are
translated in one place (``@fuse_errors``, which also makes a plain function a
coroutine function for pyfuse3: a handler that never awaits is written as a
plain ``def``, one coroutine per request instead of two). Lookup counts: ``lookup``,
``create``, ``mkdir``, ``mknod``, ``symlink``, ``link`` and every entry
``readdirplus`` returns add one; ``forget`` subtracts.

File handles: ``fh`` is a number in ``self.handles`` mapping to the inode and
its open fd (files) or a snapshot of the listing (directories, so readdir
offsets are indices that stay valid for the handle's life).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import FUSEError

from ..errors import NotFound
from ..layer import DIR, is_overlay_private
from .errors import fuse_errors, log
from .inodes import Inode
from .view import UnionView

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
FD_CACHE = 256


@dataclass
class Handle:
    inode: Inode
    fd: int = -1                     # files: the content fd
    entries: list | None = None      # directories: (name, Node) snapshot


def statfs_reply(sv: os.statvfs_result) -> "pyfuse3.StatvfsData":
    """An os.statvfs result as pyfuse3's statfs reply."""
    out = pyfuse3.StatvfsData()
    for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
              "f_ffree", "f_favail", "f_namemax"):
        setattr(out, f, getattr(sv, f))
    return out


@dataclass
class Timeouts:
    """How long the kernel may cache (seconds); layers are immutable (U3)."""
    entry: float = 86400.0
    attr: float = 86400.0


def entry_attributes(number: int, st: os.stat_result, merged_dir: bool,
                     t: Timeouts, squash: tuple = (None, None)) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = number
    e.generation = 0
    e.entry_timeout = t.entry
    e.attr_timeout = t.attr
    e.st_mode = st.st_mode
    # kernel overlayfs reports nlink 1 for a dir merged from several layers (U1)
    e.st_nlink = 1 if merged_dir else st.st_nlink
    e.st_uid, e.st_gid, e.st_rdev, e.st_size = st.st_uid, st.st_gid, st.st_rdev, st.st_size
    if squash[0] is not None:           # squash_to_root / squash_to_uid: ownership as shown
        e.st_uid = squash[0]
    if squash[1] is not None:
        e.st_gid = squash[1]
    e.st_blksize, e.st_blocks = st.st_blksize, st.st_blocks
    e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return e


def _invalidate_attrs(number: int) -> None:
    """Drop the kernel's cached attributes of inode ``number`` (not its pages: no
    writeback cache, so this never blocks inside a handler)."""
    try:
        pyfuse3.invalidate_inode(number, attr_only=True)
    except OSError as e:                 # the copy-up itself succeeded: never fail it here
        if e.errno != errno.ENOENT:      # ENOENT: the kernel holds nothing for it
            log.warning("invalidating the attributes of inode %d: %s", number, e)


class UnionOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, view: UnionView, timeouts: Timeouts | None = None, no_open: bool = False,
                 volatile: bool = False, squash: tuple = (None, None)):
        super().__init__()
        self.volatile = volatile         # fsync is a no-op (overlay's "volatile")
        self.squash = squash
        self.view = view
        self.inodes = view.inodes
        self.timeouts = timeouts or Timeouts()
        # A negative entry (st_ino 0) the kernel may cache: every change of the view
        # goes through the kernel, which drops it when needed. Built once: pyfuse3
        # only reads it.
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino, self._negative.entry_timeout = 0, self.timeouts.entry
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        # no-open needs a pyfuse3 that passes the inode as fh when fh is 0
        # (see the package docstring); only read-only mounts use it.
        self.no_open = no_open and not view.writable
        self._fds: dict[int, int] = {}

    def init(self) -> None:
        """pyfuse3 calls this once the kernel connection is up: from now on a copy-up
        drops the kernel's cached attributes of what it changed (the parent's ctime),
        or they stay stale for attr_timeout and surface later ("file changed as we
        read it" from tar once a readdir makes the kernel ask again)."""
        if self.view.writable:
            self.view.attrs_changed = _invalidate_attrs

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- helpers ---------------------------------------------------------
    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        if inode.entry is not None and not inode.unlinked:
            return inode.entry
        st = self._stat(inode)
        merged = inode.is_dir and self.view.merged(inode.parent, inode.name, inode.node, inode)
        e = entry_attributes(inode.number, st, merged, self.timeouts, self.squash)
        if st is inode.attr:
            inode.entry = e
        return e

    def _stat(self, inode: Inode) -> os.stat_result:
        if inode.unlinked:
            for h in self.handles.values():
                if h.inode is inode and h.fd >= 0:
                    return os.fstat(h.fd)
        return self.view.attr(inode)

    def _add_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    def _writer(self):
        if not self.view.writable:
            raise FUSEError(errno.EROFS)
        return self.view

    def check(self) -> list[str]:
        """Invariants for tests: the inode table's, and every handle's inode is live."""
        problems = self.inodes.check()
        for fh, h in self.handles.items():
            if h.inode.lookups <= 0:
                problems.append(f"handle {fh} on forgotten {h.inode!r}")
        return problems

    # -- names -----------------------------------------------------------
    @fuse_errors
    def lookup(self, parent_inode, name, ctx=None):
        parent = self.inodes.get(parent_inode)
        if name not in self.view.listing(parent):
            return self._negative    # before every new name: no exception raised for it
        try:
            return self._entry(self.view.lookup(parent, name))
        except NotFound:
            return self._negative

    @fuse_errors
    def forget(self, inode_list):
        for number, count in inode_list:
            self.inodes.forget(number, count)

    @fuse_errors
    def getattr(self, inode, ctx=None):
        return self._entry(self.inodes.get(inode))

    @fuse_errors
    def readlink(self, inode, ctx=None):
        return self.view.readlink(self.inodes.get(inode))

    # -- directories -----------------------------------------------------
    @fuse_errors
    async def opendir(self, inode, ctx=None):
        if self.no_open:
            raise FUSEError(errno.ENOSYS)    # the kernel caches listings itself from now on
        node = self.inodes.get(inode)
        return self._add_handle(Handle(node, entries=list(self.view.listing(node).items())))

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        if self.no_open:        # fh is the inode (patched pyfuse3); the listing never changes
            parent = self.inodes.get(fh)
            wanted = self.view.listing(parent).items()[start_id:]
        else:
            h = self.handles[fh]
            parent, wanted = h.inode, h.entries[start_id:]
        reply = pyfuse3.readdir_reply
        entries = self.view.entries(parent, wanted)
        try:
            for i, (name, node, number, st, attrs) in enumerate(entries, start_id + 1):
                if attrs is None:
                    merged = node.kind == DIR and self.view.merged(parent, name, node)
                    attrs = entry_attributes(number, st, merged, self.timeouts, self.squash)
                if not reply(token, name, attrs, i):
                    break
                child = self.inodes.entry_of(parent, name, node, number)  # readdirplus counts
                if child.attr is None:
                    child.attr = st
                    child.entry = attrs
        finally:
            entries.close()

    @fuse_errors
    async def releasedir(self, fh):
        del self.handles[fh]

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        pass

    # -- files -----------------------------------------------------------
    @fuse_errors
    async def open(self, inode, flags, ctx=None):
        if self.no_open and not flags & WRITE_FLAGS:
            raise FUSEError(errno.ENOSYS)    # no OPEN/RELEASE any more; pages cached
        node = self.inodes.get(inode)
        if flags & WRITE_FLAGS:
            fd = self._writer().open_for_write(node, flags)
        else:
            fd = self.view.open_content(node)
        fh = self._add_handle(Handle(node, fd))
        # keep_cache: layers never change under a read-only mount (U3); a
        # writable mount sends every write through here, so its pages agree too.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors
    async def read(self, fh, off, size):
        if self.no_open:
            return os.pread(self._content_fd(fh), size, off)
        return os.pread(self.handles[fh].fd, size, off)

    def _content_fd(self, number: int) -> int:
        """No-open reads: an fd per inode, the last FD_CACHE of them kept open."""
        fd = self._fds.pop(number, None)
        if fd is None:
            fd = self.view.open_content(self.inodes.get(number))
            if len(self._fds) >= FD_CACHE:
                os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[number] = fd
        return fd

    @fuse_errors
    async def write(self, fh, off, buf):
        h = self.handles[fh]
        n = os.pwrite(h.fd, buf, off)
        h.inode.attr = None
        return n

    @fuse_errors
    async def flush(self, fh):
        # Nothing to do on close(2): writes go straight to the upper. ENOSYS
        # makes the kernel stop sending FLUSH for good (fc->no_flush), one
        # request less per open file.
        raise FUSEError(errno.ENOSYS)

    @fuse_errors
    async def fsync(self, fh, datasync):
        if self.volatile:
            return
        fd = self.handles[fh].fd
        (os.fdatasync if datasync else os.fsync)(fd)

    @fuse_errors
    async def release(self, fh):
        h = self.handles.pop(fh)
        os.close(h.fd)

    # -- extended attributes ---------------------------------------------
    @fuse_errors
    def listxattr(self, inode, ctx=None):
        return self.view.xattr_names(self.inodes.get(inode))

    @fuse_errors
    def getxattr(self, inode, name, ctx=None):
        if is_overlay_private(os.fsdecode(name)):
            raise FUSEError(errno.EOPNOTSUPP)   # as kernel overlayfs answers its own prefix
        value = self.view.getxattr(self.inodes.get(inode), name)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    def setxattr(self, inode, name, value, ctx=None):
        self._writer().setxattr(self.inodes.get(inode), name, value)

    @fuse_errors
    def removexattr(self, inode, name, ctx=None):
        self._writer().removexattr(self.inodes.get(inode), name)

    @fuse_errors
    def statfs(self, ctx=None):
        return statfs_reply(self.view.statvfs())

    # -- writes (EROFS on a read-only mount, U3) --------------------------
    @fuse_errors
    def setattr(self, inode, attr, fields, fh, ctx=None):
        node = self.inodes.get(inode)
        fd = self.handles[fh].fd if fh is not None and fh in self.handles else -1
        self._writer().setattr(node, attr, fields, fd)
        return self._entry(node)

    @fuse_errors
    def create(self, parent_inode, name, mode, flags, ctx):
        node, fd = self._writer().create(self.inodes.get(parent_inode), name, mode, flags, ctx)
        fh = self._add_handle(Handle(node, fd))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(node)

    @fuse_errors
    def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(self._writer().mkdir(self.inodes.get(parent_inode), name, mode, ctx))

    @fuse_errors
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        w = self._writer()
        return self._entry(w.mknod(self.inodes.get(parent_inode), name, mode, rdev, ctx))

    @fuse_errors
    def symlink(self, parent_inode, name, target, ctx):
        w = self._writer()
        return self._entry(w.symlink(self.inodes.get(parent_inode), name, target, ctx))

    @fuse_errors
    def link(self, inode, new_parent_inode, new_name, ctx):
        w = self._writer()
        node = w.link(self.inodes.get(inode), self.inodes.get(new_parent_inode), new_name)
        return self._entry(node)

    @fuse_errors
    def unlink(self, parent_inode, name, ctx):
        self._writer().unlink(self.inodes.get(parent_inode), name)

    @fuse_errors
    def rmdir(self, parent_inode, name, ctx):
        self._writer().rmdir(self.inodes.get(parent_inode), name)

    @fuse_errors
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        w = self._writer()
        w.rename(self.inodes.get(parent_inode_old), name_old,
                 self.inodes.get(parent_inode_new), name_new, flags)
