"""The applier: executes change records into a directory (the only writer).

Fallback chain for a non-directory: hardlink -> copy, where only two errnos
fall back:

* EXDEV: the layer lives on another filesystem than the farm; a hardlink
  cannot cross filesystems, so the bytes are copied.
* EMLINK: the layer's inode reached the filesystem's link limit (65,000 on
  ext4); another name for it cannot be made, so a copy stands in.

Any other error propagates (the caller's staging directory is then removed).
Copies keep hardlink groups (H1): the second name of a copied inode links to
the first copy. Directories are created, never linked; sockets are recreated
(A4); a directory's attributes are applied where its ``DirAttrs`` record
comes, which planners put after the directory's entries (A2).
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from .. import syscalls
from ..attrs import Meta, apply_meta
from ..layer import SOCK, Layer
from ..plan import DirAttrs, LayerCursors, Link, Mkdir, Record, Whiteout

# errno -> reason, for the two failures of link() that fall back to a copy.
COPY_FALLBACK = {
    errno.EXDEV: "exdev",    # layer on another filesystem: links cannot cross it
    errno.EMLINK: "emlink",  # layer inode at the filesystem's link limit
}


@dataclass
class FarmStats:
    dirs: int = 0
    links: int = 0
    copies: dict = field(default_factory=lambda: {"exdev": 0, "emlink": 0})
    recreated: int = 0          # sockets
    whiteouts: int = 0
    warnings: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class Applier:
    """Executes records against ``dst_fd`` with sources in ``layers``.

    Appliers that share ``copies`` and ``copy_lock`` (threads of one build)
    keep H1 across each other. Processes cannot share them, so an applier
    given a ``deferred`` list appends each link that needs a copy there
    instead of copying; one applier replays them all afterwards.

    Directories are reached through cursors (``syscalls.DirCursor``), one in the
    farm and one per layer (``src``, which the planner of the same walk may
    share): records come depth first, so each is O(1) opens away from the last
    and no path is walked from a root (nor limited by PATH_MAX).
    """

    def __init__(self, layers: Sequence[Layer], dst_fd: int,
                 copies: dict | None = None, copy_lock: threading.Lock | None = None,
                 deferred: list | None = None):
        self.layers = layers
        self.deferred = deferred
        self.dst = dst_fd
        self.stats = FarmStats()
        # (layer, ino) -> path of its copy; shared by the appliers of one build
        self._copies: dict[tuple[int, int], bytes] = {} if copies is None else copies
        self._copy_lock = copy_lock or threading.Lock()
        self.src = LayerCursors(layers)
        self.farm = syscalls.DirCursor(dst_fd)

    def _dir_fds(self, path: bytes, layer: int) -> tuple[int, int, bytes]:
        """(layer's parent dir fd, farm's parent dir fd, name) for ``path``."""
        parent, _, name = path.rpartition(b"/")
        src, dst = self.src[layer], self.farm      # most often already there: no call
        return (src.fd if src.path == parent else src.at(parent),
                dst.fd if dst.path == parent else dst.at(parent), name)

    def _farm_dir(self, path: bytes) -> tuple[int, bytes]:
        parent, _, name = path.rpartition(b"/")
        return self.farm.at(parent), name

    def close(self) -> None:
        for cursor in (self.src, self.farm):
            cursor.close()

    def run(self, records: Iterable[Record]) -> FarmStats:
        """``apply`` the records, then ``close``."""
        try:
            self.apply(records)
        finally:
            self.close()
        return self.stats

    def apply(self, records: Iterable[Record]) -> None:
        for rec in records:
            kind = type(rec)
            if kind is Link:
                self.link(rec)
            elif kind is Mkdir:
                dst, name = self._farm_dir(rec.path)
                syscalls.mkdir(name, dst)
                self.stats.dirs += 1
            elif kind is DirAttrs:
                if rec.path:
                    dst, name = self._farm_dir(rec.path)
                    apply_meta(dst, name, rec.meta, self.stats.warnings, rec.path)
                else:
                    apply_meta(self.dst, b"", rec.meta, self.stats.warnings)
            elif kind is Whiteout:
                dst, name = self._farm_dir(rec.path)
                syscalls.mknod(name, stat.S_IFCHR | 0o000, 0, dst)
                self.stats.whiteouts += 1
            else:
                raise TypeError(f"unknown record {rec!r}")

    def link(self, rec: Link) -> None:
        if rec.kind == SOCK:       # A4: a socket is recreated, never linked
            self.recreate(rec)
            return
        src, dst, name = self._dir_fds(rec.path, rec.layer)
        try:
            syscalls.link(name, name, src, dst)
            self.stats.links += 1
        except OSError as e:
            reason = COPY_FALLBACK.get(e.errno)
            if reason is None:
                raise
            if self.deferred is not None:
                self.deferred.append(rec)
                return
            self.copy(rec)
            self.stats.copies[reason] += 1

    def copy(self, rec: Link) -> None:
        """Copy one entry from its layer (H1: later names of the inode link to the copy)."""
        with self._copy_lock:      # one copy per inode, whichever thread gets there first
            self._copy_locked(rec)

    def _copy_locked(self, rec: Link) -> None:
        key = (rec.layer, rec.ino)
        first = self._copies.get(key)
        if first is not None:
            # by paths from the two names' common directory (one fd, as for any
            # link inside the farm): as long as the names are apart, at most
            k = syscalls.common_dir(first, rec.path)
            at = self.farm.at(first[:k])
            try:
                syscalls.link(first[k + 1:] if k else first, rec.path[k + 1:] if k else rec.path,
                              at, at)
                return
            except OSError as e:
                if e.errno != errno.EMLINK:   # the copy itself reached the link limit
                    raise
        src, dst, name = self._dir_fds(rec.path, rec.layer)
        st = syscalls.lstat(name, src)
        meta = Meta.read(src, name, st)
        if stat.S_ISREG(st.st_mode):
            syscalls.copy_file(src, name, dst, name, st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            syscalls.symlink(syscalls.readlink(name, src), name, dst)
        else:                           # fifo, char, block
            syscalls.mknod(name, st.st_mode, st.st_rdev, dst)
        apply_meta(dst, name, meta, self.stats.warnings)
        self._copies[key] = rec.path

    def recreate(self, rec: Link) -> None:
        src, dst, name = self._dir_fds(rec.path, rec.layer)
        st = syscalls.lstat(name, src)
        syscalls.mknod(name, st.st_mode, 0, dst)
        apply_meta(dst, name, Meta.read(src, name, st), self.stats.warnings)
        self.stats.recreated += 1


def merge_stats(parts: Sequence[FarmStats]) -> FarmStats:
    total = FarmStats()
    for p in parts:
        total.dirs += p.dirs
        total.links += p.links
        total.recreated += p.recreated
        total.whiteouts += p.whiteouts
        total.warnings += p.warnings
        for k, v in p.copies.items():
            total.copies[k] += v
    return total
