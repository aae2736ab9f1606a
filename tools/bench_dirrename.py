#!/usr/bin/env python3
"""Time renaming a lower directory through a writable mergefs mount (issue 10 item 4).

Usage: tools/bench_dirrename.py [N ...]   (default: 20000 100000)

For each N: one lower layer holding ``big/`` with N files and ``empty/``; a
writable ``mergefs mount`` over it; ``rename(big, big2)`` and
``rename(empty, empty2)`` timed in the same mount, interleaved reps (each rep
renames back and forth). The first rename of each moves a lower directory
(the case that matters); later ones move what is then an upper directory.
The upper's entry count after the first rename is printed (with redirects it
stays a handful, with a copy it is N+). The first-rename ratio big/empty is
the number that matters: 1.0x means O(1).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

REPS = 3


def _count(path: str) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(path))


def run(n: int, root: str) -> None:
    lower, upper, work, mnt = (os.path.join(root, x) for x in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt, os.path.join(lower, "empty"), os.path.join(lower, "big")):
        os.makedirs(d)
    big = os.path.join(lower, "big")
    for i in range(n):
        with open(os.path.join(big, f"f{i}"), "wb") as f:
            f.write(b"x")
    exe = os.path.join(os.path.dirname(sys.executable), "mergefs")
    subprocess.run([exe, "mount", "--upper", upper, "--work", work, lower, mnt], check=True)
    try:
        times = {"big": [], "empty": []}
        upper_entries = None
        for rep in range(REPS):
            for name in ("big", "empty"):
                a, b = (name, name + "2") if rep % 2 == 0 else (name + "2", name)
                t = time.perf_counter()
                os.rename(os.path.join(mnt, a), os.path.join(mnt, b))
                times[name].append(time.perf_counter() - t)
                if upper_entries is None and name == "big":
                    upper_entries = _count(upper)
        assert len(os.listdir(os.path.join(mnt, "big2"))) == n
        first = {k: v[0] * 1000 for k, v in times.items()}
        later = {k: min(v[1:]) * 1000 for k, v in times.items()}
        print(f"N={n}: first rename (the lower dir) big {first['big']:.2f} ms, empty "
              f"{first['empty']:.2f} ms, ratio {first['big'] / first['empty']:.2f}x; later "
              f"renames big {later['big']:.2f} ms, empty {later['empty']:.2f} ms; upper entries "
              f"after the first rename: {upper_entries}; load {os.getloadavg()[0]:.2f}")
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
