"""The real-mount tier: the union mounted through /dev/fuse (U1, U2, U6, U7, S2).

Every mount is made by the ``union_mount`` fixture (or a CLI call whose
teardown is registered the same way) and undone also on failure.
"""
from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mergefs.farm import build_farm
from mergefs.testing import conformance, mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.union import server

from ..conftest import needs, require
from .conftest import _alive, stop_server
from .test_readonly import random_stack, sample_stack

pytestmark = needs("fuse")
_seq = itertools.count()


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__[6:])
def test_conformance_on_mount(check, tmp_path, union_mount):
    def merge(specs):
        layers = materialise_stack(specs, tmp_path / f"s{next(_seq)}", "oci")
        mnt = union_mount(layers)
        try:
            return tree.capture(mnt)
        finally:
            stop_server(mnt, union_mount.started[-1][1])
    check(merge)


@pytest.mark.parametrize("seed", range(6))
def test_U1_union_equals_kernel_overlay_and_farm(seed, tmp_path, union_mount):
    rng = random.Random(seed)
    specs = random_stack(rng, rng.randint(2, 5)) + [sample_stack()[0]]
    fmt = ("overlay", "oci")[seed % 2]
    ours = materialise_stack(specs, tmp_path / "ours", fmt)
    oracle = materialise_stack(specs, tmp_path / "oracle", "overlay")
    union = tree.capture(union_mount(ours))
    (tmp_path / "ovl").mkdir()
    with mounts.overlay_mount(oracle, tmp_path / "ovl") as ovl:
        tree.assert_same(union, tree.capture(ovl), f"union({fmt}) vs kernel overlay")
    build_farm(ours, tmp_path / "farm")
    tree.assert_same(union, tree.capture(tmp_path / "farm"), "union vs farm")


def test_U2_inode_numbers_and_hardlinks_on_mount(tmp_path, union_mount):
    mnt = union_mount(materialise_stack(sample_stack(), tmp_path))
    a, b = os.lstat(mnt / "bin/busybox"), os.lstat(mnt / "bin/sh")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    assert a.st_dev == os.stat(mnt).st_dev != os.stat(tmp_path).st_dev
    inos = {p: os.lstat(mnt / p).st_ino for p in ("etc", "etc/passwd", "lib", "usr/bin/env")}
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
    assert {p: os.lstat(mnt / p).st_ino for p in inos} == inos


def test_U3_read_only_mount_refuses_writes(tmp_path, union_mount):
    mnt = union_mount(materialise_stack(sample_stack(), tmp_path))
    for attempt in (lambda: open(mnt / "etc/passwd", "a"), lambda: os.mkdir(mnt / "new"),
                    lambda: os.unlink(mnt / "etc/passwd")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    assert (mnt / "etc/passwd").read_bytes() == b"root:x:0:0:new\n"


def test_S2_host_symlink_shows_the_link(tmp_path, union_mount):
    spec = LayerSpec().symlink("etc", "/etc").file("ok", b"1")
    mnt = union_mount(materialise_stack([spec], tmp_path))
    assert os.readlink(mnt / "etc") == "/etc"
    assert sorted(os.listdir(mnt)) == ["etc", "ok"]


@pytest.fixture
def public_dir():
    # request it before union_mount: set up first, torn down after the unmount
    """A directory every uid can traverse (pytest's tmp_path is root-only)."""
    path = str(mounts.watch_below(tempfile.mkdtemp(prefix="mergefs-test-")))
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_U6_other_uid_cannot_read_root_only_file(tmp_path, public_dir, union_mount):
    spec = LayerSpec().file("secret", b"s", mode=0o600).file("public", b"p", mode=0o644)
    mnt = union_mount(materialise_stack([spec], tmp_path), allow_other=True, mnt=public_dir)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat"]
    r = subprocess.run(as_nobody + [str(mnt / "secret")], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = subprocess.run(as_nobody + [str(mnt / "public")], capture_output=True, text=True)
    assert r.stdout == "p"


def test_U6_without_allow_other_other_users_are_out(tmp_path, public_dir, union_mount):
    mnt = union_mount(materialise_stack([LayerSpec().file("public", b"p")], tmp_path),
                      mnt=public_dir)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                        str(mnt / "public")], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_U7_dead_server_is_cleaned_by_umount(tmp_path, union_mount):
    mnt = union_mount(materialise_stack(sample_stack(), tmp_path))
    pid = union_mount.started[-1][1]
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):                       # reap it
        time.sleep(0.01)
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    r = _cli("umount", str(mnt))
    assert r.returncode == 0, r.stderr
    assert not server.is_mounted(str(mnt))


