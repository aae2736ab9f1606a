#!/usr/bin/env python3
"""Server CPU per metadata request of a writable mergefs mount, step by step.

    sudo .venv/bin/python tools/bench_metadata.py [--rounds 3] [--profile OUT.prof]
        [--strace] [--callgrind OUT]

What ``tools/bench_writable.py`` measures end to end, cut into steps that each
exercise a few FUSE handlers, on one fresh writable mount per round over
tools/gen_stack.py's 3-layer stack (upper on a scratch journaled ext4). For
each step it prints the server's CPU seconds (user + system, from
/proc/PID/stat), the FUSE requests it served (its SIGUSR1 counters) and the
CPU per request in microseconds. The client work runs in one Python child per
step (no process per file), so the server's CPU is what moves.

Steps, in this order on the same mount:
- ``lookup``: lstat of 6,000 existing lower names (lookup);
- ``untar``: ``tar -xf`` of 10k small files (lookup, create, getxattr,
  write, setattr, getattr, release);
- ``find``: ``find MNT`` (opendir, readdirplus, releasedir);
- ``mkdir``, ``symlink``, ``mknod``: 2,000 each in new directories;
- ``chown``: ``lchown`` of 2,000 lower files (copy-up, getxattr, setattr);
- ``append``: one byte appended to 2,000 other lower files (open O_APPEND,
  write, close: bench_writable's append step; getxattr, the copy-up at the
  first write);
- ``getxattr``/``listxattr``: of 6,000 names (no xattr on them);
- ``rename``: 2,000 files renamed within the upper;
- ``unlink``: ``rm -rf`` of the untarred tree (upper only: unlink, rmdir);
- ``rm-lower``: ``rm -rf`` of 3 lower subtrees (whiteouts).

``--profile OUT`` runs the server in the foreground under cProfile (CPU time)
for one round and writes its stats to OUT (read with ``python -m pstats``).
``--callgrind OUT`` runs it under valgrind's callgrind for one round, its
counts zeroed before each step and dumped after: OUT.STEP (``callgrind_annotate``),
its instruction count per request printed (user space only: the kernel's
side of the syscalls is not in it; slow, ~50x). ``--strace`` attaches
``strace -c -f`` to the server during each step (one more round after the
timed ones) and prints the syscalls per request and the top ones.
Compare two trees by running each at the same load, interleaved; the load
average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402
import bench_writable  # noqa: E402
import gen_stack  # noqa: E402

N = 2000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The client side of each step: a Python child (argv: MNT LIST), one call per entry.
CLIENT = {
    "lookup": "for p in L[:3*N]: os.lstat(M + '/' + p)",
    "untar": None,
    "find": None,
    "mkdir": "os.mkdir(M + '/mk')\nfor i in range(N): os.mkdir(M + '/mk/d%d' % i)",
    "symlink": "os.mkdir(M + '/sl')\nfor i in range(N): os.symlink('t%d' % i, M + '/sl/l%d' % i)",
    "mknod": "os.mkdir(M + '/nd')\nfor i in range(N): os.mkfifo(M + '/nd/f%d' % i)",
    "chown": "for p in L[:N]: os.chown(M + '/' + p, 1, 1, follow_symlinks=False)",
    "append": ("for p in L[N:2*N]:\n"
               "  fd = os.open(M + '/' + p, os.O_WRONLY | os.O_APPEND)\n"
               "  os.write(fd, b'x'); os.close(fd)"),
    "getxattr": ("for p in L[:3*N]:\n"
                 "  try: os.getxattr(M + '/' + p, 'security.capability', follow_symlinks=False)\n"
                 "  except OSError: pass"),
    "listxattr": "for p in L[:3*N]: os.listxattr(M + '/' + p, follow_symlinks=False)",
    "rename": ("for i in range(N): os.rename(M + '/d%02d/f%03d' % (i // 100, i % 100),"
               " M + '/d%02d/g%03d' % (i // 100, i % 100))"),
    "unlink": None,
    "rm-lower": None,
}
STEPS = tuple(CLIENT)


def lower_files(layers: list[str], out: str) -> None:
    """3*N regular files of the merged lowers (plain names, outside the rm-lower
    subtrees), evenly spread: bench_writable's pick, with a larger count."""
    saved = bench_writable.N_APPEND
    bench_writable.N_APPEND = 3 * N
    try:
        bench_writable.pick_append_files(layers, out)
    finally:
        bench_writable.N_APPEND = saved


def shell_step(step: str, mnt: str, tarball: str) -> list[str] | None:
    rm = " ".join(os.path.join(mnt, d) for d in bench_writable.RM_SUBTREES)
    return {"untar": f"tar -xf {tarball} -C {mnt}",
            "find": f"find {mnt} > /dev/null",
            "unlink": f"rm -rf {mnt}/d??",
            "rm-lower": f"rm -rf {rm}"}.get(step)


