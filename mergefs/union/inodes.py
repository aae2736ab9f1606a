"""The inode table: FUSE inode numbers for merged entries, with lookup counts.

Glossary:
- *key*: what makes two names one inode. A non-directory is keyed by the
  layer that supplies it and its ``st_ino`` there, so hardlinks of one layer
  share an inode (U2, H1); a directory by its top layer and ``st_ino``.
- *number*: the FUSE inode number, which is also the ``st_ino`` users see
  (pyfuse3 uses one for both). It is derived from the key, xino-style (as
  kernel overlayfs ``xino=on``): ``(layer + 1) << XINO_SHIFT | st_ino``, so
  it is the same in every mount of the same layers (U8). An entry copied up
  keeps the number of its origin: the upper copy records it in the xattr
  ``trusted.overlay.mergefs-ino`` (its directory is marked
  ``trusted.overlay.mergefs-inos`` so only those directories are searched),
  and the table maps the upper key to it (``alias``/``remember``). A number
  that cannot be derived (an ``st_ino`` of 2**54 or more, a layer index past
  1021) or that must not be reused (a lower hardlink whose number went to a
  copy, an upper inode number the filesystem reused while the kernel still
  holds the old file) comes from a counter in the top range, for the life of
  the mount only.
- *lookup count*: how many times the kernel was handed the inode (lookup,
  readdirplus entry, create, mkdir ...) minus what it ``forget``s. An inode
  with a zero count is dropped from the live table (its number stays).
- *lazy entry*: a non-directory the kernel was handed only by READDIRPLUS
  replies the C fast path filled (ops._readdir_direct) or LOOKUPs it answered
  (``_fastns.h``): no ``Inode`` yet, only
  ``lazy[number] = [count, parent, name, node]``, counted there by C. Any use
  of the number in this table (``live``, ``get``, ``entry``, iterating ...)
  makes its Inode first, as ``entry`` would have made it at the first listing;
  ``forget`` takes counts from the record without making one. A number is
  never both live and lazy.

An ``Inode`` knows its name by a strong reference to its parent ``Inode`` plus
its name, so a rename moves a whole subtree by updating one object, and a
path can be computed while the parent is no longer known to the kernel.
"""
from __future__ import annotations

import os
import weakref
from typing import Iterator

from ..errors import NotFound
from ..resolver import Node
from ..layer import DIR

ROOT_INODE = 1
XINO_SHIFT = 54
FALLBACK_BASE = ((1 << (64 - XINO_SHIFT)) - 1) << XINO_SHIFT     # layer bits all ones
MAX_LAYER = (1 << (64 - XINO_SHIFT)) - 2                          # layer + 1 < all ones


def xino(layer: int, st_ino: int) -> int | None:
    """The number of the entry with ``st_ino`` in ``layer``, or None if it does not fit."""
    if st_ino >> XINO_SHIFT or layer >= MAX_LAYER:
        return None
    return (layer + 1) << XINO_SHIFT | st_ino


# Bumped whenever a directory inode's parent or name changes (a rename): every
# cached ``Inode.path`` older than it is computed again (a non-directory's
# change drops only its own, ``Inode._moved``).
_renames = 0


