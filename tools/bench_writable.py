#!/usr/bin/env python3
"""Benchmark writable unions: mergefs beside kernel overlayfs and fuse-overlayfs.

    sudo .venv/bin/python tools/bench_writable.py [--files 30000 --rounds 2 --strace]

The lowers are tools/gen_stack.py's stack (3 layers, overlay format, ~34k
entries; reused from --workdir when its stack.json matches). Uppers and work
dirs live on a fresh journaled ext4 (benchlib.scratch_ext4), a new pair per
system and round. Each round mounts every system afresh (caches dropped
first; odd rounds take the systems in reverse order, so a position effect
such as the slowdown of the system run right after fuse-overlayfs evens out
over an even number of rounds) and times these steps, in this order, on the
same mount:

1. ``mount``: from starting the mount command to the first ``ls`` done
   (mergefs: the standalone CLI, ``python -m mergefs mount --upper ...``;
   mergefs-service: the fuse-overlayfs form with ``service=SOCK`` through
   the lean mount program of ``mergefs views install-program``, to a
   ``mergefs mount-server`` started once for the run, which forks a warm
   server per mount: how podman runs it with ``mountopt = "service=..."``);
2. ``untar``: ``tar -xf`` of 10k small files (100 dirs, with a ``./`` member)
   into the mount root; tar's exit status is recorded (non-zero is a bug);
3. ``find``: ``find MNT`` of everything;
4. ``append``: append one byte to 2,000 lower files (copy-up), a bash loop of
   builtins (no process per file);
5. ``rm``: ``rm -rf`` of 3 lower subtrees (``opt``, ``run``, ``srv``);
6. ``tar-c``: ``tar -cf - . | cat > /dev/null`` in the mount (reads every file);
7. ``dpkg``: on a second mount (caches dropped first) of other lowers, a Debian
   minbase-like root in 3 layers built from this host's installed packages
   (``debian_layers``: no mirror, no debootstrap), ``chroot MNT dpkg -i`` of
   perl's .debs: perl, perl-modules, libperl, the two gdbm libraries minbase
   lacks and perl-base at perl's version (an upgrade: minbase has perl-base,
   not perl), as apt resolves them now, fetched once with ``apt-get download``
   into WORKDIR/debs (``dpkg_debs``; if apt cannot, one "FAILED STEP: dpkg: not
   run, ..." line and the other steps run). The host's /dev and the .debs'
   directory (read-only, at /mnt) are bind-mounted into the mount for the step
   (nothing of them reaches the upper). Afterwards dpkg must say perl is
   installed, and each upper is compared with the kernel's, path by path.

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
one wrote for the same work (for ``dpkg``, also which paths differ from the
kernel's upper, whiteouts counted apart). Nothing is asserted; the load
average is printed; the exit status is 1 if a step failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402
import gen_stack  # noqa: E402

SYSTEMS = ("kernel-overlay", "fuse-overlayfs", "mergefs", "mergefs-service")
BEFORE = "mergefs-before"        # with --before TREE
SERVICE = "mergefs-service"
STEPS = ("mount", "untar", "find", "append", "rm", "tar-c", "dpkg")
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


# -- the dpkg step: a 3-layer Debian minbase and perl's .debs ----------------------
DPKG_TARGET = "perl"
DEBIAN_LAYERS = 3
DPKG_CMD = "dpkg -i /mnt/*.deb"         # in the chroot, the .debs bound read-only at /mnt


class DebsUnavailable(RuntimeError):
    """apt could not fetch the .debs of the dpkg step (the message is one line)."""


def debian_layers(where: str) -> list[str]:
    """A Debian minbase-like root (benchlib: this host's minbase packages, no mirror)
    in DEBIAN_LAYERS layers, bottom first. The packages, sorted by name, are cut
    into runs of about equal file counts, one run per layer; a layer holds its
    packages' files (their directories included), var/lib/dpkg with the status
    of every package up to it and the info files of its own, as an image built
    by one ``dpkg -i`` per layer would; the bottom one also has what no package
    owns (usrmerge links, /tmp, /dev, /mnt, ..., a root-only /etc/passwd). Reused when
    ``where``/layers.json lists the same packages at the same versions."""
    pkgs = benchlib.minbase_packages()
    versions = benchlib.installed_packages()
    made = [f"{p}={versions[p][2]}" for p in pkgs]
    paths = [os.path.join(where, f"l{k}") for k in range(DEBIAN_LAYERS)]
    meta = os.path.join(where, "layers.json")
    if os.path.exists(meta):
        with open(meta) as f:
            if json.load(f) == made:
                return paths
    os.makedirs(where, exist_ok=True)
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    files = {p: benchlib.package_files([p]) for p in pkgs}
    total, done = sum(len(f) for f in files.values()), 0
    groups: list[list[str]] = [[] for _ in paths]
    for p in pkgs:
        groups[min(DEBIAN_LAYERS - 1, done * DEBIAN_LAYERS // total)].append(p)
        done += len(files[p])
    for k, (path, group) in enumerate(zip(paths, groups)):
        os.makedirs(path)
        benchlib.copy_host_files(sorted({f for p in group for f in files[p]}), path,
                                 path + ".files")
        if k == 0:
            benchlib.minbase_skeleton(path)
        benchlib.dpkg_database(path, [p for g in groups[:k + 1] for p in g], group)
    with open(meta, "w") as f:
        json.dump(made, f)
    return paths


def _apt_depends(pkgs: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    """{package: [(dependency, exact version or None)]} of apt's candidates."""
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", *pkgs], capture_output=True,
                         text=True, check=True).stdout
    deps: dict[str, list[tuple[str, str | None]]] = {}
    for para in out.split("\n\n"):
        fields = dict(ln.split(": ", 1) for ln in para.splitlines() if ": " in ln
                      and not ln.startswith(" "))
        if "Package" not in fields:
            continue
        got = deps.setdefault(fields["Package"], [])
        for dep in ", ".join(filter(None, (fields.get("Pre-Depends"),
                                           fields.get("Depends")))).split(","):
            m = re.match(r"\s*([^\s(:|]+)(?::\S+)?(?:\s*\(=\s*([^)\s]+)\))?", dep)
            if m and "|" not in dep:
                got.append((m.group(1), m.group(2)))
    return deps


