"""Attributes of a directory that a copy-up changed are visible at once (U4).

A copy-up writes into the upper parent (rename into it, then its times are
restored as kernel overlayfs does): the parent's ctime changes. The kernel
caches directory attributes for a long time; unless the server invalidates
them, the old ctime stays until something refreshes it (a readdir drops the
cached atime, so the next stat fetches everything) and ``tar`` then reports
"file changed as we read it" for a directory nobody changed during the tar.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]


def test_U4_copy_up_parent_ctime_is_not_stale(tmp_path, union_mount):
    spec = LayerSpec()
    for i in range(20):
        spec = spec.file(f"a/f{i}", b"lower %d\n" % i)
    layers = materialise_stack([spec, LayerSpec().file("b/g", b"g\n")], tmp_path / "layers",
                               "overlay")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    for d in (mnt, mnt / "a"):
        os.stat(d)                        # cached by the kernel before the copy-ups
    for i in range(20):
        with open(mnt / f"a/f{i}", "ab") as f:
            f.write(b"more\n")
    for d in (mnt, mnt / "a"):
        before = os.stat(d).st_ctime_ns
        os.listdir(d)                     # drops the cached atime: the next stat asks
        assert os.stat(d).st_ctime_ns == before, d
    p = subprocess.run(["tar", "-cf", "/dev/null", "."], cwd=mnt, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "changed as we read it" not in p.stderr, p.stderr


def test_U4_copied_up_file_attrs_do_not_change_under_a_reader(tmp_path, union_mount):
    """A copy-up without a write (open for writing, then close): the file's cached
    attributes (the lower's ctime) would change at the next read's atime refresh."""
    layers = materialise_stack([LayerSpec().file("d/f", b"lower\n")], tmp_path / "layers",
                               "overlay")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    os.stat(mnt / "d/f")
    os.close(os.open(mnt / "d/f", os.O_RDWR))           # copy-up, nothing written
    # ... with real opens; no-open copies up at the first write, and an open alone
    # never reaches the server (docs/semantics.md, "Copy-up")
    assert os.path.exists(tmp_path / "up/d/f") != union_mount.writable_no_open
    before = os.stat(mnt / "d/f")
    assert (mnt / "d/f").read_bytes() == b"lower\n"
    after = os.stat(mnt / "d/f")
    assert (after.st_ctime_ns, after.st_size) == (before.st_ctime_ns, before.st_size)
