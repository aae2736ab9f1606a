"""A file opened read-only before its copy-up reads the copy (U4, as kernel
overlayfs since 4.19: its file operations re-open the real file once the inode
was copied up).

Process A opens a lower file read-only, process B appends to it through the
mount (the copy-up), then A reads it all and a third open reads it again.
Real opens (``union_mount``'s "real-opens", the views service) hold A's fd
in a handle: the copy-up must move it to the copy, or A reads the lower
file's old bytes, and its short read past the old length makes the FUSE
kernel shrink the file's cached size, so that a new open also misses B's
bytes until the attributes time out. Each case runs beside kernel overlayfs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergefs.testing import mounts
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs, needs_overlay
from .test_views_fast import assert_c_served, counts, fast  # noqa: F401 (fixture)
from .viewsrv import serving

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]

# several pages, not a multiple of the page size: B's append starts mid-page
OLD = b"".join(b"line %05d of the lower file\n" % i for i in range(700))
NEW = b"appended by B\n" * 50


def _layers(tmp_path: Path) -> list[Path]:
    return materialise_stack([LayerSpec().file("d/f", OLD).file("d/g", OLD)],
                             tmp_path / "layers", "overlay")


def _dirs(tmp_path: Path, name: str) -> tuple[Path, Path]:
    up, wk = tmp_path / f"{name}-up", tmp_path / f"{name}-wk"
    up.mkdir()
    wk.mkdir()
    return up, wk


def _sequence(path: Path, read_first: bool, mark=lambda: None) -> tuple[bytes, bytes, bytes]:
    """A opens ``path`` read-only (and reads a little: ``read_first``), B appends,
    then what A reads from 0, what A reads again, and what a new open reads.
    ``mark()`` is called after the append and after A's reads."""
    a = os.open(path, os.O_RDONLY)
    try:
        if read_first:
            assert os.pread(a, 10, 0) == OLD[:10]
        with open(path, "ab") as b:          # B: the copy-up, then the append
            b.write(NEW)
        mark()
        seen = [os.pread(a, 1 << 20, 0)]
        seen.append(os.pread(a, 1 << 20, 0))
        mark()
    finally:
        os.close(a)
    seen.append(path.read_bytes())
    return tuple(seen)


def _oracle(tmp_path: Path, layers, read_first: bool) -> tuple[bytes, bytes, bytes]:
    up, wk = _dirs(tmp_path, "ovl")
    (tmp_path / "ovl").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=up, work=wk) as ovl:
        return _sequence(ovl / "d/f", read_first)


@needs_overlay
@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "read"])
def test_U4_a_reader_open_before_the_copy_up_reads_the_copy(tmp_path, union_mount, read_first):
    """Both open modes of a writable mount (no-open: the fd cache sees the new
    node; real opens: the handle's fd moves to the copy)."""
    layers = _layers(tmp_path)
    up, wk = _dirs(tmp_path, "up")
    mnt = union_mount(layers, upper=up, work=wk)
    got = _sequence(mnt / "d/f", read_first)
    assert got == (OLD + NEW,) * 3
    assert got == _oracle(tmp_path, layers, read_first)


@needs_overlay
@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "read"])
def test_U4_a_reader_open_before_the_copy_up_in_a_view_reads_the_copy(tmp_path, read_first,
                                                                      fast):
    """The views service, a file private to the writable view (a write in another
    writable view made its key private): A's handle is the view's real open,
    served by C (``_serve_handle``) before the copy-up and after it (the entry
    registered again for the copy's node: ``ViewFS._serve_moved``)."""
    layers = _layers(tmp_path)
    with serving(tmp_path / "srv") as views:
        other = views.add("other", layers, *_dirs(tmp_path, "other"))
        w = views.add("w", layers, *_dirs(tmp_path, "w"))
        with open(other / "d/f", "ab") as f:     # d/f's key: private in writable views
            f.write(b"x")
        assert os.stat(w / "d/f").st_ino != os.stat(other / "d/f").st_ino
        marks = []
        got = _sequence(w / "d/f", read_first, lambda: marks.append(counts(views)))
    assert got == (OLD + NEW,) * 3
    assert got == _oracle(tmp_path, layers, read_first)
    assert_c_served(marks[1], fast, "read")                 # A's reads after the copy-up
    assert marks[1].get("read", 0) == 0 or not fast, marks[1]


