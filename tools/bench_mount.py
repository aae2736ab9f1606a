#!/usr/bin/env python3
"""Mount latency: a standalone ``mergefs mount`` beside kernel overlayfs and fuse-overlayfs.

    sudo .venv/bin/python tools/bench_mount.py [--reps 15]

Three small layers (a few files each; the layer size does not enter a
mount: nothing is walked). For each system and mode (read-only: lowers only;
writable: plus an upper and work dir on the same tmpfs) and each repetition:
run the mount command (for mergefs both ``mergefs mount`` and the
fuse-overlayfs form ``mergefs -o lowerdir=...`` that podman runs, through the
installed ``mergefs`` script), note when it returned ("return"), ``ls`` the mount
root and note when that was done ("live": the first answer from the server),
then unmount (not timed). ``mergefs -o fork`` and ``mergefs -o views``: the
same call with ``service=SOCK`` through the lean program of ``mergefs views
install-program`` to a service started here: ``mergefs mount-server`` (a warm
server per mount, forked or back from an earlier mount, whose command line is
the mount server's: not found by ``server_cpu``) or ``mergefs views serve`` (a bind of a view, no server of
its own); their server CPU column stays 0; instead the CPU and minor page faults per
mount of each mount server with all its children (forked servers, spares;
from /proc/PID/stat, the first spare's warm-up left out) are printed below the
table. Reps are interleaved across systems, so a burst of
load from other processes hits all of them. Prints medians and p90 in ms,
the interpreter start-up (``python -c pass``) measured in the same run, and
the load average before and after. ``--instructions`` also counts, once
per tree, the instructions (cachegrind) of ``mergefs mount``'s command and of
its server until after the first answer, read-only and writable: the
evidence that load does not move. The mergefs package is byte-compiled
first, as an installed one is. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SERVICES = {}     # "fork", "views": the services' sockets; "program": the lean mount program
SYSTEMS = ("kernel-overlay", "fuse-overlayfs", "mergefs", "mergefs -o", "mergefs -o fork",
           "mergefs -o views")
MODES = ("ro", "rw")
MERGEFS = os.path.join(os.path.dirname(sys.executable), "mergefs")   # the console script


def make_layers(base: str) -> list[str]:
    layers = []
    for i in range(3):
        d = os.path.join(base, f"l{i}")
        os.makedirs(os.path.join(d, "etc"))
        for j in range(5):
            with open(os.path.join(d, "etc", f"f{i}{j}"), "w") as f:
                f.write(f"{i}.{j}\n")
        layers.append(d)
    return layers


def mount_argv(system: str, mode: str, layers: list[str], mnt: str, up: str, wk: str):
    lower = ":".join(reversed(layers))
    opts = f"lowerdir={lower}" + (f",upperdir={up},workdir={wk}" if mode == "rw" else "")
    if system == "kernel-overlay":
        return ["mount", "-t", "overlay", "overlay", "-o", opts, mnt]
    if system == "fuse-overlayfs":
        return ["fuse-overlayfs", "-o", opts, mnt]
    if system.startswith(("mergefs -o fork", "mergefs -o views")):     # through a service
        sock = SERVICES[system.removeprefix("mergefs -o ")]
        return [SERVICES["program"], "-o", f"{opts},nokernel,service={sock}", mnt]
    if system == "mergefs -o":          # containers/storage's mount_program form
        # nokernel: a read-only one over plain layers would be a kernel overlayfs mount
        # (cmd_mount_helper.kernel_read_only); this measures the FUSE server's start
        return [MERGEFS, "-o", opts + ",nokernel", mnt]
    rw = ["--upper", up, "--work", wk] if mode == "rw" else []
    return [MERGEFS, "mount", "--log", os.path.join(mnt + ".log"),
            *rw, *layers, mnt]


def before_script(base: str, tree: str) -> str:
    """A ``mergefs`` script like the console script, importing mergefs from ``tree``."""
    path = os.path.join(base, "mergefs-before")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {tree!r})\n"
                "from mergefs.cli import main\nsys.exit(main())\n")
    os.chmod(path, 0o755)
    return path


def server_cpu(mnt: str) -> float:
    """CPU seconds used so far by the process serving ``mnt`` (its command line
    names the mount point: the forked server keeps the mount command's), 0 if none."""
    key = os.fsencode(mnt)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if key not in f.read():
                    continue
            with open(f"/proc/{pid}/schedstat") as f:
                return int(f.read().split()[0]) / 1e9
        except OSError:
            continue
    return 0.0


def service_cost(pid: int) -> tuple[float, int]:
    """CPU seconds and minor page faults of a mount server so far: its own, its
    reaped children's (its forked servers that exited) and its live children's
    (the spares, servers still serving or back as spares)."""
    tck = os.sysconf("SC_CLK_TCK")

    def fields(p) -> list[str]:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rpartition(")")[2].split()
    f = fields(pid)
    cpu, faults = sum(int(x) for x in f[11:15]) / tck, int(f[7]) + int(f[8])
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            c = fields(p)
        except OSError:
            continue
        if int(c[1]) == pid and c[0] != "Z":
            cpu, faults = cpu + (int(c[11]) + int(c[12])) / tck, faults + int(c[7])
    return cpu, faults


BEFORE_KNOWS_NOKERNEL = True
GAP = 0.0       # seconds before each mount (--gap)


def one(system: str, mode: str, layers: list[str], base: str, rep: int) -> tuple[float, ...]:
    d = os.path.join(base, f"{system.replace(' ', '')}-{mode}-{rep}")
    mnt, up, wk = (os.path.join(d, n) for n in ("mnt", "up", "wk"))
    for p in (mnt, up, wk):
        os.makedirs(p)
    time.sleep(GAP)
    argv = mount_argv(system if "fork" in system else system.removesuffix(" before"),
                      mode, layers, mnt, up, wk)
    if system.endswith(" before") and "fork" not in system:
        argv[0] = os.path.join(base, "mergefs-before")
        if not BEFORE_KNOWS_NOKERNEL:     # a tree from before the option (always FUSE)
            argv = [a.replace(",nokernel", "") for a in argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    t1 = time.perf_counter()
    assert status == 0, f"{argv} exited with {status}"
    names = os.listdir(mnt)
    t2 = time.perf_counter()
    cpu = server_cpu(mnt) if system.startswith("mergefs") else 0.0
    try:
        assert "etc" in names, names
    finally:
        subprocess.run(["umount", mnt], check=True)
    return t1 - t0, t2 - t0, usage.ru_utime + usage.ru_stime, cpu


def instructions(script: str, mode: str, layers: list[str], base: str, tag: str):
    """Millions of instructions (valgrind's cachegrind) of ``script mount ...`` and of
    the server it forks, until the server exits after the first ``ls`` and the
    unmount (a forked child's count includes its parent's up to the fork, so the
    server's is the whole path to its first answer): what load does not change."""
    d = os.path.join(base, f"cg-{tag}-{mode}")
    mnt, up, wk = (os.path.join(d, n) for n in ("mnt", "up", "wk"))
    for p in (mnt, up, wk):
        os.makedirs(p)
    argv = mount_argv("mergefs", mode, layers, mnt, up, wk)
    argv[0] = script
    proc = subprocess.Popen(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                             f"--cachegrind-out-file={d}/cg.%p", *argv],
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    assert proc.wait() == 0, f"{argv} failed under valgrind"
    assert "etc" in os.listdir(mnt)         # waits for the (slow) server's first answer
    subprocess.run(["umount", mnt], check=True)
    counts: dict[int, float] = {}
    deadline = time.monotonic() + 120
    while len(counts) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        for name in os.listdir(d):
            if name.startswith("cg."):
                with open(os.path.join(d, name)) as f:
                    total = [ln.split()[1] for ln in f if ln.startswith("summary:")]
                if total:
                    counts[int(name[3:])] = int(total[0]) / 1e6
    return counts.pop(proc.pid, 0.0), sum(counts.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--instructions", action="store_true",
                    help="also count instructions (cachegrind) of `mergefs mount`'s command and "
                    "server, read-only and writable, once per tree (valgrind; ~1 min)")
    ap.add_argument("--before", metavar="TREE",
                    help="also run mergefs from this source tree (e.g. a worktree of an older "
                    "commit), interleaved, with this environment's dependencies (also a mount "
                    "server of that tree: `mergefs -o fork before`)")
    ap.add_argument("--only", nargs="+", metavar="SYSTEM", choices=SYSTEMS,
                    help="only these systems (and their before rows)")
    ap.add_argument("--gap", type=float, default=0.0, metavar="SEC",
                    help="wait this long before each mount: the mount server forks the server "
                    "of its next mount 0.1 s after a request (podman's run --rm mounts every "
                    "~0.2 s); without a gap each mount there forks its own")
    args = ap.parse_args()
    global GAP
    GAP = args.gap
    if os.geteuid() != 0:
        print("bench_mount: run as root (kernel overlayfs)", file=sys.stderr)
        return 2
    for tree in filter(None, (ROOT, args.before)):
        benchlib.prepare_tree(tree)     # byte code and attrs table, as an install has
    systems = SYSTEMS + (("mergefs before", "mergefs -o before", "mergefs -o fork before")
                         if args.before else ())
    if args.only:
        systems = tuple(s for s in systems if s in args.only or s.removesuffix(" before")
                        in args.only)
    base = tempfile.mkdtemp(prefix="bench-mount-")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", base], check=True)
    services = []
    try:
        from mergefs.testing.services import MountService, program
        for kind in ("fork", "views") + (("fork before",) if args.before else ()):
            services.append(MountService(kind.split()[0], Path(base) / f"service-{kind}",
                                         args.before if "before" in kind else None))
            SERVICES[kind] = services[-1].control
        SERVICES["program"] = program(Path(base))
        layers = make_layers(base)
        if args.before:
            before_script(base, os.path.abspath(args.before))
            global BEFORE_KNOWS_NOKERNEL
            BEFORE_KNOWS_NOKERNEL = os.path.exists(os.path.join(args.before, "mergefs",
                                                                "kernelview.py"))
        load0 = os.getloadavg()
        time.sleep(1.0)         # the services' first spares warmed up: counted by neither
        forks = {kind: s for kind, s in zip(("fork", "views", "fork before"), services)
                 if kind.startswith("fork")}
        cost0 = {kind: service_cost(s.proc.pid) for kind, s in forks.items()}
        res: dict[tuple[str, str], list[tuple[float, ...]]] = {}
        start: list[float] = []
        for rep in range(args.reps):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            start.append(time.perf_counter() - t)
            for system in systems:
                for mode in MODES:
                    res.setdefault((system, mode), []).append(one(system, mode, layers, base, rep))
        load1 = os.getloadavg()
        cost = {}
        if cost0:
            for s in services:
                s.wait_empty()
            time.sleep(1.5)     # exited servers reaped (the service's loop: every second)
            for kind, s in forks.items():
                c1 = service_cost(s.proc.pid)
                cost[kind] = (c1[0] - cost0[kind][0], c1[1] - cost0[kind][1])
        counts = {}
        if args.instructions:
            scripts = {"now": MERGEFS}
            if args.before:
                scripts["before"] = os.path.join(base, "mergefs-before")
            for tag, script in scripts.items():
                for mode in MODES:
                    counts[tag, mode] = instructions(script, mode, layers, base, tag)
        ms = lambda xs, q: 1000 * (statistics.median(xs) if q == 50 else  # noqa: E731
                                   sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.9))])
        print(f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; {args.reps} reps")
        print(f"python -c pass: p50 {ms(start, 50):.0f} ms, p90 {ms(start, 90):.0f} ms")
        print("CPU: of the mount command, and of mergefs's server until its first answer "
              "(p50; load-independent where wall times are not)")
        print(f"{'system':22} {'mode':4} {'return p50':>10} {'p90':>6} {'live p50':>9} {'p90':>6}"
              f" {'cmd cpu':>8} {'srv cpu':>8}")
        for (system, mode), xs in res.items():
            ret, live = [x[0] for x in xs], [x[1] for x in xs]
            cmd, srv = [x[2] for x in xs], [x[3] for x in xs]
            print(f"{system:22} {mode:4} {ms(ret, 50):10.1f} {ms(ret, 90):6.1f} "
                  f"{ms(live, 50):9.1f} {ms(live, 90):6.1f} {ms(cmd, 50):8.1f} {ms(srv, 50):8.1f}")
        for kind, (cpu, faults) in cost.items():
            n = sum(len(xs) for (system, _), xs in res.items()
                    if system == f"mergefs -o {kind}")
            if n:
                print(f"mergefs -o {kind}: per mount, the mount server and its children: CPU "
                      f"{1000 * cpu / n:.1f} ms, minor faults {faults / n:.0f} ({n} mounts)")
        if counts:
            print("millions of instructions (cachegrind) of `mergefs mount`: the command, and "
                  "the server until it exits after the first answer (its parent's up to the fork "
                  "included)")
            for (tag, mode), (cmd, srv) in counts.items():
                print(f"{'mergefs ' + tag:18} {mode:4} command {cmd:7.1f}  server {srv:7.1f}")
    finally:
        for service in services:
            service.stop()
        subprocess.run(["umount", "-l", base])
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
