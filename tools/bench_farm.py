#!/usr/bin/env python3
"""Benchmark: farm creation (mergefs.farm.build_farm) against ``cp -al``.

    sudo .venv/bin/python tools/bench_farm.py                # 100k files, 8 layers, 5 reps

In one run, for each stack format (overlay, oci) and cache state (cold, warm),
R repetitions of each contender, interleaved (farm first on even reps, cp first
on odd ones), each into a fresh output directory:

* farm: a child process runs ``build_farm(layers, out)``; reported are the time
  of that call (``farm``) and of the whole process including interpreter start
  and imports (``farm process``), and the child's peak RSS (wait4 rusage).
* anchor ``cp -al``: ``mkdir DEST``, then for each layer bottom first
  ``cp -a -l --remove-destination LAYER/. DEST`` (8 processes, timed together).
  It links every non-directory of every layer (hidden ones too), creates each
  directory once and copies directory attributes (mode, owner, times, xattrs)
  for every layer's copy of it, so its work is the farm's minus merge
  semantics. It does not apply whiteouts (it links them like files), and cp
  refuses to replace a directory by a non-directory or the reverse: those few
  type changes are skipped (cp exits 1; the errors are counted and shown, any
  other cp error aborts the benchmark).
* cold: ``sync; echo 3 > /proc/sys/vm/drop_caches`` before each run; warm:
  ``sync`` and ``find -printf %s`` over the stack (every directory read, every
  entry looked up and lstat'ed) before each run. Outputs are kept
  until the end of the run (deleting them between runs would add freed-inode
  effects to the next run) and removed afterwards.

Correctness: the first farm of each format is compared with a kernel overlayfs
mount of the overlay-format stack (lowerdir reversed; unmounted in finally):
every path, type, mode, owner, size, nanosecond mtime, rdev and the hardlink
groups of the whole tree, plus content, symlink target and xattrs (overlay-
private ones excepted) of a seeded sample of paths. A mismatch fails the run:
it never reports a fast wrong answer.

By default everything runs on a private journaled ext4 on a loop device
(``--fs loop``; see benchlib.scratch_ext4 for why), and the stacks are
generated there by tools/gen_stack.py with a fixed seed. ``--fs here`` uses
WORKDIR's own filesystem and reuses WORKDIR/stack-{overlay,oci} if they match.

Targets (issue 2): farm <= 0.8x cp -al; peak RSS <= 200 MB for 100k entries.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import gen_stack  # noqa: E402

TARGET_RATIO = 0.8
TARGET_RSS = 200 * 10**6
CP_SKIPPED = ("cannot overwrite directory", "cannot overwrite non-directory")


# -- the contenders -------------------------------------------------------------
def farm_kwargs(variant: str | None) -> dict:
    """build_farm keyword arguments for a ``--workers`` variant: N, Nt (threads),
    Np (processes); None: build_farm's defaults."""
    if variant is None:
        return {}
    kw = {"workers": int(variant.rstrip("tp"))}
    if variant.endswith(("t", "p")):
        kw["parallel"] = "thread" if variant.endswith("t") else "process"
    return kw


def child_build(out: str, fmt: str, layers: list[str], profile: str | None,
                workers: str | None) -> None:
    """In the child process: build the farm, print one JSON line.

    ``workers`` is a ``--workers`` variant (None: build_farm's defaults).
    cProfile sees only the calling thread: profile with workers=1.
    Peak RSS counts the worker processes too: this process's own peak plus,
    for each worker it forked, the largest worker's peak (an upper bound).
    """
    from mergefs.farm import DEFAULT_WORKERS, build_farm
    from mergefs.layer import Layer
    kw = farm_kwargs(workers)
    import resource
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if profile:
        import cProfile
        prof = cProfile.Profile()
        stats = prof.runcall(build_farm, [Layer(p, fmt) for p in layers], out, **kw)
        prof.dump_stats(profile)
    else:
        stats = build_farm([Layer(p, fmt) for p in layers], out, **kw)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)    # all threads of this process
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    forked = kw.get("workers", DEFAULT_WORKERS["process"]) if children.ru_maxrss else 0
    vm_hwm = benchlib.vm_hwm(os.getpid())
    print(json.dumps({"seconds": seconds, "cpu": cpu + children.ru_utime + children.ru_stime,
                      "stats": stats.as_dict(), "vm_hwm": vm_hwm,
                      "rss_total": vm_hwm + forked * children.ru_maxrss * 1024}))