def dpkg_debs(cache: str, image: list[str]) -> list[str]:
    """The .debs of DPKG_TARGET and of what it needs that ``image`` (package names,
    at the host's versions) lacks, as apt resolves them now: the packages of its
    Depends/Pre-Depends closure not in the image, and the image's packages a
    needed one wants at exactly another version (perl wants perl-base at its own
    version: an upgrade). Fetched once with ``apt-get download`` into ``cache``
    (``apt-get update`` first if that fails); DebsUnavailable if apt cannot."""
    listing = os.path.join(cache, "debs.json")
    if os.path.exists(listing):
        with open(listing) as f:
            debs = json.load(f)
        if all(os.path.exists(d) for d in debs):
            return debs
    os.makedirs(cache, exist_ok=True)
    installed = benchlib.installed_packages()
    inside = set(image)
    try:
        closure = subprocess.run(
            ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
             "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", DPKG_TARGET],
            capture_output=True, text=True, check=True).stdout
        names = [ln.strip() for ln in closure.splitlines()
                 if ln and not ln.startswith((" ", "<"))]
        deps = _apt_depends(names)
    except subprocess.CalledProcessError as e:
        last = " ".join((e.stderr or "").strip().splitlines()[-1:])
        raise DebsUnavailable(f"apt-cache knows no {DPKG_TARGET}: {last}") from None
    need = {p for p in names if p not in inside}
    while True:
        more = {d for p in need for d, exact in deps.get(p, ())
                if exact and d in inside and d not in need and installed[d][2] != exact}
        if not more:
            break
        need |= more
    for p in sorted(need):
        for old in os.listdir(cache):
            if old.startswith(p + "_"):
                os.unlink(os.path.join(cache, old))
    err = ""
    for update in (False, True):
        if update:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        r = subprocess.run(["apt-get", "download", "-q", *sorted(need)], cwd=cache,
                           capture_output=True, text=True)
        if r.returncode == 0:
            break
        err = " ".join(r.stderr.strip().splitlines()[-1:])
    else:
        raise DebsUnavailable(f"apt-get download {' '.join(sorted(need))} failed: {err}")
    debs = sorted(os.path.join(cache, n) for n in os.listdir(cache)
                  if n.endswith(".deb") and n.split("_", 1)[0] in need)
    with open(listing, "w") as f:
        json.dump(debs, f)
    return debs


