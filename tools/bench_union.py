#!/usr/bin/env python3
"""Benchmark the live union (mergefs mount) beside kernel overlayfs and fuse-overlayfs.

    sudo .venv/bin/python tools/bench_union.py [--files 100000 --layers 8 --runs 3]

The stack is tools/gen_stack.py's (overlay format, reused from --workdir when
its stack.json matches) plus one layer holding a --big-mib file. Each run
mounts every system afresh and measures, in this order:

* mount-to-first-ls: caches dropped, from starting the mount to ``ls`` done;
* find cold / warm: ``find MNT -printf ''`` after dropping caches, then again;
* tar cold / warm: ``tar cf - . | wc -c`` in MNT, same;
* read cold / warm: ``cat MNT/big.bin > /dev/null`` (sequential), same;
* server RSS after the walk (VmRSS of the FUSE server; kernel has none).

``--distro DIR`` measures a real tree instead: ``debootstrap --variant=minbase``
(made once) split into 3 layers (usr minus usr/share, usr/share, the rest).

``mergefs`` is the server with real opens (MERGEFS_NO_OPEN=0: stock pyfuse3
behaviour); ``mergefs-noopen`` runs with the pyfuse3 built by
tools/pyfuse3_inode_fh.py (what tools/bootstrap.sh installs): read-only mounts
answer open/opendir with ENOSYS and the kernel caches pages and listings.
Other processes dropping caches during a run make "warm" rows cold: the
request counts printed at the end show it (reads in a warm phase).

For mergefs it also records the FUSE requests of each warm phase (the server
logs its counters on SIGUSR1), which is how the caching levers are verified.
Ratios: cold rows against fuse-overlayfs, warm rows and mount against kernel
overlayfs, all medians of the same run. Nothing is asserted.
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
import gen_stack  # noqa: E402
from pyfuse3_inode_fh import build as build_inode_fh_pyfuse3  # noqa: E402

from mergefs.mountspec import MountSpec  # noqa: E402
from mergefs.union import server  # noqa: E402

SYSTEMS = ("kernel-overlay", "fuse-overlayfs", "mergefs", "mergefs-noopen")
DISTRO_SPLIT = (("l0", ["--exclude=usr/share", "usr"]), ("l1", ["usr/share"]),
                ("l2", ["--exclude=./usr", "."]))


def distro_layers(where: str) -> list[str]:
    """A Debian minbase tree (debootstrap, made once) split into 3 layers:
    usr without usr/share, usr/share, and everything else. Bottom first."""
    rootfs = os.path.join(where, "rootfs")
    if not os.path.isdir(os.path.join(rootfs, "usr")):
        os.makedirs(where, exist_ok=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", rootfs],
                       check=True, stdout=subprocess.DEVNULL)
    out = []
    for name, selection in DISTRO_SPLIT:
        layer = os.path.join(where, name)
        if not os.path.isdir(layer):
            os.makedirs(layer + ".tmp", exist_ok=True)
            subprocess.run(["bash", "-o", "pipefail", "-c",
                            f"tar -C {rootfs} -cf - {' '.join(selection)} | "
                            f"tar -C {layer}.tmp -xpf -"], check=True)
            os.rename(layer + ".tmp", layer)
        out.append(layer)
    return out


def big_layer(workdir: str, mib: int) -> str:
    layer = os.path.join(workdir, "big")
    path = os.path.join(layer, "big.bin")
    if not os.path.exists(path) or os.path.getsize(path) != mib << 20:
        os.makedirs(layer, exist_ok=True)
        chunk = os.urandom(1 << 20)
        with open(path + ".tmp", "wb") as f:
            for _ in range(mib):
                f.write(chunk)
        os.rename(path + ".tmp", path)
    return layer


class Mounted:
    """One system mounted at ``mnt``; ``pid`` is its server (None for the kernel)."""

    def __init__(self, system: str, layers: list[str], mnt: str, log: str, patched: str = ""):
        self.system, self.layers, self.mnt, self.log = system, layers, mnt, log
        self.patched = patched
        self.pid = None

    def mount(self) -> None:
        lowerdir = ":".join(reversed(self.layers))
        if self.system == "kernel-overlay":
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}",
                            self.mnt], check=True)
        elif self.system == "fuse-overlayfs":
            subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={lowerdir}", self.mnt], check=True)
            self.pid = find_server_pid("fuse-overlayfs", self.mnt)
        elif self.system == "mergefs-noopen":
            # a fresh interpreter that imports the patched pyfuse3 (PYTHONPATH)
            env = dict(os.environ, PYTHONPATH=self.patched)
            subprocess.run([sys.executable, "-m", "mergefs", "mount", "--log", self.log,
                            *self.layers, self.mnt], check=True, env=env)
            self.pid = find_server_pid(os.path.basename(sys.executable), self.mnt,
                                       contains=b"mount")
        else:   # real opens (stock behaviour), whichever pyfuse3 is installed
            os.environ["MERGEFS_NO_OPEN"] = "0"
            try:
                self.pid = server.start(MountSpec(tuple(self.layers)), self.mnt, log_path=self.log)
            finally:
                del os.environ["MERGEFS_NO_OPEN"]

    def umount(self) -> None:
        for cmd in (["umount", self.mnt], ["umount", "-l", self.mnt]):
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                break
        if self.pid:
            deadline = time.monotonic() + 5
            while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
                try:
                    os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.05)

    def rss(self) -> int | None:
        if not self.pid:
            return None
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return None

    def requests(self) -> dict:
        """mergefs only: the request counts since the last call (via SIGUSR1 + log)."""
        if not self.system.startswith("mergefs"):
            return {}
        return benchlib.server_requests(self.pid, self.log)



def find_server_pid(program: str, mnt: str, contains: bytes = b"") -> int | None:
    """The daemon serving ``mnt`` (read from /proc; nothing is signalled)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and os.path.basename(args[0]) == program.encode() and mnt.encode() in args \
                and (not contains or contains in args):
            return int(pid)
    return None