def test_sigusr1_as_soon_as_the_mount_is_live_does_not_kill_the_server(tmp_path, union_mount):
    """SIGUSR1 logs the request counts; sent before the server's loop listens for it
    (the mount is live earlier), it used to kill the server and leave a dead mount."""
    layers = materialise_stack(sample_stack(), tmp_path)
    mnt = union_mount(layers)
    pid = union_mount.started[-1][1]
    os.kill(pid, signal.SIGUSR1)
    time.sleep(0.2)
    assert _alive(pid)
    assert tree.capture(mnt).entries      # every entry answers (a dead server: ENOTCONN)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mergefs", *args], capture_output=True,
                          text=True, timeout=60, **kw)


@pytest.fixture
def cli_mounts():
    """Mount points mounted by CLI calls; unmounted in teardown whatever happened."""
    mnts = []
    yield mnts
    for mnt in mnts:
        if server.is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_cli_mount_umount(tmp_path, cli_mounts):
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    r = _cli("mount", "--log", str(tmp_path / "log"), *map(str, layers), str(mnt))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and server.is_mounted(str(mnt))   # live when the command returns
    assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"
    r = _cli("mount", *map(str, layers), str(mnt))
    assert r.returncode == 1 and "already a mount point" in r.stderr
    assert _cli("umount", str(mnt)).returncode == 0
    assert not server.is_mounted(str(mnt))
    r = _cli("umount", str(mnt))
    assert r.returncode == 1 and "not mounted" in r.stderr


def test_cli_mount_bad_layer_is_a_clear_error(tmp_path, cli_mounts):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    r = _cli("mount", "--log", str(tmp_path / "log"), str(tmp_path / "missing"), str(mnt))
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert not server.is_mounted(str(mnt))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("writable", [False, True])
def test_cli_mount_log_file_exists_when_the_command_returns(tmp_path, cli_mounts, writable):
    """``mount --log FILE``: FILE exists as soon as the command returned (a script
    may check it at once), what was in it stays, and the server appends to it."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    up, wk = tmp_path / "up", tmp_path / "wk"
    rw = ["--upper", str(up), "--work", str(wk)] if writable else []
    for i in range(3):
        mnt, log = tmp_path / f"mnt{i}", tmp_path / f"log{i}"
        for d in (mnt, up, wk):
            d.mkdir(exist_ok=True)
        cli_mounts.append(mnt)
        if i == 2:
            log.write_text("kept\n")
        r = _cli("mount", "--log", str(log), *rw, *map(str, layers), str(mnt))
        assert r.returncode == 0, r.stderr
        assert log.exists()
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"
        assert _cli("umount", str(mnt)).returncode == 0
        deadline = time.monotonic() + 30
        while "stopped" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert "serving" in text and "stopped" in text, text
        assert text.startswith("kept\n") == (i == 2)


@pytest.mark.timeout(120)
def test_cli_mount_log_fifo_never_blocks_the_server(tmp_path, cli_mounts):
    """``mount --log FIFO`` with nobody reading: the mount is live at once, the
    lines wait in the pipe for a reader that comes later, and a pipe left full
    drops lines instead of stopping the server (it would hang every process
    that touches the mount)."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    mnt, fifo = tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    os.mkfifo(fifo)
    cli_mounts.append(mnt)
    r = _cli("mount", "--log", str(fifo), *map(str, layers), str(mnt))
    assert r.returncode == 0, r.stderr
    assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"
    (pid,) = mounts.servers_of(mnt)
    for _ in range(2000):         # SIGUSR1 logs the request counts: ~100 kB, > a pipe
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1)
    for _ in range(3):                  # still served, with the pipe full
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        text = os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)
    assert "serving" in text and "requests {" in text, text[:500]
    assert _cli("umount", str(mnt)).returncode == 0
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


