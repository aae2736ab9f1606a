"""Prune: delete unreferenced snapshots, by policy (C4).

A snapshot is **reclaimable** when no ref holds it, no live mount leases it,
and nothing that pins it stays (a union merge pins its inputs; active and view
snapshots pin their parent). Release never deletes; only prune does.

Policies (like ``buildctl prune``):

* default: reclaimable snapshots without a name (``--all``: named ones too);
* ``keep_duration``: keep those used more recently than this many seconds;
* ``keep_storage``: delete least recently used first, only until the store's
  total usage is at most this many bytes;
* ``dry_run``: report what would go and what it would free, delete nothing.

Prune never deletes a snapshot whose ``holders.json`` lists a name or ref
that the metadata does not have (a lost or emptied ``meta.db``): it keeps it
and says so (``PruneReport.kept``); ``fsck --repair`` restores them.

Removal cascades: once a union merge goes, the inputs it alone pinned become
reclaimable in the same run. Freed bytes are counted from inodes that only
the deleted snapshots reach (a layer still linked by a farm frees nothing),
plus the layer blobs kept for push (``snapshotter.blobs``), which go with
their layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import meta
from .meta import State
from .faults import kill_point
from .store import Store
from .usage import holders, measure


@dataclass
class PruneReport:
    deleted: list[str] = field(default_factory=list)
    freed: int = 0
    dry_run: bool = False
    total_before: int = 0
    kept: list[tuple[str, str]] = field(default_factory=list)   # (id, why): unaccounted holders


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d', or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def parse_size(text: str) -> int:
    """'512M', '10GB', '1.5g', '1024' (bytes); powers of 1024."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


def plan(store: Store, all_named: bool = False, keep_duration: float | None = None,
         keep_storage: int | None = None) -> tuple[list[str], int, int, dict[str, int]]:
    """(victims in deletion order, bytes they free, total usage before, bytes each adds)."""
    usage = measure(store)
    _, leased, pins = holders(store)
    now = time.time()
    candidates = sorted((su for su in usage.snapshots if su.row.id not in leased
                         and eligible(su, all_named, keep_duration, now)),
                        key=lambda su: su.row.last_used)
    victims: list[str] = []
    gains: dict[str, int] = {}
    gone: set[str] = set()
    freed = 0
    changed = True
    while changed:                  # a deletion may unpin inputs: go round until stable
        changed = False
        for su in candidates:
            sid = su.row.id
            if sid in gone or set(pins.get(sid, ())) - gone:
                continue
            if keep_storage is not None and usage.total - freed <= keep_storage:
                return victims, freed, usage.total, gains
            gone.add(sid)
            victims.append(sid)
            gains[sid] = sum(size for key, size in usage.inodes[sid].items()
                             if usage.owners[key] <= gone) + usage.layer_blobs.get(sid, 0)
            freed += gains[sid]
            changed = True
    return victims, freed, usage.total, gains


def eligible(su, all_named: bool, keep_duration: float | None, now: float) -> bool:
    if su.row.state != State.COMMITTED or su.refs or (su.names and not all_named):
        return False
    return keep_duration is None or now - su.row.last_used >= keep_duration


def prune(store: Store, all_named: bool = False, keep_duration: float | None = None,
          keep_storage: int | None = None, dry_run: bool = False) -> PruneReport:
    victims, freed, total, gains = plan(store, all_named, keep_duration, keep_storage)
    report = PruneReport(victims, freed, dry_run, total)
    if dry_run or not victims:
        return report
    with meta.write(store.db):
        marked = []
        held = meta.ids_with_refs(store.db)
        for sid in victims:            # re-check under the write lock: a ref may have come
            if sid in held or meta.pinned_by(store.db, sid):   # (pinned: by one kept below)
                continue
            lost = store.unaccounted(sid)
            if lost:                   # holders.json knows holders the metadata lost
                report.kept.append((sid, ", ".join(lost)))
                continue
            if meta.mark_deleting(store.db, sid, only_committed=True):
                marked.append(sid)
    kill_point("prune:after-mark")
    report.deleted = store.remove(marked)
    if set(report.deleted) != set(victims):    # some kept: count what the deleted ones freed
        report.freed = sum(gains[i] for i in report.deleted)
    return report
