#!/usr/bin/env python3
"""The server's CPU per namespace request (rename, link, unlink, mkdir, rmdir,
symlink, setattr of a directory, setxattr), as a package manager sends them.

    sudo .venv/bin/python tools/namespace_requests.py [--files 2000] [--reps 3] [--tree SPEC ...]
                                                      [--callgrind]

A writable mount (``python -m mergefs mount --upper``) over one layer of
``--files`` files (100 a directory), layer, upper and work dir on a private
tmpfs (the upper filesystem's own cost small and the same for every run).
Per file, what ``dpkg -i`` does to a file it replaces: link it to a backup
name, rename the new version over it, unlink the backup; per directory, chmod,
utime, a setxattr, a new subdirectory with a symlink in it, removed again.
The files are copied up and their new versions written before the timed part,
so it is namespace requests only (and the kernel's LOOKUPs of new names). Prints per run the
server's CPU during the timed part (its threads' ``schedstat`` run time;
with ``--callgrind``, the instructions it ran then, counted by valgrind: what
a loaded machine does not blur) per file and its request counts (``fast_*_direct``: the plain Python handler
called from C, pyfuse3 patch v9; the bare names: pyfuse3's coroutines).

``--tree DIR[,VAR=VALUE...]`` as in tools/untar_requests.py (e.g.
``.,MERGEFS_FASTPATH_DIRECT=0`` for pyfuse3's coroutines on the same build, or
an older checkout with ``PYTHONPATH=`` its own pyfuse3 build); several
alternate per rep, forwards and backwards. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mergefs.testing import mounts  # noqa: E402
from untar_requests import HERE, cpu_ns, server_of  # noqa: E402


def make_layer(low: str, files: int) -> None:
    for f in range(files):
        d = os.path.join(low, f"d{f // 100:03d}")
        if f % 100 == 0:
            os.mkdir(d)
        with open(os.path.join(d, f"f{f % 100:02d}"), "wb") as out:
            out.write(b"%d\n" % f)


def prepare(mnt: str, files: int) -> None:
    """Untimed: every lower file copied up (a chmod) and a new version of it written
    beside it (``NAME.dpkg-new``), as dpkg unpacks before it installs."""
    for f in range(files):
        name = os.path.join(mnt, f"d{f // 100:03d}", f"f{f % 100:02d}")
        os.chmod(name, 0o644)
        with open(name + ".dpkg-new", "wb") as out:
            out.write(b"new %d\n" % f)


def namespace_work(mnt: str, files: int) -> None:
    """The timed part: dpkg's replace-a-file dance per file, directory changes per directory."""
    for f in range(files):
        d = os.path.join(mnt, f"d{f // 100:03d}")
        name = os.path.join(d, f"f{f % 100:02d}")
        os.link(name, name + ".dpkg-tmp")             # LINK: the backup
        os.rename(name + ".dpkg-new", name)           # RENAME over the old name
        os.unlink(name + ".dpkg-tmp")                 # UNLINK the backup
        if f % 100 == 99:
            os.chmod(d, 0o750)                        # SETATTR of a directory
            os.utime(d, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
            os.setxattr(d, "user.k", b"v")            # SETXATTR
            sub = os.path.join(d, "sub")
            os.mkdir(sub)                             # MKDIR
            os.symlink("../f00", os.path.join(sub, "ln"))   # SYMLINK
            os.unlink(os.path.join(sub, "ln"))        # UNLINK
            os.rmdir(sub)                             # RMDIR
            os.removexattr(d, "user.k")               # REMOVEXATTR


def callgrind_argv(out: str, argv: list) -> list:
    """``argv`` under callgrind, counting nothing until ``callgrind_control -i on``;
    its counts to ``out`` when it exits (``instructions``)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            f"--log-file={out}.log", *argv]


def instructions(out: str) -> float:
    """The instructions (millions) a callgrind run counted, from its output file."""
    with open(out) as f:
        totals = [ln for ln in f if ln.startswith(("summary:", "totals:"))]
    return int(totals[-1].split()[1]) / 1e6


def foreground(argv: list, tree: str, env: dict, log: str, mnt: str) -> subprocess.Popen:
    """A server run in the foreground (it logs to its stderr: ``log``) from ``tree``,
    once ``mnt`` is mounted (slow under valgrind)."""
    with open(log, "w") as err:
        child = subprocess.Popen(argv, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while not os.path.ismount(mnt):
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no mount (see {log})")
        time.sleep(0.2)
    return child


def alternating(trees: list, reps: int) -> list:
    """(rep, tree) in the order runs take them: forwards, then backwards."""
    return [(rep, tree) for rep in range(reps) for tree in (trees if rep % 2 == 0 else trees[::-1])]


@contextlib.contextmanager
def private_tmpfs(prefix: str):
    """A tmpfs mounted on a new directory for the block, removed after it."""
    base = tempfile.mkdtemp(prefix=prefix)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", prefix.strip("-"), base], check=True)
    try:
        yield base
    finally:
        subprocess.run(["umount", base], check=False)
        shutil.rmtree(base, ignore_errors=True)


def run_dirs(spec: str, base: str) -> tuple[str, dict, tuple]:
    """A ``--tree`` spec's checkout and environment, and a new run's upper, work
    dir and mount point (made) and its log and callgrind output paths, below ``base``."""
    tree, *pairs = spec.split(",")
    env = dict(os.environ, PYTHONHASHSEED="0", **dict(p.split("=", 1) for p in pairs))
    run = tempfile.mkdtemp(dir=base)
    up, wk, mnt = (os.path.join(run, d) for d in ("up", "wk", "mnt"))
    for d in (up, wk, mnt):
        os.mkdir(d)
    return tree, env, (up, wk, mnt, os.path.join(run, "log"), os.path.join(run, "callgrind.out"))


def one_run(spec: str, base: str, low: str, files: int, callgrind: bool) -> tuple[float, dict]:
    """One mount, prepared, then the timed part: the server's CPU seconds (with
    ``callgrind``: the instructions it ran, in millions) and its request counts."""
    tree, env, (up, wk, mnt, log, out) = run_dirs(spec, base)
    cmd = [sys.executable, "-m", "mergefs", "mount", "--log", log, "--upper", up, "--work", wk,
           low, mnt]
    child = None
    if callgrind:       # in the foreground under valgrind, counting only the timed part
        child = foreground(callgrind_argv(out, [*cmd, "--foreground"]), tree, env, log, mnt)
    else:
        subprocess.run(cmd, check=True, cwd=tree, env=env)
    pid = None
    try:
        pid = server_of(mnt)
        prepare(mnt, files)
        mounts.server_requests(pid, log, timeout=60)
        if callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True,
                           stdout=subprocess.DEVNULL)
        before = cpu_ns(pid)
        namespace_work(mnt, files)
        cpu = (cpu_ns(pid) - before) / 1e9
        if callgrind:
            subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True,
                           stdout=subprocess.DEVNULL)
        counts = mounts.server_requests(pid, log, timeout=60)
    finally:
        mounts.force_unmount(mnt)
        if child is not None:                # valgrind writes its counts as it exits
            child.wait(timeout=300)
        deadline = time.monotonic() + 30     # its files on the tmpfs closed before it goes
        while pid and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    if callgrind:
        cpu = instructions(out)
    return cpu, counts


def describe(cost: float, counts: dict, args) -> str:
    """One run's line: the server's cost per file, its requests, the load."""
    per = (f"{cost:.1f} M instructions ({cost / args.files * 1e3:.1f} k/file)" if args.callgrind
           else f"cpu {cost:.3f} s ({cost / args.files * 1e6:.1f} us/file)")
    mix = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"server {per}, {sum(counts.values())} requests [{mix}] load {os.getloadavg()[0]:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tree", action="append", help="checkout to run the server from, "
                    "with VAR=VALUE pairs after commas (repeatable; default: this one)")
    ap.add_argument("--callgrind", action="store_true",
                    help="count the server's instructions (valgrind) instead of its CPU time")
    args = ap.parse_args(argv)
    trees = args.tree or [HERE]
    with private_tmpfs("namespace-requests-") as base:
        low = os.path.join(base, "low")
        os.mkdir(low)
        make_layer(low, args.files)
        for rep, tree in alternating(trees, args.reps):
            print(f"rep {rep} {tree}: " +
                  describe(*one_run(tree, base, low, args.files, args.callgrind), args),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
