#!/usr/bin/env python3
"""Where a ``podman build`` spends its time, per mount program: a breakdown.

    sudo .venv/bin/python tools/trace_podman_build.py [--programs mergefs fuse-overlayfs]

For each program in turn, one ``podman build --no-cache`` of bench_podman's
Containerfile (four RUN steps over the Debian minbase-like image) with the
mount program wrapped by a script that logs each call (start, end, options),
while a thread polls /proc/self/mounts every 5 ms (when each mount appears
and goes) and the CPU of each mount's server processes (/proc/PID/stat; for
mergefs also its FUSE request counts, SIGUSR1 every 0.2 s). Each step is cut
where containers/storage's calls show it:

* ``run``: from the ``STEP n`` line to the commit's first mount (the RUN
  itself, in the working container mounted at the previous step's end);
* ``diff``: the commit's naive diff (a mount program makes containers/storage
  use it): the parent layers mounted read-only (lowerdir only) and walked
  beside the container's mount, the changes tarred, until that mount goes;
* ``apply``: the tar applied as the new layer, until the ``--> ID`` line;
* ``next``: the next working container created and mounted.

Then one line per mount: what it was, how long the program took to return,
how long it stayed, its server's CPU and (mergefs) requests. Nothing is
asserted; the load average is printed.
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
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_podman  # noqa: E402
from mergefs.testing.podman import PodmanEnv  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


class Watch(threading.Thread):
    """Mounts under ``root`` as they come and go, and their servers' CPU."""

    def __init__(self, root: Path, fuse_requests: bool):
        super().__init__(daemon=True)
        self.root, self.fuse_requests = str(root), fuse_requests
        self.events: list[tuple[float, str, str]] = []
        self.cpu: dict[str, dict[int, int]] = {}     # target -> {pid: ticks}
        self.logs: dict[str, str] = {}
        self.stop = False
        self._usr1 = 0.0

    def run(self) -> None:
        seen: set[str] = set()
        while not self.stop:
            self._sample()
            now = time.monotonic()
            cur = set()
            with open("/proc/self/mounts") as f:
                for line in f:
                    target, fstype = line.split()[1:3]
                    if target.startswith(self.root) and target.endswith("/merged"):
                        cur.add(target)
            for t in cur - seen:
                self.events.append((now, "mount+", t))
                self.cpu[t] = {pid: 0 for pid in servers(t)}
            for t in seen - cur:
                self.events.append((now, "mount-", t))
            seen = cur
            time.sleep(0.005)

    def _sample(self) -> None:
        usr1 = self.fuse_requests and time.monotonic() - self._usr1 > 0.2
        if usr1:
            self._usr1 = time.monotonic()
        for target, pids in self.cpu.items():
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rpartition(")")[2].split()
                    pids[pid] = int(fields[11]) + int(fields[12])
                    if usr1 and catches_usr1(pid):
                        self.logs[target] = os.readlink(f"/proc/{pid}/fd/2")
                        os.kill(pid, 10)
                except (OSError, ValueError):
                    pass

    def requests(self, target: str) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        if target in self.logs:
            with open(self.logs[target]) as f:
                for m in re.finditer(r"requests (\{.*\})", f.read()):
                    out.update(json.loads(m.group(1)))
        return out


def servers(target: str) -> list[int]:
    key = target.encode()
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if key in cmd and b"mount-program-log" not in cmd:
            out.append(int(pid))
    return out


def catches_usr1(pid: int) -> bool:
    """A mergefs server (trio catches SIGUSR1), not the mount command that forked it."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << 9))


def wrap(env: PodmanEnv) -> Path:
    """Point env's storage.conf at a script that logs each call of its mount program."""
    log, script = env.root / "mount-program.log", env.root / "mount-program-log"
    script.write_text(f"""#!/bin/sh
s=$(date +%s.%N)
{env.program} "$@"
rc=$?
echo "$s $(date +%s.%N) $rc $*" >> {log}
exit $rc
""")
    script.chmod(0o755)
    conf = env.root / "storage.conf"
    conf.write_text(conf.read_text().replace(f'"{env.program}"', f'"{script}"'))
    return log


