#!/usr/bin/env python3
"""Benchmark podman with mergefs as the overlay mount_program beside fuse-overlayfs and
kernel overlayfs (no mount program).

    sudo .venv/bin/python tools/bench_podman.py [--runs 3 --run-reps 5]

The base image is a Debian minbase-like tree built offline from this (Debian)
host's installed packages: the files of every ``Priority: required`` package,
``apt`` and their installed Depends/Pre-Depends closure, packed with umoci as
one layer (``--busybox`` uses the small busybox image of the podman tests
instead). Each mount program has its own private storage (graphroot, runroot,
containers.conf as in tests/podman) into which the image is loaded once
(timed: ``load``). Each run then measures (the runs each program once per
rep in turn, so that a burst of other load hits every program alike; then the
builds, program after program):

* ``run``: ``podman run --rm IMAGE true``, ``--run-reps`` times (the order of
  the programs rotates from rep to rep, so none always follows another's
  clean-up; each sample is one run: mount, start, stop, unmount, remove).
  A sample of 19 s or more
  means podman waited out its 20 s conmon timeout (conmon's exit command, the
  ``podman container cleanup`` that marks the container exited, did not run):
  such samples are counted and printed, not averaged in. That is what every
  fuse-overlayfs sample did before PodmanEnv kept the runroot short: under the
  default workdir ``storage-fuse-overlayfs/run`` was 56 characters, past the
  50 podman accepts for ``--runroot``, which the exit command passes;
* ``run+rm``: ``podman run --name N IMAGE true`` then ``podman rm N`` (the
  same work in two commands), ``--run-reps`` times;
* ``build``: ``podman build --no-cache`` of a Containerfile with four RUN
  steps (copy /usr/bin, write 500 files and edit /etc, delete /usr/share/doc
  and the copy, ``find /`` over everything), then ``podman image rm``.

Ratios are medians of the same run against fuse-overlayfs. Nothing is asserted.
``--before TREE`` adds ``mergefs-before``: the mergefs of another source tree
(e.g. ``git archive`` of an earlier commit), run by this venv's Python, in
the same runs, interleaved (with ``mergefs-fork`` or ``mergefs-views`` among the
programs, instead ``mergefs-fork-before`` / ``mergefs-views-before``: that
service of TREE). ``--fuse-only`` adds ``mergefs-fuse``: this tree's
mergefs with ``nokernel``, so that every mount is a FUSE server, also the
read-only parent mounts of the naive diff that ``mergefs`` itself leaves to
kernel overlayfs when their layers are plain (the FUSE serving path's own ratio).
For ``mergefs-fork`` and ``mergefs-views`` (and their ``-before``) it prints the
CPU of the service and its servers per container of the run samples (what
does not move with the load as wall times do). ``--trace N`` then runs N more ``podman run --rm`` per program with the
kernel's fuse tracepoints on (tracefs; mounted at /sys/kernel/tracing if it
is not) and prints the FUSE requests of each run by opcode and how long they
waited for their answers: evidence that does not move with the load.
``mergefs-fork`` and ``mergefs-views`` are mergefs through a mount service
(README, "As podman's or buildah's overlay mount program"): ``mergefs
mount-server`` (a warm server per mount: forked, or back from an earlier one) or ``mergefs views serve`` (a
bind of a view per mount), started here on private paths (stopped by pid at
the end), the lean program of ``mergefs views install-program`` as
mount_program and ``mountopt = "service=SOCK"``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402
from mergefs.testing.podman import PodmanEnv, busybox_image  # noqa: E402
from mergefs.testing.services import MountService, program  # noqa: E402

from bench_mount import service_cost  # noqa: E402

PROGRAMS = ("mergefs", "mergefs-fork", "mergefs-views", "fuse-overlayfs", "kernel")
ANCHOR = "fuse-overlayfs"
STALL = 19.0          # podman's "Exceeded conmon timeout waiting for container to exit" (20 s)
STALLS: dict[str, int] = {}
CONTAINERFILE = """\
FROM {image}
RUN mkdir -p /opt/app && cp -a /usr/bin /opt/app/bin
RUN for i in $(seq 1 500); do echo $i > /opt/app/f$i; done && sed -i 's/^root:x:/root:*:/' /etc/passwd
RUN rm -rf /usr/share/doc /opt/app/bin && echo gone > /opt/app/note
RUN find / -xdev -type f | wc -l > /opt/app/count
"""


# -- a Debian minbase-like image from the host's packages (benchlib builds the tree) --
def debian_image(where: Path, name: str = "minbase") -> Path:
    archive = where / f"{name}.tar"
    if archive.exists():
        return archive
    where.mkdir(parents=True, exist_ok=True)
    files = benchlib.package_files(benchlib.minbase_packages())
    img, bundle = where / "layout", where / "bundle"
    shutil.rmtree(img, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    subprocess.run(["umoci", "init", "--layout", img], check=True)
    subprocess.run(["umoci", "new", "--image", f"{img}:{name}"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{img}:{name}", bundle], check=True,
                   stdout=subprocess.DEVNULL)
    rootfs = bundle / "rootfs"
    benchlib.copy_host_files(files, rootfs, str(where / "files.txt"))
    benchlib.minbase_skeleton(rootfs)
    subprocess.run(["umoci", "repack", "--image", f"{img}:{name}", bundle], check=True)
    subprocess.run(["umoci", "config", "--image", f"{img}:{name}", "--config.cmd", "/bin/bash",
                    "--config.env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"], check=True)
    subprocess.run(["tar", "-C", img, "-cf", archive, "."], check=True)
    shutil.rmtree(bundle)
    shutil.rmtree(img)
    return archive


# -- measuring -------------------------------------------------------------------
def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_runs(envs: list[PodmanEnv], images: dict, table: benchlib.Table, reps: int) -> None:
    """``run --rm`` then ``run`` + ``rm``, each program once per rep in turn (a burst of
    other load then hits every program alike, not one program's block of reps)."""
    for env in envs:
        table.series(f"run {env.name}", anchor=None if env.name == ANCHOR else f"run {ANCHOR}")
    for rep in range(reps):
        for env in rotated(envs, rep):
            sec = timed(lambda: env("run", "--rm", images[env.name], "true"))
            if sec >= STALL:       # podman waited out its conmon timeout
                STALLS[env.name] = STALLS.get(env.name, 0) + 1
                continue
            table.series(f"run {env.name}").add(sec)
    for env in envs:
        table.series(f"run+rm {env.name}",
                     anchor=None if env.name == ANCHOR else f"run+rm {ANCHOR}")
    for i in range(reps):
        for env in rotated(envs, i):
            table.series(f"run+rm {env.name}").add(timed(lambda: (
                env("run", "--name", f"bench-{i}", images[env.name], "true"),
                env("rm", f"bench-{i}"))))


def rotated(envs: list, rep: int) -> list:
    """The programs in turn, starting one further each rep: each comes first (after
    the last one's clean-up) as often as the others."""
    k = rep % len(envs)
    return envs[k:] + envs[:k]


def measure(env: PodmanEnv, image: str, table: benchlib.Table, reps: int, ctx: Path,
            build: bool = True) -> None:
    """The build (one)."""
    if not build:
        return
    tag = f"localhost/bench-{env.name}"
    anchor = None if env.name == ANCHOR else f"build {ANCHOR}"
    table.series(f"build {env.name}", anchor=anchor).add(
        timed(lambda: env("build", "--no-cache", "--network", "none", "--tag", tag, ctx)))
    env("image", "rm", tag)


# -- FUSE requests of a container (load-independent): the kernel's fuse tracepoints --
TRACEFS = "/sys/kernel/tracing"
TRACE_LINE = re.compile(r"^\s*(.+?)-\d+\s+\[\d+\]\s+\S+\s+([\d.]+): fuse_request_(send|end): "
                        r"connection (\d+) req (\d+)(?: opcode \d+ \((\w+)\))?")
CONTAINER_COMMS = ("podman", "true", "runc", "conmon", "bind_with_flags")


def trace_requests(env: PodmanEnv, image: str, reps: int) -> tuple[collections.Counter, dict]:
    """FUSE requests per ``podman run --rm`` (by opcode) and the time they waited
    for their answers (ms per opcode), over ``reps`` runs: the connections whose
    requests come from podman, runc or the container (not other FUSE mounts)."""
    inst = f"{TRACEFS}/instances/bench-podman"
    mounted = not os.path.isdir(f"{TRACEFS}/events") and subprocess.run(
        ["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True).returncode == 0
    os.makedirs(inst, exist_ok=True)
    ops, waited = collections.Counter(), collections.Counter()

    def put(name, value):
        with open(f"{inst}/{name}", "w") as f:
            f.write(value)
    try:
        put("events/fuse/enable", "1")
        for _ in range(reps):
            put("trace", "")
            put("tracing_on", "1")
            env("run", "--rm", image, "true")
            put("tracing_on", "0")
            with open(f"{inst}/trace") as f:
                rows = [m.groups() for m in map(TRACE_LINE.match, f) if m]
            ours = {conn for comm, _, ev, conn, _, _ in rows
                    if ev == "send" and comm.startswith(CONTAINER_COMMS)}
            sent = {}
            for comm, ts, ev, conn, req, op in rows:
                if conn not in ours:
                    continue
                if ev == "send":
                    ops[op] += 1
                    sent[conn, req] = (float(ts), op)
                elif (conn, req) in sent:
                    t0, op = sent.pop((conn, req))
                    waited[op] += (float(ts) - t0) * 1000
    finally:
        put("tracing_on", "0")
        os.rmdir(inst)
        if mounted:
            subprocess.run(["umount", TRACEFS], capture_output=True)
    return ops, waited


def print_requests(name: str, ops: collections.Counter, waited: dict, reps: int) -> None:
    total = sum(ops.values()) / reps
    print(f"{name}: {total:.1f} FUSE requests per run --rm, answers waited for "
          f"{sum(waited.values()) / reps:.1f} ms: " +
          ", ".join(f"{op.removeprefix('FUSE_').lower()} {n / reps:g} ({waited[op] / reps:.1f} ms)"
                    for op, n in ops.most_common()))


def run(args) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.busybox:
        archive, what = busybox_image(Path(_fresh(work / "busybox"))), "busybox (3 layers)"
    else:
        archive, what = debian_image(work / "minbase"), "Debian minbase-like (host packages)"
    size = os.path.getsize(archive) / 2**20
    print(f"image ready in {time.perf_counter() - t0:.1f}s: {what}, {size:.0f} MiB archive",
          flush=True)
    table = benchlib.Table(f"podman {what}: run --rm and run+rm x{args.run_reps}, build x1 per run, "
                           f"{args.runs} runs (seconds)")
    envs, images = {}, {}
    services = {}
    programs = list(args.programs)
    if args.fuse_only and "mergefs" in programs:   # every mount on FUSE, next to mergefs
        programs.insert(programs.index("mergefs") + 1, "mergefs-fuse")
    if args.before:     # next to mergefs, so the two alternate as closely as the runs allow
        if "mergefs" in programs or not {"mergefs-fork", "mergefs-views"} & set(programs):
            programs.insert(programs.index("mergefs") + 1 if "mergefs" in programs else 0,
                            "mergefs-before")
        for served in ("mergefs-fork", "mergefs-views"):
            if served in programs:
                programs.insert(programs.index(served) + 1, f"{served}-before")
        benchlib.prepare_tree(args.before)
    try:
        for name in programs:
            path = before_script(work, os.path.abspath(args.before)) \
                if name == "mergefs-before" else None
            if name == "mergefs-fuse":
                path = fuse_only_script(work)
            mountopt = None
            if name in ("mergefs-fork", "mergefs-views", "mergefs-fork-before",
                        "mergefs-views-before"):
                kind = name.split("-")[1]
                services[name] = MountService(
                    kind, _fresh(work / f"service-{name.removeprefix('mergefs-')}"),
                    args.before if name.endswith("-before") else None)
                path, mountopt = program(work), f"service={services[name].control}"
            envs[name] = PodmanEnv(Path(_fresh(work / f"storage-{name}")), name, path, mountopt)
            anchor = None if name == ANCHOR else f"load {ANCHOR}"
            sec = timed(lambda: images.__setitem__(name, envs[name].load(archive)))
            table.series(f"load {name}", anchor=anchor).add(sec)
            ctx = work / f"ctx-{name}"
            ctx.mkdir(exist_ok=True)
            (ctx / "Containerfile").write_text(CONTAINERFILE.format(image=images[name]))
        cpu = {name: 0.0 for name in services}
        for run_no in range(args.runs):
            before = {name: service_cost(s.proc.pid)[0] for name, s in services.items()}
            measure_runs([envs[n] for n in programs], images, table, args.run_reps)
            for name, s in services.items():
                cpu[name] += service_cost(s.proc.pid)[0] - before[name]
            for name in programs:
                measure(envs[name], images[name], table, args.run_reps, work / f"ctx-{name}",
                        not args.no_build)
            print(f"run {run_no + 1} done (load average {os.getloadavg()[0]:.1f})", flush=True)
        for name, sec in cpu.items():     # (servers reaped later are not in it: few)
            print(f"{name}: CPU of the service and its servers per container of the run "
                  f"samples: {1000 * sec / (2 * args.runs * args.run_reps):.1f} ms")
        for name in programs if args.trace else ():
            print_requests(name, *trace_requests(envs[name], images[name], args.trace),
                           args.trace)
    finally:
        for env in envs.values():
            env.close()
        for name, service in services.items():
            left = service.wait_empty(5.0)
            service.stop()
            print(f"{name}: left in the service after podman's clean-up: {left or 'nothing'}")
    print(table.render())
    print("run samples left out as podman stalls (>= 19 s: podman waited out its 20 s "
          f"conmon timeout; conmon's cleanup did not run): {STALLS or 'none'}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table.as_dict(), f, indent=1)
    return 0


def before_script(where: Path, tree: str) -> str:
    """A ``mergefs`` script importing mergefs from ``tree`` (this venv's Python)."""
    path = where / "mergefs-before"
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {tree!r})\n"
                    "from mergefs.cli import main\nsys.exit(main())\n")
    path.chmod(0o755)
    return str(path)


def fuse_only_script(where: Path) -> str:
    """This tree's ``mergefs -o`` with ``nokernel`` added: every mount a FUSE server,
    also the read-only ones over plain layers (the naive diff's parent mounts),
    which mergefs otherwise leaves to kernel overlayfs (mergefs/kernelview.py)."""
    path = where / "mergefs-fuse"
    path.write_text(f"#!{sys.executable}\nimport sys\n"
                    "i = sys.argv.index('-o')\nsys.argv[i + 1] += ',nokernel'\n"
                    "from mergefs.cli import main\nsys.exit(main())\n")
    path.chmod(0o755)
    return str(path)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-podman")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--run-reps", type=int, default=5)
    ap.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    ap.add_argument("--busybox", action="store_true", help="the tests' busybox image instead")
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--before", metavar="TREE", help="also a mergefs-before: mergefs from TREE")
    ap.add_argument("--no-build", action="store_true", help="run and run+rm only")
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="then N more run --rm per program with the kernel's fuse tracepoints "
                         "on: FUSE requests per run by opcode and the time they waited")
    ap.add_argument("--fuse-only", action="store_true",
                    help="also mergefs-fuse: mergefs with every mount on FUSE (nokernel)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_podman: needs root (podman with private storage)", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