@contextlib.contextmanager
def chroot_binds(mnt: str, debs: list[str]):
    """The host's /dev at MNT/dev and the .debs' directory read-only at MNT/mnt while
    the block runs (bind mounts: nothing of them reaches the upper, and device
    nodes open whatever the union's nodev)."""
    done: list[str] = []
    try:
        for src, dst, opts in (("/dev", "dev", []),
                               (os.path.dirname(debs[0]), "mnt", ["-o", "ro"])):
            target = os.path.join(mnt, dst)
            subprocess.run(["mount", "--bind", *opts, src, target], check=True)
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            benchlib.unmount(target)


def dpkg_command(mnt: str) -> str:
    return (f"chroot {mnt} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C "
            f"DEBIAN_FRONTEND=noninteractive /bin/sh -c '{DPKG_CMD}'")


def dpkg_installed(mnt: str) -> str:
    """dpkg's status of DPKG_TARGET in the mount ("install ok installed" after the step)."""
    return subprocess.run(["dpkg-query", f"--admindir={mnt}/var/lib/dpkg", "-W", "-f",
                           "${Status}", DPKG_TARGET], capture_output=True, text=True).stdout


class System:
    before: str | None = None       # --before TREE: the source tree "mergefs-before" runs
    service = None                  # the mount server (testing.services.MountService)
    program: str | None = None      # its lean mount program

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
        elif self.name == SERVICE:
            from mergefs.union.server import default_log_path
            self.log = default_log_path(self.mnt)    # where a forked server logs (/run/mergefs)
            subprocess.run([self.program, "-o", f"{opts},service={self.service.control}",
                            self.mnt], check=True)
            self.pid = served_by(str(self.service.log), self.mnt)
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
        if self.name == SERVICE:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log)

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


def served_by(log: str, mnt: str, timeout: float = 5.0) -> int | None:
    """The pid of the server the mount service forked for ``mnt``: it logs
    "mounted MNT (server PID)" once the mount command has its answer."""
    pattern = re.compile(rf"mounted {re.escape(mnt)} \(server (\d+)\)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log) as f:
            found = pattern.findall(f.read())
        if found:
            return int(found[-1])
        time.sleep(0.01)
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
              strace: bool = False, steps=STEPS[1:], debian=None) -> None:
    """Each system in turn: a mount of the stack and ``steps`` on it, then (step
    ``dpkg``, ``debian`` = (its layers, its .debs)) a mount of the Debian layers."""
    for name in names:
        if [st for st in steps if st != "dpkg"]:
            stack_round(name, layers, scratch, tag, tarball, append_list, table, results,
                        strace, steps)
        if "dpkg" in steps and debian:
            dpkg_round(name, *debian, scratch, tag, table, results, strace)
        print(f"{tag}: {name} done", flush=True)


def stack_round(name, layers, scratch, tag, tarball, append_list, table, results, strace,
                steps) -> None:
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
            if step != "dpkg":
                timed_step(s, step, cmds[step], scratch, tag, table, results, strace)
    finally:
        s.umount()
    results.setdefault("upper entries", {}).setdefault(name, []).append(
        len(upper_entries(s.upper)))