def run_farm(layers: list[str], out: str, fmt: str, profile: str | None = None,
             workers: str | None = None) -> tuple[float, benchlib.ChildResult]:
    argv = [sys.executable, os.path.abspath(__file__), "--child-build", out,
            "--child-format", fmt, *(["--child-profile", profile] if profile else []),
            *(["--child-workers", str(workers)] if workers is not None else []), *layers]
    res = benchlib.run_child(argv)
    return res.json()["seconds"], res


def run_cp_al(layers: list[str], out: str) -> tuple[float, list[str], int, float]:
    """The anchor: cp -al of each layer, bottom first, into one tree.

    Returns (wall seconds, skipped type changes, peak RSS, CPU seconds)."""
    t0 = time.perf_counter()
    os.mkdir(out)
    skipped, rss, cpu = [], 0, 0.0
    for layer in layers:
        res = benchlib.run_child(["cp", "-a", "-l", "--remove-destination", layer + "/.", out],
                                 check=False)
        rss = max(rss, res.maxrss)
        cpu += res.cpu_seconds or 0.0
        errs = [l for l in res.stderr.splitlines() if l.strip()]
        unexpected = [l for l in errs if not any(s in l for s in CP_SKIPPED)]
        if unexpected or (res.returncode and not errs):
            raise RuntimeError(f"cp -al {layer} failed ({res.returncode}): {unexpected[:5]}")
        skipped += errs
    return time.perf_counter() - t0, skipped, rss, cpu


# -- correctness ----------------------------------------------------------------
def _walk(root: bytes) -> dict[bytes, os.stat_result]:
    out, stack = {}, [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for de in it:
                path = os.path.join(rel, de.name) if rel else de.name
                st = de.stat(follow_symlinks=False)
                out[path] = st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
    return out


def _meta(st: os.stat_result) -> tuple:
    kind = stat.S_IFMT(st.st_mode)
    return (st.st_mode, st.st_uid, st.st_gid, 0 if kind == stat.S_IFDIR else st.st_size,
            st.st_mtime_ns, st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0)


def _groups(tree: dict) -> set:
    by_ino: dict = {}
    for p, st in tree.items():
        if not stat.S_ISDIR(st.st_mode):
            by_ino.setdefault(st.st_ino, []).append(p)
    return {frozenset(ps) for ps in by_ino.values() if len(ps) > 1}


def _content(path: bytes, st: os.stat_result) -> tuple:
    from mergefs.layer import is_overlay_private
    xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                          for n in os.listxattr(path, follow_symlinks=False)
                          if not is_overlay_private(n)))
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(path), xattrs
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest(), xattrs
    return None, xattrs


