"""Diff and commit into the store (F1, D4), and mount specs from the store."""
from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from mergefs.mountspec import MountSpec
from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise
from snapshotter import Snapshotter
from ..conftest import needs


def imported(store, layers):
    return [Snapshotter(store=store).import_dir(p).id for p in layers]


def view_of(store, ids):
    """The merged view of store layers, as a farm built outside the store."""
    m = Snapshotter(store=store, holder=None).merge(ids, strategy="farm")
    return tree.capture(store.fs_of(m.row.id))


def test_F1_merge_of_a_and_diff_a_b_is_b(store, layers):
    a, b, c = imported(store, layers)
    d = Snapshotter(store=store).diff(a, f"{a}:{b}:{c}")
    assert d.kind == "diff"
    assert Snapshotter(store=store).diff(a, f"{a}:{b}:{c}").id == d.id          # idempotent
    tree.assert_same(view_of(store, [a, d.id]), view_of(store, [a, b, c]), "Merge(A, Diff(A,B))")


def test_F1_diff_of_a_tree_with_itself_is_empty(store, layers):
    (a,) = imported(store, layers[:1])
    d = Snapshotter(store=store).diff(a, a)
    assert os.listdir(store.fs_of(d.id)) == []


def is_whiteout(path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_D4_commit_turns_an_opaque_dir_into_explicit_whiteouts(store, layers, tmp_path):
    (base,) = imported(store, layers[:1])
    upper = materialise(LayerSpec().opaque_dir("var/cache").file("var/cache/new", b"n")
                        .whiteout("etc/passwd").file("etc/motd", b"m"), tmp_path / "upper")
    row = Snapshotter(store=store).commit_upper(str(upper), parent=base)
    fs = store.fs_of(row.id)
    assert is_whiteout(fs / "var/cache/a") and is_whiteout(fs / "var/cache/b")
    assert is_whiteout(fs / "etc/passwd")
    assert "trusted.overlay.opaque" not in os.listxattr(fs / "var/cache")
    with mounts.overlay_mount([layers[0], upper]) as mnt:
        expected = tree.capture(mnt)
    tree.assert_same(view_of(store, [base, row.id]), expected, "commit vs kernel overlay")
    assert Snapshotter(store=store).commit_upper(str(upper), parent=base).id == row.id   # idempotent


@needs("overlay")
def test_commit_of_an_active_snapshot_written_through_kernel_overlay(store, layers):
    a, b, _ = imported(store, layers)
    m = Snapshotter(store=store).merge([a, b], strategy="union").row.id
    spec = Snapshotter(store=store).mount_spec(m, rw=True, key="job")
    assert isinstance(spec, MountSpec) and spec.writable
    with mounts.overlay_mount(list(spec.lowers), upper=spec.upper, work=spec.work) as mnt:
        with open(os.path.join(mnt, "etc/new"), "w") as f:
            f.write("new\n")
        os.unlink(os.path.join(mnt, "etc/passwd"))
        expected = tree.capture(mnt)
    row = Snapshotter(store=store).commit_upper("job")
    tree.assert_same(view_of(store, [a, b, row.id]), expected, "committed active snapshot")


def test_mount_specs(store, layers):
    a, b, c = imported(store, layers)
    farm = Snapshotter(store=store).merge([a, b, c], strategy="farm").row.id
    union = Snapshotter(store=store).merge([a, b], strategy="union").row.id
    assert Snapshotter(store=store).mount_spec(farm).lowers == (str(store.fs_of(farm)),)
    assert Snapshotter(store=store).mount_spec(union).lowers == (str(store.fs_of(a)),
                                                                 str(store.fs_of(b)))
    assert Snapshotter(store=store).mount_spec(a).lowers == (str(store.fs_of(a)),)
    rw = Snapshotter(store=store).mount_spec(farm, rw=True, mountpoint="/tmp/x")
    assert rw.lowers == (str(store.fs_of(farm)),) and os.path.isdir(rw.upper)


def make_tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, data
                t.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, data
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("members", [
    [("../evil", "file", b"x")],
    [("/abs", "file", b"x")],
    [("d", "sym", "/etc"), ("d/passwd", "file", b"x")],
    [("h", "link", "../../etc/passwd")],
], ids=["traversal", "absolute", "through-symlink", "hardlink-out"])
def test_S2_malicious_tar_leaves_the_store_unchanged(cli, layers, tmp_path, members):
    base = cli.out("import", layers[0])
    before = cli.json("ls")
    make_tar(tmp_path / "bad.tar", members)
    p = cli.run("import", tmp_path / "bad.tar", check=False)
    assert p.returncode != 0 and p.stderr.startswith("mergefs: error:")
    assert "internal error" not in p.stderr
    assert cli.json("ls") == before
    assert cli.json("fsck")["findings"] == []
    assert os.listdir(cli.root / "staging") == []
    assert base


def test_rw_mount_spec_reuses_the_active_snapshot_of_its_mountpoint(store, layers):
    (a,) = imported(store, layers[:1])
    one = Snapshotter(store=store).mount_spec(a, rw=True, mountpoint="/tmp/mnt-x")
    two = Snapshotter(store=store).mount_spec(a, rw=True, mountpoint="/tmp/mnt-x")
    assert one == two
    other = Snapshotter(store=store).mount_spec(a, rw=True)     # no mountpoint: a fresh key
    assert other.upper != one.upper


@needs("overlay")
def test_R2_commit_of_an_upper_with_kernel_redirects(store, layers, tmp_path):
    """Kernel overlayfs with redirect_dir=on moves a lower dir with a redirect; the
    commit holds the moved content (R2), since a layer is read by name."""
    ids = imported(store, layers)
    parent = Snapshotter(store=store).merge(ids, strategy="union").row.id
    for d in ("up", "wk", "mnt"):
        (tmp_path / d).mkdir()
    opts = ["redirect_dir=on", "index=off"]
    with mounts.overlay_mount(layers, tmp_path / "mnt", upper=tmp_path / "up",
                              work=tmp_path / "wk", options=opts) as mnt:
        os.rename(mnt / "etc", mnt / "moved")
        expected = tree.capture(mnt)
    assert "trusted.overlay.redirect" in os.listxattr(tmp_path / "up/moved")
    row = Snapshotter(store=store).commit_upper(str(tmp_path / "up"), parent=parent)
    tree.assert_same(view_of(store, ids + [row.id]), expected, "commit vs kernel overlay")
