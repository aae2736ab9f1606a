"""The database itself: schema and migrations, connections, write transactions
(with the hook that records holders beside each snapshot before COMMIT) and the
translation of SQLite's errors into errors a user can act on."""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator

from mergefs.errors import FailedPrecondition, StoreDamaged


SCHEMA_VERSION = 4
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
    source TEXT,
    packed TEXT);
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
CREATE TABLE IF NOT EXISTS layer_blobs(
    layer TEXT NOT NULL, compression TEXT NOT NULL, digest TEXT NOT NULL,
    diff_id TEXT NOT NULL, size INTEGER NOT NULL, media_type TEXT NOT NULL,
    PRIMARY KEY(layer, compression));
CREATE INDEX IF NOT EXISTS layer_blobs_by_diff ON layer_blobs(diff_id);
"""

# Upgrades of an existing store, by the version they lead to (run in order, in
# one transaction with the new schema's CREATE ... IF NOT EXISTS statements);
# an SQL statement, or a function of the connection.
MIGRATIONS = {
    2: ("ALTER TABLE names ADD COLUMN parent TEXT",
        "ALTER TABLE names ADD COLUMN created REAL NOT NULL DEFAULT 0",
        "ALTER TABLE names ADD COLUMN updated REAL NOT NULL DEFAULT 0",
        "UPDATE names SET created = COALESCE((SELECT s.created FROM snapshots s "
        "WHERE s.id = names.id), 0), updated = COALESCE((SELECT s.created FROM snapshots s "
        "WHERE s.id = names.id), 0)"),
    3: (),          # image_configs: made by the schema's CREATE TABLE IF NOT EXISTS
    4: (lambda db: _add_column(db, "snapshots", "packed", "TEXT"),),   # packed layers; and
}                          # layer_blobs, made on first use before: CREATE ... IF NOT EXISTS


def _add_column(db: sqlite3.Connection, table: str, column: str, decl: str) -> None:
    if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


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
                    stmt(db) if callable(stmt) else db.execute(stmt)
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
# Temporary triggers note which snapshots' names, labels, refs or image configs
# a transaction changed; ``write`` hands them to the connection's hook just
# before COMMIT (``Store`` writes ``snapshots/<hex>/holders.json``), so what is
# on disk never says less than the database after a commit.
_BEFORE_COMMIT: dict[int, object] = {}

_TRIGGER = ("CREATE TEMP TRIGGER IF NOT EXISTS dirty_{table}_{op} AFTER {verb} ON main.{table} "
            "BEGIN INSERT OR IGNORE INTO dirty {what}; END")
_DIRTY = [("names", "ins", "INSERT", "VALUES(NEW.id)"), ("names", "del", "DELETE", "VALUES(OLD.id)"),
          ("names", "upd", "UPDATE", "VALUES(NEW.id)"), ("refs", "ins", "INSERT", "VALUES(NEW.id)"),
          ("refs", "del", "DELETE", "VALUES(OLD.id)"),
          ("labels", "ins", "INSERT", "SELECT id FROM names WHERE name = NEW.name"),
          ("labels", "del", "DELETE", "SELECT id FROM names WHERE name = OLD.name"),
          ("image_configs", "ins", "INSERT", "VALUES(NEW.id)"),
          ("image_configs", "del", "DELETE", "VALUES(OLD.id)")]


def track_holders(db: sqlite3.Connection, hook) -> None:
    """Call ``hook(db, ids)`` inside each write, before COMMIT, with the ids whose
    names, labels, refs or image configs changed."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS dirty(id TEXT PRIMARY KEY)")
    for table, op, verb, what in _DIRTY:
        db.execute(_TRIGGER.format(table=table, op=op, verb=verb, what=what))
    _BEFORE_COMMIT[id(db)] = hook


def untrack(db: sqlite3.Connection) -> None:
    _BEFORE_COMMIT.pop(id(db), None)


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
