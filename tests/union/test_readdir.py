"""Listings of writable mounts (U1, U4a): READDIRPLUS filled in C.

With a v8 pyfuse3 build and the C fast path, a no-open READDIRPLUS is answered
without pyfuse3's coroutine: Python (``ops._readdir_direct``) picks the entries
of the pass that fit and counts the kernel's lookup of each, C lstats the
entries Python has no attributes for and fills the reply; an entry C cannot
answer gives its count back (``ops._unlisted``). The mount tests compare what
users see with kernel overlayfs (both open modes; the fast path on, through
pyfuse3's loop, and off) and check from the server's request counts that C
answered; the handler tests check the lookup counts stay balanced.
"""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from mergefs.testing import mounts
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.union.errors import REQUESTS

from ..conftest import needs, needs_overlay
from .test_fastpath import fast, forget_all, served  # noqa: F401 (fast: a fixture)
from .test_open_modes_rw import _no_open_driver

pytestmark = [needs("fuse"), pytest.mark.timeout(180)]


def stack() -> list[LayerSpec]:
    """Merged, opaque and whited-out directories, symlinks, hardlinks, a fifo,
    and one directory with more entries than one READDIRPLUS reply holds."""
    base = (LayerSpec().file("m/low", b"low").file("m/gone", b"g").dir("m/sub")
            .file("m/sub/x", b"x").file("o/hidden", b"h").file("w/old/a", b"a")
            .file("hl/a", b"link", mode=0o600).hardlink("hl/b", "hl/a").fifo("m/fifo"))
    for i in range(300):
        base = base.file(f"big/f{i:04d}-{'z' * 20}", b"%d" % i, mode=0o600 + i % 64)
    mid = (LayerSpec().whiteout("m/gone").opaque_dir("o").file("o/top", b"t")
           .whiteout("w/old").dir("m/sub", mode=0o700).file("m/sub/y", b"yy")
           .symlink("m/ln", "../o/top").dir("only-mid/d"))
    top = (LayerSpec().file("m/new", b"new", uid=7, gid=8).whiteout("big/f0007-" + "z" * 20)
           .file("big/top", b"top"))
    return [base, mid, top]


START = time.time_ns() - 5 * 10**9      # made by a test (fs timestamps are coarse): later


def listing(root: Path) -> dict:
    """Every entry under ``root`` as users see it: its type from getdents, and its
    lstat (the kernel takes it from the READDIRPLUS that listed it); the mtime
    of an entry made or changed by the test is only said to be new."""
    out = {}
    for d, dirs, files in os.walk(root):
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                rel = os.path.relpath(e.path, root)
                out[rel] = (e.is_dir(follow_symlinks=False), e.is_symlink(),
                            stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                            0 if stat.S_ISDIR(st.st_mode) else st.st_size, st.st_nlink,
                            0 if stat.S_ISDIR(st.st_mode) else
                            "new" if st.st_mtime_ns > START else st.st_mtime_ns,
                            os.readlink(e.path) if e.is_symlink() else "")
    return out


def changes(root: Path) -> None:
    """The same changes on either mount: names made, removed, copied up, renamed."""
    (root / "m/made").write_bytes(b"made")
    (root / "m/low").write_bytes(b"copied up")
    os.unlink(root / "m/new")
    os.mkdir(root / "w/old")                    # over a whiteout: opaque
    (root / "w/old/b").write_bytes(b"b")
    os.rename(root / f"big/f0001-{'z' * 20}", root / "big/renamed")
    for i in range(0, 300, 17):
        os.unlink(root / f"big/f{i:04d}-{'z' * 20}")
    os.unlink(root / "big/top")


def uncount(union_mount) -> None:
    """Let the server log (and forget) the request counts it came with: it is
    forked from this process, whose handler-level tests count requests too.
    (A request first: the server handles SIGUSR1 from its first request on.)"""
    mnt, pid, log = union_mount.started[-1]
    assert not os.path.exists(mnt / "no such name")
    mounts.server_requests(pid, log, timeout=10)


def mounted_pair(tmp_path, union_mount):
    specs = stack()
    ours = materialise_stack(specs, tmp_path / "ours", "overlay")
    oracle = materialise_stack(specs, tmp_path / "oracle", "overlay")
    for d in ("up1", "wk1", "up2", "wk2", "ovl"):
        (tmp_path / d).mkdir()
    mnt = union_mount(ours, upper=tmp_path / "up1", work=tmp_path / "wk1")
    uncount(union_mount)
    ovl = mounts.overlay_mount(oracle, tmp_path / "ovl", upper=tmp_path / "up2",
                               work=tmp_path / "wk2")
    return mnt, ovl


