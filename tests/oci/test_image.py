"""Image readers: what kind of source a path is, and hostile or broken image metadata."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mergefs.errors import InvalidLayer, NotFound, UnsafeContent
from mergefs.oci import detect_source, export_layout, extract_layer, open_image
from mergefs.testing.builders import LayerSpec, materialise

from .conftest import member, tar_bytes


def put_blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def make_layout(tmp_path, layers: list[bytes], diff_ids=None, ref="v1",
                layer_type="application/vnd.oci.image.layer.v1.tar") -> Path:
    """A hand-made OCI layout (so tests can break any part of it)."""
    out = tmp_path / "layout"
    out.mkdir()
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descs = [{"mediaType": layer_type, **put_blob(out, l)} for l in layers]
    if diff_ids is None:
        diff_ids = ["sha256:" + hashlib.sha256(l).hexdigest() for l in layers]
    config = put_blob(out, json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
    manifest = put_blob(out, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": descs}).encode())
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"org.opencontainers.image.ref.name": ref}}]}))
    return out


def test_detect_source_kinds(tmp_path, write_tar):
    layer = materialise(LayerSpec().file("etc/x", b"1").file("manifest.json", b"{}"),
                        tmp_path / "dir")
    assert detect_source(layer) == "layer-dir"
    assert detect_source(write_tar([member("./"), member("bin", "dir")], name="l.tar")) == "layer-tar"
    gz = tmp_path / "l.tgz"
    gz.write_bytes(tar_bytes([member("manifest.json", data=b"[]"), member("etc", "dir")], "gzip"))
    assert detect_source(gz) == "layer-tar"      # a layer that happens to hold manifest.json
    assert detect_source(make_layout(tmp_path, [tar_bytes([member("f")])])) == "oci-layout"
    with pytest.raises(NotFound):
        detect_source(tmp_path / "missing")
    with pytest.raises(InvalidLayer, match="not an OCI image"):
        open_image(tmp_path / "l.tar")


def test_layout_layers_bottom_first_with_diff_ids(tmp_path):
    l0, l1 = tar_bytes([member("a", data=b"0")]), tar_bytes([member(".wh.a")], "gzip")
    layout = make_layout(tmp_path, [l0, l1], diff_ids=[
        "sha256:" + hashlib.sha256(l0).hexdigest(),
        "sha256:" + hashlib.sha256(tar_bytes([member(".wh.a")])).hexdigest()])
    with open_image(layout) as img:
        assert img.ref_name == "v1" and len(img.layers) == 2
        results = [extract_layer(r, tmp_path / f"x{i}", expected_diff_id=d.diff_id)
                   for i, (d, r) in enumerate(img.iter_layers())]
    assert [r.compression for r in results] == ["none", "gzip"]
    assert (tmp_path / "x0" / "a").read_bytes() == b"0"


def test_unknown_ref_is_not_found(tmp_path):
    layout = make_layout(tmp_path, [tar_bytes([member("f")])])
    with pytest.raises(NotFound, match="nope"):
        open_image(layout, "nope")


def test_diff_id_count_mismatch_is_invalid(tmp_path):
    layout = make_layout(tmp_path, [tar_bytes([member("f")])], diff_ids=[])
    with pytest.raises(InvalidLayer, match="diff_ids"):
        open_image(layout)


def test_wrong_diff_id_is_caught_at_extraction(tmp_path):
    layout = make_layout(tmp_path, [tar_bytes([member("f")])], diff_ids=["sha256:" + "1" * 64])
    with open_image(layout) as img:
        desc = img.layers[0]
        with pytest.raises(InvalidLayer, match="diffID"):
            extract_layer(img.open_layer(desc), tmp_path / "x", expected_diff_id=desc.diff_id)
    assert not (tmp_path / "x").exists()


def test_missing_blob_is_not_found(tmp_path):
    layout = make_layout(tmp_path, [tar_bytes([member("f")])])
    with open_image(layout) as img:
        os.unlink(layout / img.layers[0].path)
        with pytest.raises(NotFound):
            img.open_layer(img.layers[0])


def test_unsupported_layer_media_type_is_invalid(tmp_path):
    layout = make_layout(tmp_path, [b"x"], layer_type="application/vnd.example.squashfs")
    with pytest.raises(InvalidLayer, match="media type"):
        open_image(layout)


def test_malformed_digest_cannot_name_a_path(tmp_path):
    layout = make_layout(tmp_path, [tar_bytes([member("f")])])
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../etc/passwd"
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidLayer, match="digest"):
        open_image(layout)


def test_docker_archive_layer_path_cannot_escape(tmp_path):
    archive = tmp_path / "evil.tar"
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["x:1"],
                            "Layers": ["../../etc/passwd"]}]).encode()
    archive.write_bytes(tar_bytes([member("manifest.json", data=manifest),
                                   member("c.json", data=config)]))
    with open_image(archive) as img:
        with pytest.raises(UnsafeContent):
            img.open_layer(img.layers[0])


def test_docker_archive_directory(tmp_path):
    """An unpacked docker-archive (manifest.json, <id>/layer.tar) is read as well."""
    layer = tar_bytes([member("hello", data=b"hi")])
    d = tmp_path / "unpacked"
    (d / "abc").mkdir(parents=True)
    (d / "abc" / "layer.tar").write_bytes(layer)
    config = json.dumps({"rootfs": {"type": "layers",
                                    "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}})
    (d / "cfg.json").write_text(config)
    (d / "manifest.json").write_text(json.dumps([{"Config": "cfg.json", "RepoTags": ["a:b"],
                                                  "Layers": ["abc/layer.tar"]}]))
    assert detect_source(d) == "docker-archive"
    with open_image(d, "b") as img:
        assert img.ref_name == "a:b" and img.kind == "docker-archive"
    with open_image(d) as img:
        for desc, reader in img.iter_layers():
            r = extract_layer(reader, tmp_path / "x", expected_diff_id=desc.diff_id)
    assert (tmp_path / "x" / "hello").read_bytes() == b"hi" and r.files == 1


def test_export_layout_reads_back(tmp_path):
    layer = materialise(LayerSpec().file("f", b"1"), tmp_path / "l")
    exported = export_layout([layer], tmp_path / "img", ref="r", compression="zstd")
    with open_image(tmp_path / "img", "r") as img:
        assert img.manifest_digest == exported.manifest_digest
        assert img.layers[0].media_type.endswith("+zstd")
        assert img.config["rootfs"]["diff_ids"] == [exported.layers[0].diff_id]


def test_unpacked_skopeo_style_docker_archive_links(tmp_path):
    """<id>/layer.tar -> ../<digest>.tar links are followed inside the image, never out."""
    layer = tar_bytes([member("hello", data=b"hi")])
    digest = hashlib.sha256(layer).hexdigest()
    d = tmp_path / "unpacked"
    (d / "abc").mkdir(parents=True)
    (d / f"{digest}.tar").write_bytes(layer)
    os.symlink(f"../{digest}.tar", d / "abc" / "layer.tar")
    os.symlink("../../../etc/passwd", d / "abc" / "evil.tar")
    (d / "cfg.json").write_text(json.dumps({"rootfs": {"type": "layers",
                                                       "diff_ids": ["sha256:" + digest]}}))
    (d / "manifest.json").write_text(json.dumps([{"Config": "cfg.json",
                                                  "Layers": ["abc/layer.tar"]}]))
    with open_image(d) as img:
        for desc, reader in img.iter_layers():
            extract_layer(reader, tmp_path / "x", expected_diff_id=desc.diff_id)
        with pytest.raises(UnsafeContent):
            img._source.open("abc/evil.tar")
    assert (tmp_path / "x" / "hello").read_bytes() == b"hi"


@pytest.mark.parametrize("mangle", [
    lambda i: i["manifests"][0].update(annotations=["not", "a", "dict"]),
    lambda i: i["manifests"][0].update(digest=42),
    lambda i: i.update(manifests="nope"),
    lambda i: i["manifests"].append(None),
])
def test_malformed_index_is_invalid(tmp_path, mangle):
    layout = make_layout(tmp_path, [tar_bytes([member("f")])])
    index = json.loads((layout / "index.json").read_text())
    mangle(index)
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises((InvalidLayer, NotFound)):
        open_image(layout, "v1")


def test_malformed_manifest_is_invalid(tmp_path):
    layout = make_layout(tmp_path, [tar_bytes([member("f")])])
    index = json.loads((layout / "index.json").read_text())
    bad = put_blob(layout, json.dumps({"schemaVersion": 2, "config": "x", "layers": [1]}).encode())
    index["manifests"][0].update(bad)
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidLayer):
        open_image(layout)
