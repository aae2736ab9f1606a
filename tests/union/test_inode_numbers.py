"""Inode numbers that survive copy-up, rename and remount (U2, U8)."""
from __future__ import annotations

import os

import pytest

from mergefs.testing.builders import LayerSpec, materialise_stack

from .conftest import stop_server


def inos(mnt, names) -> dict[str, int]:
    return {n: os.lstat(mnt / n).st_ino for n in names}


@pytest.mark.timeout(120)
def test_U8_st_ino_survives_copy_up_rename_and_remount(tmp_path, union_mount):
    specs = [LayerSpec().file("d/f", b"f").file("d/sub/g", b"g").file("h1", b"hard")
             .hardlink("d/h2", "h1").file("keep", b"k").dir("e/inner"),
             LayerSpec().file("d/top", b"t").symlink("l", "keep")]
    layers = materialise_stack(specs, tmp_path / "layers")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    names = ["d", "d/f", "d/sub", "d/sub/g", "h1", "d/h2", "keep", "e", "e/inner", "d/top", "l"]
    before = inos(mnt, names)
    assert before["h1"] == before["d/h2"]                       # H1
    assert len(set(before.values())) == len(names) - 1
    with open(mnt / "d/f", "ab") as f:                          # copy-up of a file
        f.write(b"+")
    with open(mnt / "h1", "ab") as f:                           # copy-up of a hardlink
        f.write(b"+")
    os.chmod(mnt / "e", 0o700)                                  # copy-up of a dir
    os.rename(mnt / "d/sub", mnt / "sub2")                      # a redirected dir
    os.rename(mnt / "d/top", mnt / "top2")                      # a lower file renamed
    os.rename(mnt / "keep", mnt / "e/keep")
    now = {"d": "d", "d/f": "d/f", "d/sub": "sub2", "d/sub/g": "sub2/g", "h1": "h1",
           "d/h2": "d/h2", "keep": "e/keep", "e": "e", "e/inner": "e/inner", "d/top": "top2",
           "l": "l"}
    after = {old: os.lstat(mnt / new).st_ino for old, new in now.items()}
    assert after == before
    assert (mnt / "d/h2").read_bytes() == b"hard+"
    os.mkdir(mnt / "born")
    (mnt / "born/new").write_bytes(b"n")
    os.link(mnt / "born/new", mnt / "born/new2")
    born = inos(mnt, ["born", "born/new", "born/new2"])
    assert born["born/new"] == born["born/new2"]
    assert not set(born.values()) & set(before.values())
    stop_server(mnt, union_mount.started[-1][1])
    again = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    assert {old: os.lstat(again / new).st_ino for old, new in now.items()} == before
    assert inos(again, ["born", "born/new", "born/new2"]) == born
    assert (again / "d/h2").read_bytes() == b"hard+"


@pytest.mark.timeout(120)
def test_U8_a_reused_upper_inode_never_gives_two_live_files_one_number(tmp_path, union_mount):
    layers = materialise_stack([LayerSpec().file("x", b"x")], tmp_path / "layers")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    seen = {}
    for i in range(40):
        p = mnt / f"f{i}"
        p.write_bytes(b"%d" % i)
        # O_PATH: the kernel keeps the inode, the server holds no fd, so the upper
        # file is freed by the unlink and its inode number can be reused at once
        fd = os.open(p, os.O_PATH)
        up_ino = os.lstat(tmp_path / "up" / f"f{i}").st_ino
        os.unlink(p)
        seen[fd] = up_ino
    if union_mount.writable_no_open:
        # no-open keeps an fd on an unlinked file the kernel still holds (reads of
        # it arrive by inode, with no handle), so its upper inode is not reused
        assert len(set(seen.values())) == len(seen)
    else:
        assert len(set(seen.values())) < len(seen), "the upper's filesystem reused no inode"
    live = {os.fstat(fd).st_ino for fd in seen}
    assert len(live) == len(seen)
    (mnt / "late").write_bytes(b"late")
    assert os.lstat(mnt / "late").st_ino not in live
    for fd in seen:
        os.close(fd)
