"""Podman with private storage, for the podman tests and tools/bench_podman.py.

``PodmanEnv(root, program)`` writes a ``storage.conf`` (overlay driver,
graphroot/runroot under ``root``, ``mount_program`` = ``program``; none means
kernel overlayfs; a runroot path longer than podman's limit of 50 characters
goes to a short directory under /tmp instead) and a ``containers.conf`` (runc,
cgroupfs, no network, the ulimits runc needs here, podman's tmp dir under
``root``) and runs ``podman`` with them. ``close()`` removes every container
and image, then stops what is left by pid and unmounts what is left under
``root`` (and that directory); ``leftovers()`` names the mounts and processes
still there (a test asserts it is empty *before* close cleans up).
``busybox_image`` builds an OCI archive offline with umoci
and busybox-static: three layers with a whiteout, an opaque directory and a
directory replaced by a file.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ls", "cat", "echo", "rm", "mkdir", "touch", "mv", "test", "find", "stat",
           "sort", "true", "id", "cp", "ln", "wc", "sed", "head", "seq", "rmdir", "chmod")
PROGRAMS = ("mergefs", "fuse-overlayfs", "kernel")
# podman refuses a --runroot longer than this, and conmon's exit command (``podman
# --runroot R ... container cleanup ID``) always passes one: past it the cleanup
# never runs and ``podman run --rm`` waits out its 20 s conmon timeout.
RUNROOT_MAX = 50


def mergefs_program(where: Path) -> str:
    """A symlink ``mergefs-overlayfs`` to this installation's ``mergefs`` (the helper
    form works under any name)."""
    target = Path(sys.executable).parent / "mergefs"
    if not target.exists():
        target = Path(shutil.which("mergefs") or "mergefs")
    link = where / "mergefs-overlayfs"
    if not link.is_symlink():
        link.symlink_to(target)
    return str(link)


def program_path(name: str, where: Path) -> str | None:
    if name == "mergefs":
        return mergefs_program(where)
    if name == "fuse-overlayfs":
        return shutil.which("fuse-overlayfs")
    if name == "kernel":
        return None
    raise ValueError(f"unknown mount program {name!r}; one of {PROGRAMS}")


class PodmanEnv:
    def __init__(self, root: Path, program: str, path: str | None = None,
                 mountopt: str | None = None):
        """``program``: one of PROGRAMS, or any name with ``path`` (the mount program);
        ``mountopt``: storage.conf's overlay ``mountopt`` (passed to every mount),
        e.g. ``views=SOCK`` for mergefs through a views service."""
        self.root = Path(root)
        self.name = program
        for d in ("graph", "tmp", "libpod-tmp"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.runroot = self.root / "run"
        self._short = None              # a short dir holding the runroot, removed by close()
        if len(str(self.runroot)) > RUNROOT_MAX:
            self._short = Path(tempfile.mkdtemp(prefix="mergefs-podman-", dir="/tmp"))
            self.runroot = self._short / "run"
        self.runroot.mkdir(exist_ok=True)
        self.program = path or program_path(program, self.root)
        overlay = f'[storage.options.overlay]\nmount_program = "{self.program}"\n' \
            if self.program else ""
        if mountopt:
            overlay += f'mountopt = "{mountopt}"\n'
        (self.root / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.root}/graph"\n'
            f'runroot = "{self.runroot}"\n{overlay}')
        (self.root / "containers.conf").write_text(
            '[containers]\nnetns = "none"\n'
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            '[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "file"\n'
            'lock_type = "file"\n'
            f'tmp_dir = "{self.root}/libpod-tmp"\n')
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=f"{self.root}/storage.conf",
                        CONTAINERS_CONF=f"{self.root}/containers.conf",
                        TMPDIR=f"{self.root}/tmp")

    def __call__(self, *args, check: bool = True, timeout: float = 300,
                 ) -> subprocess.CompletedProcess:
        r = subprocess.run(["podman", *map(str, args)], env=self.env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(map(str, args))} ({self.name}) "
                                 f"exited {r.returncode}: {r.stderr.strip()}")
        return r

    def load(self, archive: Path) -> str:
        out = self("load", "-i", archive).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Loaded image")]
        assert names, f"podman load printed no image name: {out!r}"
        return names[0].split(",")[0]

    # -- what is left ------------------------------------------------------
    def _prefixes(self) -> tuple[str, ...]:
        return (f"{self.root}/",) + ((f"{self._short}/",) if self._short else ())

    def mounts(self, fs_only: bool = True) -> list[str]:
        """Mounts under root and the runroot (FUSE and overlay ones; every one with
        fs_only=False)."""
        prefixes = self._prefixes()
        out = []
        with open("/proc/self/mounts") as f:
            for line in f:
                _, target, fstype = line.split()[:3]
                if target.startswith(prefixes) and (not fs_only or fstype == "overlay"
                                                    or fstype.startswith("fuse")):
                    out.append(target)
        return out

    def processes(self) -> dict[int, str]:
        """Live processes whose command line names root or the runroot (podman, conmon,
        mount servers)."""
        keys = [os.fsencode(p) for p in self._prefixes()]
        out = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{pid}/stat", "rb") as f:
                    state = f.read().rpartition(b")")[2].split()[0]
            except OSError:
                continue
            if any(k in cmd for k in keys) and state != b"Z" and int(pid) != os.getpid():
                out[int(pid)] = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
        return out

    def leftovers(self, wait: float = 15.0) -> tuple[list[str], dict[int, str]]:
        """Mounts and processes still there once ``wait`` seconds have passed without
        them going (conmon's exit command, a podman cleanup, may take a moment)."""
        deadline = time.monotonic() + wait
        while True:
            mounts, procs = self.mounts(), self.processes()
            if (not mounts and not procs) or time.monotonic() > deadline:
                return mounts, procs
            time.sleep(0.2)

    def close(self) -> None:
        """Remove everything podman made; stop and unmount whatever survives (by pid)."""
        for args in (("rm", "--all", "--force", "--time", "0"),
                     ("image", "rm", "--all", "--force")):
            try:
                self(*args, check=False, timeout=120)
            except subprocess.TimeoutExpired:
                pass
        _, procs = self.leftovers(wait=5.0)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in procs:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
            procs = self.processes()
            if not procs:
                break
        for m in sorted(self.mounts(fs_only=False), key=len, reverse=True):
            if subprocess.run(["umount", m], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", m], capture_output=True)
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)


# -- an image built offline ------------------------------------------------
def _tar(members: list[tuple[str, str, bytes]]) -> bytes:
    """(name, kind, data) -> tar bytes; kind is file, dir or symlink (data = target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            elif kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, data.decode(), 0o777
                t.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _run(*cmd) -> None:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {r.stderr.strip()}")


def busybox_image(where: Path, name: str = "mergefs-busybox", plain: bool = False) -> Path:
    """An OCI archive (tar of an OCI layout, tag ``name``) built with umoci.

    Layer 1: busybox and applets, /etc, /data/keep/{a,b}, /data/old/{x,y},
    /gone, /etc/motd. Layer 2: /etc/motd changed, /data/new. Layer 3 (a raw
    tar, as umoci repack writes no opaque markers): ``.wh.gone``, an opaque
    /data/keep holding only ``c``, and /data/old replaced by a file.
    ``plain``: layer 1 only (no whiteout, no opaque directory anywhere).
    """
    where = Path(where)
    img, bundle = where / "layout", where / "bundle"
    _run("umoci", "init", "--layout", img)
    _run("umoci", "new", "--image", f"{img}:{name}")
    _run("umoci", "unpack", "--image", f"{img}:{name}", bundle)
    rootfs = bundle / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "data/keep", "data/old"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    shutil.copy(BUSYBOX, rootfs / "bin/busybox")
    for a in APPLETS:
        os.symlink("busybox", rootfs / "bin" / a)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/motd").write_text("layer one\n")
    (rootfs / "gone").write_text("deleted by layer three\n")
    for n in ("a", "b"):
        (rootfs / "data/keep" / n).write_text(f"{n}\n")
    for n in ("x", "y"):
        (rootfs / "data/old" / n).write_text(f"{n}\n")
    _run("umoci", "repack", "--refresh-bundle", "--image", f"{img}:{name}", bundle)
    if not plain:
        _upper_layers(img, name, rootfs, where)
    _run("umoci", "config", "--image", f"{img}:{name}", "--config.cmd", "/bin/sh",
         "--config.env", "PATH=/bin")
    archive = where / f"{name}.tar"
    _run("tar", "-C", img, "-cf", archive, ".")
    shutil.rmtree(bundle)
    return archive


def _upper_layers(img: Path, name: str, rootfs: Path, where: Path) -> None:
    (rootfs / "etc/motd").write_text("layer two\n")
    (rootfs / "data/new").write_text("new\n")
    _run("umoci", "repack", "--image", f"{img}:{name}", rootfs.parent)
    raw = where / "layer3.tar"
    raw.write_bytes(_tar([(".wh.gone", "file", b""),
                          ("data/", "dir", b""),
                          ("data/keep/", "dir", b""),
                          ("data/keep/.wh..wh..opq", "file", b""),
                          ("data/keep/c", "file", b"c\n"),
                          ("data/old", "file", b"a file now\n")]))
    _run("umoci", "raw", "add-layer", "--image", f"{img}:{name}", raw)
