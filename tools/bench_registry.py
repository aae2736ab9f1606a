#!/usr/bin/env python3
"""Benchmark: mergefs push / pull against ``skopeo copy`` with the same registry.

    sudo .venv/bin/python tools/bench_registry.py [--workdir DIR] [--files 100000]
                                                  [--layers 8] [--reps 3] [--pull-only]

The image is a tools/gen_stack.py stack (100k files, 8 layers, overlay format,
fixed seed) imported into store A and merged (``app``). The anchor layout is
``mergefs export app --format oci`` of the same merge (gzip layers). Each
repetition starts fresh Debian ``docker-registry`` instances on 127.0.0.1
(private storage, stopped by pid), one per contender so no blob is already
there, and times, as child processes (interpreter start included):

* ``skopeo push``: ``skopeo copy oci:LAYOUT docker://REG/...`` (anchor);
* ``mergefs push, blobs remembered``: ``mergefs push app`` to an empty
  registry, the layer blobs already written by an earlier push (the like-for-
  like case: both send ready blobs);
* ``mergefs push, first``: the same after forgetting the remembered blobs, so
  the 8 layers are tarred and gzipped during the push (work skopeo's copy
  from a ready layout does not do);
* ``skopeo pull``: ``skopeo copy docker://REG/... oci:NEWDIR`` (anchor; writes
  8 blobs); ``skopeo pull + umoci unpack`` / ``+ tar -xzf of each blob``:
  what a usable rootfs costs with standard tools, and the file-creation floor
  (GNU tar, one directory per blob), after the same ``skopeo pull``;
* ``mergefs push of the imported layout``: the anchor layout imported into a
  store D (which keeps its blobs), pushed to an empty registry: the same
  blobs skopeo sends, no recompression;
* ``mergefs pull`` (lazy, the default): into a fresh store B: fetch, keep
  each verified blob as a packed layer, image record (no extraction);
  ``+ first merge``: that plus ``mergefs merge --strategy farm`` of the image
  on B, the first use of the trees (unpacks the 8 layers, checking digest,
  diffID and tree digest, then links the farm: a usable rootfs, like umoci's);
* ``mergefs pull --unpack``: the eager pull into a fresh store E (extract,
  verify and digest each layer as it arrives, one at a time);
* ``diffID check of the pulled blobs``: decompress and sha256 the 8 blobs of
  store B in one child process (what verifying the diffIDs during a lazy
  pull would add to it; run after the pulls, not part of them);
* ``mergefs pull, all present``: the same again into B: the registry's access
  log must show no layer blob bytes sent; reported are the whole process and
  the ``registry.pull()`` call alone (target < 0.5 s).

``--pull-only``: only ``skopeo pull`` and ``mergefs pull`` (lazy) into an
empty store, and the all-present pull (the registries are filled untimed):
reps of a minute or less for the pull ratio. Both sides' CPU (the child and
what it waited for: skopeo's processes) is reported beside the wall times.

Correctness: B's and E's images have A's merge id, B's layers were packed
after the pull and unpacked after the merge, and the merged trees' digests
match (first rep).
Prints a table of medians and ratios against the anchors of the same run, and
the load average. Asserts nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import benchlib  # noqa: E402
import gen_stack  # noqa: E402

from mergefs.testing.registry import RegistryServer  # noqa: E402

PY = sys.executable
DIFFID_CHILD = """
import json, os, sys, time
from mergefs.oci._stream import open_tar_stream
from snapshotter.store import Store
t0 = time.perf_counter()
with Store(sys.argv[1]) as s:
    rows = s.db.execute("SELECT digest, diff_id FROM layer_blobs").fetchall()
    for digest, diff_id in rows:
        with open(s.root / "blobs" / "sha256" / digest[7:], "rb") as f:
            stream = open_tar_stream(f)
            stream.drain()
            stream.close()
            assert stream.diff_id == diff_id, digest
print(json.dumps({"seconds": time.perf_counter() - t0, "blobs": len(rows)}))
"""
PRESENT_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from snapshotter import registry
from snapshotter.store import Store
t1 = time.perf_counter()
with Store(sys.argv[1]) as s:
    r = registry.pull(s, sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"call": t2 - t1, "imports": t1 - t0, "fetched": r.fetched}))
"""


def mergefs(root: str, *args, check: bool = True) -> benchlib.ChildResult:
    return benchlib.run_child([PY, "-m", "mergefs", "--root", root, *map(str, args)],
                              check=check, env=dict(os.environ, PYTHONPATH=REPO))


def skopeo(*args) -> benchlib.ChildResult:
    return benchlib.run_child(["skopeo", *args])


def rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def forget_blobs(root: str) -> None:
    """Make store ROOT forget its remembered layer blobs (the next push compresses again)."""
    from snapshotter import meta
    from snapshotter.store import Store
    with Store(root) as s:
        meta.ensure_blobs(s.db)
        s.db.execute("DELETE FROM layer_blobs")
    rm(os.path.join(root, "blobs"))