@needs_overlay
@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "read"])
def test_U4_a_reader_of_a_shared_file_in_a_view_reads_the_copy(tmp_path, read_first, fast):
    """The views service, a lower file still shared by every view (one gid): A's
    fd is on the lower file (``ViewFS._direct``), B's append gets a private gid
    in ``w`` (ESTALE, lookup again), and the copy-up in ``w`` moves A's fd onto
    the copy (A opened it through ``w``, the only view that looked it up:
    ``ViewFS._move_readers``); A's fstat shows the copy too."""
    layers = _layers(tmp_path)
    with serving(tmp_path / "srv") as views:
        w = views.add("w", layers, *_dirs(tmp_path, "w"))
        a = os.open(w / "d/f", os.O_RDONLY)
        try:
            got = _sequence(w / "d/f", read_first)
            size = os.fstat(a).st_size
            seen = os.pread(a, 1 << 20, 0)
        finally:
            os.close(a)
        rewritten = _rewritten(w / "d/g")
    assert got == (OLD + NEW,) * 3
    assert got == _oracle(tmp_path, layers, read_first)
    assert (seen, size) == (OLD + NEW, len(OLD + NEW))   # a second reader, held all along
    assert rewritten == (NEW, NEW, len(NEW))


def _two_views(tmp_path, views, layers, opened_first: bool):
    """Views ``w`` and ``v`` (both writable) over the same lowers, d/f shared by
    both under one gid; A opens w/d/f, C opens v/d/f (``opened_first``: A opens
    before ``v`` ever looked the name up), B appends to w/d/f (the copy-up in
    ``w``). Then, alternately, what A and C read from 0 (twice each), and what
    new opens of w/d/f and v/d/f read, and the inode numbers of d/f in a read-only
    view added while A and C are open, in one added after, and the shared one."""
    w = views.add("w", layers, *_dirs(tmp_path, "w"))
    v = views.add("v", layers, *_dirs(tmp_path, "v"))
    if not opened_first:
        os.stat(v / "d/f")
    a = os.open(w / "d/f", os.O_RDONLY)
    c = os.open(v / "d/f", os.O_RDONLY)
    try:
        assert os.stat(w / "d/f").st_ino == os.stat(v / "d/f").st_ino     # one gid
        assert os.pread(a, 10, 0) == os.pread(c, 10, 0) == OLD[:10]
        with open(w / "d/f", "ab") as b:
            b.write(NEW)
        seen = []
        for _ in range(2):
            seen += [os.pread(a, 1 << 20, 0), os.pread(c, 1 << 20, 0)]
        sizes = os.fstat(a).st_size, os.fstat(c).st_size
        during = views.add("during", layers)
        assert (during / "d/f").read_bytes() == OLD
        inos = [os.stat(during / "d/f").st_ino]
    finally:
        os.close(a)
        os.close(c)
    inos += [os.stat(views.add("after", layers) / "d/f").st_ino, os.stat(v / "d/f").st_ino]
    return seen, sizes, (w / "d/f").read_bytes(), (v / "d/f").read_bytes(), inos


@needs_overlay
def test_U4_a_a_copy_up_in_one_view_moves_only_that_views_readers(tmp_path, fast):
    """Two views share d/f (one gid, one kernel inode); A reads it through ``w``,
    C through ``v``, B appends through ``w``: as with two kernel overlayfs mounts,
    A reads the copy, C keeps reading the lower file (never ``w``'s bytes),
    read after read, though both read through the same kernel inode (its
    attributes are then asked again at every read, with the reader's handle)."""
    layers = _layers(tmp_path)
    with serving(tmp_path / "srv") as views:
        seen, sizes, in_w, in_v, inos = _two_views(tmp_path, views, layers, True)
    assert in_w == OLD + NEW and in_v == OLD
    # while its readers are split, no view is given the gid (its pages are not the
    # lower file's alone); once they are closed, a new view shares it again
    assert inos[1] == inos[2] and (inos[0] != inos[2]) == fast, inos
    assert seen[1::2] == [OLD, OLD], "C, in another view, read w's copy"
    # fstat asks without the handle (the kernel's getattr has no file): the gid's
    # attributes, the lower file's, for A too (known limit)
    assert sizes == (len(OLD), len(OLD))
    # without C (GETATTR answered without the handle) A is not moved (known limit)
    assert seen[0::2] == [OLD + NEW if fast else OLD] * 2


