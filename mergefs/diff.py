"""Diff(lower, upper): the layer that turns ``lower`` into ``upper`` (F1-F4, D4).

Both sides are merged views (a plain tree is a one-layer stack). The result is
an overlay-format layer with explicit whiteouts only: a deletion is a
whiteout of that name, never an opaque directory (D4), so the layer means the
same in either format and on any lower. Unchanged parents of changed entries
are emitted (F3) so a deep change recreates its parent chain.

Changed (F2): type, mode, uid, gid, rdev, size, mtime (content compared when
mtimes carry no nanoseconds), symlink target, and xattrs. F2 names only
``security.capability``; every content xattr is compared, so that
``Merge(A, Diff(A, B)) == B`` also holds for xattrs. atime/ctime are ignored.
"""
from __future__ import annotations

import os
import stat
from typing import Iterator, Sequence

from . import syscalls
from .attrs import Meta
from .farm import Applier, FarmStats, refuse_out_inside, staged_build
from .layer import DIR, Layer, as_layers, content_xattrs
from .plan import (DirAttrs, LayerCursors, Link, Mkdir, MergedDir, Record, Whiteout,
                   plan_subtree)
from .resolver import join

CHUNK = 1 << 20


def _same_content(a_dir: int, b_dir: int, name: bytes, size: int) -> bool:
    fa = os.open(name, syscalls.O_READ, dir_fd=a_dir)
    try:
        fb = os.open(name, syscalls.O_READ, dir_fd=b_dir)
        try:
            for off in range(0, max(size, 1), CHUNK):
                if os.pread(fa, CHUNK, off) != os.pread(fb, CHUNK, off):
                    return False
            return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def entry_changed(lo: MergedDir, up: MergedDir, name: bytes) -> bool:
    """F2 for two non-directories of the same name."""
    lo_fd, up_fd = lo.fd_of(lo.children[name].top), up.fd_of(up.children[name].top)
    a, b = syscalls.lstat(name, lo_fd), syscalls.lstat(name, up_fd)
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return False
    if (a.st_mode, a.st_uid, a.st_gid, a.st_rdev, a.st_size, a.st_mtime_ns) != \
       (b.st_mode, b.st_uid, b.st_gid, b.st_rdev, b.st_size, b.st_mtime_ns):
        return True
    if stat.S_ISLNK(a.st_mode) and syscalls.readlink(name, lo_fd) != syscalls.readlink(name, up_fd):
        return True
    if content_xattrs(lo_fd, name) != content_xattrs(up_fd, name):
        return True
    if stat.S_ISREG(a.st_mode) and a.st_mtime_ns % 1_000_000_000 == 0:
        return not _same_content(lo_fd, up_fd, name, a.st_size)
    return False


def dir_meta_changed(a: Meta, b: Meta) -> bool:
    return (a.mode, a.uid, a.gid, a.mtime_ns, a.xattrs) != (b.mode, b.uid, b.gid, b.mtime_ns, b.xattrs)


class _Frame:
    """One directory present (as a dir) on both sides, being compared.

    ``pending`` is its own Mkdir, held back until the first record under it
    (F3: unchanged parents of changed entries are emitted, outermost first).
    """
    __slots__ = ("lo", "up", "names", "pending", "emitted")

    def __init__(self, lo: MergedDir, up: MergedDir, pending: list[bytes]):
        self.lo, self.up, self.pending, self.emitted = lo, up, pending, False
        self.names = iter(sorted(lo.children.keys() | up.children.keys()))

    def close(self) -> None:
        self.lo.close()
        self.up.close()


def _flush(frames: Sequence[_Frame]) -> Iterator[Record]:
    """The held-back Mkdirs of ``frames`` (outermost first), before a record below them.

    A frame is emitted only with all its ancestors, so the ones left are the
    innermost: found from the end, O(1) per frame over the whole diff (scanning
    every frame per record would be O(depth) per record)."""
    first = len(frames)
    while first and not frames[first - 1].emitted:
        first -= 1
    for f in frames[first:]:
        yield from (Mkdir(p) for p in f.pending)
        f.pending.clear()
        f.emitted = True


