"""The C fast path in the views mount (issue 14; mergefs/union/views.py, ``ViewFS.init``).

C calls ViewFS's plain handlers of LOOKUP, GETATTR, MKNOD and GETXATTR
without a coroutine, serves READ, GETATTR (fstat) and FSYNC of every open
file from the fd its open registered under the file handle, and runs the
request loop (``drain``, which also wakes for the control socket). Each test
runs with the fast path on and off (``MERGEFS_FASTPATH=0``); with it on, the
service's request counts (control op ``stats``) must show that C served the
requests, so no test passes with the fast path silently off. Answers are
compared with kernel overlayfs over the same layers.
"""
from __future__ import annotations

import errno
import os
import statistics
import time
from pathlib import Path

import pytest

from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs, needs_overlay
from .test_fastpath import fast_path_expected, patch_version, raw_getxattr
from .test_readonly import sample_stack
from .test_views import writable
from .viewsrv import ViewsServer, serving

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]


@pytest.fixture(params=["fast", "python"])
def fast(request, monkeypatch):
    """Is the C fast path meant to serve? (the service inherits the environment)"""
    if request.param == "python":
        monkeypatch.setenv("MERGEFS_FASTPATH", "0")
        return False
    return fast_path_expected()


@pytest.fixture
def views(tmp_path, fast):
    with serving(tmp_path / "srv") as srv:
        yield srv


def counts(views: ViewsServer) -> dict:
    """The service's request counts since the last call (``fast_*``: C)."""
    return views.call(op="stats", reset=True)["requests"]


def assert_c_served(got: dict, fast: bool, *ops: str) -> None:
    for op in ops:
        assert (got.get(f"fast_{op}", 0) > 0) == fast, (op, got)
    if not fast:
        assert not any(k.startswith("fast_") for k in got), got


@needs_overlay
def test_U1_views_served_in_c_equal_kernel_overlay(tmp_path, views, fast):
    """Lookups, attributes, contents, links and xattrs of a read-only and a
    writable view, read with C serving them, are kernel overlayfs's (U1)."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    up, wk = writable(tmp_path, "rw")
    oup, owk = writable(tmp_path, "ovl")
    for d in (up, oup):       # an upper's root supplies the merged root's attributes
        os.utime(d, ns=(1_600_000_000_000_000_000,) * 2)
    ro = views.add("ro", layers)
    rw = views.add("rw", layers, up, wk)
    counts(views)
    got_ro, got_rw = tree.capture(ro), tree.capture(rw)
    served = counts(views)
    (tmp_path / "ovl").mkdir()
    (tmp_path / "ovl-w").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl") as ovl:
        tree.assert_same(got_ro, tree.capture(ovl), "read-only view vs kernel overlay")
    with mounts.overlay_mount(layers, tmp_path / "ovl-w", upper=oup, work=owk) as ovl:
        tree.assert_same(got_rw, tree.capture(ovl), "writable view vs kernel overlay")
    assert_c_served(served, fast, "read", *(("lookup_direct",) if patch_version() >= 7 else ()))
    assert served.get("read", 0) == 0 or not fast, served     # every READ in C


@needs_overlay
def test_U4_a_write_to_a_shared_file_still_reaches_python(tmp_path, views, fast):
    """After C served a shared lower file's reads in every view, a write to it in
    one writable view still goes through Python (ESTALE, private gid, copy-up
    there only, U4): the other views keep the lower content, and the writer's
    file and its fstat are kernel overlayfs's after the same steps."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    a = views.add("a", layers, *writable(tmp_path, "a"))
    b = views.add("b", layers, *writable(tmp_path, "b"))
    ro = views.add("ro", layers)
    for v in (a, b, ro):
        assert (v / "etc/passwd").read_bytes() == b"root:x:0:0:new\n"
    assert len({os.stat(v / "etc/passwd").st_ino for v in (a, b, ro)}) == 1
    before = counts(views)

    def steps(root: Path) -> list:
        with open(root / "etc/passwd", "a") as f:
            f.write("daemon:x:1:1\n")
            f.flush()
            st = os.fstat(f.fileno())           # attributes after a write: GETATTR (fh)
            out = [st.st_size, st.st_mode, st.st_nlink, st.st_uid, st.st_gid]
            os.fsync(f.fileno())
        with open(root / "etc/passwd", "rb") as f:
            out.append(f.read())
            os.fsync(f.fileno())                # a read-only fd: nothing to sync, no error
        return out

    got = steps(a)
    after = counts(views)
    up, wk = writable(tmp_path, "ovl")
    (tmp_path / "ovl").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=up, work=wk) as ovl:
        assert got == steps(ovl)
    assert (b / "etc/passwd").read_bytes() == b"root:x:0:0:new\n"
    assert (ro / "etc/passwd").read_bytes() == b"root:x:0:0:new\n"
    assert os.stat(a / "etc/passwd").st_ino != os.stat(b / "etc/passwd").st_ino
    assert (tmp_path / "a-up/etc/passwd").read_bytes().endswith(b"daemon:x:1:1\n")
    assert not (tmp_path / "b-up/etc/passwd").exists()
    assert_c_served(before, fast, "read")
    assert after.get("write", 0) > 0 and "fast_write" not in after, after
    assert_c_served(after, fast, "fsync")