def dpkg_round(name, layers, debs, scratch, tag, table, results, strace) -> None:
    """``dpkg -i`` of the .debs in a chroot on a fresh writable mount of the Debian
    layers; a failure if dpkg then does not say DPKG_TARGET is installed."""
    s = System(name, layers, os.path.join(scratch, f"{tag}-{name}-dpkg"),
               os.path.join(scratch, f"{tag}-{name}-dpkg.log"))
    benchlib.drop_caches()
    try:
        s.mount()
        os.listdir(s.mnt)
        s.requests()
        with chroot_binds(s.mnt, debs):
            timed_step(s, "dpkg", (dpkg_command(s.mnt), "/"), scratch, tag, table, results,
                       strace)
        status = dpkg_installed(s.mnt)
        if status != "install ok installed":
            results.setdefault("failures", []).append(
                f"{tag} {name} dpkg: {DPKG_TARGET} is {status!r} afterwards")
    finally:
        s.umount()
    entries = upper_entries(s.upper)
    results.setdefault("dpkg upper entries", {}).setdefault(name, []).append(len(entries))
    results.setdefault("dpkg uppers", {})[name] = (entries, whiteouts(s.upper, entries))


def upper_entries(upper: str) -> set[str]:
    """Every path below ``upper`` (relative), the entries a system wrote."""
    return {os.path.relpath(os.path.join(d, n), upper)
            for d, dirs, files in os.walk(upper) for n in dirs + files}


def whiteouts(upper: str, entries: set[str]) -> set[str]:
    """The entries of ``upper`` that hide a name: 0/0 character devices (overlay
    format) and ``.wh.`` files (what fuse-overlayfs writes where it cannot mknod)."""
    out = set()
    for rel in entries:
        st = os.lstat(os.path.join(upper, rel))
        if os.path.basename(rel).startswith(".wh.") or (stat.S_ISCHR(st.st_mode)
                                                        and st.st_rdev == 0):
            out.add(rel)
    return out


def timed_step(s: System, step: str, cmd: tuple[str, str], scratch, tag, table, results,
               strace) -> None:
    name = s.name
    tracer = Strace(s.pid, os.path.join(scratch, f"{tag}-{name}-{step}.strace")) \
        if strace and s.pid else None
    cpu0 = s.cpu()
    seconds, rc, err = run_step(*cmd)
    cpu = s.cpu() - cpu0
    sys_counts = tracer.stop() if tracer else {}
    req = s.requests()
    if rc != 0:
        results.setdefault("failures", []).append(f"{tag} {name} {step}: exit {rc} {err}")
    if strace:
        results.setdefault("strace", {})[f"{name} {step}"] = {
            "syscalls": sys_counts, "requests": req}
    else:
        table_row(table, step, name).add(seconds)
        if s.pid:
            table_row(table, f"{step} server-cpu", name).add(cpu)
        results.setdefault("requests", {}).setdefault(f"{name} {step}", []).append(req)


