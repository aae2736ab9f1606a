"""The store's metadata: one SQLite database in WAL mode, with a schema version.

Writers take the database's write lock up front (``BEGIN IMMEDIATE``) and keep
every publish and removal step that must be atomic inside one transaction.
Readers never block writers (WAL). Tables:

* ``snapshots``  one row per snapshot (id, kind, strategy, state, times, sizes)
* ``parents``    ordered inputs of a snapshot; ``pin`` = the child needs the
  parent to stay (union merges, active and view snapshots)
* ``names``      aliases (``--name``) and the keys of active/view snapshots, with
  containerd's view of them: the parent *name* a snapshot was made over, and
  its created/updated times (schema 2)
* ``labels``     containerd labels, per name (schema 2)
* ``refs``       holders keeping a snapshot alive (``cli`` for CLI-made ones)
* ``leases``     mounts made from the store (live while the mount point is mounted)
* ``image_configs`` the OCI image config an imported or pulled image came
  with, per snapshot id and per name it was imported under (schema 3): what
  ``mergefs bundle`` runs

States: ``committed`` (visible), ``deleting`` (a prune has begun: invisible,
finished by the next writer or at open), ``corrupt`` (fsck --repair found its
content no longer matches its digest: kept for inspection, never reused).
"""
from __future__ import annotations

import enum
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from mergefs.errors import FailedPrecondition, StoreDamaged

class State(str, enum.Enum):
    """A snapshot's state (``snapshots.state``); compares equal to its string."""
    COMMITTED = "committed"
    DELETING = "deleting"
    CORRUPT = "corrupt"


class SnapshotKind(str, enum.Enum):
    """A snapshot's kind (``snapshots.kind``); compares equal to its string."""
    LAYER = "layer"
    MERGE = "merge"
    DIFF = "diff"
    ACTIVE = "active"
    VIEW = "view"


class Strategy(str, enum.Enum):
    FARM = "farm"
    UNION = "union"


SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots(
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    strategy TEXT,
    state TEXT NOT NULL DEFAULT 'committed',
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    use_count INTEGER NOT NULL DEFAULT 0,
    description TEXT NOT NULL DEFAULT '',
    entries INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    tree_digest TEXT,
    source TEXT);
CREATE TABLE IF NOT EXISTS parents(
    child TEXT NOT NULL, pos INTEGER NOT NULL, parent TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'input', pin INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(child, pos));
