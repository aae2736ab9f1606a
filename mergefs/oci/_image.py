"""Readers of OCI image layouts and docker-archives, as directories or tars.

``open_image(path, ref=None)`` finds the image (by ``org.opencontainers.image.ref.name``
in an OCI ``index.json``, or ``RepoTags`` in a docker ``manifest.json``), reads
its config and returns an ``Image`` whose ``layers`` are bottom first, each
with its diffID from ``config.rootfs.diff_ids``. ``Image.open_layer`` returns a
reader that checks the blob's size and digest when it reaches the end, so a
caller that reads a layer to the end (``extract_layer`` does) has verified it.

Names read from ``manifest.json`` are cleaned like tar member names (no
``..``, not absolute) and blob names must be ``sha256:<64 hex>``, so a hostile
archive cannot make us open a file outside it.
"""
from __future__ import annotations

import errno
import hashlib
import array
import io
import itertools
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from .. import syscalls
from ..errors import InvalidLayer, MergefsError, NotFound, UnsafeContent
from ..platforms import oci_architecture
from ._extract import clean_path
from ._stream import sniff_compression

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
DOCKER_ARCHIVE_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MAX_NESTING = 64         # image metadata nests a few levels; json.loads recurses
MAX_JSON = 16 << 20      # manifests and configs are kilobytes; refuse to buffer a huge one
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX_NAME = re.compile(r"^(blobs/sha256/)?([0-9a-f]{64})(\.json|\.tar|/layer\.tar|/json|/VERSION)?$")


@dataclass(frozen=True)
class LayerDescriptor:
    """One layer of an image, bottom first in ``Image.layers``."""
    media_type: str
    digest: str | None          # sha256 of the blob as stored (None: legacy docker layer.tar)
    size: int | None
    diff_id: str | None         # sha256 of the uncompressed tar, from the config
    path: str                   # where the blob is inside the layout or archive


@dataclass
class Image:
    """An image found in a layout or archive. Close it (or use ``with``) when done."""
    kind: str                   # "oci-layout" or "docker-archive"
    ref_name: str | None
    config: dict
    config_digest: str | None
    manifest_digest: str | None
    layers: list[LayerDescriptor]
    _source: "_Source" = field(repr=False)

    def open_layer(self, layer: LayerDescriptor) -> BinaryIO:
        """The blob, verified against its digest and size when read to the end."""
        return _Verified(self._source.open(layer.path), layer.digest, layer.size, layer.path)

    def iter_layers(self) -> Iterator[tuple[LayerDescriptor, BinaryIO]]:
        """Bottom first: (descriptor, verifying reader); each reader is closed after use."""
        for layer in self.layers:
            with self.open_layer(layer) as reader:
                yield layer, reader

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Verified(io.RawIOBase):
    """Reads a blob and checks size and sha256 at its end (InvalidLayer on mismatch)."""

    def __init__(self, raw: BinaryIO, digest: str | None, size: int | None, what: str):
        self.raw, self.digest, self.size, self.what = raw, digest, size, what
        self._sha = hashlib.sha256()
        self._n = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self._sha.update(data)
            self._n += len(data)
        elif n != 0:
            self._check()
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self.size is not None and self._n != self.size:
            raise InvalidLayer(f"blob {self.what}: {self._n} bytes, its descriptor says {self.size}")
        actual = "sha256:" + self._sha.hexdigest()
        if self.digest is not None and actual != self.digest:
            raise InvalidLayer(f"blob {self.what} does not match its digest "
                               f"(got {actual}, expected {self.digest})")

    def close(self) -> None:
        self.raw.close()
        super().close()


# ---- where the files are: a directory or a tar ------------------------------

class _Source:
    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_json(self, name: str) -> dict | list:
        with self.open(name) as f:
            data = f.read(MAX_JSON)
        return load_json(data, name)


def _clean(name: str) -> bytes:
    path = clean_path(os.fsencode(name))
    if not path:
        raise InvalidLayer(f"empty file name {name!r} in image metadata")
    return path


def _link_target(parent: str, target: str) -> str:
    """Where a symlink inside the image points, as a name inside the image."""
    joined = posixpath.normpath(posixpath.join(parent, target))
    if target.startswith("/") or joined == ".." or joined.startswith("../"):
        raise UnsafeContent(f"a link in the image points outside it: {target!r}")
    return joined


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")     # +1 / -1 as signed bytes
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_too_deep(data: bytes, limit: int) -> bool:
    """Whether ``[``/``{`` nest deeper than ``limit`` in JSON text, without recursion
    (strings dropped; a running sum in C, 64 KiB at a time, stopping at the first excess)."""
    steps = _STRING.sub(b"", data).translate(_STEPS, _NOT_BRACKETS)
    depth = 0
    for at in range(0, len(steps), 1 << 16):
        sums = list(itertools.accumulate(array.array("b", steps[at:at + (1 << 16)]),
                                         initial=depth))
        if max(sums) > limit:
            return True
        depth = sums[-1]
    return False


