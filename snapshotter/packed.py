"""Packed layers: a pulled layer kept as its compressed blob, unpacked on first use.

``mergefs pull`` (lazy, the default) stores each layer it fetches *packed*: a
committed ``layer`` row whose ``packed`` column names the blob, the blob in
``ROOT/blobs/sha256/`` (its ``layer_blobs`` row says its diffID, size and
compression), and a snapshot directory with ``meta.json`` and ``holders.json``
but no ``fs/``. Its id is known without the tree (the pusher's annotated id,
or the diffID), so merges of packed layers get their ids at once, and a union
merge of them (the image record) is metadata only.

``tree(store, id)`` is the one place the store hands out a layer's
directory (``Store.layer_tree``): for a packed layer it unpacks first.
Unpacking runs under the layer's build lock (concurrent users wait; the
second finds the tree there), extracts into ``staging/`` while checking the
blob's digest and size and the diffID the image config gave, computes the
tree digest and compares it with the one recorded (the pusher's claim),
then, in one write transaction, renames the tree into the snapshot's
directory, rewrites ``meta.json`` and records the tree digest, entries and
bytes (``packed`` becomes NULL). A crash before the rename leaves the layer
packed (the staging dir is swept at the next open); a crash between the
rename and the commit leaves a verified ``fs/`` beside a packed row, which
the next ``tree`` (or ``fsck --repair``) finishes from the journal.

A blob that does not unpack to what was recorded (digest, size, diffID, tree
digest, a malformed tar) marks the layer ``corrupt``: the error says why,
nothing else is removed, ``fsck`` reports it, using it fails with one line,
and pulling the image again replaces it. Errors of the machine (no space,
I/O) leave it packed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mergefs.errors import FailedPrecondition, InvalidLayer, NotFound

from . import blobs, meta
from .faults import kill_point
from .meta import Row, State

IMPLICIT_FILE = "implicit-dirs.json"      # as oci_import: the tar's unnamed directories


class Unpackable(InvalidLayer):
    """A packed layer's blob does not give the content recorded for it."""


def tree(store, snapshot_id: str) -> Path:
    """The directory of a stored snapshot's tree, unpacked first when the layer is packed."""
    row = store.get(snapshot_id)
    if row is not None and row.packed is not None:
        return unpack(store, row)
    return store.fs_of(snapshot_id)


def unpack_all(store, ids: list[str]) -> None:
    """Unpack whichever of ``ids`` are packed (bottom first)."""
    for i in ids:
        tree(store, i)


# -- publishing a packed layer (pull) -----------------------------------------------------
def publish(store, src: Path, blob: tuple, lid: str, tree_digest: str | None,
            description: str, source: str, holder: str | None, link: bool = False) -> Row:
    """Store the verified blob file ``src`` as the packed layer ``lid``.

    ``blob`` is its ``layer_blobs`` row (layer, compression, digest, diffID, size,
    media type); ``tree_digest`` the tree digest the layer must unpack to (the
    pusher's claim), or None. An existing committed ``lid`` is reused (``src``
    is then left to the caller's staging). ``link``: hardlink it in, leave ``src``."""
    blob = (lid,) + tuple(blob[1:])
    with store.build_lock(lid):
        existing = store.reuse(lid, holder)
        if existing is not None:
            return existing
        staged = store.stage("pull")
        try:
            row = Row(id=lid, kind="layer", description=description, tree_digest=tree_digest,
                      source=source, packed=blob[2])
            final = blobs.path_of(store, blob[2])
            blobs.blob_dir(store)

            def place(db) -> None:          # inside the publishing transaction
                if link:
                    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name[:12]}")
                    os.link(src, tmp)
                    os.replace(tmp, final)
                else:
                    os.replace(src, final)
                meta.put_blob(db, blob)
            return store.publish(staged, row, [], "pull", holder,
                                 journal={"blob": dict(zip(meta.BLOB_COLUMNS.split(", "),
                                                           blob))},
                                 before_rename=place)
        finally:
            staged.discard()


def restore_blob_row(db, data: dict) -> bool:
    """Inside a write: the ``layer_blobs`` row a journal (``meta.json``) records, if missing."""
    b = data.get("blob")
    if not isinstance(b, dict):
        return False
    values = tuple(b.get(c) for c in meta.BLOB_COLUMNS.split(", "))
    if None in values or meta.blob_row(db, values[0], values[2]) is not None:
        return False
    meta.put_blob(db, values)
    return True