CREATE INDEX IF NOT EXISTS parents_by_parent ON parents(parent);
CREATE TABLE IF NOT EXISTS names(name TEXT PRIMARY KEY, id TEXT NOT NULL,
    parent TEXT, created REAL NOT NULL DEFAULT 0, updated REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS names_by_id ON names(id);
CREATE TABLE IF NOT EXISTS refs(id TEXT NOT NULL, holder TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY(id, holder));
CREATE TABLE IF NOT EXISTS leases(mountpoint TEXT PRIMARY KEY, id TEXT NOT NULL,
    pid INTEGER, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS labels(name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY(name, key));
CREATE TABLE IF NOT EXISTS image_configs(subject TEXT PRIMARY KEY, id TEXT NOT NULL,
    config TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS image_configs_by_id ON image_configs(id);
"""

# Upgrades of an existing store, by the version they lead to (run in order, in
# one transaction with the new schema's CREATE ... IF NOT EXISTS statements).
MIGRATIONS = {
    2: ("ALTER TABLE names ADD COLUMN parent TEXT",
        "ALTER TABLE names ADD COLUMN created REAL NOT NULL DEFAULT 0",
        "ALTER TABLE names ADD COLUMN updated REAL NOT NULL DEFAULT 0",
        "UPDATE names SET created = COALESCE((SELECT s.created FROM snapshots s "
        "WHERE s.id = names.id), 0), updated = COALESCE((SELECT s.created FROM snapshots s "
        "WHERE s.id = names.id), 0)"),
    3: (),          # image_configs: made by the schema's CREATE TABLE IF NOT EXISTS
}

COLUMNS = ("id", "kind", "strategy", "state", "created", "last_used", "use_count",
           "description", "entries", "bytes", "tree_digest", "source")


@dataclass
class Row:
    """One snapshot's metadata (the ``snapshots`` table)."""
    id: str
    kind: str
    strategy: str | None = None
    state: str = "committed"
    created: float = 0.0
    last_used: float = 0.0
    use_count: int = 0
    description: str = ""
    entries: int = 0
    bytes: int = 0
    tree_digest: str | None = None
    source: str | None = None

    def values(self) -> tuple:
        return tuple(getattr(self, c) for c in COLUMNS)


@dataclass(frozen=True)
class Parent:
    id: str
    role: str = "input"     # input | lower | upper | parent
    pin: bool = False


def connect(path: str) -> sqlite3.Connection:
    # One connection per thread (``Store.db``); check_same_thread=False only so
    # that ``Store.close`` may close every thread's connection from one thread.
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA busy_timeout = %d" % int(BUSY_TIMEOUT_S * 1000))
    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = OFF")
    _ensure_schema(db)
    return db


def _ensure_schema(db: sqlite3.Connection) -> None:
    row = _version(db)
    if row == SCHEMA_VERSION:
        return
    if row is not None and row > SCHEMA_VERSION:
        raise FailedPrecondition(f"store schema version {row} is newer than this mergefs "
                                 f"supports ({SCHEMA_VERSION}); upgrade mergefs")
    with write(db):
        row = _version(db)          # again, under the write lock: another process may have won
        if row == SCHEMA_VERSION:
            return
        if row is not None:
            for version in range(row + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS.get(version, ()):
                    db.execute(stmt)
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)",
                   (str(SCHEMA_VERSION),))


def _version(db: sqlite3.Connection) -> int | None:
    try:
        r = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.OperationalError:
        return None
    return int(r[0]) if r else None


# -- holders recorded beside each snapshot (issue 11 item 6) ------------------------
# Temporary triggers note which snapshots' names, labels or refs a transaction
# changed; ``write`` hands them to the connection's hook just before COMMIT
# (``Store`` writes ``snapshots/<hex>/holders.json``), so what is on disk
# never says less than the database after a commit.
_BEFORE_COMMIT: dict[int, object] = {}

_TRIGGER = ("CREATE TEMP TRIGGER IF NOT EXISTS dirty_{table}_{op} AFTER {verb} ON main.{table} "
            "BEGIN INSERT OR IGNORE INTO dirty {what}; END")
_DIRTY = [("names", "ins", "INSERT", "VALUES(NEW.id)"), ("names", "del", "DELETE", "VALUES(OLD.id)"),
          ("names", "upd", "UPDATE", "VALUES(NEW.id)"), ("refs", "ins", "INSERT", "VALUES(NEW.id)"),
          ("refs", "del", "DELETE", "VALUES(OLD.id)"),
          ("labels", "ins", "INSERT", "SELECT id FROM names WHERE name = NEW.name"),
          ("labels", "del", "DELETE", "SELECT id FROM names WHERE name = OLD.name")]


def track_holders(db: sqlite3.Connection, hook) -> None:
    """Call ``hook(db, ids)`` inside each write, before COMMIT, with the ids whose
    names, labels or refs changed."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS dirty(id TEXT PRIMARY KEY)")
    for table, op, verb, what in _DIRTY:
        db.execute(_TRIGGER.format(table=table, op=op, verb=verb, what=what))
    _BEFORE_COMMIT[id(db)] = hook


def untrack(db: sqlite3.Connection) -> None:
    _BEFORE_COMMIT.pop(id(db), None)


def holders_of(db: sqlite3.Connection, snapshot_id: str) -> dict:
    """What holds a snapshot, as plain data: its names (with parent, times, labels), its refs."""
    names = [{"name": n, "parent": p, "created": c, "updated": u, "labels": labels_of(db, n)}
             for n, p, c, u in db.execute("SELECT name, parent, created, updated FROM names "
                                          "WHERE id=? ORDER BY name", (snapshot_id,))]
    return {"id": snapshot_id, "names": names, "refs": refs_of(db, snapshot_id)}


def restore_holders(db: sqlite3.Connection, data: dict) -> list[str]:
    """Inside a write: add the names, labels and refs ``data`` lists that are missing.

    Returns one line per thing restored. A name that now names another
    snapshot is left alone (it was given away after the record was written).
    """
    sid, done = data["id"], []
    for n in data.get("names", ()):
        if id_of_name(db, n["name"]) is None:
            add_name(db, n["name"], sid, n.get("parent"), n.get("created"))
            if n.get("labels"):
                set_labels(db, n["name"], n["labels"], now=n.get("updated"))
            done.append(f"name {n['name']!r}")
    have = set(refs_of(db, sid))
    for h in data.get("refs", ()):
        if h not in have:
            add_ref(db, sid, h)
            done.append(f"ref {h!r}")
    return done


def unaccounted(db: sqlite3.Connection, data: dict) -> list[str]:
    """Names and refs ``data`` (a holders record) lists that the database lacks."""
    sid = data["id"]
    missing = [f"name {n['name']!r}" for n in data.get("names", ())
               if id_of_name(db, n["name"]) is None]
    have = set(refs_of(db, sid))
    return missing + [f"ref {h!r}" for h in data.get("refs", ()) if h not in have]


REPAIR_HINT = ("run `mergefs fsck --repair`: it keeps the damaged file as "
               "meta.db.damaged-<time> and rebuilds the metadata from what each snapshot "
               "directory records (meta.json, holders.json)")


def translate(exc: sqlite3.Error, path: str) -> Exception:
    """An SQLite error as the error a user can act on (the table in ``mergefs.errors``)."""
    import errno
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name == "SQLITE_FULL" or "disk is full" in text or (
            name.startswith("SQLITE_IOERR") and _nearly_full(path)):
        # SQLite reports ENOSPC on the -shm/-wal files as an I/O error: ask the filesystem
        return OSError(errno.ENOSPC, "no space left on the store's filesystem "
                       "(free space, or prune the store)", path)
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return OSError(errno.EROFS, "the store's metadata is read-only (make meta.db and its "
                       "directory writable, or use another --root)", path)
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in text \
            or "not a database" in text:
        return StoreDamaged(f"the store's metadata {path} is damaged ({text}); {REPAIR_HINT}")
    if name.startswith("SQLITE_CANTOPEN"):
        return OSError(errno.EACCES, f"cannot open the store's metadata ({text})", path)
    return exc


def _nearly_full(path: str) -> bool:
    import os
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


@contextmanager
def sqlite_errors(path: str) -> Iterator[None]:
    """Translate SQLite errors raised inside the block (see ``translate``)."""
    try:
        yield
    except sqlite3.Error as e:
        t = translate(e, path)
        if t is e:
            raise
        raise t from e


@contextmanager
def write(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction holding the database's write lock from the start."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:       # SQLite may have rolled back already (SQLITE_FULL ...)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise
    hook = _BEFORE_COMMIT.get(id(db))
    if hook is not None:
        dirty = [i for (i,) in db.execute("SELECT id FROM temp.dirty")]
        if dirty:
            db.execute("DELETE FROM temp.dirty")
            try:
                hook(db, dirty)
            except BaseException:
                db.execute("ROLLBACK")
                raise
    db.execute("COMMIT")


def get(db: sqlite3.Connection, snapshot_id: str) -> Row | None:
    r = db.execute(f"SELECT {','.join(COLUMNS)} FROM snapshots WHERE id=?",
                   (snapshot_id,)).fetchone()
    return Row(*r) if r else None


def all_rows(db: sqlite3.Connection, state: str | None = "committed") -> list[Row]:
    sql = f"SELECT {','.join(COLUMNS)} FROM snapshots"
    rows = db.execute(sql + " WHERE state=?", (state,)) if state else db.execute(sql)
    return [Row(*r) for r in rows]


def insert(db: sqlite3.Connection, row: Row, parents: list[Parent]) -> None:
    db.execute(f"INSERT INTO snapshots({','.join(COLUMNS)}) VALUES({','.join('?' * len(COLUMNS))})",
               row.values())
    db.executemany("INSERT INTO parents(child, pos, parent, role, pin) VALUES(?,?,?,?,?)",
                   [(row.id, i, p.id, p.role, int(p.pin)) for i, p in enumerate(parents)])


def delete(db: sqlite3.Connection, snapshot_id: str) -> None:
    """Inside a write: forget a snapshot (its row, parents, names, labels, refs, leases,
    image configs)."""
    for sql in ("DELETE FROM labels WHERE name IN (SELECT name FROM names WHERE id=?)",
                "DELETE FROM snapshots WHERE id=?", "DELETE FROM parents WHERE child=?",
                "DELETE FROM names WHERE id=?", "DELETE FROM refs WHERE id=?",
                "DELETE FROM leases WHERE id=?", "DELETE FROM image_configs WHERE id=?"):
        db.execute(sql, (snapshot_id,))


def parents(db: sqlite3.Connection, snapshot_id: str) -> list[Parent]:
    return [Parent(p, role, bool(pin)) for p, role, pin in db.execute(
        "SELECT parent, role, pin FROM parents WHERE child=? ORDER BY pos", (snapshot_id,))]


def touch(db: sqlite3.Connection, snapshot_id: str) -> None:
    db.execute("UPDATE snapshots SET last_used=?, use_count=use_count+1 WHERE id=?",
               (time.time(), snapshot_id))


def add_ref(db: sqlite3.Connection, snapshot_id: str, holder: str) -> None:
    db.execute("INSERT OR IGNORE INTO refs(id, holder, created) VALUES(?,?,?)",
               (snapshot_id, holder, time.time()))


def names_of(db: sqlite3.Connection, snapshot_id: str) -> list[str]:
    return [n for (n,) in db.execute("SELECT name FROM names WHERE id=? ORDER BY name",
                                     (snapshot_id,))]


# -- names (containerd's snapshot names and keys) and their labels ----------------
@dataclass
class NameRow:
    """One name: the snapshot id it names, the parent name it was made over, times."""
    name: str
    id: str
    parent: str | None = None
    created: float = 0.0
    updated: float = 0.0


NAME_COLUMNS = ("name", "id", "parent", "created", "updated")


def id_of_name(db: sqlite3.Connection, name: str) -> str | None:
    """The one name lookup: the id ``name`` names, or None."""
    r = db.execute("SELECT id FROM names WHERE name=?", (name,)).fetchone()
    return r[0] if r else None


def name_row(db: sqlite3.Connection, name: str) -> NameRow | None:
    r = db.execute(f"SELECT {','.join(NAME_COLUMNS)} FROM names WHERE name=?", (name,)).fetchone()
    return NameRow(*r) if r else None


def name_rows(db: sqlite3.Connection) -> list[NameRow]:
    return [NameRow(*r) for r in db.execute(
        f"SELECT {','.join(NAME_COLUMNS)} FROM names ORDER BY name")]


def add_name(db: sqlite3.Connection, name: str, snapshot_id: str, parent: str | None = None,
             now: float | None = None) -> bool:
    """Inside a write: name ``snapshot_id`` (no-op if it already does); False if taken."""
    cur = id_of_name(db, name)
    if cur is not None:
        return cur == snapshot_id
    now = time.time() if now is None else now
    db.execute("INSERT INTO names(name, id, parent, created, updated) VALUES(?,?,?,?,?)",
               (name, snapshot_id, parent, now, now))
    return True


def drop_name(db: sqlite3.Connection, name: str) -> None:
    db.execute("DELETE FROM names WHERE name=?", (name,))
    db.execute("DELETE FROM labels WHERE name=?", (name,))


def children_of_name(db: sqlite3.Connection, name: str) -> list[str]:
    return [n for (n,) in db.execute("SELECT name FROM names WHERE parent=? ORDER BY name",
                                     (name,))]


def labels_of(db: sqlite3.Connection, name: str) -> dict[str, str]:
    return dict(db.execute("SELECT key, value FROM labels WHERE name=? ORDER BY key", (name,)))


def set_labels(db: sqlite3.Connection, name: str, labels: dict[str, str],
               replace: bool = True, now: float | None = None) -> None:
    """Inside a write: set ``labels`` on ``name`` (all of them, or only those given)."""
    if replace:
        db.execute("DELETE FROM labels WHERE name=?", (name,))
    for k, v in labels.items():
        if v is None:
            db.execute("DELETE FROM labels WHERE name=? AND key=?", (name, k))
        else:
            db.execute("INSERT OR REPLACE INTO labels(name, key, value) VALUES(?,?,?)",
                       (name, k, v))
    db.execute("UPDATE names SET updated=? WHERE name=?",
               (time.time() if now is None else now, name))


def refs_of(db: sqlite3.Connection, snapshot_id: str) -> list[str]:
    return [h for (h,) in db.execute("SELECT holder FROM refs WHERE id=? ORDER BY holder",
                                     (snapshot_id,))]


def drop_ref(db: sqlite3.Connection, snapshot_id: str, holder: str) -> None:
    db.execute("DELETE FROM refs WHERE id=? AND holder=?", (snapshot_id, holder))


def ids_held_by(db: sqlite3.Connection, holder: str) -> list[str]:
    return [i for (i,) in db.execute("SELECT id FROM refs WHERE holder=? ORDER BY id", (holder,))]


def pinned_by(db: sqlite3.Connection, snapshot_id: str) -> list[str]:
    """Snapshots (not being deleted) that need ``snapshot_id`` to stay."""
    return [c for (c,) in db.execute(
        "SELECT p.child FROM parents p JOIN snapshots s ON s.id = p.child "
        "WHERE p.parent = ? AND p.pin = 1 AND s.state != 'deleting'", (snapshot_id,))]


def leased_at(db: sqlite3.Connection, snapshot_id: str) -> list[str]:
    return [mp for (mp,) in db.execute("SELECT mountpoint FROM leases WHERE id=? "
                                       "ORDER BY mountpoint", (snapshot_id,))]


def mark_deleting(db: sqlite3.Connection, snapshot_id: str, only_committed: bool = False) -> bool:
    """Inside a write: the one "a removal has begun" step (committed or corrupt -> deleting)."""
    if only_committed:
        return db.execute("UPDATE snapshots SET state='deleting' WHERE id=? AND "
                          "state='committed'", (snapshot_id,)).rowcount > 0
    return db.execute("UPDATE snapshots SET state='deleting' WHERE id=? AND state != 'deleting'",
                      (snapshot_id,)).rowcount > 0


def move_refs(db: sqlite3.Connection, old: str, new: str) -> None:
    """Inside a write: every ref ``old`` holds becomes ``new``'s."""
    for sid in ids_held_by(db, old):
        add_ref(db, sid, new)
        drop_ref(db, sid, old)


def drop_holder(db: sqlite3.Connection, holder: str) -> None:
    for sid in ids_held_by(db, holder):
        drop_ref(db, sid, holder)


def holders_named(db: sqlite3.Connection, prefix: str) -> list[str]:
    return [h for (h,) in db.execute("SELECT DISTINCT holder FROM refs WHERE substr(holder, 1, ?)"
                                     " = ?", (len(prefix), prefix))]


def ids_with_refs(db: sqlite3.Connection) -> set[str]:
    return {i for (i,) in db.execute("SELECT DISTINCT id FROM refs")}


def mark_deleting_if_unused(db: sqlite3.Connection, snapshot_id: str,
                            mounted: set[str]) -> bool:
    """Inside a write: mark it deleting if no name, ref, pin or live lease holds it."""
    if db.execute("SELECT 1 FROM names WHERE id=? UNION ALL SELECT 1 FROM refs WHERE id=?",
                  (snapshot_id, snapshot_id)).fetchone():
        return False
    if pinned_by(db, snapshot_id) or set(leased_at(db, snapshot_id)) & mounted:
        return False
    return mark_deleting(db, snapshot_id)


def children_of(db: sqlite3.Connection, snapshot_id: str) -> list[str]:
    """Snapshots that list ``snapshot_id`` among their parents (pinning or not)."""
    return [c for (c,) in db.execute("SELECT DISTINCT child FROM parents WHERE parent=? "
                                     "ORDER BY child", (snapshot_id,))]


def all_ids(db: sqlite3.Connection) -> list[str]:
    return [i for (i,) in db.execute("SELECT id FROM snapshots")]


def ids_in_state(db: sqlite3.Connection, state: str) -> list[str]:
    return [i for (i,) in db.execute("SELECT id FROM snapshots WHERE state=?", (state,))]


def set_state(db: sqlite3.Connection, snapshot_id: str, state: str) -> None:
    db.execute("UPDATE snapshots SET state=? WHERE id=?", (state, snapshot_id))


def missing_pinned_parents(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """(child, parent) where a committed child pins a parent that is not committed."""
    return list(db.execute(
        "SELECT p.child, p.parent FROM parents p JOIN snapshots c ON c.id = p.child "
        "LEFT JOIN snapshots s ON s.id = p.parent WHERE p.pin = 1 AND c.state = 'committed' "
        "AND (s.id IS NULL OR s.state != 'committed')"))


def ids_by_prefix(db: sqlite3.Connection, prefix: str, limit: int = 2) -> list[str]:
    """Ids (not being deleted) starting with ``prefix``: at most ``limit``."""
    return [i for (i,) in db.execute(
        "SELECT id FROM snapshots WHERE id >= ? AND id < ? AND state != 'deleting' LIMIT ?",
        (prefix, prefix + "\U0010ffff", limit))]


def farm_links(db: sqlite3.Connection, ids: list[str]) -> int:
    """The most farms any one of ``ids`` is linked into (each farm adds a link per file)."""
    return db.execute(
        "SELECT MAX(c) FROM (SELECT COUNT(*) AS c FROM parents p JOIN snapshots s ON s.id=p.child "
        f"WHERE s.strategy='farm' AND p.parent IN ({','.join('?' * len(ids))}) GROUP BY p.parent)",
        ids).fetchone()[0] or 0


def make_farm(db: sqlite3.Connection, snapshot_id: str) -> None:
    """Inside a write: a union merge became a farm: it no longer pins its inputs."""
    db.execute("UPDATE snapshots SET strategy='farm' WHERE id=?", (snapshot_id,))
    db.execute("UPDATE parents SET pin=0 WHERE child=?", (snapshot_id,))


def add_lease(db: sqlite3.Connection, mountpoint: str, snapshot_id: str, pid: int) -> None:
    db.execute("INSERT OR REPLACE INTO leases(mountpoint, id, pid, created) VALUES(?,?,?,?)",
               (mountpoint, snapshot_id, pid, time.time()))


def holders(db: sqlite3.Connection) -> tuple[dict[str, list[str]], list[tuple[str, str]],
                                              dict[str, list[str]]]:
    """(refs by id, (mountpoint, id) leases, pinning children by parent id)."""
    refs: dict[str, list[str]] = {}
    for i, h in db.execute("SELECT id, holder FROM refs"):
        refs.setdefault(i, []).append(h)
    leases = list(db.execute("SELECT mountpoint, id FROM leases"))
    pins: dict[str, list[str]] = {}
    for child, parent in db.execute(
            "SELECT p.child, p.parent FROM parents p JOIN snapshots s ON s.id = p.child "
            "WHERE p.pin = 1 AND s.state != 'deleting'"):
        pins.setdefault(parent, []).append(child)
    return refs, leases, pins


def names_by_id(db: sqlite3.Connection) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n, i in db.execute("SELECT name, id FROM names ORDER BY name"):
        out.setdefault(i, []).append(n)
    return out


def first_name(db: sqlite3.Connection, snapshot_id: str) -> str | None:
    names = names_of(db, snapshot_id)
    return names[0] if names else None


def count(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]


# -- registry blobs (mergefs push / pull) --------------------------------------------
# One row per (layer, compression): the layer's blob as pushed or pulled, so a
# layer is compressed once and a pulled layer can be found by its diffID. Made
# on first use; a layer's rows go when it is removed (snapshotter.blobs.forget).
BLOBS_SCHEMA = """CREATE TABLE IF NOT EXISTS layer_blobs(
    layer TEXT NOT NULL, compression TEXT NOT NULL, digest TEXT NOT NULL,
    diff_id TEXT NOT NULL, size INTEGER NOT NULL, media_type TEXT NOT NULL,
    PRIMARY KEY(layer, compression))"""
BLOB_COLUMNS = "layer, compression, digest, diff_id, size, media_type"


def has_blobs(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='layer_blobs'"
                      ).fetchone() is not None


def ensure_blobs(db: sqlite3.Connection) -> None:
    db.execute(BLOBS_SCHEMA)
    db.execute("CREATE INDEX IF NOT EXISTS layer_blobs_by_diff ON layer_blobs(diff_id)")


def blobs_of(db: sqlite3.Connection, *, layer: str | None = None,
             diff_id: str | None = None) -> list[tuple]:
    where, arg = ("layer=?", layer) if layer is not None else ("diff_id=?", diff_id)
    return db.execute(f"SELECT {BLOB_COLUMNS} FROM layer_blobs WHERE {where}", (arg,)).fetchall()


def put_blob(db: sqlite3.Connection, values: tuple) -> None:
    db.execute(f"INSERT OR REPLACE INTO layer_blobs({BLOB_COLUMNS}) VALUES(?,?,?,?,?,?)", values)


def orphan_blobs(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """(layer, digest) of blob rows whose layer is no longer committed."""
    return db.execute("SELECT b.layer, b.digest FROM layer_blobs b LEFT JOIN snapshots s "
                      "ON s.id = b.layer AND s.state = 'committed' WHERE s.id IS NULL").fetchall()


def forget_blobs_of(db: sqlite3.Connection, layers: list[str]) -> set[str]:
    """Inside a write: drop the blob rows of ``layers``; the digests they named."""
    digests = set()
    for layer in layers:
        digests |= {d for (d,) in db.execute("SELECT digest FROM layer_blobs WHERE layer=?",
                                             (layer,))}
        db.execute("DELETE FROM layer_blobs WHERE layer=?", (layer,))
    return digests


def forget_blob(db: sqlite3.Connection, layer: str, digest: str) -> None:
    db.execute("DELETE FROM layer_blobs WHERE layer=? AND digest=?", (layer, digest))


def blob_digests(db: sqlite3.Connection) -> set[str]:
    return {d for (d,) in db.execute("SELECT digest FROM layer_blobs")}


# -- image configs (schema 3) -------------------------------------------------------
# ``subject`` is a snapshot id (the config of the image that made it, the last
# one imported when several images have the same layers) or a name an image
# was imported under (its own config, valid while the name names ``id``).
def put_image_config(db: sqlite3.Connection, snapshot_id: str, config: str,
                     name: str | None = None) -> None:
    """Inside a write: record ``config`` (JSON text) for ``snapshot_id`` (and ``name``)."""
    for subject in (snapshot_id, name):
        if subject:
            db.execute("INSERT OR REPLACE INTO image_configs(subject, id, config) VALUES(?,?,?)",
                       (subject, snapshot_id, config))


def image_config(db: sqlite3.Connection, ref: str, snapshot_id: str) -> str | None:
    """The config recorded under name ``ref`` for ``snapshot_id``, else under the id."""
    for subject in (ref, snapshot_id):
        r = db.execute("SELECT config FROM image_configs WHERE subject=? AND id=?",
                       (subject, snapshot_id)).fetchone()
        if r:
            return r[0]
    return None


def all_blobs(db: sqlite3.Connection) -> list[tuple]:
    """Every blob row; none when the table was never made (a read makes no table)."""
    try:
        return db.execute(f"SELECT {BLOB_COLUMNS} FROM layer_blobs ORDER BY layer").fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
