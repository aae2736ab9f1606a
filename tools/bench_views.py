#!/usr/bin/env python3
"""Benchmark views (one FUSE mount, many views) against the anchors, in one run.

    .venv/bin/python tools/bench_views.py [--workdir DIR] [--views 100] [--mib 300]
        [--readers 8] [--files 100000] [--json OUT] [--skip mount,cache,rss]

Three measurements (root; each anchor measured in the same run):

1. **mount**: add a writable view (control socket round trip) + bind it with
   suid,dev, p50 over ``--views`` views, beside fuse-overlayfs (writable,
   a process per mount), kernel overlayfs, and one mergefs server process per
   mount (``server.start``).
2. **cache**: ``--readers`` writable views of one image each read the same
   ``--mib`` file through a bind of the view (a container's rootfs). Page-cache
   growth, as a multiple of the file size, measured two ways: the distinct
   inodes' resident pages (fincore on the lower file and on one path per
   distinct FUSE inode: exact, not disturbed by other processes) and
   /proc/meminfo ``Cached`` (noisy on a shared machine). Anchors: kernel
   overlayfs (N mounts), fuse-overlayfs and mergefs with a process per mount.
3. **rss**: the views server's RSS after walking (lstat of every entry) one
   view of a ``--files`` image, then after walking all ``--readers`` views.

Nothing is asserted; the ratios are printed (and written as JSON with --json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from mergefs.mountspec import MountSpec  # noqa: E402
from mergefs.union import server  # noqa: E402
from mergefs.union.mountctl import bind, control_call, unbind  # noqa: E402


class ViewsProc:
    """``mergefs views serve`` as a child process."""

    def __init__(self, workdir: str):
        self.mnt = os.path.join(workdir, "views")
        os.makedirs(self.mnt, exist_ok=True)
        self.control = os.path.join(workdir, "views.sock")
        self.log = open(os.path.join(workdir, "views.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mergefs", "views", "serve",
                                      "--control", self.control, self.mnt],
                                     stdout=subprocess.PIPE, stderr=self.log)
        if not self.proc.stdout.readline().startswith(b"serving"):
            raise RuntimeError("the views server did not start (see views.log)")
        self.n = 0

    def add(self, lowers, upper=None, work=None) -> str:
        self.n += 1
        return control_call(self.control, {"op": "add", "name": f"v{self.n}", "spec": {
            "lowers": list(lowers), "upper": upper, "work": work}})["path"]

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if benchlib.is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt])
        self.log.close()


def fresh_dirs(base: str, *names: str) -> list[str]:
    out = []
    for n in names:
        p = os.path.join(base, n)
        shutil.rmtree(p, ignore_errors=True)
        os.makedirs(p)
        out.append(p)
    return out


def make_image(where: str, mib: int) -> list[str]:
    """Two layers: a big file (random, written once) below, a small layer above."""
    l0, l1 = os.path.join(where, "l0"), os.path.join(where, "l1")
    big = os.path.join(l0, "data", "big")
    if not os.path.exists(big) or os.path.getsize(big) != mib << 20:
        os.makedirs(os.path.dirname(big), exist_ok=True)
        block = os.urandom(1 << 20)
        with open(big, "wb") as f:
            for i in range(mib):
                f.write(block[i % 251:] + block[:i % 251])
    os.makedirs(os.path.join(l1, "etc"), exist_ok=True)
    with open(os.path.join(l1, "etc", "motd"), "w") as f:
        f.write("hi\n")
    return [l0, l1]


def umount_all(paths) -> None:
    for p in reversed(list(paths)):
        for cmd in (["umount", p], ["umount", "-l", p]):
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                break


# -- 1. mount latency ---------------------------------------------------------------
def bench_mount(work: str, views: ViewsProc, layers: list[str], n: int, table) -> None:
    t_views = table.series("views: add view + bind (suid,dev)", "s", anchor="fuse-overlayfs mount")
    t_fo = table.series("fuse-overlayfs mount", "s")
    t_k = table.series("kernel overlayfs mount", "s", anchor="fuse-overlayfs mount")
    t_proc = table.series("mergefs: one server process per mount", "s", anchor="fuse-overlayfs mount")
    binds, names = [], []
    try:
        for i in range(n):
            up, wk, tgt = fresh_dirs(os.path.join(work, "m", f"v{i}"), "up", "wk", "rootfs")
            t0 = time.perf_counter()
            path = views.add(layers, up, wk)
            bind(path, tgt, suid_dev=True)
            t_views.add(time.perf_counter() - t0)
            binds.append(tgt)
            names.append(os.path.basename(path))
    finally:
        for t in binds:
            unbind(t)
        for name in names:
            control_call(views.control, {"op": "remove", "name": name})
    lowerdir = ":".join(reversed(layers))
    for i in range(min(n, 20)):
        up, wk, tgt = fresh_dirs(os.path.join(work, "fo", f"{i}"), "up", "wk", "mnt")
        t0 = time.perf_counter()
        subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={lowerdir},upperdir={up},workdir={wk}",
                        tgt], check=True, stderr=subprocess.DEVNULL)
        t_fo.add(time.perf_counter() - t0)
        umount_all([tgt])
        up, wk, tgt = fresh_dirs(os.path.join(work, "ko", f"{i}"), "up", "wk", "mnt")
        t0 = time.perf_counter()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lowerdir},upperdir={up},workdir={wk}", tgt], check=True)
        t_k.add(time.perf_counter() - t0)
        umount_all([tgt])
    for i in range(5):
        up, wk, tgt = fresh_dirs(os.path.join(work, "mp", f"{i}"), "up", "wk", "mnt")
        t0 = time.perf_counter()
        pid = server.start(MountSpec(tuple(layers), up, wk), tgt,
                           log_path=os.path.join(work, "mp.log"))
        t_proc.add(time.perf_counter() - t0)
        server.unmount(tgt)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


# -- 2. page cache ---------------------------------------------------------------------
def resident(path: str) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def cached() -> int:
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("Cached:"))


def read_all(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def cache_growth(system: str, work: str, layers: list[str], readers: int,
                 views: ViewsProc) -> tuple[float, float]:
    """(fincore growth, meminfo growth) in bytes for ``readers`` mounts each reading the file."""
    base = os.path.join(work, "c", system)
    lowerdir = ":".join(reversed(layers))
    mounted, names, pids = [], [], []
    try:
        roots = []
        for i in range(readers):
            up, wk, tgt = fresh_dirs(os.path.join(base, str(i)), "up", "wk", "rootfs")
            if system == "views":
                path = views.add(layers, up, wk)
                names.append(os.path.basename(path))
                bind(path, tgt)
            elif system == "kernel overlayfs":
                subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"lowerdir={lowerdir},upperdir={up},workdir={wk}", tgt], check=True)
            elif system == "fuse-overlayfs":
                subprocess.run(["fuse-overlayfs", "-o",
                                f"lowerdir={lowerdir},upperdir={up},workdir={wk}", tgt], check=True,
                               stderr=subprocess.DEVNULL)
            else:
                pids.append(server.start(MountSpec(tuple(layers), up, wk), tgt,
                                         log_path=os.path.join(work, "mp.log")))
            mounted.append(tgt)
            roots.append(tgt)
        lower = os.path.join(layers[0], "data", "big")
        benchlib.drop_caches()
        before_m = cached()
        for r in roots:
            read_all(os.path.join(r, "data", "big"))
        after_m = cached()
        seen, total = set(), resident(lower)
        for r in roots:
            p = os.path.join(r, "data", "big")
            st = os.stat(p)
            ino = (st.st_dev, st.st_ino)       # one FUSE mount per system: its own st_dev
            if system != "kernel overlayfs" and ino not in seen:   # overlayfs: the lower's pages
                seen.add(ino)
                total += resident(p)
        return total, after_m - before_m
    finally:
        umount_all(mounted)
        for name in names:
            control_call(views.control, {"op": "remove", "name": name})
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def bench_cache(work: str, views: ViewsProc, mib: int, readers: int, table) -> None:
    layers = make_image(os.path.join(work, "cache-image"), mib)
    size = mib << 20
    for system in ("kernel overlayfs", "views", "fuse-overlayfs", "mergefs process per mount"):
        exact, meminfo = cache_growth(system, work, layers, readers, views)
        table.series(f"{system}: page cache growth (fincore) / file", "x",
                     anchor="kernel overlayfs: page cache growth (fincore) / file").add(exact / size)
        table.series(f"{system}: page cache growth (meminfo Cached) / file", "x").add(meminfo / size)


# -- 3. server RSS ------------------------------------------------------------------------
def bench_rss(work: str, files: int, readers: int, table) -> None:
    import gen_stack
    layers = gen_stack.ensure_stack(os.path.join(work, f"stack-{files}"), layers=4, files=files)
    views = ViewsProc(os.path.join(work, "rss"))
    try:
        paths = []
        for i in range(readers):
            up, wk = fresh_dirs(os.path.join(work, "rss", f"u{i}"), "up", "wk")
            paths.append(views.add(layers, up, wk))
        idle = views.rss()
        benchlib.warm_tree(paths[0])
        one = views.rss()
        benchlib.warm_tree(*paths[1:])
        all_ = views.rss()
        table.series("views server RSS idle", "B").add(idle)
        table.series("views server RSS after walking 1 view", "B").add(one)
        table.series(f"views server RSS after walking {readers} views", "B",
                     anchor="views server RSS after walking 1 view").add(all_)
    finally:
        views.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/var/tmp/mergefs-bench-views")
    p.add_argument("--views", type=int, default=100)
    p.add_argument("--mib", type=int, default=300)
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--skip", default="", help="comma separated: mount,cache,rss")
    p.add_argument("--json")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.workdir, exist_ok=True)
    table = benchlib.Table(f"views (load average {os.getloadavg()[0]:.2f} at start)")
    small = make_image(os.path.join(args.workdir, "small-image"), 1)
    views = ViewsProc(args.workdir)
    try:
        if "mount" not in skip:
            bench_mount(args.workdir, views, small, args.views, table)
        if "cache" not in skip:
            bench_cache(args.workdir, views, args.mib, args.readers, table)
    finally:
        views.stop()
    if "rss" not in skip:
        bench_rss(args.workdir, args.files, args.readers, table)
    print(table.render())
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table.as_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
