#!/usr/bin/env python3
"""The FUSE requests of one untarred file, by opcode, and the server's CPU for them.

    sudo .venv/bin/python tools/untar_requests.py [--files 10000] [--reps 3] [--tree SPEC ...]

Untars ``--files`` small files (100 a directory, GNU tar as root: per file
openat(O_CREAT|O_EXCL), write, futimens, fchown, fchmod, close) into the root
of a fresh writable mount (``python -m mergefs mount --upper``) whose layer,
upper and work dir are on a private tmpfs, so the upper filesystem's own
cost is small and the same for every run (``--ext4``: on a fresh journaled
ext4 instead, benchlib.scratch_ext4, as tools/bench_writable.py's uppers).
Prints, per run, the server's CPU seconds during the untar (the sum of its threads' ``schedstat`` run time, in
ns, finer than the clock ticks of /proc/PID/stat) and its request counts per
file as it logs them on SIGUSR1 (``fast_*``: answered from the C fast path's
hooks, ``*_direct`` among them by the plain Python handler called from C).

``--tree DIR[,VAR=VALUE...]`` runs the server from another checkout with
these environment variables (e.g. ``PYTHONPATH=`` a pyfuse3 built by that
checkout's ``tools/pyfuse3_inode_fh.py --build``, or ``MERGEFS_FASTPATH_DIRECT=0``);
several alternate per rep, in turn forwards and backwards, so each sees the
same load. Nothing is asserted; the load average is printed per run.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402
from mergefs.testing import mounts  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tarball(path: str, files: int) -> None:
    with tarfile.open(path, "w") as t:
        def add(name, kind, data=b""):
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.size = kind, 1_700_000_000, len(data)
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            t.addfile(info, io.BytesIO(data) if data else None)
        add("./", tarfile.DIRTYPE)
        for f in range(files):
            if f % 100 == 0:
                add(f"./d{f // 100:03d}/", tarfile.DIRTYPE)
            add(f"./d{f // 100:03d}/f{f % 100:02d}", tarfile.REGTYPE, b"%d\n" % f)


def server_of(mnt: str) -> int:
    """The process holding /dev/fuse among those naming ``mnt``."""
    for pid in mounts.servers_of(mnt):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
        except OSError:
            continue
    raise RuntimeError(f"no server for {mnt}")


def cpu_ns(pid: int) -> int:
    return sum(int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
               for t in os.listdir(f"/proc/{pid}/task"))


def one_run(spec: str, base: str, tarball: str, files: int) -> tuple[float, dict]:
    tree, *pairs = spec.split(",")
    env = dict(os.environ, **dict(p.split("=", 1) for p in pairs))
    run = tempfile.mkdtemp(dir=base)
    dirs = [os.path.join(run, d) for d in ("low", "up", "wk", "mnt")]
    for d in dirs:
        os.mkdir(d)
    low, up, wk, mnt = dirs
    log = os.path.join(run, "log")
    subprocess.run([sys.executable, "-m", "mergefs", "mount", "--log", log, "--upper", up,
                    "--work", wk, low, mnt], check=True, cwd=tree, env=env)
    try:
        pid = server_of(mnt)
        os.listdir(mnt)
        mounts.server_requests(pid, log)
        before = cpu_ns(pid)
        subprocess.run(["tar", "-xf", tarball, "-C", mnt], check=True)
        cpu = (cpu_ns(pid) - before) / 1e9
        return cpu, mounts.server_requests(pid, log)
    finally:
        mounts.force_unmount(mnt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tree", action="append", help="checkout to run the server from "
                    "(repeatable; default: this one)")
    ap.add_argument("--ext4", action="store_true", help="a journaled ext4, not a tmpfs")
    args = ap.parse_args(argv)
    trees = args.tree or [HERE]
    top = tempfile.mkdtemp(prefix="untar-requests-")
    if args.ext4:
        fs = benchlib.scratch_ext4(top, size="4G")
        base = fs.__enter__()
    else:
        base = top
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "untar-requests", base],
                       check=True)
    try:
        tarball = os.path.join(base, "t.tar")
        make_tarball(tarball, args.files)
        for rep in range(args.reps):
            for tree in (trees if rep % 2 == 0 else trees[::-1]):
                cpu, counts = one_run(tree, base, tarball, args.files)
                load = os.getloadavg()[0]
                total = sum(counts.values())
                mix = " ".join(f"{k}={v / args.files:.2f}" for k, v in sorted(counts.items())
                               if v >= args.files // 100)
                print(f"rep {rep} {tree}: server cpu {cpu:.3f} s ({cpu / args.files * 1e6:.1f} "
                      f"us/file), {total / args.files:.2f} requests/file [{mix}] load {load:.2f}",
                      flush=True)
    finally:
        if args.ext4:
            fs.__exit__(None, None, None)
        else:
            subprocess.run(["umount", base], check=False)
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
