"""The farm builder's fallback chain, staging, and the guarantees around it."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from mergefs.errors import AlreadyExists, InvalidLayer, NotFound
from mergefs.farm import build_farm
from mergefs.testing import model, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs_root
from .conftest import inject_link_error

STACK = [LayerSpec().file("a", b"shared").hardlink("b", "a").file("d/x", b"x").symlink("l", "a")
         .fifo("p").socket("s"),
         LayerSpec().file("d/y", b"y" * 10000, mode=0o4755, xattrs={"user.k": b"v"})
         .whiteout("d/x")]


def _expected():
    return tree.model_view(model.merge(STACK))


@needs_root
@pytest.mark.parametrize("err,reason", [(errno.EXDEV, "exdev"), (errno.EMLINK, "emlink")])
def test_link_failure_falls_back_to_copy_keeping_groups(tmp_path, monkeypatch, err, reason):
    """EXDEV/EMLINK copy instead (H1: both names of a copied inode stay one inode)."""
    layers = materialise_stack(STACK, tmp_path, "overlay")
    calls = inject_link_error(monkeypatch, err)
    stats = build_farm(layers, tmp_path / "farm")
    assert calls and stats.links == 0
    assert stats.copies[reason] == 5 and stats.recreated == 1   # a, l, p, d/y, b->copy of a
    view = tree.capture(tmp_path / "farm")
    tree.assert_same(view, _expected(), "copied farm vs model")
    assert os.stat(tmp_path / "farm/a").st_ino != os.stat(layers[0] / "a").st_ino


@needs_root
def test_other_link_errors_abort_and_leave_nothing(tmp_path, monkeypatch):
    layers = materialise_stack(STACK, tmp_path, "overlay")
    inject_link_error(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as exc:
        build_farm(layers, tmp_path / "farm")
    assert exc.value.errno == errno.EIO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l0", "l1"]


@needs_root
def test_real_exdev_layers_on_tmpfs(tmp_path):
    """Layers on another filesystem (a tmpfs) than the farm: real EXDEV, copies."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        layers = materialise_stack(STACK, mnt, "overlay")
        stats = build_farm(layers, tmp_path / "farm")
        assert stats.copies["exdev"] == 5 and stats.links == 0
        tree.assert_same(tree.capture(tmp_path / "farm"), _expected(), "farm vs model")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@needs_root
def test_no_space_removes_staging(tmp_path):
    """ENOSPC on a tiny tmpfs: the error surfaces and nothing is left behind."""
    big = [LayerSpec().file(f"f{i}", os.urandom(64 * 1024)) for i in range(4)]
    layers = materialise_stack(big, tmp_path / "layers", "overlay")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(OSError) as exc:
            build_farm(layers, mnt / "farm")
        assert exc.value.errno == errno.ENOSPC
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_out_must_not_exist(tmp_path):
    (tmp_path / "l0").mkdir()
    (tmp_path / "out").mkdir()
    with pytest.raises(AlreadyExists):
        build_farm([tmp_path / "l0"], tmp_path / "out")


def test_missing_and_non_directory_layers(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotFound):
        build_farm([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(InvalidLayer):
        build_farm([tmp_path / "file"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layer_root_may_be_a_symlink_but_nothing_inside_is_followed(tmp_path):
    """S2: a layer holding etc -> /etc shows the link; /etc is never read."""
    layer = tmp_path / "l0"
    layer.mkdir()
    (layer / "etc").symlink_to("/etc")
    (layer / "up").symlink_to("../../..")
    build_farm([layer], tmp_path / "farm")
    assert os.readlink(tmp_path / "farm/etc") == "/etc"
    assert sorted(os.listdir(tmp_path / "farm")) == ["etc", "up"]


@needs_root
def test_H4_farm_files_are_the_layer_inodes(tmp_path):
    """A farm shares inodes with its layers; that is why it is never writable (H4)."""
    layers = materialise_stack(STACK, tmp_path, "overlay")
    build_farm(layers, tmp_path / "farm")
    assert os.stat(tmp_path / "farm/d/y").st_ino == os.stat(layers[1] / "d/y").st_ino
    assert os.stat(tmp_path / "farm/d").st_ino != os.stat(layers[1] / "d").st_ino


def test_many_layers_and_deep_trees(tmp_path):
    """Open fds stay bounded by the layer count, not depth x layers (600 x 10 would
    pass the usual limit of 1024 open files)."""
    deep = "/".join(f"d{i}" for i in range(10))
    specs = [LayerSpec().file(f"{deep}/f{i}", b"%d" % i) for i in range(600)]
    layers = materialise_stack(specs, tmp_path, "oci")
    build_farm(layers, tmp_path / "farm")
    assert len(os.listdir(tmp_path / "farm" / deep)) == 600