# -- unpacking ---------------------------------------------------------------------------
class _Checked:
    """Reads a blob file, checking its size and sha256 at the end (``Unpackable``)."""

    def __init__(self, f, digest: str, size: int, what: str):
        self.f, self.digest, self.size, self.what = f, digest, size, what
        self.sha = hashlib.sha256()
        self.n = 0
        self.checked = False
        self.kill_at = size // 2 if os.environ.get("MERGEFS_TEST_KILL_AT") == \
            "unpack:mid-extract" else None

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(min(n, 512) if self.kill_at is not None and n > 0 else n)
        if data:
            self.sha.update(data)
            self.n += len(data)
            if self.kill_at is not None and self.n >= self.kill_at:
                kill_point("unpack:mid-extract")
        elif n != 0:
            self.check()
        return data

    def check(self) -> None:
        if self.checked:
            return
        self.checked = True
        if self.n != self.size:
            raise Unpackable(f"{self.what}: its blob has {self.n} bytes, recorded {self.size}")
        actual = "sha256:" + self.sha.hexdigest()
        if actual != self.digest:
            raise Unpackable(f"{self.what}: its blob does not match its digest (got {actual}, "
                             f"expected {self.digest})")

    def finish(self) -> None:
        while self.read(1 << 20):
            pass
        self.check()


def _what(row: Row) -> str:
    return f"packed layer {row.id[7:19]} ({row.description})"


def unpack(store, row: Row) -> Path:
    """Unpack the packed layer ``row`` (once: under its build lock); its tree's directory."""
    fs = store.fs_of(row.id)
    with store.build_lock(row.id):
        row = store.get(row.id)
        if row is None or row.state == State.DELETING:
            raise NotFound(f"layer {fs.parent.name[:12]} was removed meanwhile; retry")
        if row.state == State.CORRUPT:
            raise FailedPrecondition(f"{_what(row)} is corrupt (its blob did not unpack to "
                                     "what was recorded); pull the image again")
        if row.packed is None:
            return fs
        if fs.is_dir():                  # renamed in, then the process died before COMMIT
            finish(store, row)
            return fs
        brow = meta.blob_row(store.db, row.id, row.packed)
        if brow is None:
            raise FailedPrecondition(f"{_what(row)}: the store lost its blob record; "
                                     "run `mergefs fsck`")
        staged = store.stage("unpack")
        try:
            try:
                summary, implicit = _extract(store, row, brow, staged.path / "fs")
            except (Unpackable, InvalidLayer) as e:
                msg = str(e) if isinstance(e, Unpackable) else f"{_what(row)}: {e}"
                _mark_corrupt(store, row, msg)
                raise Unpackable(f"{msg}; the layer is marked corrupt (fsck reports it); "
                                 "pull the image again") from None
            (staged.path / IMPLICIT_FILE).write_text(json.dumps(implicit))
            _publish_tree(store, row, staged.path, summary)
        finally:
            staged.discard()
    return fs


def _extract(store, row: Row, brow: tuple, dest: Path):
    """Extract the blob into ``dest``, every check on the way; (tree summary, implicit dirs)."""
    from mergefs import oci
    from .digest import tree_digest
    _layer, _comp, digest, diff_id, size, _media = brow
    what = _what(row)
    try:
        f = open(blobs.path_of(store, digest), "rb")
    except FileNotFoundError:
        raise Unpackable(f"{what}: its blob {digest} is missing") from None
    with f:
        reader = _Checked(f, digest, size, what)
        try:
            result = oci.extract_layer(reader, dest, expected_diff_id=diff_id)
        except InvalidLayer:
            reader.finish()         # a damaged blob says so (digest) before what it broke
            raise
        reader.finish()
    kill_point("unpack:after-extract")
    summary = tree_digest(dest)
    if row.tree_digest and summary.digest != row.tree_digest:
        raise Unpackable(f"{what}: its tree digest is {summary.digest}, the image recorded "
                         f"{row.tree_digest}")
    return summary, [os.fsdecode(p) for p in result.implicit_dirs]


