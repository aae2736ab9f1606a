"""Containers on views: runc on a bind of a view, and ``mergefs bundle`` (issue 9).

Marked slow: each test starts runc several times.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergefs.testing import mounts

from ..conftest import needs
from .test_container import BUSYBOX, bundle, busybox_layers, public_dir, run_container  # noqa: F401
from .viewsrv import serving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    needs("root", "runc", "busybox"),
]


@pytest.fixture
def views(public_dir):       # noqa: F811 -- the views must be enterable by uid 65534
    with serving(public_dir / "srv") as srv:
        yield srv


def test_runc_on_binds_of_views_root_and_nobody(tmp_path, public_dir, views):  # noqa: F811
    layers = busybox_layers(tmp_path / "layers")
    uppers = []
    rootfs = []
    for name in ("c1", "c2"):
        up, wk = tmp_path / f"{name}-up", tmp_path / f"{name}-wk"
        up.mkdir()
        wk.mkdir()
        uppers.append(up)
        view = views.add(name, layers, up, wk)
        rootfs.append(views.bind(view, public_dir / f"rootfs-{name}"))
    cid = f"mergefs-views-{os.getpid()}"
    r = run_container(bundle(tmp_path, rootfs[0], 0, "cat /etc/motd; id -u; echo one > "
                             "/root/note; rm /bin/mv; cat /etc/secret; ls /proc/self/fd >/dev/null"
                             " && echo proc-ok"), cid)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from the top layer\n0\nroot only\nproc-ok\n"
    r = run_container(bundle(tmp_path, rootfs[1], 65534, "id -u; ls /root 2>&1; ls /bin/mv; "
                             "echo hi > /tmp/by-nobody; cat /etc/secret"), cid + "-2")
    assert r.stdout.startswith("65534\n"), (r.stdout, r.stderr)
    assert "/bin/mv\n" in r.stdout                      # c1's rm did not reach c2
    assert "Permission denied" in r.stdout + r.stderr   # /root is 0700, /etc/secret 0600
    assert (uppers[0] / "root/note").read_text() == "one\n"
    assert not (uppers[1] / "root").exists()
    assert (uppers[1] / "tmp/by-nobody").stat().st_uid == 65534
    # one inode for busybox in both containers' views
    assert os.stat(rootfs[0] / "bin/busybox").st_ino == os.stat(rootfs[1] / "bin/busybox").st_ino


def _mergefs(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "mergefs", *args], capture_output=True, text=True,
                       timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("through", ["views", "own-mount"])
def test_bundle_runs_with_runc_as_root_and_nobody(tmp_path, public_dir, views,  # noqa: F811
                                                  through):
    layers = busybox_layers(tmp_path / "layers")
    ref = ":".join(str(p) for p in layers)
    opts = ["--views", views.control] if through == "views" else []
    done = []
    try:
        for uid in (0, 65534):
            b = public_dir / f"bundle-{uid}"
            _mergefs("bundle", *opts, "--rw", "--user", str(uid), ref, str(b), "--",
                     "/bin/sh", "-c", "id -u; echo x > /tmp/f; cat /tmp/f; cat /etc/motd")
            done.append(b)
            cfg = json.loads((b / "config.json").read_text())
            assert cfg["root"] == {"path": "rootfs", "readonly": False}
            assert cfg["process"]["user"] == {"uid": uid, "gid": uid}
            r = run_container(b, f"mergefs-bundle-{os.getpid()}-{uid}")
            assert r.returncode == 0, r.stderr
            assert r.stdout == f"{uid}\nx\nfrom the top layer\n"
            assert (b / "upper/tmp/f").read_text() == "x\n"
        if through == "views":
            assert len(views.call(op="list")["views"]) == 2
    finally:
        for b in done:
            _mergefs("unbundle", str(b))
    for b in done:
        assert not mounts.is_mounted(b / "rootfs")
        assert (b / "config.json").exists()
    assert views.call(op="list")["views"] == []


def test_bundle_of_an_oci_image_uses_its_config(tmp_path, public_dir, views):  # noqa: F811
    from mergefs.oci import export_layout
    layers = busybox_layers(tmp_path / "layers")
    image = tmp_path / "image"
    export_layout([str(p) for p in layers], image, config={"config": {
        "Env": ["PATH=/bin", "GREETING=hello"], "Cmd": ["/bin/sh", "-c", "echo $GREETING; id -u; pwd"],
        "WorkingDir": "/tmp", "User": "nobody"}})
    root = tmp_path / "store"
    b = public_dir / "bundle"
    _mergefs("--root", str(root), "bundle", "--views", views.control, str(image), str(b))
    try:
        cfg = json.loads((b / "config.json").read_text())
        assert cfg["process"]["user"] == {"uid": 65534, "gid": 65534}
        assert cfg["root"]["readonly"] is True
        r = run_container(b, f"mergefs-oci-{os.getpid()}")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "hello\n65534\n/tmp\n"
    finally:
        _mergefs("unbundle", str(b))
    assert not mounts.is_mounted(b / "rootfs")


@needs("umoci")
def test_bundle_of_a_store_ref_runs_the_config_kept_at_import(tmp_path, public_dir,  # noqa: F811
                                                              views):
    """An image whose config umoci set, imported into the store, bundled by its name:
    config.json follows its Entrypoint, Cmd, Env, WorkingDir and User."""
    from mergefs.oci import export_layout
    image = tmp_path / "image"
    export_layout([str(p) for p in busybox_layers(tmp_path / "layers")], image, ref="app")
    subprocess.run(["umoci", "config", "--image", f"{image}:app",
                    "--config.entrypoint", "/bin/sh", "--config.entrypoint", "-c",
                    "--config.cmd", "echo $GREETING; pwd; id -u", "--config.env",
                    "GREETING=from-umoci", "--config.workingdir", "/etc",
                    "--config.user", "65534"], check=True, capture_output=True)
    root = tmp_path / "store"
    _mergefs("--root", str(root), "import", str(image))
    b = public_dir / "bundle"
    _mergefs("--root", str(root), "bundle", "--views", views.control, "app", str(b))
    try:
        r = run_container(b, f"mergefs-kept-{os.getpid()}")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "from-umoci\n/etc\n65534\n"
    finally:
        _mergefs("unbundle", str(b))
    assert not mounts.is_mounted(b / "rootfs")
