"""Consistency check of a store, and its repair (``mergefs fsck [--repair]``).

Findings, each with a severity:

* ``garbage`` (harmless, never visible; the next open sweeps it):
  staging dirs of dead processes; rows left ``deleting`` by an interrupted
  prune; directories published just before a crash (a ``meta.json`` journal,
  no row) — registered again on repair.
* ``error``: rows whose directory is missing; directories without a row and
  without a usable journal; pinned parents that do not exist; layers whose
  content no longer matches their digest.

Nothing is deleted without ``--repair``, and repair never deletes a layer
whose content changed: it marks it ``corrupt`` (kept for inspection, never
reused; re-importing the same content replaces it). A store is clean when
there is no ``error`` finding.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from . import meta
from .digest import PREFIX, hexpart, tree_digest
from .store import Store, staging_owner_alive


@dataclass
class Finding:
    severity: str     # garbage | error
    kind: str         # orphaned-staging, interrupted-prune, unregistered-dir, ...
    subject: str      # an id or a path relative to the root
    detail: str
    repaired: str = ""


def fsck(store: Store, repair: bool = False, verify_content: bool = True) -> list[Finding]:
    out: list[Finding] = []
    out += _staging(store, repair)
    out += _interrupted(store, repair)
    out += _rows_without_dirs(store, repair)
    out += _dirs_without_rows(store, repair)
    out += _missing_parents(store)
    if verify_content:
        out += _content(store, repair)
    return out


def _staging(store: Store, repair: bool) -> list[Finding]:
    out = []
    for entry in sorted(os.listdir(store.staging)):
        if staging_owner_alive(entry):
            continue
        f = Finding("garbage", "orphaned-staging", f"staging/{entry}",
                    "work of a process that died; never visible")
        if repair:
            shutil.rmtree(store.staging / entry, ignore_errors=True)
            f.repaired = "removed"
        out.append(f)
    return out


def _interrupted(store: Store, repair: bool) -> list[Finding]:
    ids = [i for (i,) in store.db.execute("SELECT id FROM snapshots WHERE state='deleting'")]
    out = [Finding("garbage", "interrupted-prune", i, "marked for deletion by a prune that "
                   "did not finish") for i in ids]
    if repair and ids:
        store.remove(ids)
        for f in out:
            f.repaired = "removal finished"
    return out


def _rows_without_dirs(store: Store, repair: bool) -> list[Finding]:
    out = []
    for row in meta.all_rows(store.db):
        d = store.dir_of(row.id)
        needs_fs = row.kind in ("layer", "diff") or row.strategy == "farm"
        missing = not d.is_dir() or (needs_fs and not (d / "fs").is_dir()) or \
            (row.kind == "active" and not (d / "upper").is_dir())
        if not missing:
            continue
        f = Finding("error", "row-without-dir", row.id, f"{row.kind} {row.description!r}: its "
                    f"directory snapshots/{hexpart(row.id)} is missing or incomplete")
        if repair:
            with meta.write(store.db):
                store.db.execute("UPDATE snapshots SET state='deleting' WHERE id=?", (row.id,))
            store.remove([row.id])
            f.repaired = "row removed (its content was already gone)"
        out.append(f)
    return out


def _dirs_without_rows(store: Store, repair: bool) -> list[Finding]:
    known = {hexpart(i) for (i,) in store.db.execute("SELECT id FROM snapshots")}
    out = []
    for d in sorted(set(os.listdir(store.snapshots)) - known):
        journal = store.snapshots / d / "meta.json"
        ok = _journal_ok(journal, d)
        if ok:
            f = Finding("garbage", "unregistered-dir", f"snapshots/{d}",
                        "published just before a crash; its journal is complete")
        else:
            f = Finding("error", "dir-without-row", f"snapshots/{d}",
                        "a directory the metadata does not know, without a usable meta.json")
        if repair:
            if ok:
                store._roll_forward([d])
                f.repaired = "registered from its journal"
            else:
                lost = store.root / "lost+found"
                os.makedirs(lost, exist_ok=True)
                os.rename(store.snapshots / d, lost / d)
                f.repaired = f"moved to lost+found/{d}"
        out.append(f)
    return out


def _journal_ok(journal, d: str) -> bool:
    try:
        data = json.loads(journal.read_text())
        return data["row"]["id"] == PREFIX + d
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _missing_parents(store: Store) -> list[Finding]:
    rows = store.db.execute(
        "SELECT p.child, p.parent FROM parents p JOIN snapshots c ON c.id = p.child "
        "LEFT JOIN snapshots s ON s.id = p.parent WHERE p.pin = 1 AND c.state = 'committed' "
        "AND (s.id IS NULL OR s.state != 'committed')")
    return [Finding("error", "missing-parent", child, f"pins {parent}, which is gone")
            for child, parent in rows]


def _content(store: Store, repair: bool) -> list[Finding]:
    out = [Finding("error", "corrupt", row.id, "marked corrupt by an earlier fsck --repair; "
                   "re-import the layer to replace it")
           for row in meta.all_rows(store.db, state="corrupt")]
    for row in meta.all_rows(store.db):
        if not row.tree_digest or not (store.fs_of(row.id)).is_dir():
            continue
        actual = tree_digest(store.fs_of(row.id)).digest
        if actual == row.tree_digest:
            continue
        f = Finding("error", "digest-mismatch", row.id, f"content digest is now {actual}, "
                    f"recorded {row.tree_digest}: the layer was modified")
        if repair:
            with meta.write(store.db):
                store.db.execute("UPDATE snapshots SET state='corrupt' WHERE id=?", (row.id,))
            f.repaired = "marked corrupt (kept; re-import to replace)"
        out.append(f)
    return out
