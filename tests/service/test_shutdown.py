"""SIGTERM stops `mergefs serve` within a bound, also with live views and busy clients:
each shutdown step has a deadline and says in the log what it did (issue 9)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from mergefs.testing import mounts
from .conftest import grpc, needs_root
from .test_grpc import committed, mount_all

pb = pytest.importorskip("snapshotter.serve._proto.snapshots_pb2",
                         reason="stubs not generated (tools/gen_proto.sh)")
pytestmark = [needs_root, pytest.mark.timeout(180)]
BOUND_S = 20.0          # grace for RPCs + views close + store close, on a loaded machine


def _container(mnt, stop: threading.Event) -> None:
    """Read every file and write one, again and again, until the view goes away."""
    n = 0
    while not stop.is_set():
        try:
            for name in os.listdir(mnt / "d"):
                (mnt / "d" / name).read_bytes()
            (mnt / f"w{n % 50}").write_bytes(b"y" * 8192)
            n += 1
        except OSError:
            return


def _rpcs(svc, stop: threading.Event) -> None:
    """Prepare, Stat, List, Usage, Remove in a loop, until the service stops answering."""
    cl, n = svc.client(), 0
    while not stop.is_set():
        try:
            key = f"busy-{n}"
            cl.Prepare(pb.PrepareSnapshotRequest(key=key, parent="base"))
            cl.Stat(pb.StatSnapshotRequest(key=key))
            list(cl.List(pb.ListSnapshotsRequest()))
            cl.Usage(pb.UsageRequest(key="c0"))
            cl.Remove(pb.RemoveSnapshotRequest(key=key))
            n += 1
        except grpc.RpcError:
            return


def test_sigterm_with_live_views_and_busy_clients_stops_within_the_bound(service, tmp_path):
    cl = service.client()
    committed(cl, tmp_path, "base", "", {f"d/f{i}": b"x" * 4096 for i in range(200)})
    binds = []
    for i in range(3):
        ms = cl.Prepare(pb.PrepareSnapshotRequest(key=f"c{i}", parent="base")).mounts
        binds.append(tmp_path / f"rootfs{i}")
        mount_all(ms, binds[-1])
    stop = threading.Event()
    workers = [threading.Thread(target=_container, args=(b, stop), daemon=True) for b in binds]
    workers += [threading.Thread(target=_rpcs, args=(service, stop), daemon=True)
                for _ in range(2)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.5)
        t0 = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        rc = service.proc.wait(BOUND_S + 60)
        elapsed = time.monotonic() - t0
        service.proc = None
    finally:
        stop.set()
        for w in workers:
            w.join(10)
        for b in binds:
            mounts.force_unmount(b)
    log = service.log.read_text()
    assert rc == 0, log
    assert elapsed < BOUND_S, f"stopped after {elapsed:.1f} s:\n{log}"
    assert "stopped in" in log, log                    # the shutdown says what it did
    with open("/proc/self/mounts") as f:
        assert str(service.state / "views") not in f.read()


@pytest.mark.parametrize("stall", ["serve:commit", "serve:views-loop"])
def test_sigterm_with_a_stuck_call_stops_within_the_bound(service_factory, tmp_path, stall):
    """A call that never returns (MERGEFS_TEST_STALL_AT) does not hold the process:
    the stuck step is given up after its deadline, and the log says so."""
    os.environ["MERGEFS_TEST_STALL_AT"] = stall       # inherited by the service only
    try:
        svc = service_factory()
    finally:
        del os.environ["MERGEFS_TEST_STALL_AT"]
    cl = svc.client()
    if stall == "serve:commit":                        # a Commit that hangs
        cl.Prepare(pb.PrepareSnapshotRequest(key="a"))
        call = lambda: cl.Commit(pb.CommitSnapshotRequest(name="n", key="a"))  # noqa: E731
    else:                                              # a View whose view the stuck loop never adds
        committed(cl, tmp_path, "base", "", {"f": b"x"})   # no parent: a bind, no view
        call = lambda: cl.View(pb.ViewSnapshotRequest(key="v", parent="base"))  # noqa: E731
    hung = threading.Thread(target=_ignore_rpc_error, args=(call,), daemon=True)
    hung.start()
    time.sleep(1.0)
    assert hung.is_alive()                             # it is stuck
    t0 = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    rc = svc.proc.wait(BOUND_S + 60)
    elapsed = time.monotonic() - t0
    svc.proc = None
    log = svc.log.read_text()
    assert rc == 0, log
    assert elapsed < BOUND_S, f"stopped after {elapsed:.1f} s:\n{log}"
    assert "busy thread(s) left" in log, log
    if stall == "serve:views-loop":
        assert "did not stop within" in log, log
    with open("/proc/self/mounts") as f:
        assert str(svc.state / "views") not in f.read()


def _ignore_rpc_error(call) -> None:
    try:
        call()
    except grpc.RpcError:
        pass


def _tgkill(pid: int, tid: int, sig: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_tgkill = {"x86_64": 234, "aarch64": 131}[os.uname().machine]
    assert libc.syscall(SYS_tgkill, pid, tid, sig) == 0, ctypes.get_errno()


def test_sigterm_taken_by_another_thread_still_stops_the_service(service):
    """The kernel may hand a process's SIGTERM to any of its threads (gRPC's, the views
    server's); the main thread must still notice it promptly."""
    pid = service.proc.pid
    tid = next(int(t) for t in sorted(os.listdir(f"/proc/{pid}/task")) if int(t) != pid)
    t0 = time.monotonic()
    _tgkill(pid, tid, signal.SIGTERM)
    rc = service.proc.wait(BOUND_S + 60)
    elapsed = time.monotonic() - t0
    service.proc = None
    assert rc == 0 and elapsed < BOUND_S, (rc, elapsed, service.log.read_text())