def test_U4_a_a_copy_up_never_moves_a_reader_another_view_may_have_opened(tmp_path):
    """Both views looked d/f up before A and C opened it: which view each handle
    came through is unknown (one gid), so neither moves: C keeps reading the lower
    file, and so does A (known limit: kernel overlayfs would show A the copy)."""
    layers = _layers(tmp_path)
    with serving(tmp_path / "srv") as views:
        seen, sizes, in_w, in_v, inos = _two_views(tmp_path, views, layers, False)
    assert in_w == OLD + NEW and in_v == OLD
    assert seen == [OLD] * 4 and sizes == (len(OLD), len(OLD))



@needs_overlay
def test_U4_a_a_same_size_overwrite_in_one_view_reaches_only_its_readers(tmp_path, fast):
    """As above, but B overwrites the start of d/f in place (same size: the kernel
    tells the two contents apart by mtime alone), and a third writable view ``x``
    appends to its own d/f first (its copy-up moves no reader of ``w`` or ``v``).
    Without C, whose GETATTR answers each handle apart, A is not moved: the two
    readers would share the kernel's pages of the gid."""
    layers = _layers(tmp_path)
    head = b"OVERWRITTEN"
    with serving(tmp_path / "srv") as views:
        w = views.add("w", layers, *_dirs(tmp_path, "w"))
        v = views.add("v", layers, *_dirs(tmp_path, "v"))
        x = views.add("x", layers, *_dirs(tmp_path, "x"))
        a = os.open(w / "d/f", os.O_RDONLY)
        c = os.open(v / "d/f", os.O_RDONLY)
        try:
            assert os.pread(a, 1 << 20, 0) == os.pread(c, 1 << 20, 0) == OLD
            with open(x / "d/f", "ab") as b:     # x's copy-up: the key private
                b.write(NEW)
            assert os.pread(a, 1 << 20, 0) == os.pread(c, 1 << 20, 0) == OLD
            os.listdir(w / "d")
            with open(w / "d/f", "r+b") as b:
                b.write(head)
            seen = []
            for _ in range(2):
                seen += [os.pread(a, 1 << 20, 0), os.pread(c, 1 << 20, 0)]
        finally:
            os.close(a)
            os.close(c)
        files = [(p / "d/f").read_bytes() for p in (w, v, x)]
    assert files == [head + OLD[len(head):], OLD, OLD + NEW]
    assert seen == [head + OLD[len(head):] if fast else OLD, OLD] * 2


def _rewritten(path: Path) -> tuple[bytes, bytes, int]:
    """A opens ``path`` read-only and reads it, B rewrites it (``open(O_TRUNC)``:
    a copy-up without the data), then what A reads, what a new open reads, and
    the size A's fstat shows."""
    a = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(a, 1 << 20, 0) == OLD
        with open(path, "wb") as b:
            b.write(NEW)
        return os.pread(a, 1 << 20, 0), path.read_bytes(), os.fstat(a).st_size
    finally:
        os.close(a)


@needs_overlay
def test_U4_a_reader_open_before_a_rewrite_reads_the_new_data(tmp_path, union_mount):
    layers = _layers(tmp_path)
    up, wk = _dirs(tmp_path, "up")
    mnt = union_mount(layers, upper=up, work=wk)
    got = _rewritten(mnt / "d/g")
    assert got == (NEW, NEW, len(NEW))
    oup, owk = _dirs(tmp_path, "ovl")
    (tmp_path / "ovl").mkdir()
    with mounts.overlay_mount(layers, tmp_path / "ovl", upper=oup, work=owk) as ovl:
        assert _rewritten(ovl / "d/g") == got
