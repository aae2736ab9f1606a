#!/usr/bin/env python3
"""Benchmark `mergefs serve` as containerd uses it: Prepare (gRPC) + mount of the answer.

One run starts a private service, commits an image of LAYERS layers through the
gRPC API, then times N rounds of ``Prepare(key, parent)`` + mounting the mounts it
returns (a bind of a view, or ``mount.fuse3`` in --mounts fuse), and separately
``Mounts(key)`` alone. Anchors measured in the same run over the same layer
directories: a kernel overlayfs mount and a fuse-overlayfs mount. Every mount is
unmounted and every key removed before the next round's numbers are printed.

    tools/bench_service.py [--rounds 100] [--layers 4] [--files 200] [--mounts views|fuse]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # noqa: E402


def start_service(base: str, mounts: str) -> subprocess.Popen:
    sock = os.path.join(base, "run", "mergefs.sock")
    proc = subprocess.Popen([sys.executable, "-m", "mergefs", "serve", "--root",
                             os.path.join(base, "store"), "--socket", sock, "--mounts", mounts,
                             "--log-level", "warning"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("bench_service: the service did not start")


def mount(mounts, target: str) -> None:
    for m in mounts:
        if m.type == "bind":
            subprocess.run(["mount", "--bind", m.source, target], check=True)
        else:
            helper, _, subtype = m.type.partition(".")
            subprocess.run([f"mount.{helper}", m.source, target, "-o", ",".join(m.options),
                            "-t", subtype], check=True)


def commit_image(stub, pb, base: str, layers: int, files: int) -> tuple[str, list[str]]:
    """LAYERS committed snapshots of FILES small files each; their layer dirs, bottom first."""
    parent = ""
    for i in range(layers):
        key, name = f"img-{i}-active", f"img-{i}"
        ms = stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent)).mounts
        mnt = os.path.join(base, "fill")
        os.makedirs(mnt, exist_ok=True)
        mount(ms, mnt)
        try:
            d = os.path.join(mnt, f"dir{i}")
            os.makedirs(d, exist_ok=True)
            for j in range(files):
                with open(os.path.join(d, f"f{j}"), "wb") as f:
                    f.write(b"x" * 100)
        finally:
            benchlib.unmount(mnt)
        stub.Commit(pb.CommitSnapshotRequest(name=name, key=key))
        parent = name
    from snapshotter.api import Snapshotter
    with Snapshotter(os.path.join(base, "store"), reconcile=False) as sn:
        lowers = list(sn.mounts(parent).lowers)
    return parent, lowers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--mounts", choices=("views", "fuse"), default="views")
    args = ap.parse_args(argv)
    import grpc
    from snapshotter.serve._proto import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc

    base = tempfile.mkdtemp(prefix="mfbench-", dir="/tmp")
    proc = start_service(base, args.mounts)
    table = benchlib.Table(f"mergefs serve, {args.layers} layers x {args.files} files, "
                           f"{args.mounts} (load average {os.getloadavg()[0]:.2f} at start)")
    try:
        stub = pb_grpc.SnapshotsStub(grpc.insecure_channel(
            "unix:" + os.path.join(base, "run", "mergefs.sock")))
        parent, lowers = commit_image(stub, pb, base, args.layers, args.files)
        mnt = os.path.join(base, "mnt")
        os.makedirs(mnt)
        overlay = table.series("kernel overlayfs mount", "ms")
        fo = table.series("fuse-overlayfs mount", "ms")
        prep = table.series("Prepare + mount (mergefs)", "ms", anchor="fuse-overlayfs mount")
        only = table.series("Mounts alone (gRPC)", "ms")
        for i in range(args.rounds):
            up, wk = os.path.join(base, f"u{i}"), os.path.join(base, f"w{i}")
            os.makedirs(up)
            os.makedirs(wk)
            opts = f"lowerdir={':'.join(reversed(lowers))},upperdir={up},workdir={wk}"
            for series, argv in ((overlay, ["mount", "-t", "overlay", "overlay", "-o", opts, mnt]),
                                 (fo, ["fuse-overlayfs", "-o", opts, mnt])):
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, stderr=subprocess.DEVNULL)
                series.add((time.perf_counter() - t0) * 1e3)
                benchlib.unmount(mnt)
            key = f"bench-{i}"
            t0 = time.perf_counter()
            ms = stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent)).mounts
            mount(ms, mnt)
            prep.add((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            stub.Mounts(pb.MountsRequest(key=key))
            only.add((time.perf_counter() - t0) * 1e3)
            benchlib.unmount(mnt)
            stub.Remove(pb.RemoveSnapshotRequest(key=key))
            shutil.rmtree(up)
            shutil.rmtree(wk)
        print(table.render())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
