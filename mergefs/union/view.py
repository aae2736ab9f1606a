"""The merged view the union serves: listings, attributes, content, per inode.

A thin cache over the resolver's pure merge rules (``merge_listing``): each
directory inode keeps its merged listing once read; each inode keeps the
lstat of the entry that supplies it. A lookup in a directory whose listing
is not at hand looks its one name up in each layer (``read_name``), and a
directory is listed only when a READDIR asks, or when its names looked up
one by one have cost what its listing would (``_at_hand``). Layers are immutable, so on a read-only
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
from ..layer import LNK, NUMBER_XATTRS, Layer, LayerDir, is_overlay_private, layer_dir_markers
from ..resolver import (KeptMarkers, NameReader, Node, Resolver, join, merge_listing,
                        redirect_value)
from .fastpath import compiled
from .inodes import Inode, InodeTable


# Lower directories ``merged`` read whole, kept for the ``read_dir`` that usually
# follows (at most this many entries in all, the oldest dropped first).
READ_AHEAD_ENTRIES = 1 << 16
# Markers (opacity, redirect) of lower directories ``read_name`` read, kept (at most
# this many; a lower layer never changes, so what is kept stays right).
KEPT_MARKERS = 1 << 15
# ``child``: a directory's names are looked up one by one (``read_name``) until
# that has cost about what reading its listing would have (ski rental: at most
# twice the cheaper of the two), then it is listed and the listing answers:
# NAMES_PER_LISTING lookups, plus one per ENTRIES_PER_NAME entries its lower
# layers' directories may hold beyond their first block (st_size - FIRST_BLOCK,
# DIRENT_BYTES an entry). Measured (ext4, server CPU): a name ~22 us in 1-2
# layers and ~50 us in 3; a listing ~70 us at 30 entries in 1-2 layers, ~10 ms
# at 5,000 entries in 3.
NAMES_PER_LISTING = 2
ENTRIES_PER_NAME = 24
DIRENT_BYTES = 32
FIRST_BLOCK = 4096


class UnionView:
    """Lowers (bottom first) merged; ``layers[i]`` is layer index ``i``."""

    writable = False

    def __init__(self, layers: Sequence[Layer]):
        self.resolver = Resolver(layers)
        self.resolver.scan = compiled("layer_entries")     # None: read_layer_dir's own loop
        self.layers = self.resolver.layers
        self.inodes = InodeTable(self.resolver.root)
        self.redirected = False      # a redirect was seen: layer paths may differ from merged ones
        self._ahead: dict[tuple[int, bytes], LayerDir] = {}    # ``_read_ahead``
        self._ahead_n = 0
        self._marks = KeptMarkers(KEPT_MARKERS)     # lower directories' (``_layer_markers``)

    def close(self) -> None:
        self.resolver.close()

    # -- layer paths (redirects) -------------------------------------------
    def layer_path(self, inode: Inode, layer: int) -> bytes:
        """Where ``inode`` is in ``layer``: its merged path, unless a directory on
        the way carries a redirect in a layer above ``layer`` (R1)."""
        if not self.redirected:
            return inode.path
        names = []
        cur = inode
        while cur.parent is not None:
            hit = None
            for k, value in cur.redirects:       # top first: the lowest k above layer wins
                if k <= layer:
                    break
                hit = value
            if hit is not None and hit[:1] == b"/":
                names.append(hit[1:])
                break
            names.append(cur.name if hit is None else hit)
            cur = cur.parent
        return b"/".join(reversed(names))

    def _sources(self, parent: Inode | None, name: bytes, node: Node, path: bytes, read=None):
        """``resolver.dir_sources`` of the directory ``node`` named ``name`` in ``parent``."""
        if parent is None:
            cands, parent_path = [(i, b"") for i in node.layers], None
        else:
            if not self.redirected:
                cands = [(i, path) for i in node.layers]
            else:
                cands = [(i, join(self.layer_path(parent, i), name)) for i in node.layers]

            def parent_path(i: int) -> bytes | None:
                if parent.sources is not None and i not in parent.sources:
                    return None
                return self.layer_path(parent, i)
        found = self.resolver.sources(cands, parent_path, read)
        return found, tuple((s.layer, v) for s in found
                            if (v := redirect_value(s.ld.redirect)) is not None and s.layer > 0)

    def read_dir(self, inode: Inode) -> SortedDict:
        """Read a directory's merged listing from its layers; note its redirects."""
        found = self._read(inode, self._layer_dir if self._ahead else None)
        return SortedDict(merge_listing((s.layer, s.ld) for s in found))

    def _read(self, inode: Inode, read) -> list:
        """``_sources`` of a directory inode, each layer read with ``read``; the
        inode's redirects and serving layers noted, and the numbers the upper's
        entries recorded (U8)."""
        found, redirects = self._sources(inode.parent, inode.name, inode.node, inode.path, read)
        if redirects:
            self.redirected = True
        inode.redirects, inode.sources = redirects, tuple(s.layer for s in found)
        for s in found:
            if s.ld.numbered and s.layer == getattr(self, "up", None):
                self._recorded_numbers(s)
        return found

    def read_name(self, parent: Inode, name: bytes) -> tuple[Node | None, os.stat_result | None]:
        """``name`` in the directory ``parent`` as its listing would give it, found
        without listing a directory: looked up in each layer serving ``parent``,
        top first, with whiteouts, opaque directories and redirects applied as the
        listing applies them (``resolver.NameReader``), as kernel overlayfs looks a
        name up. Returns the node (None: no such name) and the lstat of its top
        entry (None when there is none)."""
        if not parent.is_dir:
            raise OSError(20, "Not a directory")   # ENOTDIR, as ``listing``
        read = NameReader(self.layers, name, self._open_layer_dir, self._marks,
                          getattr(self, "up", None))
        node = read.node(self._read(parent, read))
        if read.unsure:           # a mount point in a layer: its number is the listing's
            return self.listing(parent).get(name), None
        self._named(parent, read)
        return node, (None if node is None else read.stats.get(node.top))

    def _open_layer_dir(self, layer: int, path: bytes) -> tuple[int, bool]:
        """(an fd on the directory ``path`` of ``layer``, must the caller close it?)"""
        return self.resolver.open_dir(layer, path)

    def _layer_markers(self, layer: int, path: bytes) -> LayerDir:
        """``resolver.layer_markers``, through ``_open_layer_dir``; those of a lower
        directory are kept (``_marks``: a lower layer never changes)."""
        if layer != getattr(self, "up", None) and (layer, path) in self._marks:
            got = self._marks[(layer, path)][0]
        else:
            fd, owned = self._open_layer_dir(layer, path)
            try:
                if layer != getattr(self, "up", None):
                    got = self._marks.of(layer, path, fd, self.layers[layer].fmt)[0]
                else:
                    got = layer_dir_markers(fd, self.layers[layer].fmt)
            finally:
                if owned:
                    os.close(fd)
        return LayerDir(opaque=got[0], redirect=got[2])

    def _read_ahead(self, layer: int, path: bytes) -> LayerDir:
        """A lower directory read whole for ``merged`` (its markers are what it
        needs): a listing (READDIRPLUS) asks that of each child directory, and
        its reader (find, du, tar) mostly lists that child next, which
        ``_layer_dir`` then takes from here instead of opening and reading it
        again. A lower layer never changes, so what is kept stays right."""
        ld = self.resolver.layer_dir(layer, path)
        n = len(ld.entries) + 1
        if n <= READ_AHEAD_ENTRIES:
            ahead = self._ahead
            old = ahead.pop((layer, path), None)
            if old is not None:
                self._ahead_n -= len(old.entries) + 1
            while self._ahead_n + n > READ_AHEAD_ENTRIES:
                self._ahead_n -= len(ahead.pop(next(iter(ahead))).entries) + 1
            ahead[(layer, path)] = ld
            self._ahead_n += n
        return ld

    def _reads_ahead(self, node: Node) -> bool:
        """Does ``merged`` read this directory's top layer whole? Where it is a lower
        (an upper directory changes: only its markers are read)."""
        return node.top != getattr(self, "up", None)

    def _layer_dir(self, layer: int, path: bytes) -> LayerDir:
        """``resolver.layer_dir``, taken from the read-ahead when it is there."""
        ld = self._ahead.pop((layer, path), None)
        if ld is None:
            return self.resolver.layer_dir(layer, path)
        self._ahead_n -= len(ld.entries) + 1
        return ld

    def _recorded_numbers(self, source) -> None:
        """The inode numbers a writable view's upper entries kept from their origins."""
        fd, owned = self._open_layer_dir(source.layer, source.path)
        try:
            for name, entry in source.ld.entries.items():
                for attr in NUMBER_XATTRS:
                    value = syscalls.getxattr(fd, name, attr)
                    if value is not None and value.isdigit():
                        self.inodes.remember((source.layer, entry.ino), int(value))
                        break
        finally:
            if owned:
                os.close(fd)

    def dir_sources(self, inode: Inode) -> tuple[int, ...]:
        """The layers really serving a directory (its markers read if not known yet)."""
        if inode.sources is None:
            found, redirects = self._sources(inode.parent, inode.name, inode.node, inode.path,
                                             self._layer_markers)
            if redirects:
                self.redirected = True
            inode.redirects, inode.sources = redirects, tuple(s.layer for s in found)
        return inode.sources

    def merged(self, parent: Inode | None, name: bytes, node: Node,
               inode: Inode | None = None) -> bool:
        """Is the directory ``node`` named ``name`` in ``parent`` served by more than
        one layer? Kernel overlayfs reports nlink 1 for such a directory and the
        layer's own count otherwise (U1): a redirected directory is merged even with
        nothing below its new name, an opaque one is not even with something there.
        Costs at most one read of the top layer's markers (none once it was read, or
        kept: ``_layer_markers``), a read of the whole directory when that layer is a
        lower and the directory an entry of a listing (``_read_ahead``)."""
        if inode is not None and inode.sources is not None:
            return len(inode.sources) > 1
        top = node.layers[0]
        if parent is None or top == 0:        # the root's layers are cut already
            return len(node.layers) > 1
        path = join(parent.path, name)
        # an inode's (a LOOKUP's, a GETATTR's) is not read ahead: the names in it are
        # looked up one by one (``read_name``), no listing takes the read
        read = self._read_ahead if inode is None and self._reads_ahead(node) else \
            self._layer_markers
        ld = read(top, path if not self.redirected else join(self.layer_path(parent, top), name))
        if ld.opaque:
            return False
        if redirect_value(ld.redirect) is None:
            return len(node.layers) > 1
        found, _ = self._sources(parent, name, node, path, self._layer_markers)
        return len(found) > 1

    def listing_of(self, parent: Inode, name: bytes, node: Node) -> SortedDict:
        """The merged listing of ``parent/name`` without an inode for it."""
        found, _ = self._sources(parent, name, node, join(parent.path, name))
        return SortedDict(merge_listing((s.layer, s.ld) for s in found))

    # -- directories -----------------------------------------------------
    def listing(self, inode: Inode) -> SortedDict:
        """The merged children of a directory inode, name -> Node, sorted."""
        if inode.children is None:
            if not inode.is_dir:
                raise OSError(20, "Not a directory")   # ENOTDIR
            inode.children = self.read_dir(inode)
        return inode.children

    def listed(self, inode: Inode) -> SortedDict | None:
        """The directory's merged listing where one is at hand (never read for
        this): it is then the answer for any name in it."""
        return inode.children

    def child(self, parent: Inode, name: bytes) -> Node | None:
        """``listing(parent).get(name)``: from the listing when it is at hand, else
        by ``read_name`` (no directory listed for one name)."""
        children = self._at_hand(parent)
        if children is not None:
            return children.get(name)
        return self.read_name(parent, name)[0]

    def _at_hand(self, parent: Inode) -> SortedDict | None:
        """``listed``, or the listing read now where looking names up one by one has
        cost what reading it would (``Inode.named`` counts down the lookups left,
        NAMES_PER_LISTING): the answers are the same either way, only their cost
        differs."""
        children = self.listed(parent)
        if children is None and parent.named is not None and parent.named <= 0:
            return self.listing(parent)
        return children

    def _named(self, parent: Inode, read: NameReader) -> None:
        """Count a ``read_name`` in ``parent`` (``_at_hand``)."""
        if parent.named is None:
            entries = sum(max(0, size - FIRST_BLOCK) for size in read.sizes) // DIRENT_BYTES
            parent.named = NAMES_PER_LISTING + entries // ENTRIES_PER_NAME
        parent.named -= 1

    def lookup(self, parent: Inode, name: bytes) -> Inode:
        """The child inode (lookup count +1); NotFound if the view has no such name."""
        inode = self.lookup_or_none(parent, name)
        if inode is None:
            raise NotFound(name)
        return inode

    def lookup_or_none(self, parent: Inode, name: bytes) -> Inode | None:
        """``lookup``, None for a name the view does not have (no exception: the
        kernel looks up every new name before it is made)."""
        children, st = self._at_hand(parent), None
        if children is not None:
            node = children.get(name)
        else:
            node, st = self.read_name(parent, name)
        if node is None:
            return None
        inode = self.inodes.entry(parent, name, node)
        if inode.attr is None and st is not None:
            inode.attr = self._looked_up(node, st)
        self.attr(inode)
        return inode

    def _looked_up(self, node: Node, st: os.stat_result) -> os.stat_result:
        """The lstat to keep for ``node``'s entry, given the one its lookup made."""
        return st

    def entries(self, parent: Inode, names: Iterable[tuple[bytes, Node]]):
        """Yield (name, node, number, lstat, EntryAttributes|None) for listing entries.

        Attributes of live inodes come from the table (a warm listing stats
        nothing); the rest are lstat'ed through one dir fd per layer, closed
        when the generator ends. ``names`` are the listing's current ones
        (ops._pass)."""
        fds: dict[int, int] = {}
        table = self.inodes
        try:
            for name, node in names:
                number = table.number_for(node)
                inode = table.live(number)
                if inode is not None and inode.attr is not None and not inode.unlinked:
                    yield name, node, number, inode.attr, inode.entry
                    continue
                top = node.top
                fd = fds.get(top)
                if fd is None:
                    fd = fds[top] = syscalls.open_beneath(self.layers[top].fd,
                                                          self.layer_path(parent, top))
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
            inode.attr = self.resolver.lstat_in(inode.node.top,
                                                self.layer_path(inode, inode.node.top))
        return inode.attr

    # -- content ---------------------------------------------------------
    def open_content(self, inode: Inode, flags: int = 0) -> int:
        """An fd on the file's content in its layer (never through a symlink)."""
        if inode.kind == LNK:
            raise OSError(40, "Too many levels of symbolic links")   # ELOOP, as O_NOFOLLOW
        top = inode.node.top
        return syscalls.open_beneath(self.layers[top].fd, self.layer_path(inode, top),
                                     syscalls.O_READ | flags)

    def readlink(self, inode: Inode) -> bytes:
        if inode.kind != LNK:
            raise OSError(22, "Invalid argument")                  # EINVAL, as readlink(2)
        with self._parent_fd(inode) as (fd, name):
            return syscalls.readlink(name, fd)

    def xattr_names(self, inode: Inode, held: int = -1) -> list[bytes]:
        """``held``: an fd on the file when no name reaches it any more (unlinked
        while held open, writable mounts): read there, never by path."""
        if held >= 0:
            return [os.fsencode(a) for a in syscalls.listxattr(held, b"")
                    if not is_overlay_private(a)]
        with self._parent_fd(inode) as (fd, name):
            return [os.fsencode(a) for a in syscalls.listxattr(fd, name)
                    if not is_overlay_private(a)]

    def getxattr(self, inode: Inode, attr: bytes, held: int = -1) -> bytes | None:
        """The value of ``attr``, None if the entry has none. A name the entry did
        not have when its names were listed is answered without a syscall: the
        kernel asks for ``security.capability`` before every first write and chown.
        ``held``: as for ``xattr_names``."""
        if held >= 0:
            return syscalls.getxattr(held, b"", os.fsdecode(attr))
        known = inode.xattrs
        if known is None or known[0] is not inode.node:
            with self._parent_fd(inode) as (fd, name):
                names = frozenset(os.fsencode(a) for a in syscalls.listxattr(fd, name))
            known = inode.xattrs = (inode.node, names)
        if attr not in known[1]:
            return None
        with self._parent_fd(inode) as (fd, name):
            return syscalls.getxattr(fd, name, os.fsdecode(attr))

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.layers[-1].fd)

    def _parent_fd(self, inode: Inode, layer: int | None = None):
        layer = inode.node.top if layer is None else layer
        return _ParentFd(self.layers[layer].fd, self.layer_path(inode, layer))


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
