"""Attributes a copy-up in a writable view changed are visible at once (U4).

As a standalone writable mount (test_copyup_attrs.py): a copy-up renames the
copy into its upper parent (whose ctime changes), makes the parent directory
in the upper when it was lower-only (new ctime and mtime for the merged
directory), and gives the file a new ctime. The kernel caches the
attributes of the views mount for a day; unless the server drops them, the
old ones stay until a readdir makes the kernel ask again, and ``tar`` reports
"file changed as we read it". Kernel overlayfs, the oracle, shows the upper's
attributes at once.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mergefs.testing import mounts
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs
from .test_views import views, writable  # noqa: F401 (a fixture)

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]

DIRS = (".", "a", "a/sub", "b")


def _layers(tmp_path: Path) -> list[Path]:
    spec = LayerSpec()
    for i in range(6):
        spec = spec.file(f"a/f{i}", b"lower %d\n" % i)
    spec = spec.file("a/sub/g", b"g\n").file("b/h", b"h\n")
    return materialise_stack([spec, LayerSpec().file("c/k", b"k\n")], tmp_path / "layers",
                             "overlay")


def _attrs(st: os.stat_result) -> tuple:
    """What a copy-up changes (a merged directory's link count is 1, as overlayfs)."""
    return st.st_ctime_ns, st.st_mtime_ns, st.st_mode, st.st_uid


def _change(root: Path) -> None:
    """Copy-ups of every kind, each after the kernel cached what it changes."""
    for d in DIRS:
        os.stat(root / d)
    for p in ("a/f0", "a/f1", "a/f2", "a/sub/g", "b/h"):
        os.stat(root / p)
    # first: the views mount drops the kernel's entry of a renamed shared file
    # asynchronously (after the rename returns), the other changes give it time
    os.rename(root / "b/h", root / "b/h2")        # a copy-up under another name
    with open(root / "a/f0", "ab") as f:          # content copy-up (a is copied up)
        f.write(b"more\n")
    os.close(os.open(root / "a/f1", os.O_RDWR))   # copy-up without a write
    os.chown(root / "a/f2", 1234, 1234)           # metadata copy-up
    (root / "a/sub/new").write_bytes(b"new\n")    # a new file in a lower directory
    os.mkdir(root / "b/d")                        # a new directory in a lower directory


def _check(root: Path, upper: Path, what: str) -> None:
    """The merged directories and copied files show their upper's attributes, also
    after a readdir made the kernel ask again."""
    want = {p: _attrs(os.lstat(upper / p)) for p in DIRS + ("a/f0", "a/f1", "a/f2", "b/h2")}
    got = {p: _attrs(os.lstat(root / p)) for p in want}
    assert got == want, f"{what}: cached attributes differ from the upper's"
    for d in DIRS:
        os.listdir(root / d)
    assert {p: _attrs(os.lstat(root / p)) for p in want} == want, what


def test_U4_copy_up_in_a_view_drops_the_kernels_cached_attributes(tmp_path, views):  # noqa: F811
    layers = _layers(tmp_path)
    up, wk = writable(tmp_path, "rw")
    rw = views.add("rw", layers, up, wk)
    ro = views.add("ro", layers)
    for p in ("a/f0", "a/f1", "a/f2"):     # shared with the read-only view first
        os.stat(ro / p)
    _change(rw)
    _check(rw, up, "writable view")
    oup, owk = writable(tmp_path, "ovl")
    (tmp_path / "ovl").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=oup, work=owk) as ovl:
        _change(ovl)
        _check(ovl, oup, "kernel overlay")
    assert os.lstat(ro / "a/f2").st_uid == 0          # the read-only view: unchanged
    p = subprocess.run(["tar", "-cf", "/dev/null", "."], cwd=rw, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "changed as we read it" not in p.stderr, p.stderr


def test_U4_copy_up_in_one_of_two_views_of_one_upper_stack(tmp_path, views):  # noqa: F811
    """Two writable views of the same lowers: a copy-up in one drops only its own
    directory's attributes; the other view's stay right (nothing changed there)."""
    layers = _layers(tmp_path)
    a = views.add("a", layers, *writable(tmp_path, "a"))
    b = views.add("b", layers, *writable(tmp_path, "b"))
    before = {p: _attrs(os.lstat(b / p)) for p in DIRS}
    _change(a)
    _check(a, tmp_path / "a-up", "view a")
    assert {p: _attrs(os.lstat(b / p)) for p in DIRS} == before
