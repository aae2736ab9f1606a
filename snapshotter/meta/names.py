"""Names (containerd's snapshot names and keys), their labels, and the holders
record written beside each snapshot (``holders.json``) and restored from it."""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from .images import image_configs_of, restore_image_config
from .snapshots import add_ref, refs_of


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


# -- the holders record (issue 11 item 6) ----------------------------------------
def holders_of(db: sqlite3.Connection, snapshot_id: str) -> dict:
    """What holds a snapshot, as plain data: its names (with parent, times, labels), its
    refs, and the image configs recorded for it (by subject: its id, or a name)."""
    names = [{"name": n, "parent": p, "created": c, "updated": u, "labels": labels_of(db, n)}
             for n, p, c, u in db.execute("SELECT name, parent, created, updated FROM names "
                                          "WHERE id=? ORDER BY name", (snapshot_id,))]
    return {"id": snapshot_id, "names": names, "refs": refs_of(db, snapshot_id),
            "image_configs": image_configs_of(db, snapshot_id)}


def restore_holders(db: sqlite3.Connection, data: dict) -> list[str]:
    """Inside a write: add the names, labels, refs and image configs ``data`` lists that
    are missing.

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
    return done + _restore_image_configs(db, sid, data.get("image_configs") or {})


def _restore_image_configs(db: sqlite3.Connection, sid: str, configs: dict) -> list[str]:
    """The configs recorded under the id, or under a name that (still) names it."""
    done = []
    for subject, config in sorted(configs.items()):
        if subject == sid or id_of_name(db, subject) == sid:
            if restore_image_config(db, sid, subject, config):
                done.append(f"image config {subject!r}")
    return done


def unaccounted(db: sqlite3.Connection, data: dict) -> list[str]:
    """Names and refs ``data`` (a holders record) lists that the database lacks."""
    sid = data["id"]
    missing = [f"name {n['name']!r}" for n in data.get("names", ())
               if id_of_name(db, n["name"]) is None]
    have = set(refs_of(db, sid))
    return missing + [f"ref {h!r}" for h in data.get("refs", ()) if h not in have]
