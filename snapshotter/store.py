"""The layer store: a root directory, its metadata, staging and publish-by-rename.

Layout of a store root::

    meta.db             SQLite (WAL): snapshots, parents, names, labels, refs, leases
    snapshots/<hex>/    one directory per snapshot, named by its id's hex part:
        meta.json       the row as published (a journal for crash recovery)
        holders.json    its names (with labels), refs and image configs, rewritten in every
                        transaction that changes them: a lost or damaged meta.db
                        is rebuilt from meta.json + holders.json
        fs/             the tree (layer, diff, farm merge); none yet for a packed
                        layer (``snapshotter.packed``: its blob is in blobs/)
        upper/ work/    an active snapshot's writable upper and overlay work dir
    blobs/sha256/<hex>  compressed layer blobs (``snapshotter.blobs``): kept for push, and
                        the content of packed layers
    staging/<pid>-<start>-<rand>/   work in progress of one live process
    locks/<hex>.lock    per-id build locks (flock), so concurrent builders wait
    locks/meta.lock     held while a process opens meta.db (creation, WAL switch)

Lifecycle (docs/architecture.md: stage, rename, then delete):

* build in ``staging/``; then, in one write transaction: insert the row and
  rename the staged directory to ``snapshots/<hex>``. A crash before the rename
  leaves only a staging dir of a dead process (swept at open); a crash between
  rename and commit leaves a directory with a ``meta.json`` and no row, rolled
  forward at the next open (it was complete).
* removal: mark rows ``deleting`` (commit), then per snapshot, in one
  transaction, rename its directory into ``staging/`` and delete its row; the
  directory is removed after the commit. Interrupted removals are finished at
  open.
* C1: a builder that finds the id already committed when it publishes (it lost
  a race) adds its ref to the existing snapshot and discards its staging copy.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from mergefs import syscalls
from mergefs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

from . import meta
from .digest import PREFIX, hexpart
from .faults import kill_point
from .meta import Parent, Row, State
from .paths import default_root, proc_start as _proc_start, staging_name  # noqa: F401
from .paths import staging_owner_alive  # noqa: F401 (fsck's)

CLI_HOLDER = "cli"
TEMPORARY = "import"        # tag of temporary holders (``Store.temporary_holder``)
HOLDERS = "holders.json"    # beside meta.json: names, labels, refs, image configs
HEX_MIN_PREFIX = 4
ID_SHAPED_HEX = 12          # a name of this many hex digits or more looks like an id
HEX = frozenset("0123456789abcdef")


def is_full_id(ref: str) -> bool:
    return ref.startswith(PREFIX) and len(ref) == len(PREFIX) + 64 and set(ref[7:]) <= HEX


def check_name_shape(name: str) -> None:
    """Refuse names that are empty, hold a control character, or look like an id.

    Like Docker's reference rules: an id (``sha256:...``) or a run of 12 or
    more hex digits (what ``ls`` and messages print as a short id) as a name
    would shadow, or be mistaken for, another snapshot's id.
    """
    from mergefs.errors import InvalidArgument
    if not name:
        raise InvalidArgument("a name must not be empty")
    bad = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InvalidArgument(f"name {name!r} holds a control character ({bad!r})")
    if name.startswith(PREFIX) or (len(name) >= ID_SHAPED_HEX and set(name) <= HEX):
        raise InvalidArgument(f"name {name!r} looks like a snapshot id; names must not "
                              "(they would shadow ids)")


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if missing) while the block runs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Naming:
    """What a new name records besides its id: containerd's parent name and labels."""
    parent: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


class Staged:
    """A directory under ``staging/`` owned by this process until published or discarded."""

    def __init__(self, store: "Store", tag: str):
        self.name = staging_name(tag, store._start)
        self.path = store.staging / self.name
        os.mkdir(self.path, 0o700)

    def discard(self) -> None:
        syscalls.rmtree(self.path, ignore_errors=True)


