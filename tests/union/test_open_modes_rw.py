"""The file data path of writable mounts in both open modes (U4).

With the v4 pyfuse3 build a writable mount runs no-open: the kernel sends no
OPEN/RELEASE/OPENDIR/RELEASEDIR, reads, writes and listings arrive by inode,
``open(O_TRUNC)`` arrives as a SETATTR of size 0 (atomic O_TRUNC off), and a
lower file is copied up at its first write. Each test runs in both modes
(``union_mount``'s parameters) and, where it can, beside kernel overlayfs.
"""
from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from pyfuse3 import FUSEError

from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs, needs_overlay
from .conftest import stop_server
from .test_writable import normalised

pytestmark = [needs("fuse"), pytest.mark.timeout(180)]


def _writable(tmp_path, union_mount, specs, upper=None, work=None):
    layers = materialise_stack(specs, tmp_path / "layers", "overlay")
    upper, work = upper or tmp_path / "up", work or tmp_path / "wk"
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    return layers, union_mount(layers, upper=upper, work=work)


def test_U4a_open_with_O_TRUNC_truncates_a_lower_file(tmp_path, union_mount):
    """No-open: the truncation of open(O_TRUNC) must reach the server (as SETATTR)."""
    specs = [LayerSpec().file("d/a", b"lower a\n").file("d/b", b"lower b\n")
             .file("d/c", b"lower c\n")]
    layers, mnt = _writable(tmp_path, union_mount, specs)
    os.close(os.open(mnt / "d/a", os.O_WRONLY | os.O_TRUNC))
    fd = os.open(mnt / "d/b", os.O_RDWR | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    with open(mnt / "d/c", "r+b") as f:       # no O_TRUNC: the content stays
        f.write(b"L")
    assert [(mnt / f"d/{n}").read_bytes() for n in "abc"] == [b"", b"new", b"Lower c\n"]
    view = tree.capture(mnt)
    stop_server(mnt, union_mount.started[-1][1])
    (tmp_path / "ovl").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=tmp_path / "up",
                              work=tmp_path / "wk") as ovl:
        tree.assert_same(tree.capture(ovl), view, "kernel overlayfs over mergefs's upper")


def test_U4a_files_held_open_survive_unlink_and_rename_over(tmp_path, union_mount):
    """An open file whose name goes keeps its content for the holder, in both
    modes: a lower file, an upper file, one made here, one renamed over."""
    specs = [LayerSpec().file("low", b"lower\n").file("low2", b"second lower\n")
             .file("up", b"up\n").file("over", b"renamed over\n").file("src", b"src\n")]
    layers, mnt = _writable(tmp_path, union_mount, specs)
    (mnt / "up").write_bytes(b"upper now\n")          # copied up: an upper file
    (mnt / "made").write_bytes(b"made here\n")
    (mnt / "over").write_bytes(b"over, upper\n")
    held = {name: os.open(mnt / name, os.O_RDWR) for name in ("low", "up", "made", "over")}
    reader = os.open(mnt / "low2", os.O_RDONLY)
    try:
        for name in ("low", "up", "made"):
            os.unlink(mnt / name)
        os.unlink(mnt / "low2")
        os.rename(mnt / "src", mnt / "over")
        assert os.pread(held["low"], 100, 0) == b"lower\n"
        assert os.pread(reader, 100, 0) == b"second lower\n"
        for name, fd in held.items():
            os.pwrite(fd, b"W", 0)
            os.ftruncate(fd, 4)
            assert os.fstat(fd).st_size == 4
        assert [os.pread(held[n], 100, 0) for n in ("low", "up", "made", "over")] == \
            [b"Wowe", b"Wppe", b"Wade", b"Wver"]
        assert sorted(os.listdir(mnt)) == ["over"]     # no name came back
        assert (mnt / "over").read_bytes() == b"src\n"
    finally:
        for fd in list(held.values()) + [reader]:
            os.close(fd)
    view = tree.capture(mnt)
    stop_server(mnt, union_mount.started[-1][1])
    assert os.listdir(tmp_path / "wk") == []          # no copy left staged
    (tmp_path / "ovl").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=tmp_path / "up",
                              work=tmp_path / "wk") as ovl:
        tree.assert_same(tree.capture(ovl), view, "kernel overlayfs over mergefs's upper")


def _names_while_changing(d, removed: list, added: list) -> list:
    """List ``d`` with readdir(3) while removing and creating names between reads."""
    seen = []
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i % 300 == 100:          # between the kernel's getdents/READDIR batches
                gone = [n for n in sorted(os.listdir(d)) if n.startswith("f")][i % 7::50][:40]
                for n in gone:
                    os.unlink(os.path.join(d, n))
                    removed.append(n)
                for k in range(40):
                    n = f"new{i:05d}-{k:02d}-{'x' * 30}"
                    with open(os.path.join(d, n), "wb"):
                        pass
                    added.append(n)
    return seen


