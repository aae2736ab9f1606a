"""The resolver: pure merge semantics over layer readers (docs/semantics.md M, D, S, H).

Layers are given bottom first, like the OCI ``layers`` array; internally the
search goes top first. A merged directory is served by a list of *sources*:
the layer indices, top first, whose same-named directory contributes children.
The list stops below an opaque directory, a whiteout, or a non-directory (M3:
a directory over a non-directory starts fresh).

``merge_listing`` is the whole rule set, as a pure function of the layers'
``LayerDir``s; the farm planner, the diff and the union mount all use it.
Paths are relative bytes (``b""`` is the root, ``b"a/b"``). Nothing follows a
symlink: a path component is only descended into when it is a real directory
in the layer that serves it (S1).
"""
from __future__ import annotations

import os
from typing import Iterable, NamedTuple, Sequence

from sortedcontainers import SortedDict

from . import syscalls
from .layer import DIR, Layer, LayerDir, as_layers, read_layer_dir


class Node(NamedTuple):
    """A merged entry: its kind and the layers serving it, top first.

    A non-directory has exactly one source (the layer whose file is shown); a
    directory has every layer that may contribute, the first one giving
    attributes. Whether one of them is opaque is only known by reading that
    directory, so the list is cut there when it is read (``merge_listing``
    stops at an opaque listing; ``Resolver.dir_layers`` gives the cut list).
    ``inos`` are the inode numbers in those layers, aligned with ``layers``.
    """
    kind: int
    layers: tuple[int, ...]
    inos: tuple[int, ...]

    @property
    def top(self) -> int:
        return self.layers[0]


def merge_listing(listings: Iterable[tuple[int, LayerDir]]) -> dict[bytes, Node]:
    """Merge one directory's listings, given top first as (layer index, LayerDir).

    M1 later wins, dirs merge; M2 a non-dir replaces a subtree; M3 a dir over a
    non-dir starts fresh; D1 whiteouts hide lower entries; D2 not the same
    layer's; D3 an opaque directory hides every lower child.
    """
    listings = list(listings)
    if len(listings) == 1:       # one layer: nothing to merge (most deep directories)
        idx, ld = listings[0]
        new = tuple.__new__
        return {name: new(Node, (e.kind, (idx,), (e.ino,))) for name, e in ld.entries.items()}
    out: dict[bytes, list] = {}
    closed: set[bytes] = set()   # names whose lower layers can no longer contribute
    for idx, ld in listings:
        for name, entry in ld.entries.items():
            if name in closed:
                continue
            cur = out.get(name)
            if cur is None:
                out[name] = [entry.kind, [idx], [entry.ino]]
                if entry.kind != DIR:
                    closed.add(name)
            elif entry.kind == DIR:          # dir under a dir: children merge
                cur[1].append(idx)
                cur[2].append(entry.ino)
            else:                            # non-dir under a dir: M3
                closed.add(name)
        closed |= ld.whiteouts
        if ld.opaque:
            break
    return {name: Node(k, tuple(ls), tuple(inos)) for name, (k, ls, inos) in out.items()}


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Resolver:
    """Point look-ups and listings of a merged view (used by union and explain).

    Holds one root fd per layer and caches nothing: each call reads the layer
    directories it needs (the union mount keeps its own cache per inode).
    """

    def __init__(self, layers: Sequence[Layer | str | bytes]):
        self.layers = as_layers(layers)
        n = len(self.layers)
        top_first = self.dir_layers(b"", Node(DIR, tuple(range(n - 1, -1, -1)), (0,) * n))
        self.root = Node(DIR, top_first, tuple(os.fstat(self.layers[i].fd).st_ino
                                               for i in top_first))

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> "Resolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def layer_dir(self, idx: int, path: bytes) -> LayerDir:
        """One layer's view of one directory (path must be a directory there)."""
        layer = self.layers[idx]
        fd = syscalls.open_beneath(layer.fd, path)
        try:
            return read_layer_dir(fd, layer.fmt)
        finally:
            os.close(fd)

    def listdir(self, path: bytes, node: Node) -> SortedDict:
        """The merged children of directory ``node`` at ``path``, sorted by name."""
        return SortedDict(merge_listing((i, self.layer_dir(i, path)) for i in node.layers))

    def dir_layers(self, path: bytes, node: Node) -> tuple[int, ...]:
        """The layers a directory really merges from: ``node.layers`` cut after
        the first opaque one (a listing cannot know that without reading the
        child directories, so ``Node.layers`` of a directory may run longer)."""
        out = []
        for idx in node.layers:
            out.append(idx)
            if self.layer_dir(idx, path).opaque:
                break
        return tuple(out)

    def lstat(self, path: bytes, node: Node) -> os.stat_result:
        """Attributes of a merged entry: those of its top layer's entry."""
        return self.lstat_in(node.top, path)

    def lstat_in(self, idx: int, path: bytes) -> os.stat_result:
        if not path:
            return os.fstat(self.layers[idx].fd)
        parent, _, name = path.rpartition(b"/")
        fd = syscalls.open_beneath(self.layers[idx].fd, parent)
        try:
            return syscalls.lstat(name, fd)
        finally:
            os.close(fd)

    def lookup(self, path: bytes) -> Node | None:
        """The merged node at ``path``, or None if the merged view has nothing there."""
        node, cur = self.root, b""
        for name in path.split(b"/") if path else ():
            if node.kind != DIR:
                return None
            node = merge_listing((i, self.layer_dir(i, cur)) for i in node.layers).get(name)
            if node is None:
                return None
            cur = join(cur, name)
        return node

