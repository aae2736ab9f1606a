"""What copy-up and the writes after it cost, on a mount (U4): the fds the server keeps
and the syscalls a copy makes, with the result checked as a user sees it.

- ``dpkg -i`` writes every file of a package, then fsyncs and renames each: the
  server keeps the fd of each new file (fdcache.fd_budget, the soft fd limit
  raised toward the hard one) so the C fast path answers those fsyncs.
- A copy-up makes its staged file with the final mode and skips the chown
  where the work dir already gives the right owner; a set-gid work dir (whose
  group new entries would get) still gets every copy chowned.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import stat
import subprocess
import time

import pytest

from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs, needs_overlay
from .test_copyup_data import on_mergefs_and_kernel
from .test_fastpath import fast_path_expected

pytestmark = [needs("fuse"), pytest.mark.timeout(180)]

FILES = 600          # more than the 256 fds the cache kept before


def c_serves(union_mount) -> bool:
    return union_mount.writable_no_open and fast_path_expected() and \
        os.environ.get("MERGEFS_FASTPATH") != "0"


@pytest.fixture
def soft_fd_limit_1024():
    """Debian's default soft limit for the server started under it (hard unchanged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1024 + 2 * (FILES + 64)      # fdcache.fd_budget: FILES files kept, and more
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"hard fd limit {hard} < {want}: the cache stays small")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def soft_limit_of(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no fd limit in /proc/PID/limits")


def test_U4_dpkg_like_fsyncs_of_many_new_files_answered_in_c(tmp_path, union_mount,
                                                             soft_fd_limit_1024):
    layers = materialise_stack([LayerSpec().file("pkg/old", b"old\n")], tmp_path / "layers",
                               "overlay")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    _, pid, log = union_mount.started[-1]
    names = [f"f{i:03d}" for i in range(FILES)]
    for n in names:                        # dpkg: unpack every file as NAME.dpkg-new ...
        with open(mnt / "pkg" / f"{n}.dpkg-new", "wb") as f:
            f.write(n.encode())
    mounts.server_requests(pid, log, timeout=10)          # counts from here on
    for n in names:                        # ... then fsync and rename each into place
        fd = os.open(mnt / "pkg" / f"{n}.dpkg-new", os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(mnt / "pkg" / f"{n}.dpkg-new", mnt / "pkg" / n)
    counts = mounts.server_requests(pid, log, timeout=10)
    assert sorted(os.listdir(mnt / "pkg")) == sorted(names + ["old"])
    assert (tmp_path / "up/pkg" / names[-1]).read_bytes() == names[-1].encode()
    if c_serves(union_mount):
        assert soft_limit_of(pid) > 1024
        assert counts.get("fast_fsync", 0) == FILES and "fsync" not in counts, counts


LOWER = {                  # path: (mode, uid, gid) of lower entries appended to
    "d": (0o755, 0, 0),
    "d/root644": (0o644, 0, 0),
    "d/user640": (0o640, 7, 8),
    "d/suid": (0o4755, 0, 0),
    "e": (0o750, 5, 6),
    "e/f": (0o600, 5, 6),
}


@contextlib.contextmanager
def traced(pid: int, calls: str, out):
    """``strace -f -e trace=CALLS`` on every thread of the server ``pid`` while the
    block runs, into ``out``."""
    tids = os.listdir(f"/proc/{pid}/task")
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(out), "-e", f"trace={calls}",
                               *[a for t in tids for a in ("-p", t)]],
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)                    # attached (strace prints nothing to wait on)
        yield
        time.sleep(0.2)                    # the last calls written
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)


def lower_layers(tmp_path):
    spec = LayerSpec()
    for path, (mode, uid, gid) in LOWER.items():
        if "/" in path:
            spec = spec.file(path, b"lower\n", mode=mode, uid=uid, gid=gid)
        else:
            spec = spec.dir(path, mode=mode, uid=uid, gid=gid)
    return materialise_stack([spec, LayerSpec().file("top", b"top\n")], tmp_path / "layers",
                             "overlay")


def append_all(mnt) -> None:
    for path in LOWER:
        if "/" in path:
            with open(mnt / path, "ab") as f:
                f.write(b"+")


def test_U4_copies_keep_owner_and_mode_with_a_set_gid_work_dir(tmp_path, union_mount):
    """Entries made in a set-gid work dir get its group (and directories its set-gid
    bit): every copy is chowned and chmodded to its origin's all the same."""
    if os.geteuid() != 0:
        pytest.skip("needs root (lower files of other owners)")
    layers = lower_layers(tmp_path)
    for name in ("up", "wk"):
        (tmp_path / name).mkdir()
    os.chown(tmp_path / "wk", 0, 4321)
    os.chmod(tmp_path / "wk", 0o2775)
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    append_all(mnt)
    for path, (mode, uid, gid) in LOWER.items():
        for where in (tmp_path / "up", mnt):
            st = os.lstat(where / path)
            assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (oct(mode), uid, gid), \
                (where, path)
        if "/" in path:
            assert (mnt / path).read_bytes() == b"lower\n+"