@needs_overlay
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_U4a_listing_while_names_come_and_go_then_rm_rf_as_kernel_overlay(tmp_path, union_mount):
    """A readdir pass sees every name that stays exactly once, whatever is
    created or removed meanwhile (no-open: offsets into a snapshot per pass);
    then ``rm -rf`` of the big directory, lower and upper names mixed."""
    spec = LayerSpec()
    for i in range(2000):
        spec = spec.file(f"big/f{i:05d}-{'y' * 40}", b"%d" % i)
    specs = [spec, LayerSpec().file("keep", b"k")]
    layers = materialise_stack(specs, tmp_path / "ours", "overlay")
    oracle = materialise_stack(specs, tmp_path / "oracle", "overlay")
    for d in ("up1", "wk1", "up2", "wk2", "ovl"):
        (tmp_path / d).mkdir()
    start = time.time_ns() - 5 * 10**9     # fs timestamps are coarse: leave a margin
    mnt = union_mount(layers, upper=tmp_path / "up1", work=tmp_path / "wk1")
    with mounts.overlay_mount(oracle, tmp_path / "ovl", upper=tmp_path / "up2",
                              work=tmp_path / "wk2") as ovl:
        for root in (mnt, ovl):
            for i in range(0, 2000, 3):         # some names copied up, some made here
                with open(root / f"big/f{i:05d}-{'y' * 40}", "ab") as f:
                    f.write(b"+")
            for i in range(300):
                (root / f"big/u{i:04d}").write_bytes(b"u")
            before = set(os.listdir(root / "big"))
            removed, added = [], []
            seen = _names_while_changing(root / "big", removed, added)
            assert len(seen) == len(set(seen)), f"{root}: a name came twice"
            stayed = before - set(removed)
            assert stayed <= set(seen), f"{root}: {len(stayed - set(seen))} names missed"
            assert set(seen) <= before | set(added), f"{root}: names never there"
            assert set(os.listdir(root / "big")) == stayed | set(added)
            r = subprocess.run(["rm", "-rf", str(root / "big")], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert sorted(os.listdir(root)) == ["keep"]
        view = tree.capture(mnt)
        tree.assert_same(normalised(view, start), normalised(tree.capture(ovl), start),
                         "mergefs vs kernel overlayfs")
    stop_server(mnt, union_mount.started[-1][1])
    with mounts.overlay_mount(oracle, tmp_path / "ovl", upper=tmp_path / "up1",
                              work=tmp_path / "wk2") as ovl:
        tree.assert_same(tree.capture(ovl), view, "kernel overlayfs over mergefs's upper")


@needs("root")
def test_U4a_no_space_for_a_copy_up_fails_the_write_or_open_and_leaves_nothing(tmp_path,
                                                                             union_mount):
    """ENOSPC while copying a lower file up: at open with real opens, at the first
    write with no-open; the merged file keeps the lower content, nothing is left
    in the upper or the work dir, and a later small write works."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        specs = [LayerSpec().file("big", b"b" * (1 << 20)).file("tiny", b"t\n")]
        layers, mnt = _writable(tmp_path, union_mount, specs, small / "up", small / "wk")
        with pytest.raises(OSError) as e:
            with open(mnt / "big", "ab") as f:
                f.write(b"more")
        assert e.value.errno == errno.ENOSPC
        assert (mnt / "big").read_bytes() == b"b" * (1 << 20)
        assert os.listdir(small / "up") == []
        assert os.listdir(small / "wk") == []
        with open(mnt / "tiny", "ab") as f:
            f.write(b"more\n")
        assert (mnt / "tiny").read_bytes() == b"t\nmore\n"
        assert os.listdir(small / "up") == ["tiny"]
    finally:
        for mnt_, pid, _ in union_mount.started:
            stop_server(mnt_, pid)          # before the tmpfs it writes to goes
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_U4a_writable_mounts_run_no_open_with_the_v4_build(tmp_path, union_mount):
    """The union tests exercise writable no-open: with the v4 pyfuse3 build (what
    tools/bootstrap.sh installs) the default mode serves writable mounts no-open,
    seen from outside: an open for writing alone never reaches the server, so it
    copies nothing up (docs/semantics.md, "Copy-up"); the first write does."""
    _, mnt = _writable(tmp_path, union_mount, [LayerSpec().file("f", b"f")])
    os.close(os.open(mnt / "f", os.O_WRONLY))
    assert (tmp_path / "up/f").exists() != union_mount.writable_no_open
    with open(mnt / "f", "ab") as f:
        f.write(b"+")
    assert (tmp_path / "up/f").read_bytes() == b"f+"
    if os.environ.get("MERGEFS_NO_OPEN") != "0":
        import pyfuse3
        from mergefs.union import server
        if os.path.exists(os.path.join(os.path.dirname(pyfuse3.__file__),
                                       server.INODE_FH_MARKER)):
            assert union_mount.writable_no_open, "bootstrap's pyfuse3 build is older than v4"


# -- handler level: a no-open writable UnionOperations driven directly ------
def _no_open_driver(tmp_path, specs):
    from mergefs.layer import Layer
    from mergefs.union.ops import UnionOperations
    from mergefs.union.writable import WritableView
    from .conftest import Driver
    layers = materialise_stack(specs, tmp_path / "layers", "overlay")
    for d in ("up", "wk"):
        (tmp_path / d).mkdir()
    view = WritableView([Layer(p) for p in layers], tmp_path / "up", tmp_path / "wk")
    return view, Driver(UnionOperations(view, no_open=True))


async def _readdir_call(drv, ino: int, offset: int, n: int) -> list:
    """One READDIR of at most ``n`` entries: [(name, next offset)]."""
    return [(name, next_id) for name, _, next_id in await drv.readdir_call(ino, offset, n)]


async def _pass(drv, ino: int, n: int) -> list:
    names, offset = [], 0
    while got := await _readdir_call(drv, ino, offset, n):
        names += [name for name, _ in got]
        offset = got[-1][1]
    return names


async def test_U4a_no_open_readdir_pass_is_a_snapshot(tmp_path):
    """Offsets of a pass index its own snapshot: names removed meanwhile are
    skipped, new ones wait for the next pass, the rest come exactly once, also
    while other passes of the same directory run in between."""
    spec = LayerSpec()
    for i in range(60):
        spec = spec.file(f"d/f{i:02d}", b"%d" % i)
    view, drv = _no_open_driver(tmp_path, [spec])
    try:
        d = await drv.lookup("d")
        for call in (drv.ops.open(d, os.O_RDONLY, drv.ctx), drv.ops.opendir(d, drv.ctx),
                     drv.ops.create(d, b"x", 0o644, os.O_WRONLY, drv.ctx)):
            with pytest.raises(FUSEError) as e:
                await call
            assert e.value.errno == errno.ENOSYS
        names = {b"f%02d" % i for i in range(60)}
        seen, offset, removed, added = [], 0, set(), set()
        while got := await _readdir_call(drv, d, offset, 7):
            seen += [n for n, _ in got]
            offset = got[-1][1]
            gone = {b"f%02d" % (len(seen) + 3), b"f%02d" % (len(seen) - 2)} & names - removed
            for name in sorted(gone):
                await drv.ops.unlink(d, name, drv.ctx)
            removed |= gone
            new = b"new%02d" % len(seen)
            drv.made(await drv.ops.mknod(d, new, 0o100644, 0, drv.ctx))
            added.add(new)
            other = await _pass(drv, d, 5)              # a whole pass meanwhile
            assert set(other) == names - removed | added
        assert len(seen) == len(set(seen))
        assert names - removed <= set(seen) <= names
        assert set(await _pass(drv, d, 9)) == names - removed | added
    finally:
        drv.ops.close()
        view.close()


async def test_U4a_no_open_file_unlinked_while_held_keeps_its_content(tmp_path):
    """By inode (fh is the inode): a new file's writes use the fd mknod kept; an
    upper file is pinned at its unlink and read, written and truncated after;
    a lower one is copied aside (never published) at its first write after."""
    view, drv = _no_open_driver(tmp_path, [LayerSpec().file("low", b"lower")])
    ops, ctx = drv.ops, drv.ctx
    try:
        made = drv.made(await ops.mknod(1, b"new", 0o100644, 0, ctx))
        assert await ops.write(made, 0, b"hello") == 5
        cold = drv.made(await ops.mknod(1, b"cold", 0o100644, 0, ctx))
        await ops.write(cold, 0, b"cold")
        ops.fds.drop(cold)                 # as if evicted: pinned by an O_PATH fd
        low = await drv.lookup("low")
        assert await ops.read(low, 0, 100) == b"lower"
        for name in (b"new", b"low", b"cold"):
            await ops.unlink(1, name, ctx)
        assert ops.fds.pinned[cold][2] == "path"
        assert (await ops.getattr(cold, ctx)).st_size == 4
        assert await ops.read(cold, 0, 100) == b"cold"
        await ops.write(cold, 4, b"er")
        assert await ops.read(cold, 0, 100) == b"colder"
        assert await ops.read(made, 0, 100) == b"hello"
        await ops.write(made, 5, b" world")
        await ops.write(low, 0, b"L")
        assert (await ops.read(made, 0, 100), await ops.read(low, 0, 100)) == \
            (b"hello world", b"Lower")
        assert (await ops.getattr(made, ctx)).st_size == 11
        assert sorted(os.listdir(tmp_path / "up")) == ["low"]        # the whiteout only
        assert os.listdir(tmp_path / "wk") == []
        assert set(ops.fds.pinned) == {made, low, cold}
        await ops.forget([(n, drv.held.pop(n)) for n in (made, low, cold)])
        assert not ops.fds.pinned
    finally:
        ops.close()
        view.close()


# -- attributes and xattrs of files held open after their name went ---------
def _held_specs():
    keep = {"user.keep": b"k"}
    return [LayerSpec().file("low", b"lower\n", xattrs=keep).file("ro", b"read only\n", xattrs=keep)
            .file("up", b"up\n", xattrs=keep).file("over", b"renamed over\n", xattrs=keep)
            .file("src", b"src\n")]


def _hold_and_unlink(root) -> dict:
    """Open low/up/over read-write and ro read-only, then unlink them (``over``
    renamed over by ``src``): {name: fd}."""
    (root / "up").write_bytes(b"upper now\n")            # copied up: an upper file
    held = {n: os.open(root / n, os.O_RDWR) for n in ("low", "up", "over")}
    held["ro"] = os.open(root / "ro", os.O_RDONLY)
    for n in ("low", "up", "ro"):
        os.unlink(root / n)
    os.rename(root / "src", root / "over")
    return held


def _change_through(fd: int, i: int) -> tuple:
    """fsetxattr, fremovexattr, fchmod, fchown, futimens through ``fd``; what fstat,
    flistxattr, fgetxattr and pread then see."""
    os.setxattr(fd, "user.new", b"v%d" % i)
    os.removexattr(fd, "user.keep")
    os.fchmod(fd, 0o600 + i)
    os.fchown(fd, 5 + i, 6 + i)
    os.utime(fd, ns=(10**9 + i, 2 * 10**9 + i))
    st = os.fstat(fd)
    return (sorted(os.listxattr(fd)), os.getxattr(fd, "user.new"), oct(st.st_mode),
            st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, os.pread(fd, 100, 0))


@needs_overlay
@needs("root")
def test_U4a_attributes_and_xattrs_of_a_held_file_after_its_name_went(tmp_path, union_mount):
    """fsetxattr/fremovexattr/fchmod/fchown/futimens on a file held open after its
    unlink (or a rename over it) apply to the open file and bring no name back,
    lower or upper, in both modes (the kernel sends them by inode, no fh): as
    kernel overlayfs, whose upper then holds the same. Kernel overlayfs fails
    them with EEXIST on a lower file opened read-only (its copy-up at that name
    finds the whiteout); mergefs applies them to a private copy, as to a lower
    file a no-open mount never copied up."""
    specs = _held_specs()
    layers, mnt = _writable(tmp_path, union_mount, specs)
    oracle = materialise_stack(specs, tmp_path / "oracle", "overlay")
    for d in ("up2", "wk2", "ovl"):
        (tmp_path / d).mkdir()
    start = time.time_ns() - 5 * 10**9     # fs timestamps are coarse: leave a margin
    with mounts.overlay_mount(oracle, tmp_path / "ovl", upper=tmp_path / "up2",
                              work=tmp_path / "wk2") as ovl:
        got = {}
        for root in (mnt, ovl):
            held = _hold_and_unlink(root)
            try:
                got[root] = {n: _change_through(held[n], i) for i, n in
                             enumerate(("low", "up", "over")) if n in held}
                if root == mnt:
                    ro = _change_through(held["ro"], 3)
                    assert ro == (["user.new"], b"v3", "0o100603", 8, 9, 10**9 + 3,
                                  2 * 10**9 + 3, b"read only\n")
                else:
                    with pytest.raises(OSError) as e:
                        os.setxattr(held["ro"], "user.new", b"v")
                    assert e.value.errno == errno.EEXIST
                assert sorted(os.listdir(root)) == ["over"], f"{root}: a name came back"
                assert (root / "over").read_bytes() == b"src\n"
                assert os.listxattr(root / "over") == []
            finally:
                for fd in held.values():
                    os.close(fd)
        assert got[mnt] == got[ovl]
        assert sorted(os.listdir(tmp_path / "up")) == sorted(os.listdir(tmp_path / "up2"))
        view, oview = tree.capture(mnt), tree.capture(ovl)
    tree.assert_same(normalised(view, start), normalised(oview, start),
                     "mergefs vs kernel overlayfs")
    stop_server(mnt, union_mount.started[-1][1])
    assert os.listdir(tmp_path / "wk") == []          # no copy left staged
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=tmp_path / "up",
                              work=tmp_path / "wk") as ovl:
        tree.assert_same(tree.capture(ovl), view, "kernel overlayfs over mergefs's upper")