class Inode:
    __slots__ = ("number", "_parent", "_name", "node", "lookups", "_attr", "entry", "children",
                 "unlinked", "others", "redirects", "sources", "below", "_path", "_path_at",
                 "xattrs", "named", "__weakref__")

    def __init__(self, number: int, parent: "Inode | None", name: bytes, node: Node):
        self.number = number
        self._parent = parent
        self._name = name
        self._path: bytes | None = None         # cached path, valid while _path_at == _renames
        self._path_at = -1
        self.node = node
        self.lookups = 0
        self._attr: os.stat_result | None = None  # cached lstat of the top entry
        self.entry = None                         # its EntryAttributes, built once (ops)
        self.children = None                      # cached merged listing (dirs)
        self.unlinked = False
        self.others: list | None = None           # more (parent, name)s of a hardlinked file
        # dirs, once read: the redirects of their layers, top first, as (layer,
        # "/abs/path" or "name"), and the layers really serving them (resolver.dir_sources)
        self.redirects: tuple = ()
        self.sources: tuple[int, ...] | None = None
        # dirs of a writable view: (key, names) of what the lower layers show here
        # (WritableView.lower_has; the key says which layers and paths it was read from)
        self.below: tuple | None = None
        # (node, names): the xattr names the entry serving ``node`` had when listed
        # (UnionView.getxattr); only the view's own setxattr/removexattr adds or
        # removes one, the kernel may only drop one (chown, write: security.capability)
        self.xattrs: tuple | None = None
        # dirs: how many more names are looked up one by one while no listing is at
        # hand before it is read (UnionView._at_hand); None: none looked up yet
        self.named: int | None = None

    @property
    def attr(self) -> os.stat_result | None:
        return self._attr

    @attr.setter
    def attr(self, st: os.stat_result | None) -> None:
        self._attr = st
        self.entry = None

    @property
    def kind(self) -> int:
        return self.node.kind

    @property
    def is_dir(self) -> bool:
        return self.node.kind == DIR

    @property
    def parent(self) -> "Inode | None":
        return self._parent

    @parent.setter
    def parent(self, parent: "Inode | None") -> None:
        self._moved()
        self._parent = parent

    @property
    def name(self) -> bytes:
        return self._name

    @name.setter
    def name(self, name: bytes) -> None:
        self._moved()
        self._name = name

    def _moved(self) -> None:
        """Its parent or name changes: a directory's path is part of every path
        below it (all cached paths are computed again), a non-directory's is
        only its own (a ``dpkg -i`` renames thousands of files)."""
        global _renames
        if self.node.kind == DIR:
            _renames += 1
        else:
            self._path_at = -1

    @property
    def path(self) -> bytes:
        """The path from the root ("" for the root), cached until the next rename."""
        if self._path_at == _renames:
            return self._path
        parts = []
        cur = self
        while cur._parent is not None and cur._path_at != _renames:
            parts.append(cur._name)
            cur = cur._parent
        if cur._parent is not None:       # an ancestor with a current path
            parts.append(cur._path)
        path = b"/".join(reversed(parts))
        self._path, self._path_at = path, _renames
        return path

    def __repr__(self) -> str:
        return f"Inode({self.number}, {self.path!r}, lookups={self.lookups})"


def node_key(node: Node) -> tuple[int, int]:
    return (node.layers[0], node.inos[0])


