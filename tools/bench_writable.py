#!/usr/bin/env python3
"""Benchmark writable unions: mergefs beside kernel overlayfs and fuse-overlayfs.

    sudo .venv/bin/python tools/bench_writable.py [--files 30000 --rounds 2 --strace]

The lowers are tools/gen_stack.py's stack (3 layers, overlay format, ~34k
entries; reused from --workdir when its stack.json matches). Uppers and work
dirs live on a fresh journaled ext4 (benchlib.scratch_ext4), a new pair per
system and round. Each round mounts every system afresh (caches dropped
first) and times these steps, in this order, on the same mount:

1. ``mount``: from starting the mount command to the first ``ls`` done
   (mergefs: the standalone CLI, ``python -m mergefs mount --upper ...``);
2. ``untar``: ``tar -xf`` of 10k small files (100 dirs, with a ``./`` member)
   into the mount root; tar's exit status is recorded (non-zero is a bug);
3. ``find``: ``find MNT`` of everything;
4. ``append``: append one byte to 2,000 lower files (copy-up), a bash loop of
   builtins (no process per file);
5. ``rm``: ``rm -rf`` of 3 lower subtrees (``opt``, ``run``, ``srv``);
6. ``tar-c``: ``tar -cf - . | cat > /dev/null`` in the mount (reads every file).

``--steps find append`` runs only those steps after the mount (in this order);
``--before TREE`` adds the system "mergefs-before": the same CLI run from
another source tree (``git worktree add TREE COMMIT``, with its C module
built or copied in), for before/after ratios measured in the same rounds.

Ratios are medians against fuse-overlayfs measured in the same run (the
target is <= 1.0x). "STEP server-cpu" rows are the FUSE server's user+system
CPU seconds during the step (from /proc/PID/stat): on a loaded machine they
move much less than wall times. After the timed rounds, ``--strace`` runs one more round
of the FUSE servers with ``strace -c -f`` attached to every thread during
each step (so its times are not reported) and prints, per step, the FUSE
replies (``writev`` to /dev/fuse, both servers use libfuse's writer), the
total syscalls, the top syscalls, and mergefs's own request counters (its
server logs them on SIGUSR1). "req/file" for the untar step is mergefs's
requests divided by the 10,080 entries the tarball creates.

The entries left in each system's upper are counted at the end: what each
one wrote for the same work. The ``dpkg -i`` step of issue 10 is not here:
it needs a Debian root filesystem (debootstrap and a mirror); this machine
has neither offline. Nothing is asserted; the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402
import gen_stack  # noqa: E402

SYSTEMS = ("kernel-overlay", "fuse-overlayfs", "mergefs")
BEFORE = "mergefs-before"        # with --before TREE
STEPS = ("mount", "untar", "find", "append", "rm", "tar-c")
RM_SUBTREES = ("opt", "run", "srv")
N_APPEND = 2000
TAR_DIRS, TAR_FILES_PER_DIR = 100, 100


def make_tarball(path: str) -> int:
    """10k small files in 100 dirs, members named ./dNN/fNNN, with a ./ member."""
    if os.path.exists(path):
        with tarfile.open(path) as t:
            return len(t.getmembers())
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as t:
        def add(name, kind, data=b""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, 0o755 if kind == tarfile.DIRTYPE else 0o644, \
                1_700_000_000
            info.size = len(data)
            import io
            t.addfile(info, io.BytesIO(data) if data else None)
        add("./", tarfile.DIRTYPE)
        for d in range(TAR_DIRS):
            add(f"./d{d:02d}/", tarfile.DIRTYPE)
            for f in range(TAR_FILES_PER_DIR):
                add(f"./d{d:02d}/f{f:03d}", tarfile.REGTYPE, (b"%d.%d\n" % (d, f)) * (1 + f % 40))
    os.rename(tmp, path)
    return 1 + TAR_DIRS * (1 + TAR_FILES_PER_DIR)


def pick_append_files(layers: list[str], out: str) -> None:
    """2,000 regular files of the merged lowers (names plain ASCII), evenly spread, via a
    read-only kernel overlay; written one per line, relative to the root."""
    if os.path.exists(out):
        return
    mnt = out + ".mnt"
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    "lowerdir=" + ":".join(reversed(layers)), mnt], check=True)
    try:
        found = []
        for dirpath, dirs, files in os.walk(mnt):
            dirs.sort()
            rel = os.path.relpath(dirpath, mnt)
            if rel.split("/")[0] in RM_SUBTREES:
                continue
            for n in sorted(files):
                p = os.path.join(dirpath, n)
                if n.isascii() and n.isprintable() and rel.isascii() and rel.isprintable() \
                        and os.path.isfile(p) and not os.path.islink(p) and "\\" not in p:
                    found.append(os.path.normpath(os.path.join(rel, n)))
    finally:
        benchlib.unmount(mnt)
    step = max(1, len(found) // N_APPEND)
    with open(out, "w") as f:
        f.write("".join(p + "\n" for p in found[::step][:N_APPEND]))


class System:
    before: str | None = None       # --before TREE: the source tree "mergefs-before" runs

    def __init__(self, name: str, layers: list[str], base: str, log: str):
        self.name, self.layers, self.log = name, layers, log
        self.mnt, self.upper, self.work = (os.path.join(base, n) for n in ("mnt", "up", "wk"))
        for d in (self.mnt, self.upper, self.work):
            os.makedirs(d)
        self.pid: int | None = None

    def mount(self) -> None:
        lowerdir = ":".join(reversed(self.layers))
        opts = f"lowerdir={lowerdir},upperdir={self.upper},workdir={self.work}"
        if self.name == "kernel-overlay":
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, self.mnt],
                           check=True)
        elif self.name == "fuse-overlayfs":
            subprocess.run(["fuse-overlayfs", "-o", opts, self.mnt], check=True)
            self.pid = find_server_pid(b"fuse-overlayfs", self.mnt)
        else:
            tree = self.before if self.name == "mergefs-before" else None
            env = dict(os.environ, PYTHONPATH=tree) if tree else None
            subprocess.run([sys.executable, "-m", "mergefs", "mount", "--log", self.log,
                            "--upper", self.upper, "--work", self.work, *self.layers, self.mnt],
                           check=True, cwd=tree, env=env)
            self.pid = find_server_pid(os.path.basename(sys.executable).encode(), self.mnt)

    def umount(self) -> None:
        benchlib.unmount(self.mnt)
        deadline = time.monotonic() + 10
        while self.pid and os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            time.sleep(0.05)

    def cpu(self) -> float:
        """User + system CPU seconds of the server so far (0 for the kernel)."""
        return benchlib.process_cpu(self.pid)

    def requests(self) -> dict:
        """mergefs: request counts since the last call (SIGUSR1, then read from its log)."""
        if not self.name.startswith("mergefs") or not self.pid:
            return {}
        return benchlib.server_requests(self.pid, self.log)

def find_server_pid(program: bytes, mnt: str) -> int | None:
    """The daemon serving ``mnt`` (read from /proc; nothing is signalled)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and os.path.basename(args[0]) == program and mnt.encode() in args:
            return int(pid)
    return None


