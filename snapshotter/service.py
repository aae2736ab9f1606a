"""Store operations: import, merge, diff, commit, prepare/view, mount specs, release.

Each operation resolves refs, finds out whether the result already exists
(idempotent: same inputs -> same id -> no rebuild), builds what is missing in
``staging/`` under a per-id build lock, and publishes it (``Store.publish``).

A REF is a name, a key, an id (``sha256:...``), a unique id prefix, or a layer
directory: an argument containing ``/`` is imported implicitly (copied into
the store, in overlay format, holding no ref of its own) and then used by id.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mergefs import syscalls
from mergefs.errors import AlreadyExists, FailedPrecondition, NotFound
from mergefs.layer import Layer, mark_overlay_path
from mergefs.mountspec import MountSpec

from . import meta
from .digest import diff_id, key_id, merge_id, tree_digest
from .meta import Parent, Row, SnapshotKind, State, Strategy
from .policy import REUSE_FOR_FARM, Capabilities, Decision, MergeSpec, choose_strategy
from .store import CLI_HOLDER, Naming, Store

LAYER_KINDS = ("layer", "diff")     # kinds that are one layer in a stack
_IMPORTER = ("copy_layer", "import_dir", "publish_layer")


def __getattr__(name: str):
    """``copy_layer``, ``import_dir`` and ``publish_layer`` (``snapshotter.importer``), loaded
    on first use: a pull or a merge does not need the importer's modules."""
    if name in _IMPORTER:
        from . import importer
        return getattr(importer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
SHORT = 12


def short(snapshot_id: str) -> str:
    return snapshot_id.split(":", 1)[-1][:SHORT]


def is_path_ref(ref: str) -> bool:
    return "/" in ref


# -- refs -------------------------------------------------------------------------
def resolve_ref(store: Store, ref: str, fmt: str = "auto") -> Row:
    """A committed snapshot for REF; a path is imported implicitly (no ref held)."""
    if is_path_ref(ref):
        from .importer import import_dir
        return import_dir(store, ref, fmt, holder=None)
    row = store.resolve(ref)
    if row.state == State.CORRUPT and row.packed:
        raise FailedPrecondition(f"packed layer {short(row.id)} is corrupt (its blob did not "
                                 "unpack to what its image recorded); pull the image again")
    if row.state == State.CORRUPT:
        raise FailedPrecondition(f"snapshot {short(row.id)} failed fsck (content does not match "
                                 "its digest); re-import it")
    return row


def flatten(store: Store, row: Row) -> list[str]:
    """The layer ids a snapshot stands for, bottom first (M4: nested merges flatten)."""
    if row.kind in LAYER_KINDS:
        return [row.id]
    if row.kind == SnapshotKind.MERGE:
        return [p.id for p in meta.parents(store.db, row.id)]
    raise FailedPrecondition(f"{row.kind} snapshot {short(row.id)} is not committed content; "
                             "commit it first")


def store_layers(store: Store, ids: list[str]) -> list[Layer]:
    """Stored layers to read: always overlay format, whatever their names (issue 11);
    packed layers are unpacked first (``Store.layer_tree``)."""
    return [Layer(store.layer_tree(i), "overlay") for i in ids]


def layer_dirs(store: Store, row: Row) -> list[str]:
    """Directories of the flattened layers of ``row``, bottom first (packed ones unpacked)."""
    return [str(store.layer_tree(i)) for i in flatten(store, row)]


def release(store: Store, ref: str, holder: str = CLI_HOLDER) -> Row:
    """Drop ``holder``'s ref. Never deletes anything (C4)."""
    row = store.resolve(ref)
    with meta.write(store.db):
        meta.drop_ref(store.db, row.id, holder)
    return row


# -- merge ----------------------------------------------------------------------
@dataclass
class MergeResult:
    row: Row
    decision: Decision
    reused: bool


def merge(store: Store, refs: list[str], strategy: str = "auto", name: str | None = None,
          intent: str | None = None, holder: str | None = CLI_HOLDER, fmt: str = "auto",
          capabilities: Capabilities | None = None, naming: Naming | None = None,
          progress=None) -> MergeResult:
    """Merge(refs) bottom first; the same flattened inputs give the same id, built once.

    ``progress(entries)``: a farm build reports through it (see ``build_farm``)."""
    flat = [i for ref in refs for i in flatten(store, resolve_ref(store, ref, fmt))]
    if len(flat) == 1:              # M4: a one-input merge is that input
        store.check_name(name, flat[0])
        row = store.reuse(flat[0], holder, name, naming)
        if row is None:
            raise NotFound(f"snapshot {short(flat[0])} was removed meanwhile; retry")
        return MergeResult(row, Decision(row.kind, ("a one-input merge is that input (M4)",)), True)
    mid = merge_id(flat)
    store.check_name(name, mid)
    with store.build_lock(mid):
        row = store.reuse(mid, holder, name, naming)
        if row is not None and row.strategy == Strategy.UNION and strategy != Strategy.UNION:
            if strategy != Strategy.FARM and row.use_count >= REUSE_FOR_FARM:
                store_layers(store, flat)   # the policy counts the inputs' entries
            upgrade = _upgrade_decision(store, row, flat, strategy, intent, capabilities)
            if upgrade is not None:
                return MergeResult(_materialise(store, row, flat, progress), upgrade, False)
        if row is not None:
            return MergeResult(row, Decision(row.strategy, (
                f"reused: this merge exists as a {row.strategy} (the id names the content, "
                "not how it is served); nothing rebuilt",)), True)
        if strategy != Strategy.UNION:      # the policy counts entries: trees must be there
            store_layers(store, flat)
        decision = choose_strategy(merge_spec(store, flat, strategy),
                                   capabilities or machine_capabilities(), intent)
        return MergeResult(_build_merge(store, mid, flat, decision.strategy, holder, name,
                                        naming, progress), decision, False)


def merge_spec(store: Store, flat: list[str], requested: str = "auto") -> MergeSpec:
    rows = [store.get(i) for i in flat]
    farms = meta.farm_links(store.db, flat)
    return MergeSpec(layers=len(flat), entries=sum(r.entries for r in rows),
                     max_input_links=1 + farms, requested=requested)


def machine_capabilities() -> Capabilities:
    return Capabilities(fuse=os.access("/dev/fuse", os.R_OK | os.W_OK))


def _build_merge(store: Store, mid: str, flat: list[str], strategy: str, holder, name,
                 naming: Naming | None = None, progress=None) -> Row:
    staged = store.stage("merge")
    try:
        if strategy == Strategy.FARM:
            from mergefs.farm import build_farm
            build_farm(store_layers(store, flat), staged.path / "fs", progress=progress)
        row, parents = merge_row(mid, [store.get(i) for i in flat], strategy)
        return store.publish(staged, row, parents, "merge", holder, name, naming)
    finally:
        staged.discard()


def merge_row(mid: str, rows: list[Row], strategy: str) -> tuple[Row, list[Parent]]:
    """The row and parents of the merge ``mid`` of ``rows`` (bottom first)."""
    row = Row(id=mid, kind="merge", strategy=strategy,
              description="merge of " + ";".join(short(r.id) for r in rows),
              entries=sum(r.entries for r in rows), bytes=sum(r.bytes for r in rows))
    return row, [Parent(r.id, "input", pin=strategy == Strategy.UNION) for r in rows]


def _upgrade_decision(store: Store, row: Row, flat: list[str], strategy: str,
                      intent: str | None, caps: Capabilities | None) -> Decision | None:
    """Whether an existing union merge asked for again should become a farm, and why.

    ``--strategy farm`` always; ``auto`` once the merge was asked for often enough
    that the policy's reuse rule picks a farm (REUSE_FOR_FARM).
    """
    if strategy == Strategy.FARM:
        return Decision("farm", ("--strategy farm: this merge existed as a union; "
                                 "materialised as a farm in place (same id)",))
    spec = merge_spec(store, flat, "auto")
    spec = MergeSpec(**{**spec.__dict__, "reuse_count": row.use_count})
    if row.use_count < REUSE_FOR_FARM:
        return None
    d = choose_strategy(spec, caps or machine_capabilities(), intent)
    if d.strategy != Strategy.FARM:
        return None
    return Decision("farm", d.reasons + ("this merge existed as a union; materialised as a "
                                         "farm in place (same id)",))


def _materialise(store: Store, row: Row, flat: list[str], progress=None) -> Row:
    """Turn a union merge into a farm under the same id (it stops pinning its inputs)."""
    from mergefs.farm import build_farm
    staged = store.stage("merge")
    trash = []
    try:
        build_farm(store_layers(store, flat), staged.path / "fs", progress=progress)
        with meta.write(store.db):
            cur = store.get(row.id)
            if cur is None or cur.state != State.COMMITTED:
                raise NotFound(f"merge {short(row.id)} was removed meanwhile; retry")
            if cur.strategy == Strategy.FARM:
                return cur
            dst = store.dir_of(row.id) / "fs"
            if os.path.lexists(dst):             # left by a crash during an earlier upgrade
                trash.append(store.trash(dst))
            mark_overlay_path(staged.path / "fs")     # a stored layer (issue 11 item 1)
            os.rename(staged.path / "fs", dst)
            meta.make_farm(store.db, row.id)
        return store.get(row.id)
    finally:
        staged.discard()
        for t in trash:
            syscalls.rmtree(t, ignore_errors=True)


# -- image configs (what ``mergefs bundle`` runs) -------------------------------------
IMAGE_CONFIG_KEYS = ("architecture", "os", "variant", "config")   # not rootfs nor history


def record_image_config(store: Store, snapshot_id: str, config: dict | None,
                        name: str | None = None) -> None:
    """Keep an imported or pulled image's config for its snapshot (and the name it got)."""
    if not isinstance(config, dict):
        return
    kept = json.dumps({k: config[k] for k in IMAGE_CONFIG_KEYS if k in config}, sort_keys=True)
    with meta.write(store.db):
        meta.put_image_config(store.db, snapshot_id, kept, name)


def image_config(store: Store, ref: str) -> dict | None:
    """The image config kept for REF (a name it was imported under, or its id), or None."""
    row = store.resolve(ref)
    text = meta.image_config(store.db, ref, row.id)
    return json.loads(text) if text else None


# -- diff and commit ----------------------------------------------------------------
def _stack(store: Store, spec: str, fmt: str) -> list[str]:
    """A LOWER/UPPER argument: refs joined by ':' (bottom first), flattened to layer ids."""
    parts: list[str] = []
    for tok in spec.split(":"):
        if parts and parts[-1] == "sha256":      # "sha256:<hex>" is one ref
            parts[-1] += ":" + tok
        else:
            parts.append(tok)
    return [i for p in parts if p for i in flatten(store, resolve_ref(store, p, fmt))]


def diff(store: Store, lower: str, upper: str, name: str | None = None,
         holder: str | None = CLI_HOLDER, fmt: str = "auto") -> Row:
    """Diff(lower, upper) stored as a layer (F1-F4, D4); id from the inputs (see digest)."""
    lo, up = _stack(store, lower, fmt), _stack(store, upper, fmt)
    did = diff_id(lo, up)
    store.check_name(name, did)
    with store.build_lock(did):
        row = store.reuse(did, holder, name)
        if row is not None:
            return row
        staged = store.stage("diff")
        try:
            _write_diff(store, lo, up, staged.path)
            summary = tree_digest(staged.path / "fs")
            row = Row(id=did, kind="diff", description=f"diff of {';'.join(map(short, lo))} -> "
                      f"{';'.join(map(short, up))}", entries=summary.entries, bytes=summary.bytes,
                      tree_digest=summary.digest)
            parents = [Parent(i, "lower") for i in lo] + [Parent(i, "upper") for i in up]
            return store.publish(staged, row, parents, "diff", holder, name)
        finally:
            staged.discard()


def _write_diff(store: Store, lo: list[str], up: list[str], where: Path) -> None:
    from mergefs.diff import write_diff
    lowers = store_layers(store, lo)
    if not lowers:                  # Diff(scratch, A) == A: an empty lower
        os.mkdir(where / "scratch", 0o755)
        lowers = [Layer(where / "scratch", "overlay")]
    write_diff(lowers, store_layers(store, up), where / "fs")
    syscalls.rmtree(where / "scratch", ignore_errors=True)


def commit(store: Store, upper: str, parent: str | None = None, name: str | None = None,
           holder: str | None = CLI_HOLDER, fmt: str = "auto") -> Row:
    """Turn an overlay-format upper dir (or an active snapshot's key) into a layer.

    The result has explicit whiteouts only (D4): an opaque directory becomes
    deletions of exactly what the parent held there, and ``Merge(parent, result)
    == Merge(parent, upper)`` (``mergefs.explicit``).
    """
    upper_dir, parent_ids = _commit_source(store, upper, parent, fmt)
    return commit_dir(store, upper_dir, parent_ids, upper, name, holder)


def commit_dir(store: Store, upper_dir: str, parent_ids: list[str], what: str,
               name: str | None = None, holder: str | None = CLI_HOLDER) -> Row:
    """Store ``upper_dir`` over the parent as a layer with explicit whiteouts (D4), by digest.

    The upper is copied into staging (overlay format whatever its names, issue 11
    item 1) and rewritten there by ``make_explicit``, the rewrite a containerd
    Commit applies to the upper it moves (``snapshotter.commit``): one upper
    gives one layer id either way."""
    from mergefs.explicit import make_explicit

    from .importer import copy_layer, publish_layer
    staged = store.stage("commit")
    try:
        copy_layer(upper_dir, staged.path / "fs", "overlay", keep_redirects=True)
        make_explicit(staged.path / "fs", store_layers(store, parent_ids))
        summary = tree_digest(staged.path / "fs")
        return publish_layer(store, staged, summary, summary.digest, "layer",
                             commit_description(what, parent_ids), what, name, holder,
                             op="commit")
    finally:
        staged.discard()


def commit_description(what: str, parent_ids: list[str]) -> str:
    return f"commit of {what}" + (f" over {short(parent_ids[-1])}" if parent_ids else "")


def check_committable(row: Row, ref: str) -> None:
    """C2: only an active snapshot is committed; a view never is."""
    if row.kind == SnapshotKind.VIEW:
        raise FailedPrecondition(f"{ref!r} is a view: a view is read-only and cannot be "
                                 "committed (C2)")
    if row.kind != SnapshotKind.ACTIVE:
        raise FailedPrecondition(f"{ref!r} is a committed {row.kind}; commit takes an upper "
                                 "directory or an active snapshot")


def _commit_source(store: Store, upper: str, parent: str | None, fmt: str) -> tuple[str, list[str]]:
    parent_ids = flatten(store, resolve_ref(store, parent, fmt)) if parent else []
    if is_path_ref(upper):          # by spelling only: a key never depends on the host
        if not os.path.isdir(upper):
            raise NotFound(f"upper directory {upper!r} does not exist")
        return upper, parent_ids
    row = store.resolve(upper)
    check_committable(row, upper)
    (p,) = meta.parents(store.db, row.id)
    return str(store.dir_of(row.id) / "upper"), flatten(store, store.get(p.id))


# -- active and view snapshots (containerd's Prepare / View) ---------------------------
def prepare(store: Store, key: str, parent: str | None, holder: str | None = CLI_HOLDER,
            readonly: bool = False, naming: Naming | None = None) -> Row:
    """A new active (writable) or view (read-only) snapshot named ``key`` over ``parent``.

    C2: a key in use fails with AlreadyExists.
    """
    kind = "view" if readonly else "active"
    parent_row = resolve_ref(store, parent) if parent else None
    if parent_row is not None:
        flatten(store, parent_row)      # must be committed content
    kid = key_id(key)
    if meta.id_of_name(store.db, key) is not None:
        raise AlreadyExists(f"key {key!r} is already in use (C2)")
    staged = store.stage(kind)
    try:
        if kind == "active":
            os.mkdir(staged.path / "upper", 0o755)
            os.mkdir(staged.path / "work", 0o700)
        row = Row(id=kid, kind=kind, description=f"{kind} {key}" + (
            f" over {short(parent_row.id)}" if parent_row else ""))
        parents = [Parent(parent_row.id, "parent", pin=True)] if parent_row else []
        published = store.publish(staged, row, parents, kind, holder, key, naming)
    finally:
        staged.discard()
    if published is not row:        # a concurrent prepare took the key first
        raise AlreadyExists(f"key {key!r} is already in use (C2)")
    return published


def mount_spec_in(store: Store, ref: str, rw: bool = False, mountpoint: str | None = None,
                  key: str | None = None, holder: str | None = CLI_HOLDER) -> MountSpec:
    """What ``mergefs mount REF MNT [--rw]`` serves, as data.

    A farm is one read-only lower; a union merge is its flattened layers; a
    layer is itself; an active snapshot is its parent's lowers plus its upper.
    ``rw`` gives a writable upper in the store: the active snapshot ``key``
    (default ``mount:<mountpoint>``, or a fresh ``mount-<random>`` without a
    mountpoint). An existing active snapshot of that key over the same parent
    is reused (a remount continues the same upper); over another parent it is
    AlreadyExists (C2). The active snapshot holds ``holder``'s ref: commit it
    with ``mergefs commit KEY``, then ``release`` it. With a ``mountpoint`` a
    lease is recorded: prune keeps the snapshot while that path is mounted.
    """
    row = resolve_ref(store, ref)
    active = row if row.kind == SnapshotKind.ACTIVE else None
    base = store.get(meta.parents(store.db, row.id)[0].id) if active else row
    lowers = serve_dirs(store, base)
    if rw and active is None:
        active = _active_for_mount(store, key, mountpoint, base, holder)
    if mountpoint:
        lease(store, active or row, mountpoint)
    if active is None:
        return MountSpec(lowers=tuple(lowers))
    d = store.dir_of(active.id)
    return MountSpec(lowers=tuple(lowers), upper=str(d / "upper"), work=str(d / "work"))


def _active_for_mount(store: Store, key: str | None, mountpoint: str | None, base: Row,
                      holder: str | None = CLI_HOLDER) -> Row:
    import uuid
    key = key or (f"mount:{os.path.abspath(mountpoint)}" if mountpoint
                  else f"mount-{uuid.uuid4().hex[:12]}")
    r = meta.id_of_name(store.db, key)
    if r is not None:
        row = store.get(r)
        ps = meta.parents(store.db, row.id) if row else []
        if row and row.kind == SnapshotKind.ACTIVE and ps and ps[0].id == base.id:
            return row
        raise AlreadyExists(f"key {key!r} is already in use over another snapshot (C2)")
    return prepare(store, key, base.id, holder)


def serve_dirs(store: Store, row: Row) -> list[str]:
    """The read-only directories that serve a committed snapshot, bottom first."""
    if row.kind == SnapshotKind.MERGE and row.strategy == Strategy.FARM:
        return [str(store.fs_of(row.id))]
    if row.kind == SnapshotKind.VIEW:
        return serve_dirs(store, store.get(meta.parents(store.db, row.id)[0].id))
    return layer_dirs(store, row)


def lease(store: Store, row: Row, mountpoint: str) -> None:
    with meta.write(store.db):
        meta.add_lease(store.db, os.path.abspath(mountpoint), row.id, os.getpid())


def remove(store: Store, ref: str) -> Row:
    """Delete one snapshot now, whatever refs it has (containerd's Remove).

    C2: fails with FailedPrecondition while another snapshot pins it (a union
    merge over it, an active or view snapshot on it) or a live mount leases it.
    """
    from .usage import live_mountpoints
    row = store.resolve(ref)
    mounted = live_mountpoints()
    with meta.write(store.db):
        pinned = meta.pinned_by(store.db, row.id)
        if pinned:
            raise FailedPrecondition(f"{short(row.id)} is needed by {len(pinned)} snapshot(s) "
                                     f"({', '.join(map(short, pinned))}); remove those first")
        leases = [mp for mp in meta.leased_at(store.db, row.id) if mp in mounted]
        if leases:
            raise FailedPrecondition(f"{short(row.id)} is mounted at {leases[0]}")
        meta.mark_deleting(store.db, row.id)
    store.remove([row.id])
    return row
