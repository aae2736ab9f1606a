"""Shared helpers for the benchmarks under tools/ (farm, union, store).

* ``drop_caches()``: sync, then drop page, dentry and inode caches (root).
* ``run_child(argv)``: run a process, return its wall time, exit status, output
  its own peak RSS in bytes and its CPU time (through GNU time; see there why).
* ``vm_hwm(pid)``: peak RSS of a live process from /proc/PID/status.
* ``Series`` / ``Table``: samples per measurement, printed with median, min,
  max and the ratio of medians against an anchor measured in the same run.
* ``scratch_ext4(dir)``: a journaled ext4 on a loop device for the duration of
  a benchmark (see its docstring for why the root filesystem is not used).

Benchmarks import this as ``import benchlib`` (tools/ is on sys.path when a
script in tools/ runs). Nothing here asserts performance; scripts print numbers.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from mergefs.testing import mounts


# -- caches -------------------------------------------------------------------


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 when gone or none):
    less sensitive to other load on the machine than wall time."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_requests(pid: int, log: str) -> dict:
    """A mergefs server's FUSE request counts since it last logged them ({} if none)."""
    return mounts.server_requests(pid, log)


def prepare_tree(tree: str) -> None:
    """Byte-compile ``tree``'s mergefs (what an installed package has: pip compiles
    it; this environment may set PYTHONDONTWRITEBYTECODE, which would compile it on
    every run) and build its table of compiled attrs methods where it has one, as
    tools/bootstrap.sh does for this tree."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(tree, "mergefs")],
                   check=True, stdout=subprocess.DEVNULL)
    if os.path.exists(os.path.join(tree, "mergefs", "union", "codecache.py")):
        subprocess.run([sys.executable, "-m", "mergefs.union.codecache"], check=True,
                       stdout=subprocess.DEVNULL, cwd=tree,
                       env={**os.environ, "PYTHONPATH": os.path.abspath(tree)})


def drop_caches() -> None:
    """Write back dirty data, then drop clean page cache, dentries and inodes."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except PermissionError:
        raise PermissionError("dropping caches needs root (/proc/sys/vm/drop_caches)") from None


def warm_tree(*roots: str) -> None:
    """Read every directory and lstat every entry of ``roots`` (dentries and
    inodes cached; no file data). A bare ``find`` would not do: it uses d_type
    and never looks entries up, so their dentries and inodes stay cold."""
    for root in roots:
        subprocess.run(["find", root, "-xdev", "-printf", "%s\n"], check=True,
                       stdout=subprocess.DEVNULL)


# -- timing ---------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


@dataclass
class ChildResult:
    seconds: float          # wall time from spawn to exit
    returncode: int
    maxrss: int             # peak resident set of this child, bytes
    stdout: str
    stderr: str
    cpu_seconds: float | None = None   # user + system time of the child (GNU time)

    def json(self) -> dict:
        """The child's stdout parsed as JSON (its last line)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


GNU_TIME = "/usr/bin/time"


def run_child(argv: Sequence[str], check: bool = True, **popen_kw) -> ChildResult:
    """Run ``argv`` to completion and measure that child's own peak RSS.

    Neither ``getrusage(RUSAGE_CHILDREN)`` (the maximum over every child ever
    reaped) nor the ``wait4`` rusage of a direct child works: Linux keeps the
    parent's RSS high-water mark across vfork/fork + exec, so a 2 MB ``cp``
    spawned from a 200 MB Python reports 200 MB. GNU time forks the command
    from its own ~1 MB image and reports the wait4 ``%M`` of that grandchild;
    without GNU time, maxrss is the polluted upper bound (``ru_maxrss``).
    """
    rss_file = None
    if os.access(GNU_TIME, os.X_OK):
        fd, rss_file = tempfile.mkstemp(prefix="benchlib-rss-")
        os.close(fd)
        argv = [GNU_TIME, "-f", "%M %U %S", "-o", rss_file, *argv]
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kw)
        out, err = proc.communicate()
        seconds = time.perf_counter() - t0
        maxrss, cpu = _read_gnu_time(rss_file) if rss_file else (None, None)
    finally:
        if rss_file:
            os.unlink(rss_file)
    if maxrss is None:
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = ChildResult(seconds, proc.returncode, maxrss,
                         out.decode(errors="replace"), err.decode(errors="replace"), cpu)
    if check and proc.returncode != 0:
        sys.stderr.write(f"{argv[0]} failed ({proc.returncode}); its stderr:\n{result.stderr}")
        raise subprocess.CalledProcessError(proc.returncode, list(argv), result.stdout,
                                            result.stderr)
    return result


def _read_gnu_time(path: str) -> tuple[int | None, float | None]:
    """(peak RSS bytes, user+sys seconds) from GNU time's -o file ("%M %U %S");
    the numbers may follow a "Command exited with non-zero status" line."""
    with open(path) as f:
        for line in reversed(f.read().splitlines()):
            fields = line.split()
            if len(fields) == 3 and fields[0].isdigit():
                return int(fields[0]) * 1024, float(fields[1]) + float(fields[2])
    return None, None


def vm_hwm(pid: int) -> int:
    """Peak RSS (VmHWM) of a live process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no VmHWM for pid {pid}")


