"""Fuzzing the image readers (OCI layouts, docker-archives) and the tar reader's corpus of
known-bad inputs (issue 11): every input gives a tree or a typed error (MergefsError or
OSError), never RecursionError, UnicodeError, TypeError or another internal error, and a
failed extraction leaves nothing behind."""
from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
import shutil
import tarfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mergefs.errors import MergefsError
from mergefs.oci import _tar, detect_source, extract_layer, open_image

from ..conftest import needs_root
from .conftest import member, tar_bytes
from .test_image import make_layout


def _raw(name: bytes, typ: bytes, **fields) -> bytes:
    """One hand-written ustar header (re-sealed) with some fields overwritten."""
    head = bytearray(_tar._ustar(name, typ, 0o644, 0, 0, 0, 0))
    for at, value in fields.values():
        head[at:at + len(value)] = value
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head)


EXAMPLES = int(os.environ.get("MERGEFS_FUZZ_EXAMPLES", "150"))   # more for a long fuzzing run

# The corpus: inputs that once crashed or misreported (issue 11 items 7, 8, 9, 15).
CORPUS = {
    "xattr-200k": tar_bytes([member("f", data=b"x", pax={"SCHILY.xattr.user.big": "v" * 200_000})]),
    "xattr-empty-name": tar_bytes([member("f", data=b"x", pax={"SCHILY.xattr.": "x"})]),
    "xattr-non-utf8": tar_bytes([member("f", data=b"x", pax={
        "LIBARCHIVE.xattr.user.%FF%FEname": base64.b64encode(b"v").decode()})]),
    "xattr-bad-base64": tar_bytes([member("f", data=b"x", pax={
        "LIBARCHIVE.xattr.user.a": "%%%"})]),
    "xattr-nul-in-name": tar_bytes([member("f", data=b"x", pax={"SCHILY.xattr.user.a\0b": "v"})]),
    "deep-3000": tar_bytes([member("a/" * 3000 + "f", data=b"x")]),
    "deep-257-dirs": tar_bytes([member("d/" * 257, "dir")]),
    "gnu-sparse": _raw(b"s", b"S") + bytes(1024),
    "uid-base256-huge": _raw(b"u", b"0", uid=(108, b"\xff" * 8)) + bytes(1024),
    "mtime-base256-huge": _raw(b"m", b"0", mtime=(136, b"\x80" + b"\xff" * 11)) + bytes(1024),
    "size-garbage": _raw(b"z", b"0", size=(124, b"zzzzzzzzzzz\0")) + bytes(1024),
    "pax-size-negative": tar_bytes([member("f", data=b"", pax={"size": "-5"})]),
    "pax-uid-text": tar_bytes([member("f", data=b"", pax={"uid": "root"})]),
    "pax-mtime-nan": tar_bytes([member("f", data=b"", pax={"mtime": "nan"})]),
}


@needs_root
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_tars_give_a_typed_error_or_a_tree(tmp_path, name):
    (tmp_path / "l.tar").write_bytes(CORPUS[name])
    try:
        extract_layer(tmp_path / "l.tar", tmp_path / "dest")
    except (MergefsError, OSError) as e:
        assert "\n" not in str(e) and len(str(e)) < 1000, e
        assert not (tmp_path / "dest").exists()


# -- OCI layouts: any JSON value anywhere in index, manifest or config ---------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)
LAYER = tar_bytes([member("d", "dir"), member("d/f", data=b"hi")])


def _set(doc, path: list, value):
    """doc with the value at ``path`` (keys and indexes; a missing one is added) replaced."""
    doc = copy.deepcopy(doc)
    cur = doc
    for key in path[:-1]:
        if isinstance(cur, dict):
            cur = cur.setdefault(key if isinstance(key, str) else str(key), {})
        elif isinstance(cur, list) and cur:
            cur = cur[key % len(cur)] if isinstance(key, int) else cur[0]
        else:
            return value
    if isinstance(cur, dict):
        cur[path[-1] if isinstance(path[-1], str) else str(path[-1])] = value
    elif isinstance(cur, list) and cur:
        cur[path[-1] % len(cur) if isinstance(path[-1], int) else 0] = value
    return doc


def _rewrite_blob(layout, old_digest: str, data: bytes) -> str:
    """Replace a blob, returning its new digest (so the mutation reaches the parser)."""
    (layout / "blobs/sha256" / old_digest.split(":")[1]).unlink()
    new = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / new).write_bytes(data)
    return "sha256:" + new


