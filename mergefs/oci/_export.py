"""Export: layer directories to OCI layer tars, and OCI image layouts.

The tar is deterministic: the same layer gives the same bytes (so the same
diffID and digest) on any machine with the same zlib/zstd, whatever its
number of cores (``_compress``). Entries in
depth-first order, within a directory whiteouts first then names sorted as
bytes; numeric owners without names; pax records for nanosecond mtimes, long
names and xattrs (overlay-private ones are format and are translated, not
copied); hardlinks inside the layer become tar hardlinks to the first name;
no atime, no ctime; sockets are skipped (tar cannot hold them).

Deletions (D4): an overlay whiteout becomes ``.wh.NAME``. When the layers
below are known (``lower``), an opaque directory becomes explicit ``.wh.``
entries for what the lower layers hold there (recursing into directories this
layer also has, D7); whiteouts of names that nothing below holds are dropped
(D6). Without ``lower`` an opaque directory is written as ``.wh..wh..opq``,
which the OCI spec allows.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Sequence

from .. import syscalls
from ..errors import AlreadyExists, InvalidLayer, NotFound
from ..layer import DIR, Layer, as_layers, content_xattrs, read_layer_dir
from ..plan import refuse_redirect
from ..resolver import Resolver
from . import _compress, _tar
from ._extract import MAX_DEPTH
from ..platforms import oci_architecture
from ._image import INDEX, MANIFEST, REF_NAME

CHUNK = 1 << 20
MEDIA_TYPES = {None: "application/vnd.oci.image.layer.v1.tar",
               "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
OPAQUE_NAME = b".wh..opq"        # written as ".wh." + name, like every whiteout


@dataclass(frozen=True)
class LayerBlob:
    """A written layer: its descriptor fields and diffID."""
    media_type: str
    digest: str         # sha256 of the bytes as written
    size: int
    diff_id: str        # sha256 of the uncompressed tar
    entries: int
    uncompressed_size: int = 0


class _BlobSink:
    """Hashes the uncompressed tar (diffID), compresses, hashes and writes the blob."""

    def __init__(self, out: BinaryIO, compression: str | None, progress=None):
        if compression not in MEDIA_TYPES:
            raise ValueError(f"compression must be one of {sorted(map(str, MEDIA_TYPES))}")
        self.out = out
        self.diff = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.size = 0
        self.done = 0                       # uncompressed bytes so far, for ``progress``
        self.progress = progress
        if compression == "gzip":
            self.comp = _compress.ParallelGzip()
        elif compression == "zstd":
            self.comp = _compress.zstd_compressobj()
        else:
            self.comp = None
        self._pending: list[bytes] = []
        self._pending_len = 0

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending, self._pending_len = [], 0
        self.diff.update(data)
        self.done += len(data)
        if self.comp is not None:
            data = self.comp.compress(data)
        self._emit(data)
        if self.progress is not None:
            self.progress(self.done)

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob.update(data)
            self.size += len(data)
            self.out.write(data)

    def close(self) -> None:
        self._flush()
        if self.comp is not None:
            self._emit(self.comp.flush())

    def abort(self) -> None:
        if isinstance(self.comp, _compress.ParallelGzip):
            self.comp.abort()


class _LayerTarWriter:
    """Walks one layer directory (never following a symlink) and writes its tar."""

    def __init__(self, layer: Layer, sink: _BlobSink, lower: Resolver | None, lower_known: bool):
        self.layer, self.sink, self.lower = layer, sink, lower
        self.lower_known = lower_known     # False: write opaque markers and every whiteout
        self.links: dict[tuple[int, int], bytes] = {}
        self.entries = 0

    def run(self) -> None:
        self._dir(b"", os.dup(self.layer.fd), forced_opaque=False)
        self.sink.write(bytes(2 * _tar.BLOCK))

    def _emit(self, member: _tar.Member) -> None:
        if member.name.rstrip(b"/").count(b"/") >= MAX_DEPTH:   # the importer's limit, too
            raise InvalidLayer(f"{os.fsdecode(member.name[:80])!r}... is more than {MAX_DEPTH} "
                               f"levels deep; an OCI layer tar of it would be refused on import "
                               f"(export it with --format dir)")
        self.sink.write(_tar.encode_header(member))
        self.entries += 1

    def _lower_children(self, path: bytes) -> dict | None:
        """The lower merged view's children of ``path`` (None: not a directory below)."""
        if self.lower is None:
            return None                     # known to be empty: the bottom layer
        node = self.lower.lookup(path)
        if node is None or node.kind != DIR:
            return None
        return self.lower.listdir(path, node)

    def _dir(self, path: bytes, fd: int, forced_opaque: bool) -> None:
        try:
            ld = read_layer_dir(fd, self.layer.fmt)
            if ld.redirect is not None:
                refuse_redirect(self.layer, path)
            st = os.fstat(fd)
            self._emit(self._member(path + b"/" if path else b"./", st, fd, b"", b""))
            opaque = ld.opaque or forced_opaque
            below = self._lower_children(path) if self.lower_known else None
            for name in self._whiteouts(ld, opaque, below):
                wh = (path + b"/" if path else b"") + b".wh." + name
                self._emit(_tar.Member(wh, _tar.REG, 0o644, 0, 0, 0, 0, None, b"", 0, 0))
            for name in sorted(ld.entries):
                child = path + b"/" + name if path else name
                if name.startswith(b".wh."):
                    raise InvalidLayer(f"{os.fsdecode(child)!r} is a file named like an OCI "
                                       "whiteout; OCI layers cannot hold it (rename it)")
                st = syscalls.lstat(name, fd)
                if stat.S_ISDIR(st.st_mode):
                    force = opaque and below is not None and below.get(name) is not None \
                        and below[name].kind == DIR
                    self._dir(child, syscalls.open_dir(name, fd), force)
                else:
                    self._entry(child, name, st, fd)
        finally:
            os.close(fd)

    def _whiteouts(self, ld, opaque: bool, below: dict | None) -> list[bytes]:
        if not self.lower_known:
            return ([OPAQUE_NAME] if opaque else []) + sorted(ld.whiteouts)
        if below is None:
            return []                              # nothing below to delete (D6)
        names = set(ld.whiteouts) & set(below)
        if opaque:
            names |= set(below) - set(ld.entries)   # D4: opaque -> explicit deletions
        return sorted(names)

    def _member(self, name: bytes, st, dir_fd: int, entry: bytes, linkname: bytes,
                typ: bytes = _tar.DIR) -> _tar.Member:
        xattrs = content_xattrs(dir_fd, entry)
        return _tar.Member(name, typ, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, 0,
                           st.st_mtime_ns, None, linkname,
                           os.major(st.st_rdev) if typ in (_tar.CHR, _tar.BLK) else 0,
                           os.minor(st.st_rdev) if typ in (_tar.CHR, _tar.BLK) else 0, xattrs)

    def _entry(self, path: bytes, name: bytes, st, dir_fd: int) -> None:
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFSOCK:
            return
        if st.st_nlink > 1:
            first = self.links.get((st.st_dev, st.st_ino))
            if first is not None:
                self._emit(_tar.Member(path, _tar.LNK, stat.S_IMODE(st.st_mode), st.st_uid,
                                       st.st_gid, 0, st.st_mtime_ns, None, first, 0, 0))
                return
            self.links[(st.st_dev, st.st_ino)] = path
        if fmt == stat.S_IFLNK:
            self._emit(self._member(path, st, dir_fd, name, syscalls.readlink(name, dir_fd),
                                    _tar.SYM))
        elif fmt == stat.S_IFREG:
            self._file(path, name, dir_fd)
        else:
            typ = {stat.S_IFCHR: _tar.CHR, stat.S_IFBLK: _tar.BLK, stat.S_IFIFO: _tar.FIFO}[fmt]
            self._emit(self._member(path, st, dir_fd, name, b"", typ))

    def _file(self, path: bytes, name: bytes, dir_fd: int) -> None:
        fd = os.open(name, syscalls.O_READ, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            m = self._member(path, st, dir_fd, name, b"", _tar.REG)
            m.size = st.st_size
            self._emit(m)
            left = st.st_size
            while left:
                data = os.read(fd, min(left, CHUNK))
                if not data:
                    raise OSError(f"{os.fsdecode(path)} shrank while being exported")
                self.sink.write(data)
                left -= len(data)
            self.sink.write(bytes(-st.st_size % _tar.BLOCK))
        finally:
            os.close(fd)


def write_layer_tar(layer, out: BinaryIO, *, lower: Sequence | None = None,
                    compression: str | None = None, progress=None) -> LayerBlob:
    """Write ``layer`` (a directory, either whiteout format) as an OCI layer tar to ``out``.

    ``lower`` (bottom first) are the layers it goes on top of; given (``[]``
    for a bottom layer), deletions are written as explicit whiteouts (D4) and
    whiteouts with nothing below are left out. ``None``: the lower layers are
    unknown; whiteouts are kept and opaque dirs become ``.wh..wh..opq``.
    ``progress(n)`` is called with the uncompressed bytes written so far.
    """
    layer = layer if isinstance(layer, Layer) else Layer(layer)
    sink = _BlobSink(out, compression, progress)
    resolver = Resolver(as_layers(lower)) if lower else None
    try:
        writer = _LayerTarWriter(layer, sink, resolver, lower is not None)
        writer.run()
        sink.close()
    except BaseException:
        sink.abort()                 # stop the compressor's threads
        raise
    finally:
        layer.close()
        if resolver is not None:
            resolver.close()
    return LayerBlob(MEDIA_TYPES[compression], "sha256:" + sink.blob.hexdigest(), sink.size,
                     "sha256:" + sink.diff.hexdigest(), writer.entries, sink.done)


def _staging_for(out: str) -> str:
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise AlreadyExists(f"{out} already exists")
    if not os.path.isdir(os.path.dirname(out)):
        raise NotFound(f"parent directory {os.path.dirname(out)} does not exist")
    return os.path.join(os.path.dirname(out),
                        f".{os.path.basename(out)}.mergefs-staging-{uuid.uuid4().hex[:12]}")


def _publish(staging: str, out: str) -> None:
    try:
        syscalls.rename_noreplace(staging, out)
    except FileExistsError:
        raise AlreadyExists(f"{out} already exists") from None


def export_layer_tar(layer, out, *, lower: Sequence | None = None,
                     compression: str | None = None, progress=None) -> LayerBlob:
    """Write ``layer`` as a layer tar file at ``out`` (must not exist; staged, then renamed)."""
    out = os.fsdecode(out)
    staging = _staging_for(out)
    try:
        with open(staging, "xb") as f:
            blob = write_layer_tar(layer, f, lower=lower, compression=compression,
                                   progress=progress)
        _publish(staging, out)
    except BaseException:
        if os.path.lexists(staging):
            os.unlink(staging)
        raise
    return blob


@dataclass(frozen=True)
class ExportedImage:
    ref: str
    manifest_digest: str
    config_digest: str
    layers: list[LayerBlob]


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(blobs: str, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def _write_layers(blobs: str, layers: list[Layer], compression: str | None,
                  progress=None) -> list[LayerBlob]:
    out, done = [], 0
    for i, layer in enumerate(layers):
        tmp = os.path.join(blobs, f".layer-{i}.tmp")
        report = None if progress is None else (lambda n, base=done: progress(base + n))
        with open(tmp, "xb") as f:
            blob = write_layer_tar(layer, f, lower=layers[:i], compression=compression,
                                   progress=report)
        done += blob.uncompressed_size
        os.replace(tmp, os.path.join(blobs, blob.digest.split(":", 1)[1]))
        out.append(blob)
    return out


def export_layout(layers: Sequence, out, *, ref: str = "latest", compression: str | None = "gzip",
                  config: dict | None = None, progress=None) -> ExportedImage:
    """Write an OCI image layout at ``out`` (must not exist) holding one image.

    ``layers`` are directories bottom first; each is written with explicit
    whiteouts against the ones below it. ``config`` adds fields to the image
    config (e.g. ``{"config": {"Cmd": [...]}}``); ``rootfs`` is always ours.
    ``ref`` becomes ``org.opencontainers.image.ref.name`` in ``index.json``.
    ``compression``: "gzip" (every core, see ``_compress``), "zstd" or None.
    ``progress(n)``: uncompressed bytes written so far, over all layers.
    """
    out = os.fsdecode(out)
    layers = as_layers(layers)
    staging = _staging_for(out)
    try:
        blobs = os.path.join(staging, "blobs", "sha256")
        os.makedirs(blobs)
        written = _write_layers(blobs, layers, compression, progress)
        cfg = {"architecture": oci_architecture(), "os": "linux",
               "config": {}, **(config or {}),
               "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in written]}}
        cfg_desc = {"mediaType": CONFIG_TYPE, **_put_blob(blobs, _json_bytes(cfg))}
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg_desc,
                    "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size}
                               for b in written]}
        man_desc = {"mediaType": MANIFEST, **_put_blob(blobs, _json_bytes(manifest)),
                    "annotations": {REF_NAME: ref}}
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [man_desc]}
        with open(os.path.join(staging, "index.json"), "wb") as f:
            f.write(_json_bytes(index))
        with open(os.path.join(staging, "oci-layout"), "wb") as f:
            f.write(_json_bytes({"imageLayoutVersion": "1.0.0"}))
        _publish(staging, out)
    except BaseException:
        syscalls.rmtree(staging, ignore_errors=True)
        raise
    return ExportedImage(ref, man_desc["digest"], cfg_desc["digest"], written)