def load_json(data: bytes, name: str):
    """Image metadata as JSON: InvalidLayer if malformed or nested deeper than MAX_NESTING
    (json.loads recurses: a nesting bomb must fail in one line, not a RecursionError)."""
    if json_too_deep(data, MAX_NESTING):
        raise InvalidLayer(f"{name}: JSON nested deeper than {MAX_NESTING} levels")
    try:
        return json.loads(data)
    except ValueError as e:
        raise InvalidLayer(f"{name}: not valid JSON ({e})") from None


class _DirSource(_Source):
    def __init__(self, path: str):
        self.fd = os.open(path, syscalls.O_DIR & ~os.O_NOFOLLOW)

    def open(self, name: str, hops: int = 0) -> BinaryIO:
        path = _clean(name)
        try:
            fd = syscalls.open_beneath(self.fd, path, syscalls.O_READ)
        except FileNotFoundError:
            raise NotFound(f"the image refers to {name!r}, which is missing") from None
        except OSError as e:
            if e.errno != errno.ELOOP or hops >= 8:
                raise UnsafeContent(f"cannot open {name!r} inside the image: {e.strerror}") from None
            # An unpacked skopeo docker-archive links <id>/layer.tar -> ../<digest>.tar:
            # follow the link ourselves, as a name inside the image (cleaned again).
            parent, _, base = path.rpartition(b"/")
            pfd = syscalls.open_beneath(self.fd, parent)
            try:
                target = syscalls.readlink(base, pfd)
            finally:
                os.close(pfd)
            return self.open(_link_target(os.fsdecode(parent), os.fsdecode(target)), hops + 1)
        return os.fdopen(fd, "rb")

    def exists(self, name: str) -> bool:
        try:
            os.close(syscalls.open_beneath(self.fd, _clean(name), syscalls.O_READ))
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _TarSource(_Source):
    """An image archive (``docker save``, ``skopeo copy ... docker-archive:``, oci-archive)."""

    def __init__(self, path: str):
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {}
            for m in self.tar.getmembers():
                try:
                    self.members[os.fsdecode(clean_path(os.fsencode(m.name)))] = m
                except (UnsafeContent, InvalidLayer):
                    continue      # never opened: names in metadata are cleaned the same way
        except (tarfile.TarError, EOFError) as e:
            raise InvalidLayer(f"{path}: not a readable image archive ({e})") from None

    def _member(self, name: str, hops: int = 0) -> tarfile.TarInfo:
        m = self.members.get(os.fsdecode(_clean(name)))
        if m is None:
            raise NotFound(f"the image archive has no {name!r}")
        if m.issym() and hops < 8:     # skopeo links identical layers; stay inside the archive
            return self._member(_link_target(os.path.dirname(name), m.linkname), hops + 1)
        if not m.isfile():
            raise InvalidLayer(f"{name!r} in the image archive is not a file")
        return m

    def open(self, name: str) -> BinaryIO:
        return self.tar.extractfile(self._member(name))

    def exists(self, name: str) -> bool:
        return os.fsdecode(_clean(name)) in self.members

    def close(self) -> None:
        self.tar.close()


# ---- what kind of thing a path is ---------------------------------------------

def detect_source(path) -> str:
    """``layer-dir``, ``oci-layout``, ``docker-archive`` or ``layer-tar`` (an oci-archive,
    i.e. a layout in a tar, counts as ``oci-layout``)."""
    path = os.fsdecode(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "oci-layout")):
            return "oci-layout"
        if _looks_like_docker_manifest(os.path.join(path, "manifest.json")):
            return "docker-archive"
        return "layer-dir"
    if not os.path.exists(path):
        raise NotFound(f"{path} does not exist")
    return _sniff_archive(path)


def _looks_like_docker_manifest(path: str) -> bool:
    """A layer may hold a file called manifest.json; docker's is a list of images."""
    try:
        if os.path.islink(path) or os.path.getsize(path) > (16 << 20):
            return False
        with open(path, "rb") as f:
            data = load_json(f.read(), path)
    except (OSError, ValueError):
        return False
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) \
        and "Layers" in data[0]


SNIFF_MEMBERS = 4096     # an image archive names its manifest within a few members per layer


