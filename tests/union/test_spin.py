"""The C request loop spins a little before it sleeps (``spin_poll`` in
mergefs/union/_fastpath.c; docs/architecture.md, "Serving paths").

On a VM whose idle vCPUs halt, waking a sleeping server costs more than most
requests; while requests come back to back, a server that polls /dev/fuse a
little longer after each reply meets the next one awake. The spin must pay
for itself and cost nothing otherwise: a stream of requests is met by it, an
idle server and requests further apart than the bound get none, and
``MERGEFS_SPIN_US=0`` turns it off. The server reports its waits on SIGUSR1
(``waits {...}`` beside ``requests {...}``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mergefs.testing import mounts
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.union import fastpath

from .test_fastpath import fast_path_expected

pytestmark = pytest.mark.timeout(120)

FILES = 400


def mount_files(tmp_path: Path, union_mount) -> tuple[Path, int, Path]:
    """A writable mount of one layer of FILES files: (mount point, pid, log)."""
    spec = LayerSpec()
    for i in range(FILES):
        spec.file(f"d/f{i:03d}", b"x")
    layers = materialise_stack([spec], tmp_path / "layers")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    _, pid, log = union_mount.started[-1]
    os.stat(mnt / "d")          # answered: the server's loop listens for SIGUSR1 now
    return mnt, pid, log


@pytest.fixture
def mounted(tmp_path: Path, union_mount):
    """``mount_files`` and whether C's loop serves it (a no-open mount, fast path on)."""
    drains = os.environ.get("MERGEFS_NO_OPEN") != "0" and fast_path_expected()
    return (*mount_files(tmp_path, union_mount), drains)


def waits(pid: int, log: Path) -> dict:
    _, w = mounts.server_counts(pid, log, timeout=10)
    assert w, "the server logged no waits line"
    return w


def server_cpu(pid: int) -> float:
    """Seconds the server's threads ran (schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def test_a_stream_of_requests_is_met_by_the_spin(mounted):
    mnt, pid, log, drains = mounted
    third = FILES // 3
    for attempt in range(3):      # a machine busy with other work: the stream again
        waits(pid, log)                               # counts from here on
        for i in range(attempt * third, (attempt + 1) * third):
            os.stat(mnt / "d" / f"f{i:03d}")          # one LOOKUP each, back to back
        counts, w = mounts.server_counts(pid, log, timeout=10)
        if not drains:
            assert w["max_us"] == 0 and w["hits"] == 0
            return
        assert w["max_us"] == fastpath.SPIN_US
        # A stat a few microseconds after the last reply: the server, spinning, met
        # most of them awake (a preempted test process makes some sleep: when other
        # processes keep the CPUs busy, the stream is tried again).
        if w["hits"] >= w["waits"] // 4 > 0:
            return
    pytest.fail(f"the spin met few of the stream's requests: {w} {counts}")


def test_requests_further_apart_than_the_bound_get_no_spin(mounted):
    mnt, pid, log, drains = mounted
    for i in range(50):                               # a stream first: the window grows
        os.stat(mnt / "d" / f"f{i:03d}")
    waits(pid, log)
    cpu = server_cpu(pid)
    for i in range(50, 110):                          # then one request every 5 ms
        time.sleep(0.005)
        os.stat(mnt / "d" / f"f{i:03d}")
    spent = server_cpu(pid) - cpu
    w = waits(pid, log)
    assert w["window_us"] == 0, w                     # halved at each long wait, then 0
    assert w["hits"] <= 2, w
    if drains:
        # 60 lookups and at most a few shrinking spins (never the 60 x 200 us a fixed
        # spin would take); generous for a loaded machine
        assert spent < 0.25, spent


def test_an_idle_server_burns_no_cpu(mounted):
    mnt, pid, log, _ = mounted
    for i in range(FILES):
        os.stat(mnt / "d" / f"f{i:03d}")
    time.sleep(0.2)
    cpu = server_cpu(pid)
    time.sleep(1.0)
    assert server_cpu(pid) - cpu < 0.02


def test_spin_off(tmp_path, union_mount, monkeypatch):
    monkeypatch.setenv("MERGEFS_SPIN_US", "0")
    mnt, pid, log = mount_files(tmp_path, union_mount)
    waits(pid, log)
    for i in range(FILES):
        os.stat(mnt / "d" / f"f{i:03d}")
    w = waits(pid, log)
    assert w["max_us"] == 0 and w["waits"] == 0 and w["hits"] == 0, w
    assert (mnt / "d" / "f000").read_bytes() == b"x"


@pytest.mark.parametrize("env, bound", [(None, 0), ("200", 200)])
def test_a_server_bound_to_one_cpu_does_not_spin(tmp_path, union_mount, monkeypatch,
                                                 env, bound):
    """A server that may run on one CPU only (taskset, a cpuset) shares it with its
    requesters: a spin there only keeps them waiting, so by default it does not
    spin; ``MERGEFS_SPIN_US`` set says otherwise."""
    if not fast_path_expected() or os.environ.get("MERGEFS_NO_OPEN") == "0":
        pytest.skip("the spin is the C request loop's (no-open, fast path)")
    if env is None:
        monkeypatch.delenv("MERGEFS_SPIN_US", raising=False)
    else:
        monkeypatch.setenv("MERGEFS_SPIN_US", env)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})        # the mount command and its server inherit it
    try:
        mnt, pid, log = mount_files(tmp_path, union_mount)
    finally:
        os.sched_setaffinity(0, cpus)
    assert os.sched_getaffinity(pid) == {min(cpus)}
    waits(pid, log)
    for i in range(FILES):
        os.stat(mnt / "d" / f"f{i:03d}")
    w = waits(pid, log)
    assert w["max_us"] == bound, w
    if not bound:
        assert w["waits"] == 0 and w["hits"] == 0, w

