"""Import of layer tars, OCI image layouts and docker archives, through ``mergefs.oci``.

``mergefs.oci`` (the OCI module's owner) reads images and unpacks each layer
tar safely into a new directory in overlay format, returning its diffID
(sha256 of the uncompressed tar). Each layer is stored under its diffID, so
an image layer already in the store is not extracted again; its tree digest
(mergefs-tree-v1) is recorded too, so fsck can check the stored content.

An image (layout or archive) also gets an **image record**: the merge of its
layers, kept as a union (metadata only; it pins its layers), named by
``--name`` or the image's ref name / tag. A one-layer image names that layer.

Directories a layer tar does not name take the attributes of the image's
lower layers there (as umoci, containerd and Docker leave them; overlay
format cannot say "no attributes"). Such a layer depends on its lowers, so it
is stored under ``layer_over_id(diffID, lower ids)`` instead of its diffID;
every layer from a tar keeps the list of its unnamed directories beside it
(``implicit-dirs.json``) so the diffID shortcut is taken only when none of
them exists below.
Unsafe or malformed input raises before anything is published: the staging
dir goes, the store is unchanged (layers of an image published before the bad
one stay, unreferenced, for prune).
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

from mergefs.layer import DIR

from . import meta
from .digest import TreeSummary, sha256_id, tree_digest
from .meta import Row
from .store import CLI_HOLDER, Store


@dataclass
class ImportResult:
    layers: list[Row]
    image: Row | None = None
    moved: tuple[str, str, str] | None = None    # (name, from id, to id): a tag moved


def import_source(store: Store, src: str, fmt: str = "auto", name: str | None = None,
                  holder: str | None = CLI_HOLDER, progress=None,
                  image: str | None = None) -> ImportResult:
    """Import whatever ``src`` is: layer dir, layer tar, OCI layout or docker archive.

    ``-`` is standard input; it, a pipe (``/dev/stdin``, ``<(...)``) or another
    non-regular file is read once, into a spool file in the store's staging
    area, and imported from there (an image archive must be read with seeks).
    ``image`` picks one image of several in a layout or archive (ref, tag or digest).
    """
    if src == "-" or _is_stream(src):
        spool = store.stage("spool")
        try:
            path = spool.path / "input"
            _spool(src, path)
            return _import(store, str(path), fmt, name, holder, progress, image,
                           "standard input" if src == "-" else src)
        finally:
            spool.discard()
    return _import(store, src, fmt, name, holder, progress, image, src)


def _is_stream(src: str) -> bool:
    try:
        mode = os.stat(src).st_mode
    except OSError:
        return False          # the importer says what is wrong with it
    return not (stat.S_ISDIR(mode) or stat.S_ISREG(mode))


def _spool(src: str, path) -> None:
    import shutil
    import sys
    with open(path, "xb") as out:
        if src == "-":
            shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
        else:
            with open(src, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)


def _import(store: Store, src: str, fmt: str, name: str | None, holder: str | None,
            progress, image: str | None, label: str) -> ImportResult:
    from mergefs import oci
    from .service import import_dir
    kind = oci.detect_source(src)
    if kind == "layer-dir":
        return ImportResult([import_dir(store, src, fmt, name, holder, progress)])
    if kind == "layer-tar":
        if image is not None:
            from mergefs.errors import InvalidLayer
            raise InvalidLayer(f"--image: {label} is a layer tar, not an image layout or archive")
        if progress is None:
            return ImportResult([import_layer_tar(store, src, name, holder,
                                                  description=f"import of {label}")])
        with open(src, "rb") as f:
            reader = _Counted(f, progress, 0, os.fstat(f.fileno()).st_size)
            return ImportResult([import_layer_tar(store, reader, name, holder,
                                                  description=f"import of {label}")])
    return import_image(store, src, name, holder, image, label, progress)


class _Counted:
    """A reader that reports ``progress(bytes read so far, total)`` (compressed bytes)."""

    def __init__(self, raw, progress, base: int, total: int | None):
        self.raw, self.progress, self.base, self.total = raw, progress, base, total
        self.n = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.n += len(data)
        self.progress(self.base + self.n, self.total)
        return data


def import_image(store: Store, src: str, name: str | None, holder: str | None,
                 ref: str | None = None, label: str | None = None,
                 progress=None) -> ImportResult:
    """Import the image ``ref`` (the only one when None) of a layout or archive;
    ``progress(bytes, total)`` over its layer blobs.

    Named by ``name``, else by the image's tag; a tag that already names another
    snapshot moves to this image, as ``docker load`` does (``ImportResult.moved``).
    """
    from mergefs import oci
    from .service import merge, record_image_config
    label = label or src
    with oci.open_image(src, ref) as image:
        rows, done = [], 0
        total = sum(d.size or 0 for d in image.layers) or None
        for desc in image.layers:
            row = _reuse_layer(store, desc.diff_id, rows, holder)
            if row is None:
                row = _import_blob(store, image, desc, holder, label, rows, progress, done,
                                   total)
            done += desc.size or 0
            rows.append(row)
        tag = image.ref_name
        config = image.config
    if not rows:
        return ImportResult([])
    res = merge(store, [r.id for r in rows], strategy="union", name=name, holder=holder)
    moved = None
    if name is None and tag and _usable_name(tag):
        old = _move_name(store, tag, res.row.id)
        if old is not None:
            moved = (tag, old, res.row.id)
    record_image_config(store, res.row.id, config, name or (tag if tag and _usable_name(tag)
                                                            else None))
    return ImportResult(rows, res.row, moved)


def _import_blob(store: Store, image, desc, holder, label: str, lower: list[Row],
                 progress, done: int, total: int | None) -> Row:
    """Extract one layer blob; the blob itself is kept for push (``snapshotter.blobs``)."""
    from .blobs import Keeper
    compressed = "gzip" in desc.media_type or "zstd" in desc.media_type
    keeper = Keeper(store, desc.digest, desc.size) if desc.digest and compressed else None
    try:
        with image.open_layer(desc) as reader:
            if keeper is not None:
                reader = keeper.tee(reader)
            if progress is not None:
                reader = _Counted(reader, progress, done, total)
            row = import_layer_tar(store, reader, None, holder, desc.diff_id,
                                   f"layer of {label}", lower=lower)
            if keeper is not None:
                keeper.finish(row.id, desc.diff_id)
        return row
    finally:
        if keeper is not None:
            keeper.discard()


def _usable_name(tag: str) -> bool:
    """An image's tag that looks like an id (an export of an unnamed snapshot is tagged
    with its short id) names nothing: the image is still reachable by that id."""
    from mergefs.errors import InvalidArgument
    from .store import check_name_shape
    try:
        check_name_shape(tag)
    except InvalidArgument:
        return False
    return True


def _move_name(store: Store, name: str, snapshot_id: str) -> str | None:
    """Point ``name`` at ``snapshot_id``; the id it named before, if another one."""
    with meta.write(store.db):
        cur = meta.id_of_name(store.db, name)
        if cur == snapshot_id:
            return None
        if cur is not None:
            meta.drop_name(store.db, name)
        meta.add_name(store.db, name, snapshot_id)
    return cur


IMPLICIT_FILE = "implicit-dirs.json"


def layer_over_id(diff_id: str, lower_ids: list[str]) -> str:
    """The id of a layer tar applied over ``lower_ids`` whose unnamed dirs inherited."""
    return sha256_id(b"mergefs-layer-over-v1\n" + diff_id.encode() + b"\n" +
                     b"".join(i.encode() + b"\n" for i in lower_ids))


def _lower_dirs(store: Store, lower: list[Row], paths: list[str]) -> bool:
    """Whether one of ``paths`` is a directory in the merge of ``lower``."""
    from mergefs.resolver import Resolver
    from .service import store_layers
    with Resolver(store_layers(store, [r.id for r in lower])) as res:
        for p in paths:
            node = res.lookup(os.fsencode(p))
            if node is not None and node.kind == DIR:
                return True
    return False


def _unpacked(store: Store, diff_id: str) -> bool:
    """A packed layer stored as ``diff_id`` is unpacked in place (once, verified), so that
    its unnamed directories are known without extracting a copy; False if it cannot be."""
    from mergefs.errors import FailedPrecondition, InvalidLayer, NotFound
    row = store.get(diff_id)
    if row is None or row.packed is None:
        return True
    try:
        store.layer_tree(diff_id)
    except (InvalidLayer, FailedPrecondition, NotFound):
        return False            # corrupt or gone: the blob is extracted as for a new layer
    return True


def _reuse_layer(store: Store, diff_id: str | None, lower: list[Row],
                 holder: str | None) -> Row | None:
    """A stored layer for ``diff_id`` over ``lower``, without reading the blob, or None."""
    if not diff_id:
        return None
    if lower:
        row = store.reuse(layer_over_id(diff_id, [r.id for r in lower]), holder)
        if row is not None:
            return row
        if not _unpacked(store, diff_id):
            return None
        try:
            implicit = json.loads((store.dir_of(diff_id) / IMPLICIT_FILE).read_text())
        except (OSError, ValueError):
            return None            # not stored, or stored before the list was kept
        if implicit and _lower_dirs(store, lower, implicit):
            return None
    return store.reuse(diff_id, holder)


def import_layer_tar(store: Store, src, name: str | None = None,
                     holder: str | None = CLI_HOLDER, expected_diff_id: str | None = None,
                     description: str | None = None, lower: list[Row] | None = None) -> Row:
    """One layer tar (path or binary file) into the store, under its diffID (or, when its
    unnamed directories inherited from ``lower``, under ``layer_over_id``)."""
    from mergefs import oci
    from .service import publish_layer, store_layers
    staged = store.stage("import")
    try:
        result = oci.extract_layer(src, staged.path / "fs", expected_diff_id=expected_diff_id,
                                   lower=store_layers(store, [r.id for r in lower or []]))
        (staged.path / IMPLICIT_FILE).write_text(json.dumps(
            [os.fsdecode(p) for p in result.implicit_dirs]))
        tree = tree_digest(staged.path / "fs")
        key = result.diff_id if not result.inherited else \
            layer_over_id(result.diff_id, [r.id for r in lower])
        summary = TreeSummary(key, tree.entries, tree.bytes)
        return publish_layer(store, staged, summary, tree.digest, "layer",
                             description or f"import of {src}", str(src), name, holder, "import")
    finally:
        staged.discard()