def _diff_tree(lo: MergedDir, up: MergedDir) -> Iterator[Record]:
    """Records for the differences below two directories, depth first in name order.

    Iterative (a layer may be thousands of directories deep): one frame per
    level; open fds stay bounded by the layers (``release`` before descending).
    Closes ``lo`` and ``up``.
    """
    stack = [_Frame(lo, up, [])]
    try:
        while stack:
            f = stack[-1]
            name = next(f.names, None)
            if name is None:
                stack.pop()
                try:
                    meta = f.up.meta
                    if f.emitted or dir_meta_changed(f.lo.meta, meta):
                        yield from _flush(stack)      # its parents', then its own
                        yield from _flush((f,))
                        yield DirAttrs(f.up.path, meta)
                finally:
                    f.close()
                continue
            l, u = f.lo.children.get(name), f.up.children.get(name)
            path = join(f.up.path, name)
            if l is not None and u is not None and l.kind == DIR and u.kind == DIR:
                f.lo.release()         # keep open fds bounded by layers, not depth
                f.up.release()
                stack.append(_Frame(f.lo.child(name), f.up.child(name), [path]))
                continue
            if u is None:
                recs = [Whiteout(path)]
            elif l is not None and u.kind != DIR and l.kind != DIR and \
                    not entry_changed(f.lo, f.up, name):
                continue
            elif u.kind == DIR:       # new dir, or a dir over a non-dir: starts fresh (M3)
                recs = None
            else:                     # new or changed non-dir; over a dir it replaces the subtree (M2)
                recs = [Link(path, u.top, u.kind, u.inos[0])]
            yield from _flush(stack)
            if recs is None:
                f.up.release()
                yield Mkdir(path)
                yield from plan_subtree(f.up.child(name))
            else:
                yield from recs
    finally:
        for f in stack:
            f.close()


def plan_diff(lower: Sequence[Layer], upper: Sequence[Layer],
              up_cursors: LayerCursors | None = None) -> Iterator[Record]:
    """The records of Diff(lower, upper); the root's attributes always come last.
    ``up_cursors``: the walk's in ``upper`` (an applier's, to share its moves)."""
    lo_cursors, own = LayerCursors(lower), LayerCursors(upper)
    try:
        lo = MergedDir.root(lower, lo_cursors)
        up = MergedDir.root(upper, own if up_cursors is None else up_cursors)
        root_meta = up.meta
        saw_root = False
        for rec in _diff_tree(lo, up):
            if type(rec) is DirAttrs and rec.path == b"":
                saw_root = True
            elif type(rec) is Mkdir and rec.path == b"":
                continue
            yield rec
        if not saw_root:
            yield DirAttrs(b"", root_meta)
    finally:
        lo_cursors.close()
        own.close()


def _apply_diff(lower: Sequence[Layer], upper: Sequence[Layer], fd: int) -> FarmStats:
    applier = Applier(upper, fd)
    records = plan_diff(lower, upper, applier.src)
    try:
        return applier.run(records)
    finally:
        records.close()         # its cursors in ``lower``, also after an error


def write_diff(lower: Sequence[Layer | str], upper: Sequence[Layer | str],
               out: str | os.PathLike) -> FarmStats:
    """Write Diff(lower, upper) (each a stack, bottom first) as a new layer at ``out``.

    New and changed files are hardlinked from ``upper`` where they can be
    (copied on EXDEV/EMLINK, like a farm).
    """
    lower, upper = as_layers(lower), as_layers(upper)
    all_layers = lower + upper
    refuse_out_inside(all_layers, out, "diff input")
    try:
        for layer in all_layers:
            layer.fd
        return staged_build(out, lambda fd: _apply_diff(lower, upper, fd))
    finally:
        for layer in all_layers:
            layer.close()