def test_getxattr_in_c_as_the_handlers_answer(tmp_path, views, fast):
    """GETXATTR, called directly from C: a shared lower file's value, a private
    file's, an absent name (ENODATA), overlay-private names (EOPNOTSUPP, also
    on the views root), the size rules (0: the length; too small: ERANGE)."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    rw = views.add("rw", layers, *writable(tmp_path, "rw"))
    new = rw / "x/new"
    new.write_bytes(b"n")
    os.setxattr(new, "user.k", b"value12345")
    counts(views)
    shared = rw / "x/attr"
    assert raw_getxattr(shared, "user.mergefs", 100) == (3, b"yes")
    assert raw_getxattr(shared, "user.mergefs", 0) == (3, None)
    assert raw_getxattr(shared, "user.mergefs", 2)[0] == -errno.ERANGE
    assert raw_getxattr(new, "user.k", 100) == (10, b"value12345")
    for p in (shared, new, rw / "x", views.mnt):
        assert raw_getxattr(p, "user.absent", 100)[0] == -errno.ENODATA
        for name in ("trusted.overlay.origin", "user.overlay.x"):
            assert raw_getxattr(p, name, 100)[0] == -errno.EOPNOTSUPP
    assert_c_served(counts(views), fast, "getxattr", "getxattr_direct")


def test_a_control_request_never_waits_for_the_request_loop(tmp_path, views, fast):
    """A control request right after a FUSE request is answered at once: C's
    wait for the next request (``drain``) wakes for trio's fds too (else it
    waits up to fuseloop.POLL_MS, 50 ms)."""
    layer = tmp_path / "low"
    layer.mkdir()
    (layer / "f").write_bytes(b"x")
    v = views.add("a", [layer])
    took = []
    for i in range(11):
        with pytest.raises(FileNotFoundError):
            os.lstat(v / f"missing-{i}")               # a LOOKUP, answered in C
        t0 = time.perf_counter()
        views.call(op="list")
        took.append(time.perf_counter() - t0)
    assert statistics.median(took) < 0.025, took
    assert_c_served(counts(views), fast, *(("lookup_direct",) if patch_version() >= 7 else ()))


def test_fd_held_across_view_removal_reads_on(tmp_path, views, fast):
    """A file held open in a view keeps reading (C, by its handle) after the view
    is removed, and its release after that closes it cleanly."""
    layers = materialise_stack([LayerSpec().file("data", b"0123456789" * 1000)],
                               tmp_path / "layers", "overlay")
    a = views.add("a", layers)
    with open(a / "data", "rb") as f:
        assert f.read(10) == b"0123456789"
        views.remove("a", force=True)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)    # READ again
        assert os.pread(f.fileno(), 10, 9990) == b"0123456789"
        assert os.fstat(f.fileno()).st_size == 10000
    assert_c_served(counts(views), fast, "read")


def test_sigusr1_logs_the_request_counts(tmp_path, views, fast):
    """SIGUSR1 logs ``requests {...}`` as a mount's own server does (``fast_*``: C),
    and the service keeps serving."""
    layer = tmp_path / "low"
    layer.mkdir()
    (layer / "f").write_bytes(b"data")
    v = views.add("a", [layer])
    counts(views)
    assert (v / "f").read_bytes() == b"data"
    got = mounts.server_requests(views.proc.pid, views.log, timeout=10)
    assert got.get("fast_read" if fast else "read", 0) == 1, got
    assert (v / "f").read_bytes() == b"data" and views.proc.poll() is None