def run_step(step: str, mnt: str, tarball: str, files: str) -> int:
    cmd = shell_step(step, mnt, tarball)
    if cmd is not None:
        return subprocess.run(["bash", "-c", cmd], stdout=subprocess.DEVNULL).returncode
    code = (f"import os, sys\nM = sys.argv[1]\nN = {N}\n"
            "L = open(sys.argv[2]).read().splitlines()\n" + CLIENT[step])
    return subprocess.run([sys.executable, "-c", code, mnt, files]).returncode


class Server:
    """A mount's server: daemonized by the CLI; or in the foreground under
    cProfile (``profile``: its stats file) or valgrind's callgrind (``callgrind``:
    the output file's prefix, a dump per step: ``collect``)."""

    def __init__(self, base: str, layers: list[str], profile: str | None, tree: str,
                 callgrind: str | None = None):
        self.mnt, self.upper, self.work = (os.path.join(base, n) for n in ("mnt", "up", "wk"))
        for d in (self.mnt, self.upper, self.work):
            os.makedirs(d)
        self.log = os.path.join(base, "server.log")
        env = dict(os.environ, PYTHONPATH=tree)
        argv = ["mount", "--log", self.log, "--upper", self.upper, "--work", self.work, *layers, self.mnt]
        if profile or callgrind:
            if profile:
                code = ("import cProfile, sys, time\nfrom mergefs.cli import main\n"
                        "p = cProfile.Profile(time.process_time)\np.enable()\n"
                        "try: main(sys.argv[2:])\nfinally:\n p.disable(); p.dump_stats(sys.argv[1])")
                cmd = [sys.executable, "-c", code, profile]
            else:
                code = "import sys\nfrom mergefs.cli import main\nmain(sys.argv[1:])"
                cmd = ["valgrind", "--tool=callgrind",
                       f"--callgrind-out-file={callgrind}.%p", sys.executable, "-c", code]
            self.proc = subprocess.Popen([*cmd, argv[0], "--foreground", *argv[1:]],
                                         stderr=open(self.log + ".err", "w"), env=env, cwd=tree)
            deadline = time.monotonic() + (300 if callgrind else 30)
            while not benchlib.is_mounted(self.mnt):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the profiled server did not mount")
                time.sleep(0.05)
            self.pid = self.proc.pid
            self.log += ".err"
        else:
            self.proc = None
            subprocess.run([sys.executable, "-m", "mergefs", *argv], check=True, env=env,
                           cwd=tree)
            self.pid = bench_writable.find_server_pid(
                os.path.basename(sys.executable).encode(), self.mnt)

        os.listdir(self.mnt)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.log) and time.monotonic() < deadline:
            time.sleep(0.02)

    def cpu(self) -> float:
        return benchlib.process_cpu(self.pid)

    def collect(self, on: bool, dump: str = "") -> None:
        """callgrind: start counting from zero, or dump what was counted since
        (``dump``: the dump's name, ``callgrind_control``'s hint). Instrumented
        from the start (toggling it mid-request leaves the call tree wrong)."""
        subprocess.run(["callgrind_control", "-z" if on else f"--dump={dump}", str(self.pid)],
                       check=True, stdout=subprocess.DEVNULL)

    def requests(self) -> dict:
        return benchlib.server_requests(self.pid, self.log)

    def stop(self) -> None:
        benchlib.unmount(self.mnt)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)


def one_round(layers, base, tarball, files, profile, steps, results, tree,
              strace: bool = False, callgrind: str | None = None) -> None:
    benchlib.drop_caches()
    s = Server(base, layers, profile, tree, callgrind)
    try:
        s.requests()
        for step in steps:
            if callgrind:
                s.collect(True)
            tracer = strace and bench_writable.Strace(s.pid, os.path.join(base, f"{step}.strace"))
            cpu0 = s.cpu()
            rc = run_step(step, s.mnt, tarball, files)
            cpu = s.cpu() - cpu0
            if callgrind:
                s.collect(False, step)
            syscalls = tracer.stop() if tracer else None
            req = s.requests()
            if rc:
                results.setdefault("failures", []).append(f"{step}: exit {rc}")
            if syscalls is not None:
                results.setdefault("strace", {})[step] = (syscalls, req)
            else:
                results.setdefault(step, []).append((cpu, sum(req.values()), req))
            if callgrind:
                results.setdefault("callgrind", {})[step] = (callgrind_total(callgrind, s.pid),
                                                            sum(req.values()))
    finally:
        s.stop()
    if callgrind:       # the dumps by step name (the last one is the server's exit)
        for n, step in enumerate(steps, 1):
            os.replace(f"{callgrind}.{s.pid}.{n}", f"{callgrind}.{step}")