def step_commands(s: System, tarball: str, append_list: str) -> dict[str, tuple[str, str]]:
    rm = " ".join(os.path.join(s.mnt, d) for d in RM_SUBTREES)
    return {
        "untar": (f"tar -xf {tarball} -C {s.mnt}", "/"),
        "find": (f"find {s.mnt} > /dev/null", "/"),
        "append": (f"while IFS= read -r f; do printf x >> \"{s.mnt}/$f\"; done < {append_list}",
                   "/"),
        "rm": (f"rm -rf {rm}", "/"),
        "tar-c": ("tar -cf - . | cat > /dev/null", s.mnt),
    }


def run_step(cmd: str, cwd: str) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, r.returncode, r.stderr.strip().splitlines()[:2]


class Strace:
    """``strace -c -f`` attached to every thread of ``pid`` for one step."""

    def __init__(self, pid: int, out: str):
        tids = os.listdir(f"/proc/{pid}/task")
        self.out = out
        self.proc = subprocess.Popen(["strace", "-c", "-f", "-o", out,
                                      *[a for t in tids for a in ("-p", t)]],
                                     stderr=subprocess.DEVNULL)
        time.sleep(0.5)                 # attached (strace prints nothing we can wait on)

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        counts = {}
        with open(self.out) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and fields[-1].isidentifier() and fields[3].isdigit() \
                        and fields[-1] != "total":
                    counts[fields[-1]] = int(fields[3])
        return counts


