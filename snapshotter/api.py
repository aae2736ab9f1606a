"""``Snapshotter``: the store as one object with containerd's verbs, plus mergefs's.

Glossary (containerd's ``snapshots.Snapshotter``):

* **key**: the name of an active (writable) or view (read-only) snapshot,
  given by the caller of ``prepare``/``view``. Keys are opaque strings (any
  character but NUL; containerd sends ``<namespace>/<n>/<name>``); a key that
  looks like a snapshot id (``sha256:...``) is refused, because ids are
  looked up first.
* **name**: what ``commit`` gives the committed snapshot; a key and a name
  live in one namespace (a name in use cannot be a new key).
* **parent**: the name of the committed snapshot a new one is made over.
  ``stat(x).parent`` is that name, as the caller gave it.

Lifecycle: ``prepare(key, parent)`` -> mount ``mounts(key)`` -> write ->
``commit(name, key)``: the upper becomes a layer with explicit whiteouts (D4),
stored once per content (its id is its tree digest), and the committed
snapshot ``name`` is the union of the parent's layers and that layer (just
the layer without a parent); the active snapshot ``key`` is gone afterwards,
as in containerd. ``remove(name)`` drops a name and what it held; its
content goes at once unless something else still uses it (another name, a
ref, a union merge, a live mount), in which case ``prune`` reclaims it later.

Every name made through these verbs holds a ref ``name:<name>`` on its
snapshot, so ``prune`` never takes what containerd still knows;
``remove`` drops that ref. The mergefs verbs (``merge``, ``diff``,
``import_``, ``release`` ...) hold the ref of the ``holder`` given to the
constructor (``cli`` by default) until ``release``.

Threads: one ``Snapshotter`` may be used from several threads; each thread
gets its own SQLite connection (``Store.db``). ``mounts`` and ``stat``,
``walk`` and ``usage`` only read.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Iterator

from mergefs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from mergefs.mountspec import MountSpec

from . import filters as _filters
from . import meta, service
from .digest import PREFIX
from .meta import Row, SnapshotKind, State, Strategy
from .store import CLI_HOLDER, Naming, Store, is_full_id

NAME_HOLDER = "name:"       # the ref a containerd name holds on its snapshot


class Kind(enum.IntEnum):
    """containerd's snapshot kinds, with its numbering."""
    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    name: str
    parent: str | None = None
    kind: Kind = Kind.COMMITTED
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0


@dataclass(frozen=True)
class Usage:
    size: int = 0           # bytes on disk (st_blocks * 512), each inode once
    inodes: int = 0


def kind_of(row: Row) -> Kind:
    return {"view": Kind.VIEW, "active": Kind.ACTIVE}.get(row.kind, Kind.COMMITTED)


def check_key(key: str) -> None:
    """A key or name from the containerd verbs: opaque, but not empty, NUL-free, not an id."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument("a snapshot key must not be empty")
    if "\0" in key:
        raise InvalidArgument(f"snapshot key {key!r} holds a NUL character")
    if key.startswith(PREFIX):
        raise InvalidArgument(f"snapshot key {key!r} looks like a snapshot id; ids are "
                              "looked up first, so it could never be found")


def _sqlite_errors(cls):
    """Every public method (and the constructor) translates SQLite errors (``meta.translate``)."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            store = getattr(self, "store", None)
            where = str(store.root / "meta.db") if store is not None else "meta.db"
            with meta.sqlite_errors(where):
                return fn(self, *args, **kwargs)
        return wrapper
    for name, fn in list(vars(cls).items()):
        if callable(fn) and (not name.startswith("_") or name == "__init__"):
            setattr(cls, name, wrap(fn))
    return cls


