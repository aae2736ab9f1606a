"""A real container on a writable union: busybox rootfs in layers, runc (U4, U6).

Marked slow: it starts runc twice (root, then uid 65534 with --allow-other).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.testing.mounts import watch_below

from ..conftest import needs

BUSYBOX = "/bin/busybox"
pytestmark = [
    pytest.mark.slow,
    needs("root", "runc", "busybox"),
]
APPLETS = ["sh", "ls", "cat", "echo", "id", "touch", "mkdir", "rm", "mv"]


def busybox_layers(where: Path) -> list[Path]:
    """bin/ in one layer, etc/ in another, the mount points and a note on top."""
    base = LayerSpec().file("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755)
    for a in APPLETS:
        base.symlink(f"bin/{a}", "busybox")
    etc = (LayerSpec().file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                                          b"nobody:x:65534:65534:nobody:/:/bin/sh\n")
           .file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
           .file("etc/secret", b"root only\n", mode=0o600)
           .file("etc/motd", b"from a lower layer\n"))
    top = (LayerSpec().dir("proc", mode=0o555).dir("sys", mode=0o555).dir("dev")
           .dir("tmp", mode=0o1777).dir("root", mode=0o700).whiteout("etc/motd")
           .file("etc/motd", b"from the top layer\n"))
    return materialise_stack([base, etc, top], where, "overlay")


def bundle(where: Path, rootfs: Path, uid: int, script: str) -> Path:
    b = where / f"bundle-{uid}"
    b.mkdir()
    subprocess.run(["runc", "spec"], cwd=b, check=True)
    cfg = json.loads((b / "config.json").read_text())
    cfg["root"] = {"path": str(rootfs), "readonly": False}
    cfg["process"].update(terminal=False, args=["/bin/sh", "-c", script],
                          user={"uid": uid, "gid": uid}, cwd="/")
    cfg["hostname"] = "mergefs"
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def run_container(b: Path, name: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["runc", "run", "--bundle", str(b), name], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["runc", "delete", "--force", name], capture_output=True)


@pytest.fixture
def public_dir():
    # request it before union_mount: set up first, torn down after the unmount
    path = watch_below(tempfile.mkdtemp(prefix="mergefs-runc-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_U4_U6_runc_on_writable_union(tmp_path, public_dir, union_mount):
    layers = busybox_layers(tmp_path / "layers")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    rootfs = public_dir / "rootfs"
    rootfs.mkdir()
    union_mount(layers, upper=upper, work=work, allow_other=True, mnt=rootfs)
    name = f"mergefs-test-{os.getpid()}"

    r = run_container(bundle(tmp_path, rootfs, 0, "cat /etc/motd; id -u; echo root-was-here "
                             "> /root/note; rm /etc/passwd- 2>/dev/null; mkdir /data; "
                             "echo x > /data/y; rm /bin/mv; cat /etc/secret"), name)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from the top layer\n0\nroot only\n"

    r = run_container(bundle(tmp_path, rootfs, 65534, "id -u; echo hi > /tmp/by-nobody; "
                             "cat /etc/secret; echo > /etc/motd; ls /data"), name)
    assert r.stdout.startswith("65534\n") and r.stdout.endswith("y\n"), r.stdout
    assert "Permission denied" in r.stderr                 # U6: 0600 root file, /etc/motd

    # the writes landed in the upper, in overlay format; the layers are untouched
    assert (upper / "root/note").read_text() == "root-was-here\n"
    assert (upper / "data/y").read_text() == "x\n"
    assert (upper / "tmp/by-nobody").stat().st_uid == 65534
    wh = os.lstat(upper / "bin/mv")
    assert (wh.st_mode & 0o170000, wh.st_rdev) == (0o020000, 0)
    assert os.path.islink(layers[0] / "bin/mv")
    assert (layers[2] / "etc/motd").read_text() == "from the top layer\n"