KEYS = st.sampled_from(["manifests", "mediaType", "digest", "size", "annotations", "layers",
                        "config", "rootfs", "diff_ids", "platform", 0, 1, "x"])


def _read_all(src, dest) -> str:
    kind = detect_source(src)
    if kind in ("oci-layout", "docker-archive"):
        with open_image(src) as img:
            for i, (desc, reader) in enumerate(img.iter_layers()):
                extract_layer(reader, dest / f"l{i}", expected_diff_id=desc.diff_id)
    return kind


@needs_root
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(target=st.sampled_from(["index", "manifest", "config"]),
       path=st.lists(KEYS, min_size=1, max_size=4), value=JSON)
def test_fuzzed_oci_layout_metadata_fails_cleanly(tmp_path_factory, target, path, value):
    base = tmp_path_factory.mktemp("fz")
    layout = make_layout(base, [LAYER])
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads((layout / "blobs/sha256" / mdesc["digest"][7:]).read_bytes())
    if target == "index":
        (layout / "index.json").write_text(json.dumps(_set(index, path, value)))
    elif target == "manifest":
        data = json.dumps(_set(manifest, path, value)).encode()
        mdesc["digest"], mdesc["size"] = _rewrite_blob(layout, mdesc["digest"], data), len(data)
        (layout / "index.json").write_text(json.dumps(index))
    else:
        config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
        data = json.dumps(_set(config, path, value)).encode()
        manifest["config"]["digest"] = _rewrite_blob(layout, manifest["config"]["digest"], data)
        manifest["config"]["size"] = len(data)
        mdata = json.dumps(manifest).encode()
        mdesc["digest"], mdesc["size"] = _rewrite_blob(layout, mdesc["digest"], mdata), len(mdata)
        (layout / "index.json").write_text(json.dumps(index))
    (base / "out").mkdir()
    try:
        event(_read_all(layout, base / "out"))
    except (MergefsError, OSError) as e:
        event(type(e).__name__)
        assert "\n" not in str(e)
    shutil.rmtree(base)


# -- docker-archives: fuzzed manifest.json and tar headers -------------------------------
def _docker_archive(manifest) -> bytes:
    diff_id = "sha256:" + hashlib.sha256(LAYER).hexdigest()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, blob in (("lay/layer.tar", LAYER), ("cfg.json", config),
                           ("manifest.json", json.dumps(manifest).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            t.addfile(ti, io.BytesIO(blob))
    return buf.getvalue()


GOOD_MANIFEST = [{"Config": "cfg.json", "RepoTags": ["r:t"], "Layers": ["lay/layer.tar"]}]
GOOD_ARCHIVE = _docker_archive(GOOD_MANIFEST)


@needs_root
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.lists(st.sampled_from([0, "Config", "Layers", "RepoTags", "x"]), min_size=1,
                     max_size=3),
       value=JSON | st.sampled_from(["../etc/passwd", "/etc/passwd", "cfg.json", "lay",
                                     "lay/layer.tar", "", "manifest.json"]),
       edits=st.lists(st.tuples(st.integers(0, len(GOOD_ARCHIVE) - 1), st.integers(0, 255)),
                      max_size=3))
def test_fuzzed_docker_archive_fails_cleanly(tmp_path_factory, path, value, edits):
    base = tmp_path_factory.mktemp("fz")
    raw = bytearray(_docker_archive(_set(GOOD_MANIFEST, path, value)))
    for at, byte in edits:
        raw[at % len(raw)] = byte
    (base / "img.tar").write_bytes(bytes(raw))
    (base / "out").mkdir()
    try:
        event(_read_all(base / "img.tar", base / "out"))
    except (MergefsError, OSError) as e:
        event(type(e).__name__)
        assert "\n" not in str(e)
    shutil.rmtree(base)


@needs_root
def test_good_docker_archive_with_plain_names_reads(tmp_path):
    """The fuzzer's seed is itself a valid archive (item 12: found by its manifest)."""
    (tmp_path / "img.tar").write_bytes(GOOD_ARCHIVE)
    assert detect_source(tmp_path / "img.tar") == "docker-archive"
    (tmp_path / "out").mkdir()
    _read_all(tmp_path / "img.tar", tmp_path / "out")
    assert (tmp_path / "out/l0/d/f").read_bytes() == b"hi"