def sh(cmd: str, cwd: str | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(m: Mounted, table: benchlib.Table, requests: dict) -> None:
    name = m.system
    warm_anchor, cold_anchor = "kernel-overlay", "fuse-overlayfs"

    def row(what, anchor):
        return table.series(f"{what} {name}", anchor=f"{what} {anchor}" if name != anchor else None)

    benchlib.drop_caches()
    t0 = time.perf_counter()
    m.mount()
    os.listdir(m.mnt)
    row("mount-to-first-ls", warm_anchor).add(time.perf_counter() - t0)
    phases = [("find", f"find {m.mnt} -printf ''", None), ("tar", "tar cf - . | wc -c", m.mnt)]
    if os.path.exists(os.path.join(m.mnt, "big.bin")):
        phases.append(("read-512MiB", f"cat {m.mnt}/big.bin > /dev/null", None))
    for what, cmd, cwd in phases:
        benchlib.drop_caches()
        row(f"{what} cold", cold_anchor).add(sh(cmd, cwd))
        m.requests()
        row(f"{what} warm", warm_anchor).add(sh(cmd, cwd))
        for k, v in m.requests().items():
            requests.setdefault(f"{name} {what} warm", {}).setdefault(k, []).append(v)
        if what == "tar":
            rss = m.rss()
            if rss is not None:
                table.series(f"server RSS after walk {name}", unit="B").add(rss)


def run(args) -> int:
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.perf_counter()
    if args.distro:
        layers = distro_layers(args.distro)
        title = f"union mount: Debian minbase in 3 layers ({args.distro}), {args.runs} runs"
    else:
        layers = gen_stack.ensure_stack(os.path.join(args.workdir, "stack"), args.layers,
                                        args.files, seed=1, fmt="overlay")
        layers.append(big_layer(args.workdir, args.big_mib))
        title = (f"union mount: {args.files} files, {args.layers} layers + "
                 f"{args.big_mib} MiB file, {args.runs} runs (seconds)")
    print(f"stack ready in {time.perf_counter() - t0:.1f}s: {len(layers)} layers", flush=True)
    table = benchlib.Table(title)
    requests: dict = {}
    patched = ""
    if "mergefs-noopen" in args.systems:
        patched = build_inode_fh_pyfuse3(os.path.join(args.workdir, "pyfuse3-inode-fh"))
    for run_no in range(args.runs):
        for system in args.systems:
            mnt = os.path.join(args.workdir, f"mnt-{system}")
            os.makedirs(mnt, exist_ok=True)
            m = Mounted(system, layers, mnt, os.path.join(args.workdir, f"{system}.log"), patched)
            try:
                measure(m, table, requests)
            finally:
                m.umount()
            print(f"run {run_no + 1}: {system} done", flush=True)
    print(table.render())
    for phase, counts in requests.items():
        print(f"FUSE requests, {phase} (per run): " +
              ", ".join(f"{k}={sorted(v)[len(v) // 2]}" for k, v in sorted(counts.items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table.as_dict(), "requests": requests}, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mergefs-bench-union")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--big-mib", type=int, default=512)
    ap.add_argument("--distro", metavar="DIR", help="instead: a Debian minbase tree in 3 layers "
                    "(debootstrap into DIR/rootfs once, split into DIR/l0..l2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--build-inode-fh-pyfuse3", metavar="DIR",
                    help="only build the no-open pyfuse3 into DIR (use with PYTHONPATH=DIR)")
    args = ap.parse_args(argv)
    if args.build_inode_fh_pyfuse3:
        print(build_inode_fh_pyfuse3(args.build_inode_fh_pyfuse3))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