def _sniff_archive(path: str) -> str:
    """An OCI layout in a tar, a docker-archive, or a layer tar.

    A docker-archive is known by its ``manifest.json`` (a list of images with
    ``Layers``), not by the names of its other members, which differ between
    writers; a manifest that cannot be parsed falls back to those names. An
    OCI layout that also has a docker manifest (docker 25's save) is read as
    OCI. An uncompressed tar's headers are read with seeks over the data; a
    compressed one is a layer tar.
    """
    found: dict[str, tarfile.TarInfo] = {}
    only_image_names, docker_manifest = True, False
    try:
        with open(path, "rb") as f:
            if sniff_compression(f.read(8)) != "none":
                return "layer-tar"
        with tarfile.open(path, "r:") as t:
            for i, m in enumerate(t):
                name = m.name.strip("/").removeprefix("./")
                if name in ("oci-layout", "index.json", "manifest.json", "repositories"):
                    found[name] = m
                    docker_manifest |= name == "manifest.json" and _is_docker_manifest(t, m)
                elif name not in ("", ".", "blobs", "blobs/sha256") and not _HEX_NAME.match(name):
                    only_image_names = False
                    if not _archive_member(m):
                        return "layer-tar"   # e.g. bin/sh: only a layer holds that
                if i >= SNIFF_MEMBERS:
                    break
    except (tarfile.TarError, EOFError, OSError, InvalidLayer):
        return "layer-tar"        # extract_layer will say what is wrong with it
    if "oci-layout" in found and "index.json" in found and only_image_names:
        return "oci-layout"
    if docker_manifest or "manifest.json" in found and only_image_names:
        return "docker-archive"   # open_image says what is wrong with its manifest
    return "layer-tar"


_ARCHIVE_FILE = re.compile(r"(^|/)(json|VERSION|layer\.tar|(sha256:)?[0-9a-f]{64})$"
                           r"|\.(tar|tar\.gz|tgz|tar\.zst|json)$")


def _archive_member(m: tarfile.TarInfo) -> bool:
    """Could ``m`` be part of an image archive, whatever its writer's naming: a directory,
    a link, or a file named like a layer blob or a config."""
    if m.isdir() or m.issym():
        return True
    return m.isfile() and bool(_ARCHIVE_FILE.search(m.name))


def _is_docker_manifest(t: tarfile.TarFile, m: tarfile.TarInfo) -> bool:
    """``manifest.json`` has the shape of a docker manifest (a list of images with
    ``Layers``), as for a directory; ``open_image`` then checks what it names."""
    if not m.isfile() or m.size > MAX_JSON:
        return False
    try:
        data = load_json(t.extractfile(m).read(), "manifest.json")
    except InvalidLayer:
        return False
    return isinstance(data, list) and bool(data) and \
        all(isinstance(e, dict) and "Layers" in e for e in data)


# ---- reading ------------------------------------------------------------------

def open_image(path, ref: str | None = None) -> Image:
    """Open the image in an OCI layout or docker-archive (directory or tar) at ``path``.

    ``ref`` picks an image by ref name / tag when there are several.
    """
    path = os.fsdecode(path)
    if not os.path.exists(path):
        raise NotFound(f"{path} does not exist")
    source = _DirSource(path) if os.path.isdir(path) else _TarSource(path)
    try:
        if source.exists("oci-layout") and source.exists("index.json"):
            return _read_oci(source, ref)
        if source.exists("manifest.json"):
            return _read_docker(source, ref)
        raise InvalidLayer(f"{path} is not an OCI image layout or docker-archive "
                           "(no oci-layout + index.json, no manifest.json)")
    except MergefsError:
        source.close()
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        # JSON of the wrong shape (a string where an object belongs...): one typed error
        source.close()
        raise InvalidLayer(f"{path}: malformed image metadata ({type(e).__name__}: {e})") from None
    except BaseException:
        source.close()
        raise


