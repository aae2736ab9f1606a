"""Snapshots: their rows and parents, refs, leases, pins and states."""
from __future__ import annotations

import enum
import sqlite3
import time
from dataclasses import dataclass


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


COLUMNS = ("id", "kind", "strategy", "state", "created", "last_used", "use_count",
           "description", "entries", "bytes", "tree_digest", "source", "packed")


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
    packed: str | None = None      # a packed layer: the blob its tree is unpacked from

    def values(self) -> tuple:
        return tuple(getattr(self, c) for c in COLUMNS)


@dataclass(frozen=True)
class Parent:
    id: str
    role: str = "input"     # input | lower | upper | parent
    pin: bool = False


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
    """(child, parent) where a committed child pins a parent that is gone (or going; a
    corrupt parent is still there, and reported as such)."""
    return list(db.execute(
        "SELECT p.child, p.parent FROM parents p JOIN snapshots c ON c.id = p.child "
        "LEFT JOIN snapshots s ON s.id = p.parent WHERE p.pin = 1 AND c.state = 'committed' "
        "AND (s.id IS NULL OR s.state NOT IN ('committed', 'corrupt'))"))


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


def set_unpacked(db: sqlite3.Connection, snapshot_id: str, tree_digest: str, entries: int,
                 nbytes: int) -> list[str]:
    """Inside a write: a packed layer's tree is on disk now (its summary recorded).

    A merge's entries and bytes are its inputs' sums; merges made while the layer
    was packed counted it as 0, so each gets its entries and bytes now (once per
    time it is an input). Returns those merges' ids (their journals change too)."""
    if db.execute("UPDATE snapshots SET packed=NULL, tree_digest=?, entries=?, bytes=? "
                  "WHERE id=? AND packed IS NOT NULL",
                  (tree_digest, entries, nbytes, snapshot_id)).rowcount == 0:
        return []
    uses = db.execute("SELECT p.child, COUNT(*) FROM parents p JOIN snapshots s ON s.id = "
                      "p.child AND s.kind = 'merge' WHERE p.parent = ? AND p.role = 'input' "
                      "GROUP BY p.child", (snapshot_id,)).fetchall()
    db.executemany("UPDATE snapshots SET entries = entries + ?, bytes = bytes + ? WHERE id = ?",
                   [(entries * n, nbytes * n, child) for child, n in uses])
    return [child for child, _n in uses]


def packed_rows(db: sqlite3.Connection) -> list[Row]:
    """Packed layers (any state but deleting)."""
    return [Row(*r) for r in db.execute(
        f"SELECT {','.join(COLUMNS)} FROM snapshots WHERE packed IS NOT NULL "
        "AND state != 'deleting'")]


def count(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]
