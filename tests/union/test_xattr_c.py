"""GETXATTR of files the C fast path holds no fd for, read in C (U1, U4, A3).

The kernel asks for ``security.capability`` before the first write to a file
and before a chown; for a lower file the C table has no fd yet (it is copied up
at that write). C reads the value itself (``_fastcopy.h`` ``getxattr_at``):
the entry's parent, name and node from the inode table (a live Inode, or the
lazy record a READDIRPLUS filled in C left, no Inode made), its directory's
fd from ``WritableView.entry_dir``, one lgetxattr. These tests ask getxattr(2)
with every kind of buffer of lower files, a lower fifo and symlink, names
looked up one by one (live inodes) and names only listed (lazy), then again
after setxattr, removexattr, a write, a chown and a rename copied them up, and
of a hardlink's other name: kernel overlayfs over the same layer answers the
same, and so does Python (the ``fast`` fixture's "python" run). With the fast
path on, the server's counts show C answered every one of them.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec

from ..conftest import needs, needs_overlay
from .test_copyup_direct import c_copies_up
from .test_fastpath import fast, on_kernel_overlay, raw_getxattr, served, writable  # noqa: F401

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]


def raw_lgetxattr(path: Path, name: str, size: int):
    """``raw_getxattr``, but of a symlink itself (its value: None)."""
    if not path.is_symlink():
        return raw_getxattr(path, name, size)
    try:
        return (len(os.getxattr(path, name, follow_symlinks=False)), None)
    except OSError as e:
        return (-e.errno, None)


BIG = bytes(range(256)) * 12                    # 3,072 bytes
SPEC = (LayerSpec()
        .file("k", b"k", xattrs={"user.k": b"value12345", "user.big": BIG})
        .file("plain", b"p")
        .file("d/live", b"l", xattrs={"user.k": b"live"})
        .file("d/sub/listed", b"s", xattrs={"user.k": b"listed!"})
        .file("d/sub/set", b"t")
        .file("d/sub/removed", b"r", xattrs={"user.k": b"gone"})
        .file("d/sub/written", b"w", xattrs={"user.k": b"w"})
        .file("d/sub/owned", b"o", xattrs={"user.k": b"o"})
        .file("d/sub/moved", b"m", xattrs={"user.k": b"m"})
        .hardlink("d/link2", "d/sub/listed")
        .fifo("d/sub/fifo")
        .symlink("d/sub/sym", "listed"))
NAMES = (("user.k", (0, 3, 10, 11, 100)), ("user.big", (0, 100, 3072, 65536)),
         ("user.absent", (0, 10)), ("security.capability", (0, 20)))


def xattr_steps(mnt: Path) -> list:
    """getxattr(2) of lower entries looked up one by one, then of the ones only
    listed (``os.walk``), then after each kind of copy-up; every answer kept."""
    out = []

    def ask(rel: str) -> None:
        for name, sizes in NAMES:
            for size in sizes:
                out.append((rel, name, size, raw_lgetxattr(mnt / rel, name, size)))

    for rel in ("k", "plain", "d/live"):          # LOOKUP: live inodes
        ask(rel)
    out.append(sorted(f for _, _, files in os.walk(mnt) for f in files))   # the rest listed
    for rel in ("d/sub/listed", "d/link2", "d/sub/set", "d/sub/fifo", "d/sub/sym"):
        ask(rel)
    os.setxattr(mnt / "d/sub/set", "user.new", b"new value")        # copy-up by setxattr
    os.removexattr(mnt / "d/sub/removed", "user.k")                  # ... by removexattr
    with open(mnt / "d/sub/written", "ab") as f:                     # ... by a write
        f.write(b"!")
    os.chown(mnt / "d/sub/owned", 5, 6)                              # ... by a chown
    os.rename(mnt / "d/sub/moved", mnt / "d/moved2")                 # ... by a rename
    os.setxattr(mnt / "k", "user.k", b"changed")                     # a live one changed
    with open(mnt / "d/link2", "ab") as f:                           # a hardlink's name
        f.write(b"+")
    for rel in ("d/sub/set", "d/sub/removed", "d/sub/written", "d/sub/owned", "d/moved2",
                "k", "d/link2", "d/sub/listed"):
        ask(rel)
    return out


@needs_overlay
def test_getxattr_of_entries_without_fd_as_kernel_overlay(tmp_path, union_mount, fast):
    """Every getxattr(2) of lower entries (looked up or only listed) and of their
    copies after setxattr, removexattr, a write, a chown, a rename and through a
    hardlink's other name answers as kernel overlayfs over the same layer:
    values, lengths for size 0, ERANGE for a buffer too small, ENODATA for an
    absent name; with the fast path on, C answered all of them."""
    mnt = writable(tmp_path, union_mount, SPEC)
    ours = xattr_steps(mnt)
    assert ours == on_kernel_overlay(tmp_path, SPEC, xattr_steps)
    assert ("d/sub/listed", "user.big", 100, (-errno.ENODATA, None)) in ours
    assert ("k", "user.big", 100, (-errno.ERANGE, None)) in ours
    counts = served(union_mount)
    if c_copies_up(union_mount, fast):
        # (user.* of the fifo and the symlink the kernel answers itself: 22 asks)
        assert counts.get("fast_getxattr", 0) >= len(ours) - 22, counts
        assert "fast_getxattr_direct" not in counts and "getxattr" not in counts, counts
    else:
        assert "fast_getxattr" not in counts, counts


def test_getxattr_in_c_after_the_file_left_the_view(tmp_path, union_mount, fast):
    """A name unlinked while the kernel still holds its inode (an fd open on it)
    is no entry C reads: Python answers from the open file; a removed name is
    ENOENT at the path, as for any file."""
    spec = LayerSpec().file("f", b"x", xattrs={"user.k": b"v"}).file("g", b"y")
    mnt = writable(tmp_path, union_mount, spec)
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        assert os.getxattr(fd, "user.k") == b"v"
        os.unlink(mnt / "f")
        assert os.getxattr(fd, "user.k") == b"v"
        with pytest.raises(OSError) as e:
            os.getxattr(fd, "user.absent")
        assert e.value.errno == errno.ENODATA
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        os.getxattr(mnt / "f", "user.k")
    assert raw_lgetxattr(mnt / "g", "security.capability", 0)[0] == -errno.ENODATA
