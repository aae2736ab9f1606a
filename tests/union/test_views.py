"""Views: many merged views in one FUSE mount that share lower files' inodes (issue 9).

Real mounts through /dev/fuse, kernel overlayfs as the oracle; the server is
``mergefs views serve`` in a child process (tests/union/viewsrv.py).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from mergefs.errors import AlreadyExists, FailedPrecondition, NotFound
from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs
from .test_readonly import random_stack, sample_stack
from .test_writable import normalised
from .viewsrv import ViewsServer, serving

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]


@pytest.fixture
def views(tmp_path):
    with serving(tmp_path / "srv") as srv:
        yield srv


def writable(tmp_path: Path, name: str) -> tuple[Path, Path]:
    up, wk = tmp_path / f"{name}-up", tmp_path / f"{name}-wk"
    up.mkdir()
    wk.mkdir()
    return up, wk


@pytest.mark.parametrize("seed", range(4))
def test_views_equal_kernel_overlay(seed, tmp_path, views):
    rng = random.Random(seed)
    specs = random_stack(rng, rng.randint(2, 5)) + [sample_stack()[0]]
    fmt = ("overlay", "oci")[seed % 2]
    ours = materialise_stack(specs, tmp_path / "ours", fmt)
    oracle = materialise_stack(specs, tmp_path / "oracle", "overlay")
    ro = views.add("ro", ours)
    up, wk = writable(tmp_path, "rw")
    oup, owk = writable(tmp_path, "ovl-rw")
    for d in (up, oup):       # an upper's root supplies the merged root's attributes
        os.utime(d, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    rw = views.add("rw", ours, up, wk)
    (tmp_path / "ovl").mkdir()
    (tmp_path / "ovl-w").mkdir()
    with mounts.overlay_mount(oracle, tmp_path / "ovl") as ovl:
        tree.assert_same(tree.capture(ro), tree.capture(ovl), "read-only view vs kernel overlay")
    with mounts.overlay_mount(oracle, tmp_path / "ovl-w", upper=oup, work=owk) as ovl:
        tree.assert_same(tree.capture(rw), tree.capture(ovl), "writable view vs kernel overlay")


def _change(root: Path) -> None:
    """The same changes, applied to a view and to a kernel overlay."""
    with open(root / "etc/passwd", "a") as f:
        f.write("daemon:x:1:1\n")
    os.chmod(root / "etc/shadow", 0o640)
    os.unlink(root / "var/keep")
    (root / "newdir").mkdir()
    (root / "newdir/f").write_bytes(b"new")
    os.rename(root / "usr/bin/env", root / "usr/env")
    os.truncate(root / "bin/busybox", 10)


def test_copy_up_in_one_view_is_isolated(tmp_path, views):
    specs = sample_stack()
    layers = materialise_stack(specs, tmp_path / "layers", "overlay")
    a = views.add("a", layers, *writable(tmp_path, "a"))
    b = views.add("b", layers, *writable(tmp_path, "b"))
    ro = views.add("ro", layers)
    before_b, before_ro = tree.capture(b), tree.capture(ro)
    for v in (a, b, ro):             # the kernel has looked up (and cached) every file
        for p in ("etc/passwd", "etc/shadow", "bin/busybox", "usr/bin/env"):
            (v / p).read_bytes()
    import time
    since = time.time_ns()
    _change(a)
    tree.assert_same(tree.capture(b), before_b, "the other writable view")
    tree.assert_same(tree.capture(ro), before_ro, "the read-only view")
    assert (b / "etc/passwd").read_bytes() == b"root:x:0:0:new\n"
    assert (a / "etc/passwd").read_bytes().endswith(b"daemon:x:1:1\n")
    up, wk = writable(tmp_path, "ovl")
    (tmp_path / "ovl").mkdir()
    # index=on: a copy-up keeps hardlinks (bin/sh, bin/busybox) one file, as mergefs
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=up, work=wk,
                              options=("index=on",)) as ovl:
        _change(ovl)
        expected = tree.capture(ovl)
    tree.assert_same(normalised(tree.capture(a), since), normalised(expected, since),
                     "changed view vs kernel overlay, same changes")
    # a changed file left the shared inode (in every writable view: the kernel does
    # not say which view wrote); files nobody wrote are still shared by all views
    assert os.stat(a / "etc/passwd").st_ino != os.stat(b / "etc/passwd").st_ino
    assert len({os.stat(v / "etc/hosts").st_ino for v in (a, b, ro)}) == 1


def test_writes_through_a_shared_inode_in_a_read_only_view_fail(tmp_path, views):
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    ro1, ro2 = views.add("ro1", layers), views.add("ro2", layers)
    with pytest.raises(OSError) as exc:
        open(ro1 / "etc/passwd", "a")
    assert exc.value.errno == 30                                         # EROFS
    assert (ro2 / "etc/passwd").read_bytes() == b"root:x:0:0:new\n"


def _resident(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_one_inode_and_one_page_cache_copy_for_a_lower_file(tmp_path, views):
    size = 32 << 20
    base = LayerSpec().file("data/big", os.urandom(1 << 20) * 32).file("etc/x", b"x")
    layers = materialise_stack([base, LayerSpec().file("etc/y", b"y")], tmp_path / "l", "oci")
    a = views.add("a", layers, *writable(tmp_path, "a"))
    b = views.add("b", layers, *writable(tmp_path, "b"))
    ro = views.add("ro", layers)
    sts = [os.stat(v / "data/big") for v in (a, b, ro)]
    assert len({s.st_ino for s in sts}) == 1 and sts[0].st_size == size
    assert _resident(b / "data/big") == 0 or True       # may be warm from a previous run
    (a / "data/big").read_bytes()
    # the kernel holds one inode: the pages read through view a are those of view b
    assert _resident(b / "data/big") >= size * 0.9
    assert _resident(ro / "data/big") >= size * 0.9
    assert os.stat(a / "data").st_ino != os.stat(b / "data").st_ino   # directories are per view


def _mount_flags(target: Path) -> set[str]:
    from mergefs import mounttable
    return set(mounttable.entry_at(target).options.split(","))


def test_remove_a_view_while_another_views_bind_stays(tmp_path, views):
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    a = views.add("a", layers, *writable(tmp_path, "a"))
    b = views.add("b", layers, *writable(tmp_path, "b"))
    first = os.stat(a / "etc/passwd").st_ino        # a is the first view to show the file
    assert os.stat(b / "etc/passwd").st_ino == first   # b's dentry keeps the inode known
    ta = views.bind(a, tmp_path / "bind-a")
    tb = views.bind(b, tmp_path / "bind-b")
    assert _mount_flags(views.mnt) >= {"nosuid", "nodev"}       # libfuse's defaults
    assert not _mount_flags(tb) & {"nosuid", "nodev"}           # the bind allows both
    (tb / "proc").mkdir()
    inner = tb / "proc"
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    views.binds.append(str(inner))
    (inner / "marker").write_text("m")
    with pytest.raises(FailedPrecondition):
        views.remove("a")                          # its bind is still there
    views.unbind(ta)
    views.remove("a")
    assert sorted(os.listdir(views.mnt)) == ["b"]
    # b, its bind and the mount inside it are untouched
    assert (inner / "marker").read_text() == "m"
    assert (tb / "etc/passwd").read_bytes() == b"root:x:0:0:new\n"   # served through b now
    assert os.stat(tb / "etc/passwd").st_ino == first
    assert mounts.is_mounted(inner) and mounts.is_mounted(tb)
    with pytest.raises(AlreadyExists):
        views.add("a", layers)                     # a name is never reused for another view
    with pytest.raises(NotFound):
        views.remove("nope")
    subprocess.run(["umount", str(inner)], check=True)
    views.binds.remove(str(inner))
    views.unbind(tb)
    views.remove("b")
    assert os.listdir(views.mnt) == []


def test_control_socket_rejects_bad_input(tmp_path, views):
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(views.control)
        s.sendall(b"\x00garbage\n{\"op\": \"add\"}\n")
        f = s.makefile()
        replies = [f.readline(), f.readline()]
    assert all('"ok": false' in r and '"invalid"' in r for r in replies), replies
    with pytest.raises(ValueError):
        views.call(op="add", name="../x", spec={"lowers": [str(tmp_path)]})
    with pytest.raises(ValueError):
        views.call(op="frobnicate")
    assert views.call(op="list")["views"] == []


def test_a_rename_in_the_first_view_does_not_move_the_shared_file(tmp_path, views):
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    a = views.add("a", layers, *writable(tmp_path, "a"))
    b = views.add("b", layers)
    ino = os.stat(a / "x/attr").st_ino                # a shows it first: the gid's source
    assert os.stat(b / "x/attr").st_ino == ino
    os.rename(a / "x", a / "y")                       # a merged dir: copied, then whited out
    assert (a / "y/attr").read_bytes() == b"x"
    assert (b / "x/attr").read_bytes() == b"x"
    assert os.getxattr(b / "x/attr", "user.mergefs") == b"yes"
    assert not (a / "x").exists()


VIEWMOUNT_SCRIPT = r'''
import os, sys, threading
from mergefs.mountspec import MountSpec
from mergefs.union.mountctl import ViewMount
mnt, lowers = sys.argv[1], tuple(sys.argv[2:])
with ViewMount(mnt, allow_other=True) as vm:
    paths = {}
    def add(i):
        paths[i] = vm.add_view(f"v{i}", MountSpec(lowers=lowers))
    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    inos = {os.stat(os.path.join(p, "etc/passwd")).st_ino for p in paths.values()}
    assert len(inos) == 1, inos
    assert [v["name"] for v in vm.list_views()] == [f"v{i}" for i in range(8)]
    vm.remove_view("v3")
    assert sorted(os.listdir(mnt)) == [f"v{i}" for i in range(8) if i != 3]
    try:
        vm.add_view("v3", MountSpec(lowers=lowers))
    except FileExistsError:
        pass
    else:
        raise SystemExit("a removed name was reused")
print("ok")
'''


def test_viewmount_python_api_from_threads(tmp_path):
    """The in-process API the service uses: a mount served by a thread, views added
    concurrently from other threads (in a child: pyfuse3 serves one mount per process)."""
    import sys
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run([sys.executable, "-c", VIEWMOUNT_SCRIPT, str(mnt), *map(str, layers)],
                           capture_output=True, text=True, timeout=60)
    finally:
        if mounts.is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert not mounts.is_mounted(mnt)


def _cli(*args) -> subprocess.CompletedProcess:
    import sys
    return subprocess.run([sys.executable, "-m", "mergefs", *args], capture_output=True,
                          text=True, timeout=60)


def test_views_cli_add_bind_rm_and_store_refs(tmp_path, views):
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    root, c = str(tmp_path / "store"), ["--control", views.control]
    r = _cli("views", "add", *c, "dirs", *map(str, layers))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(views.mnt / "dirs")
    assert _cli("--root", root, "import", str(layers[0]), "--name", "base").returncode == 0
    r = _cli("--root", root, "views", "add", *c, "--rw", "fromstore", "base")
    assert r.returncode == 0, r.stderr
    (views.mnt / "fromstore/new").write_text("n")                  # writable, upper in the store
    assert not (views.mnt / "dirs/new").exists()
    target = tmp_path / "bound"
    target.mkdir()
    assert _cli("views", "bind", *c, "dirs", str(target)).returncode == 0
    views.binds.append(str(target))
    listed = json.loads(_cli("views", "ls", *c, "--json").stdout)
    assert {v["name"]: v["mounts"] for v in listed} == {"dirs": [str(target)], "fromstore": []}
    r = _cli("views", "rm", *c, "dirs")
    assert r.returncode == 1 and "still mounted" in r.stderr and r.stderr.count("\n") == 1
    assert _cli("views", "rm", *c, "nope").returncode == 3
    views.unbind(target)
    assert _cli("views", "rm", *c, "dirs").returncode == 0
    assert _cli("views", "rm", *c, "fromstore").returncode == 0


def test_a_shared_file_outlives_its_first_view_across_stacks(tmp_path, views):
    """Two images that share a bottom layer share its files; removing the view that
    showed a file first leaves it readable in a view of the other image."""
    base = materialise_stack(sample_stack()[:1], tmp_path / "base", "overlay")
    extra = materialise_stack([LayerSpec().file("only/here", b"h")], tmp_path / "extra", "overlay")
    a = views.add("a", base)
    b = views.add("b", base + extra)
    ino = os.stat(a / "etc/shadow").st_ino
    assert os.stat(b / "etc/shadow").st_ino == ino
    views.remove("a")
    assert (b / "etc/shadow").read_bytes() == b"secret"
    assert os.stat(b / "etc/shadow").st_ino == ino


LOWER_FILES = ("etc/passwd", "etc/shadow", "etc/hosts", "bin/busybox", "bin/sh",
               "usr/bin/env", "lib", "run/fifo")


def test_U8_a_lower_file_keeps_its_number_across_views_copy_up_and_restarts(tmp_path):
    """A lower file shown unchanged has one number in every view and after the
    service restarts (views re-added in another order, other files looked up
    first); a file copied up in one view leaves it for a number of its own, while
    the other views keep showing the lower file under the old number."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    up_a = writable(tmp_path, "a")
    srv = ViewsServer(tmp_path / "srv1")
    try:
        a, ro = srv.add("a", layers, *up_a), srv.add("ro", layers)
        before = {p: os.lstat(a / p).st_ino for p in LOWER_FILES}
        assert {p: os.lstat(ro / p).st_ino for p in LOWER_FILES} == before
        assert before["bin/sh"] == before["bin/busybox"]             # hardlinks: one number
        assert len(set(before.values())) == len(LOWER_FILES) - 1
        with open(a / "etc/passwd", "a") as f:                        # copy-up in view a
            f.write("daemon:x:1:1\n")
        copied = os.lstat(a / "etc/passwd").st_ino
        assert copied != before["etc/passwd"]
        assert os.lstat(ro / "etc/passwd").st_ino == before["etc/passwd"]
        (a / "etc/new").write_bytes(b"made in a")                    # a view's own file
        os.link(a / "etc/new", a / "etc/new2")
        os.listdir(a / "etc")                                         # readdirplus first
        made = os.lstat(a / "etc/new").st_ino
        assert os.lstat(a / "etc/new2").st_ino == made
        assert made not in (*before.values(), copied)
    finally:
        srv.stop()
    assert not srv.errors(), srv.errors()
    srv = ViewsServer(tmp_path / "srv2")
    try:
        ro2 = srv.add("ro2", layers)
        for _ in os.walk(ro2):                                        # other numbers first
            pass
        os.lstat(ro2 / "var/keep")
        a = srv.add("a", layers, *up_a)
        after = {p: os.lstat(a / p).st_ino for p in LOWER_FILES if p != "etc/passwd"}
        assert after == {p: n for p, n in before.items() if p != "etc/passwd"}
        assert {p: os.lstat(ro2 / p).st_ino for p in LOWER_FILES} == before
        for _ in os.walk(a):
            pass
        assert os.lstat(a / "etc/new2").st_ino == os.lstat(a / "etc/new").st_ino == made
        seen = {made} | set(before.values()) | {os.lstat(v / d).st_ino for v in (a, ro2)
                                       for d in (".", "etc", "bin", "usr")}
        assert os.lstat(a / "etc/passwd").st_ino not in seen
        assert os.lstat(a / "etc/passwd").st_ino == copied                # kept its number
    finally:
        srv.stop()
    assert not srv.errors(), srv.errors()