def compare_trees(expected: str, actual: str, sample: int, seed: int = 0) -> tuple[list, dict]:
    """Differences between two trees (empty list when equal) and what was checked."""
    exp_root, act_root = os.fsencode(expected), os.fsencode(actual)
    exp, act = _walk(exp_root), _walk(act_root)
    problems = [f"{p!r}: only in the overlay mount" for p in sorted(exp.keys() - act.keys())]
    problems += [f"{p!r}: only in the farm" for p in sorted(act.keys() - exp.keys())]
    both = sorted(exp.keys() & act.keys())
    problems += [f"{p!r}: {_meta(exp[p])} != {_meta(act[p])}" for p in both
                 if _meta(exp[p]) != _meta(act[p])]
    root_e, root_a = os.lstat(exp_root), os.lstat(act_root)
    if _meta(root_e) != _meta(root_a):
        problems.append(f"root: {_meta(root_e)} != {_meta(root_a)}")
    if _groups(exp) != _groups(act):
        problems.append("hardlink groups differ: "
                        f"{len(_groups(exp) ^ _groups(act))} groups in one tree only")
    picked = random.Random(seed).sample(both, min(sample, len(both)))
    for p in picked:
        if _content(os.path.join(exp_root, p), exp[p]) != _content(os.path.join(act_root, p), act[p]):
            problems.append(f"{p!r}: content, symlink target or xattrs differ")
    checked = {"paths": len(both), "sampled_content": len(picked),
               "hardlink_groups": len(_groups(act))}
    return problems, checked


def verify_farm(overlay_layers: list[str], farm: str, sample: int,
                target: str | None = None) -> dict:
    """Compare ``farm`` with kernel overlayfs over ``overlay_layers``; raise on mismatch.

    The mount point is ``target`` (default: beside the farm; inside the
    benchmark's own directory, so no sweep of stray /tmp mounts by a test
    session running beside us hits it).
    """
    from mergefs.testing.mounts import is_mounted, overlay_mount
    target = target or os.path.join(os.path.dirname(os.path.abspath(farm)), "overlay-mnt")
    os.makedirs(target, exist_ok=True)
    with overlay_mount(overlay_layers, target=target) as mnt:
        try:
            problems, checked = compare_trees(str(mnt), farm, sample)
        except OSError:
            if not is_mounted(mnt):
                raise RuntimeError(f"the overlay mount at {mnt} vanished during the check "
                                   "(unmounted by another process); run again") from None
            raise
    os.rmdir(target)
    if problems:
        raise AssertionError(f"farm {farm} differs from kernel overlayfs ({len(problems)} "
                             "problems):\n  " + "\n  ".join(problems[:20]))
    return checked


# -- the run ----------------------------------------------------------------------
def prepare(state: str, layers: list[str]) -> None:
    if state == "cold":
        benchlib.drop_caches()
    else:
        os.sync()
        benchlib.warm_tree(*layers)


def _farm_name(fmt: str, state: str, workers: int | None) -> str:
    return f"{fmt} {state}: farm" + (f" w={workers}" if workers is not None else "")


