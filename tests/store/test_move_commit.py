"""containerd's Commit by moving the upper (``snapshotter.commit``): no copy, same layer,
stored once, and a SIGKILL at any step leaves the active snapshot or the committed one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mergefs.testing import mounts, tree
from snapshotter import Snapshotter
from .conftest import REPO, Cli
from ..conftest import needs

pytestmark = needs("root", "overlay")
NS = "default/1/"


@pytest.fixture
def sn(root):
    s = Snapshotter(root)
    yield s
    s.close()


def base(sn, tmp_path) -> str:
    m = sn.prepare(NS + "base-key")
    for path, data in (("etc/passwd", b"root\n"), ("var/cache/a", b"a"), ("var/cache/b", b"b"),
                       ("keep", b"k")):
        os.makedirs(os.path.dirname(os.path.join(m.upper, path)) or m.upper, exist_ok=True)
        with open(os.path.join(m.upper, path), "wb") as f:
            f.write(data)
    sn.commit(NS + "base", NS + "base-key")
    return NS + "base"


def write_through_overlay(sn, key: str, parent: str) -> tree.View:
    """Prepare ``key`` over ``parent``, change it through kernel overlayfs as a container
    would (a copy-up, a deletion, a directory deleted and made again); the view it left."""
    import shutil
    m = sn.prepare(key, parent)
    with mounts.overlay_mount(list(m.lowers), upper=m.upper, work=m.work) as mnt:
        with open(mnt / "etc/passwd", "ab") as f:
            f.write(b"user\n")
        os.unlink(mnt / "keep")
        shutil.rmtree(mnt / "var/cache")
        os.makedirs(mnt / "var/cache")
        (mnt / "var/cache/new").write_bytes(b"n")
        return tree.capture(mnt)


def view(sn, name: str) -> tree.View:
    with mounts.overlay_mount(list(sn.view(NS + "v-" + name, name).lowers)) as mnt:
        out = tree.capture(mnt)
    sn.remove(NS + "v-" + name)
    return out


def layer_of(sn, name: str) -> str:
    return sn.mounts(name).lowers[-1]


def test_commit_moves_the_upper_into_the_layer(sn, tmp_path):
    parent = base(sn, tmp_path)
    expected = write_through_overlay(sn, NS + "k", parent)
    upper = sn.mounts(NS + "k").upper
    ino = os.stat(upper).st_ino
    sn.commit(NS + "top", NS + "k")
    assert os.stat(layer_of(sn, NS + "top")).st_ino == ino          # moved, not copied
    tree.assert_same(view(sn, NS + "top"), expected, "committed by move")
    assert not os.path.exists(os.path.dirname(upper))             # the active's dir is gone


def test_move_and_copy_give_the_same_layer(sn, tmp_path):
    parent = base(sn, tmp_path)
    expected = write_through_overlay(sn, NS + "k1", parent)
    m2 = sn.prepare(NS + "k2", parent)
    os.rmdir(m2.upper)
    subprocess.run(["cp", "-a", sn.mounts(NS + "k1").upper, m2.upper], check=True)
    sn.commit(NS + "moved", NS + "k1")
    sn.commit(NS + "copied", NS + "k2", move=False)
    assert layer_of(sn, NS + "moved") == layer_of(sn, NS + "copied")
    tree.assert_same(view(sn, NS + "copied"), expected, "committed by copy")


def test_R2_moved_dirs_committed_by_move_and_by_copy(sn, tmp_path):
    """An upper whose dirs kernel overlayfs (redirect_dir=on) moved: both commits
    resolve the redirects (R2) and give one layer."""
    parent = base(sn, tmp_path)
    views = []
    for key in ("k1", "k2"):
        m = sn.prepare(NS + key, parent)
        with mounts.overlay_mount(list(m.lowers), upper=m.upper, work=m.work,
                                  options=["redirect_dir=on", "index=off"]) as mnt:
            os.rename(mnt / "var/cache", mnt / "moved")
            os.unlink(mnt / "moved/a")
            views.append(tree.capture(mnt))
        assert "trusted.overlay.redirect" in os.listxattr(os.path.join(m.upper, "moved"))
        for d, _, _ in os.walk(m.upper):        # the two runs' own times differ
            os.utime(d, (1_000_000, 1_000_000))
    sn.commit(NS + "moved", NS + "k1")
    sn.commit(NS + "copied", NS + "k2", move=False)
    assert layer_of(sn, NS + "moved") == layer_of(sn, NS + "copied")
    def untimed(v):
        return tree.View({p: a._replace(mtime_ns=0) if a.kind == "dir" else a
                          for p, a in v.entries.items()}, v.groups)
    tree.assert_same(untimed(view(sn, NS + "moved")), untimed(views[0]), "committed by move")


def test_the_same_content_moved_twice_is_stored_once(sn, tmp_path):
    parent = base(sn, tmp_path)
    layers = []
    for key, name in (("k1", "n1"), ("k2", "n2")):
        m = sn.prepare(NS + key, parent)
        with open(os.path.join(m.upper, "f"), "wb") as f:
            f.write(b"same")
        os.utime(os.path.join(m.upper, "f"), (1_000_000, 1_000_000))
        os.utime(m.upper, (1_000_000, 1_000_000))
        sn.commit(NS + name, NS + key)
        layers.append(layer_of(sn, NS + name))
    assert layers[0] == layers[1]
    # base layer, its merge-free name, the new layer, one merge: nothing of k2 is left
    assert len(os.listdir(sn.root / "snapshots")) == 3


@pytest.mark.parametrize("how", ["overlay", "bind"])
def test_an_upper_still_mounted_is_copied(sn, tmp_path, how):
    parent = base(sn, tmp_path)
    m = sn.prepare(NS + "k", parent)
    ino = os.stat(m.upper).st_ino
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if how == "bind":         # what containerd gets for a snapshot without lowers
        subprocess.run(["mount", "--bind", m.upper, str(mnt)], check=True)
    try:
        with mounts.overlay_mount(list(m.lowers), mnt, upper=m.upper, work=m.work) \
                if how == "overlay" else _nothing(mnt) as top:
            (top / "new").write_bytes(b"n")
            sn.commit(NS + "top", NS + "k")
    finally:
        mounts.force_unmount(mnt)
    assert os.stat(layer_of(sn, NS + "top")).st_ino != ino       # copied, not moved
    assert open(os.path.join(layer_of(sn, NS + "top"), "new"), "rb").read() == b"n"


def _nothing(path):
    import contextlib
    return contextlib.nullcontext(path)


COMMIT = "import sys; from snapshotter import Snapshotter; Snapshotter(sys.argv[1]).commit(*sys.argv[2:])"


def crash_commit(root, step: str, name: str, key: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), MERGEFS_TEST_KILL_AT=step)
    p = subprocess.run([sys.executable, "-c", COMMIT, str(root), name, key], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, (step, p.returncode, p.stderr)


@pytest.mark.parametrize("step", ["move-commit:after-move", "move-commit:after-commit"])
def test_sigkill_during_a_moving_commit_leaves_one_of_the_two(root, tmp_path, step):
    with Snapshotter(root) as s:
        expected = write_through_overlay(s, NS + "k", base(s, tmp_path))
    crash_commit(root, step, NS + "top", NS + "k")
    report = Cli(root).json("fsck")                  # before any open reconciles
    assert report["clean"], report
    with Snapshotter(root) as s:                     # the next open finishes or undoes it
        names = {i.name for i in s.walk()}
        if step == "move-commit:after-move":
            assert NS + "k" in names and NS + "top" not in names
            (tmp_path / "mnt").mkdir()
            with mounts.overlay_mount(list(s.mounts(NS + "k").lowers)
                                      + [s.mounts(NS + "k").upper], tmp_path / "mnt") as mnt:
                tree.assert_same(tree.capture(mnt), expected, "the active snapshot, undone")
            s.commit(NS + "top", NS + "k")
        assert NS + "k" not in {i.name for i in s.walk()}
        tree.assert_same(view(s, NS + "top"), expected, "committed")
    assert Cli(root).json("fsck")["findings"] == []
