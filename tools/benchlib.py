"""Shared helpers for the benchmarks under tools/ (farm, union, store).

* ``drop_caches()``: sync, then drop page, dentry and inode caches (root).
* ``run_child(argv)``: run a process, return its wall time, exit status, output
  its own peak RSS in bytes and its CPU time (through GNU time; see there why).
* ``vm_hwm(pid)``: peak RSS of a live process from /proc/PID/status.
* ``Series`` / ``Table``: samples per measurement, printed with median, min,
  max and the ratio of medians against an anchor measured in the same run.
* ``scratch_ext4(dir)``: a journaled ext4 on a loop device for the duration of
  a benchmark (see its docstring for why the root filesystem is not used).
* ``minbase_packages()``, ``package_files()``, ``copy_host_files()``,
  ``minbase_skeleton()``, ``dpkg_database()``: a Debian minbase-like root
  built from this host's installed packages, no mirror (tools/bench_podman.py's
  image, tools/bench_writable.py's ``dpkg`` step).

Benchmarks import this as ``import benchlib`` (tools/ is on sys.path when a
script in tools/ runs). Nothing here asserts performance; scripts print numbers.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
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


# -- a Debian minbase-like root from this (Debian) host's installed packages --------
def installed_packages() -> dict[str, tuple[str, str, str]]:
    """{package: (priority, "pre-depends, depends", version)} of what dpkg says is installed."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Priority}\t${Status}\t"
                          "${Pre-Depends}, ${Depends}\t${Version}\n"], capture_output=True,
                         text=True, check=True).stdout
    pkgs = {}
    for line in out.splitlines():
        name, prio, status, deps, version = line.split("\t")
        if status.endswith(" installed"):
            pkgs[name] = (prio, deps, version)
    return pkgs


def minbase_packages() -> list[str]:
    """Every installed ``Priority: required`` package, ``apt``, and their installed
    Pre-Depends/Depends closure (the first installed alternative of each): what
    ``debootstrap --variant=minbase`` installs, as far as this host has it."""
    pkgs = installed_packages()
    todo = [p for p, (prio, _, _) in pkgs.items() if prio == "required"] + ["apt"]
    seen: set[str] = set()
    while todo:
        p = todo.pop()
        if p in seen or p not in pkgs:
            continue
        seen.add(p)
        for dep in filter(None, (d.strip() for d in pkgs[p][1].split(","))):
            for alt in dep.split("|"):            # the first installed alternative
                name = re.split(r"[\s(:]", alt.strip(), maxsplit=1)[0]
                if name in pkgs:
                    todo.append(name)
                    break
    return sorted(seen)


def package_files(packages: Sequence[str]) -> list[str]:
    """The host paths (files and directories) dpkg lists for ``packages``, sorted,
    each through its directory's real path (usrmerge: /bin/bash is /usr/bin/bash
    here; the bin -> usr/bin links are ``minbase_skeleton``'s)."""
    files: set[str] = set()
    for p in packages:
        listing = subprocess.run(["dpkg", "-L", p], capture_output=True, text=True).stdout
        for f in listing.splitlines():
            if f.startswith("/") and f != "/." and os.path.lexists(f):
                f = os.path.join(os.path.realpath(os.path.dirname(f)), os.path.basename(f))
                if not os.path.islink(f) or os.path.dirname(f) != "/":
                    files.add(f)
    return sorted(files)


def copy_host_files(files: Sequence[str], rootfs: str | os.PathLike, listing: str) -> None:
    """Copy the host paths ``files`` (as ``package_files`` gives) into ``rootfs``
    with their metadata (tar, no recursion); ``listing`` is a scratch file."""
    with open(listing, "w") as f:
        f.write("".join(p.lstrip("/") + "\n" for p in files))
    subprocess.run(f"tar -C / --no-recursion -cf - -T {listing} | tar -C {rootfs} -xf -",
                   shell=True, check=True)


def minbase_skeleton(rootfs: str | os.PathLike) -> None:
    """What no package owns: the usrmerge links, the empty top-level directories, a
    root-only /etc/passwd and /etc/group."""
    rootfs = str(rootfs)
    for link in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink(f"/{link}") and not os.path.lexists(os.path.join(rootfs, link)):
            os.symlink(os.readlink(f"/{link}"), os.path.join(rootfs, link))
    for d in ("tmp", "root", "proc", "sys", "dev", "run", "mnt", "var/tmp"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    os.makedirs(os.path.join(rootfs, "etc"), exist_ok=True)
    with open(os.path.join(rootfs, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/bash\n")
    with open(os.path.join(rootfs, "etc/group"), "w") as f:
        f.write("root:x:0:\n")


def dpkg_database(rootfs: str | os.PathLike, installed: Sequence[str],
                  own: Sequence[str]) -> None:
    """Write ``rootfs``/var/lib/dpkg as dpkg keeps it with only ``installed``
    installed (their paragraphs of the host's status file, the file and explicit
    triggers they are interested in, their diversions), and the info files
    (lists, md5sums, maintainer scripts) of ``own`` (a layer holds the info of
    the packages it adds). No alternatives: minbase has none it needs."""
    db, host = os.path.join(rootfs, "var/lib/dpkg"), "/var/lib/dpkg"
    for d in ("info", "updates", "triggers", "alternatives", "parts"):
        os.makedirs(os.path.join(db, d), exist_ok=True)
    keep = set(installed)
    with open(os.path.join(host, "status")) as f:
        paras = f.read().split("\n\n")
    with open(os.path.join(db, "status"), "w") as f:
        f.write("\n\n".join(p.strip("\n") for p in paras
                            if p.strip() and p.split("\n", 1)[0].split(": ", 1)[-1] in keep)
                + "\n")
    def interested(line: str) -> bool:        # "PKG[:ARCH][/noawait]"
        return re.split(r"[:/\n]", line)[0] in keep

    with open(os.path.join(host, "triggers/File")) as f:
        lines = [ln for ln in f if interested(ln.split(" ", 1)[1])]
    with open(os.path.join(db, "triggers/File"), "w") as f:
        f.writelines(lines)
    for name in os.listdir(os.path.join(host, "triggers")):     # explicit triggers
        if name not in ("File", "Unincorp", "Lock"):
            with open(os.path.join(host, "triggers", name)) as f:
                lines = [ln for ln in f if interested(ln)]
            if lines:
                with open(os.path.join(db, "triggers", name), "w") as f:
                    f.writelines(lines)
    for name in ("triggers/Unincorp", "available", "statoverride", "lock", "lock-frontend",
                 "triggers/Lock"):
        open(os.path.join(db, name), "w").close()
    with open(os.path.join(host, "diversions")) as f:
        div = f.read().splitlines()
    with open(os.path.join(db, "diversions"), "w") as f:
        for i in range(0, len(div) - 2, 3):
            if div[i + 2] in keep:
                f.write("\n".join(div[i:i + 3]) + "\n")
    mine = set(own)
    for name in sorted(os.listdir(os.path.join(host, "info"))):
        if re.split(r":|\.(?=[^.]+$)", name)[0] in mine:
            shutil.copy2(os.path.join(host, "info", name), os.path.join(db, "info", name))
