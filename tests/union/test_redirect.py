"""Renaming merged and lower directories with redirects (U5, R1-R3), differential
against kernel overlayfs mounted with ``redirect_dir=on``."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs_overlay
from .conftest import stop_server
from .test_writable import normalised

REDIRECT_OPTS = ["redirect_dir=on", "index=off"]


def upper_count(upper: Path) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(upper))


def redirects(upper: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, dirs, _ in os.walk(upper):
        for d in dirs:
            p = os.path.join(dirpath, d)
            if "trusted.overlay.redirect" in os.listxattr(p, follow_symlinks=False):
                out[os.path.relpath(p, upper)] = os.getxattr(p, "trusted.overlay.redirect")
    return out


def run_ops(root: Path, ops) -> None:
    for op, *args in ops:
        if op == "rename":
            os.rename(root / args[0], root / args[1])
        elif op == "write":
            (root / args[0]).write_bytes(args[1])
        elif op == "append":
            with open(root / args[0], "ab") as f:
                f.write(args[1])
        elif op == "mkdir":
            os.mkdir(root / args[0])
        elif op == "unlink":
            os.unlink(root / args[0])
        elif op == "rmdir":
            os.rmdir(root / args[0])
        elif op == "symlink":
            os.symlink(args[1], root / args[0])
        elif op == "chmod":
            os.chmod(root / args[0], args[1])
        else:
            raise AssertionError(op)


def lowers(tmp_path: Path, name: str = "layers") -> list[Path]:
    specs = [LayerSpec().file("a/f", b"f", xattrs={"user.k": b"v"}).file("a/sub/g", b"g")
             .hardlink("a/sub/g2", "a/sub/g").symlink("a/l", "f").dir("x/y")
             .file("x/y/deep", b"deep").file("old/keep", b"k").dir("empty"),
             LayerSpec().file("a/h", b"h").whiteout("a/sub/g2").file("x/y/z/zz", b"zz")
             .file("t/below", b"below").dir("t/sub")]
    return materialise_stack(specs, tmp_path / name, "overlay")


SCENARIOS = {
    "once": [("rename", "a", "b")],
    "twice": [("rename", "a", "b"), ("rename", "b", "c")],
    "into_another_dir": [("rename", "a", "x/y/a2")],
    "child_of_renamed": [("rename", "x", "w"), ("rename", "w/y", "yy"), ("rename", "yy/z", "w/z2")],
    "then_create_delete_inside": [("rename", "a", "b"), ("write", "b/new", b"n"),
                                  ("unlink", "b/f"), ("append", "b/h", b"+"),
                                  ("mkdir", "b/sub/d"), ("unlink", "b/sub/g"),
                                  ("rename", "b/sub", "b/sub2")],
    "over_a_lower_dir": [("rmdir", "t/sub"), ("unlink", "t/below"), ("rename", "a", "t")],
    "back_to_the_old_name": [("rename", "a", "b"), ("rename", "b", "a"), ("write", "a/n", b"1")],
    "old_name_reused": [("rename", "a", "b"), ("mkdir", "a"), ("write", "a/f", b"new f")],
    "copied_up_before": [("append", "a/f", b"+"), ("chmod", "a", 0o700), ("rename", "a", "b")],
}


@needs_overlay
@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_R1_rename_dirs_as_kernel_overlay_with_redirect_dir(scenario, tmp_path, union_mount):
    """The same renames on mergefs and on kernel overlayfs (redirect_dir=on) give the
    same tree; kernel overlayfs over mergefs's upper gives it too, as does mergefs
    mounted again over that upper (the redirects persist)."""
    ops = SCENARIOS[scenario]
    ours, oracle = lowers(tmp_path, "ours"), lowers(tmp_path, "oracle")
    for d in ("up1", "wk1", "up2", "wk2", "ovl"):
        (tmp_path / d).mkdir()
    start = time.time_ns() - 5 * 10**9     # times the ops set differ between the runs
    mnt = union_mount(ours, upper=tmp_path / "up1", work=tmp_path / "wk1")
    run_ops(mnt, ops)
    ours_view = tree.capture(mnt)
    with mounts.overlay_mount(oracle, tmp_path / "ovl", upper=tmp_path / "up2",
                              work=tmp_path / "wk2", options=REDIRECT_OPTS) as ovl:
        run_ops(ovl, ops)
        kernel_view = tree.capture(ovl)
    tree.assert_same(normalised(ours_view, start), normalised(kernel_view, start),
                     "mergefs vs kernel overlayfs (redirect_dir=on)")
    stop_server(mnt, union_mount.started[-1][1])
    with mounts.overlay_mount(oracle, tmp_path / "ovl", upper=tmp_path / "up1",
                              work=tmp_path / "wk2", options=REDIRECT_OPTS) as ovl:
        tree.assert_same(tree.capture(ovl), ours_view, "kernel overlayfs over mergefs's upper")
    again = union_mount(ours, upper=tmp_path / "up1", work=tmp_path / "wk1")
    tree.assert_same(tree.capture(again), ours_view, "mergefs remounted over its upper")


@needs_overlay
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", [2000, pytest.param(20000, marks=pytest.mark.slow)])
def test_R2_renaming_a_lower_dir_copies_nothing(n, tmp_path, union_mount):
    spec = LayerSpec().file("etc/keep", b"k")
    for i in range(n):
        spec = spec.file(f"big/f{i}", b"%d" % i)
    layers = materialise_stack([spec, LayerSpec().file("big/sub/top", b"t")], tmp_path / "layers")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    os.rename(mnt / "big", mnt / "etc/moved")
    # the moved dir, its parent and the whiteout at the old name: nothing else
    assert upper_count(tmp_path / "up") == 3, sorted(os.listdir(tmp_path / "up"))
    assert redirects(tmp_path / "up") == {"etc/moved": b"/big"}
    assert len(os.listdir(mnt / "etc/moved")) == n + 1
    ours_view = tree.capture(mnt)
    stop_server(mnt, union_mount.started[-1][1])
    (tmp_path / "ovl").mkdir()
    (tmp_path / "wk2").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=tmp_path / "up",
                              work=tmp_path / "wk2", options=REDIRECT_OPTS) as ovl:
        tree.assert_same(tree.capture(ovl), ours_view, "kernel overlayfs over mergefs's upper")


@needs_overlay
@pytest.mark.timeout(120)
def test_R3_commit_of_an_upper_with_redirects_is_the_resolved_tree(tmp_path, union_mount):
    from snapshotter import Snapshotter
    from snapshotter.store import Store
    layers = lowers(tmp_path)
    store = Store(tmp_path / "store")
    sn = Snapshotter(store=store)
    ids = [sn.import_dir(str(p), fmt="overlay").id for p in layers]
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    run_ops(mnt, SCENARIOS["then_create_delete_inside"] + [("rename", "x", "b/x")])
    ours_view = tree.capture(mnt)
    stop_server(mnt, union_mount.started[-1][1])
    assert redirects(tmp_path / "up")
    parent = sn.merge(ids, strategy="union").row.id
    row = sn.commit_upper(str(tmp_path / "up"), parent=parent)
    assert not redirects(store.fs_of(row.id))
    merged = Snapshotter(store=store, holder=None).merge(ids + [row.id], strategy="farm")
    tree.assert_same(tree.capture(store.fs_of(merged.row.id)), ours_view,
                     "Merge(lowers, commit) vs the mount")
    store.close()


def test_R2_farm_import_export_refuse_a_layer_with_a_redirect(tmp_path):
    """They read layers by name: a redirect would lose content, so it is refused."""
    from mergefs.errors import InvalidLayer
    from mergefs.farm.build import build_farm
    from mergefs.oci import export_layer_tar
    from snapshotter import Snapshotter
    from snapshotter.store import Store
    low, up = lowers(tmp_path)
    os.mkdir(up / "moved")
    os.setxattr(up / "moved", "trusted.overlay.redirect", b"/a")
    with pytest.raises(InvalidLayer, match="redirect"):
        build_farm([low, up], tmp_path / "farm")
    with pytest.raises(InvalidLayer, match="redirect"):
        export_layer_tar(str(up), str(tmp_path / "out.tar"), lower=[str(low)])
    store = Store(tmp_path / "store")
    try:
        with pytest.raises(InvalidLayer, match="redirect"):
            Snapshotter(store=store).import_dir(str(up))
    finally:
        store.close()


def dir_nlinks(root: Path) -> dict[str, int]:
    out = {".": os.lstat(root).st_nlink}
    for dirpath, dirs, _ in os.walk(root):
        for d in dirs:
            p = os.path.join(dirpath, d)
            out[os.path.relpath(p, root)] = os.lstat(p).st_nlink
    return out


NLINK_OPS = [("rename", "a", "b"),                        # redirected, nothing below "b"
             ("rename", "x/y", "t/yy"),                   # redirected into a merged dir
             ("rmdir", "t/sub"), ("mkdir", "t/sub"),      # opaque over a lower dir
             ("mkdir", "n"), ("mkdir", "n/m"),            # upper only
             ("chmod", "old", 0o700)]                     # copied up, not redirected


@needs_overlay
@pytest.mark.timeout(120)
def test_R1_U1_dir_nlink_as_kernel_overlay_with_redirect_dir(tmp_path, union_mount):
    """st_nlink of every directory is what kernel overlayfs (redirect_dir=on) says:
    1 for a directory merged from more than one layer (a redirected one included),
    the layer's own count for one served by one layer (an opaque one included);
    live, after a remount, and with kernel overlayfs over mergefs's upper."""
    ours, oracle = lowers(tmp_path, "ours"), lowers(tmp_path, "oracle")
    for d in ("up1", "wk1", "up2", "wk2", "ovl"):
        (tmp_path / d).mkdir()
    mnt = union_mount(ours, upper=tmp_path / "up1", work=tmp_path / "wk1")
    run_ops(mnt, NLINK_OPS)
    live = dir_nlinks(mnt)
    with mounts.overlay_mount(oracle, tmp_path / "ovl", upper=tmp_path / "up2",
                              work=tmp_path / "wk2", options=REDIRECT_OPTS) as ovl:
        run_ops(ovl, NLINK_OPS)
        kernel = dir_nlinks(ovl)
    assert kernel["b"] == 1 and kernel["t/sub"] == 2      # the oracle's facts this test is about
    assert live == kernel
    stop_server(mnt, union_mount.started[-1][1])
    with mounts.overlay_mount(oracle, tmp_path / "ovl", upper=tmp_path / "up1",
                              work=tmp_path / "wk2", options=REDIRECT_OPTS) as ovl:
        assert dir_nlinks(ovl) == kernel
    again = union_mount(ours, upper=tmp_path / "up1", work=tmp_path / "wk1")
    assert dir_nlinks(again) == kernel