def report_uppers(results: dict) -> list[str]:
    """The dpkg step's uppers against the kernel's (last round): what each wrote more or less."""
    uppers = results.get("dpkg uppers", {})
    kernel = uppers.get("kernel-overlay", (None,))[0]
    lines = []
    for name, (entries, hiding) in uppers.items():
        if kernel is None or name == "kernel-overlay":
            continue
        more, less = sorted(entries - kernel), sorted(kernel - entries)
        wh = len(set(more) & hiding)
        lines.append(f"dpkg upper of {name} against kernel-overlay's: {len(more)} more "
                     f"({wh} of them whiteouts) {more[:4]}, {len(less)} fewer {less[:4]}")
    return lines


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
    steps = [s for s in STEPS[1:] if s in args.steps]
    layers = tarball = append_list = None
    n_entries = 0
    if [s for s in steps if s != "dpkg"]:
        layers = gen_stack.ensure_stack(os.path.join(args.workdir, "stack"), 3, args.files,
                                        seed=1, fmt="overlay")
        tarball = os.path.join(args.workdir, "small10k.tar")
        n_entries = make_tarball(tarball)
        append_list = os.path.join(args.workdir, "append.list")
        pick_append_files(layers, append_list)
    debian, failed = None, []
    if "dpkg" in steps:
        deb_layers = debian_layers(os.path.join(args.workdir, "debian"))
        try:
            debs = dpkg_debs(os.path.join(args.workdir, "debs"), benchlib.minbase_packages())
            debian = (deb_layers, debs)
            print(f"dpkg step: {len(debs)} .debs ({' '.join(map(os.path.basename, debs))}) "
                  f"into a {DEBIAN_LAYERS}-layer minbase "
                  f"({sum(len(upper_entries(lp)) for lp in deb_layers)} entries)", flush=True)
        except DebsUnavailable as e:
            failed.append(f"dpkg: not run, {e}")
            print(f"FAILED STEP: {failed[-1]}", flush=True)
    if args.before:
        System.before = os.path.abspath(args.before)
        if BEFORE not in args.systems:
            args.systems.append(BEFORE)
    with contextlib.ExitStack() as stack:
        if SERVICE in args.systems:
            from pathlib import Path
            from mergefs.testing.services import MountService, program
            where = Path(args.workdir, "service")
            shutil.rmtree(where, ignore_errors=True)
            System.service = MountService("fork", where)
            stack.callback(System.service.stop)
            System.program = program(where)
        return rounds(args, steps, layers, tarball, append_list, n_entries, debian, failed)


def rounds(args, steps, layers, tarball, append_list, n_entries, debian, failed) -> int:
    print(f"load average at start: {os.getloadavg()}", flush=True)
    table = benchlib.Table(f"writable union: {args.files}-file stack in 3 layers, "
                           f"{args.rounds} rounds (seconds; ratio vs fuse-overlayfs)")
    results: dict = {"failures": failed}
    with benchlib.scratch_ext4(os.path.join(args.workdir, "scratch"), size="8G") as scratch:
        for r in range(args.rounds):
            # odd rounds run the systems in reverse (ABBA): a system measures slower
            # right after fuse-overlayfs, so a fixed order favoured whoever came first
            order = args.systems[::-1] if r % 2 else args.systems
            one_round(order, layers, scratch, f"r{r}", tarball, append_list, table,
                      results, steps=steps, debian=debian)
        if args.strace:
            one_round([s for s in args.systems if s != "kernel-overlay"], layers, scratch,
                      "strace", tarball, append_list, table, results, strace=True, steps=steps,
                      debian=debian)
    print(table.render())
    for key, reqs in results.get("requests", {}).items():
        if any(reqs):
            total = [sum(r.values()) for r in reqs]
            per = f" ({min(total) / n_entries:.1f} per created entry)" if "untar" in key else ""
            print(f"FUSE requests, {key}: {total}{per} {reqs[0]}")
            if not any(k.startswith("fast_") for r in reqs for k in r):
                # (a checkout that moved since tools/bootstrap.sh serves in Python)
                print(f"WARNING: {key.split()[0]} served without its C fast path: "
                      "is its module stale? (its mount log says; tools/bootstrap.sh)")
    for line in report_strace(results, n_entries) + report_uppers(results):
        print(line)
    for key in ("upper entries", "dpkg upper entries"):
        if key in results:
            print(f"{key}: {results[key]}")
    for f in results.get("failures", []):
        print(f"FAILED STEP: {f}")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table.as_dict(),
                       **{k: v for k, v in results.items() if k != "dpkg uppers"}}, f, indent=1)
    return 1 if results["failures"] else 0


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
