"""The merged view the union serves: listings, attributes, content, per inode.

A thin cache over the resolver's pure merge rules (``merge_listing``): each
directory inode keeps its merged listing once read; each inode keeps the
lstat of the entry that supplies it. Layers are immutable, so on a read-only
mount nothing is ever invalidated; the writable view (``writable.py``) drops
what it changes.

Every layer access goes through ``syscalls.open_beneath`` (openat2 with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) or an ``*at`` call with
AT_SYMLINK_NOFOLLOW on a directory fd opened that way: no symlink a layer
holds is ever followed by the server (S2).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from sortedcontainers import SortedDict

from .. import syscalls
from ..errors import NotFound
from ..layer import LNK, Layer, is_overlay_private
from ..resolver import Node, Resolver, merge_listing
from .inodes import Inode, InodeTable


class UnionView:
    """Lowers (bottom first) merged; ``layers[i]`` is layer index ``i``."""

    writable = False

    def __init__(self, layers: Sequence[Layer]):
        self.resolver = Resolver(layers)
        self.layers = self.resolver.layers
        self.inodes = InodeTable(self.resolver.root)

    def close(self) -> None:
        self.resolver.close()

    # -- directories -----------------------------------------------------
    def listing(self, inode: Inode) -> SortedDict:
        """The merged children of a directory inode, name -> Node, sorted."""
        if inode.children is None:
            if not inode.is_dir:
                raise OSError(20, "Not a directory")   # ENOTDIR
            path = inode.path
            inode.children = SortedDict(merge_listing(
                (i, self.resolver.layer_dir(i, path)) for i in inode.node.layers))
        return inode.children

    def lookup(self, parent: Inode, name: bytes) -> Inode:
        """The child inode (lookup count +1); NotFound if the view has no such name."""
        node = self.listing(parent).get(name)
        if node is None:
            raise NotFound(name)
        inode = self.inodes.entry(parent, name, node)
        self.attr(inode)
        return inode

    def entries(self, parent: Inode, names: Iterable[tuple[bytes, Node]]):
        """Yield (name, node, number, lstat, EntryAttributes|None) for listing entries.

        Attributes of live inodes come from the table (a warm listing stats
        nothing); the rest are lstat'ed through one dir fd per layer. A name
        gone since the listing was taken (a writable mount) is skipped.
        """
        fds: dict[int, int] = {}
        path = parent.path
        current = parent.children
        table = self.inodes
        try:
            for name, node in names:
                if current is not None and current.get(name) != node:
                    node = current.get(name)
                    if node is None:
                        continue
                number = table.number_for(node)
                inode = table.live(number)
                if inode is not None and inode.attr is not None and not inode.unlinked:
                    yield name, node, number, inode.attr, inode.entry
                    continue
                top = node.top
                fd = fds.get(top)
                if fd is None:
                    fd = fds[top] = syscalls.open_beneath(self.layers[top].fd, path)
                try:
                    st = syscalls.lstat(name, fd)
                except FileNotFoundError:
                    continue
                yield name, node, number, st, None
        finally:
            for fd in fds.values():
                os.close(fd)

    # -- attributes ------------------------------------------------------
    def attr(self, inode: Inode) -> os.stat_result:
        if inode.attr is None:
            inode.attr = self.resolver.lstat_in(inode.node.top, inode.path)
        return inode.attr

    # -- content ---------------------------------------------------------
    def open_content(self, inode: Inode, flags: int = 0) -> int:
        """An fd on the file's content in its layer (never through a symlink)."""
        if inode.kind == LNK:
            raise OSError(40, "Too many levels of symbolic links")   # ELOOP, as O_NOFOLLOW
        return syscalls.open_beneath(self.layers[inode.node.top].fd, inode.path,
                                     syscalls.O_READ | flags)

    def readlink(self, inode: Inode) -> bytes:
        if inode.kind != LNK:
            raise OSError(22, "Invalid argument")                  # EINVAL, as readlink(2)
        with self._parent_fd(inode) as (fd, name):
            return syscalls.readlink(name, fd)

    def xattr_names(self, inode: Inode) -> list[bytes]:
        with self._parent_fd(inode) as (fd, name):
            return [os.fsencode(a) for a in syscalls.listxattr(fd, name)
                    if not is_overlay_private(a)]

    def getxattr(self, inode: Inode, attr: bytes) -> bytes | None:
        with self._parent_fd(inode) as (fd, name):
            return syscalls.getxattr(fd, name, os.fsdecode(attr))

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.layers[-1].fd)

    def _parent_fd(self, inode: Inode, layer: int | None = None):
        return _ParentFd(self.layers[inode.node.top if layer is None else layer].fd, inode.path)


class _ParentFd:
    """``with _ParentFd(root_fd, path) as (dir_fd, name)``: the entry's directory, opened beneath."""

    def __init__(self, root_fd: int, path: bytes):
        self.root_fd, self.path, self.fd = root_fd, path, -1

    def __enter__(self) -> tuple[int, bytes]:
        parent, _, name = self.path.rpartition(b"/")
        if not self.path:          # the root itself: its own fd, empty name
            self.fd = os.dup(self.root_fd)
            return self.fd, b""
        self.fd = syscalls.open_beneath(self.root_fd, parent)
        return self.fd, name

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