class Store:
    """A store opened at ``root``; reconciled at open unless ``reconcile=False`` (fsck)."""

    def __init__(self, root: str | os.PathLike | None = None, reconcile: bool = True):
        self.root = self.root_of(root)
        self.snapshots = self.root / "snapshots"
        self.staging = self.root / "staging"
        self.locks = self.root / "locks"
        if os.path.lexists(self.root) and not self.root.is_dir():
            raise InvalidArgument(f"store root {str(self.root)!r} is not a directory "
                                  "(give --root a directory, or a path that does not exist)")
        for d in (self.root, self.snapshots, self.staging, self.locks):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._start = _proc_start(os.getpid())
        # Creating the database and switching it to WAL race between processes,
        # and SQLite's busy timeout does not cover two connections switching at
        # once (one fails with "database is locked" at once): serialise opening.
        self._local = threading.local()
        self._conns: list = []
        self._conns_lock = threading.Lock()
        self.reconciled: list[str] = []
        with meta.sqlite_errors(str(self.root / "meta.db")):
            self.db                     # open (and create or migrate) now, in this thread
            if reconcile:
                self.reconciled = self.reconcile()

    @staticmethod
    def root_of(root: str | os.PathLike | None) -> Path:
        return Path(default_root(os.fspath(root) if root else None)).absolute()

    @property
    def db(self):
        """This thread's connection to ``meta.db`` (SQLite connections are not shared)."""
        db = getattr(self._local, "db", None)
        if db is None:
            with _flock(self.locks / "meta.lock"):
                db = meta.connect(str(self.root / "meta.db"))
            meta.track_holders(db, self._write_holders)
            self._local.db = db
            with self._conns_lock:
                self._conns.append(db)
        return db

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for db in conns:
            meta.untrack(db)
            db.close()
        self._local = threading.local()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- paths -------------------------------------------------------------
    def dir_of(self, snapshot_id: str) -> Path:
        return self.snapshots / hexpart(snapshot_id)

    def fs_of(self, snapshot_id: str) -> Path:
        """Where a snapshot's tree is (a path only: a packed layer has none yet)."""
        return self.dir_of(snapshot_id) / "fs"

    def layer_tree(self, snapshot_id: str) -> Path:
        """The directory of a stored tree for reading, a packed layer unpacked first.

        The one place the store hands out a layer's directory: merges, mounts,
        views, the containerd service, export, diff, commit and push all get
        their trees here (``snapshotter.packed``)."""
        from . import packed
        return packed.tree(self, snapshot_id)

    # -- lookups -----------------------------------------------------------
    def get(self, snapshot_id: str) -> Row | None:
        return meta.get(self.db, snapshot_id)

    def resolve(self, ref: str) -> Row:
        """A snapshot by full id, name, key, or unique id prefix (in that order).

        A full id is looked up first so that no name can shadow it; names are
        refused if id-shaped (``check_name_shape``), but an old store may hold one.
        """
        snapshot_id = ref if is_full_id(ref) and meta.get(self.db, ref) else \
            meta.id_of_name(self.db, ref)
        if snapshot_id is None:
            snapshot_id = self._by_id(ref)
        row = meta.get(self.db, snapshot_id)
        if row is None or row.state == State.DELETING:
            raise NotFound(f"snapshot {ref!r} does not exist")
        return row

    def _by_id(self, ref: str) -> str:
        hexp = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
        if len(hexp) < HEX_MIN_PREFIX or any(c not in "0123456789abcdef" for c in hexp):
            raise NotFound(f"no snapshot named {ref!r} (an id prefix needs at least "
                           f"{HEX_MIN_PREFIX} hex digits)")
        hits = meta.ids_by_prefix(self.db, PREFIX + hexp)
        if not hits:
            raise NotFound(f"snapshot {ref!r} does not exist")
        if len(hits) > 1:
            raise NotFound(f"id prefix {ref!r} is ambiguous; give more digits")
        return hits[0]

    # -- building ----------------------------------------------------------
    def stage(self, tag: str) -> Staged:
        return Staged(self, tag)

    def temporary_holder(self, tag: str = TEMPORARY) -> str:
        """A ref holder owned by this process: ``<tag>:<pid>-<start>-<rand>``.

        Refs of such holders whose process is gone are dropped at open.
        """
        return f"{tag}:{os.getpid()}-{self._start}-{os.urandom(6).hex()}"

    def build_lock(self, snapshot_id: str):
        """Serialise builders of one id, so N concurrent makers build it once."""
        return _flock(self.locks / f"{hexpart(snapshot_id)}.lock")

    def reuse(self, snapshot_id: str, holder: str | None = CLI_HOLDER,
              name: str | None = None, naming: "Naming | None" = None) -> Row | None:
        """If ``snapshot_id`` is committed: take a ref, set the name, return it (no rebuild)."""
        with meta.write(self.db):
            row = meta.get(self.db, snapshot_id)
            if row is None or row.state != State.COMMITTED or not self.dir_of(snapshot_id).is_dir():
                return None
            self._claim(row, holder, name, naming)
        return row

    def _claim(self, row: Row, holder: str | None, name: str | None,
               naming: "Naming | None" = None) -> None:
        meta.touch(self.db, row.id)
        if holder:
            meta.add_ref(self.db, row.id, holder)
        if name is not None:
            self._set_name(name, row.id, naming)

    def _set_name(self, name: str, snapshot_id: str, naming: "Naming | None" = None) -> None:
        naming = naming or Naming()
        fresh = meta.id_of_name(self.db, name) is None
        now = time.time()             # one instant: a new name's created == updated (containerd)
        if not meta.add_name(self.db, name, snapshot_id, naming.parent, now=now):
            cur = meta.id_of_name(self.db, name)
            raise AlreadyExists(f"name {name!r} already names {cur[:19]}")
        if fresh and naming.labels:
            meta.set_labels(self.db, name, dict(naming.labels), now=now)

    def check_name(self, name: str | None, snapshot_id: str) -> None:
        """Fail early (before building) if ``name`` is taken by another snapshot."""
        if name is not None:
            check_name_shape(name)
            cur = meta.id_of_name(self.db, name)
            if cur is not None and cur != snapshot_id:
                raise AlreadyExists(f"name {name!r} already names {cur[:19]}")

    def publish(self, staged: Staged, row: Row, parents: list[Parent], op: str,
                holder: str | None = CLI_HOLDER, name: str | None = None,
                naming: "Naming | None" = None, journal: dict | None = None,
                before_rename=None) -> Row:
        """Make ``staged`` the snapshot ``row`` (C1: if it exists, reuse it and discard ours).

        ``journal``: more keys for ``meta.json``; ``before_rename(db)``: called inside
        the transaction just before the directory is renamed into place (a packed
        layer's blob is moved in there)."""
        now = time.time()
        row.created = row.last_used = now
        row.use_count = 1
        (staged.path / "meta.json").write_text(json.dumps(
            {"row": asdict(row), "parents": [asdict(p) for p in parents], **(journal or {})}))
        kill_point(f"{op}:after-build")
        trash: list[Path] = []
        try:
            with meta.write(self.db):
                existing = meta.get(self.db, row.id)
                if existing is not None and existing.state == State.COMMITTED \
                        and self.dir_of(row.id).is_dir():
                    self._claim(existing, holder, name, naming)
                    return existing
                self._check_pinned(parents)
                if existing is not None:          # deleting or corrupt: finish removing it
                    trash += self._unlink_snapshot(row.id)
                _mark_overlay(staged.path / "fs")
                if before_rename is not None:
                    before_rename(self.db)
                self._rename_into_place(staged, row.id, trash)
                kill_point(f"{op}:after-publish-dir")
                meta.insert(self.db, row, parents)
                if holder:
                    meta.add_ref(self.db, row.id, holder)
                if name is not None:
                    self._set_name(name, row.id, naming)
            return row
        finally:
            staged.discard()     # no-op once renamed into place
            for t in trash:
                syscalls.rmtree(t, ignore_errors=True)

    def _check_pinned(self, parents: list[Parent]) -> None:
        """Inside the publish transaction: what we pin must still be there (a prune may race)."""
        for p in parents:
            if p.pin:
                cur = meta.get(self.db, p.id)
                if cur is None or cur.state != State.COMMITTED:
                    raise FailedPrecondition(f"input {p.id[:19]} was removed meanwhile; retry")

    def _rename_into_place(self, staged: Staged, snapshot_id: str, trash: list[Path]) -> None:
        dst = self.dir_of(snapshot_id)
        try:
            syscalls.rename_noreplace(staged.path, dst)
        except FileExistsError:
            # A directory without a row: left by a crash between rename and commit.
            # We hold the write lock, so no live publisher owns it; ours replaces it.
            trash.append(self.trash(dst))
            syscalls.rename_noreplace(staged.path, dst)

    def trash(self, path: Path) -> Path:
        """Move ``path`` under ``staging/`` (as this process's); the caller deletes it later."""
        t = self.staging / f"{os.getpid()}-{self._start}-trash-{os.urandom(6).hex()}"
        os.rename(path, t)
        return t

    def _unlink_snapshot(self, snapshot_id: str) -> list[Path]:
        """Inside a write transaction: move the directory aside and delete the row."""
        trash = []
        if os.path.lexists(self.dir_of(snapshot_id)):
            trash.append(self.trash(self.dir_of(snapshot_id)))
        meta.delete(self.db, snapshot_id)
        return trash

    # -- holders recorded beside each snapshot (issue 11 item 6) -------------
    def _write_holders(self, db, ids: list[str]) -> None:
        """Inside a write, before COMMIT: rewrite ``holders.json`` of each snapshot in ``ids``."""
        for sid in ids:
            d = self.dir_of(sid)
            if meta.get(db, sid) is None or not d.is_dir():
                continue                    # being removed: its directory goes too
            tmp = d / f"{HOLDERS}.tmp"
            tmp.write_text(json.dumps(meta.holders_of(db, sid)))
            os.rename(tmp, d / HOLDERS)

    def record_holders(self, snapshot_id: str) -> None:
        """Rewrite ``holders.json`` of ``snapshot_id`` from the metadata now."""
        with meta.write(self.db):
            self._write_holders(self.db, [snapshot_id])

    def recorded_holders(self, snapshot_id: str) -> dict | None:
        """The ``holders.json`` beside a snapshot, or None (none written, or unreadable)."""
        try:
            data = json.loads((self.dir_of(snapshot_id) / HOLDERS).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("id") == snapshot_id else None

    def unaccounted(self, snapshot_id: str) -> list[str]:
        """Holders its ``holders.json`` lists that the metadata lacks (lost metadata)."""
        data = self.recorded_holders(snapshot_id)
        return meta.unaccounted(self.db, data) if data else []

    def restore_holders(self, snapshot_id: str) -> list[str]:
        """Inside a write: restore names, labels, refs, image configs from ``holders.json``."""
        data = self.recorded_holders(snapshot_id)
        return meta.restore_holders(self.db, data) if data else []

    # -- removal -----------------------------------------------------------
    def remove(self, ids: list[str]) -> list[str]:
        """Delete snapshots already marked ``deleting``; returns the ids removed."""
        done = []
        for i, snapshot_id in enumerate(ids):
            trash = []
            with meta.write(self.db):
                row = meta.get(self.db, snapshot_id)
                if row is None or row.state != State.DELETING:
                    continue      # a builder republished it meanwhile
                trash = self._unlink_snapshot(snapshot_id)
                if i == 0:
                    kill_point("prune:after-trash")
            for t in trash:
                syscalls.rmtree(t, ignore_errors=True)
            done.append(snapshot_id)
        if done:                  # a layer's blobs go with it (snapshotter.blobs)
            from . import blobs
            blobs.forget(self, done)
        return done

    # -- reconcile at open ---------------------------------------------------
    def reconcile(self) -> list[str]:
        """Finish what crashed processes left: returns one line per action taken."""
        from .commit import undo_interrupted
        actions = undo_interrupted(self)     # first: its directories are not strays
        for entry in os.listdir(self.staging):
            if not staging_owner_alive(entry):
                syscalls.rmtree(self.staging / entry, ignore_errors=True)
                actions.append(f"swept staging/{entry}")
        dead = [h for h in meta.holders_named(self.db, TEMPORARY + ":")
                if not staging_owner_alive(h.split(":", 1)[1])]
        if dead:
            with meta.write(self.db):
                for h in dead:
                    meta.drop_holder(self.db, h)
            actions += [f"dropped the refs of {h} (its process is gone)" for h in dead]
        deleting = meta.ids_in_state(self.db, "deleting")
        if deleting:
            self.remove(deleting)
            actions += [f"finished removing {i}" for i in deleting]
        known = {hexpart(i) for i in meta.all_ids(self.db)}
        strays = [d for d in os.listdir(self.snapshots) if d not in known]
        if strays:
            actions += self.register_journals(strays)
        return actions

    def register_journals(self, strays: list[str]) -> list[str]:
        """Register directories without a row from their ``meta.json`` (and ``holders.json``)."""
        actions = []
        with meta.write(self.db):
            for d in strays:
                journal = self.snapshots / d / "meta.json"
                if meta.get(self.db, PREFIX + d) is not None or not journal.is_file():
                    continue      # published meanwhile, or not ours to guess (fsck reports)
                try:
                    data = json.loads(journal.read_text())
                    row = Row(**data["row"])
                    parents = [Parent(**p) for p in data["parents"]]
                except (ValueError, TypeError, KeyError):
                    continue
                if hexpart(row.id) != d:
                    continue
                meta.insert(self.db, row, parents)
                from .packed import restore_blob_row
                restore_blob_row(self.db, data)
                restored = self.restore_holders(row.id)
                actions.append(f"registered {row.id} from its journal" + (
                    f", with {', '.join(restored)}" if restored else ""))
        return actions


def _mark_overlay(fs: Path) -> None:
    """Every stored layer is overlay format: mark it so, whoever reads it (issue 11)."""
    from mergefs.layer import mark_overlay_path
    if fs.is_dir() and not fs.is_symlink():
        mark_overlay_path(fs)
