"""Inode numbers that survive copy-up, rename and remount (U2, U8)."""
from __future__ import annotations

import os

import pytest

from mergefs.testing import mounts
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs_overlay
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


def _hardlink_stack(tmp_path):
    """One lower file named a, c and d/b (and x, which a later layer replaces, and w,
    which a later layer deletes): H1-H3 on top of the copy-up."""
    specs = [LayerSpec().file("a", b"hello\n").hardlink("c", "a").hardlink("d/b", "a")
             .hardlink("x", "a").hardlink("w", "a").file("d/other", b"o"),
             LayerSpec().file("x", b"later\n").whiteout("w")]
    return materialise_stack(specs, tmp_path / "layers")


def _copy_up_through_a(mnt, how: str) -> int:
    """Copy the file up through the name a alone (no other name looked up first)."""
    number = os.lstat(mnt / "a").st_ino
    if how == "chown":
        os.chown(mnt / "a", 123, 456)
    else:
        with open(mnt / "a", "ab") as f:
            f.write(b"more\n")
    return number


def _names(mnt, order=("a", "c", "d/b", "x")) -> dict:
    out = {}
    for n in order:
        st = os.lstat(mnt / n)
        out[n] = (st.st_ino, st.st_nlink, st.st_uid, (mnt / n).read_bytes())
    assert not os.path.lexists(mnt / "w")                              # H3
    return out


def _relations(seen: dict) -> dict:
    """What must agree between mergefs and kernel overlayfs: which names share a
    number, owners and bytes (the numbers themselves differ, and so does st_nlink:
    index=on counts the names a later layer hid, 5 here, the upper's file the
    names linked to it)."""
    return {n: (seen[n][0] == seen["a"][0],) + seen[n][2:] for n in seen}


@needs_overlay
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["chown", "append"])
def test_U8_a_hardlink_name_never_looked_up_stays_one_inode_after_copy_up(
        tmp_path, union_mount, how):
    """H1 + U8: a copy-up through one name links every name of the lower file that
    the merged view shows, also the names the kernel never looked up, so they
    keep one number, one link count and one content, in this mount and the next,
    as kernel overlayfs with index=on shows them; kernel overlayfs (index=off)
    over the upper shows the same files afterwards (U4)."""
    layers = _hardlink_stack(tmp_path)
    for d in ("up", "wk", "kup", "kwk", "kmnt", "kmnt2"):
        (tmp_path / d).mkdir()
    with mounts.overlay_mount(layers, tmp_path / "kmnt", upper=tmp_path / "kup",
                              work=tmp_path / "kwk", options=("index=on", "xino=on")) as k:
        _copy_up_through_a(k, how)
        oracle = _relations(_names(k))
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    number = _copy_up_through_a(mnt, how)
    seen = _names(mnt)
    assert _relations(seen) == oracle
    assert seen["a"][0] == seen["c"][0] == seen["d/b"][0] == number
    assert seen["a"][1] == seen["c"][1] == seen["d/b"][1] == 3      # the names it has
    assert seen["x"][:2] != seen["a"][:2] and seen["x"][3] == b"later\n"      # H2
    with open(mnt / "d/b", "ab") as f:              # the names are one file now
        f.write(b"via b\n")
    assert (mnt / "a").read_bytes() == (mnt / "c").read_bytes() == (mnt / "d/b").read_bytes()
    seen = _names(mnt)
    stop_server(mnt, union_mount.started[-1][1])
    again = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    assert _names(again, ("d/b", "x", "c", "a")) == seen             # another name first
    stop_server(again, union_mount.started[-1][1])
    with mounts.overlay_mount(layers, tmp_path / "kmnt2", upper=tmp_path / "up",
                              work=tmp_path / "wk") as k:
        shown = _names(k)
        assert _relations(shown) == _relations(seen)
        assert {n: v[1] for n, v in shown.items()} == {n: v[1] for n, v in seen.items()}


@needs_overlay
@pytest.mark.timeout(120)
def test_U8_a_hardlink_name_under_a_renamed_directory_is_linked_at_copy_up(tmp_path, union_mount):
    """The other names of the lower file sit below directories renamed (redirected,
    R1) before the copy-up, one inside another, and were never looked up: the
    copy-up finds them at their new paths, as kernel overlayfs (index=on,
    redirect_dir=on) does, and after a remount too."""
    specs = [LayerSpec().file("a", b"hello\n").hardlink("d/b", "a")
             .hardlink("d/x/c", "a").file("d/other", b"o")]
    layers = materialise_stack(specs, tmp_path / "layers")
    for d in ("up", "wk", "kup", "kwk", "kmnt"):
        (tmp_path / d).mkdir()

    def run(mnt):
        os.rename(mnt / "d/x", mnt / "d/y")
        os.rename(mnt / "d", mnt / "e")
        number = _copy_up_through_a(mnt, "append")
        seen = {n: (os.lstat(mnt / n).st_ino, (mnt / n).read_bytes())
                for n in ("e/y/c", "e/b", "a")}
        return number, seen

    with mounts.overlay_mount(layers, tmp_path / "kmnt", upper=tmp_path / "kup",
                              work=tmp_path / "kwk",
                              options=("index=on", "redirect_dir=on")) as k:
        _, kseen = run(k)
    assert len(set(kseen.values())) == 1                               # the oracle
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    number, seen = run(mnt)
    assert set(seen.values()) == {(number, b"hello\nmore\n")}
    stop_server(mnt, union_mount.started[-1][1])
    again = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    assert {n: (os.lstat(again / n).st_ino, (again / n).read_bytes()) for n in seen} == seen