class InodeTable:
    """Live inodes by number, and the permanent key -> number map."""

    def __init__(self, root_node: Node):
        self._numbers: dict[tuple[int, int], int] = {}   # keys whose number is not xino(key)
        self._claims: dict[int, tuple[int, int]] = {}    # number -> the other key it went to
        self._next = FALLBACK_BASE + 1
        self.root = Inode(ROOT_INODE, None, b"", root_node)
        self.root.lookups = 1          # the kernel never forgets the root
        self._live: dict[int, Inode] = {ROOT_INODE: self.root}
        # Forgotten inodes that a live child still names as its parent: found
        # again, the same object comes back, so a rename seen by one is seen by all.
        # Weak references in a plain dict (a WeakValueDictionary's pop, done for
        # every inode made, costs a Python call); a reference removes itself.
        self._dropped: dict[int, weakref.ref] = {}
        # number -> [lookups, parent Inode, name, Node]: the lazy entries (glossary)
        self.lazy: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self._live) + len(self.lazy)

    def __iter__(self) -> Iterator[Inode]:
        for number in list(self.lazy):
            self._wake(number)
        return iter(self._live.values())

    def get(self, number: int) -> Inode:
        try:
            return self._live[number]
        except KeyError:
            if number in self.lazy:
                return self._wake(number)
            raise NotFound(f"inode {number} is not known") from None

    def live(self, number: int) -> Inode | None:
        inode = self._live.get(number)
        if inode is None and number in self.lazy:
            return self._wake(number)
        return inode

    def known(self, number: int) -> Inode | None:
        """The inode object of ``number`` if any exists: live, or forgotten while a
        live child still names it as its parent."""
        if (inode := self.live(number)) is not None:
            return inode
        ref = self._dropped.get(number)
        return None if ref is None else ref()

    def _drop(self, inode: Inode) -> None:
        dropped, number = self._dropped, inode.number

        def gone(ref: weakref.ref) -> None:
            if dropped.get(number) is ref:
                del dropped[number]
        dropped[number] = weakref.ref(inode, gone)

    def _made(self, number: int, parent: Inode, name: bytes, node: Node) -> Inode:
        """A new Inode, or the forgotten one of ``number`` if a child still names it."""
        ref = self._dropped.pop(number, None)
        inode = ref() if ref is not None else None
        return Inode(number, parent, name, node) if inode is None else inode

    def held(self, number: int) -> bool:
        """Does the kernel hold ``number`` (live or lazy)? Makes no Inode."""
        return number in self._live or number in self.lazy

    def _wake(self, number: int) -> Inode:
        """The Inode of lazy entry ``number``, made as ``entry`` would have made it
        at the entry's first listing and counted as often as it was listed."""
        count, parent, name, node = self.lazy.pop(number)
        inode = self._made(number, parent, name, node)
        if inode.node is not node and inode.node != node:
            inode.node, inode.attr = node, None
        inode.lookups = count
        self._live[number] = inode
        return inode

    def number_for(self, node: Node) -> int:
        key = (node[1][0], node[2][0])             # node_key and xino inlined: the hot path
        number = self._numbers.get(key)
        if number is None:
            layer, ino = key
            number = (layer + 1) << XINO_SHIFT | ino
            if ino >> XINO_SHIFT or layer >= MAX_LAYER or (
                    self._claims and self._claims.get(number, key) != key):
                # too big, or a copy took it (a hardlink name not linked to the copy)
                number = self._numbers[key] = self._fallback()
        return number

    def _fallback(self) -> int:
        number = self._next
        self._next += 1
        return number

    def alias(self, inode: Inode, node: Node) -> None:
        """``inode`` is now served by ``node`` (after copy-up): same number, new key."""
        key = node_key(node)
        self._numbers[key] = inode.number
        if inode.number != xino(*key):
            self._claims[inode.number] = key
        inode.node = node

    def recorded(self, node: Node) -> bool:
        """Must the upper entry of ``node`` record its number (not its own xino)?"""
        key = (node[1][0], node[2][0])           # node_key inlined: every new name asks
        number = self._numbers.get(key)
        return number is not None and number < FALLBACK_BASE and number != xino(*key)

    def remember(self, key: tuple[int, int], number: int) -> None:
        """A number recorded on an upper entry (read after a remount): use it for
        ``key``, unless another live inode holds it (then one for this mount only)."""
        if key in self._numbers:
            return
        holder = self.live(number)
        if holder is not None and node_key(holder.node) != key:
            number = self._fallback()
        else:
            self._claims[number] = key
        self._numbers[key] = number

    def unmap(self, node: Node) -> None:
        """A name of ``node``'s lower file not linked to its copy (a hardlink broken by
        copy-up) gets a number of its own when found: the copy claimed the file's."""
        self._numbers.pop(node_key(node), None)

    def fresh(self, layer: int, st_ino: int) -> None:
        """A new file got ``st_ino`` in ``layer`` (the upper). If the filesystem reused
        the inode of a removed file, the old key must not hand out the old inode, and
        while the kernel still holds that inode, the new file needs another number."""
        self._numbers.pop((layer, st_ino), None)
        number = xino(layer, st_ino)
        if number is not None and self.held(number):
            self._numbers[(layer, st_ino)] = self._fallback()

    def entry(self, parent: Inode, name: bytes, node: Node, number: int | None = None) -> Inode:
        """The live inode for ``name`` in ``parent``, created if needed; count +1
        (``number``: ``number_for(node)``, if the caller has it)."""
        if number is None:
            number = self.number_for(node)
        inode = self.live(number)
        if inode is None:
            inode = self._live[number] = self._made(number, parent, name, node)
        elif inode.parent is not parent or inode.name != name or inode.unlinked:
            # another hardlink name, or the same entry found again after a rename
            if not inode.unlinked and not inode.is_dir:
                inode.others = [(p, n) for p, n in inode.others or () if (p, n) != (parent, name)]
                inode.others.append((inode.parent, inode.name))
            inode.parent, inode.name, inode.unlinked = parent, name, False
        if inode.node is not node and inode.node != node:
            inode.node, inode.attr = node, None
        inode.lookups += 1
        return inode

    def named(self, parent: Inode, name: bytes, node: Node) -> Inode | None:
        """The live inode whose own name ``parent/name`` shows ``node`` (no count
        taken), or None: none live, or ``entry`` would have to change it first
        (another name of a hardlink, an entry found again, a node changed)."""
        inode = self._live.get(self.number_for(node))
        if inode is not None and inode._parent is parent and inode.node is node and \
                not inode.unlinked and inode._name == name:
            return inode
        return None

    def entry_of(self, parent: Inode, name: bytes, node: Node, number: int) -> Inode:
        """``entry`` when the caller already has the number (readdirplus)."""
        inode = self._live.get(number)
        if inode is not None and inode.parent is parent and inode.node is node \
                and not inode.unlinked:
            inode.lookups += 1
            return inode
        return self.entry(parent, name, node, number)

    def drop_name(self, inode: Inode, parent: Inode, name: bytes) -> None:
        """``parent/name`` no longer names ``inode``; it is unlinked when no known name is left."""
        others = [(p, n) for p, n in inode.others or () if p is not parent or n != name]
        if inode.parent is parent and inode.name == name:
            if others:
                inode.parent, inode.name = others.pop()
            else:
                inode.unlinked = True
        inode.others = others or None

    def move_name(self, inode: Inode, old_parent: Inode, old: bytes,
                  new_parent: Inode, new: bytes) -> None:
        """A rename: the name ``old_parent/old`` of ``inode`` is now ``new_parent/new``."""
        if inode._parent is old_parent and inode._name == old:
            inode._moved()                  # (the setters' work, done once)
            inode._parent, inode._name = new_parent, new
        elif inode.others:
            inode.others = [(new_parent, new) if (p is old_parent and n == old) else (p, n)
                            for p, n in inode.others]

    def forget(self, number: int, count: int) -> bool:
        """The kernel forgets ``count`` lookups of ``number``; True when it holds the
        number no more (a lazy entry's Inode is not made for it)."""
        inode = self._live.get(number)
        if inode is None:
            record = self.lazy.get(number)
            if record is not None:
                record[0] -= count
                if record[0] > 0:
                    return False
                del self.lazy[number]
            return True
        if inode is self.root:
            return False
        inode.lookups -= count
        if inode.lookups <= 0:
            del self._live[number]
            inode.lookups = 0
            inode.children = inode.below = inode.xattrs = None
            self._drop(inode)
            return True
        return False

    def check(self) -> list[str]:
        """Invariant violations (empty when consistent); tests end with this."""
        problems = []
        for number, inode in self._live.items():
            if inode.number != number:
                problems.append(f"{inode!r} filed under {number}")
            if inode.lookups <= 0:
                problems.append(f"{inode!r} is live with no lookups")
        for number, record in self.lazy.items():
            if number in self._live:
                problems.append(f"{number} is both live and lazy")
            if record[0] <= 0:
                problems.append(f"lazy {number} has {record[0]} lookups")
        return problems
