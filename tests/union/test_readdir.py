"""Listings of writable mounts (U1, U4a): READDIRPLUS filled in C.

With a v8 pyfuse3 build and the C fast path, a no-open READDIRPLUS is answered
without pyfuse3's coroutine: Python (``ops._readdir_direct``) says what the
pass walks, C walks it, lstats each file the inode table does not hold and
counts the kernel's lookup of it in the table's lazy records (no Python
Inode until a request for it reaches Python; inodes.py, "lazy entry"); a
directory or a live inode goes to Python. The mount tests compare what users
see with kernel overlayfs (both open modes; the fast path on, through
pyfuse3's loop, and off) and check from the server's request counts that C
answered; the handler tests run the C walk itself (``_fastpath.walk``) and
check the lookup counts stay balanced and the inode numbers stable.
"""
from __future__ import annotations

import os
import stat
import struct
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


def mounted_pair(tmp_path, union_mount, specs=None):
    """(our writable mount of ``specs``, default ``stack()``, the kernel overlayfs
    mount of the same as a context manager)."""
    specs = stack() if specs is None else specs
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


# -- handler level: the lookup counts of the C walk (_readdir_direct) ----------
DIRENTPLUS = struct.Struct("<QQQQII" "QQQQQQIIIIIIIIII" "QQII")   # fuse_kernel.h, 152 bytes


def _walk(drv, number: int, offset: int, size: int) -> list:
    """One no-open READDIRPLUS of inode ``number`` as the C fast path answers it
    (``_fastpath.walk``, the server's own code, without a request), each entry
    held as the kernel would: [(name, st_ino, mode, next offset)]."""
    from mergefs.union import _fastpath
    reply = _fastpath.walk(drv.ops._readdir_direct(number, offset, size), size)
    assert isinstance(reply, bytes), reply
    out, at = [], 0
    while at < len(reply):
        f = DIRENTPLUS.unpack_from(reply, at)
        nodeid, ino, mode, d_ino, off, namelen = f[0], f[6], f[15], f[22], f[23], f[24]
        name = reply[at + DIRENTPLUS.size:at + DIRENTPLUS.size + namelen]
        assert nodeid == ino == d_ino
        out.append((name, drv._hold(nodeid), mode, off))
        at += (DIRENTPLUS.size + namelen + 7) & ~7
    assert at == len(reply) <= size
    return out


def _walk_all(drv, number: int, size: int = 4096) -> list:
    seen, offset = [], 0
    while got := _walk(drv, number, offset, size):
        seen += got
        offset = got[-1][3]
    return seen


@pytest.fixture
def walker(tmp_path):
    """A writable no-open UnionOperations and its driver, with the C walk."""
    import pyfuse3
    from mergefs.union import _fastpath
    if not _fastpath.attach(pyfuse3.__file__):
        pytest.skip("no pyfuse3 build with the mergefs_fast hooks")
    spec = LayerSpec()
    for i in range(120):
        spec = spec.file(f"d/f{i:03d}", b"%d" % i)
    spec = spec.dir("d/sub").file("d/sub/x", b"x").file("d/h1", b"h").hardlink("d/h2", "d/h1")
    view, drv = _no_open_driver(tmp_path, [spec, LayerSpec().dir("d/sub")])
    try:
        yield view, drv
    finally:
        drv.ops.close()
        view.close()
        # servers are forked from this process: leave them no request counts
        # of these handler calls (test_fastpath reads what a server logs)
        REQUESTS.clear()


