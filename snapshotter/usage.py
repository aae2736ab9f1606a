"""Disk usage of the store, hardlink-aware (C3), like ``buildctl du``.

Every inode is counted once, by ``(st_dev, st_ino)``, at ``st_blocks * 512``
bytes (what coreutils ``du`` counts). An inode reachable from one snapshot
only is that snapshot's **exclusive** usage; an inode reachable from several
(a layer's file and the farms linking it) is **shared** by each of them. A
farm merge's exclusive usage is therefore its directories (C3).

``Usage.total`` walks the whole root (metadata, staging, locks included) and
equals ``du -s -B1 ROOT``; ``Usage.blobs`` is the layer blobs kept for push
(``ROOT/blobs``, each kept while its layer is stored); a packed layer's blob
is its content, so it also counts in that layer's exclusive usage
(``Usage.packed`` of ``Usage.blobs``); ``Usage.overhead`` is the rest outside
snapshots.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from mergefs import syscalls

from . import blobs, meta
from .meta import Row
from .store import Store


@dataclass
class SnapshotUsage:
    row: Row
    exclusive: int = 0
    shared: int = 0
    reclaimable: bool = False
    parents: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.exclusive + self.shared


@dataclass
class Usage:
    snapshots: list[SnapshotUsage]
    total: int            # every inode under the root once: == du -s -B1 ROOT
    shared: int           # inodes reachable from more than one snapshot, once each
    overhead: int         # inodes outside snapshots/<id>/ and blobs (meta.db, staging, locks)
    inodes: dict = field(default_factory=dict, repr=False)   # id -> {(dev, ino): bytes}
    owners: dict = field(default_factory=dict, repr=False)   # (dev, ino) -> set of ids
    blobs: int = 0        # layer blobs kept for push (ROOT/blobs, snapshotter.blobs), on disk
    blob_count: int = 0
    layer_blobs: dict = field(default_factory=dict, repr=False)  # layer id -> its blobs' bytes
    packed: int = 0       # of ``blobs``: packed layers' blobs, in their snapshots' exclusive

    @property
    def exclusive(self) -> int:
        return sum(s.exclusive for s in self.snapshots)

    @property
    def reclaimable(self) -> int:
        return sum(s.exclusive for s in self.snapshots if s.reclaimable)


def inodes_under(path: str | bytes, out: dict[tuple[int, int], int]) -> None:
    """Add every inode below and including ``path`` to ``out``: (dev, ino) -> bytes on disk.

    Walked through directory fds, one per level (a layer may be deeper than PATH_MAX
    allows to name), never following a symlink."""
    try:
        st = os.lstat(path)
        out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        if not stat.S_ISDIR(st.st_mode):
            return
        fd = os.open(path, syscalls.O_DIR)
    except FileNotFoundError:
        return
    try:
        for de in syscalls.scan_tree(fd):
            st = de.stat(follow_symlinks=False)
            out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    finally:
        os.close(fd)


def _outside_snapshots(store: Store, ids: set[str], out: dict) -> None:
    """Add the inodes of the root that no snapshot directory holds (already walked)."""
    from .digest import hexpart
    for path in (store.root, store.snapshots):
        st = os.lstat(path)
        out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    for name in os.listdir(store.root):
        if name != "snapshots":
            inodes_under(os.path.join(store.root, name), out)
    walked = {hexpart(i) for i in ids}
    for name in os.listdir(store.snapshots):
        if name not in walked:
            inodes_under(os.path.join(store.snapshots, name), out)


def live_mountpoints() -> set[str]:
    """Mount points of this mount namespace (``mergefs.mounttable``)."""
    from mergefs import mounttable
    return mounttable.targets()


def holders(store: Store) -> tuple[dict[str, list[str]], set[str], dict[str, list[str]]]:
    """(refs by id, ids leased by a live mount, pinning children by parent id)."""
    refs, leases, pins = meta.holders(store.db)
    mounted = live_mountpoints()
    return refs, {i for mp, i in leases if mp in mounted}, pins


def measure(store: Store, with_total: bool = True) -> Usage:
    rows = meta.all_rows(store.db, state=None)
    refs, leased, pins = holders(store)
    per: dict[str, dict[tuple[int, int], int]] = {}
    owners: dict[tuple[int, int], set[str]] = {}
    for row in rows:
        inodes: dict[tuple[int, int], int] = {}
        inodes_under(str(store.dir_of(row.id)), inodes)
        per[row.id] = inodes
        for key in inodes:
            owners.setdefault(key, set()).add(row.id)
    out = []
    names = meta.names_by_id(store.db)
    by_layer = blobs.bytes_by_layer(store)
    packed = 0
    for row in rows:
        su = SnapshotUsage(row, parents=[p.id for p in meta.parents(store.db, row.id)],
                           names=sorted(names.get(row.id, [])), refs=refs.get(row.id, []))
        for key, size in per[row.id].items():
            if len(owners[key]) == 1:
                su.exclusive += size
            else:
                su.shared += size
        if row.packed:               # its content is its blob: freed with it
            su.exclusive += by_layer.get(row.id, 0)
            packed += by_layer.get(row.id, 0)
        su.reclaimable = not su.refs and row.id not in leased and not pins.get(row.id)
        out.append(su)
    shared_once = {k: s for inodes in per.values() for k, s in inodes.items() if len(owners[k]) > 1}
    total = 0
    if with_total:
        everything: dict[tuple[int, int], int] = {}
        for inodes in per.values():
            everything.update(inodes)
        _outside_snapshots(store, set(per), everything)
        total = sum(everything.values())
    snap_bytes = sum(su.exclusive for su in out) + sum(shared_once.values())
    count, blob_bytes = blobs.usage(store)
    return Usage(out, total, sum(shared_once.values()),
                 max(total - snap_bytes - (blob_bytes - packed), 0),
                 per, owners, blob_bytes, count, by_layer, packed)


def upper_mounted(upper: str) -> bool:
    """Something mounts an active snapshot's upper (a bind of it, an overlay over it)."""
    from mergefs import mounttable
    return bool(mounttable.users_of(upper))
