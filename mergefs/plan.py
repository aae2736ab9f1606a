"""The merge planner: walks a merged tree and describes the farm as change records.

Records are data; ``mergefs.farm`` executes them. The planner only reads
layers (through directory fds opened with O_NOFOLLOW, one level at a time),
and emits, depth first in name order:

* ``Mkdir(path)`` before anything inside it,
* ``Link(path, layer, kind, ino)`` for every non-directory (the applier links,
  or copies on EXDEV/EMLINK, or recreates sockets),
* ``Whiteout(path)`` (diffs only),
* ``DirAttrs(path, meta)`` after the directory's children (A2), the root last.
"""
from __future__ import annotations

import os
from typing import Iterator, NamedTuple, Sequence, Union

from . import syscalls
from .attrs import Meta
from .errors import InvalidLayer
from .layer import DIR, Layer, as_layers, read_layer_dir
from .resolver import Node, join, merge_listing


class Mkdir(NamedTuple):
    path: bytes


class Link(NamedTuple):
    path: bytes
    layer: int
    kind: int
    ino: int


class Whiteout(NamedTuple):
    path: bytes


class DirAttrs(NamedTuple):
    path: bytes
    meta: Meta


Record = Union[Mkdir, Link, Whiteout, DirAttrs]


def refuse_redirect(layer: Layer, path: bytes) -> None:
    """Farms and diffs read layers by name: a redirect (a live upper's moved
    directory, R1) would silently lose its content, so it is refused (R2)."""
    raise InvalidLayer(f"{os.fsdecode(layer.path)!r} holds a redirected directory "
                       f"({os.fsdecode(path) or '/'!r}, a live upper's rename): commit the "
                       "upper (mergefs commit) to get a layer")


class LayerCursors(dict):
    """One ``syscalls.DirCursor`` per layer index (made when first asked for), shared
    by the directories of one walk and its applier: each directory is then opened
    from the last one visited in its layer, O(1) opens per directory in a
    depth-first walk instead of a path walk from the layer root per directory."""

    def __init__(self, layers: Sequence[Layer]):
        super().__init__()
        self.layers = layers

    def __missing__(self, idx: int) -> syscalls.DirCursor:
        cursor = self[idx] = syscalls.DirCursor(self.layers[idx].fd)
        return cursor

    def close(self) -> None:
        for cursor in self.values():
            cursor.close()


class MergedDir:
    """One directory of a merged view: its children and its attributes.

    Reading it reads the directory in each contributing layer through the
    walk's ``cursors`` (reached one component at a time with O_NOFOLLOW, so
    no symlink is followed). It keeps no fd: ``fd_of`` lends the cursor's,
    valid until that cursor moves, so open fds are bounded by the number of
    layers, not by depth x layers.
    """
    __slots__ = ("layers", "path", "sources", "children", "meta", "cursors")

    def __init__(self, layers: Sequence[Layer], path: bytes, sources: Sequence[int],
                 cursors: LayerCursors):
        self.layers, self.path, self.cursors = layers, path, cursors
        listings = []
        for n, idx in enumerate(sources):
            ld = read_layer_dir(self.fd_of(idx), layers[idx].fmt)   # scandir rewinds it
            if ld.redirect is not None and idx > 0:
                refuse_redirect(layers[idx], path)
            listings.append((idx, ld))
            if ld.opaque:              # D3: lower layers no longer contribute here
                sources = sources[: n + 1]
                break
        self.meta = Meta.read(self.fd_of(sources[0]), b"")
        self.sources = tuple(sources)
        self.children: dict[bytes, Node] = merge_listing(listings)

    @classmethod
    def root(cls, layers: Sequence[Layer], cursors: LayerCursors) -> "MergedDir":
        return cls(layers, b"", range(len(layers) - 1, -1, -1), cursors)

    def fd_of(self, idx: int) -> int:
        """The directory in layer ``idx``: lent, valid until that layer's cursor moves."""
        cursor = self.cursors[idx]
        return cursor.fd if cursor.path == self.path else cursor.at(self.path)

    def child(self, name: bytes) -> "MergedDir":
        return MergedDir(self.layers, join(self.path, name), self.children[name].layers,
                         self.cursors)

    def release(self) -> None:
        """Nothing to close (kept for callers that bound fds before descending)."""

    close = release


def plan_entries(md: MergedDir) -> tuple[list[Record], list[bytes]]:
    """One directory's own records, in name order (``Mkdir`` for each subdirectory,
    ``Link`` for everything else), and the names of its subdirectories."""
    records: list[Record] = []
    subdirs: list[bytes] = []
    children, prefix = md.children, md.path + b"/" if md.path else b""
    new = tuple.__new__            # hot loop: one record per merged entry
    for name in sorted(children):
        kind, layers, inos = children[name]
        if kind == DIR:
            records.append(new(Mkdir, (prefix + name,)))
            subdirs.append(name)
        else:
            records.append(new(Link, (prefix + name, layers[0], kind, inos[0])))
    return records, subdirs


def plan_subtree(top: MergedDir) -> Iterator[Record]:
    """Records that recreate ``top``'s contents, then ``top``'s attributes."""
    stack: list[tuple[str, object]] = [("enter", top)]
    while stack:
        op, obj = stack.pop()
        if op == "done":
            yield DirAttrs(obj.path, obj.meta)
            continue
        md = obj[0].child(obj[1]) if op == "child" else obj
        md.release()
        records, subdirs = plan_entries(md)
        stack.append(("done", md))
        yield from records
        stack.extend(("child", (md, name)) for name in reversed(subdirs))


def plan_merge(layers: Sequence[Layer | str],
               cursors: LayerCursors | None = None) -> Iterator[Record]:
    """The records that build Merge(layers) (bottom first), root attributes last;
    ``cursors``: the walk's (an applier's, to share its moves), else its own."""
    layers = as_layers(layers)
    own = LayerCursors(layers) if cursors is None else None
    try:
        yield from plan_subtree(MergedDir.root(layers, own if cursors is None else cursors))
    finally:
        if own is not None:
            own.close()
