"""containerd's Commit by moving the upper: the active snapshot's upper becomes the layer.

containerd's Commit turns active ``key`` into committed ``name`` and the key is
gone afterwards, so the upper need not be copied (copying, diffing and
digesting it cost 0.1-1.3 s per layer, see README). ``commit_by_move``:

1. rewrites the upper in place into a layer with explicit whiteouts
   (``mergefs.explicit.make_explicit``, the rewrite the copying commit applies
   to its copy, so one upper gives one layer id either way) and digests it:
   the layer id L. The merge M = parent layers + L is the committed snapshot
   (the layer itself without a parent).
2. In one write transaction: ``commit.json`` in the active snapshot's
   directory records L and M; unless L is stored already (the same content
   committed twice is stored once: the upper then goes with the active
   snapshot), L's staged directory is renamed into ``snapshots/`` and the
   upper into it as ``fs``; M is published with the name (or the existing M
   named); the key's name and refs are dropped and the active snapshot is
   marked ``deleting``.
3. After the commit, the active snapshot's directory is removed.

A crash before the transaction commits leaves the active snapshot's row, and
``undo_interrupted`` (the next open, ``Store.reconcile``) moves the upper back
from L's directory and removes the unregistered directories of L and M: either
the active snapshot or the committed one exists, never neither. A crash after
it leaves the active snapshot ``deleting``, which the next open finishes.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from mergefs import syscalls
from mergefs.errors import AlreadyExists, FailedPrecondition, NotFound
from mergefs.layer import mark_overlay_path

from . import meta
from .digest import PREFIX, hexpart, merge_id, tree_digest
from .faults import kill_point
from .meta import Parent, Row, SnapshotKind, State, Strategy
from .store import Naming, Staged, Store

JOURNAL = "commit.json"

# Inside the commit transaction: drop the key (its name and refs) and mark what
# it held deleting; returns the ids marked. False from ``ok`` aborts the move.
DropKey = Callable[[object], list[str]]


class NotMovable(Exception):
    """The upper cannot be moved now (the caller copies it instead); says why."""


def __getattr__(name: str):
    """``NotRewritable`` (callers catch it) from ``mergefs.explicit``, loaded on first use:
    every store open imports this module (``undo_interrupted``), few commit."""
    if name == "NotRewritable":
        from mergefs.explicit import NotRewritable
        return NotRewritable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def commit_by_move(store: Store, active: Row, flat: list[str], key: str, name: str,
                   holder: str, naming: Naming, drop_key: DropKey) -> None:
    """Commit active snapshot ``active`` (key ``key``, over layers ``flat``) as ``name``."""
    from mergefs.explicit import make_explicit

    from .service import commit_description, merge_row, store_layers
    upper = store.dir_of(active.id) / "upper"
    make_explicit(upper, store_layers(store, flat))
    summary = tree_digest(upper)
    layer = Row(id=summary.digest, kind="layer", description=commit_description(key, flat),
                entries=summary.entries, bytes=summary.bytes, tree_digest=summary.digest,
                source=key)
    mid = merge_id(flat + [layer.id]) if flat else None
    staged: list[Staged] = []
    with ExitStack() as locks:
        locks.enter_context(store.build_lock(layer.id))
        if mid is not None:
            locks.enter_context(store.build_lock(mid))
        try:
            lstage = _staged_row(store, staged, "commit", layer, [])
            mstage = None
            if mid is not None:
                rows = [store.get(i) for i in flat] + [layer]
                mstage = _staged_row(store, staged, "merge", *merge_row(mid, rows,
                                                                        Strategy.UNION))
            doomed = _publish(store, active, layer, lstage, mid, mstage, name, holder, naming,
                              drop_key)
        finally:
            for s in staged:
                s.discard()
    kill_point("move-commit:after-commit")
    store.remove(doomed)


def _staged_row(store: Store, staged: list, tag: str, row: Row, parents: list[Parent]) -> Staged:
    """A staged directory holding ``meta.json`` of ``row`` (as ``Store.publish`` writes it)."""
    s = store.stage(tag)
    staged.append(s)
    _stamp(row)
    (s.path / "meta.json").write_text(json.dumps(
        {"row": asdict(row), "parents": [asdict(p) for p in parents]}))
    return s


def _stamp(row: Row) -> None:
    import time
    row.created = row.last_used = time.time()
    row.use_count = 1


def _publish(store: Store, active: Row, layer: Row, lstage: Staged, mid: str | None,
             mstage: Staged | None, name: str, holder: str, naming: Naming,
             drop_key: DropKey) -> list[str]:
    """The one write transaction of a moving commit; returns the ids to remove after it."""
    db, kdir = store.db, store.dir_of(active.id)
    try:
        with meta.write(db):
            cur = meta.get(db, active.id)
            if cur is None or cur.kind != SnapshotKind.ACTIVE or cur.state != State.COMMITTED:
                raise NotFound(f"active snapshot {active.id[:19]} was removed meanwhile")
            if meta.id_of_name(db, name) is not None:
                raise AlreadyExists(f"name {name!r} is already in use")
            (kdir / JOURNAL).write_text(json.dumps({"layer": layer.id, "merge": mid}))
            target = _place_layer(store, layer, lstage, kdir / "upper")
            if mid is None:
                store._claim(target, holder, name, naming)
            else:
                _place_merge(store, mid, mstage, holder, name, naming)
            doomed = drop_key(db)
            if active.id not in doomed:
                raise NotMovable("the active snapshot is still in use")
            kill_point("move-commit:after-move")
        return doomed
    except BaseException:
        try:
            with meta.write(db):
                undo(store, active.id)
        except Exception:      # noqa: BLE001 - the journal stays: the next open undoes it
            pass
        raise


def _place_layer(store: Store, layer: Row, lstage: Staged, upper: Path) -> Row:
    """Inside the transaction: the stored layer L, or the upper moved in as L's ``fs``."""
    db = store.db
    existing = meta.get(db, layer.id)
    if existing is not None:
        if existing.state != State.COMMITTED or not store.dir_of(layer.id).is_dir():
            raise NotMovable(f"layer {layer.id[:19]} is {existing.state}; copying instead")
        meta.touch(db, layer.id)
        return existing
    trash: list[Path] = []
    store._rename_into_place(lstage, layer.id, trash)   # an unregistered dir is replaced
    for t in trash:
        syscalls.rmtree(t, ignore_errors=True)
    fs = store.fs_of(layer.id)
    os.rename(upper, fs)
    mark_overlay_path(fs)
    meta.insert(db, layer, [])
    return layer