async def test_U4a_walk_counts_each_listed_entry_once_without_an_inode(walker):
    """The entries that fit the kernel's buffer, counted once each: a file in the
    table's lazy records (no Inode), a directory live with its attributes (a
    merged one: nlink 1, U1); a pass goes on from the last offset; the kernel
    forgetting what it was handed leaves only the root (Driver.finish)."""
    view, drv = walker
    inodes = drv.ops.inodes
    d = await drv.lookup("d")
    seen = _walk_all(drv, d)
    names = {b"f%03d" % i for i in range(120)} | {b"sub", b"h1", b"h2"}
    assert sorted(n for n, *_ in seen) == sorted(names)
    files = {n: ino for n, ino, mode, _ in seen if stat.S_ISREG(mode)}
    assert len(files) == 122 and len(set(files.values())) == 121      # h1, h2: one inode
    plain = {n: ino for n, ino in files.items() if n not in (b"h1", b"h2")}
    assert all(inodes._live.get(ino) is None for ino in plain.values())
    assert inodes.lazy[files[b"f000"]][0] == 1
    # the second name of a hardlinked file: Python makes the Inode, both names known
    h = inodes._live[files[b"h1"]]
    assert h.lookups == 2 and {h.name, *(n for _, n in h.others)} == {b"h1", b"h2"}
    sub = next(ino for n, ino, *_ in seen if n == b"sub")
    assert inodes._live[sub].lookups == 1
    assert drv.ops.check() == []
    again = _walk_all(drv, d, 1 << 16)                 # a second pass: counted again
    assert [(n, i) for n, i, *_ in again] == [(n, i) for n, i, *_ in seen]
    assert inodes.lazy[files[b"f000"]][0] == 2
    await drv.finish()
    assert inodes.lazy == {}


async def test_U8_entry_listed_then_looked_up_is_one_inode(walker):
    """A file first seen through READDIRPLUS, then by LOOKUP: the same number,
    made into an Inode then, with both lookups counted; GETATTR of a listed file
    makes its Inode too; a FORGET of a listed file needs no Inode."""
    view, drv = walker
    inodes = drv.ops.inodes
    d = await drv.lookup("d")
    seen = {n: ino for n, ino, *_ in _walk_all(drv, d)}
    f = await drv.lookup("d/f001")
    assert f == seen[b"f001"] and inodes._live[f].lookups == 2 and f not in inodes.lazy
    attrs = await drv.ops.getattr(seen[b"f002"], drv.ctx)
    assert attrs.st_ino == seen[b"f002"] and inodes._live[seen[b"f002"]].lookups == 1
    await drv.ops.forget([(seen[b"f003"], 1)])
    drv.held.pop(seen[b"f003"])
    assert seen[b"f003"] not in inodes.lazy and inodes.known(seen[b"f003"]) is None
    assert drv.ops.check() == []
    await drv.finish()


async def test_U8_listed_entry_renamed_unlinked_copied_up(walker, tmp_path):
    """Files the kernel holds only from a listing, then renamed, unlinked and
    written (copied up): each keeps its number, the unlinked one is gone from
    the next listing, the renamed one is listed under its new name, the copy
    keeps its inode number (issue 10 item 5), and the counts stay balanced."""
    view, drv = walker
    inodes, ctx = drv.ops.inodes, drv.ctx
    d = await drv.lookup("d")
    seen = {n: ino for n, ino, *_ in _walk_all(drv, d)}
    await drv.ops.rename(d, b"f010", d, b"moved", 0, ctx)
    await drv.ops.unlink(d, b"f011", ctx)
    await drv.ops.write(seen[b"f012"], 0, b"new")       # no-open: fh is the inode
    assert (tmp_path / "up/d/f012").read_bytes() == b"new"
    after = {n: ino for n, ino, *_ in _walk_all(drv, d)}
    assert b"f010" not in after and b"f011" not in after
    assert after[b"moved"] == seen[b"f010"] and after[b"f012"] == seen[b"f012"]
    assert (await drv.ops.getattr(seen[b"f012"], ctx)).st_size == 3
    assert inodes._live[seen[b"f010"]].name == b"moved"
    assert inodes._live[seen[b"f011"]].unlinked
    assert drv.ops.check() == []
    await drv.finish()


async def test_U4a_walk_leaves_out_an_entry_gone_from_its_layer(walker, tmp_path):
    """A file removed from its layer after the listing was read: its lstat fails,
    the reply leaves it out and nothing is counted for it."""
    view, drv = walker
    d = await drv.lookup("d")
    _walk_all(drv, d)                       # the server read the listing of d
    gone = view.inodes.number_for(view.listing(view.inodes.get(d))[b"f020"])
    os.unlink(tmp_path / "layers/l0/d/f020")
    names = [n for n, *_ in _walk_all(drv, d)]
    assert b"f020" not in names and len(names) == 122
    assert view.inodes.lazy[gone][0] == 1         # the first pass's only
    await drv.finish()