def callgrind_total(prefix: str, pid: int) -> int:
    """The instructions (Ir) of callgrind's latest dump of ``pid``."""
    dumps = [f for f in os.listdir(os.path.dirname(prefix) or ".")
             if f.startswith(os.path.basename(prefix) + f".{pid}.")]
    last = max(dumps, key=lambda f: int(f.rsplit(".", 1)[1]))
    total = 0
    with open(os.path.join(os.path.dirname(prefix), last)) as f:
        for line in f:      # "totals:" (its "summary:" can be wrong after a toggle)
            if line.startswith("totals:"):
                total = int(line.split()[1])
    return total


def median(rows) -> float:
    cpus = sorted(c for c, _, _ in rows)
    return cpus[len(cpus) // 2]


def report_counts(results: dict, steps) -> None:
    """--strace and --callgrind: syscalls and instructions per request of each step."""
    for step in steps:
        if step in results.get("strace", {}):
            sc, req = results["strace"][step]
            total, nreq = sum(sc.values()), max(sum(req.values()), 1)
            top = sorted(sc.items(), key=lambda kv: -kv[1])[:8]
            print(f"{step:10} syscalls {total} ({total / nreq:.1f}/request, {nreq} requests) "
                  f"top={dict(top)}")
        if step in results.get("callgrind", {}):
            ir, nreq = results["callgrind"][step]
            print(f"{step:10} instructions {ir:,} ({ir / max(nreq, 1):,.0f}/request, "
                  f"{nreq} requests)")


def report(results: dict, steps) -> None:
    print(f"{'step':10} {'cpu s (rounds)':28} {'requests':>9} {'us/req':>7}  top requests")
    for step in steps:
        rows = results.get(step, [])
        if not rows:
            continue
        med, nreq = median(rows), rows[0][1]
        top = sorted(rows[0][2].items(), key=lambda kv: -kv[1])[:4]
        print(f"{step:10} {med:6.2f} {str([round(c, 2) for c, _, _ in rows]):21} {nreq:9d} "
              f"{1e6 * med / max(nreq, 1):7.1f}  {dict(top)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-writable")
    ap.add_argument("--files", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--profile", help="one round, server under cProfile; stats to this file")
    ap.add_argument("--callgrind", metavar="OUT",
                    help="one round, server under callgrind while the steps run; OUT.STEP")
    ap.add_argument("--strace", action="store_true",
                    help="one more round with strace -c -f on the server: syscalls per step")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--tree", action="append",
                    help="serve from this source tree (PYTHONPATH); given twice or more, "
                         "rounds alternate between the trees (A/B at the same load)")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    layers = gen_stack.ensure_stack(os.path.join(args.workdir, "stack"), 3, args.files,
                                    seed=1, fmt="overlay")
    tarball = os.path.join(args.workdir, "small10k.tar")
    bench_writable.make_tarball(tarball)
    files = os.path.join(args.workdir, "metadata.list")
    if not os.path.exists(files):
        lower_files(layers, files)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    trees = [os.path.abspath(t) for t in args.tree or [REPO]]
    results: dict = {t: {} for t in trees}
    with benchlib.scratch_ext4(os.path.join(args.workdir, "scratch-md"), size="4G") as scratch:
        one = args.profile or args.callgrind
        for r in range(1 if one else args.rounds):
            for k, tree in enumerate(trees):
                one_round(layers, os.path.join(scratch, f"r{r}-{k}"), tarball, files,
                          args.profile and os.path.abspath(args.profile), args.steps,
                          results[tree], tree, callgrind=args.callgrind and os.path.abspath(
                              args.callgrind + (f".{k}" if len(trees) > 1 else "")))
        for k, tree in enumerate(trees if args.strace else ()):
            one_round(layers, os.path.join(scratch, f"strace-{k}"), tarball, files, None,
                      args.steps, results[tree], tree, strace=True)
    for tree in trees:
        print(f"tree {tree}:")
        report(results[tree], args.steps)
        report_counts(results[tree], args.steps)
    if len(trees) == 2:
        a, b = (results[t] for t in trees)
        print("cpu ratio (second tree / first), medians:")
        for step in args.steps:
            if a.get(step) and b.get(step):
                print(f"  {step:10} {median(b[step]) / max(median(a[step]), 1e-9):5.2f}")
    failures = [f"{t}: {f}" for t in trees for f in results[t].get("failures", [])]
    for f in failures:
        print(f"FAILED STEP: {f}")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
