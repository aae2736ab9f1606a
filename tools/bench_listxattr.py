#!/usr/bin/env python3
"""Server CPU of LISTXATTR on a writable mergefs mount, C fast path on and off.

    sudo .venv/bin/python tools/bench_listxattr.py [--files 200 --passes 50 --reps 3]

podman's naive diff walk lists the xattrs of every entry. This mounts a
one-layer writable union of ``--files`` files (each with a ``user.a``),
reads each once (its fd enters the no-open fd cache, which the C fast path
serves: keep --files within its 256 entries to measure C alone), then times
``--passes`` passes of ``listxattr`` over them, with ``MERGEFS_FASTPATH`` on
and ``=0`` (the Python handler) alternately, ``--reps`` pairs. Prints the
server's user+system CPU (/proc/PID/stat) and wall time per pass set, the
request counts it logged (``fast_listxattr``: served in C) and the load
average. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402
from bench_writable import find_server_pid  # noqa: E402


def run(base: str, low: str, fast: bool, passes: int) -> tuple:
    env = dict(os.environ, MERGEFS_FASTPATH="1" if fast else "0")
    for d in ("up", "wk", "mnt"):
        shutil.rmtree(os.path.join(base, d), ignore_errors=True)
        os.makedirs(os.path.join(base, d))
    mnt, log = os.path.join(base, "mnt"), os.path.join(base, "log")
    subprocess.run([sys.executable, "-m", "mergefs", "mount", "--log", log,
                    "--upper", os.path.join(base, "up"), "--work", os.path.join(base, "wk"),
                    low, mnt], check=True, env=env)
    pid = find_server_pid(os.path.basename(sys.executable).encode(), mnt)
    try:
        paths = [os.path.join(mnt, n) for n in sorted(os.listdir(mnt))]
        for p in paths:
            with open(p, "rb") as f:
                f.read()
        benchlib.server_requests(pid, log)
        cpu0, t0 = benchlib.process_cpu(pid), time.perf_counter()
        for _ in range(passes):
            for p in paths:
                os.listxattr(p, follow_symlinks=False)
        cpu1, t1 = benchlib.process_cpu(pid), time.perf_counter()
        return cpu1 - cpu0, t1 - t0, benchlib.server_requests(pid, log)
    finally:
        benchlib.unmount(mnt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--passes", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print("load average at start:", os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="mergefs-bench-listxattr-") as base:
        low = os.path.join(base, "low")
        os.makedirs(low)
        for i in range(args.files):
            p = os.path.join(low, f"f{i}")
            with open(p, "wb") as f:
                f.write(b"x")
            os.setxattr(p, "user.a", b"1")
        n = args.files * args.passes
        for rep in range(args.reps):
            for fast in (True, False):
                cpu, wall, req = run(base, low, fast, args.passes)
                counts = {k: v for k, v in req.items() if "xattr" in k}
                print(f"rep {rep} fast path {'on ' if fast else 'off'}: server CPU {cpu:.3f} s "
                      f"({cpu / n * 1e6:.1f} us/request), wall {wall:.3f} s, {n} listxattr "
                      f"{counts}", flush=True)
    print("load average at end:", os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