@pytest.mark.timeout(120)
def test_cli_mount_default_log_goes_with_a_quiet_mount(tmp_path, cli_mounts):
    """Without --log the server logs to /run/mergefs/mount-NAME.log (default_log_path):
    there while mounted; removed at a clean unmount when it holds only INFO lines, so
    a host running many containers does not keep one file per container; kept when
    something else was written to it (here a warning line, as a server's would be)."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    for kept in (False, True):
        mnt = tmp_path / f"mnt-{kept}"
        mnt.mkdir()
        cli_mounts.append(mnt)
        log = Path(server.default_log_path(str(mnt)))
        log.unlink(missing_ok=True)
        r = _cli("mount", *map(str, layers), str(mnt))
        assert r.returncode == 0, r.stderr
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"
        assert "INFO serving" in log.read_text()
        if kept:
            with open(log, "a") as f:
                f.write("2026-01-01 00:00:00,000 mergefs[1] WARNING something to look at\n")
        pid = next(int(p) for p in os.listdir("/proc") if p.isdigit()
                   and _cmdline(int(p)).endswith(str(mnt).encode()))
        assert _cli("umount", str(mnt)).returncode == 0
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.exists() == kept
        if kept:
            assert log.read_text().rstrip().endswith("INFO stopped")
            log.unlink()


def test_a_failed_mount_leaves_no_default_log(tmp_path, cli_mounts):
    """A mount that fails before its server logs anything (a missing layer, found
    when the view is built) leaves no empty /run/mergefs/mount-NAME.log behind."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    log = Path(server.default_log_path(str(mnt)))
    log.unlink(missing_ok=True)
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    r = _cli("-o", f"lowerdir={tmp_path / 'missing'},upperdir={up},workdir={wk}", str(mnt))
    assert r.returncode == 1 and "missing" in r.stderr, r.stderr
    assert not server.is_mounted(str(mnt))
    assert not log.exists()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0")
    except OSError:
        return b""


def test_cli_mount_log_in_a_missing_directory_is_a_clear_error(tmp_path, cli_mounts):
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    r = _cli("mount", "--log", str(tmp_path / "no/such/log"), *map(str, layers), str(mnt))
    assert r.returncode == 1 and "log" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not server.is_mounted(str(mnt))


