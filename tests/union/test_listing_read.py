"""Layer directories read by the C reader (``_fastpath.layer_entries``) and the
read-ahead of ``UnionView.merged``: the same listings as the Python reader and
as kernel overlayfs (M1-M3, D1-D3, U1)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergefs.layer import read_layer_dir
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.union.fastpath import compiled

from ..conftest import needs_overlay
from .test_readdir import listing, mounted_pair

ODD = b"caf\xe9-\xff"                      # not UTF-8


def stack() -> list[LayerSpec]:
    """Whiteouts, an opaque directory, names not UTF-8, a char device that is
    not a whiteout, and a directory over two 32 KiB getdents buffers."""
    base = (LayerSpec().file("m/low", b"l").file("m/gone", b"g").file("o/hidden", b"h")
            .dir("w/old").file(os.fsdecode(b"m/" + ODD), b"odd").char("m/tty", 5, 0)
            .file("later/a", b"a").file("later/b", b"b").file("opq/under", b"u"))
    for i in range(1200):
        base = base.file(f"big/{'n' * 40}{i:05d}", b"")
    mid = (LayerSpec().whiteout("m/gone").opaque_dir("o").file("o/top", b"t")
           .whiteout("w/old").whiteout(f"big/{'n' * 40}00007").file("m/mid", b"m")
           .file(os.fsdecode(b"m/sub-" + ODD + b"/x"), b"x"))
    return [base, mid]


@pytest.mark.parametrize("fmt", ["overlay", "oci"])
def test_C_reader_reads_as_the_python_one(tmp_path, fmt):
    """Every directory of every layer: entries, whiteouts, opacity alike."""
    scan = compiled("layer_entries")
    if scan is None:
        pytest.skip("no compiled _fastpath")
    for layer in materialise_stack(stack(), tmp_path, fmt):
        for d, _, _ in os.walk(layer):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                py = read_layer_dir(fd, fmt)
            finally:
                os.close(fd)
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                c = read_layer_dir(fd, fmt, scan)
            finally:
                os.close(fd)
            assert c == py, d
            if d.endswith("/big") and layer.name == "l0":
                assert len(c.entries) == 1200


@needs_overlay
def test_D1_D3_listings_and_later_changes_as_kernel_overlay(tmp_path, union_mount):
    """Listed whole (children read ahead), then a whiteout and an opaque directory
    made through the mount in directories already read ahead: listed as kernel
    overlayfs lists them."""
    mnt, ovl_cm = mounted_pair(tmp_path, union_mount, stack())
    with ovl_cm as ovl:
        ovl = Path(ovl)
        for root in (mnt, ovl):
            os.listdir(root)                       # the children read ahead, not listed
        for root in (mnt, ovl):
            os.unlink(root / "later" / "a")        # a whiteout in the upper
            os.unlink(root / "opq" / "under")
            os.rmdir(root / "opq")
            os.mkdir(root / "opq")                 # opaque in the upper
            (root / "opq" / "new").write_bytes(b"n")
        assert listing(mnt) == listing(ovl)
        assert sorted(os.listdir(mnt / "later")) == ["b"]
        assert os.listdir(mnt / "opq") == ["new"]
        assert (mnt / os.fsdecode(b"m/" + ODD)).read_bytes() == b"odd"
        assert len(os.listdir(mnt / "big")) == 1199


def test_U1_merged_reads_a_lower_child_once_and_not_a_shared_one(tmp_path):
    """``merged`` of a lower child directory reads it whole and the listing that
    follows takes that read (no second read of the layer directory); a view whose
    stack cache holds the listing already reads only the markers."""
    from mergefs.layer import Layer
    from mergefs.union.lowercache import LowerCache, SharedUnionView

    layers = materialise_stack(stack(), tmp_path, "overlay")
    cache = LowerCache()
    first = SharedUnionView([Layer(str(p)) for p in layers], cache)
    root = first.inodes.get(1)
    node = first.listing(root)[b"m"]
    assert first.merged(root, b"m", node) is True
    assert set(first._ahead) == {(node.top, b"m")}
    calls = []
    read = first.resolver.layer_dir
    first.resolver.layer_dir = lambda *a: calls.append(a) or read(*a)
    child = first.lookup(root, b"m")
    assert b"gone" not in first.listing(child) and b"low" in first.listing(child)
    assert calls == [(0, b"m")] and not first._ahead      # the top layer's came from merged

    second = SharedUnionView([Layer(str(p)) for p in layers], cache)
    root2 = second.inodes.get(1)
    assert second.merged(root2, b"m", second.listing(root2)[b"m"]) is True
    assert not second._ahead
    first.close()
    second.close()
