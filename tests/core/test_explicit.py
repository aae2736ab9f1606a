"""``make_explicit``: an overlay upper rewritten in place with explicit whiteouts (D4, D6, A3).

The oracle is kernel overlayfs: the merged view of the lowers and the upper
is the same before and after the rewrite, and the rewritten upper holds no
opaque directory, no whiteout that hides nothing and no overlay-private xattr.
"""
from __future__ import annotations

import os
import shutil
import stat

import pytest

from mergefs.explicit import NotRewritable, make_explicit
from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise, materialise_stack
from ..conftest import needs

pytestmark = needs("root", "overlay")


def lowers_of(tmp_path):
    return materialise_stack([
        LayerSpec().file("etc/passwd", b"root\n").file("etc/group", b"g\n")
        .dir("var/cache").file("var/cache/a", b"a").file("var/cache/b", b"b")
        .dir("var/cache/sub").file("var/cache/sub/deep", b"d").file("keep", b"k"),
        LayerSpec().file("var/log", b"log\n").whiteout("etc/group"),
    ], tmp_path / "layers")


def merged(lowers, upper) -> tree.View:
    with mounts.overlay_mount([*lowers, upper]) as mnt:
        return tree.capture(mnt)


def walk_upper(upper):
    """(path, lstat) of every entry below ``upper``, and the overlay xattrs found."""
    found, private = [], []
    for d, dirs, files in os.walk(upper):
        for n in dirs + files:
            p = os.path.join(d, n)
            found.append((os.path.relpath(p, upper), os.lstat(p)))
            private += [(p, a) for a in os.listxattr(p, follow_symlinks=False)
                        if a.startswith("trusted.overlay.")]
    return found, private


def is_whiteout(st) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def written_through_overlay(tmp_path, lowers):
    """An upper as containers leave it: copy-ups (origin xattrs), deletions, a dir made again."""
    up, work = tmp_path / "up", tmp_path / "work"
    up.mkdir()
    work.mkdir()
    with mounts.overlay_mount(lowers, upper=up, work=work) as mnt:
        with open(mnt / "etc/passwd", "ab") as f:          # copy-up
            f.write(b"user\n")
        os.unlink(mnt / "keep")                            # whiteout
        shutil.rmtree(mnt / "var/cache")                   # deleted ...
        os.makedirs(mnt / "var/cache/sub")                 # ... and made again: opaque
        (mnt / "var/cache/new").write_bytes(b"n")
        (mnt / "tmpfile").write_bytes(b"t")
        os.unlink(mnt / "tmpfile")                         # made and deleted: no whiteout
    return up


def test_D4_upper_written_by_kernel_overlay_keeps_its_meaning(tmp_path):
    lowers = lowers_of(tmp_path)
    up = written_through_overlay(tmp_path, lowers)
    before = merged(lowers, up)
    mtimes = {p: st.st_mtime_ns for p, st in walk_upper(up)[0] if stat.S_ISDIR(st.st_mode)}
    assert os.getxattr(up / "var/cache", "trusted.overlay.opaque") == b"y"
    make_explicit(up, lowers)
    tree.assert_same(merged(lowers, up), before, "overlay view after the rewrite")
    entries, private = walk_upper(up)
    assert private == []                   # opaque, origin, impure: gone (A3)
    outs = sorted(p for p, st in entries if is_whiteout(st))
    # D4: the re-made dir deletes what the lowers held in it, and in its subdir too
    assert outs == ["keep", "var/cache/a", "var/cache/b", "var/cache/sub/deep"]
    assert {p: st.st_mtime_ns for p, st in entries if stat.S_ISDIR(st.st_mode)} == \
        {p: mtimes[p] for p in mtimes}     # mtimes are content (F2): kept


def test_D6_a_whiteout_that_hides_nothing_goes_and_opaque_over_nothing_is_plain(tmp_path):
    lowers = lowers_of(tmp_path)
    up = materialise(LayerSpec().whiteout("nothing-here").whiteout("etc/passwd")
                     .opaque_dir("new").file("new/x", b"x")
                     .whiteout("var/log/inside-a-file"), tmp_path / "upper")
    before = merged(lowers, up)
    make_explicit(up, lowers)
    tree.assert_same(merged(lowers, up), before, "overlay view after the rewrite")
    entries, private = walk_upper(up)
    assert sorted(p for p, st in entries if is_whiteout(st)) == ["etc/passwd"]
    assert private == []


def test_no_lowers_drops_every_whiteout(tmp_path):
    up = materialise(LayerSpec().whiteout("a").opaque_dir("d").file("d/f", b"f"),
                     tmp_path / "upper")
    make_explicit(up, [])
    entries, private = walk_upper(up)
    assert sorted(p for p, _ in entries) == ["d", "d/f"] and private == []


def test_metacopy_is_refused(tmp_path):
    lowers = lowers_of(tmp_path)
    up = materialise(LayerSpec().dir("var").file("var/f", b"f"), tmp_path / "upper")
    os.setxattr(up / "var/f", "trusted.overlay.metacopy", b"/x")
    with pytest.raises(NotRewritable):
        make_explicit(up, lowers)


def test_R2_redirects_are_resolved(tmp_path):
    """An upper written by kernel overlayfs with redirect_dir=on (dirs moved): the
    rewrite keeps the merged view and leaves no redirect (R2)."""
    lowers = lowers_of(tmp_path)
    up, work = tmp_path / "up", tmp_path / "work"
    up.mkdir()
    work.mkdir()
    opts = ["redirect_dir=on", "index=off"]
    with mounts.overlay_mount(lowers, upper=up, work=work, options=opts) as mnt:
        os.rename(mnt / "var/cache", mnt / "moved")
        os.rename(mnt / "moved/sub", mnt / "etc/sub")
        os.unlink(mnt / "moved/a")
        expected = tree.capture(mnt)
    assert "trusted.overlay.redirect" in os.listxattr(up / "moved")
    make_explicit(up, lowers)
    entries, private = walk_upper(up)
    assert private == []
    tree.assert_same(merged(lowers, up), expected, "after the rewrite")