def test_U4_copy_up_chowns_and_chmods_only_what_needs_it(tmp_path, union_mount):
    """strace of the server during the appends: a root-owned 0644 file (and its 0755
    parent) is made right, with no fchown or fchmod; the others get theirs."""
    if os.geteuid() != 0 or not shutil.which("strace"):
        pytest.skip("needs root and strace")
    if not union_mount.writable_no_open:
        pytest.skip("real opens: the copy-up comes with the open, traced the same way, "
                    "but the test keeps to one mode")
    layers = lower_layers(tmp_path)
    for name in ("up", "wk"):
        (tmp_path / name).mkdir()
    umask = os.umask(0o022)                # the server's: 0644 and 0755 are kept by it
    try:
        mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    finally:
        os.umask(umask)
    _, pid, _ = union_mount.started[-1]
    for path in LOWER:
        os.lstat(mnt / path)               # looked up before the trace
    out = tmp_path / "strace.out"
    with traced(pid, "/^(f|l)?ch(own|mod)", out):
        with open(mnt / "d/root644", "ab") as f:
            f.write(b"+")
        time.sleep(0.2)
        mark = out.read_text() if out.exists() else ""
        for path in ("d/user640", "d/suid", "e/f"):
            with open(mnt / path, "ab") as f:
                f.write(b"+")
    calls = [ln for ln in out.read_text().splitlines() if "(" in ln]
    first = [ln for ln in mark.splitlines() if "(" in ln]
    assert first == [], first               # d (0755 root) and d/root644: made right
    rest = calls[len(first):]
    chowns = [ln for ln in rest if "chown" in ln]
    chmods = [ln for ln in rest if "chmod" in ln]
    # user640, suid, e/f and their dir e are chowned; suid alone is chmodded (made 0600)
    assert len(chowns) == 4 and len(chmods) == 1, calls
    for path, (mode, uid, gid) in LOWER.items():
        st = os.lstat(tmp_path / "up" / path)
        assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (oct(mode), uid, gid), path


def dpkg_renames(root) -> None:
    """What dpkg does to install a file: NAME.dpkg-new written, renamed over NAME
    (a lower file, an upper one, a name whose lower file was removed: a whiteout
    in the upper, a fresh name), and a lower file renamed over another."""
    root = str(root)
    os.unlink(os.path.join(root, "p/gone"))
    with open(os.path.join(root, "p/mine"), "wb") as f:
        f.write(b"upper\n")
    for name in ("lower", "mine", "gone", "fresh"):
        with open(os.path.join(root, f"p/{name}.dpkg-new"), "wb") as f:
            f.write(name.encode() + b" new\n")
        os.rename(os.path.join(root, f"p/{name}.dpkg-new"), os.path.join(root, f"p/{name}"))
    os.rename(os.path.join(root, "p/a"), os.path.join(root, "p/b"))


@needs_overlay
def test_U5_dpkg_like_file_renames_as_kernel_overlay(tmp_path, union_mount):
    """A file renamed in the upper needs no look at the name it replaces (whatever
    the upper has there is renamed over): same tree and upper as the kernel's."""
    spec = (LayerSpec().file("p/lower", b"lower\n").file("p/gone", b"gone\n")
            .file("p/a", b"a\n").file("p/b", b"b\n"))
    layers = materialise_stack([spec, LayerSpec().file("q", b"q\n")], tmp_path / "layers",
                               "overlay")
    mnt, got, expected = on_mergefs_and_kernel(tmp_path, union_mount, layers, dpkg_renames)
    strip = lambda v: tree.View({p: a._replace(mtime_ns=0) for p, a in v.entries.items()},  # noqa: E731
                                frozenset())
    tree.assert_same(strip(got), strip(expected))
    assert sorted(os.listdir(tmp_path / "up/p")) == sorted(os.listdir(tmp_path / "kup/p"))
    a, gone = os.lstat(tmp_path / "up/p/a"), os.lstat(tmp_path / "up/p/gone")
    assert stat.S_ISCHR(a.st_mode) and a.st_rdev == 0      # the whiteout a left behind
    assert stat.S_ISREG(gone.st_mode)                       # renamed over gone's whiteout
    assert (mnt / "p/gone").read_bytes() == b"gone new\n"


def test_U4_append_reads_the_lower_directory_once(tmp_path, union_mount):
    """strace of the server during the first write to a lower file looked up before
    (its directory copied up already): the lower directory's fd kept from the
    lookup serves the xattr names the kernel asks for, and the copy opens the file
    beneath it: only the file is opened."""
    if os.geteuid() != 0 or not shutil.which("strace"):
        pytest.skip("needs root and strace")
    if not union_mount.writable_no_open:
        pytest.skip("real opens: the copy-up comes with the open")
    spec = LayerSpec().file("d/sub/first", b"1\n").file("d/sub/second", b"2\n",
                                                          xattrs={"user.k": b"v"})
    layers = materialise_stack([spec, LayerSpec().file("top", b"top\n")], tmp_path / "layers",
                               "overlay")
    for name in ("up", "wk"):
        (tmp_path / name).mkdir()
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    _, pid, _ = union_mount.started[-1]
    with open(mnt / "d/sub/first", "ab") as f:      # d and d/sub copied up
        f.write(b"+")
    os.lstat(mnt / "d/sub/second")
    out = tmp_path / "strace.out"
    with traced(pid, "openat2", out):
        with open(mnt / "d/sub/second", "ab") as f:
            f.write(b"+")
    opened = [ln for ln in out.read_text().splitlines() if "openat2(" in ln]
    # the file alone, beneath the lower directory's kept fd
    assert len(opened) == 1 and 'openat2(' in opened[0] and ', "second", ' in opened[0], opened
    assert (mnt / "d/sub/second").read_bytes() == b"2\n+"
    assert os.getxattr(tmp_path / "up/d/sub/second", "user.k") == b"v"
