#!/usr/bin/env python3
"""Benchmark: mergefs.oci.extract_layer against ``tar -x`` of the same layer tar.

    sudo .venv/bin/python tools/bench_import.py [--workdir DIR] [--files 100000]
                                                [--reps 3] [--fs ext4|tmpfs] [--gzip]

The layer is l0 of a one-layer ``gen_stack`` stack in OCI format (realistic
sizes, symlinks, hardlinks, xattrs, odd names), tarred once by GNU tar
(``--format=posix --xattrs``). Each repetition extracts it with GNU tar
(``--xattrs --xattrs-include=* --numeric-owner``, owners and modes kept as
root does by default) and with mergefs (which also hashes the stream for the
diffID, converts whiteouts and checks every member); both run as child
processes, Python start-up included, the order alternating, outputs removed
and the filesystem synced between runs. Target (issue 4): mergefs <= 1.5x tar.

Filesystems: ``ext4`` is a private journaled ext4 on a loop device
(benchlib.scratch_ext4; the VM's root filesystem is ext4 without a journal,
whose inode allocation is slowed by other processes' deletions); ``tmpfs``
measures CPU and syscall cost only. CPU time (user+sys of the child and its
threads) is printed too: on this shared 2-core VM other work inflates wall
times, CPU time much less. Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import benchlib  # noqa: E402
import gen_stack  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from mergefs.oci import extract_layer
r = extract_layer(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0, "entries": r.entries,
                  "diff_id": r.diff_id, "warnings": len(r.warnings)}))
"""


def make_tar(work: str, files: int, gzip: bool) -> str:
    """The benchmark's layer tar (made once per parameters, then reused)."""
    layer = gen_stack.ensure_stack(os.path.join(work, f"stack-{files}"), 1, files, fmt="oci")[0]
    tar = os.path.join(work, f"layer-{files}.tar")
    if not os.path.exists(tar):
        subprocess.run(["tar", "--format=posix", "--xattrs", "--xattrs-include=*",
                        "--numeric-owner", "-C", layer, "-cf", tar + ".tmp", "."], check=True)
        os.rename(tar + ".tmp", tar)
    if gzip:
        if not os.path.exists(tar + ".gz"):
            subprocess.run(f"gzip -c {tar} > {tar}.gz.tmp && mv {tar}.gz.tmp {tar}.gz",
                           shell=True, check=True)
        return tar + ".gz"
    return tar


@contextlib.contextmanager
def target_fs(work: str, kind: str):
    if kind == "ext4":
        with benchlib.scratch_ext4(work, size="16G") as mnt:
            yield mnt
        return
    mnt = os.path.join(work, "tmpfs")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16g", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        benchlib.unmount(mnt)


def run_tar(src: str, dest: str) -> benchlib.ChildResult:
    os.mkdir(dest)
    return benchlib.run_child(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                               "-xf", src, "-C", dest])


def run_mergefs(src: str, dest: str) -> benchlib.ChildResult:
    return benchlib.run_child([sys.executable, "-c", CHILD, src, dest], cwd=REPO)


def clean(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-import")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fs", choices=("ext4", "tmpfs"), default="ext4")
    ap.add_argument("--gzip", action="store_true", help="a .tar.gz (tar -xzf vs mergefs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_import: needs root (loop/tmpfs mounts, owners, trusted xattrs)", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    src = make_tar(args.workdir, args.files, args.gzip)
    size = os.path.getsize(src)
    table = benchlib.Table(f"import of a {args.files}-file layer tar ({size / 2**20:.0f} MiB"
                           f"{', gzip' if args.gzip else ''}) on {args.fs}")
    tar_s = table.series("tar -x")
    mfs_s = table.series("mergefs extract_layer", anchor="tar -x")
    tar_cpu = table.series("tar -x, CPU (user+sys)")
    mfs_cpu = table.series("mergefs, CPU (user+sys)", anchor="tar -x, CPU (user+sys)")
    entries = None
    with target_fs(args.workdir, args.fs) as mnt:
        for rep in range(args.reps):
            order = [("tar", run_tar), ("mergefs", run_mergefs)]
            if rep % 2:
                order.reverse()
            for name, fn in order:
                dest = os.path.join(mnt, f"{name}-{rep}")
                os.sync()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                result = fn(src, dest)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                (tar_s if name == "tar" else mfs_s).add(result.seconds)
                (tar_cpu if name == "tar" else mfs_cpu).add(cpu)
                if name == "mergefs":
                    entries = result.json()["entries"]
                clean(dest)
    print(table.render())
    print(f"entries extracted by mergefs: {entries}")
    if args.json:
        print(json.dumps(table.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
