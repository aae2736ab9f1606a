"""The copy-up of a lower regular file in C (``_fastpath.copy_up_file``, _fastcopy.h).

``Upper.copy_up_file`` does in one C call what ``Upper.stage_file`` then
``Upper.publish`` (keeping the parent's times) do in Python (U4: data, owner,
mode, xattrs, times, in the A1 order; the inode number recorded, U8). Two
checks of it:

- the same lower files copied into two uppers, one by C and one by the Python
  functions it replaces: the two uppers are equal, entry by entry (lstat
  fields, every xattr, bytes), the parents keep their times, the work dirs are
  empty; for set-id and sticky modes, owners other than the server's, content
  and overlay-format xattrs, a file capability, an empty and a sparse file, a
  hardlinked file, a copy without data (O_TRUNC) and a name taken by a whiteout;
- appends, a chmod and a truncate of lower files through a writable mount
  (each copies its file up), against kernel overlayfs over the same layer: the
  two uppers hold the same modes, owners, content xattrs, bytes and directory
  times, and each file keeps its inode number; with the fast path on, the
  appends were C's (``fast_write_copied``).
"""
from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from mergefs.layer import is_overlay_private
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.union.fastpath import compiled
from mergefs.union.upper import Upper

from ..conftest import needs, needs_overlay
from .test_copyup_direct import c_copies_up
from .test_fastpath import fast, fast_path_expected, on_kernel_overlay, served, writable  # noqa: F401

pytestmark = pytest.mark.timeout(120)

# a v2 file capability: cap_net_bind_service permitted and effective
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def lower_spec(hardlinks: bool = True, whiteout_name: bool = True) -> LayerSpec:
    spec = (LayerSpec().dir("a", mtime_ns=1_500_000_000_123_456_789)
            .file("a/plain", b"plain\n")
            .file("a/user640", b"u" * 5000, mode=0o640, uid=7, gid=8)
            .file("a/suid", b"#!/bin/sh\n", mode=0o4755)
            .file("a/sgid", b"g", mode=0o2750, uid=5, gid=6)
            .file("a/sticky", b"s", mode=0o1604)
            .file("a/none", b"n", mode=0o000)
            .file("a/empty", b"")
            .file("a/xattrs", b"x", xattrs={"user.k": b"value", "trusted.t": b"tv",
                                            "trusted.overlay.origin": b"format, not content"})
            .file("a/cap", b"c", mode=0o755, xattrs={"security.capability": CAPABILITY})
            .file("a/big", bytes(range(256)) * 1200, mode=0o600, uid=1000, gid=1000)
            .file("a/trunc", b"to be dropped"))
    if hardlinks:
        spec.file("a/hard1", b"h").hardlink("a/hard2", "a/hard1")
    if whiteout_name:
        spec.file("a/wh", b"over a whiteout")
    return spec


def names(spec: LayerSpec) -> list[str]:
    return sorted(os.fsdecode(p).split("/")[1] for p in spec.entries if p.count(b"/") == 1)


def entry(path: Path) -> tuple:
    """An upper entry as compared: lstat fields, every xattr, bytes (holes as zeros)."""
    st = os.lstat(path)
    xattrs = {a: os.getxattr(path, a, follow_symlinks=False)
              for a in sorted(os.listxattr(path, follow_symlinks=False))}
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink,
            st.st_blocks, st.st_atime_ns, st.st_mtime_ns, xattrs, path.read_bytes())