def trace(name: str, work: Path, archive: Path, path: str | None) -> None:
    env = PodmanEnv(Path(bench_podman._fresh(work / f"trace-{name}")), name, path)
    try:
        image = env.load(archive)
        ctx = env.root / "ctx"
        ctx.mkdir()
        (ctx / "Containerfile").write_text(bench_podman.CONTAINERFILE.format(image=image))
        log = wrap(env)
        watch = Watch(env.root, fuse_requests=name.startswith("mergefs"))
        watch.start()
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        wall0 = time.time()
        proc = subprocess.Popen(["podman", "build", "--no-cache", "--network", "none",
                                 "--tag", "localhost/trace", str(ctx)], env=env.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [(time.monotonic(), line.rstrip()) for line in proc.stdout]
        proc.wait()
        total = time.monotonic() - t0
        time.sleep(0.1)
        watch.stop = True
        watch.join()
        calls = []          # (start, end, read_only, target) on the monotonic clock
        for entry in log.read_text().splitlines():
            start, end, _rc, *args = entry.split()
            calls.append((float(start) - wall0 + t0, float(end) - wall0 + t0,
                          "upperdir=" not in " ".join(args), args[-1]))
        report(name, t0, total, lines, calls, watch, load0)
        env("image", "rm", "localhost/trace")
    finally:
        env.close()


def report(name, t0, total, lines, calls, watch, load0) -> None:
    gone = {t: at for at, kind, t in watch.events if kind == "mount-"}
    came = {t: at for at, kind, t in watch.events if kind == "mount+"}
    steps = [at for at, line in lines if re.match(r"STEP \d+/\d+: RUN", line)]
    done = [at for at, line in lines if line.startswith("--> ")]
    diffs = sorted((s, gone.get(t, s)) for s, _, ro, t in calls if ro)
    print(f"\n{name}: build {total:.2f} s (load average {load0:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end)")
    print(f"{'step':5} {'run':>7} {'diff':>7} {'apply':>7} {'next':>7}   (seconds)")
    sums = collections.Counter()
    for i, start in enumerate(steps):
        d0, d1 = next(((a, b) for a, b in diffs if a > start), (start, start))
        end = next((at for at in done if at > d1), d1)
        nxt = steps[i + 1] if i + 1 < len(steps) else end
        row = {"run": d0 - start, "diff": d1 - d0, "apply": end - d1, "next": nxt - end}
        sums.update(row)
        print(f"{i + 2:<5} " + " ".join(f"{row[k]:7.2f}" for k in ("run", "diff", "apply",
                                                                      "next")))
    print("sum   " + " ".join(f"{sums[k]:7.2f}" for k in ("run", "diff", "apply", "next")))
    print(f"{'mount':18} {'at':>6} {'returned':>8} {'stayed':>7} {'server cpu':>10}  requests")
    cpu_total = 0
    for start, end, ro, target in calls:
        ticks = sum(watch.cpu.get(target, {}).values())
        cpu_total += ticks
        req = watch.requests(target)
        top = ", ".join(f"{k} {v}" for k, v in req.most_common(4))
        stayed = gone.get(target, t0 + total) - came.get(target, start)
        print(f"{'parent (ro)' if ro else 'container':18} {start - t0:6.2f} "
              f"{1000 * (end - start):6.0f}ms {stayed:6.2f}s {1000 * ticks / TICK:8.0f}ms"
              f"  {sum(req.values()) or ''} {top}")
    print(f"mount program calls: {len(calls)} ({sum(1 for c in calls if c[2])} read-only), "
          f"returned after {sum(1000 * (e - s) for s, e, *_ in calls):.0f} ms in all; "
          f"servers' CPU {1000 * cpu_total / TICK:.0f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-trace-podman")
    ap.add_argument("--programs", nargs="+", default=["mergefs", "fuse-overlayfs"],
                    choices=["mergefs", "fuse-overlayfs", "mergefs-before"])
    ap.add_argument("--before", metavar="TREE", help="mergefs-before: mergefs from TREE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("trace_podman_build: needs root (podman with private storage)", file=sys.stderr)
        return 2
    if "mergefs-before" in args.programs and not args.before:
        print("trace_podman_build: mergefs-before needs --before TREE", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    archive = bench_podman.debian_image(work / "minbase")
    for name in args.programs:
        path = None
        if name == "mergefs-before":
            bench_podman.prepare_tree(args.before)
            path = bench_podman.before_script(work, os.path.abspath(args.before))
        trace(name, work, archive, path)
    shutil.rmtree(work / "trace", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
