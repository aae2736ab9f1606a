"""containerd 1.6 with `mergefs serve` as its proxy snapshotter (slow tier).

containerd runs on a private root, state and socket with
``[proxy_plugins.mergefs] type = "snapshot"`` pointing at a private service; an
OCI image is built offline (busybox-static; the layer tars written here, added
with ``umoci raw add-layer``): one layer deletes a file, one makes a
directory opaque, one replaces a directory by a file. Everything started here
is stopped by pid.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import needs
from ..oci.conftest import member, tar_bytes
from .conftest import needs_root

BUSYBOX = "/bin/busybox"
IMAGE = "docker.io/library/mergefs-test:t"
APPLETS = ["sh", "ls", "cat", "echo", "test", "sleep", "find", "sort"]
pytestmark = [needs_root, pytest.mark.slow, pytest.mark.timeout(600),
              needs("containerd", "ctr", "umoci", "runc", "busybox")]


def layers() -> list[bytes]:
    base = [member("bin", "dir"), member("bin/busybox", data=Path(BUSYBOX).read_bytes(),
                                         mode=0o755)]
    base += [member(f"bin/{a}", "symlink", linkname="busybox") for a in APPLETS]
    base += [member(d, "dir") for d in ("proc", "sys", "dev", "tmp", "etc", "data", "opq",
                                        "swap")]
    base += [member("etc/motd", data=b"base\n"), member("data/keep", data=b"keep\n"),
             member("data/gone", data=b"gone\n"), member("opq/a", data=b"a\n"),
             member("opq/b", data=b"b\n"), member("swap/child", data=b"child\n")]
    deletes = [member("data/.wh.gone"), member("opq/.wh..wh..opq"),
               member("opq/c", data=b"c\n")]
    replaces = [member("swap", data=b"now a file\n"), member("etc/motd", data=b"top\n")]
    return [tar_bytes(base), tar_bytes(deletes), tar_bytes(replaces)]


def build_image(where: Path) -> Path:
    layout = where / "layout"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:t")
    for i, data in enumerate(layers()):
        tar = where / f"layer{i}.tar"
        tar.write_bytes(data)
        run("umoci", "raw", "add-layer", "--image", f"{layout}:t", tar)
    run("umoci", "config", "--image", f"{layout}:t", "--config.cmd", "/bin/sh")
    archive = where / "image.tar"
    run("tar", "-C", layout, "-cf", archive, ".")
    return archive


def run(*cmd, check=True, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


class Containerd:
    def __init__(self, base: Path, snapshotter_socket: Path):
        self.base = base
        self.socket = base / "containerd.sock"
        self.config = base / "config.toml"
        self.config.write_text(f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{base}/containerd.ttrpc.sock"
[debug]
  address = "{base}/debug.sock"
[metrics]
  address = ""
[proxy_plugins.mergefs]
  type = "snapshot"
  address = "{snapshotter_socket}"
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Containerd":
        self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.base / "containerd.log", "ab"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.base / "containerd.log").read_text()[-3000:]
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise AssertionError("containerd did not start")

    def ctr(self, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
        return run("ctr", "--address", self.socket, *args, check=check, timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None:
            for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
                self.ctr("tasks", "rm", "-f", task, check=False)
            for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("containers", "rm", c, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def stack(service_factory, tmp_path):
    svc = service_factory()
    cd = Containerd(tmp_path, svc.socket).start()
    yield svc, cd
    cd.stop()


def until(ok, timeout: float = 30.0) -> float:
    """Seconds until ``ok()`` held (``timeout`` if it never did)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ok():
            return time.monotonic() - t0
        time.sleep(0.2)
    return timeout


def snapshots(cd) -> list[str]:
    return sorted(cd.ctr("snapshots", "--snapshotter", "mergefs", "ls").stdout.splitlines()[1:])


def test_containerd_runs_an_image_from_mergefs(stack, tmp_path):
    svc, cd = stack
    archive = build_image(tmp_path)
    cd.ctr("images", "import", "--snapshotter", "mergefs", "--base-name",
           "docker.io/library/mergefs-test", archive)
    before = snapshots(cd)
    assert len(before) == 3, before                       # one committed snapshot per layer
    cd.ctr("images", "import", "--snapshotter", "mergefs", "--base-name",
           "docker.io/library/mergefs-test", archive)
    assert snapshots(cd) == before                        # importing twice is a no-op

    tree = cd.ctr("run", "--rm", "--snapshotter", "mergefs", IMAGE, "c1", "/bin/sh", "-c",
                  "ls /data; echo --; ls /opq; echo --; cat /swap /etc/motd; "
                  "test -f /swap && echo file; echo written > /data/new").stdout
    assert tree.split("\n") == ["keep", "--", "c", "--", "now a file", "top", "file", ""], tree
    again = cd.ctr("run", "--rm", "--snapshotter", "mergefs", IMAGE, "c2", "/bin/sh", "-c",
                   "ls /data").stdout
    assert again.split() == ["keep"]                      # c1's write is not seen by c2
    assert snapshots(cd) == before                        # --rm removed the actives

    usage = cd.ctr("snapshots", "--snapshotter", "mergefs", "usage").stdout
    assert len(usage.splitlines()) == 4, usage
    rows = [line.split() for line in before]              # KEY [PARENT] KIND
    parents = {r[1] for r in rows if len(r) == 3}
    top = [r[0] for r in rows if r[0] not in parents]
    bottom = [r[0] for r in rows if len(r) == 2]
    cd.ctr("snapshots", "--snapshotter", "mergefs", "prepare", "scratch", top[0])
    r = cd.ctr("snapshots", "--snapshotter", "mergefs", "prepare", "scratch", top[0], check=False)
    assert r.returncode != 0 and "already exists" in r.stderr, r.stderr
    cd.ctr("snapshots", "--snapshotter", "mergefs", "rm", "scratch")
    r = cd.ctr("snapshots", "--snapshotter", "mergefs", "rm", bottom[0], check=False)
    assert r.returncode != 0 and "failed precondition" in r.stderr, r.stderr
    r = cd.ctr("snapshots", "--snapshotter", "mergefs", "info", "no-such-key", check=False)
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr


def test_kill9_of_the_service_while_a_container_runs(stack, tmp_path):
    svc, cd = stack
    archive = build_image(tmp_path)
    cd.ctr("images", "import", "--snapshotter", "mergefs", "--base-name",
           "docker.io/library/mergefs-test", archive)
    cd.ctr("run", "-d", "--snapshotter", "mergefs", IMAGE, "long", "/bin/sleep", "1000")
    svc.kill()
    svc.start()
    # containerd's client reconnects with a backoff (up to a few seconds)
    waited = until(lambda: cd.ctr("snapshots", "--snapshotter", "mergefs", "ls",
                                  check=False).returncode == 0)
    assert waited < 30
    cd.ctr("tasks", "kill", "-s", "SIGKILL", "long", check=False)
    for _ in range(50):
        if cd.ctr("tasks", "rm", "-f", "long", check=False).returncode == 0:
            break
        time.sleep(0.2)
    cd.ctr("containers", "rm", "long")
    out = cd.ctr("run", "--rm", "--snapshotter", "mergefs", IMAGE, "after", "/bin/cat",
                 "/etc/motd").stdout
    assert out == "top\n"
    # containerd's GC removes the container's snapshot after `containers rm`
    assert until(lambda: not [s for s in snapshots(cd) if "Active" in s]) < 30
    with open("/proc/self/mounts") as f:
        assert str(tmp_path / "state") not in f.read()
