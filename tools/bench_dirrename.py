#!/usr/bin/env python3
"""Time renaming a lower directory through a writable mergefs mount (issue 10 item 4).

Usage: tools/bench_dirrename.py [N ...]   (default: 20000 100000)

For each N: one lower layer holding ``big0..big2`` with N files each (the
files of big1 and big2 are hardlinks of big0's, to build the layer faster)
and ``empty0..empty2``; a writable ``mergefs mount`` over it. Each rep
renames one big and one empty lower directory (interleaved, the order
alternating), so every timed rename is the first rename of a lower
directory, the case that matters. Printed: the median of each, their ratio
(1.0x means O(1)), and the upper's entry count at the end (with redirects a
handful, with a copy 3N+).
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPS = 3


def _count(path: str) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(path))


def build(lower: str, n: int) -> None:
    for k in range(REPS):
        os.makedirs(os.path.join(lower, f"empty{k}"))
        os.makedirs(os.path.join(lower, f"big{k}"))
    os.makedirs(os.path.join(lower, "warm"))
    big0 = os.path.join(lower, "big0")
    for i in range(n):
        with open(os.path.join(big0, f"f{i}"), "wb") as f:
            f.write(b"x")
    for k in range(1, REPS):
        dst = os.path.join(lower, f"big{k}")
        for i in range(n):
            os.link(os.path.join(big0, f"f{i}"), os.path.join(dst, f"f{i}"))


def run(n: int, root: str) -> None:
    lower, upper, work, mnt = (os.path.join(root, x) for x in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    build(lower, n)
    exe = os.path.join(os.path.dirname(sys.executable), "mergefs")
    subprocess.run([exe, "mount", "--upper", upper, "--work", work, lower, mnt], check=True)
    try:
        # the server's first rename imports its code: not part of either number
        os.rename(os.path.join(mnt, "warm"), os.path.join(mnt, "warm2"))
        times = {"big": [], "empty": []}
        for k in range(REPS):
            for name in (("big", "empty") if k % 2 == 0 else ("empty", "big")):
                t = time.perf_counter()
                os.rename(os.path.join(mnt, f"{name}{k}"), os.path.join(mnt, f"{name}{k}.moved"))
                times[name].append(time.perf_counter() - t)
        assert len(os.listdir(os.path.join(mnt, "big0.moved"))) == n
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        print(f"N={n}: rename of a lower dir (median of {REPS}): big {med['big']:.2f} ms, "
              f"empty {med['empty']:.2f} ms, ratio {med['big'] / med['empty']:.2f}x; "
              f"upper entries: {_count(upper)}; load {os.getloadavg()[0]:.2f}")
    finally:
        subprocess.run([exe, "umount", mnt], check=False)


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [20000, 100000]
    for n in sizes:
        root = tempfile.mkdtemp(prefix="bench-dirrename-", dir="/var/tmp")
        try:
            run(n, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
