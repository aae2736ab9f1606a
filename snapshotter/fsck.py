"""Consistency check of a store, and its repair (``mergefs fsck [--repair]``).

Findings, each with a severity:

* ``garbage`` (harmless, never visible; the next open sweeps it):
  staging dirs of dead processes; rows left ``deleting`` by an interrupted
  prune; directories published just before a crash (a ``meta.json`` journal,
  no row) — registered again on repair; a containerd Commit that moved an
  upper and died before its transaction committed (``snapshotter.commit``) —
  the upper is moved back on repair;
  a layer blob kept for push whose file
  is gone, or a blob file no layer names (repair forgets / deletes them).
  A packed layer whose unpack renamed its tree in but did not commit
  (repair finishes it).
* ``error``: a packed layer whose blob is missing (repair removes the row),
  has the wrong size or, re-hashed, the wrong digest (repair marks it
  corrupt); stored trees without the overlay-format mark (repair adds it
  only where the tree is verifiably overlay format, see ``_unmarked``);
  rows whose directory is missing; directories without a row and
  without a usable journal; pinned parents that do not exist; layers whose
  content no longer matches their digest; a kept layer blob whose size is
  not the recorded one (repair forgets it); an image config that a
  snapshot's ``holders.json`` does not record (repair records it); names or
  refs that a snapshot's ``holders.json`` lists and the metadata lost
  (repair restores them); a damaged ``meta.db`` (``fsck_store``: repair
  keeps it aside as ``meta.db.damaged-<time>`` and rebuilds the metadata
  from the snapshot directories' ``meta.json`` and ``holders.json``).

Nothing is deleted without ``--repair``, and repair never deletes a layer
whose content changed: it marks it ``corrupt`` (kept for inspection, never
reused; re-importing the same content replaces it). A store is clean when
there is no ``error`` finding.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from mergefs import syscalls
from mergefs.errors import StoreDamaged
from mergefs.layer import mark_overlay_path, marked_format

from . import meta
from .meta import SnapshotKind, Strategy
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
    out += _interrupted_commits(store, repair)
    out += _staging(store, repair)
    out += _interrupted(store, repair)
    out += _rows_without_dirs(store, repair)
    out += _packed(store, repair, verify_content)
    out += _dirs_without_rows(store, repair)
    out += _missing_parents(store)
    out += _lost_holders(store, repair)
    out += _blobs(store, repair)
    if verify_content:
        out += _content(store, repair)
    out += _unmarked(store, repair)
    out += _unrecorded_configs(store, repair)
    return out


def _staging(store: Store, repair: bool) -> list[Finding]:
    out = []
    for entry in sorted(os.listdir(store.staging)):
        if staging_owner_alive(entry):
            continue
        f = Finding("garbage", "orphaned-staging", f"staging/{entry}",
                    "work of a process that died; never visible")
        if repair:
            syscalls.rmtree(store.staging / entry, ignore_errors=True)
            f.repaired = "removed"
        out.append(f)
    return out


def _interrupted(store: Store, repair: bool) -> list[Finding]:
    ids = meta.ids_in_state(store.db, "deleting")
    out = [Finding("garbage", "interrupted-prune", i, "marked for deletion by a prune that "
                   "did not finish") for i in ids]
    if repair and ids:
        store.remove(ids)
        for f in out:
            f.repaired = "removal finished"
    return out


def _interrupted_commits(store: Store, repair: bool) -> list[Finding]:
    """Moving commits (``snapshotter.commit``) whose process died before they committed."""
    from .commit import pending, undo
    out = []
    for sid in pending(store):
        row = meta.get(store.db, sid)
        if row is None or row.state == "deleting":
            continue
        f = Finding("garbage", "interrupted-commit", sid, "a commit that moved this active "
                    "snapshot's upper did not finish; the next open moves it back")
        if repair:
            with meta.write(store.db):
                undo(store, sid)
            f.repaired = "upper moved back"
        out.append(f)
    return out


def _rows_without_dirs(store: Store, repair: bool) -> list[Finding]:
    from .commit import pending
    out = []
    committing = set(pending(store))
    for row in meta.all_rows(store.db):
        if row.id in committing or (row.packed and store.dir_of(row.id).is_dir()):
            continue                # _interrupted_commits; _packed (no tree yet)
        d = store.dir_of(row.id)
        needs_fs = row.kind in (SnapshotKind.LAYER, SnapshotKind.DIFF) or row.strategy == Strategy.FARM
        missing = not d.is_dir() or (needs_fs and not (d / "fs").is_dir()) or \
            (row.kind == SnapshotKind.ACTIVE and not (d / "upper").is_dir())
        if not missing:
            continue
        f = Finding("error", "row-without-dir", row.id, f"{row.kind} {row.description!r}: its "
                    f"directory snapshots/{hexpart(row.id)} is missing or incomplete")
        if repair:
            with meta.write(store.db):
                meta.mark_deleting(store.db, row.id)
            store.remove([row.id])
            f.repaired = "row removed (its content was already gone)"
        out.append(f)
    return out


def _packed(store: Store, repair: bool, verify_content: bool) -> list[Finding]:
    """Packed layers (``snapshotter.packed``): the blob they will be unpacked from."""
    from . import packed
    out = []
    for row in meta.packed_rows(store.db):
        if row.state != "committed" or not store.dir_of(row.id).is_dir():
            continue                # corrupt: _content; no directory: _rows_without_dirs
        found = packed.check(store, row, verify_content)
        if found is None:
            continue
        kind, severity, detail = found
        f = Finding(severity, kind, row.id, detail)
        if repair:
            f.repaired = _repair_packed(store, row, kind)
        out.append(f)
    return out


def _repair_packed(store: Store, row, kind: str) -> str:
    from . import packed
    if kind == "interrupted-unpack":
        try:
            packed.finish(store, row)
            return "unpack finished"
        except packed.Unpackable:
            pass                    # the tree is not what was recorded: corrupt, below
    if kind in ("packed-blob-missing", "packed-blob-lost"):
        with meta.write(store.db):
            meta.mark_deleting(store.db, row.id)
        store.remove([row.id])
        return "row removed (its content was already gone; pull the image again)"
    with meta.write(store.db):
        meta.set_state(store.db, row.id, "corrupt")
    return "marked corrupt (kept; pull the image again to replace it)"


def _dirs_without_rows(store: Store, repair: bool) -> list[Finding]:
    from .commit import journal_targets
    known = {hexpart(i) for i in meta.all_ids(store.db)} | journal_targets(store)
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
                store.register_journals([d])
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
    rows = meta.missing_pinned_parents(store.db)
    return [Finding("error", "missing-parent", child, f"pins {parent}, which is gone")
            for child, parent in rows]


def _content(store: Store, repair: bool) -> list[Finding]:
    from .packed import corrupt_reason
    out = [Finding("error", "corrupt", row.id, (corrupt_reason(store, row.id) or "packed layer: "
                   "its blob is damaged") + " (unpack refused it; pull the image again to "
                   "replace it)" if row.packed else "marked corrupt by an earlier fsck "
                   "--repair; re-import the layer to replace it")
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
                meta.set_state(store.db, row.id, "corrupt")
            f.repaired = "marked corrupt (kept; re-import to replace)"
        out.append(f)
    return out


def _unmarked(store: Store, repair: bool) -> list[Finding]:
    """Stored trees without the overlay-format mark (made before it existed).

    Repair marks a tree only when it is verifiably overlay format: a layer or
    diff whose content, read as overlay format, still has its recorded tree
    digest (the digest is defined on that reading); a tree without a recorded
    digest (a farm merge) when it holds no ``.wh.*`` name, so that every reader,
    guessing or not, reads it the same way. Anything else stays unmarked.
    """
    out = []
    for row in meta.all_rows(store.db):
        fs = store.fs_of(row.id)
        if not fs.is_dir() or fs.is_symlink() or _marked(fs):
            continue
        f = Finding("error", "unmarked-layer", row.id, f"{row.kind} {row.description!r} lacks "
                    "the overlay-format mark (stored before it existed): a reader that guesses "
                    "the format would take a file named .wh.* for a whiteout")
        if repair:
            proof = _overlay_proof(row, fs)
            if proof:
                mark_overlay_path(fs)
                f.repaired = f"marked overlay format ({proof})"
            else:       # not repaired: the store stays unclean
                f.detail += ("; left unmarked: its format cannot be verified "
                             "(re-import or re-make it)")
        out.append(f)
    return out


def _marked(fs) -> bool:
    fd = os.open(fs, syscalls.O_DIR)
    try:
        return marked_format(fd) == "overlay"
    finally:
        os.close(fd)


def _overlay_proof(row, fs) -> str:
    """Why ``fs`` is certainly overlay format, or "" when that cannot be shown."""
    if row.tree_digest:
        if tree_digest(fs).digest == row.tree_digest:
            return "its content digest, read as overlay format, matches the recorded one"
        return ""
    if not _has_oci_names(fs):
        return "it holds no .wh.* name, so every reader reads it alike"
    return ""


def _has_oci_names(fs) -> bool:
    """Whether any name in the tree starts with ``.wh.`` (read as OCI, it would be a marker)."""
    fd = os.open(fs, syscalls.O_DIR)
    try:
        return any(de.name.startswith(".wh.") for de in syscalls.scan_tree(fd))
    finally:
        os.close(fd)


def _blobs(store: Store, repair: bool) -> list[Finding]:
    """Layer blobs kept for push (``snapshotter.blobs``): rows against files."""
    from . import blobs
    sev = {"blob-missing": "garbage", "blob-size": "error", "blob-unnamed": "garbage"}
    return [Finding(sev[kind], kind, subject, detail, repaired)
            for kind, subject, detail, repaired in blobs.check(store, repair)]


def _lost_holders(store: Store, repair: bool) -> list[Finding]:
    out = []
    for row in meta.all_rows(store.db, state=None):
        lost = store.unaccounted(row.id)
        if not lost:
            continue
        f = Finding("error", "lost-holders", row.id, f"holders.json lists {', '.join(lost)}, "
                    "which the metadata lacks (prune keeps it until repaired)")
        if repair:
            with meta.write(store.db):
                store.restore_holders(row.id)
            f.repaired = "restored from holders.json"
        out.append(f)
    return out


def _unrecorded_configs(store: Store, repair: bool) -> list[Finding]:
    """Image configs that ``holders.json`` does not record (stores made before it did).

    Repair rewrites the record: a rebuilt ``meta.db`` would otherwise lose them.
    """
    out = []
    for row in meta.all_rows(store.db):
        configs = meta.image_configs_of(store.db, row.id)
        recorded = (store.recorded_holders(row.id) or {}).get("image_configs") or {}
        missing = sorted(set(configs) - set(recorded))
        if not missing:
            continue
        f = Finding("error", "unrecorded-image-config", row.id, "holders.json lacks the image "
                    f"config of {', '.join(missing)} (a rebuilt meta.db would lose it)")
        if repair:
            store.record_holders(row.id)
            f.repaired = "recorded in holders.json"
        out.append(f)
    return out


def fsck_store(root, repair: bool = False, verify_content: bool = True) -> list[Finding]:
    """``fsck`` of the store at ``root``, also when its ``meta.db`` is damaged.

    A damaged ``meta.db`` is one ``error`` finding; with ``repair`` it is
    moved aside (with its -wal and -shm files) and the metadata is rebuilt
    from the snapshot directories, then checked as usual.
    """
    try:
        with Store(root, reconcile=False) as store:
            return fsck(store, repair, verify_content)
    except StoreDamaged as e:
        damaged = Finding("error", "damaged-metadata", "meta.db", str(e).split(";")[0] +
                          "; `mergefs fsck --repair` rebuilds it from the snapshot directories")
        if not repair:
            return [damaged]
    aside = _move_aside(Store.root_of(root))
    damaged.repaired = f"kept as {aside}; metadata rebuilt from the snapshot directories"
    with Store(root, reconcile=False) as store:
        return [damaged] + fsck(store, repair, verify_content)


def _move_aside(root) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    name = f"meta.db.damaged-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        src = root / f"meta.db{suffix}"
        if os.path.lexists(src):
            os.rename(src, root / f"{name}{suffix}")
    return name
