"""The store's metadata: one SQLite database in WAL mode, with a schema version.

Writers take the database's write lock up front (``BEGIN IMMEDIATE``) and keep
every publish and removal step that must be atomic inside one transaction.
Readers never block writers (WAL). Tables:

* ``snapshots``  one row per snapshot (id, kind, strategy, state, times, sizes)
* ``parents``    ordered inputs of a snapshot; ``pin`` = the child needs the
  parent to stay (union merges, active and view snapshots)
* ``names``      aliases (``--name``) and the keys of active/view snapshots
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

SCHEMA_VERSION = 1
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
CREATE TABLE IF NOT EXISTS names(name TEXT PRIMARY KEY, id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS names_by_id ON names(id);
CREATE TABLE IF NOT EXISTS refs(id TEXT NOT NULL, holder TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY(id, holder));
CREATE TABLE IF NOT EXISTS leases(mountpoint TEXT PRIMARY KEY, id TEXT NOT NULL,
    pid INTEGER, created REAL NOT NULL);
"""

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
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
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
    for sql in ("DELETE FROM snapshots WHERE id=?", "DELETE FROM parents WHERE child=?",
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


# -- registry blobs (mergefs push / pull) --------------------------------------------
# One row per (layer, compression): the layer's blob as pushed or pulled, so a
# layer is compressed once and a pulled layer can be found by its diffID. Made
# on first use; a row whose layer is gone is dropped by snapshotter.registry.
BLOBS_SCHEMA = """CREATE TABLE IF NOT EXISTS layer_blobs(
    layer TEXT NOT NULL, compression TEXT NOT NULL, digest TEXT NOT NULL,
    diff_id TEXT NOT NULL, size INTEGER NOT NULL, media_type TEXT NOT NULL,
    PRIMARY KEY(layer, compression))"""
BLOB_COLUMNS = "layer, compression, digest, diff_id, size, media_type"


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
