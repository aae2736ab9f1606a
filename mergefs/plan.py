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


class MergedDir:
    """One directory of a merged view, with an open fd per contributing layer.

    Owns its fds: ``close()`` them once the subtree is done. Children are
    opened lazily, so the open fds stay bounded by depth x layers.
    """
    __slots__ = ("layers", "path", "fds", "children")

    def __init__(self, layers: Sequence[Layer], path: bytes, fds: list[tuple[int, int]]):
        self.layers, self.path = layers, path
        listings = []
        for n, (idx, fd) in enumerate(fds):
            ld = read_layer_dir(fd, layers[idx].fmt)
            listings.append((idx, ld))
            if ld.opaque:              # D3: lower layers no longer contribute here
                for _, lower_fd in fds[n + 1:]:
                    os.close(lower_fd)
                fds = fds[: n + 1]
                break
        self.fds = fds
        self.children: dict[bytes, Node] = merge_listing(listings)

    @classmethod
    def root(cls, layers: Sequence[Layer]) -> "MergedDir":
        fds = [(i, os.dup(layers[i].fd)) for i in range(len(layers) - 1, -1, -1)]
        return cls(layers, b"", fds)

    def fd_of(self, idx: int) -> int:
        for i, fd in self.fds:
            if i == idx:
                return fd
        raise KeyError(idx)

    def child(self, name: bytes) -> "MergedDir":
        node = self.children[name]
        fds = []
        try:
            for idx in node.layers:
                fds.append((idx, syscalls.open_dir(name, self.fd_of(idx))))
        except BaseException:
            for _, fd in fds:
                os.close(fd)
            raise
        return MergedDir(self.layers, join(self.path, name), fds)

    def meta(self) -> Meta:
        return Meta.read(self.fds[0][1], b"")

    def entry_stat(self, name: bytes) -> os.stat_result:
        return syscalls.lstat(name, self.fd_of(self.children[name].top))

    def entry_meta(self, name: bytes) -> Meta:
        return Meta.read(self.fd_of(self.children[name].top), name)

    def close(self) -> None:
        for _, fd in self.fds:
            os.close(fd)
        self.fds = []


def plan_subtree(top: MergedDir) -> Iterator[Record]:
    """Records that recreate ``top``'s contents, then ``top``'s attributes.

    Takes ownership of ``top`` and closes every directory it opens, also when
    the consumer stops early.
    """
    stack: list[tuple[str, object]] = [("enter", top)]
    try:
        while stack:
            op, obj = stack.pop()
            if op == "done":
                md = obj
                meta = md.meta()
                md.close()
                yield DirAttrs(md.path, meta)
                continue
            md = obj[0].child(obj[1]) if op == "child" else obj
            stack.append(("done", md))
            subdirs = []
            for name in sorted(md.children):
                node = md.children[name]
                path = join(md.path, name)
                if node.kind == DIR:
                    yield Mkdir(path)
                    subdirs.append(name)
                else:
                    yield Link(path, node.top, node.kind, node.inos[0])
            stack.extend(("child", (md, name)) for name in reversed(subdirs))
    finally:
        for op, obj in stack:
            if op != "child":
                obj.close()


def plan_merge(layers: Sequence[Layer | str]) -> Iterator[Record]:
    """The records that build Merge(layers) (bottom first), root attributes last."""
    return plan_subtree(MergedDir.root(as_layers(layers)))
