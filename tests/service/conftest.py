"""A `mergefs serve` per test, on private paths, stopped by pid; a gRPC client for it."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergefs import mounttable
from mergefs.testing import mounts

from ..conftest import needs

grpc = pytest.importorskip("grpc", reason="grpcio is not installed (tools/bootstrap.sh)")
needs_root = needs("root")


class Service:
    """One ``mergefs serve`` process: ``start``, ``stop`` (SIGTERM), ``kill`` (SIGKILL)."""

    def __init__(self, base: Path, *extra: str):
        self.base = base
        self.root = base / "store"
        self.state = base / "run"
        self.socket = self.state / "mergefs.sock"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.log = base / "serve.log"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "mergefs", "serve", "--root", str(self.root),
                "--socket", str(self.socket), *self.extra]

    def start(self, timeout: float = 60.0) -> "Service":
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mergefs serve exited {self.proc.returncode}:\n"
                                     + self.log.read_text())
            if self.socket.exists() and (self.state / "control.sock").exists():
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.socket))
                    return self
                except OSError:
                    pass
            time.sleep(0.02)
        self.kill()
        raise AssertionError("mergefs serve did not listen within %.0f s" % timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("mergefs serve did not stop within %.0f s of SIGTERM" % timeout)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def channel(self):
        return grpc.insecure_channel("unix:" + str(self.socket))

    def client(self):
        from snapshotter.serve._proto import snapshots_pb2_grpc
        return snapshots_pb2_grpc.SnapshotsStub(self.channel())


@pytest.fixture
def service_factory(tmp_path):
    """Start services under tmp_path; each is stopped (then killed) and unmounted at the end."""
    made: list[Service] = []

    def make(*extra: str, start: bool = True, base: Path | None = None) -> Service:
        base = base or tmp_path / f"svc{len(made)}"
        base.mkdir(exist_ok=True)
        svc = Service(base, *extra)
        made.append(svc)
        return svc.start() if start else svc

    yield make
    for svc in made:
        try:
            svc.stop()
        except AssertionError:
            svc.kill()
    for m in sorted(mounttable.targets(below=str(tmp_path)), key=len, reverse=True):
        mounts.force_unmount(m)


@pytest.fixture
def service(service_factory):
    return service_factory()