@_sqlite_errors
class Snapshotter:
    """The layer store at ``root`` (default: ``snapshotter.default_root``)."""

    def __init__(self, root: str | os.PathLike | None = None, holder: str | None = CLI_HOLDER,
                 reconcile: bool = True, store: Store | None = None):
        """Open the store at ``root`` (or use the open ``store``, which ``close`` leaves open)."""
        self._owns_store = store is None
        self.store = Store(root, reconcile=reconcile) if store is None else store
        self.holder = holder

    @property
    def root(self):
        return self.store.root

    @property
    def reconciled(self) -> list[str]:
        return self.store.reconciled

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lookups (read only) -------------------------------------------------
    def _row(self, key: str) -> Row:
        """The snapshot named ``key`` (a name or key; a full id also works)."""
        db = self.store.db
        sid = key if is_full_id(key) and meta.get(db, key) else meta.id_of_name(db, key)
        row = meta.get(db, sid) if sid else None
        if row is None or row.state == State.DELETING:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row

    def _info(self, key: str, row: Row) -> Info:
        n = meta.name_row(self.store.db, key)
        if n is None:             # asked by id
            return Info(key, None, kind_of(row), {}, row.created, row.created)
        return Info(key, n.parent, kind_of(row), meta.labels_of(self.store.db, key),
                    n.created, n.updated)

    def stat(self, key: str) -> Info:
        return self._info(key, self._row(key))

    def mounts(self, key: str) -> MountSpec:
        """What to mount for ``key``, as data. Reads metadata; writes nothing but the
        trees of packed layers, unpacked on this first use (``Store.layer_tree``)."""
        row = self._row(key)
        db = self.store.db
        if row.kind == SnapshotKind.ACTIVE:
            ps = meta.parents(db, row.id)
            lowers = service.serve_dirs(self.store, self.store.get(ps[0].id)) if ps else []
            d = self.store.dir_of(row.id)
            return MountSpec(lowers=tuple(lowers), upper=str(d / "upper"), work=str(d / "work"))
        if row.kind == SnapshotKind.VIEW and not meta.parents(db, row.id):
            return MountSpec(lowers=())
        return MountSpec(lowers=tuple(service.serve_dirs(self.store, row)))

    def walk(self, *filters: str) -> Iterator[Info]:
        """Every name (key or committed name) matching any of ``filters``, by name."""
        match = _filters.matcher(filters)
        db, out = self.store.db, []
        for n in meta.name_rows(db):
            row = meta.get(db, n.id)
            if row is None or row.state == State.DELETING:
                continue
            info = Info(n.name, n.parent, kind_of(row), meta.labels_of(db, n.name),
                        n.created, n.updated)
            if match(lambda path, i=info: _field(i, path)):
                out.append(info)
        return iter(out)          # read now: the caller may iterate in another thread

    list = walk

    def usage(self, key: str) -> Usage:
        """Disk usage of what ``key`` adds: an active's upper, a layer, a commit's new layer."""
        from .usage import inodes_under
        row = self._row(key)
        d = self.store.dir_of(row.id)
        if row.kind == SnapshotKind.MERGE and row.strategy != Strategy.FARM:
            row = self.store.get(service.flatten(self.store, row)[-1])
            d = self.store.dir_of(row.id)
        if row.packed is not None:          # a packed layer: its blob is what it holds
            from .blobs import path_of
            st = os.stat(path_of(self.store, row.packed))
            return Usage(st.st_blocks * 512, 1)
        if row.kind == SnapshotKind.ACTIVE:
            path = d / "upper"
        elif row.kind == SnapshotKind.VIEW:
            return Usage()
        else:
            path = d / "fs"
        inodes: dict = {}
        inodes_under(str(path), inodes)
        return Usage(sum(inodes.values()), len(inodes))

    # -- containerd verbs that write -------------------------------------------
    def prepare(self, key: str, parent: str | None = None,
                labels: dict[str, str] | None = None) -> MountSpec:
        """A new active snapshot ``key`` over committed ``parent`` (C2: key in use fails)."""
        self._new(key, parent, labels, readonly=False)
        return self.mounts(key)

    def view(self, key: str, parent: str | None = None,
             labels: dict[str, str] | None = None) -> MountSpec:
        """A new read-only view ``key`` of committed ``parent`` (C2: key in use fails)."""
        self._new(key, parent, labels, readonly=True)
        return self.mounts(key)

    def _new(self, key: str, parent: str | None, labels, readonly: bool) -> None:
        check_key(key)
        parent_id = None
        if parent is not None:
            prow = self._row(parent)
            if prow.kind in (SnapshotKind.ACTIVE, SnapshotKind.VIEW):
                raise FailedPrecondition(f"parent {parent!r} is {prow.kind}, not committed")
            parent_id = prow.id
        if meta.id_of_name(self.store.db, key) is not None:
            raise AlreadyExists(f"key {key!r} is already in use (C2)")
        service.prepare(self.store, key, parent_id, holder=NAME_HOLDER + key, readonly=readonly,
                        naming=Naming(parent, _label_items(labels)))

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None,
               move: bool = True) -> Info:
        """Active ``key`` -> committed ``name``; the active snapshot is removed (containerd).

        The upper itself becomes the layer (``snapshotter.commit``: no copy) unless
        ``move`` is false or something still mounts it; then it is copied."""
        check_key(name)
        row = self._row(key)
        service.check_committable(row, key)
        if meta.id_of_name(self.store.db, name) is not None:
            raise AlreadyExists(f"name {name!r} is already in use")
        store, holder = self.store, NAME_HOLDER + name
        ps = meta.parents(store.db, row.id)
        flat = service.flatten(store, store.get(ps[0].id)) if ps else []
        named = meta.name_row(store.db, key)
        naming = Naming(named.parent if named else None, _label_items(labels))
        if move and self._movable(row, key):
            from .commit import NotMovable, NotRewritable, commit_by_move
            try:
                commit_by_move(store, row, flat, key, name, holder, naming,
                               lambda db: self._drop_key(db, key, row))
                return self.stat(name)
            except (NotMovable, NotRewritable) as exc:
                import logging      # only here: the CLI's start need not load it
                logging.getLogger("mergefs.snapshotter").info(
                    "commit of %r copies its upper: %s", key, exc)
        tmp = store.temporary_holder()     # holds the new layer until the name does
        try:
            layer = service.commit_dir(store, str(store.dir_of(row.id) / "upper"), flat, key,
                                       holder=tmp)
            service.merge(store, flat + [layer.id], strategy="union", name=name, holder=holder,
                          naming=naming)
        finally:
            with meta.write(store.db):
                meta.drop_holder(store.db, tmp)
        self.remove(key)
        return self.stat(name)

    def _movable(self, row: Row, key: str) -> bool:
        """Nothing mounts the upper of active ``row``: no live lease, no overlay mount of it."""
        from .usage import live_mountpoints, upper_mounted
        leases = meta.leased_at(self.store.db, row.id)
        if leases and set(leases) & live_mountpoints():
            return False
        return not upper_mounted(str(self.store.dir_of(row.id) / "upper"))

    def remove(self, key: str) -> None:
        """Drop ``key`` and what it held; delete its content now if nothing else uses it.

        C2: FailedPrecondition while a snapshot made over ``key`` exists. Given a
        full id instead of a name, the snapshot is deleted now whatever refs and
        names it has (FailedPrecondition while another snapshot pins it or a
        live mount leases it).
        """
        row = self._row(key)
        if meta.name_row(self.store.db, key) is None:       # by id: delete it now
            service.remove(self.store, row.id)
            return
        db = self.store.db
        with meta.write(db):
            doomed = self._drop_key(db, key, row)
        if doomed:
            self.store.remove(doomed)

    def _drop_key(self, db, key: str, row: Row) -> list[str]:
        """Inside a write: drop name ``key`` and its refs; mark what nothing else uses deleting."""
        from .usage import live_mountpoints
        children = meta.children_of_name(db, key)
        if children:
            raise FailedPrecondition(f"{key!r} is the parent of {len(children)} snapshot(s) "
                                     f"({', '.join(map(repr, children[:3]))}); remove those "
                                     "first (C2)")
        meta.drop_name(db, key)
        held = meta.ids_held_by(db, NAME_HOLDER + key)
        for sid in held:
            meta.drop_ref(db, sid, NAME_HOLDER + key)
        # the snapshot first: a commit's union merge unpins its new layer when it goes
        candidates = [row.id] + [i for i in held if i != row.id]
        mounted = live_mountpoints()
        return [i for i in candidates if meta.mark_deleting_if_unused(db, i, mounted)]

    def update(self, info: Info, fieldpaths: tuple[str, ...] | list[str] = ()) -> Info:
        """Change labels (``labels`` or ``labels.KEY`` paths; none: all labels)."""
        self._row(info.name)
        labels, replace = dict(info.labels or {}), True
        paths = list(fieldpaths)
        if paths:
            replace = False
            chosen: dict[str, str | None] = {}
            for p in paths:
                if p == "labels":
                    replace, chosen = True, dict(labels)
                    break
                if p.startswith("labels."):
                    k = p[len("labels."):]
                    chosen[k] = labels.get(k)     # absent from info: the label is removed
                else:
                    raise InvalidArgument(f"cannot update field {p!r}: only labels are mutable")
            labels = chosen
        db = self.store.db
        with meta.write(db):
            if meta.name_row(db, info.name) is None:
                raise NotFound(f"snapshot {info.name!r} does not exist")
            meta.set_labels(db, info.name, labels, replace=replace)
        return self.stat(info.name)

    def cleanup(self) -> None:
        """Finish what crashed work left (staging, interrupted removals); see ``Store.reconcile``."""
        self.store.reconcile()

    # -- mergefs verbs ------------------------------------------------------------
    def resolve(self, ref: str, fmt: str = "auto") -> Row:
        """A committed snapshot for a REF (full id, name, key, id prefix, or a layer dir)."""
        return service.resolve_ref(self.store, ref, fmt)

    def merge(self, refs: list[str], strategy: str = "auto", name: str | None = None,
              intent: str | None = None, fmt: str = "auto", capabilities=None, progress=None):
        """``progress(entries)``: called while a farm is built (``build_farm``)."""
        return service.merge(self.store, refs, strategy, name, intent, self.holder, fmt,
                             capabilities, progress=progress)

    def diff(self, lower: str, upper: str, name: str | None = None, fmt: str = "auto") -> Row:
        return service.diff(self.store, lower, upper, name, self.holder, fmt)

    def import_(self, src: str, fmt: str = "auto", name: str | None = None, progress=None,
                **options):
        """Import a layer dir, a layer tar, an OCI layout or a docker archive (``ImportResult``).

        Issue 11.5: while it runs, what it stores is held by a holder of its own
        (``import:<pid>-<start>-<rand>``); on success those refs become
        ``holder``'s, on failure they are dropped, so a failed multi-layer import
        leaves its layers unreferenced for prune. A crash leaves the temporary
        refs to the next open (``Store.reconcile``), which drops those of dead
        processes.
        """
        from .oci_import import import_source
        if src != "-" and not os.path.lexists(src):
            raise NotFound(f"{src!r} does not exist")
        tmp = self.store.temporary_holder()
        try:
            res = import_source(self.store, src, fmt, name, tmp, progress, **options)
            with meta.write(self.store.db):
                if self.holder:
                    meta.move_refs(self.store.db, tmp, self.holder)
            return res
        finally:
            with meta.write(self.store.db):
                meta.drop_holder(self.store.db, tmp)

    def import_path(self, src: str, fmt: str = "auto", name: str | None = None) -> list[Row]:
        return self.import_(src, fmt, name).layers

    def import_dir(self, src: str, fmt: str = "auto", name: str | None = None) -> Row:
        """One layer directory into the store (its id is its tree digest)."""
        return service.import_dir(self.store, src, fmt, name, self.holder)

    def image_config(self, ref: str) -> dict | None:
        """The OCI image config kept when REF was imported or pulled as an image, or None."""
        return service.image_config(self.store, ref)

    def commit_upper(self, upper: str, parent: str | None = None, name: str | None = None,
                     fmt: str = "auto") -> Row:
        """mergefs's commit: an upper dir, or an active snapshot kept as it is, into a layer."""
        return service.commit(self.store, upper, parent, name, self.holder, fmt)

    def export(self, ref: str, output: str, fmt: str = "dir", compression: str | None = "auto",
               progress=None) -> None:
        """``compression``: "auto" (gzip for oci, none for tar), None, "gzip", "zstd";
        ``progress(bytes)``: tar bytes written so far."""
        from .exporter import export
        export(self.store, ref, output, fmt, compression, progress)

    def release(self, ref: str) -> Row:
        return service.release(self.store, ref, self.holder)

    def mount_spec(self, ref: str, rw: bool = False, mountpoint: str | None = None,
                   key: str | None = None) -> MountSpec:
        """What ``mergefs mount REF`` serves; records a lease (and an active for ``rw``)."""
        return service.mount_spec_in(self.store, ref, rw, mountpoint, key, self.holder)

    def layers(self, row: Row) -> list[str]:
        """The layer ids a committed snapshot stands for, bottom first (M4)."""
        return service.flatten(self.store, row)

    def layer_dir(self, snapshot_id: str) -> str:
        """A layer's tree (a packed layer is unpacked first: ``Store.layer_tree``)."""
        return str(self.store.layer_tree(snapshot_id))

    def describe(self, row: Row) -> dict:
        """A snapshot's metadata as plain data (``ls``/``inspect``/``import --json``)."""
        db = self.store.db
        d = {k: getattr(row, k) for k in meta.COLUMNS}
        d["parents"] = [p.id for p in meta.parents(db, row.id)]
        d["names"] = meta.names_of(db, row.id)
        d["refs"] = meta.refs_of(db, row.id)
        return d

    def ls(self) -> list[dict]:
        """Every snapshot not being deleted, oldest first, as ``describe`` gives it."""
        rows = sorted(meta.all_rows(self.store.db, state=None), key=lambda r: r.created)
        return [self.describe(r) for r in rows if r.state != State.DELETING]

    def inspect(self, ref: str) -> dict:
        """``describe`` plus dependents, path and layers; also for a corrupt snapshot."""
        row = self.store.resolve(ref)
        d = self.describe(row)
        d["dependents"] = meta.children_of(self.store.db, row.id)
        d["path"] = str(self.store.dir_of(row.id))
        if row.kind not in ("view", "active"):
            d["layers"] = service.flatten(self.store, row)
        return d

    def prune(self, **policy):
        from .gc import prune
        return prune(self.store, **policy)

    def du(self):
        from .usage import measure
        return measure(self.store)

    def fsck(self, repair: bool = False, verify_content: bool = True):
        from .fsck import fsck
        return fsck(self.store, repair, verify_content)


def _label_items(labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((labels or {}).items()))


def _field(info: Info, path: tuple[str, ...]) -> str | None:
    head, rest = path[0], path[1:]
    if head == "labels":
        return info.labels.get(".".join(rest)) if rest else None
    if rest:
        return None
    if head == "name":
        return info.name
    if head == "parent":
        return info.parent or ""      # containerd: no parent is the empty string
    if head == "kind":
        return info.kind.name.lower()
    return None
