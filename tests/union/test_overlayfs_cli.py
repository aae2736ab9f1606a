"""The fuse-overlayfs command line: ``mergefs -o lowerdir=...,upperdir=...,workdir=... TARGET``.

containers/storage (podman, buildah) runs its overlay ``mount_program`` this
way, with ``overlay/l/ID`` symlinks as lower dirs, and unmounts with
``fusermount3 -u``; the program must return once the mount is live.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergefs.cli.cmd_mount_helper import is_mount_helper_call, translate
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.testing.mounts import servers_of
from mergefs.union import server

from ..conftest import needs

needs_fuse = needs("fuse")


def test_translate_fuse_overlayfs_argv(tmp_path):
    (tmp_path / "diff1").mkdir()
    (tmp_path / "diff2").mkdir()
    (tmp_path / "l").mkdir()
    os.symlink("../diff1", tmp_path / "l/A")
    os.symlink("../diff2", tmp_path / "l/B")
    argv = ["-o", f"lowerdir={tmp_path}/l/A:{tmp_path}/l/B,upperdir=/u,workdir=/w,,volatile",
            "/m"]
    assert is_mount_helper_call(argv)
    # top first on the command line, bottom first for the verb; symlinks resolved.
    # (Run as root, the mount verb itself lets other users in: cmd_mount.multi_user.)
    assert translate(argv) == ["mount", "--upper", "/u", "--work", "/w", "--volatile",
                               str(tmp_path / "diff2"), str(tmp_path / "diff1"), "/m"]
    assert translate(["-o", "lowerdir=/a,private", "/m"]) == ["mount", "--private", "/a", "/m"]
    argv = ["-o", "lowerdir=/a,squash_to_root,noacl,nodev,allow_other,fsync=0", "-o", "suid",
            "/m"]
    assert translate(argv) == ["mount", "--allow-other", "--squash-uid", "0", "--squash-gid",
                               "0", "--volatile", "-o", "nodev,suid", "/a", "/m"]
    assert translate(["-o", "lowerdir=/a,squash_to_uid=7,squash_to_gid=8", "x", "/m"]) == \
        ["mount", "--squash-uid", "7", "--squash-gid", "8", "/a", "/m"]
    assert not is_mount_helper_call(["-o", "nodev", "/m"])
    assert not is_mount_helper_call(["mount", "/a", "/b", "/m"])


@pytest.mark.parametrize("opt, words", [
    ("uidmapping=0:1000:1", ["uidmapping", "not supported"]),
    ("gidmapping=0:1000:1", ["gidmapping", "not supported"]),
    ("plugins=x", ["unsupported mount option", "plugins=x"]),
    ("squash_to_uid=me", ["squash_to_uid=me", "number"]),
])
def test_unsupported_option_is_a_clear_usage_error(opt, words, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mergefs", "-o", f"lowerdir={tmp_path},{opt}",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and all(w in r.stderr for w in words), r.stderr


@needs_fuse
def test_fuse_overlayfs_form_through_a_symlink(tmp_path):
    """As containers/storage calls it: a program named mergefs-overlayfs, lower dirs
    that are symlinks under l/, volatile; a symlink inside a layer stays a symlink;
    fusermount3 -u unmounts and the server exits."""
    layers = materialise_stack([
        LayerSpec().file("etc/motd", b"bottom\n", uid=7, gid=8).dir("real").file("real/f", b"f"),
        LayerSpec().file("etc/motd", b"top\n").symlink("d", "real").symlink("abs", "/etc")],
        tmp_path / "diffs", "overlay")
    store = tmp_path / "store"
    (store / "l").mkdir(parents=True)
    for i, layer in enumerate(layers):
        os.symlink(os.path.relpath(layer, store / "l"), store / "l" / f"L{i}")
    for d in ("upper", "work", "merged"):
        (store / d).mkdir()
    program = tmp_path / "mergefs-overlayfs"
    program.symlink_to(Path(sys.executable).parent / "mergefs")
    mnt = store / "merged"
    opts = f"lowerdir=l/L1:l/L0,upperdir={store}/upper,workdir={store}/work,,volatile,nodev"
    try:
        r = subprocess.run([str(program), "-o", opts, str(mnt)], cwd=store, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert server.is_mounted(str(mnt))            # live when the program returns
        assert (mnt / "etc/motd").read_text() == "top\n"
        assert os.readlink(mnt / "d") == "real" and os.readlink(mnt / "abs") == "/etc"
        assert sorted(os.listdir(mnt)) == ["abs", "d", "etc", "real"]
        with open(mnt / "new", "w") as f:
            f.write("x")
            f.flush()
            os.fsync(f.fileno())                      # volatile: accepted, a no-op
        assert (store / "upper/new").read_text() == "x"
        assert "nodev" in next(line for line in open("/proc/self/mounts")
                               if line.split()[1] == str(mnt))
        assert servers_of(mnt)
    finally:
        if server.is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    deadline = time.monotonic() + 10
    while servers_of(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not servers_of(mnt), "the server outlived its mount"
    assert not server.is_mounted(str(mnt))


@needs_fuse
def test_squash_to_root_shows_root_ownership(tmp_path):
    layers = materialise_stack([LayerSpec().file("f", b"x", uid=7, gid=8)], tmp_path / "l")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run([sys.executable, "-m", "mergefs", "-o",
                            f"lowerdir={layers[0]},squash_to_root", str(mnt)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        st = os.stat(mnt / "f")
        assert (st.st_uid, st.st_gid) == (0, 0)
        assert os.stat(layers[0] / "f").st_uid == 7
    finally:
        if server.is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)


@needs_fuse
def test_in_a_user_namespace_the_upper_uses_user_xattrs(tmp_path):
    """Rootless podman runs the mount program as uid 0 of a user namespace, where
    trusted.* xattrs cannot be set: opaque dirs get user.overlay.opaque (which
    containers/storage reads there, as fuse-overlayfs's markers), whiteouts stay
    char 0/0 devices (allowed in a user namespace since Linux 5.8)."""
    layers = materialise_stack([LayerSpec().file("d/a", b"a").file("f", b"f")], tmp_path / "l")
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    opts = f"lowerdir={layers[0]},upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    script = (f"{sys.executable} -m mergefs -o {opts} {tmp_path}/mnt && "
              f"rm -r {tmp_path}/mnt/d && mkdir {tmp_path}/mnt/d && rm {tmp_path}/mnt/f && "
              f"ls {tmp_path}/mnt; umount {tmp_path}/mnt")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--propagation",
                        "private", "sh", "-c", script], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path)))
    assert (r.returncode, r.stdout) == (0, "d\n"), r.stderr
    up = tmp_path / "upper"
    assert os.getxattr(up / "d", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(up / "d")
    st = os.lstat(up / "f")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    deadline = time.monotonic() + 10
    while servers_of(tmp_path / "mnt") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not servers_of(tmp_path / "mnt")