def _publish_tree(store, row: Row, staged: Path, summary) -> None:
    """In one write: the tree renamed into place, the journal rewritten, the row unpacked."""
    from mergefs.layer import mark_overlay_path
    fs = store.fs_of(row.id)
    with meta.write(store.db):
        cur = store.get(row.id)
        if cur is None or cur.state != State.COMMITTED or cur.packed != row.packed:
            raise NotFound(f"layer {row.id[7:19]} was removed meanwhile; retry")
        mark_overlay_path(staged / "fs")
        os.replace(staged / IMPLICIT_FILE, fs.parent / IMPLICIT_FILE)
        os.rename(staged / "fs", fs)
        kill_point("unpack:after-rename")
        merges = meta.set_unpacked(store.db, row.id, summary.digest, summary.entries,
                                   summary.bytes)
        _rewrite_journal(store, row.id)
        _rewrite_journals(store, merges)


def _rewrite_journal(store, snapshot_id: str, **more) -> None:
    """Inside a write: ``meta.json`` gets the row as it is now (its blob record stays)."""
    from dataclasses import asdict
    path = store.dir_of(snapshot_id) / "meta.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"parents": []}
    data["row"] = asdict(store.get(snapshot_id))
    data.update(more)
    tmp = path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(data))
    os.rename(tmp, path)


def _rewrite_journals(store, ids: list[str]) -> None:
    """Inside a write: the journals of merges whose entries and bytes changed."""
    for sid in ids:
        if (store.dir_of(sid) / "meta.json").exists():
            _rewrite_journal(store, sid)


def finish(store, row: Row) -> str:
    """A verified tree was renamed in but the row is still packed (a crash): finish it.

    The journal's row has the summary when it was rewritten before the crash;
    otherwise the tree is digested again (and must match what was recorded)."""
    from .digest import tree_digest
    fs = store.fs_of(row.id)
    try:
        jrow = json.loads((store.dir_of(row.id) / "meta.json").read_text())["row"]
    except (OSError, ValueError, KeyError):
        jrow = {}
    if jrow.get("packed") is None and jrow.get("tree_digest"):
        digest, entries, nbytes = jrow["tree_digest"], jrow["entries"], jrow["bytes"]
    else:
        s = tree_digest(fs)
        digest, entries, nbytes = s.digest, s.entries, s.bytes
    if row.tree_digest and digest != row.tree_digest:
        raise Unpackable(f"{_what(row)}: the tree left by an interrupted unpack has digest "
                         f"{digest}, recorded {row.tree_digest}; run `mergefs fsck`")
    with meta.write(store.db):
        merges = meta.set_unpacked(store.db, row.id, digest, entries, nbytes)
        _rewrite_journal(store, row.id)
        _rewrite_journals(store, merges)
    return f"finished the interrupted unpack of {row.id}"


def _mark_corrupt(store, row: Row, why: str) -> None:
    """The layer's blob failed: corrupt (kept, reported by fsck), ``why`` in its journal."""
    with meta.write(store.db):
        cur = store.get(row.id)
        if cur is not None and cur.state == State.COMMITTED and cur.packed == row.packed:
            meta.set_state(store.db, row.id, State.CORRUPT)
            _rewrite_journal(store, row.id, corrupt=why)


def corrupt_reason(store, snapshot_id: str) -> str | None:
    """Why an unpack marked the layer corrupt (from its journal), or None."""
    try:
        return json.loads((store.dir_of(snapshot_id) / "meta.json").read_text()).get("corrupt")
    except (OSError, ValueError, AttributeError):
        return None


# -- checks (fsck) -------------------------------------------------------------------------
def check(store, row: Row, verify_content: bool) -> tuple[str, str, str] | None:
    """(kind, severity, detail) of what is wrong with packed layer ``row``, or None."""
    brow = meta.blob_row(store.db, row.id, row.packed)
    what = f"packed layer ({row.description})"
    if brow is None:
        return ("packed-blob-lost", "error", f"{what}: no blob record names {row.packed}")
    path = blobs.path_of(store, row.packed)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return ("packed-blob-missing", "error", f"{what}: its blob {row.packed} is gone")
    if size != brow[4]:
        return ("packed-blob-size", "error", f"{what}: its blob has {size} bytes, "
                f"recorded {brow[4]}")
    if verify_content:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != row.packed:
            return ("packed-blob-digest", "error", f"{what}: its blob no longer matches its "
                    f"digest {row.packed}")
    if store.fs_of(row.id).is_dir():
        return ("interrupted-unpack", "garbage", f"{what}: an unpack renamed its tree in and "
                "did not finish; the next use finishes it")
    return None
