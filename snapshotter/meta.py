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

States: ``committed`` (visible), ``deleting`` (a prune has begun: invisible,
finished by the next writer or at open), ``corrupt`` (fsck --repair found its
content no longer matches its digest: kept for inspection, never reused).
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from mergefs.errors import FailedPrecondition

SCHEMA_VERSION = 2
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


@contextmanager
def write(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction holding the database's write lock from the start."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
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
    """Inside a write: forget a snapshot (its row, parents, names, labels, refs, leases)."""
    for sql in ("DELETE FROM labels WHERE name IN (SELECT name FROM names WHERE id=?)",
                "DELETE FROM snapshots WHERE id=?", "DELETE FROM parents WHERE child=?",
                "DELETE FROM names WHERE id=?", "DELETE FROM refs WHERE id=?",
                "DELETE FROM leases WHERE id=?"):
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


def mark_deleting(db: sqlite3.Connection, snapshot_id: str) -> bool:
    """Inside a write: the one "a removal has begun" step (committed or corrupt -> deleting)."""
    return db.execute("UPDATE snapshots SET state='deleting' WHERE id=? AND state != 'deleting'",
                      (snapshot_id,)).rowcount > 0


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
