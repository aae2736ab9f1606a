"""``mergefs push``: REF's layers to an OCI registry as one image, each blob compressed once.

REF's flattened layers (a layer, a merge's layer chain, an imported image)
become layer blobs, an image config whose ``rootfs.diff_ids`` are the
layers' diffIDs, and a manifest whose layer descriptors carry the layers' ids
and tree digests (``snapshotter.registry``: how a pull gets the same ids),
copied by skopeo from a temporary OCI layout (hardlinks into the blob cache)
with ``--preserve-digests``. skopeo asks the registry for each blob first
(HEAD) and uploads only what it lacks.

Compress once: each layer's blob is written the first time it is pushed
(``write_layer_tar``, deterministic, opaque directories as ``.wh..wh..opq``
so the blob depends on the layer alone) into ``ROOT/blobs/sha256/``, and its
digest, diffID and size are remembered in ``layer_blobs`` per (layer,
compression). Imported and pulled blobs are kept there too, so pushing such a
layer sends the very blob it came as.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from mergefs.platforms import oci_architecture

from . import meta, service
from .blobs import blob_dir, drop_orphans
from .distribution import Skopeo, Target, parse_target, result
from .registry import (ANN_ID, ANN_TREE, CONFIG_TYPE, OCI_INDEX, OCI_MANIFEST, Blob,
                       Progress, _hex, _json, _quiet)
from .store import Store

COMPRESSIONS = ("gzip", "zstd")


@dataclass
class PushResult:
    target: str
    manifest_digest: str
    layers: list[Blob]
    compressed: int            # layers compressed by this push (0 when all were remembered)



# -- the blob cache (snapshotter.blobs) ---------------------------------------------------
def _cached(store: Store, row: tuple) -> Blob | None:
    blob = Blob(*row)
    try:
        ok = os.stat(blob_dir(store) / _hex(blob.digest)).st_size == blob.size
    except FileNotFoundError:
        ok = False
    return blob if ok else None


def ensure_blob(store: Store, layer: str, compression: str) -> tuple[Blob, bool]:
    """The layer's blob in the cache, written now only if never written before: (blob, new)."""
    from mergefs import oci
    for row in meta.blobs_of(store.db, layer=layer):
        if row[1] == compression and (blob := _cached(store, row)) is not None:
            return blob, False
    d = blob_dir(store)
    tmp = d / f".tmp-{os.urandom(16).hex()}"
    try:
        with open(tmp, "xb") as f:
            lb = oci.write_layer_tar(store.layer_tree(layer), f, lower=None,
                                     compression=compression)
        os.replace(tmp, d / _hex(lb.digest))
    finally:
        if tmp.exists():
            tmp.unlink()
    blob = Blob(layer, compression, lb.digest, lb.diff_id, lb.size, lb.media_type)
    with meta.write(store.db):
        meta.put_blob(store.db, tuple(blob))
    return blob, True


# -- push -------------------------------------------------------------------------------------
def _put(blobs: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / _hex(digest)).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _write_layout(store: Store, where: Path, blobs: list[Blob]) -> str:
    """An OCI layout of one image (tag ``push``) whose layer blobs are hardlinks into the cache."""
    bdir = where / "blobs" / "sha256"
    os.makedirs(bdir)
    for b in blobs:
        if not (bdir / _hex(b.digest)).exists():
            os.link(blob_dir(store) / _hex(b.digest), bdir / _hex(b.digest))
    config = {"architecture": oci_architecture(), "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]}}
    layers = []
    for b in blobs:
        row = store.get(b.layer)
        ann = {ANN_ID: b.layer}
        if row is not None and row.tree_digest:
            ann[ANN_TREE] = row.tree_digest
        layers.append({"mediaType": b.media_type, "digest": b.digest, "size": b.size,
                       "annotations": ann})
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": CONFIG_TYPE, **_put(bdir, _json(config))},
                "layers": layers}
    mdesc = {"mediaType": OCI_MANIFEST, **_put(bdir, _json(manifest)),
             "annotations": {"org.opencontainers.image.ref.name": "push"}}
    (where / "index.json").write_bytes(_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                              "manifests": [mdesc]}))
    (where / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
    return mdesc["digest"]


def push(store: Store, ref: str, target: str | Target, client: Skopeo | None = None,
         compression: str = "gzip", progress: Progress = _quiet) -> PushResult:
    """Push REF (its flattened layers, bottom first) to ``target`` as one image."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}")
    target = parse_target(target) if isinstance(target, str) else target
    client = client or Skopeo()
    drop_orphans(store)
    flat = service.flatten(store, service.resolve_ref(store, ref))
    blobs, compressed = [], 0
    for i, layer in enumerate(flat, 1):
        if not any(r[1] == compression for r in meta.blobs_of(store.db, layer=layer)):
            progress(f"layer {i}/{len(flat)} {service.short(layer)}: writing its {compression} "
                     "blob (once)")
        blob, new = ensure_blob(store, layer, compression)
        compressed += new
        progress(f"layer {i}/{len(flat)} {service.short(layer)}: blob {blob.digest[:19]} "
                 f"{blob.size} bytes ({'compressed now' if new else 'remembered'})")
        blobs.append(blob)
    staged = store.stage("push")
    try:
        digest = _write_layout(store, staged.path / "oci", blobs)
        progress(f"copying to {target}")
        result(client.copy(f"oci:{staged.path / 'oci'}:push", target.docker(), target,
                           push=True, preserve_digests=True), f"push to {target} failed")
    finally:
        staged.discard()
    return PushResult(str(target), digest, blobs, compressed)