def _place_merge(store: Store, mid: str, mstage: Staged, holder: str, name: str,
                 naming: Naming) -> None:
    db = store.db
    existing = meta.get(db, mid)
    if existing is not None:
        if existing.state != State.COMMITTED or not store.dir_of(mid).is_dir():
            raise NotMovable(f"merge {mid[:19]} is {existing.state}; copying instead")
        store._claim(existing, holder, name, naming)
        return
    data = json.loads((mstage.path / "meta.json").read_text())
    row, parents = Row(**data["row"]), [Parent(**p) for p in data["parents"]]
    store._check_pinned(parents)
    trash: list[Path] = []
    store._rename_into_place(mstage, mid, trash)
    for t in trash:
        syscalls.rmtree(t, ignore_errors=True)
    meta.insert(db, row, parents)
    meta.add_ref(db, mid, holder)
    store._set_name(name, mid, naming)


# -- recovery ----------------------------------------------------------------------
def undo(store: Store, active_id: str) -> str | None:
    """Put back what an unfinished moving commit of ``active_id`` moved; None if nothing.

    Call inside a write transaction (``meta.write``), with the active snapshot's
    row still active: a layer or merge directory without a row was made by the
    commit and goes; the upper comes back from the layer's directory.
    """
    kdir = store.dir_of(active_id)
    try:
        data = json.loads((kdir / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    db = store.db
    lid, mid = data.get("layer"), data.get("merge")
    if lid and meta.get(db, lid) is None:
        fs = store.fs_of(lid)
        if not (kdir / "upper").exists() and fs.is_dir():
            os.rename(fs, kdir / "upper")
    for sid in (lid, mid):
        if sid and meta.get(db, sid) is None and _made_for(store, sid):
            syscalls.rmtree(store.trash(store.dir_of(sid)), ignore_errors=True)
    os.unlink(kdir / JOURNAL)
    return f"undid the interrupted commit of {active_id} (its upper is back)"


def _made_for(store: Store, sid: str) -> bool:
    """A directory of ``sid`` holding only what a moving commit puts there."""
    d = store.dir_of(sid)
    return d.is_dir() and set(os.listdir(d)) <= {"meta.json", "holders.json", "fs"}


def pending(store: Store) -> list[str]:
    """Ids of active snapshots whose directory holds a commit journal."""
    return [PREFIX + d for d in os.listdir(store.snapshots)
            if os.path.exists(store.snapshots / d / JOURNAL)]


def journal_targets(store: Store) -> set[str]:
    """Hex dirs that pending commit journals name (layer and merge): not strays."""
    out = set()
    for sid in pending(store):
        try:
            data = json.loads((store.dir_of(sid) / JOURNAL).read_text())
        except (OSError, ValueError):
            continue
        out |= {hexpart(i) for i in (data.get("layer"), data.get("merge")) if i}
    return out


def undo_interrupted(store: Store) -> list[str]:
    """At open: undo the moving commits whose process died before its transaction committed.

    The journal is written inside the committer's transaction, so under the
    write lock a journal beside a row that is still active (not ``deleting``)
    belongs to a transaction that did not commit."""
    actions = []
    for sid in pending(store):
        with meta.write(store.db):       # waits for a live committer's transaction
            row = meta.get(store.db, sid)
            if row is not None and row.state != State.DELETING:
                done = undo(store, sid)
                if done:
                    actions.append(done)
    return actions