def test_U8_hardlinks_stay_one_file_after_a_copy_up_in_a_writable_view(tmp_path):
    """A copy-up through bin/busybox links bin/sh (shown before under the shared
    lower number) and bin/sh2 (never looked up): one number, one content in the
    writable view, as kernel overlayfs with index=on shows them, and after the
    service restarts; the read-only view keeps showing the lower file."""
    specs = sample_stack()
    specs[0].hardlink("bin/sh2", "bin/busybox")
    layers = materialise_stack(specs, tmp_path / "layers", "overlay")
    up_a = writable(tmp_path, "a")
    srv = ViewsServer(tmp_path / "srv1")
    try:
        a, ro = srv.add("a", layers, *up_a), srv.add("ro", layers)
        lower = os.lstat(ro / "bin/sh").st_ino
        assert os.lstat(a / "bin/sh").st_ino == lower                # shared, cached
        with open(a / "bin/busybox", "ab") as f:
            f.write(b"+")
        names = ("bin/busybox", "bin/sh", "bin/sh2")

        def shown():
            return {n: (os.lstat(a / n).st_ino, (a / n).read_bytes()) for n in names}
        # bin/sh's dentry, cached as the shared lower file, is dropped by an
        # invalidation the copy-up queues (pyfuse3's notify thread: a synchronous
        # one inside the WRITE could deadlock with a lookup in bin/); it lands
        # within milliseconds of the write's reply, not before it
        seen, deadline = shown(), time.monotonic() + 2
        while len(set(seen.values())) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
            seen = shown()
        assert len(set(seen.values())) == 1, {n: (i, len(d)) for n, (i, d) in seen.items()}
        assert seen["bin/sh"][1] == b"BB" * 100 + b"+"
        assert os.lstat(a / "bin/sh").st_nlink == 3
        assert (ro / "bin/sh2").read_bytes() == b"BB" * 100
        assert os.lstat(ro / "bin/sh2").st_ino == lower
    finally:
        srv.stop()
    assert not srv.errors(), srv.errors()
    srv = ViewsServer(tmp_path / "srv2")
    try:
        a = srv.add("a", layers, *up_a)
        assert {n: (os.lstat(a / n).st_ino, (a / n).read_bytes()) for n in names} == seen
    finally:
        srv.stop()
    assert not srv.errors(), srv.errors()


