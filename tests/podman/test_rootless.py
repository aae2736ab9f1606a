"""Rootless podman (a non-root user, subuid/subgid ranges, newuidmap) with mergefs as
the mount program, and with fuse-overlayfs (the check's check).

containers/storage runs the mount program inside podman's user namespace, as
uid 0 there: it cannot set trusted.* xattrs and mounts FUSE itself. Set-up
this needs, for either program: a dedicated user (created here if missing,
with ranges in /etc/subuid and /etc/subgid), a /dev/fuse the user may open
(Debian's udev makes it 0666; where it is 0600 the test binds a 0666 node
over it in a private mount namespace, so the machine is not changed), and a
Python the user may run (the venv's, or the system python3 of the same
version given this installation's paths).
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import mergefs
from mergefs.testing.mounts import watch_below
from mergefs.testing.podman import PodmanEnv, busybox_image

from ..conftest import needs, require
from .test_podman import CONTAINERFILE, IMAGE_VIEW, LOOK

USER = "mergefs-rootless"
SUBIDS = "300000:65536"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    needs("root", "podman", "runc", "umoci", "newuidmap", "newgidmap", "useradd", "runuser",
          "unshare", "busybox"),
]


def _uid_processes(uid: int) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                out.append(int(pid))
        except OSError:
            pass
    return out


def _stop(pids) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@pytest.fixture(scope="module")
def rootless_user():
    created, added = False, []
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER],
                       check=True)
        created, pw = True, pwd.getpwnam(USER)
    for path in ("/etc/subuid", "/etc/subgid"):
        lines = Path(path).read_text().splitlines() if os.path.exists(path) else []
        if not any(line.startswith(f"{USER}:") for line in lines):
            with open(path, "a") as f:
                f.write(f"{USER}:{SUBIDS}\n")
            added.append(path)
    try:
        yield pw
    finally:
        _stop(_uid_processes(pw.pw_uid))
        for path in added:
            lines = Path(path).read_text().splitlines(keepends=True)
            Path(path).write_text("".join(l for l in lines if l != f"{USER}:{SUBIDS}\n"))
        if created:
            subprocess.run(["userdel", USER], capture_output=True)


def _user_can_run(exe: str) -> bool:
    return subprocess.run(["runuser", "-u", USER, "--", exe, "-c", "import pyfuse3"],
                          capture_output=True).returncode == 0


def user_mergefs(where: Path) -> str:
    """A ``mergefs`` the user may execute: this venv's, or a venv of the system python3
    (same version) whose path names this checkout and this venv's site-packages."""
    if _user_can_run(sys.executable):
        return str(Path(sys.executable).parent / "mergefs")
    py = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}",
                      path="/usr/bin:/bin")
    if py is None:
        pytest.skip(f"{sys.executable} is not executable by {USER} and no system python "
                    f"{sys.version_info.major}.{sys.version_info.minor}")
    venv = where / "venv"
    subprocess.run([py, "-m", "venv", "--without-pip", venv], check=True)
    (pth,) = venv.glob("lib/python*/site-packages")
    roots = [os.path.dirname(os.path.dirname(mergefs.__file__))] + site.getsitepackages()
    (pth / "mergefs-checkout.pth").write_text("\n".join(roots) + "\n")
    script = venv / "bin/mergefs"
    script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom mergefs.cli import main\n"
                      "sys.exit(main())\n")
    script.chmod(0o755)
    if not _user_can_run(str(venv / "bin/python")):
        pytest.skip(f"{USER} cannot import pyfuse3 from this installation")
    return str(script)


