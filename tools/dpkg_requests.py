#!/usr/bin/env python3
"""The server's CPU per request in tools/bench_writable.py's ``dpkg`` step, alone.

    sudo .venv/bin/python tools/dpkg_requests.py [--workdir /var/tmp/bench-writable]
                                                 [--reps 3] [--tree SPEC ...]
                                                 [--callgrind | --profile OUT]

``chroot MNT dpkg -i`` of perl's .debs on a fresh writable mount (``python -m
mergefs mount --upper``) of bench_writable's 3-layer Debian minbase, as that
step does, both taken from ``--workdir`` (``debian/`` and ``debs/``, made by
a bench_writable run with that workdir: this tool builds nothing). The upper
and work dir are on a private tmpfs, so the upper filesystem's own cost is
small and the same for every run. Prints per run dpkg's wall time, the server's CPU during
dpkg (its threads' ``schedstat`` run time; ``--callgrind``: the instructions
it ran then, counted by valgrind, which a loaded machine does not blur), per
request, and its request counts; ``--profile OUT``: one run with the server
under cProfile (its stats to OUT; the mount, too, is profiled), or, when OUT
ends in ``.py``, run by that script instead (for ad hoc counters: it gets
OUT, ``mount`` and the mount's arguments, as ``mergefs.cli.main`` would).

``--attach CMD`` runs CMD beside dpkg ({pid}: the server), stopped with SIGINT
after it (strace -c, perf record). ``--tree DIR[,VAR=VALUE...]`` as in tools/untar_requests.py; several alternate
per rep, forwards and backwards. Nothing is asserted, except that dpkg
succeeds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_writable  # noqa: E402
from mergefs.testing import mounts  # noqa: E402
from namespace_requests import (alternating, callgrind_argv, foreground,  # noqa: E402
                                instructions, private_tmpfs, run_dirs)
from untar_requests import HERE, cpu_ns, server_of  # noqa: E402

PROFILED = ("import cProfile, sys, time\nfrom mergefs.cli import main\n"
            "p = cProfile.Profile(time.process_time)\np.enable()\n"
            "try: main(sys.argv[2:])\nfinally:\n p.disable(); p.dump_stats(sys.argv[1])")


def one_run(spec: str, base: str, layers: list[str], debs: list[str], mode: str,
            profile: str | None, attach: str | None = None,
            keep: str | None = None) -> tuple[float, dict]:
    """One mount, dpkg in it: the server's CPU seconds (callgrind: M instructions)
    and its request counts."""
    tree, env, (up, wk, mnt, log, out) = run_dirs(spec, base)
    cmd = ["mount", "--log", log, "--upper", up, "--work", wk, *layers, mnt]
    child = None
    if profile:        # in the foreground (it logs to its stderr)
        code = PROFILED if not profile.endswith(".py") else open(profile).read()
        child = foreground([sys.executable, "-c", code, profile, "mount", "--foreground",
                            *cmd[1:]], tree, env, log, mnt)
    elif mode == "callgrind":
        child = foreground(callgrind_argv(out, [sys.executable, "-m", "mergefs", *cmd,
                                                "--foreground"]), tree, env, log, mnt)
    else:
        subprocess.run([sys.executable, "-m", "mergefs", *cmd], check=True, cwd=tree, env=env)
    pid = None
    try:
        pid = server_of(mnt)
        os.listdir(mnt)
        mounts.server_requests(pid, log, timeout=60)
        with bench_writable.chroot_binds(mnt, debs):
            if mode == "callgrind":
                subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True,
                               stdout=subprocess.DEVNULL)
            tracer = None
            if attach:     # e.g. "strace -c -f -p {pid}", stopped by SIGINT after dpkg
                tracer = subprocess.Popen(attach.format(pid=pid), shell=True,
                                          start_new_session=True)
                time.sleep(2)
            before, start = cpu_ns(pid), time.monotonic()
            subprocess.run(bench_writable.dpkg_command(mnt), shell=True, check=True,
                           stdout=subprocess.DEVNULL)
            cpu, wall = (cpu_ns(pid) - before) / 1e9, time.monotonic() - start
            if tracer is not None:
                os.killpg(tracer.pid, signal.SIGINT)
                tracer.wait(timeout=120)
            if mode == "callgrind":
                subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True,
                               stdout=subprocess.DEVNULL)
        counts, waits = mounts.server_counts(pid, log, timeout=60)
        counts["wall_ms"] = round(wall * 1000)       # (not requests: describe() takes them out)
        counts["waits"] = waits
        status = bench_writable.dpkg_installed(mnt)
        if status != "install ok installed":
            raise RuntimeError(f"perl is {status!r} after dpkg")
    finally:
        mounts.force_unmount(mnt)
        if child is not None:                # valgrind / cProfile write as they exit
            child.wait(timeout=300)
        deadline = time.monotonic() + 30
        while pid and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    if mode == "callgrind":
        if keep:
            shutil.copy(out, os.path.join(keep, f"callgrind.{os.path.basename(tree)}.{pid}"))
        cpu = instructions(out)
    return cpu, counts


def describe(cost: float, counts: dict, callgrind: bool) -> str:
    wall, waits = counts.pop("wall_ms"), counts.pop("waits")
    n = sum(counts.values()) or 1
    per = (f"{cost:.1f} M instructions ({cost / n * 1e3:.1f} k/request)" if callgrind
           else f"cpu {cost:.3f} s ({cost / n * 1e6:.1f} us/request)")
    mix = " ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"dpkg {wall} ms, server {per}, {n} requests [{mix}] "
            f"waits {waits} load {os.getloadavg()[0]:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/bench-writable",
                    help="a bench_writable.py workdir (its debian/ and debs/ are used)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tree", action="append", help="checkout to run the server from, "
                    "with VAR=VALUE pairs after commas (repeatable; default: this one)")
    ap.add_argument("--callgrind", action="store_true",
                    help="count the server's instructions (valgrind) instead of its CPU time")
    ap.add_argument("--keep", help="with --callgrind: copy each run's callgrind output "
                    "into this directory (for callgrind_annotate)")
    ap.add_argument("--profile", help="one run under cProfile, its stats written here")
    ap.add_argument("--attach", help="a command run beside dpkg ({pid}: the server's), "
                    "e.g. 'strace -c -f -p {pid}' or 'perf record -g -p {pid} -o OUT'")
    args = ap.parse_args(argv)
    layers = [os.path.join(args.workdir, "debian", f"l{k}")
              for k in range(bench_writable.DEBIAN_LAYERS)]
    with open(os.path.join(args.workdir, "debs", "debs.json")) as f:
        debs = json.load(f)
    trees = args.tree or [HERE]
    mode = "callgrind" if args.callgrind else "cpu"
    if args.profile:
        trees, args.reps = trees[:1], 1
    with private_tmpfs("dpkg-requests-") as base:
        for rep, tree in alternating(trees, args.reps):
            cost, counts = one_run(tree, base, layers, debs, mode, args.profile, args.attach,
                                   args.keep)
            print(f"rep {rep} {tree}: " + describe(cost, counts, args.callgrind), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