@needs_overlay
def test_U1_listings_and_their_attributes_as_kernel_overlay(tmp_path, union_mount, fast):
    """Fresh, after changes, and after the kernel forgot everything (every entry
    then comes from a READDIRPLUS that stats it anew): the same names, types
    and attributes as kernel overlayfs (nlink 1 of a merged directory, U1)."""
    mnt, ovl_cm = mounted_pair(tmp_path, union_mount)
    with ovl_cm as ovl:
        ovl = Path(ovl)
        assert listing(mnt) == listing(ovl)
        changes(mnt)
        changes(ovl)
        assert listing(mnt) == listing(ovl)
        forget_all()
        assert listing(mnt) == listing(ovl)
        assert os.stat(mnt / "m").st_nlink == 1       # merged: as kernel overlayfs
    counts = served(union_mount)
    if fast:
        assert counts.get("fast_readdirplus", 0) > 0 and "readdir" not in counts, counts
    else:
        assert "fast_readdirplus" not in counts, counts


def test_U4a_entry_gone_from_its_layer_is_left_out(tmp_path, union_mount, fast):
    """An upper entry removed behind the server's back after it read the listing:
    the lstat of it fails (in C: its lookup count is given back), the listing
    leaves it out, and the other entries are listed and usable."""
    layers = materialise_stack([LayerSpec().file("d/low", b"l")], tmp_path / "layers")
    up, wk = tmp_path / "up", tmp_path / "wk"
    (up / "d").mkdir(parents=True)
    wk.mkdir()
    for n in ("a", "b", "c"):
        (up / "d" / n).write_bytes(n.encode())
    mnt = union_mount(layers, upper=up, work=wk)
    uncount(union_mount)
    assert (mnt / "d/a").read_bytes() == b"a"       # the server read the listing of d
    os.unlink(up / "d/b")
    assert sorted(os.listdir(mnt / "d")) == ["a", "c", "low"]
    forget_all()
    assert sorted(os.listdir(mnt / "d")) == ["a", "c", "low"]
    assert [(mnt / "d" / n).read_bytes() for n in ("a", "c", "low")] == [b"a", b"c", b"l"]
    counts = served(union_mount)
    assert (counts.get("fast_readdirplus", 0) > 0) == fast, counts


# -- handler level: the lookup counts of _readdir_direct ------------------------
def _answer(drv, items, lost=()):
    """What C does with ``items``: answers all but the names in ``lost`` (their
    lstat failed) and hands those back; [(name, next offset)] answered."""
    got, gone = [], []
    for name, offset, number, what in items:
        if isinstance(what, int):
            os.lstat(name, dir_fd=what)     # what C does: the fd is the entry's dir
        if name in lost:
            gone.append(number)
        else:
            got.append((name, offset))
            drv._hold(number)
    if gone:
        drv.ops._unlisted(gone)
    return got


async def test_U4a_readdir_direct_counts_each_answered_entry_once(tmp_path):
    """The entries that fit the kernel's buffer, counted once each; those C could
    not answer given back; a pass goes on from the last offset; after the
    kernel forgets what it was handed, only the root is live."""
    spec = LayerSpec()
    for i in range(120):
        spec = spec.file(f"d/f{i:03d}", b"%d" % i)
    spec = spec.dir("d/sub").file("d/sub/x", b"x")
    view, drv = _no_open_driver(tmp_path, [spec, LayerSpec().dir("d/sub")])
    try:
        d = await drv.lookup("d")
        seen, offset, size = [], 0, 4096
        while True:
            items, fds = drv.ops._readdir_direct(d, offset, size)
            try:
                assert sum((152 + len(i[0]) + 7) & ~7 for i in items) <= size
                got = _answer(drv, items, lost={b"f010", b"f050"})
            finally:
                for fd in fds:
                    os.close(fd)
            if not got:
                break
            seen += [n for n, _ in got]
            offset = got[-1][1]
        names = {b"f%03d" % i for i in range(120)} | {b"sub"}
        assert sorted(seen) == sorted(names - {b"f010", b"f050"})
        # a directory goes with its attributes (a merged one: nlink 1), a file to C
        items, fds = drv.ops._readdir_direct(d, 0, 1 << 20)
        for fd in fds:
            os.close(fd)
        sub = [i[3] for i in items if i[0] == b"sub"]
        assert len(sub) == 1 and not isinstance(sub[0], int) and sub[0].st_nlink == 1
        assert all(isinstance(i[3], int) for i in items if i[0] != b"sub")
        drv.ops._unlisted([i[2] for i in items])
        # live inodes with attributes go as EntryAttributes, not lstat'ed again
        f = await drv.lookup("d/f000")
        await drv.ops.getattr(f, drv.ctx)
        items, fds = drv.ops._readdir_direct(d, 0, 1 << 20)
        for fd in fds:
            os.close(fd)
        first = items[0]
        assert first[0] == b"f000" and not isinstance(first[3], int) and first[3].st_ino == f
        drv.ops._unlisted([i[2] for i in items])
        await drv.finish()
    finally:
        drv.ops.close()
        view.close()
        # servers are forked from this process: leave them no request counts
        # of these handler calls (test_fastpath reads what a server logs)
        REQUESTS.clear()