def layout_blobs(layout: str) -> list[str]:
    """Paths of the layer blobs of the layout's only image, bottom first."""
    index = json.load(open(os.path.join(layout, "index.json")))
    manifest = index["manifests"][0]["digest"].split(":")[1]
    bdir = os.path.join(layout, "blobs", "sha256")
    m = json.load(open(os.path.join(bdir, manifest)))
    return [os.path.join(bdir, d["digest"].split(":")[1]) for d in m["layers"]]


def gnu_tar(blobs: list[str], where: str) -> float:
    """``tar -xzf`` of each blob into its own directory (the file-creation floor), seconds."""
    t = 0.0
    for i, b in enumerate(blobs):
        d = os.path.join(where, str(i))
        os.makedirs(d)
        t += benchlib.run_child(["tar", "-xzf", b, "-C", d, "--xattrs",
                                 "--xattrs-include=*"]).seconds
    return t


def setup(work: str, files: int, layers: int, reuse: bool = False) -> tuple[str, str, str]:
    """Store A with the merge ``app``, its exported layout, store D; ``reuse``: those of an
    earlier run, if there (``--pull-only``: the pulls do not change them)."""
    stack = gen_stack.ensure_stack(os.path.join(work, "stack"), layers, files, 1, "overlay")
    root_a = os.path.join(work, "store-a")
    layout = os.path.join(work, "anchor-layout")
    names = [f"l{i}" for i in range(layers)]
    if reuse and os.path.isfile(os.path.join(layout, "index.json")):
        got = mergefs(root_a, "merge", "--strategy", "union", "--name", "app", *names,
                      check=False)
        if got.returncode == 0:
            return root_a, layout, got.stdout.strip()
    rm(root_a)
    rm(layout)
    for i, d in enumerate(stack):
        mergefs(root_a, "import", d, "--name", f"l{i}")
    mid = mergefs(root_a, "merge", "--strategy", "union", "--name", "app",
                  *[f"l{i}" for i in range(layers)]).stdout.strip()
    mergefs(root_a, "export", "app", "-o", layout, "--format", "oci")
    root_d = os.path.join(work, "store-d")          # the layout imported: blobs kept
    rm(root_d)
    mergefs(root_d, "import", layout, "--name", "app")
    return root_a, layout, mid


def one_rep(work: str, rep: int, root_a: str, layout: str, mid: str, table,
            pull_only: bool = False) -> None:
    regs = {k: RegistryServer(os.path.join(work, f"reg-{rep}-{k}"))
            for k in ("s", "m", "w", "d")}
    for r in regs.values():
        rm(str(r.dir))
        os.makedirs(r.dir)
        r.start()
    root_b = os.path.join(work, f"store-b-{rep}")
    root_e = os.path.join(work, f"store-e-{rep}")
    pulled = os.path.join(work, f"skopeo-pull-{rep}")
    unpacked = os.path.join(work, f"umoci-{rep}")
    tarred = os.path.join(work, f"tar-{rep}")
    try:
        s, m, w, d = (regs[k].address for k in ("s", "m", "w", "d"))
        order = ["skopeo", "mergefs"] if rep % 2 == 0 else ["mergefs", "skopeo"]
        if pull_only:          # the pulls' sources, untimed
            skopeo("copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:app",
                   f"docker://{s}/bench/app:v1")
            mergefs(root_a, "push", "app", f"{m}/bench/app:v1")
        for who in order if not pull_only else ():
            if who == "skopeo":
                table.series("skopeo push").add(skopeo(
                    "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:app",
                    f"docker://{s}/bench/app:v1").seconds)
            else:
                forget_blobs(root_a)
                table.series("mergefs push, first", anchor="skopeo push").add(
                    mergefs(root_a, "push", "app", f"{m}/bench/app:v1").seconds)
                table.series("mergefs push, blobs remembered", anchor="skopeo push").add(
                    mergefs(root_a, "push", "app", f"{w}/bench/app:v1").seconds)
                res = mergefs(os.path.join(work, "store-d"), "push", "app",
                              f"{d}/bench/app:v1", "--json")
                assert json.loads(res.stdout)["compressed"] == 0, "imported blobs not kept"
                table.series("mergefs push of the imported layout (first push)",
                             anchor="skopeo push").add(res.seconds)
        for who in order:
            if who == "skopeo":
                t_res = skopeo("copy", "--quiet", "--src-tls-verify=false",
                               f"docker://{s}/bench/app:v1", f"oci:{pulled}:app")
                t = t_res.seconds
                table.series("skopeo pull").add(t)
                table.series("skopeo pull (CPU s)").add(res_cpu(t_res))
                if pull_only:
                    continue
                u = benchlib.run_child(["umoci", "unpack", "--image", f"{pulled}:app",
                                        unpacked]).seconds
                table.series("skopeo pull + umoci unpack", anchor="skopeo pull").add(t + u)
                g = gnu_tar(layout_blobs(pulled), tarred)
                table.series("skopeo pull + tar -xzf of each blob", anchor="skopeo pull").add(
                    t + g)
            else:
                res = mergefs(root_b, "pull", f"{m}/bench/app:v1", "--json")
                out = json.loads(res.stdout)
                assert out["image"] == mid, "pulled image is not the pushed merge"
                assert len(out["packed"]) == len(out["layers"]), "a lazy pull unpacked"
                table.series("mergefs pull (lazy)", anchor="skopeo pull").add(res.seconds)
                table.series("mergefs pull (lazy) (CPU s)", anchor="skopeo pull (CPU s)").add(
                    res_cpu(res))
                if pull_only:
                    continue
                merge = mergefs(root_b, "merge", "--strategy", "farm", "app:v1")
                assert merge.stdout.strip() == mid
                table.series("first merge after the lazy pull (unpack 8 + farm)").add(
                    merge.seconds)
                both = res.seconds + merge.seconds
                table.series("mergefs pull (lazy) + first merge", anchor="skopeo pull").add(both)
                table.series("mergefs pull (lazy) + first merge (vs umoci)",
                             anchor="skopeo pull + umoci unpack").add(both)
                eager = mergefs(root_e, "pull", f"{m}/bench/app:v1", "--unpack", "--json")
                assert json.loads(eager.stdout)["image"] == mid
                table.series("mergefs pull --unpack", anchor="skopeo pull").add(eager.seconds)
                table.series("mergefs pull --unpack (vs umoci)",
                             anchor="skopeo pull + umoci unpack").add(eager.seconds)
        if not pull_only:
            check = benchlib.run_child([PY, "-c", DIFFID_CHILD, root_b],
                                       env=dict(os.environ, PYTHONPATH=REPO))
            table.series("diffID check of the pulled blobs (child process)",
                         anchor="skopeo pull").add(check.seconds)
            table.series("diffID check of the pulled blobs (CPU s)").add(check.cpu_seconds or 0)
        layer_digests = set(json.loads(mergefs(root_b, "pull", f"{m}/bench/app:v1",
                                               "--json").stdout)["fetched"]) | _pushed(root_a)
        mark = regs["m"].mark()
        res = mergefs(root_b, "pull", f"{m}/bench/app:v1")
        table.series("mergefs pull, all present (process)").add(res.seconds)
        child = benchlib.run_child([PY, "-c", PRESENT_CHILD, root_b, f"{m}/bench/app:v1"],
                                   env=dict(os.environ, PYTHONPATH=REPO)).json()
        table.series("mergefs pull, all present (pull call)").add(child["call"])
        table.series("layer bytes sent, all present", unit="B").add(
            regs["m"].layer_bytes(layer_digests, mark))
        if rep == 0 and not pull_only:
            _check_trees(work, root_a, root_b, mid)
    finally:
        for r in regs.values():
            r.stop()
        for d in (root_b, root_e, pulled, unpacked, tarred):
            rm(d)
        for r in regs.values():
            rm(str(r.dir))


