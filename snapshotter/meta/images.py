"""What an image brings to the store besides its layers' content: the layers'
registry blobs (push / pull) and the image's config (what ``mergefs bundle`` runs)."""
from __future__ import annotations

import sqlite3


# -- registry blobs (mergefs push / pull) --------------------------------------------
# One row per (layer, compression): the layer's blob as pushed or pulled, so a
# layer is compressed once and a pulled layer can be found by its diffID; a
# packed layer's tree is unpacked from its row's blob. Part of the schema since
# version 4 (made on first use before); a layer's rows go when it is removed
# (snapshotter.blobs.forget).
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
    """(layer, digest) of blob rows whose layer is gone (a corrupt layer keeps its blob,
    for inspection, like its tree)."""
    return db.execute("SELECT b.layer, b.digest FROM layer_blobs b LEFT JOIN snapshots s "
                      "ON s.id = b.layer AND s.state IN ('committed', 'corrupt') "
                      "WHERE s.id IS NULL").fetchall()


def seed_blobs(db: sqlite3.Connection) -> list[str] | None:
    """The digests of the committed layers' blobs (a pull's copy starts with them:
    ``snapshotter.pullcopy``), or None when a committed layer has no blob (the copy
    would fetch it again). A corrupt layer's blob is not one: skopeo does not read a
    blob the destination has."""
    if db.execute("SELECT 1 FROM snapshots s WHERE s.kind IN ('layer', 'diff') "
                  "AND s.state = 'committed' AND NOT EXISTS "
                  "(SELECT 1 FROM layer_blobs b WHERE b.layer = s.id) LIMIT 1").fetchone():
        return None
    return sorted(d for (d,) in db.execute(
        "SELECT DISTINCT b.digest FROM layer_blobs b JOIN snapshots s ON s.id = b.layer "
        "AND s.state = 'committed'"))


def image_present(db: sqlite3.Connection, name: str) -> bool:
    """``name`` names a committed snapshot whose layers are all committed: a pull that
    would record that name most likely has nothing to fetch, so it starts no copy
    before its plan says so (``snapshotter.pullcopy``)."""
    return db.execute(
        "SELECT 1 FROM names n JOIN snapshots s ON s.id = n.id AND s.state = 'committed' "
        "WHERE n.name = ? AND NOT EXISTS (SELECT 1 FROM parents p LEFT JOIN snapshots l "
        "ON l.id = p.parent AND l.state = 'committed' WHERE p.child = s.id "
        "AND p.role = 'input' AND l.id IS NULL)", (name,)).fetchone() is not None


def blob_row(db: sqlite3.Connection, layer: str, digest: str) -> tuple | None:
    """The row of ``layer``'s blob ``digest``, or None."""
    return db.execute(f"SELECT {BLOB_COLUMNS} FROM layer_blobs WHERE layer=? AND digest=?",
                      (layer, digest)).fetchone()


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


def all_blobs(db: sqlite3.Connection) -> list[tuple]:
    """Every blob row; none when the table was never made (a read makes no table)."""
    try:
        return db.execute(f"SELECT {BLOB_COLUMNS} FROM layer_blobs ORDER BY layer").fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise


# -- image configs (schema 3) -------------------------------------------------------
# ``subject`` is a snapshot id (the config of the image that made it, the last
# one imported when several images have the same layers) or a name an image
# was imported under (its own config, valid while the name names ``id``).
def put_image_config(db: sqlite3.Connection, snapshot_id: str, config: str,
                     name: str | None = None) -> None:
    """Inside a write: record ``config`` (JSON text) for ``snapshot_id`` (and ``name``)."""
    for subject in (snapshot_id, name):
        if subject:     # DELETE, not INSERT OR REPLACE: the delete trigger marks the old owner
            db.execute("DELETE FROM image_configs WHERE subject=?", (subject,))
            db.execute("INSERT INTO image_configs(subject, id, config) VALUES(?,?,?)",
                       (subject, snapshot_id, config))


def image_config(db: sqlite3.Connection, ref: str, snapshot_id: str) -> str | None:
    """The config recorded under name ``ref`` for ``snapshot_id``, else under the id."""
    for subject in (ref, snapshot_id):
        r = db.execute("SELECT config FROM image_configs WHERE subject=? AND id=?",
                       (subject, snapshot_id)).fetchone()
        if r:
            return r[0]
    return None


def image_configs_of(db: sqlite3.Connection, snapshot_id: str) -> dict[str, str]:
    """Every config recorded for ``snapshot_id``, by subject (its id, or a name)."""
    return dict(db.execute("SELECT subject, config FROM image_configs WHERE id=? ORDER BY subject",
                           (snapshot_id,)))


def restore_image_config(db: sqlite3.Connection, snapshot_id: str, subject: str,
                         config: str) -> bool:
    """Inside a write: record ``config`` under ``subject`` unless it has one; True if done."""
    return db.execute("INSERT OR IGNORE INTO image_configs(subject, id, config) VALUES(?,?,?)",
                      (subject, snapshot_id, config)).rowcount > 0
