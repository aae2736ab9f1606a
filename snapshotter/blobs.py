"""The store's layer blobs: compressed layer tars kept beside the layers they came from.

``ROOT/blobs/sha256/<hex>`` holds a layer's blob as it was imported from an
OCI layout or docker archive, pulled from a registry, or written by its first
push; the ``layer_blobs`` table (``snapshotter.meta``) says per (layer,
compression) which blob, with its diffID, size and media type. ``mergefs
push`` sends a remembered blob as it is (no recompression), which is what
``skopeo copy`` does from a layout.

A **packed layer** (``snapshotter.packed``, kept so by a lazy pull) has its
content here only: its row's ``packed`` column names the blob its tree is
unpacked from on first use; fsck checks such blobs with the layer.

Rule: **a blob is kept while its layer is in the store.** Removing a layer
(``prune``, ``fsck --repair``) forgets its rows and deletes every blob file
no row names any more (``Store.remove`` calls ``forget``). ``mergefs du``
counts the files (``Usage.blobs``); ``fsck`` reports rows whose file is
missing or has the wrong size, and files no row names.

A blob is kept at import only when the layer is stored under the blob's
diffID (the layer is the blob alone; a layer whose unnamed directories took
their lowers' attributes is not) and the blob is gzip or zstd. It is written
while the import reads it (``Keeper.tee``): the bytes kept are the bytes the
import checked against the blob's digest, read once.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import meta

GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def hexpart(digest: str) -> str:
    return digest.split(":", 1)[1]


def blob_dir(store) -> Path:
    d = store.root / "blobs" / "sha256"
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def path_of(store, digest: str) -> Path:
    return store.root / "blobs" / "sha256" / hexpart(digest)


def forget(store, layers: list[str]) -> None:
    """Forget the blobs of ``layers`` (gone from the store); delete files no row names."""
    if not meta.has_blobs(store.db):
        return
    with meta.write(store.db):
        digests = meta.forget_blobs_of(store.db, layers)
        live = meta.blob_digests(store.db)
    for digest in digests - live:
        try:
            os.unlink(path_of(store, digest))
        except FileNotFoundError:
            pass


def drop_orphans(store) -> None:
    """Forget blob rows whose layer is no longer committed (stores from before
    ``Store.remove`` forgot them) and delete their files."""
    meta.ensure_blobs(store.db)
    orphans = meta.orphan_blobs(store.db)
    if orphans:
        forget(store, sorted({layer for layer, _digest in orphans}))


def usage(store) -> tuple[int, int]:
    """(files, bytes on disk) under ``ROOT/blobs``."""
    n = size = 0
    try:
        it = os.scandir(store.root / "blobs" / "sha256")
    except FileNotFoundError:
        return 0, 0
    with it:
        for de in it:
            st = de.stat(follow_symlinks=False)
            n += 1
            size += st.st_blocks * 512
    return n, size


def bytes_by_layer(store) -> dict[str, int]:
    """Layer id -> bytes on disk of the blobs only that layer names (freed with it)."""
    rows = meta.all_blobs(store.db)
    named: dict[str, set[str]] = {}
    for layer, _c, digest, *_ in rows:
        named.setdefault(digest, set()).add(layer)
    out: dict[str, int] = {}
    for digest, layers in named.items():
        try:
            size = os.stat(path_of(store, digest)).st_blocks * 512
        except FileNotFoundError:
            continue
        if len(layers) == 1:
            (layer,) = layers
            out[layer] = out.get(layer, 0) + size
    return out


def check(store, repair: bool = False) -> list[tuple[str, str, str, str]]:
    """(kind, subject, detail, repaired) per inconsistency between the rows and the files.

    Repair forgets a row whose file is missing or has the wrong size (the next
    push of the layer writes its blob again) and deletes files no row names."""
    out, named = [], set()
    packed = {(r.id, r.packed) for r in meta.packed_rows(store.db)}
    for layer, _comp, digest, _diff, size, _media in meta.all_blobs(store.db):
        named.add(hexpart(digest))
        if (layer, digest) in packed:
            continue            # a packed layer's content: checked by fsck._packed
        try:
            actual = os.stat(path_of(store, digest)).st_size
        except FileNotFoundError:
            out.append(("blob-missing", layer, f"its blob {digest} is gone (the next push "
                        "writes it again)", _forget_row(store, layer, digest, repair)))
            continue
        if actual != size:
            out.append(("blob-size", layer, f"its blob {digest} has {actual} bytes, "
                        f"recorded {size}", _forget_row(store, layer, digest, repair)))
    d = store.root / "blobs" / "sha256"
    strays = sorted(n for n in set(os.listdir(d)) - named if not n.startswith(".tmp-")) \
        if d.is_dir() else []
    for n in strays:
        if repair:
            os.unlink(d / n)
        out.append(("blob-unnamed", f"blobs/sha256/{n}", "a blob no layer names",
                    "removed" if repair else ""))
    return out


def _forget_row(store, layer: str, digest: str, repair: bool) -> str:
    if not repair:
        return ""
    with meta.write(store.db):
        meta.forget_blob(store.db, layer, digest)
        live = meta.blob_digests(store.db)
    if digest not in live:
        try:
            os.unlink(path_of(store, digest))
        except FileNotFoundError:
            pass
    return "forgotten (the next push writes the blob again)"


class Keeper:
    """Keeps the blob an import reads: ``tee`` the verified reader, then ``finish``."""

    def __init__(self, store, digest: str, size: int | None):
        self.store, self.digest, self.size = store, digest, size
        self.tmp = blob_dir(store) / f".tmp-{os.urandom(16).hex()}"
        self.f = open(self.tmp, "xb")
        self.reader = None
        self.head = b""

    def tee(self, reader):
        self.reader = reader
        return self

    def read(self, n: int = -1) -> bytes:
        data = self.reader.read(n)
        if data:
            if len(self.head) < 4:
                self.head += data[:4]
            self.f.write(data)
        return data

    def finish(self, layer: str, diff_id: str) -> bool:
        """Keep the blob as ``layer``'s (the import stored it under ``diff_id``)."""
        try:
            while self.read(1 << 20):     # the rest, if any: the reader checks the digest at EOF
                pass
            self.f.close()
            comp = "gzip" if self.head.startswith(GZIP_MAGIC) else \
                "zstd" if self.head.startswith(ZSTD_MAGIC) else None
            size = os.stat(self.tmp).st_size
            if layer != diff_id or comp is None or (self.size is not None and size != self.size):
                return False
            meta.ensure_blobs(self.store.db)
            with meta.write(self.store.db):
                if any(r[1] == comp for r in meta.blobs_of(self.store.db, layer=layer)):
                    return False          # remembered already (an earlier import or push)
                os.replace(self.tmp, path_of(self.store, self.digest))
                meta.put_blob(self.store.db, (layer, comp, self.digest, diff_id, size,
                                              MEDIA[comp]))
            return True
        finally:
            self.discard()

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