def res_cpu(res: benchlib.ChildResult) -> float:
    """A child's user + system CPU seconds, its own children's (skopeo's) included."""
    return res.cpu_seconds or 0.0


def _pushed(root: str) -> set[str]:
    from snapshotter.store import Store
    with Store(root) as s:
        return {d for (d,) in s.db.execute("SELECT digest FROM layer_blobs")}


def _check_trees(work: str, root_a: str, root_b: str, mid: str) -> None:
    from snapshotter.digest import tree_digest
    got = []
    for tag, root in (("a", root_a), ("b", root_b)):
        out = os.path.join(work, f"export-{tag}")
        rm(out)
        mergefs(root, "export", mid, "-o", out)
        got.append(tree_digest(out).digest)
        rm(out)
    assert got[0] == got[1], f"merged trees differ: {got}"
    print("check: B's pulled image has A's merge id; merged trees identical", flush=True)


def compile_bytecode() -> None:
    """Write the byte code of mergefs and snapshotter, as an install has it: a child started
    with PYTHONDONTWRITEBYTECODE set would otherwise compile every changed module at each
    start (measured: 0.1-0.2 s of a lazy pull's CPU)."""
    import compileall
    for pkg in ("mergefs", "snapshotter"):
        compileall.compile_dir(os.path.join(REPO, pkg), quiet=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-registry")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--pull-only", action="store_true",
                    help="time only skopeo's pull and the lazy pulls (the registries are "
                    "filled untimed): quick reps for the pull ratio")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    compile_bytecode()
    t0 = time.perf_counter()
    root_a, layout, mid = setup(args.workdir, args.files, args.layers, args.pull_only)
    print(f"setup: {args.files} files in {args.layers} layers imported, merged, exported "
          f"({time.perf_counter() - t0:.1f} s); load average {os.getloadavg()}", flush=True)
    table = benchlib.Table(f"push / pull, {args.files} files in {args.layers} layers "
                           f"(gzip), {args.reps} reps")
    loads = []
    for rep in range(args.reps):
        one_rep(args.workdir, rep, root_a, layout, mid, table, args.pull_only)
        loads.append(os.getloadavg()[0])
        print(f"rep {rep + 1}/{args.reps} done; load average {loads[-1]:.2f}", flush=True)
        print(table.render(), flush=True)
    print(f"load average (1 min) after each rep: {', '.join(f'{x:.2f}' for x in loads)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table.as_dict(), "loads": loads}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
