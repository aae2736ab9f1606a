#!/usr/bin/env python3
"""Benchmark of the layer store (issue 4 "Performance"); prints numbers, asserts nothing.

    sudo .venv/bin/python tools/bench_store.py [--workdir DIR] [--files 100000] [--reps 5]

Runs on a private journaled ext4 (benchlib.scratch_ext4; see there why) and measures:

1. **re-merge** of an existing 8-layer, ~100k-file farm merge: the API call
   (open store + resolve + find the id + take a ref) and the whole CLI process
   (`mergefs merge ID...`, Python start-up included). Target < 50 ms.
2. **du and ls over 1,000 snapshots** (1,000 small layers + merges of them):
   `usage.measure` / listing through the API, and `mergefs du --json` /
   `mergefs ls --json` as processes. Target < 1 s.
3. **import of a 100k-file layer tar** (mergefs.oci extraction + tree digest)
   against `tar -x` of the same tar. Target <= 1.5x.
4. **farm vs union**: farm build time for stacks of growing size against the
   time `mergefs mount` of the same layers takes to be live; from these the
   policy's FARM_US_PER_ENTRY and UNION_MOUNT_MS (snapshotter/policy.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import benchlib  # noqa: E402
import gen_stack  # noqa: E402

from snapshotter import Snapshotter, meta  # noqa: E402
from snapshotter.store import Store  # noqa: E402
from snapshotter.usage import measure  # noqa: E402

PY = sys.executable


def cli(root: str, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([PY, "-m", "mergefs", "--root", root, *args], check=True,
                   stdout=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - t0


def bench_remerge(t: benchlib.Table, work: str, files: int, reps: int) -> dict:
    layers = gen_stack.ensure_stack(os.path.join(work, "stack"), 8, files)
    root = os.path.join(work, "store-remerge")
    with Store(root) as store:
        secs, rows = benchlib.timed(lambda: [Snapshotter(store=store).import_dir(p) for p in layers])
        t.series("import 8 layer dirs (copy + digest)").add(secs)
        ids = [r.id for r in rows]
        secs, first = benchlib.timed(lambda: Snapshotter(store=store).merge(ids, strategy="farm"))
        t.series("first merge (farm build)").add(secs)
    api = t.series("re-merge, API (open+resolve+ref)")
    proc = t.series("re-merge, CLI process", anchor=None)
    for _ in range(reps):
        def again():
            with Store(root) as s:
                return Snapshotter(store=s).merge(ids)
        secs, res = benchlib.timed(again)
        assert res.reused and res.row.id == first.row.id
        api.add(secs)
        proc.add(cli(root, "merge", *ids))
    t.series("python -c pass (start-up floor)").add(
        benchlib.timed(lambda: subprocess.run([PY, "-c", "pass"], check=True))[0])
    return {"entries": first.row.entries}


def bench_many(t: benchlib.Table, work: str, n: int, reps: int) -> None:
    root = os.path.join(work, "store-many")
    src = os.path.join(work, "tiny")
    with Store(root) as store:
        ids = []
        for i in range(n - n // 10):
            d = os.path.join(src, str(i))
            os.makedirs(os.path.join(d, "etc"))
            with open(os.path.join(d, "etc", "id"), "w") as f:
                f.write(f"{i}\n")
            ids.append(Snapshotter(store=store).import_dir(d).id)
        for i in range(n // 10):
            Snapshotter(store=store).merge(ids[i * 5:i * 5 + 3], strategy="farm" if i % 2 else "union")
        count = meta.count(store.db)
    for _ in range(reps):
        def du():
            with Store(root) as s:
                return measure(s)
        t.series(f"du API, {count} snapshots").add(benchlib.timed(du)[0])
        t.series(f"du CLI --json, {count} snapshots").add(cli(root, "du", "--json"))
        t.series(f"ls CLI --json, {count} snapshots").add(cli(root, "ls", "--json"))


def bench_tar_import(t: benchlib.Table, work: str, files: int, reps: int) -> None:
    layer = gen_stack.ensure_stack(os.path.join(work, "one"), 1, files)[0]
    tar = os.path.join(work, "one.tar")
    if not os.path.exists(tar):
        subprocess.run(["tar", "-C", layer, "--xattrs", "-cf", tar, "."], check=True)
    for i in range(reps):
        out = os.path.join(work, f"x{i}")
        os.makedirs(out)
        t.series("tar -x of a 100k-file layer").add(benchlib.timed(lambda: subprocess.run(
            ["tar", "-C", out, "--xattrs", "-xf", tar], check=True))[0])
        shutil.rmtree(out)
        root = os.path.join(work, f"store-tar{i}")
        t.series("mergefs import of that tar", anchor="tar -x of a 100k-file layer").add(
            cli(root, "import", tar))
        shutil.rmtree(root)


def bench_farm_vs_union(t: benchlib.Table, work: str, sizes: list[int], reps: int) -> list:
    from mergefs.farm import build_farm
    points = []
    for files in sizes:
        layers = gen_stack.ensure_stack(os.path.join(work, f"stack-{files}"), 8, files)
        fs = t.series(f"farm build, {files} files")
        us = t.series(f"union mount, {files} files", anchor=f"farm build, {files} files")
        for _ in range(reps):
            out = os.path.join(work, "farm-out")
            fs.add(benchlib.timed(lambda: build_farm(layers, out))[0])
            shutil.rmtree(out)
            mnt = tempfile.mkdtemp(dir=work)
            try:
                us.add(cli("/nonexistent", "mount", *layers, mnt))
            finally:
                subprocess.run([PY, "-m", "mergefs", "umount", mnt], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
                os.rmdir(mnt)
        points.append((files, fs.median, us.median))
    return points


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-store")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--snapshots", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", default="1000,10000,30000,100000",
                    help="stack sizes (files) for farm vs union")
    ap.add_argument("--only", default="remerge,many,tar,policy")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    t = benchlib.Table(f"store benchmark ({args.files} files, {args.snapshots} snapshots, "
                       f"{args.reps} reps)")
    extra = {}
    with benchlib.scratch_ext4(args.workdir, size="16G") as work:
        if "remerge" in only:
            extra["remerge"] = bench_remerge(t, work, args.files, args.reps)
        if "many" in only:
            bench_many(t, work, args.snapshots, args.reps)
        if "tar" in only:
            bench_tar_import(t, work, args.files, max(1, args.reps // 2))
        if "policy" in only:
            points = bench_farm_vs_union(t, work, [int(s) for s in args.sizes.split(",")],
                                         max(1, args.reps // 2))
            extra["farm_vs_union"] = [
                {"files": f, "farm_s": fs, "union_mount_s": us,
                 "farm_us_per_file": fs / f * 1e6} for f, fs, us in points]
    print(t.render())
    for p in extra.get("farm_vs_union", []):
        print(f"  {p['files']:>7} files: farm {p['farm_s']:.3f} s "
              f"({p['farm_us_per_file']:.1f} us/file), union mount {p['union_mount_s']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": t.as_dict(), **extra}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
