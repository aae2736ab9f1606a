"""Kernel overlayfs as a test oracle, and unmounting that survives failures.

Mounts here are made by tests and unmounted by them, also on failure: the
context managers unmount in ``finally``, lazily if the mount is busy.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence


def is_mounted(path: str | os.PathLike) -> bool:
    from mergefs import mounttable
    return mounttable.is_mounted(path)


def force_unmount(path: str | os.PathLike) -> None:
    """Unmount ``path``: normally, else lazily. Silent when nothing is mounted."""
    if not is_mounted(path):
        return
    for cmd in (["umount", str(path)], ["umount", "-l", str(path)]):
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return


def servers_of(mnt: str | os.PathLike) -> list[int]:
    """Live processes (not this one, not zombies) whose command line names ``mnt``:
    the servers of a mount made there."""
    key = os.fsencode(str(mnt))
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if key in cmd and state != b"Z" and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


# Private roots registered by tests and harnesses -> the mounts below each when registered.
_WATCHED: dict[str, set[str]] = {}


def server_requests(pid: int, log: str | os.PathLike, timeout: float = 5) -> dict:
    """A mergefs server's FUSE request counts since it last logged them (``fast_*``:
    served by the C fast path): SIGUSR1 makes it log ``requests {...}``; read that
    line back from ``log``. {} if none came within ``timeout`` seconds."""
    return server_counts(pid, log, timeout)[0]


def server_counts(pid: int, log: str | os.PathLike, timeout: float = 5) -> tuple[dict, dict]:
    """``server_requests`` and, beside it, the server's ``waits {...}`` line: how its C
    request loop waited since the last SIGUSR1 (``waits``, ``hits``: ended by the
    spin, ``sleeps``, ``window_us``, ``max_us``; {} for a server without it)."""
    try:
        before = os.path.getsize(log)
    except FileNotFoundError:
        before = 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError), open(log) as f:
            f.seek(before)
            text = f.read()
            m, w = re.search(r"requests (\{.*\})", text), re.search(r"waits (\{.*\})", text)
            if m and w:
                return json.loads(m.group(1)), json.loads(w.group(1))
        time.sleep(0.02)
    return {}, {}


def watch_below(path: str | os.PathLike) -> Path:
    """Put ``path`` under the per-test leak check: a private directory (``mkdtemp``) that a
    test or harness mounts below outside pytest's temp dir (short unix socket paths, a
    dir other users can traverse). Mounts already there now are not the test's."""
    from mergefs import mounttable
    root = os.path.realpath(path)
    if root not in _WATCHED:
        _WATCHED[root] = mounttable.targets(below=root)
    return Path(path)


class MountWatch:
    """The mounts a test made and left: new mount points below ``base`` (pytest's temp
    dir) or below a root registered with ``watch_below``, before the test vs after it.

    Only paths this session owns are looked at: mount points are unique paths, and no
    other process (another pytest session, another agent on the machine) mounts below
    this session's temp dir or a registered ``mkdtemp`` root, except the servers and
    harnesses the test started. Mounts made anywhere else are never counted.
    """

    def __init__(self, base: str | os.PathLike):
        self.base = os.path.realpath(base)
        self.before = self._now()

    def _now(self) -> set[str]:
        from mergefs import mounttable
        out: set[str] = set()
        for root in (self.base, *_WATCHED):
            out |= mounttable.targets(below=root)
        return out

    def leaked(self) -> set[str]:
        return self._now() - self.before - set().union(*_WATCHED.values())


def can_mount_overlay() -> bool:
    if os.geteuid() != 0:
        return False
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "overlay" for line in f)


@contextlib.contextmanager
def overlay_mount(lowers: Sequence[str | os.PathLike], target: str | os.PathLike | None = None,
                  upper: str | os.PathLike | None = None, work: str | os.PathLike | None = None,
                  options: Sequence[str] = ()) -> Iterator[Path]:
    """Mount kernel overlayfs over ``lowers`` (bottom first, as mergefs takes them).

    Lower paths are passed relative to their common parent (the mount is run
    from there) so long stacks fit in the one-page option string. A single
    lower without an upper gets an empty layer below it, as the kernel wants
    two.
    """
    with contextlib.ExitStack() as stack:
        lowers = [Path(l).absolute() for l in lowers]
        if len(lowers) == 1 and upper is None:
            empty = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=lowers[0].parent)))
            lowers = [empty] + lowers
        if target is None:   # beside the layers, so the test's temp dir holds it
            target = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="mergefs-ovl-", dir=lowers[-1].parent)))
        target = Path(target)
        base = os.path.commonpath([str(l) for l in lowers])
        rel = [os.path.relpath(l, base) for l in reversed(lowers)]
        opts = ["lowerdir=" + ":".join(rel)]
        if upper is not None:
            opts += [f"upperdir={Path(upper).absolute()}", f"workdir={Path(work).absolute()}"]
        opts += list(options)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(target)],
                       cwd=base, check=True, capture_output=True)
        try:
            yield target
        finally:
            force_unmount(target)