class RootlessPodman(PodmanEnv):
    """PodmanEnv run as USER: its storage owned by the user, podman started through
    runuser (in a private mount namespace with a 0666 /dev/fuse where needed)."""

    def __init__(self, root: Path, program: str, pw, fuse_node: str | None):
        super().__init__(root, "kernel")              # configs rewritten below
        self.name, self.pw, self.fuse_node = program, pw, fuse_node
        self.program = user_mergefs(root) if program == "mergefs" else \
            shutil.which("fuse-overlayfs")
        conf = (self.root / "storage.conf").read_text()
        (self.root / "storage.conf").write_text(
            conf + f'[storage.options.overlay]\nmount_program = "{self.program}"\n')
        (self.root / "xdg").mkdir(mode=0o700)
        owner = f"{pw.pw_uid}:{pw.pw_gid}"
        subprocess.run(["chown", "-R", owner, self.root, self.runroot.parent], check=True)
        self.env.update(HOME=str(self.root), XDG_RUNTIME_DIR=str(self.root / "xdg"))

    def __call__(self, *args, check: bool = True, timeout: float = 300):
        inner = ["runuser", "-u", USER, "--", "env"] + \
            [f"{k}={self.env[k]}" for k in ("HOME", "XDG_RUNTIME_DIR", "TMPDIR",
                                            "CONTAINERS_STORAGE_CONF", "CONTAINERS_CONF")] + \
            ["podman", *map(str, args)]
        cmd = inner if self.fuse_node is None else \
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount --bind {self.fuse_node} /dev/fuse && exec "$@"', "sh", *inner]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, cwd=self.root)
        if check and r.returncode != 0:
            raise AssertionError(f"rootless podman {' '.join(map(str, args))} ({self.name}) "
                                 f"exited {r.returncode}: {r.stderr.strip()}")
        return r

    def mounts(self, fs_only: bool = True) -> list[str]:
        """Mounts under root in podman's mount namespace (that of its pause process)."""
        pause = self.root / "xdg/libpod/tmp/pause.pid"
        try:
            pid = pause.read_text().strip()
            with open(f"/proc/{pid}/mounts") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        return [l.split()[1] for l in lines if l.split()[1].startswith(f"{self.root}/")
                and (not fs_only or l.split()[2] == "overlay" or l.split()[2].startswith("fuse"))]

    def close(self) -> None:
        super().close()
        _stop(_uid_processes(self.pw.pw_uid))


@pytest.fixture(params=["mergefs", "fuse-overlayfs"])
def rootless(request, rootless_user, tmp_path):
    if request.param == "fuse-overlayfs":
        require("fuse-overlayfs")
    root = watch_below(tempfile.mkdtemp(prefix="mergefs-rootless-"))   # traversable by the user
    root.chmod(0o755)
    node = None
    if stat.S_IMODE(os.stat("/dev/fuse").st_mode) & 0o006 != 0o006:
        node = str(root / "fuse")
        os.mknod(node, 0o666 | stat.S_IFCHR, os.stat("/dev/fuse").st_rdev)
        os.chmod(node, 0o666)
    env = None
    try:
        env = RootlessPodman(root / "podman", request.param, rootless_user, node)
        shutil.copy(busybox_image(tmp_path / "image"), root / "image.tar")
        os.chmod(root / "image.tar", 0o644)
        env.image = env.load(root / "image.tar")
        yield env
    finally:
        if env is not None:
            env.close()
        shutil.rmtree(root, ignore_errors=True)


def test_rootless_load_run_build(rootless):
    podman = rootless
    r = podman("run", "--rm", podman.image, "sh", "-c", "id -u; " + LOOK)
    assert r.stdout == "0\n" + IMAGE_VIEW
    podman("run", "--name", "w", podman.image, "sh", "-c",
           "echo changed > /etc/motd; rm /data/keep/c; rm -r /data/new; rm /data/old; "
           "mkdir /data/old; echo z > /data/old/z")
    assert sorted(podman("diff", "w").stdout.splitlines()) == sorted([
        "C /data", "C /data/keep", "D /data/keep/c", "C /data/old", "A /data/old/z",
        "D /data/new", "C /etc", "C /etc/motd"])
    assert podman("run", "--rm", podman.image, "sh", "-c", LOOK).stdout == IMAGE_VIEW
    podman("rm", "w")
    ctx = podman.root / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE.format(image=podman.image))
    subprocess.run(["chown", "-R", f"{podman.pw.pw_uid}", ctx], check=True)
    podman("build", "--network", "none", "--tag", "localhost/built", ctx)
    r = podman("run", "--rm", "localhost/built", "sh", "-c",
               "cat /etc/motd; ls /made; cat /made/g; ls /data/keep; ls /data/old; "
               "test -e /etc/group || echo no-group")
    assert r.stdout == "layer two\nextra\ng\none\ntwo\nfresh\nin\nno-group\n"
    podman("image", "rm", "localhost/built")
    mounts, procs = podman.leftovers()
    assert not mounts and not procs, f"{podman.name}: left {mounts} {procs}"