def _blob_path(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidLayer(f"unsupported or malformed digest {digest!r} (sha256 only)")
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _read_blob_json(source: _Source, desc: dict) -> dict:
    path = _blob_path(desc.get("digest"))
    if not isinstance(desc.get("size", 0), int) or desc.get("size", 0) > MAX_JSON:
        raise InvalidLayer(f"{path}: a {desc.get('size')}-byte manifest or config is not plausible")
    with _Verified(source.open(path), desc["digest"], desc.get("size"), path) as f:
        data = f.read()
        f.read()       # end of blob: verify
    return load_json(data, path)


def _ref_of(d: dict) -> str:
    ann = d.get("annotations")
    return ann.get(REF_NAME, "?") if isinstance(ann, dict) else "?"


def _pick(descs: list[dict], ref: str | None, what: str) -> dict:
    """The image ``ref`` names: its ref name, a unique manifest digest (prefix), or the
    tag part of a ``repo:tag`` ref name."""
    if ref is not None:
        hits = [d for d in descs if _ref_of(d) == ref] or \
            [d for d in descs if ref.startswith("sha256:") and len(ref) > 14
             and str(d.get("digest", "")).startswith(ref)] or \
            [d for d in descs if _ref_of(d).rsplit(":", 1)[-1] == ref and ":" in _ref_of(d)]
        if not hits:
            raise NotFound(f"no image {ref!r} in {what} (it has "
                           f"{', '.join(sorted(map(_ref_of, descs)))})")
        if len({d.get("digest") for d in hits}) > 1:
            raise InvalidLayer(f"{ref!r} names {len(hits)} images in {what}; give a digest")
        return hits[0]
    if len(descs) != 1:
        raise InvalidLayer(f"{what} holds {len(descs)} images ({', '.join(sorted(map(_ref_of, descs)))}); "
                           "name one (import --image REF)")
    return descs[0]


def _platform_manifest(source: _Source, index: dict) -> dict:
    arch = oci_architecture()
    descs = index.get("manifests") or []
    hits = [d for d in descs if d.get("platform", {}).get("os", "linux") == "linux"
            and d.get("platform", {}).get("architecture", arch) == arch]
    if not hits:
        raise NotFound(f"the image index has no manifest for linux/{arch}")
    return hits[0]


def _read_oci(source: _Source, ref: str | None) -> Image:
    index = source.read_json("index.json")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidLayer("index.json has no manifests list")
    desc = _pick(index["manifests"], ref, "index.json")
    ref_name = desc.get("annotations", {}).get(REF_NAME)
    for _ in range(4):           # nested indexes (multi-platform images)
        if desc.get("mediaType") not in (INDEX, DOCKER_LIST):
            break
        desc = _platform_manifest(source, _read_blob_json(source, desc))
    manifest = _read_blob_json(source, desc)
    if manifest.get("mediaType", MANIFEST) not in (MANIFEST, DOCKER_MANIFEST) or \
            "layers" not in manifest:
        raise InvalidLayer(f"{desc.get('digest')} is not an image manifest")
    config = _read_blob_json(source, manifest["config"])
    diff_ids = _diff_ids(config, len(manifest["layers"]))
    layers = []
    for layer, diff_id in zip(manifest["layers"], diff_ids):
        if layer.get("mediaType") not in LAYER_TYPES:
            raise InvalidLayer(f"layer {layer.get('digest')} has unsupported media type "
                               f"{layer.get('mediaType')!r}")
        layers.append(LayerDescriptor(layer["mediaType"], layer["digest"], layer.get("size"),
                                      diff_id, _blob_path(layer["digest"])))
    return Image("oci-layout", ref_name, config, manifest["config"]["digest"], desc["digest"],
                 layers, source)


def _diff_ids(config: dict, n: int) -> list[str]:
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != n:
        raise InvalidLayer(f"the image config lists {len(diff_ids or [])} diff_ids for {n} layers")
    for d in diff_ids:
        _blob_path(d)     # validates the form
    return diff_ids


def _read_docker(source: _Source, ref: str | None) -> Image:
    entries = source.read_json("manifest.json")
    if not isinstance(entries, list) or not entries:
        raise InvalidLayer("manifest.json is not a non-empty list")
    if ref is not None:
        hits = [e for e in entries if ref in (e.get("RepoTags") or [])] or \
            [e for e in entries if any(t.rsplit(":", 1)[-1] == ref for t in e.get("RepoTags") or [])] or \
            [e for e in entries if ref.startswith("sha256:") and len(ref) > 14
             and (_hex_digest(str(e.get("Config"))) or "").startswith(ref)]
        if not hits:
            raise NotFound(f"no image tagged {ref!r} in manifest.json")
        entry = hits[0]
    elif len(entries) != 1:
        tags = sorted(t for e in entries for t in (e.get("RepoTags") or ["?"]))
        raise InvalidLayer(f"manifest.json holds {len(entries)} images ({', '.join(tags)}); "
                           "name one (import --image REF)")
    else:
        entry = entries[0]
    config_name = entry.get("Config")
    if not isinstance(config_name, str):
        raise InvalidLayer("manifest.json entry has no Config")
    config_digest = _hex_digest(config_name)
    with _Verified(source.open(config_name), config_digest, None, config_name) as f:
        data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise InvalidLayer(f"{config_name}: an image config over {MAX_JSON} bytes")
        f.read()
    config = load_json(data, config_name)
    names = entry.get("Layers") or []
    diff_ids = _diff_ids(config, len(names))
    layers = [LayerDescriptor(DOCKER_ARCHIVE_LAYER, _hex_digest(n), None, d, n)
              for n, d in zip(names, diff_ids)]
    tags = entry.get("RepoTags") or []
    return Image("docker-archive", tags[0] if tags else None, config, config_digest, None,
                 layers, source)


def _hex_digest(name: str) -> str | None:
    """``<hex>.json``, ``blobs/sha256/<hex>`` name their content's digest; legacy names do not."""
    m = _HEX_NAME.match(name)
    if m and m.group(3) in (None, ".json"):
        return "sha256:" + m.group(2)
    return None
