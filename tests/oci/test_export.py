"""Export: deterministic layer tars, D4 explicit whiteouts, round trips through import."""
from __future__ import annotations

import io
import os
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings

import mergefs.oci as oci
from mergefs.errors import AlreadyExists
from mergefs.farm import build_farm
from mergefs.oci import export_layer_tar, export_layout, extract_layer, write_layer_tar
from mergefs.testing import tree
from mergefs.testing.builders import LayerSpec, materialise, materialise_stack
from mergefs.testing.strategies import layer_spec, stacks

from ..conftest import needs_root
from .test_extract import _d6, _normalise

PROPS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


def names_in(blob_path) -> list[str]:
    with tarfile.open(blob_path) as t:
        return t.getnames()


def test_public_api_is_pinned():
    assert sorted(oci.__all__) == sorted([
        "ExtractResult", "extract_layer", "clean_path", "Image", "LayerDescriptor", "open_image",
        "detect_source", "LayerBlob", "ExportedImage", "write_layer_tar", "export_layer_tar",
        "export_layout"])


@needs_root
def test_layer_tar_order_owners_times_and_links(tmp_path):
    spec = (LayerSpec().dir("b", uid=7, gid=8, mtime_ns=1_600_000_000_000_000_001)
            .file("b/z", b"z", xattrs={"user.k": b"v"}).file("a", b"a").hardlink("b/y", "a")
            .symlink("c", "/etc").whiteout("gone").opaque_dir("o"))
    layer = materialise(spec, tmp_path / "l")
    blob = export_layer_tar(layer, tmp_path / "l.tar")
    assert names_in(tmp_path / "l.tar") == [".", ".wh.gone", "a", "b", "b/y", "b/z", "c", "o",
                                            "o/.wh..wh..opq"]
    with tarfile.open(tmp_path / "l.tar") as t:
        b, y, z = t.getmember("b"), t.getmember("b/y"), t.getmember("b/z")
        assert (b.uid, b.gid, b.uname, b.gname) == (7, 8, "", "")
        assert b.pax_headers["mtime"] == "1600000000.000000001"
        assert y.islnk() and y.linkname == "a"
        assert z.pax_headers["SCHILY.xattr.user.k"] == "v"
    assert blob.media_type == "application/vnd.oci.image.layer.v1.tar"
    assert blob.digest == blob.diff_id


def test_same_layer_same_bytes(tmp_path):
    layer = materialise(LayerSpec().file("f", b"1").dir("d").file("d/g", b"2"), tmp_path / "l")
    outs = []
    for i, comp in enumerate((None, None, "gzip", "gzip", "zstd", "zstd")):
        buf = io.BytesIO()
        outs.append((comp, write_layer_tar(layer, buf, compression=comp).digest, buf.getvalue()))
    assert outs[0][1:] == outs[1][1:] and outs[2][1:] == outs[3][1:] and outs[4][1:] == outs[5][1:]


def test_D4_opaque_becomes_explicit_when_lower_is_known(tmp_path):
    lower = materialise(LayerSpec().file("d/x", b"x").dir("d/e").file("d/e/deep", b"1")
                        .file("d/e/kept-by-upper", b"2").file("other", b"o"), tmp_path / "lo")
    upper = materialise(LayerSpec().opaque_dir("d").dir("d/e").file("d/e/kept-by-upper", b"3")
                        .whiteout("other").whiteout("nothing-below"), tmp_path / "up")
    export_layer_tar(upper, tmp_path / "u.tar", lower=[lower])
    assert names_in(tmp_path / "u.tar") == [".", ".wh.other", "d", "d/.wh.x", "d/e",
                                            "d/e/.wh.deep", "d/e/kept-by-upper"]


def test_outputs_must_not_exist(tmp_path):
    layer = materialise(LayerSpec().file("f"), tmp_path / "l")
    (tmp_path / "taken").mkdir()
    with pytest.raises(AlreadyExists):
        export_layer_tar(layer, tmp_path / "taken")
    with pytest.raises(AlreadyExists):
        export_layout([layer], tmp_path / "taken")
    assert sorted(os.listdir(tmp_path)) == ["l", "taken"]


def _no_sockets(view: tree.View) -> tree.View:
    return tree.View({p: a for p, a in view.entries.items() if a.kind != "socket"}, view.groups)


@needs_root
@PROPS
@given(spec=layer_spec())
def test_single_layer_round_trip(tmp_path_factory, spec):
    """export_layer_tar then extract_layer gives the same overlay-format layer back."""
    base = tmp_path_factory.mktemp("rt")
    layer = materialise(spec, base / "l")
    export_layer_tar(layer, base / "l.tar.gz", compression="gzip")
    extract_layer(base / "l.tar.gz", base / "back")
    tree.assert_same(_normalise(tree.capture(base / "back", private_xattrs=True)),
                     _no_sockets(_d6(_normalise(tree.capture(layer, private_xattrs=True)))))


@needs_root
@PROPS
@given(specs=stacks(min_size=1, max_size=4))
def test_M5_D4_stack_round_trip_through_a_layout(tmp_path_factory, specs):
    """Merge(layers) == Merge(import(export_layout(layers))) with explicit whiteouts only."""
    base = tmp_path_factory.mktemp("stack")
    layers = materialise_stack(specs, base / "in")
    exported = export_layout(layers, base / "img", ref="r", compression=None)
    back = []
    with oci.open_image(base / "img", "r") as img:
        for i, (desc, reader) in enumerate(img.iter_layers()):
            extract_layer(reader, base / f"back{i}", expected_diff_id=desc.diff_id)
            back.append(base / f"back{i}")
    for blob in exported.layers:
        assert not any(n.endswith(".wh..wh..opq")
                       for n in names_in(base / "img" / "blobs" / "sha256" / blob.digest[7:]))
    build_farm(layers, base / "f_in")
    build_farm(back, base / "f_back")
    tree.assert_same(tree.capture(base / "f_back"), _no_sockets(tree.capture(base / "f_in")))