def lower_and_upper(base: Path, spec: LayerSpec) -> tuple[Path, Upper]:
    """A lower layer of ``spec`` plus a sparse file, and an upper holding ``a`` (with
    times of its own) and a whiteout at ``a/wh``. A lower per upper: reading a file
    for its copy updates its atime (relatime), which the next copy would take."""
    [layer] = materialise_stack([spec], base / "layers")
    with open(layer / "a/sparse", "wb") as f:   # a hole, then a few bytes at 1 MiB
        f.seek(1 << 20)
        f.write(b"end")
    os.utime(layer / "a/sparse", ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))
    os.utime(layer / "a", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    for d in ("up/a", "wk"):
        (base / d).mkdir(parents=True)
    os.mknod(base / "up/a/wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.utime(base / "up/a", ns=(1_600_000_000_000_000_001, 1_600_000_000_000_000_002))
    return layer, Upper(str(base / "up"), str(base / "wk"))


@needs("root")
def test_U4_copy_up_in_c_makes_the_upper_python_makes(tmp_path):
    if compiled("copy_up_file") is None:
        assert not fast_path_expected(), "the C module is not built from these sources"
        pytest.skip("no C module built from these sources")
    spec = lower_spec()
    # hard2 is hard1's lower file, whose atime the copy of hard1 moved
    todo = [n for n in names(spec) if n != "hard2"] + ["sparse"]
    ups, nlinks = {}, {}
    for how in ("c", "py"):
        layer, upper = lower_and_upper(tmp_path / how, spec)
        ups[how] = tmp_path / how / "up"
        parent = os.lstat(ups[how] / "a")
        root_fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
        dir_fd = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
        try:
            for number, name in enumerate(todo, 100):
                path, with_data = b"a/" + name.encode(), name != "trunc"
                if how == "c":
                    fd, ino, nlink, new = upper.copy_up_file(dir_fd, name.encode(), path,
                                                             number, with_data)
                    # linked by C (no lstat of the copy made), but over a whiteout
                    assert (new is None) == (name != "wh"), name
                    assert ino == os.lstat(ups[how] / "a" / name).st_ino, name
                    nlinks[name] = nlink
                else:                       # the Python functions C stands for
                    _, tmp, fd = upper.stage_file(root_fd, path, number, with_data)
                    upper.publish(tmp, path, keep_parent_times=True, fd=fd)
                os.close(fd)
        finally:
            os.close(dir_fd)
            os.close(root_fd)
            upper.close()
        assert os.listdir(tmp_path / how / "wk") == []
        now = os.lstat(ups[how] / "a")        # a copy-up is no change of the parent
        assert (now.st_atime_ns, now.st_mtime_ns) == (parent.st_atime_ns, parent.st_mtime_ns)
    for name in todo:
        assert entry(ups["c"] / "a" / name) == entry(ups["py"] / "a" / name), name
    got = entry(ups["c"] / "a/xattrs")[8]
    assert got["user.k"] == b"value" and got["trusted.t"] == b"tv"
    assert "trusted.overlay.origin" not in got          # the overlay format's own: not copied
    assert got["trusted.overlay.mergefs-ino"] == b"%d" % (100 + todo.index("xattrs"))
    assert entry(ups["c"] / "a/cap")[8]["security.capability"] == CAPABILITY
    assert entry(ups["c"] / "a/trunc")[3] == 0           # no data asked for
    assert entry(ups["c"] / "a/sticky")[:3] == ("-rw----r-T", 0, 0)
    assert entry(ups["c"] / "a/user640")[:3] == ("-rw-r-----", 7, 8)
    assert nlinks["hard1"] == 2 and nlinks["plain"] == 1      # the lower file's, told by C


DIR_SPEC = (LayerSpec().dir("a", mtime_ns=1_500_000_000_123_456_789)
            .dir("a/plain").dir("a/sticky", mode=0o1777).dir("a/sgid", mode=0o2750, uid=5, gid=6)
            .dir("a/private", mode=0o700, uid=7, gid=8)
            .dir("a/xattrs", xattrs={"user.d": b"dv", "trusted.overlay.opaque": b"y"})
            .file("a/xattrs/child", b"not copied with its directory")
            .dir("a/wh", mode=0o750))


@needs("root")
def test_U4_directory_copy_up_in_c_makes_the_upper_python_makes(tmp_path):
    """As above, for directories (no children; a name taken by a whiteout: C
    leaves the copy staged and Python swaps it with the whiteout)."""
    if compiled("copy_up_dir") is None:
        assert not fast_path_expected(), "the C module is not built from these sources"
        pytest.skip("no C module built from these sources")
    todo = names(DIR_SPEC)
    ups = {}
    for how in ("c", "py"):
        layer, upper = lower_and_upper(tmp_path / how, DIR_SPEC)
        ups[how] = tmp_path / how / "up"
        parent = os.lstat(ups[how] / "a")
        root_fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for number, name in enumerate(todo, 100):
                path = b"a/" + name.encode()
                if how == "c":
                    ino, new = upper.copy_up_dir(root_fd, path, path, number)
                    assert (new is None) == (name != "wh"), name
                    assert ino == os.lstat(ups[how] / "a" / name).st_ino, name
                else:
                    _, tmp = upper.stage_dir(root_fd, path, number)
                    upper.publish(tmp, path, keep_parent_times=True)
        finally:
            os.close(root_fd)
            upper.close()
        assert os.listdir(tmp_path / how / "wk") == []
        now = os.lstat(ups[how] / "a")
        assert (now.st_atime_ns, now.st_mtime_ns) == (parent.st_atime_ns, parent.st_mtime_ns)
    for name in todo:
        c, py = (ups[how] / "a" / name for how in ("c", "py"))
        assert entry_of_dir(c) == entry_of_dir(py), name
        assert os.listdir(c) == []                      # no children
    got = entry_of_dir(ups["c"] / "a/xattrs")[6]
    assert got["user.d"] == b"dv" and "trusted.overlay.opaque" not in got
    assert entry_of_dir(ups["c"] / "a/sgid")[:3] == ("drwxr-s---", 5, 6)
    assert entry_of_dir(ups["c"] / "a/sticky")[0] == "drwxrwxrwt"


def entry_of_dir(path: Path) -> tuple:
    st = os.lstat(path)
    xattrs = {a: os.getxattr(path, a, follow_symlinks=False)
              for a in sorted(os.listxattr(path, follow_symlinks=False))}
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, st.st_atime_ns,
            st.st_mtime_ns, xattrs)


def upper_tree(up: Path) -> dict:
    """What the copy-ups left in an upper, comparable across kernel overlayfs and
    mergefs: each entry's mode, owner, content xattrs (not the overlay format's
    own, which each writes its way), a file's size and bytes, a directory's mtime
    (its atime moves when this reads it)."""
    out = {}
    for dirpath, dirs, files in os.walk(up):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            xattrs = {a: os.getxattr(p, a, follow_symlinks=False)
                      for a in sorted(os.listxattr(p, follow_symlinks=False))
                      if not is_overlay_private(a)}
            out[str(p.relative_to(up))] = (
                stat.filemode(st.st_mode), st.st_uid, st.st_gid, xattrs,
                st.st_mtime_ns if stat.S_ISDIR(st.st_mode) else (st.st_size, p.read_bytes()))
    return out


def copy_up_steps(mnt: Path) -> list:
    """Appends to most lower files (each first write copies its file up), a chmod
    and a truncate of two others; whether each file kept its inode number, and
    the times of the one whose copy-up only a chmod followed."""
    todo = names(lower_spec(hardlinks=False, whiteout_name=False))
    before = {n: os.lstat(mnt / "a" / n).st_ino for n in todo}
    for name in todo:
        if name not in ("trunc", "plain"):
            with open(mnt / "a" / name, "ab") as f:
                f.write(b"!")
    os.truncate(mnt / "a/trunc", 0)
    os.chmod(mnt / "a/plain", 0o600)
    st = os.lstat(mnt / "a/plain")
    return [before == {n: os.lstat(mnt / "a" / n).st_ino for n in todo},
            st.st_atime_ns, st.st_mtime_ns]


@needs("root")
@needs_overlay
def test_U4_copy_ups_in_c_leave_the_upper_kernel_overlay_leaves(tmp_path, union_mount, fast):
    """(Hardlinks aside: kernel overlayfs without index=on breaks them, mergefs keeps
    them, writable.py.)"""
    spec = lower_spec(hardlinks=False, whiteout_name=False)
    mnt = writable(tmp_path, union_mount, spec)
    ours = copy_up_steps(mnt)
    counts = served(union_mount)
    theirs = on_kernel_overlay(tmp_path, spec, copy_up_steps)
    assert ours == theirs and ours[0], (ours, theirs)
    assert upper_tree(tmp_path / "m" / "up") == upper_tree(tmp_path / "k" / "up")
    if c_copies_up(union_mount, fast):
        assert counts.get("fast_write_copied", 0) == len(names(spec)) - 2, counts
