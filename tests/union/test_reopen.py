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


@pytest.mark.xfail(strict=True, reason="known limit: a file a view shares with others is "
                   "open on its lower file, which view it was opened through is unknown")
def test_U4_a_reader_of_a_shared_file_in_a_view_reads_the_copy(tmp_path):
    """The views service, a lower file still shared by every view (one gid): A's
    fd is on the lower file (``ViewFS._direct``), B's append gets a private gid
    in ``w`` (ESTALE, lookup again) and A keeps reading the lower file."""
    layers = _layers(tmp_path)
    with serving(tmp_path / "srv") as views:
        w = views.add("w", layers, *_dirs(tmp_path, "w"))
        got = _sequence(w / "d/f", True)
    assert got == (OLD + NEW,) * 3



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