VIEW_DIRS = (".", "etc", "bin", "bin/sub", "usr", "usr/bin", "lib2", "var", "x")


def test_U8_directories_and_view_roots_keep_their_numbers_across_restarts(tmp_path):
    """As kernel overlayfs keeps a directory's st_ino across a remount, a view's
    root and directories (lower, copied up, made by the view) keep theirs when the
    service restarts and adds the view again, in another order, after other views."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    up_a = writable(tmp_path, "a")
    srv = ViewsServer(tmp_path / "srv1")
    try:
        a, ro = srv.add("a", layers, *up_a), srv.add("ro", layers)
        os.chmod(a / "etc", 0o750)                                      # copied up
        (a / "made/deeper").mkdir(parents=True)                         # made by the view
        dirs = VIEW_DIRS + ("made", "made/deeper")
        before = {p: os.lstat(a / p).st_ino for p in dirs}
        before_ro = {p: os.lstat(ro / p).st_ino for p in VIEW_DIRS}
        assert len(set(before.values()) | set(before_ro.values())) == len(dirs) + len(VIEW_DIRS)
    finally:
        srv.stop()
    assert not srv.errors(), srv.errors()
    srv = ViewsServer(tmp_path / "srv2")
    try:
        other = srv.add("other", layers, *writable(tmp_path, "other"))
        for _ in os.walk(other):                                        # other numbers first
            pass
        ro = srv.add("ro", layers)
        assert {p: os.lstat(ro / p).st_ino for p in VIEW_DIRS} == before_ro
        a = srv.add("a", layers, *up_a)
        assert {p: os.lstat(a / p).st_ino for p in dirs} == before
    finally:
        srv.stop()
    assert not srv.errors(), srv.errors()


def test_a_number_the_kernel_still_holds_is_not_given_to_a_new_view(tmp_path, views):
    """A view removed while a process still holds one of its directories open; a
    new view over the same upper would derive the same numbers: the held one goes
    to the new view only once the kernel forgot it."""
    layers = materialise_stack(sample_stack(), tmp_path / "layers", "overlay")
    up, wk = writable(tmp_path, "a")
    a = views.add("a", layers, up, wk)
    fd = os.open(a / "etc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        held = os.fstat(fd).st_ino
        views.remove("a")
        a2 = views.add("a2", layers, up, wk)
        assert os.lstat(a2 / "etc").st_ino != held
        assert os.fstat(fd).st_ino == held
    finally:
        os.close(fd)
