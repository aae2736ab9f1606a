"""Copy-up of a regular file by its first write, on a mount, against kernel overlayfs (U4).

What the copy carries (data of any size, holes, owner, mode, times, xattrs,
``security.capability``, hardlinks), what a failure leaves (ENOSPC on a real
full filesystem: the lower intact, no copy in the view, the upper or the work
dir), and that the writes after a copy-up reach the copy through the fd the
copy-up made (the C fast path serves them on a no-open mount).
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import struct

import pytest

from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs, needs_overlay
from .test_fastpath import fast_path_expected

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]

MIB = 1 << 20
# a file capability (VFS_CAP_REVISION_2, effective): cap_net_bind_service permitted
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def lower_stack(tmp_path):
    spec = (LayerSpec()
            .dir("d", mode=0o750, uid=5, gid=6)
            .file("d/small", b"small\n", mode=0o640, uid=7, gid=8, xattrs={"user.k": b"v"})
            .file("d/empty", b"", mode=0o600, uid=9, gid=9)
            .file("d/cap", b"#!/bin/true\n", mode=0o755,
                  xattrs={"security.capability": CAPABILITY, "user.a": b"1"})
            .file("d/suid", b"suid\n", mode=0o4755, uid=1, gid=1)
            .file("e/big", os.urandom(3 * MIB + 123), mode=0o644)
            .file("e/other", b"other\n")
            .hardlink("e/link2", "e/other"))
    layers = materialise_stack([spec, LayerSpec().file("top", b"top\n")], tmp_path / "layers",
                               "overlay")
    with open(layers[0] / "e/sparse", "wb") as f:      # a hole of 2 MiB, then data
        f.truncate(2 * MIB)
        f.seek(2 * MIB)
        f.write(b"after the hole\n")
    return layers


APPENDED = ("d/small", "d/empty", "d/cap", "d/suid", "e/big", "e/sparse", "e/link2")


def append_each(root) -> None:
    for rel in APPENDED:
        with open(os.path.join(root, rel), "ab") as f:
            f.write(b"+")


def comparable(view: tree.View) -> tree.View:
    """The appended files' mtimes are the time of the write on each system; the
    hardlinked pair is left out (kernel overlayfs with index=off, the oracle here,
    breaks it at copy-up; mergefs keeps it, as index=on: checked apart)."""
    return tree.View({p: a._replace(mtime_ns=0) if p.decode() in APPENDED else a
                      for p, a in view.entries.items() if p not in (b"e/other", b"e/link2")},
                     frozenset())


def on_mergefs_and_kernel(tmp_path, union_mount, layers, act):
    """``act(root)`` on a mergefs mount (upper ``up``) and on kernel overlayfs
    (upper ``kup``) over ``layers``: (the mount, its tree, the kernel's tree).
    The two upper roots get the same times (the root shows its upper's)."""
    for name in ("up", "wk", "kup", "kwk"):
        (tmp_path / name).mkdir()
    for name in ("up", "kup"):
        os.utime(tmp_path / name, ns=(1_700_000_000 * 10**9,) * 2)
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    act(mnt)
    with mounts.overlay_mount(layers, upper=tmp_path / "kup", work=tmp_path / "kwk") as kmnt:
        act(kmnt)
        expected = tree.capture(kmnt)
    return mnt, tree.capture(mnt), expected


@needs_overlay
def test_U4_append_copies_up_as_kernel_overlay(tmp_path, union_mount):
    layers = lower_stack(tmp_path)
    mnt, got, expected = on_mergefs_and_kernel(tmp_path, union_mount, layers, append_each)
    tree.assert_same(comparable(got), comparable(expected))
    for rel in APPENDED:     # every byte, the hole read back as zeros
        assert (mnt / rel).read_bytes() == (layers[0] / rel).read_bytes() + b"+", rel
    # the upper holds what kernel overlayfs's holds (owner, mode, xattrs, data)
    tree.assert_same(comparable(tree.capture(tmp_path / "up")),
                     comparable(tree.capture(tmp_path / "kup")), "uppers")
    assert got.groups == {frozenset({b"e/other", b"e/link2"})}
    assert (mnt / "e/other").read_bytes() == b"other\n+"
    assert os.stat(tmp_path / "up/e/other").st_ino == os.stat(tmp_path / "up/e/link2").st_ino
    # nothing staged is left behind
    assert [n for n in os.listdir(tmp_path / "wk") if n.startswith("#mergefs-")] == []
    # kernel overlayfs reads mergefs's upper as mergefs shows it
    with mounts.overlay_mount(list(layers) + [tmp_path / "up"]) as kmnt:
        tree.assert_same(tree.capture(kmnt), got, "kernel over mergefs's upper")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs: a real ENOSPC. Unmounted in teardown."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tiny", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        mounts.force_unmount(mnt)


def test_U4_copy_up_that_fills_the_disk_leaves_no_copy(tmp_path, union_mount, tiny_fs):
    data = os.urandom(2 * MIB)
    layers = materialise_stack([LayerSpec().file("d/big", data).file("d/small", b"s\n")],
                               tmp_path / "layers", "overlay")
    up, wk = tiny_fs / "up", tiny_fs / "wk"
    up.mkdir()
    wk.mkdir()
    free = os.statvfs(tiny_fs).f_bfree
    mnt = union_mount(layers, upper=up, work=wk)
    with pytest.raises(OSError) as e:
        with open(mnt / "d/big", "ab") as f:
            f.write(b"+")
    assert e.value.errno == errno.ENOSPC
    assert (layers[0] / "d/big").read_bytes() == data
    assert (mnt / "d/big").read_bytes() == data          # still the lower file
    assert not (up / "d/big").exists()
    assert [n for n in os.listdir(wk) if n.startswith("#mergefs-")] == []
    assert os.statvfs(tiny_fs).f_bfree >= free - 8       # the half copy's blocks are freed
    with open(mnt / "d/small", "ab") as f:               # the mount goes on working
        f.write(b"+")
    assert (up / "d/small").read_bytes() == b"s\n+"


def test_writes_after_a_copy_up_reach_the_copy_through_its_fd(tmp_path, union_mount):
    """The first write copies up; the next ones go to the copy (in C on a no-open
    mount: the copy-up's fd is the one the fd cache hands to the fast path)."""
    layers = materialise_stack([LayerSpec().file("d/f", b"lower\n")], tmp_path / "layers",
                               "overlay")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    fd = os.open(mnt / "d/f", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"1")
        _, pid, log = union_mount.started[-1]
        mounts.server_requests(pid, log, timeout=10)     # counts from here on
        for c in b"234":
            os.write(fd, bytes([c]))
    finally:
        os.close(fd)
    assert (tmp_path / "up/d/f").read_bytes() == b"lower\n1234"
    assert (mnt / "d/f").read_bytes() == b"lower\n1234"
    counts = mounts.server_requests(pid, log, timeout=10)
    fast = union_mount.writable_no_open and fast_path_expected() and \
        os.environ.get("MERGEFS_FASTPATH") != "0"
    if fast:
        assert counts.get("fast_write", 0) == 3 and "write" not in counts, counts
    with contextlib.suppress(FileNotFoundError):
        assert [n for n in os.listdir(tmp_path / "wk") if n.startswith("#mergefs-")] == []


def test_U4_U8_second_copy_up_into_a_copied_parent(tmp_path, union_mount):
    """The copy-up of a file whose parent the upper already holds (no copy-up of
    the parent, no call for it) keeps the parent's times (U4: a copy-up is no
    change of the parent, as kernel overlayfs), records the file's number on
    the copy (U8, through the copy's fd), and carries its owner, mode, data and
    xattrs; the number the mount shows does not change."""
    dir_mtime = 1_500_000_000_000_000_000
    specs = [LayerSpec().dir("d", mtime_ns=dir_mtime).file("d/a", b"a\n")
             .file("d/b", b"b" * 5000, mode=0o640, uid=123, gid=456,
                   xattrs={"user.k": b"v"})]
    layers = materialise_stack(specs, tmp_path / "layers")
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    mnt = union_mount(layers, upper=up, work=wk)
    ino = os.stat(mnt / "d/b").st_ino
    with open(mnt / "d/a", "ab") as f:        # copies d up, then a
        f.write(b"+")
    assert os.stat(up / "d").st_mtime_ns == dir_mtime
    with open(mnt / "d/b", "ab") as f:        # d is in the upper already
        f.write(b"+")
    st = os.stat(up / "d/b")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 123, 456)
    assert (up / "d/b").read_bytes() == b"b" * 5000 + b"+"
    assert os.getxattr(up / "d/b", "user.k") == b"v"
    assert os.stat(up / "d").st_mtime_ns == dir_mtime
    assert os.stat(mnt / "d/b").st_ino == ino
    prefix = "trusted" if os.geteuid() == 0 else "user"
    assert os.getxattr(up / "d/b", prefix + ".overlay.mergefs-ino") == b"%d" % ino
