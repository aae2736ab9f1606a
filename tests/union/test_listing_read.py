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
