"""Parallel farm builds (forked processes, threads) give the sequential result:
the same tree (A2 directory times included), H1 across workers when links fall
back to copies, and a clean failure when a worker fails or is killed."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from mergefs import syscalls
from mergefs.farm import build_farm, pick_parallel, schedule
from mergefs.layer import Layer
from mergefs.testing import tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs_root
from .conftest import inject_link_error, model_merge

MODES = ["process", "thread"]


def _spread(n: int = 24) -> list[LayerSpec]:
    """Many directories, one inode linked from all of them, and a lower layer
    the top one partly deletes: work for several workers, H1 across them."""
    low, top = LayerSpec(), LayerSpec()
    low.file("d00/shared", b"one inode, many names")
    for i in range(n):
        if i:
            low.hardlink(f"d{i:02}/shared", "d00/shared")
        low.file(f"d{i:02}/sub/deep/f", b"%d" % i, mode=0o600)
        low.file(f"d{i:02}/gone", b"x")
        top.whiteout(f"d{i:02}/gone").file(f"d{i:02}/sub/new", b"new", mtime_ns=10**18 + i)
    return [low, top]


@pytest.fixture
def fork_at_once(monkeypatch):
    """Workers take even the root: every directory is built by a forked process."""
    monkeypatch.setattr(schedule, "SPLIT_MIN", 0)


@needs_root
@pytest.mark.parametrize("parallel", MODES)
@pytest.mark.parametrize("workers", [2, 3])
def test_M1_A2_parallel_build_equals_model(tmp_path, fork_at_once, parallel, workers):
    specs = _spread()
    layers = materialise_stack(specs, tmp_path, "oci")
    stats = build_farm(layers, tmp_path / "farm", workers=workers, parallel=parallel)
    tree.assert_same(tree.capture(tmp_path / "farm"), model_merge(specs), f"farm ({parallel})")
    assert stats.links == 24 * 3 and stats.dirs == 24 * 3
    assert sorted(os.listdir(tmp_path)) == ["farm", "l0", "l1"]


@needs_root
@pytest.mark.parametrize("parallel", MODES)
@pytest.mark.parametrize("err,reason", [(errno.EXDEV, "exdev"), (errno.EMLINK, "emlink")])
def test_H1_copies_keep_one_inode_across_workers(tmp_path, monkeypatch, fork_at_once,
                                                 parallel, err, reason):
    """Every name of a copied inode is one copy, whichever worker met it."""
    specs = _spread()
    layers = materialise_stack(specs, tmp_path, "oci")
    inject_link_error(monkeypatch, err)
    stats = build_farm(layers, tmp_path / "farm", workers=2, parallel=parallel)
    assert stats.links == 0 and stats.copies[reason] == 24 * 3
    tree.assert_same(tree.capture(tmp_path / "farm"), model_merge(specs), f"copied farm ({parallel})")
    inos = {os.stat(tmp_path / f"farm/d{i:02}/shared").st_ino for i in range(24)}
    assert len(inos) == 1 and inos != {os.stat(layers[0] / "d00/shared").st_ino}


@needs_root
@pytest.mark.parametrize("parallel", MODES)
def test_worker_error_aborts_and_leaves_nothing(tmp_path, monkeypatch, fork_at_once, parallel):
    layers = materialise_stack(_spread(), tmp_path, "oci")
    inject_link_error(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as exc:
        build_farm(layers, tmp_path / "farm", workers=2, parallel=parallel)
    assert exc.value.errno == errno.EIO
    assert sorted(os.listdir(tmp_path)) == ["l0", "l1"]


def test_killed_worker_fails_the_build_and_leaves_nothing(tmp_path, monkeypatch, fork_at_once):
    """A worker killed mid-build (OOM killer, kill -9) fails the build at once; the
    other workers are stopped and the staging dir is removed."""
    layers = materialise_stack(_spread(), tmp_path, "oci")
    real, parent = syscalls.link, os.getpid()

    def link(*args):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    monkeypatch.setattr(syscalls, "link", link)
    with pytest.raises(schedule.WorkerDied, match="without a report"):
        build_farm(layers, tmp_path / "farm", workers=2, parallel="process")
    assert sorted(os.listdir(tmp_path)) == ["l0", "l1"]


@needs_root
def test_no_space_in_a_worker_removes_staging(tmp_path, fork_at_once):
    """A worker's mkdir meets ENOSPC (a tmpfs out of inodes): the error surfaces
    and nothing is left behind."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        layers = materialise_stack(_spread(), mnt / "layers", "oci")
        st = os.statvfs(mnt)
        used = st.f_files - st.f_ffree
        subprocess.run(["mount", "-o", f"remount,nr_inodes={used + 8}", str(mnt)], check=True)
        with pytest.raises(OSError) as exc:
            build_farm(layers, mnt / "farm", workers=2, parallel="process")
        assert exc.value.errno == errno.ENOSPC
        assert os.listdir(mnt) == ["layers"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


# Layer dirs owned by uid 1000 that their owner may not enter (0o055) but
# others may; files others may link (protected_hardlinks wants read+write).
RESTRICTED = [LayerSpec().dir("d", mode=0o055, uid=1000).dir("d/e", mode=0o055, uid=1000)
              .file("d/e/f", b"f", mode=0o666, uid=1000).file("d/g", b"g", mode=0o666, uid=1000)
              .dir("d/e/deep", mode=0o755, uid=1000).file("d/e/deep/h", b"h", mode=0o666, uid=1000)]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@needs_root
@pytest.mark.parametrize("parallel", MODES + ["sequential"])
def test_A2_dir_modes_that_lock_out_the_builder(parallel):
    """A non-root build cannot chown, so the farm's directories are its own, and
    a layer directory whose owner bits are 0 (readable by others) locks the
    builder out of the farm's copy once its mode is applied: that must happen
    only after everything below it is built (A2), in every parallel mode."""
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import mergefs.farm"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip("this checkout is not readable by nobody")
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o777)
        layers = materialise_stack(RESTRICTED, d, "overlay")
        code = ("import sys; from mergefs.farm import build_farm, schedule; "
                "schedule.SPLIT_MIN = 0; p = sys.argv[1]; "
                "build_farm(sys.argv[3:], sys.argv[2], workers=1 if p == 'sequential' else 2, "
                "parallel='auto' if p == 'sequential' else p)")
        r = subprocess.run([*NOBODY, sys.executable, "-c", code, parallel, f"{d}/farm",
                            *map(str, layers)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        want = model_merge(RESTRICTED).entries
        got = tree.capture(f"{d}/farm").entries
        assert sorted(got) == sorted(want)
        for path, attrs in want.items():
            assert (got[path].mode, got[path].mtime_ns) == (attrs.mode, attrs.mtime_ns), path
        subprocess.run(["chmod", "-R", "u+rwx", f"{d}/farm"], check=True)


PICK = ("import os, sys; from mergefs.farm import pick_parallel; from mergefs.layer import Layer;"
        "fd = os.open(sys.argv[1], os.O_RDONLY);"
        "print(pick_parallel([Layer(p) for p in sys.argv[2:]], fd, 'auto'))")


@needs_root
def test_pick_parallel(tmp_path):
    """Processes only from a single-threaded caller with every layer on the
    farm's filesystem; threads otherwise (a fork would copy another thread's
    locks; copies from another filesystem run in parallel only in threads)."""
    def pick(*layers) -> str:
        return subprocess.run([sys.executable, "-c", PICK, str(tmp_path), *map(str, layers)],
                              capture_output=True, text=True, check=True).stdout.strip()

    (tmp_path / "l0").mkdir()
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "l1").mkdir()
        assert pick(tmp_path / "l0") == "process"
        assert pick(tmp_path / "l0", mnt / "l1") == "thread"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)

    # a thread the threading module does not know (as a C library starts them)
    hidden = ("import _thread, os, sys, threading, time; from mergefs.farm import pick_parallel; "
              "from mergefs.layer import Layer; _thread.start_new_thread(time.sleep, (30,)); "
              "time.sleep(0.1); assert threading.active_count() == 1; "
              "print(pick_parallel([Layer(sys.argv[2])], os.open(sys.argv[1], os.O_RDONLY), 'auto'))")
    r = subprocess.run([sys.executable, "-c", hidden, str(tmp_path), str(tmp_path / "l0")],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "thread", r.stderr

    fd = os.open(tmp_path, os.O_RDONLY)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert pick_parallel([Layer(tmp_path / "l0")], fd, "auto") == "thread"
        assert pick_parallel([Layer(tmp_path / "l0")], fd, "process") == "process"
    finally:
        stop.set()
        t.join()
        os.close(fd)
    with pytest.raises(ValueError, match="parallel mode"):
        build_farm([tmp_path / "l0"], tmp_path / "farm", parallel="fork")


SLOW_BUILD = ("import sys, time; from mergefs import syscalls; from mergefs.farm import build_farm, "
              "schedule; schedule.SPLIT_MIN = 0; real = syscalls.link\n"
              "def link(*a):\n    time.sleep(0.5); return real(*a)\n"
              "syscalls.link = link; build_farm(sys.argv[2:], sys.argv[1], workers=2, "
              "parallel='process')")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_die_with_a_killed_caller(tmp_path):
    """kill -9 of the building process (a CLI user's, a runtime's) must not leave
    its workers linking on into a staging dir nobody will publish."""
    layers = materialise_stack(_spread(), tmp_path, "oci")
    caller = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(tmp_path / "farm"),
                               *map(str, layers)])
    try:
        deadline = time.monotonic() + 30
        while not (workers := _children(caller.pid)):
            assert time.monotonic() < deadline and caller.poll() is None, "no workers started"
            time.sleep(0.01)
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)):
            assert time.monotonic() < deadline, f"workers {workers} outlived their caller"
            time.sleep(0.01)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    assert not (tmp_path / "farm").exists()


