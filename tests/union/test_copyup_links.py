"""Appends to hardlinked lower files through a mount keep each link group one inode (H1, U4).

bench_writable's append step, small: lower files with two or three names in one
layer (a group whose names are all shown, one a later layer replaced (H2), one
a later layer deleted with a whiteout (H3)), appended once through one name
each, after a ``find`` of the tree (every shown name known to the kernel, as
lazy records when C filled the listings) or with no name looked up before.
Every name the view shows for a group keeps the inode number it had and shows
the appended bytes; the upper holds the names of a group as one inode and
nothing for a hidden name; kernel overlayfs over the lowers and that upper
reads the same tree as the mount. Run with the C fast path on and off.
"""
from __future__ import annotations

import os

import pytest

from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs, needs_overlay
from .test_fastpath import fast  # noqa: F401

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]

# group -> its names in layer 0 (the first one is appended to)
GROUPS = {
    "shown": ("a/one", "b/two", "b/deep/three"),
    "replaced": ("c/keep", "d/replaced"),          # layer 1 replaces d/replaced (H2)
    "deleted": ("e/keep", "f/deleted"),            # layer 1 whites out f/deleted (H3)
    "reverse": ("g/x", "h/y"),                     # appended through its second name
}
APPEND_THROUGH = {"shown": "b/deep/three", "replaced": "c/keep", "deleted": "e/keep",
                  "reverse": "h/y"}


def stack(tmp_path):
    low = LayerSpec()
    for group, (first, *more) in GROUPS.items():
        low = low.file(first, group.encode() + b"\n")
        for name in more:
            low = low.hardlink(name, first)
    low = low.file("a/plain", b"plain\n")
    top = LayerSpec().file("d/replaced", b"other file\n").whiteout("f/deleted").file("z", b"z")
    return materialise_stack([low, top], tmp_path / "layers", "overlay")


def shown(mnt) -> dict:
    """Every regular file's (inode number, bytes) through the mount."""
    out = {}
    for d, _, files in os.walk(mnt):
        for n in files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, mnt)] = (os.lstat(p).st_ino, open(p, "rb").read())
    return out


@needs_overlay
@pytest.mark.parametrize("listed", [True, False], ids=["after-find", "never-looked-up"])
def test_H1_appends_to_hardlinked_lower_files_keep_one_inode(tmp_path, union_mount, fast,
                                                               listed):
    layers = stack(tmp_path)
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    mnt = union_mount(layers, upper=up, work=wk)
    before = shown(mnt) if listed else None      # find: every shown name known
    for group, rel in APPEND_THROUGH.items():
        with open(mnt / rel, "ab") as f:
            f.write(b"+")
    after = shown(mnt)
    if before is not None:                 # no number moved, no name came or went
        assert {p: ino for p, (ino, _) in after.items()} == \
            {p: ino for p, (ino, _) in before.items()}
    for group, names in GROUPS.items():
        visible = [n for n in names if n not in ("d/replaced", "f/deleted")]
        assert {after[n] for n in visible} == {(after[visible[0]][0],
                                                group.encode() + b"\n+")}, group
        assert len({os.lstat(up / n).st_ino for n in visible}) == 1, group
        assert os.lstat(up / visible[0]).st_nlink == len(visible), group
    assert after["d/replaced"][1] == b"other file\n"
    assert "f/deleted" not in after and not (up / "f" / "deleted").exists()
    assert not (up / "d" / "replaced").exists()          # H2: never linked to the copy
    view = tree.capture(mnt)
    with mounts.overlay_mount(list(layers) + [up]) as kmnt:
        tree.assert_same(tree.capture(kmnt), view, "kernel overlayfs over mergefs's upper")
