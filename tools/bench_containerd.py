#!/usr/bin/env python3
"""Benchmark containerd 1.6 with `mergefs serve` against its own overlayfs snapshotter.

A private containerd (root, state, socket under a temp dir) with
``[proxy_plugins.mergefs]`` pointing at a private service. The image is built
offline: busybox-static plus LAYERS layers of FILES small files each (umoci).
Measured, each in a fresh containerd namespace so every round unpacks:
``ctr images import`` and ``ctr run --rm IMAGE ID /bin/true``, with
``--snapshotter mergefs`` and ``--snapshotter overlayfs`` (the anchor),
interleaved round by round. The service logs at debug level; the Commit
request times it logs are summarised (one Commit per layer per import).

    tools/bench_containerd.py [--rounds 5] [--layers 4] [--files 500]
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

IMAGE = "docker.io/library/mergefs-bench:t"


def layer_tar(members: list[tuple[str, bytes | None, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, mode in members:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = 1_600_000_000, mode
            if data is None:
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            elif isinstance(data, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def build_image(where: str, layers: int, files: int) -> str:
    base = [("bin", None, 0o755), ("bin/busybox", open("/bin/busybox", "rb").read(), 0o755)]
    base += [(f"bin/{a}", "busybox", 0o777) for a in ("sh", "true", "cat", "ls")]
    base += [(d, None, 0o755) for d in ("proc", "sys", "dev", "tmp", "etc")]
    tars = [layer_tar(base)]
    for i in range(layers):
        tars.append(layer_tar([(f"d{i}", None, 0o755)] +
                              [(f"d{i}/f{j}", b"x" * 512, 0o644) for j in range(files)]))
    layout = os.path.join(where, "layout")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:t")
    for i, data in enumerate(tars):
        p = os.path.join(where, f"l{i}.tar")
        with open(p, "wb") as f:
            f.write(data)
        run("umoci", "raw", "add-layer", "--image", f"{layout}:t", p)
    archive = os.path.join(where, "image.tar")
    run("tar", "-C", layout, "-cf", archive, ".")
    return archive


def run(*argv, env=None) -> None:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"bench_containerd: {argv}: {r.stderr.strip()}")


def wait_socket(path: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_containerd: {what} exited {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench_containerd: {what} did not listen on {path}")


def commit_times(log_path: str) -> list[float]:
    """Milliseconds of each Commit the service logged (``commit('NAME', 'KEY'): X ms``)."""
    pat = re.compile(r"commit\(.*\): ([0-9.]+) ms")
    with open(log_path, errors="replace") as f:
        return [float(m.group(1)) for line in f if (m := pat.search(line))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--files", type=int, default=500)
    args = ap.parse_args(argv)
    base = tempfile.mkdtemp(prefix="mfcd-", dir="/tmp")
    svc_sock, cd_sock = f"{base}/run/mergefs.sock", f"{base}/containerd.sock"
    procs: list[subprocess.Popen] = []
    table = benchlib.Table(f"containerd 1.6: {args.layers} layers x {args.files} files "
                           f"(load average {os.getloadavg()[0]:.2f} at start)")
    try:
        archive = build_image(base, args.layers, args.files)
        svc_log = f"{base}/service.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "mergefs", "serve", "--root",
                                       f"{base}/store", "--socket", svc_sock, "--log-level",
                                       "debug"], stderr=open(svc_log, "wb")))
        wait_socket(svc_sock, procs[-1], "mergefs serve")
        with open(f"{base}/config.toml", "w") as f:
            f.write(f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{cd_sock}"\n'
                    f'[ttrpc]\n  address = "{base}/containerd.ttrpc.sock"\n'
                    f'[proxy_plugins.mergefs]\n  type = "snapshot"\n  address = "{svc_sock}"\n')
        procs.append(subprocess.Popen(["containerd", "--config", f"{base}/config.toml"],
                                      stderr=open(f"{base}/containerd.log", "wb")))
        wait_socket(cd_sock, procs[-1], "containerd")
        series = {}
        for sn in ("overlayfs", "mergefs"):
            series[sn] = (
                table.series(f"ctr images import ({sn})", "s",
                             anchor=None if sn == "overlayfs" else "ctr images import (overlayfs)"),
                table.series(f"ctr run --rm ({sn})", "s",
                             anchor=None if sn == "overlayfs" else "ctr run --rm (overlayfs)"))
        for i in range(args.rounds):
            for sn in ("overlayfs", "mergefs") if i % 2 == 0 else ("mergefs", "overlayfs"):
                imp, runs = series[sn]
                ctr = ["ctr", "--address", cd_sock, "-n", f"{sn}{i}"]
                t0 = time.perf_counter()
                run(*ctr, "images", "import", "--snapshotter", sn, "--base-name",
                    IMAGE.rsplit(":", 1)[0], archive)
                imp.add(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run(*ctr, "run", "--rm", "--snapshotter", sn, IMAGE, f"c{i}", "/bin/true")
                runs.add(time.perf_counter() - t0)
        commits = table.series("mergefs Commit request, per layer", "s")
        for ms in commit_times(svc_log):
            commits.add(ms / 1e3)
        print(table.render())
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        with open("/proc/self/mounts") as f:
            left = [line.split()[1] for line in f if line.split()[1].startswith(base + "/")]
        for m in sorted(left, key=len, reverse=True):
            benchlib.unmount(m)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