def bench_format(fmt: str, layers: list[str], outdir: str, args, table: benchlib.Table,
                 still_mounted) -> dict:
    info = {"cp_skipped": 0, "farm_stats": None, "first_farm": None}
    for state in args.cache:
        anchor = f"{fmt} {state}: cp -al"
        farm_t = {w: table.series(_farm_name(fmt, state, w), anchor=anchor) for w in args.workers}
        proc_t = {w: table.series(_farm_name(fmt, state, w) + " process", anchor=anchor)
                  for w in args.workers}
        cp_t = table.series(anchor)
        rss = {w: table.series(_farm_name(fmt, state, w) + " peak RSS", unit="B",
                               anchor=f"{fmt} {state}: cp -al peak RSS") for w in args.workers}
        cp_rss = table.series(f"{fmt} {state}: cp -al peak RSS", unit="B")
        cpu = {w: table.series(_farm_name(fmt, state, w) + " CPU", unit="s cpu",
                               anchor=f"{fmt} {state}: cp -al CPU") for w in args.workers}
        cp_cpu = table.series(f"{fmt} {state}: cp -al CPU", unit="s cpu")
        contenders = [("farm", w) for w in args.workers] + [("cp", None)]
        for rep in range(args.reps):
            shift = rep % len(contenders)            # rotate who goes first
            for who, w in contenders[shift:] + contenders[:shift]:
                out = os.path.join(outdir, f"{fmt}-{state}-{rep}-{who}{w or ''}")
                prepare(state, layers)
                if who == "farm":
                    seconds, res = run_farm(layers, out, fmt, workers=w)
                    farm_t[w].add(seconds)
                    proc_t[w].add(res.seconds)
                    rss[w].add(res.json()["rss_total"])
                    cpu[w].add(res.json()["cpu"])
                    info["farm_stats"] = res.json()["stats"]
                    info["farm_vm_hwm_self_reported"] = res.json()["vm_hwm"]
                    info["first_farm"] = info["first_farm"] or out
                else:
                    seconds, skipped, cprss, cpsecs = run_cp_al(layers, out)
                    cp_t.add(seconds)
                    cp_rss.add(cprss)
                    cp_cpu.add(cpsecs)
                    info["cp_skipped"] = len(skipped)
                    info["cp_skipped_example"] = skipped[:2]
            still_mounted()
            print(f"  {fmt} {state} rep {rep}: " + ", ".join(
                f"farm{'' if w is None else f' w={w}'} {farm_t[w].samples[-1]:.2f}s"
                for w in args.workers) + f", cp -al {cp_t.samples[-1]:.2f}s, load "
                f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return info


def report_targets(table: benchlib.Table, formats, states, workers) -> list[str]:
    lines = []
    for name in (_farm_name(f, s, w) for f in formats for s in states for w in workers):
        r = table.ratio(name)
        peak = max(table.rows[name + " peak RSS"].samples)
        lines.append(f"{name}/cp-al = {r:.3f} (target <= {TARGET_RATIO}: "
                     f"{'met' if r <= TARGET_RATIO else 'MISSED'}); peak RSS max "
                     f"{peak / 1e6:.0f} MB (target <= {TARGET_RSS / 1e6:.0f} MB: "
                     f"{'met' if peak <= TARGET_RSS else 'MISSED'})")
    return lines


def stack_dir(base: str, fmt: str, args) -> str:
    """BASE/stack-FMT for the default stack; other parameters get their own dir,
    so a small trial run never replaces the shared 100k stack."""
    default = (args.files, args.layers, args.seed) == (100_000, 8, 1)
    suffix = "" if default else f"-{args.files}f-{args.layers}l-s{args.seed}"
    return os.path.join(base, f"stack-{fmt}{suffix}")


def scratch_needs(args) -> tuple[str, int]:
    """Size and inode count of the scratch ext4 for this run (``--fs loop``).

    Every output is kept until the end, and each holds one inode and one 4 KiB
    block per directory (~8% of the files in gen_stack's trees): 120 outputs
    of a 100k stack need ~1.2M inodes, more than mkfs gives 8 GiB by default.
    The image is sparse, so a generous size costs nothing.
    """
    formats = 2 if args.format == "both" else 1
    outputs = formats * len(args.cache) * args.reps * (len(args.workers) + 1) + 1
    stacks = 2                                    # overlay always, plus oci
    inodes = int(1.5 * (stacks * 1.2 * args.files + outputs * 0.1 * args.files)) + 100_000
    data = 1.5 * (stacks * args.files * 12 * 1024 + outputs * 0.1 * args.files * 4096)
    return f"{int(data / 2**30) + 2}G", inodes


def run(args, base: str) -> int:
    formats = ["overlay", "oci"] if args.format == "both" else [args.format]
    stacks = {f: gen_stack.ensure_stack(stack_dir(base, f, args), args.layers, args.files,
                                        args.seed, f) for f in set(formats) | {"overlay"}}
    outdir = os.path.join(base, f"out-{os.getpid()}")
    os.makedirs(outdir)
    table = benchlib.Table(f"farm vs cp -al: {args.files} files, {args.layers} layers, seed "
                           f"{args.seed}, {args.reps} reps, fs {args.fs} ({base})")
    results = {"command": " ".join(sys.argv), "fs": args.fs, "formats": {},
               "loadavg_start": os.getloadavg()}

    def still_mounted() -> None:
        if args.fs == "loop" and not benchlib.is_mounted(base):
            raise RuntimeError(f"scratch filesystem {base} was unmounted under the benchmark")

    try:
        for fmt in formats:
            info = bench_format(fmt, stacks[fmt], outdir, args, table, still_mounted)
            info["verified"] = verify_farm(stacks["overlay"], info["first_farm"], args.sample,
                                           os.path.join(base, "overlay-mnt"))
            results["formats"][fmt] = info
        if args.profile:
            out = os.path.join(outdir, "profiled")
            prepare("warm", stacks[formats[0]])
            run_farm(stacks[formats[0]], out, formats[0], profile=args.profile, workers="1")
            print_profile(args.profile)
    finally:
        if not args.keep and args.fs == "here":   # a loop fs is discarded whole
            subprocess.run(["rm", "-rf", "--one-file-system", outdir], check=False)
    results["loadavg_end"] = os.getloadavg()
    print(table.render())
    print(f"load average (1 min) at start {results['loadavg_start'][0]:.1f}, at end "
          f"{results['loadavg_end'][0]:.1f} on {os.cpu_count()} CPUs (other work on the "
          "machine widens the spread; compare medians of the same run)")
    for fmt, info in results["formats"].items():
        print(f"{fmt}: farm stats {info['farm_stats']}; farm VmHWM (self-reported, last run) "
              f"{info['farm_vm_hwm_self_reported'] / 2**20:.1f} MiB; verified against kernel overlayfs: "
              f"{info['verified']}; cp -al skipped {info['cp_skipped']} type changes "
              f"(e.g. {info.get('cp_skipped_example', [])[:1]})")
    for line in report_targets(table, formats, args.cache, args.workers):
        print(line)
    if args.json:
        results["table"] = table.as_dict()
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def print_profile(path: str, top: int = 25) -> None:
    import pstats
    for key in ("tottime", "cumulative"):
        print(f"-- profile of one warm farm build, top {top} by {key} ({path})")
        pstats.Stats(path).sort_stats(key).print_stats(top)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--format", choices=("overlay", "oci", "both"), default="both")
    ap.add_argument("--cache", default="cold,warm", type=lambda s: s.split(","),
                    help="cache states to measure, comma-separated: cold,warm")
    ap.add_argument("--fs", choices=("loop", "here"), default="loop",
                    help="loop: a private journaled ext4 on a loop device (default); "
                         "here: WORKDIR's filesystem")
    ap.add_argument("--workdir", default="/tmp/mergefs-bench")
    ap.add_argument("--sample", type=int, default=3000, help="paths whose content is compared")
    ap.add_argument("--workers", type=lambda s: s.split(","), default=[None],
                    help="build_farm variants to measure: N (workers=N), Nt (threads), "
                         "Np (processes), e.g. 1,2t,2p (default: build_farm's defaults)")
    ap.add_argument("--profile", metavar="FILE",
                    help="also cProfile one warm farm build (workers=1: cProfile sees one thread)")
    ap.add_argument("--json", metavar="FILE", help="write all samples as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (with --fs here)")
    ap.add_argument("--child-build", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--child-format", help=argparse.SUPPRESS)
    ap.add_argument("--child-profile", help=argparse.SUPPRESS)
    ap.add_argument("--child-workers", help=argparse.SUPPRESS)
    ap.add_argument("child_layers", nargs="*", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_build:
        child_build(args.child_build, args.child_format, args.child_layers, args.child_profile,
                    args.child_workers)
        return 0
    if os.geteuid() != 0:
        print("bench_farm: needs root (drop_caches, kernel overlayfs, loop mount)", file=sys.stderr)
        return 2
    if args.fs == "here":
        os.makedirs(args.workdir, exist_ok=True)
        return run(args, args.workdir)
    size, inodes = scratch_needs(args)
    with benchlib.scratch_ext4(args.workdir, size=size, inodes=inodes) as fs:
        return run(args, fs)


if __name__ == "__main__":
    sys.exit(main())