def self_maxrss() -> int:
    """Peak RSS of this process so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- results ----------------------------------------------------------------------
@dataclass
class Series:
    """Samples of one measurement; ``anchor`` names the series it is compared to."""
    name: str
    unit: str = "s"
    anchor: str | None = None
    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


class Table:
    """Rows of series; ratios are medians against anchors from the same run."""

    def __init__(self, title: str):
        self.title = title
        self.rows: dict[str, Series] = {}

    def series(self, name: str, unit: str = "s", anchor: str | None = None) -> Series:
        if name not in self.rows:
            self.rows[name] = Series(name, unit, anchor)
        return self.rows[name]

    def ratio(self, name: str) -> float | None:
        row = self.rows[name]
        base = self.rows.get(row.anchor) if row.anchor else None
        if base is None or not base.samples or not row.samples or base.median == 0:
            return None
        return row.median / base.median

    def render(self) -> str:
        width = max([len(n) for n in self.rows] + [12])
        head = f"{'measurement':<{width}}  {'n':>2}  {'median':>12}  {'min':>12}  {'max':>12}  ratio"
        lines = [self.title, head, "-" * len(head)]
        for name, row in self.rows.items():
            r = self.ratio(name)
            rtxt = f"{r:.2f}x {row.anchor}" if r is not None else ""
            lines.append(f"{name:<{width}}  {len(row.samples):>2}  {_fmt(row.median, row.unit):>12}  "
                         f"{_fmt(min(row.samples, default=float('nan')), row.unit):>12}  "
                         f"{_fmt(max(row.samples, default=float('nan')), row.unit):>12}  {rtxt}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {name: {"unit": r.unit, "anchor": r.anchor, "samples": r.samples,
                       "median": r.median, "ratio": self.ratio(name)}
                for name, r in self.rows.items()}


def _fmt(value: float, unit: str) -> str:
    if value != value:   # nan
        return "-"
    if unit == "B":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.3f} {unit}"


# -- scratch filesystem ------------------------------------------------------------
def is_mounted(path: str) -> bool:
    from mergefs import mounttable
    return mounttable.is_mounted(path)



def unmount(mnt: str) -> None:
    """Unmount ``mnt``: normally, else lazily (a busy mount goes once its users do)."""
    for cmd in (["umount", mnt], ["umount", "-l", mnt]):
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return


@contextlib.contextmanager
def scratch_ext4(workdir: str, size: str = "8G", inode_ratio: int = 8192,
                 inodes: int | None = None) -> Iterator[str]:
    """A fresh journaled ext4 (default mkfs options) on a loop device, mounted
    at WORKDIR/fs while the block runs; unmounted and its image removed after.

    Why: this VM's root filesystem is ext4 *without a journal*, where inode
    allocation skips every inode freed in the last minutes (fs/ext4/ialloc.c
    ``recently_deleted``); while other processes delete files, each create or
    mkdir costs ~0.5 ms instead of ~0.05 ms, which measures their churn, not
    the code. A private journaled ext4 is what a store would normally sit on.
    Cold-cache runs still read from disk: drop_caches also drops the loop
    image's pages from the host filesystem's page cache.
    """
    os.makedirs(workdir, exist_ok=True)
    image, mnt = os.path.join(workdir, "scratch.img"), os.path.join(workdir, "fs")
    if is_mounted(mnt):
        raise RuntimeError(f"{mnt} is already mounted (a run still going, or left over: umount it)")
    subprocess.run(["truncate", "-s", size, image], check=True)
    try:
        density = ["-N", str(inodes)] if inodes else ["-i", str(inode_ratio)]
        subprocess.run(["mkfs.ext4", "-q", "-F", *density, image], check=True)
        os.makedirs(mnt, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", image, mnt], check=True)
        try:
            yield mnt
        finally:
            unmount(mnt)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