NO_SHM = 'mount -t tmpfs -o ro,size=1m tmpfs /dev/shm && exec "$0" -c "$@"'


@needs_root
def test_without_dev_shm_threads_finish_the_build(tmp_path):
    """A sandbox without a writable /dev/shm has no POSIX semaphores for the
    workers' pool: the build still succeeds, finished by threads."""
    specs = _spread()
    layers = materialise_stack(specs, tmp_path, "oci")
    code = ("import sys; from mergefs.farm import build_farm, schedule; schedule.SPLIT_MIN = 5; "
            "s = build_farm(sys.argv[2:], sys.argv[1], workers=2, parallel='process'); "
            "print(s.links + s.dirs)")
    r = subprocess.run(["unshare", "-m", "sh", "-c", NO_SHM, sys.executable, code,
                        str(tmp_path / "farm"), *map(str, layers)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(24 * 6)]
    tree.assert_same(tree.capture(tmp_path / "farm"), model_merge(specs), "farm without /dev/shm")


@needs_root
@pytest.mark.parametrize("forks", [0, 1])
def test_fork_refused_builds_with_what_started(tmp_path, monkeypatch, fork_at_once, forks):
    """fork() failing with EAGAIN (a cgroup pids limit) after ``forks`` workers:
    the started ones do the work, or threads if none started."""
    specs = _spread()
    layers = materialise_stack(specs, tmp_path, "oci")
    real, calls = os.fork, []

    def fork():
        calls.append(1)
        if len(calls) > forks:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real()
    monkeypatch.setattr(os, "fork", fork)
    stats = build_farm(layers, tmp_path / "farm", workers=3, parallel="process")
    assert len(calls) == forks + 1 and stats.links + stats.dirs == 24 * 6
    tree.assert_same(tree.capture(tmp_path / "farm"), model_merge(specs), "farm")


@needs_root
def test_H1_when_threads_take_over_from_the_caller(tmp_path, monkeypatch):
    """The caller defers its copies; if no worker can start, threads copy the
    rest: every name of an inode still ends up as one copy."""
    monkeypatch.setattr(schedule, "SPLIT_MIN", 30)    # the caller meets d00/shared itself
    specs = _spread()
    layers = materialise_stack(specs, tmp_path, "oci")
    inject_link_error(monkeypatch, errno.EMLINK)

    def fork():
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", fork)
    build_farm(layers, tmp_path / "farm", workers=2, parallel="process")
    tree.assert_same(tree.capture(tmp_path / "farm"), model_merge(specs), "farm")
    assert len({os.stat(tmp_path / f"farm/d{i:02}/shared").st_ino for i in range(24)}) == 1
