#!/usr/bin/env python3
"""The Python side of a writable mount's requests, without FUSE: CPU per request.

    sudo .venv/bin/python tools/drive_ops.py --tree A --tree B [--files 10000] [--reps 5]

Calls ``UnionOperations`` handlers directly, in the order the kernel sends
them (traced with ``-o debug``), on a writable view over tools/gen_stack.py's
stack with an upper on a scratch ext4, and prints the process CPU seconds of
each phase (``time.process_time``; handler code and the syscalls it makes,
no /dev/fuse transport). Each tree runs in its own child (PYTHONPATH=TREE),
reps alternate between the trees, and the minimum and median of the reps are
shown: a lever's effect on the handlers, measured at the same load, with much
less noise than a whole mount under other agents' load.

Phases (the requests of each, per entry):
- ``create``: the untar of a small file: lookup (negative), create,
  getxattr security.capability, write, getxattr, setattr uid/gid, getattr,
  setattr mode, setattr times, release, getattr of the parent (100 files a dir,
  each dir: lookup, mkdir, getattr);
- ``lookup``: lookup + forget of the created files and of 6,000 lower files;
- ``chown``: getxattr + setattr uid/gid of 2,000 lower files (copy-up);
- ``append``: getxattr + the copy-up C asks for at the first no-open WRITE
  (``FdCache.write_for_c``) + the write, of 2,000 other lower files;
- ``unlink``: unlink of the created files, rmdir of their dirs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import os, sys, time, types
tree, layers, upper, work, files, listfile = sys.argv[1:7]
sys.path.insert(0, tree)
import pyfuse3
from mergefs.layer import Layer
from mergefs.union.writable import WritableView
from mergefs.union.ops import UnionOperations
layers = layers.split(":")
files = int(files)
view = WritableView([Layer(p, "overlay") for p in layers], upper, work)
ops = UnionOperations(view)
ctx = types.SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)

def run(coro):
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    raise RuntimeError("a handler suspended")

def call(name, *args):
    try:
        return run(getattr(ops, name)(*args))
    except pyfuse3.FUSEError as e:
        return e

def fields(**kw):
    f = types.SimpleNamespace(update_atime=False, update_mtime=False, update_ctime=False,
                              update_mode=False, update_uid=False, update_gid=False,
                              update_size=False)
    f.__dict__.update(kw)
    return f

attr = pyfuse3.EntryAttributes()
attr.st_uid, attr.st_gid, attr.st_mode = 0, 0, 0o100644
attr.st_atime_ns = attr.st_mtime_ns = 1_700_000_000 * 10**9
F_OWN = fields(update_uid=True, update_gid=True)
F_MODE = fields(update_mode=True)
F_TIME = fields(update_atime=True, update_mtime=True)
CAP = b"security.capability"
out = {}
t0 = time.process_time()
dirs = []
for d in range(files // 100):
    dname = b"d%02d" % d
    call("lookup", 1, dname, ctx)
    e = call("mkdir", 1, dname, 0o755, ctx)
    call("getattr", 1, ctx)
    dirs.append(e.st_ino)
    for f in range(100):
        name = b"f%03d" % f
        call("lookup", e.st_ino, name, ctx)
        fi, fe = call("create", e.st_ino, name, 0o644, os.O_WRONLY | os.O_CREAT, ctx)
        ino = fe.st_ino
        call("getxattr", ino, CAP, ctx)
        call("write", fi.fh, 0, b"x" * 100)
        call("getxattr", ino, CAP, ctx)
        call("setattr", ino, attr, F_OWN, fi.fh, ctx)
        call("getattr", ino, ctx)
        call("setattr", ino, attr, F_MODE, fi.fh, ctx)
        call("setattr", ino, attr, F_TIME, fi.fh, ctx)
        call("release", fi.fh)
        call("getattr", e.st_ino, ctx)
out["create"] = time.process_time() - t0

lower = open(listfile).read().splitlines()
def walk(path):
    """lookup each component (the kernel would once), return the leaf's number."""
    ino = 1
    for name in path.encode().split(b"/"):
        e = call("lookup", ino, name, ctx)
        if isinstance(e, Exception):
            return None
        ino = e.st_ino
    return ino

t0 = time.process_time()
for d, dino in enumerate(dirs):
    for f in range(100):
        e = call("lookup", dino, b"f%03d" % f, ctx)
        call("forget", [(e.st_ino, 1)])
looked = [walk(p) for p in lower]
out["lookup"] = time.process_time() - t0

t0 = time.process_time()
own = fields(update_uid=True, update_gid=True)
attr.st_uid = attr.st_gid = 1
for ino in looked[:2000]:
    if ino is None:
        continue
    call("getxattr", ino, CAP, ctx)
    call("setattr", ino, attr, own, None, ctx)
    call("getattr", ino, ctx)
out["chown"] = time.process_time() - t0

t0 = time.process_time()
for ino in looked[2000:4000]:
    if ino is None:
        continue
    call("getxattr", ino, CAP, ctx)
    ops.fds.write_for_c(ino)                # what C calls at the first no-open WRITE
    os.pwrite(ops.fds.cached(ops.inodes.get(ino), True), b"x", 0)
out["append"] = time.process_time() - t0

t0 = time.process_time()
for d, dino in enumerate(dirs):
    for f in range(100):
        call("unlink", dino, b"f%03d" % f, ctx)
    call("rmdir", 1, b"d%02d" % d, ctx)
out["unlink"] = time.process_time() - t0
problems = ops.check()
assert not problems, problems
view.close()
print(repr(out))
'''


def main(argv=None) -> int:
    import benchlib
    import bench_metadata
    import gen_stack
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-writable")
    ap.add_argument("--tree", action="append", required=True)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    layers = gen_stack.ensure_stack(os.path.join(args.workdir, "stack"), 3, 30_000,
                                    seed=1, fmt="overlay")
    listfile = os.path.join(args.workdir, "metadata.list")
    if not os.path.exists(listfile):
        bench_metadata.lower_files(layers, listfile)
    trees = [os.path.abspath(t) for t in args.tree]
    res: dict = {t: {} for t in trees}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with benchlib.scratch_ext4(os.path.join(args.workdir, "scratch-drive"), size="2G") as fs:
        for r in range(args.reps):
            for k, tree in enumerate(trees):
                base = os.path.join(fs, f"{r}-{k}")
                up, wk = os.path.join(base, "up"), os.path.join(base, "wk")
                os.makedirs(up)
                os.makedirs(wk)
                out = subprocess.run([sys.executable, "-c", CHILD, tree, ":".join(layers), up, wk,
                                      str(args.files), listfile], check=True,
                                     capture_output=True, text=True, cwd="/").stdout
                for phase, cpu in eval(out).items():
                    res[tree].setdefault(phase, []).append(cpu)
                subprocess.run(["rm", "-rf", base], check=True)
    for tree in trees:
        print(f"tree {tree}:")
        for phase, cpus in res[tree].items():
            cpus = sorted(cpus)
            print(f"  {phase:8} min {cpus[0]:6.3f} median {cpus[len(cpus) // 2]:6.3f}  "
                  f"{[round(c, 3) for c in cpus]}")
    if len(trees) == 2:
        a, b = (res[t] for t in trees)
        print("second / first (min, median):")
        for phase in a:
            sa, sb = sorted(a[phase]), sorted(b[phase])
            print(f"  {phase:8} {sb[0] / sa[0]:5.2f} {sb[len(sb) // 2] / sa[len(sa) // 2]:5.2f}")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