def one_round(names, layers, scratch, tag, tarball, append_list, table, results,
              strace: bool = False, steps=STEPS[1:]) -> None:
    for name in names:
        s = System(name, layers, os.path.join(scratch, f"{tag}-{name}"),
                   os.path.join(scratch, f"{tag}-{name}.log"))
        cmds = step_commands(s, tarball, append_list)
        benchlib.drop_caches()
        try:
            t0 = time.perf_counter()
            s.mount()
            os.listdir(s.mnt)
            if not strace:
                table_row(table, "mount", name).add(time.perf_counter() - t0)
            s.requests()
            for step in steps:
                tracer = Strace(s.pid, os.path.join(scratch, f"{tag}-{name}-{step}.strace")) \
                    if strace and s.pid else None
                cpu0 = s.cpu()
                seconds, rc, err = run_step(*cmds[step])
                cpu = s.cpu() - cpu0
                sys_counts = tracer.stop() if tracer else {}
                req = s.requests()
                if rc != 0:
                    results.setdefault("failures", []).append(f"{tag} {name} {step}: exit {rc} "
                                                              f"{err}")
                if strace:
                    results.setdefault("strace", {})[f"{name} {step}"] = {
                        "syscalls": sys_counts, "requests": req}
                else:
                    table_row(table, step, name).add(seconds)
                    if s.pid:
                        table_row(table, f"{step} server-cpu", name).add(cpu)
                    results.setdefault("requests", {}).setdefault(f"{name} {step}", []).append(req)
        finally:
            s.umount()
        results.setdefault("upper entries", {}).setdefault(name, []).append(
            sum(1 + len(f) + len(d) for _, d, f in os.walk(s.upper)) - 1)
        print(f"{tag}: {name} done", flush=True)


def table_row(table: benchlib.Table, step: str, name: str) -> benchlib.Series:
    anchor = "fuse-overlayfs"
    return table.series(f"{step} {name}", anchor=f"{step} {anchor}" if name != anchor else None)


def report_strace(results: dict, files: int) -> list[str]:
    lines = []
    for key, r in results.get("strace", {}).items():
        sc, req = r["syscalls"], r["requests"]
        total = sum(sc.values())
        top = sorted(sc.items(), key=lambda kv: -kv[1])[:6]
        nreq = sum(req.values())
        per = f", {nreq / files:.1f} req/file" if key.endswith("untar") and nreq else ""
        lines.append(f"{key}: replies(writev)={sc.get('writev', 0)} syscalls={total} "
                     f"top={dict(top)}" + (f" requests={nreq}{per} {req}" if req else ""))
    return lines


def run(args) -> int:
    os.makedirs(args.workdir, exist_ok=True)
    layers = gen_stack.ensure_stack(os.path.join(args.workdir, "stack"), 3, args.files,
                                    seed=1, fmt="overlay")
    tarball = os.path.join(args.workdir, "small10k.tar")
    n_entries = make_tarball(tarball)
    append_list = os.path.join(args.workdir, "append.list")
    pick_append_files(layers, append_list)
    steps = [s for s in STEPS[1:] if s in args.steps]
    if args.before:
        System.before = os.path.abspath(args.before)
        if BEFORE not in args.systems:
            args.systems.append(BEFORE)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    table = benchlib.Table(f"writable union: {args.files}-file stack in 3 layers, "
                           f"{args.rounds} rounds (seconds; ratio vs fuse-overlayfs)")
    results: dict = {}
    with benchlib.scratch_ext4(os.path.join(args.workdir, "scratch"), size="8G") as scratch:
        for r in range(args.rounds):
            one_round(args.systems, layers, scratch, f"r{r}", tarball, append_list, table,
                      results, steps=steps)
        if args.strace:
            one_round([s for s in args.systems if s != "kernel-overlay"], layers, scratch,
                      "strace", tarball, append_list, table, results, strace=True, steps=steps)
    print(table.render())
    for key, reqs in results.get("requests", {}).items():
        if any(reqs):
            total = [sum(r.values()) for r in reqs]
            per = f" ({min(total) / n_entries:.1f} per created entry)" if "untar" in key else ""
            print(f"FUSE requests, {key}: {total}{per} {reqs[0]}")
    for line in report_strace(results, n_entries):
        print(line)
    print(f"entries in each upper: {results.get('upper entries')}")
    for f in results.get("failures", []):
        print(f"FAILED STEP: {f}")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table.as_dict(), **results}, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-writable")
    ap.add_argument("--files", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS + (BEFORE,), default=list(SYSTEMS))
    ap.add_argument("--before", metavar="TREE",
                    help="also run mergefs from this source tree (an older commit's worktree, "
                         "its C module built) as system mergefs-before, in the same rounds")
    ap.add_argument("--steps", nargs="+", choices=STEPS[1:], default=list(STEPS[1:]),
                    help="run only these steps (in the usual order) after the mount")
    ap.add_argument("--strace", action="store_true",
                    help="one more round with strace -c -f on the FUSE servers (counts only)")
    ap.add_argument("--json", help="also write the results here")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