@pytest.mark.timeout(120)
def test_cli_mount_premounted_writable_squash_and_signal(tmp_path, cli_mounts):
    """Root's fast path (the CLI mounts /dev/fuse, the forked server adopts it):
    a writable mount with --squash-uid serves the spec, and SIGTERM to the
    server unmounts it (libfuse does not unmount what it did not mount)."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    mnt, up, wk = (tmp_path / n for n in ("mnt", "up", "wk"))
    for d in (mnt, up, wk):
        d.mkdir()
    cli_mounts.append(mnt)
    r = _cli("mount", "--log", str(tmp_path / "log"), "--upper", str(up), "--work", str(wk),
             "--squash-uid", "4321", *map(str, layers), str(mnt))
    assert r.returncode == 0, r.stderr
    assert (mnt / "etc/hosts").stat().st_uid == 4321
    (mnt / "new").write_bytes(b"x")
    assert (up / "new").read_bytes() == b"x"
    info = server.mount_at(str(mnt))
    assert info is not None and info["fstype"] == "fuse.mergefs"
    log = (tmp_path / "log").read_text()           # "... mergefs[PID] INFO serving ..."
    pid = int(log.split("mergefs[", 1)[1].split("]", 1)[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while server.is_mounted(str(mnt)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.is_mounted(str(mnt))


def test_mount_helper_convention(tmp_path, cli_mounts):
    """mount -t fuse.mergefs mergefs MNT -o lowerdir=TOP:...:BOTTOM (via mount.fuse.mergefs)."""
    require("mount.fuse3")
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    lowerdir = ":".join(str(l) for l in reversed(layers))
    opts = f"lowerdir={lowerdir},rw,dev,suid,nodev,nosuid,allow_other,default_permissions"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    # mount.fuse3 runs the program named by the type from PATH
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    r = subprocess.run(["mount.fuse3", "mergefs", str(mnt), "-t", "mergefs", "-o", opts],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (mnt / "etc/passwd").read_bytes() == b"root:x:0:0:new\n"
    assert subprocess.run(["umount", str(mnt)]).returncode == 0
    # mount(8) uses a fixed PATH: the installed /sbin/mount.fuse.mergefs is what it finds
    helper = tmp_path / "sbin"
    helper.mkdir()
    _cli("install-mount-helper", "--dir", str(helper), check=True)
    installed = "/sbin/mount.fuse.mergefs"
    if os.path.exists(installed):
        pytest.skip(f"{installed} exists; not replacing it")
    shutil.copy(helper / "mount.fuse.mergefs", installed)
    try:
        r = subprocess.run(["mount", "-t", "fuse.mergefs", "mergefs", str(mnt), "-o", opts],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(mnt / "etc")) == ["hosts", "link", "passwd", "shadow"]
    finally:
        os.unlink(installed)
        if server.is_mounted(str(mnt)):
            subprocess.run(["umount", str(mnt)])


def test_translate_mount_helper_argv():
    from mergefs.cli.cmd_mount_helper import is_mount_helper_call, translate
    argv = ["mergefs", "/m", "-o", "rw,lowerdir=/t:/b,upperdir=/u,workdir=/w,allow_other,nodev"]
    assert is_mount_helper_call(argv)
    assert translate(argv) == ["mount", "--upper", "/u", "--work", "/w", "--allow-other",
                               "-o", "nodev", "/b", "/t", "/m"]
    assert not is_mount_helper_call(["mount", "/a", "/m"])
    from mergefs.errors import UsageError
    with pytest.raises(UsageError):
        translate(["mergefs", "/m", "-o", "lowerdir=/a,bogus"])


def test_cli_mount_store_ref(tmp_path, cli_mounts):
    """A LAYER without '/' is a store ref, served through Snapshotter.mount_spec."""
    snapshotter = pytest.importorskip("snapshotter")
    root = tmp_path / "store"
    layer = materialise_stack([LayerSpec().file("hello", b"from the store")], tmp_path / "l")[0]
    with snapshotter.Snapshotter(str(root)) as sn:
        sn.import_(str(layer), name="greeting")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    r = _cli("--root", str(root), "mount", "--log", str(tmp_path / "log"), "greeting", str(mnt))
    assert r.returncode == 0, r.stderr
    assert (mnt / "hello").read_bytes() == b"from the store"
    assert _cli("umount", str(mnt)).returncode == 0


def test_server_spawned_when_fork_is_unsafe(tmp_path, union_mount, monkeypatch):
    """Inside a trio loop or a threaded process, start() runs a fresh interpreter."""
    monkeypatch.setattr(server, "_can_fork", lambda: False)
    mnt = union_mount(materialise_stack(sample_stack(), tmp_path))
    assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"


def test_U7_next_start_cleans_a_dead_mount(tmp_path, union_mount):
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    mnt = union_mount(layers)
    pid = union_mount.started[-1][1]
    os.stat(mnt)                                       # the root's attributes are now cached
    os.listdir(mnt)
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):                                 # reap it; the dead mount stays
        time.sleep(0.01)
    assert server.is_mounted(str(mnt))
    union_mount(layers, mnt=mnt)
    assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"


def test_crash_litter_in_work_dir_is_swept(tmp_path, union_mount):
    layers = materialise_stack([LayerSpec().file("f", b"1")], tmp_path / "layers")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    (tmp_path / "wk/#mergefs-1-1").write_bytes(b"half a copy")
    (tmp_path / "wk/#mergefs-1-2").mkdir()
    (tmp_path / "wk/keep").write_bytes(b"not ours")
    mnt = union_mount(layers, upper=tmp_path / "up", work=tmp_path / "wk")
    assert sorted(os.listdir(tmp_path / "wk")) == ["keep"]
    assert os.listdir(mnt) == ["f"]


@pytest.mark.slow
@pytest.mark.timeout(600)     # builds pyfuse3 from source: minutes on a loaded machine
@needs("gcc", "libfuse3-dev")
def test_no_open_with_inode_fh_pyfuse3(tmp_path, cli_mounts):
    """The no-open lever end to end: the patched pyfuse3 build, same view as the kernel."""
    tools = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
    sys.path.insert(0, os.path.abspath(tools))
    try:
        from pyfuse3_inode_fh import build
    finally:
        sys.path.pop(0)
    patched = build(str(tmp_path / "pyfuse3"))
    assert "importlib.metadata" not in (Path(patched) / "pyfuse3/_pyfuse3.py").read_text()
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    cli_mounts.append(mnt)
    r = _cli("mount", "--log", str(log), *map(str, layers), str(mnt),
             env=dict(os.environ, PYTHONPATH=patched))
    assert r.returncode == 0, r.stderr
    view = tree.capture(mnt)
    assert tree.capture(mnt) == view                    # warm: served from the kernel's caches
    (tmp_path / "ovl").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl") as ovl:
        tree.assert_same(view, tree.capture(ovl), "no-open union vs kernel overlayfs")
    assert _cli("umount", str(mnt)).returncode == 0
    text = log.read_text()
    assert "no-open" in text and "Traceback" not in text


def test_cli_mount_foreground(tmp_path, cli_mounts):
    layers = materialise_stack(sample_stack(), tmp_path / "layers")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    proc = subprocess.Popen([sys.executable, "-m", "mergefs", "mount", "--foreground",
                             *map(str, layers), str(mnt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not server.is_mounted(str(mnt)) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"
        assert _cli("umount", str(mnt)).returncode == 0
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_600_layers_on_a_mount(tmp_path, union_mount):
    """More layers than kernel overlayfs takes (500): the union serves them all."""
    specs = [LayerSpec().file(f"f{i}", str(i).encode()).file("shared", str(i).encode())
             for i in range(600)]
    specs[599].whiteout("f0")
    mnt = union_mount(materialise_stack(specs, tmp_path / "layers"))
    names = os.listdir(mnt)
    assert len(names) == 600 and "f0" not in names
    assert (mnt / "shared").read_bytes() == b"599" and (mnt / "f1").read_bytes() == b"1"


@pytest.fixture
def foreign_mounts():
    """Mount points of non-mergefs mounts a test made; lazily unmounted in teardown."""
    mnts = []
    yield mnts
    for mnt in reversed(mnts):
        if server.is_mounted(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _assert_refused(mnt):
    r = _cli("umount", str(mnt))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "not a mergefs mount" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert server.is_mounted(str(mnt))


def test_umount_refuses_a_tmpfs(tmp_path, foreign_mounts):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    foreign_mounts.append(mnt)
    (mnt / "f").write_bytes(b"kept")
    _assert_refused(mnt)
    assert (mnt / "f").read_bytes() == b"kept"


def test_umount_refuses_a_busy_tmpfs(tmp_path, foreign_mounts):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    foreign_mounts.append(mnt)
    with open(mnt / "busy", "w"):
        _assert_refused(mnt)


def test_umount_refuses_a_kernel_overlay(tmp_path, foreign_mounts):
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    mnt = tmp_path / "ovl"
    mnt.mkdir()
    with mounts.overlay_mount(layers, mnt):
        foreign_mounts.append(mnt)
        _assert_refused(mnt)
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1\n"


def test_umount_refuses_a_plain_directory_and_a_missing_path(tmp_path):
    r = _cli("umount", str(tmp_path))
    assert r.returncode == 1 and "not mounted" in r.stderr
    r = _cli("umount", str(tmp_path / "missing"))
    assert r.returncode == 1 and "not mounted" in r.stderr


def test_umount_takes_a_mergefs_mount_in_use(tmp_path, union_mount):
    mnt = union_mount(materialise_stack(sample_stack(), tmp_path))
    with open(mnt / "etc/hosts"):
        r = _cli("umount", str(mnt))
    assert r.returncode == 0, r.stderr
    assert not server.is_mounted(str(mnt))


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _as_nobody(*argv):
    return subprocess.run(AS_NOBODY + list(argv), capture_output=True, text=True, timeout=30)


def _multi_user_stack(tmp_path):
    spec = (LayerSpec().file("secret", b"s", mode=0o600).file("public", b"p", mode=0o644)
            .dir("shared", mode=0o1777))
    return materialise_stack([spec], tmp_path / "layers")


def _check_second_user(mnt):
    r = _as_nobody("cat", str(mnt / "public"))
    assert (r.returncode, r.stdout) == (0, "p"), r.stderr
    r = _as_nobody("cat", str(mnt / "secret"))
    assert r.returncode != 0 and "Permission denied" in r.stderr       # default_permissions
    r = _as_nobody("sh", "-c", f"echo n > {mnt}/shared/mine && cat {mnt}/shared/mine")
    assert (r.returncode, r.stdout) == (0, "n\n"), r.stderr
    st = os.stat(mnt / "shared/mine")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    r = _as_nobody("touch", str(mnt / "not-mine"))                     # root's 0755 root dir
    assert r.returncode != 0 and "Permission denied" in r.stderr


def _check_private(mnt):
    r = _as_nobody("cat", str(mnt / "public"))
    assert r.returncode != 0 and "Permission denied" in r.stderr


def _rw_dirs(base):
    for d in ("up", "wk"):
        (base / d).mkdir(parents=True)
    return base / "up", base / "wk"


def test_root_cli_mount_is_multi_user_unless_private(tmp_path, public_dir, cli_mounts):
    """Issue 10 item 2: root's mount lets other users in, the kernel checks permissions."""
    layers = _multi_user_stack(tmp_path)
    up, wk = _rw_dirs(tmp_path / "rw")
    mnt = public_dir / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    r = _cli("mount", "--log", str(tmp_path / "log"), "--upper", str(up), "--work", str(wk),
             *map(str, layers), str(mnt))
    assert r.returncode == 0, r.stderr
    _check_second_user(mnt)
    assert _cli("umount", str(mnt)).returncode == 0
    r = _cli("mount", "--private", "--log", str(tmp_path / "log"), *map(str, layers), str(mnt))
    assert r.returncode == 0, r.stderr
    _check_private(mnt)
    assert (mnt / "public").read_bytes() == b"p"
    assert _cli("umount", str(mnt)).returncode == 0
    r = _cli("mount", "--private", "--allow-other", *map(str, layers), str(mnt))
    assert r.returncode == 1 and "contradict" in r.stderr


def test_mount_fuse_convention_is_multi_user_unless_private(tmp_path, public_dir, cli_mounts):
    """`mount -t fuse.mergefs` (through mount.fuse3) by root: multi-user; -o private: not."""
    require("mount.fuse3")
    layers = _multi_user_stack(tmp_path)
    up, wk = _rw_dirs(tmp_path / "rw")
    mnt = public_dir / "mnt"
    mnt.mkdir()
    cli_mounts.append(mnt)
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    base = f"lowerdir={layers[0]},upperdir={up},workdir={wk}"
    for extra, check in (("", _check_second_user), (",private", _check_private)):
        r = subprocess.run(["mount.fuse3", "mergefs", str(mnt), "-t", "mergefs",
                            "-o", base + extra], capture_output=True, text=True, env=env,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        check(mnt)
        assert _cli("umount", str(mnt)).returncode == 0
