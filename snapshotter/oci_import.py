"""Import of layer tars, OCI image layouts and docker archives, through ``mergefs.oci``.

``mergefs.oci`` (the OCI module's owner) reads images and unpacks each layer
tar safely into a new directory in overlay format, returning its diffID
(sha256 of the uncompressed tar). Each layer is stored under its diffID, so
an image layer already in the store is not extracted again; its tree digest
(mergefs-tree-v1) is recorded too, so fsck can check the stored content.

An image (layout or archive) also gets an **image record**: the merge of its
layers, kept as a union (metadata only; it pins its layers), named by
``--name`` or the image's ref name / tag. A one-layer image names that layer.
Unsafe or malformed input raises before anything is published: the staging
dir goes, the store is unchanged (layers of an image published before the bad
one stay, unreferenced, for prune).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .digest import TreeSummary, tree_digest
from .meta import Row
from .store import CLI_HOLDER, Store


@dataclass
class ImportResult:
    layers: list[Row]
    image: Row | None = None


def import_source(store: Store, src: str, fmt: str = "auto", name: str | None = None,
                  holder: str | None = CLI_HOLDER, progress=None) -> ImportResult:
    """Import whatever ``src`` is: layer dir, layer tar, OCI layout or docker archive."""
    from mergefs import oci
    from .service import import_dir
    kind = oci.detect_source(src)
    if kind == "layer-dir":
        return ImportResult([import_dir(store, src, fmt, name, holder, progress)])
    if kind == "layer-tar":
        if progress is None:
            return ImportResult([import_layer_tar(store, src, name, holder)])
        with open(src, "rb") as f:
            reader = _Counted(f, progress, 0, os.fstat(f.fileno()).st_size)
            return ImportResult([import_layer_tar(store, reader, name, holder,
                                                  description=f"import of {src}")])
    return import_image(store, src, name, holder, progress)


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
                 progress=None) -> ImportResult:
    """An OCI layout or docker archive; ``progress(bytes, total)`` over its layer blobs."""
    from mergefs import oci
    from .service import merge
    with oci.open_image(src) as image:
        rows, done = [], 0
        total = sum(d.size or 0 for d in image.layers) or None
        for desc in image.layers:
            row = store.reuse(desc.diff_id, holder) if desc.diff_id else None
            if row is None:
                with image.open_layer(desc) as reader:
                    if progress is not None:
                        reader = _Counted(reader, progress, done, total)
                    row = import_layer_tar(store, reader, None, holder, desc.diff_id,
                                           f"layer of {src}")
            done += desc.size or 0
            rows.append(row)
        tag = name or image.ref_name
    if not rows:
        return ImportResult([])
    res = merge(store, [r.id for r in rows], strategy="union", name=tag, holder=holder)
    return ImportResult(rows, res.row)


def import_layer_tar(store: Store, src, name: str | None = None,
                     holder: str | None = CLI_HOLDER, expected_diff_id: str | None = None,
                     description: str | None = None) -> Row:
    """One layer tar (path or binary file) into the store, under its diffID."""
    from mergefs import oci
    from .service import publish_layer
    staged = store.stage("import")
    try:
        result = oci.extract_layer(src, staged.path / "fs", expected_diff_id=expected_diff_id)
        tree = tree_digest(staged.path / "fs")
        summary = TreeSummary(result.diff_id, tree.entries, tree.bytes)
        return publish_layer(store, staged, summary, tree.digest, "layer",
                             description or f"import of {src}", str(src), name, holder, "import")
    finally:
        staged.discard()
