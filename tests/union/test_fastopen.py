"""The first READ of a file opened in C (mergefs/union/_fastopen.h) on writable mounts.

A READ of a regular file the fd cache holds no fd for is served by C, which
opens the file itself from the inode table's lazy record (or live Inode) and
the parent's directory in the file's layer, when it is a single-link regular
file with the node's inode number; else Python opens it, as before. These
tests read files that way (a READDIRPLUS lists them, the read opens them,
their cached pages dropped so the READ reaches the server), then change
them through the mount (a copy-up by another process, a rename, an unlink
while held open, a hardlinked lower file) and read again: the bytes must be
what the union shows (SEMANTICS U4: a copy-up is read from then on; a file
held open keeps its content). With the fast path on, the server's counts must
show C opened the files (``fast_read_opened``), and never the hardlinked one;
after the kernel forgets them, the server must hold no fd on them
(the fd cache closes C's fds as its own).
"""
from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec, materialise_stack

from .test_fastpath import fast, forget_all, served, uncached_read, writable  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def opened_in_c(union_mount) -> int:
    return served(union_mount).get("fast_read_opened", 0)


def fresh_read(fd: int) -> bytes:
    """What the held ``fd`` reads with its cached pages dropped (a READ to the server)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, 1 << 20, 0)


def forgotten(union_mount, *roots: Path) -> list[str]:
    """Make the kernel forget what it holds unused; the files below ``roots`` the
    server still holds an fd on once it had time to take the FORGETs (none).
    The caches are dropped again while some are held: an inode whose last close
    the kernel had not finished at the first drop is forgotten at a later one."""
    deadline = time.monotonic() + 10
    while True:
        forget_all()
        for _ in range(10):
            held = [p for root in roots for p in server_files(union_mount, root)]
            if not held or time.monotonic() > deadline:
                return held
            time.sleep(0.05)


def server_files(union_mount, root: Path) -> list[str]:
    """The regular files below ``root`` the mount's server holds an fd on."""
    _, pid, _ = union_mount.started[-1]
    out = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
            regular = stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{n}").st_mode)
        except OSError:
            continue
        if regular and target.startswith(str(root) + "/"):
            out.append(target)
    return out


def test_fastopen_lower_file_then_copy_up_by_another_process(tmp_path, union_mount, fast):
    """A lower file read through C's own open, then appended to by another process
    (its copy-up, U4): a new open reads the upper's bytes, and so does the reader's
    fd held since before (no-open: the server reads for the inode; with real opens
    its handle stays on the lower file, as a read-only fd of kernel overlayfs
    opened before a copy-up does)."""
    no_open = os.environ.get("MERGEFS_NO_OPEN") != "0"
    spec = LayerSpec().file("d/f", b"lower data").file("d/g", b"other").file("d/k", b"kept")
    mnt = writable(tmp_path, union_mount, spec)
    assert sorted(os.listdir(mnt / "d")) == ["f", "g", "k"]      # READDIRPLUS: lazy records
    f = mnt / "d" / "f"
    reader = os.open(f, os.O_RDONLY)
    try:
        assert fresh_read(reader) == b"lower data"
        assert uncached_read(mnt / "d" / "k") == b"kept"
        before = opened_in_c(union_mount)
        assert (before == 2) == fast, before
        subprocess.run(["sh", "-c", f"printf ++ >> '{f}'"], check=True)
        if no_open:     # (a real open's read, short, would make the kernel think it shrank)
            assert fresh_read(reader) == b"lower data++"
        assert uncached_read(f) == b"lower data++"
        subprocess.run(["sh", "-c", f"printf '!' >> '{f}'"], check=True)
        if no_open:
            assert fresh_read(reader) == b"lower data++!"
    finally:
        os.close(reader)
    assert (tmp_path / "m" / "up" / "d" / "f").read_bytes() == b"lower data++!"
    assert uncached_read(mnt / "d" / "g") == b"other"
    assert uncached_read(mnt / "d" / "k") == b"kept"
    assert (opened_in_c(union_mount) == 1) == fast      # g (k's fd is still kept)


def test_fastopen_then_rename(tmp_path, union_mount, fast):
    """Files C opened, then renamed (within the directory, to another one, and one
    renamed over by another file) while held open: each fd reads its own file's
    bytes, each name the file now under it."""
    spec = (LayerSpec().file("d/a", b"file a").file("d/b", b"file b").file("d/x", b"file x")
            .file("d/y", b"file y").dir("e"))
    mnt = writable(tmp_path, union_mount, spec)
    os.listdir(mnt / "d")
    d = mnt / "d"
    held = {n: os.open(d / n, os.O_RDONLY) for n in ("a", "b", "x", "y")}
    try:
        for n, fd in held.items():
            assert fresh_read(fd) == f"file {n}".encode()
        opened = opened_in_c(union_mount)
        assert (opened == 4) == fast, opened
        os.rename(d / "a", d / "a2")
        os.rename(d / "b", mnt / "e" / "b")
        os.rename(d / "y", d / "x")                 # x's file is renamed over
        for n, fd in held.items():
            assert fresh_read(fd) == f"file {n}".encode(), n
        assert uncached_read(d / "a2") == b"file a"
        assert uncached_read(mnt / "e" / "b") == b"file b"
        assert uncached_read(d / "x") == b"file y"
        assert sorted(os.listdir(d)) == ["a2", "x"]
        subprocess.run(["sh", "-c", f"printf + >> '{d / 'a2'}'"], check=True)
        if os.environ.get("MERGEFS_NO_OPEN") != "0":   # (a real open's stays on the lower)
            assert fresh_read(held["a"]) == b"file a+"
    finally:
        for fd in held.values():
            os.close(fd)
    forget_all()
    assert uncached_read(d / "a2") == b"file a+"
    assert uncached_read(mnt / "e" / "b") == b"file b"


def test_fastopen_unlink_of_an_open_file(tmp_path, union_mount, fast):
    """A lower file and an upper one (written, forgotten, listed again: a lazy
    upper record), both opened by C, unlinked while held open: the fds read (and
    the upper one writes) their file; the names are gone; once the kernel forgets
    them the server holds no fd on either."""
    spec = LayerSpec().file("d/low", b"lower bytes").file("d/other", b"o")
    mnt = writable(tmp_path, union_mount, spec)
    d = mnt / "d"
    (d / "up").write_bytes(b"upper bytes")
    layers, upper = tmp_path / "m" / "layers", tmp_path / "m" / "up"
    assert forgotten(union_mount, upper) == []     # the kernel forgets; the fd cache too
    assert sorted(os.listdir(d)) == ["low", "other", "up"]
    low, up = os.open(d / "low", os.O_RDONLY), os.open(d / "up", os.O_RDWR)
    try:
        assert fresh_read(low) == b"lower bytes"
        assert fresh_read(up) == b"upper bytes"
        opened = opened_in_c(union_mount)
        assert (opened == 2) == fast, opened
        os.unlink(d / "low")
        os.unlink(d / "up")
        assert fresh_read(low) == b"lower bytes"
        assert fresh_read(up) == b"upper bytes"
        os.pwrite(up, b"U", 0)
        assert fresh_read(up) == b"Upper bytes"
        assert sorted(os.listdir(d)) == ["other"]
    finally:
        os.close(low)
        os.close(up)
    assert uncached_read(d / "other") == b"o"
    assert server_files(union_mount, layers) or not fast      # other's fd, kept
    assert forgotten(union_mount, layers, upper) == []


def test_fastopen_hardlinked_lower_file_left_to_python(tmp_path, union_mount, fast):
    """A lower file with two names is never opened in C (which name the kernel holds
    it by is Python's to say): both names read its bytes, and after an append
    through one, whatever the two names are (one inode or two), each reads its own."""
    spec = LayerSpec().file("d/h1", b"linked").hardlink("d/h2", "d/h1").file("d/s", b"single")
    mnt = writable(tmp_path, union_mount, spec)
    d = mnt / "d"
    os.listdir(d)
    assert uncached_read(d / "h1") == b"linked"
    assert uncached_read(d / "h2") == b"linked"
    assert opened_in_c(union_mount) == 0
    subprocess.run(["sh", "-c", f"printf + >> '{d / 'h1'}'"], check=True)
    assert uncached_read(d / "h1") == b"linked+"
    same = os.stat(d / "h1").st_ino == os.stat(d / "h2").st_ino
    assert uncached_read(d / "h2") == (b"linked+" if same else b"linked")
    assert uncached_read(d / "s") == b"single"
    assert (opened_in_c(union_mount) == 1) == fast


def test_fastopen_fds_closed_on_forget(tmp_path, union_mount, fast):
    """Many files opened by C in several directories: the server holds their fds
    while the kernel holds the inodes, and none once it forgot them."""
    spec = LayerSpec()
    for i in range(8):
        for j in range(25):
            spec.file(f"d{i}/f{j}", f"{i}.{j}".encode())
    mnt = writable(tmp_path, union_mount, spec)
    for i in range(8):
        os.listdir(mnt / f"d{i}")
    for i in range(8):
        for j in range(25):
            assert uncached_read(mnt / f"d{i}" / f"f{j}") == f"{i}.{j}".encode()
    layers = tmp_path / "m" / "layers"
    if os.environ.get("MERGEFS_NO_OPEN") != "0":    # (else each read opens and closes)
        assert len(server_files(union_mount, layers)) == 200
    opened = opened_in_c(union_mount)
    assert (opened == 200) == fast, opened
    assert forgotten(union_mount, layers) == []


def test_fastopen_entry_serves_on_once_python_made_the_inode(tmp_path, union_mount, fast):
    """A file C opened from its lazy record, then a request only Python answers (a
    GETXATTR of a name no filesystem namespace has: it makes the file's Inode):
    C goes on reading through the fd it opened (the same node), Python opens
    nothing."""
    mnt = writable(tmp_path, union_mount, LayerSpec().file("d/f", b"lower"))
    f = mnt / "d" / "f"
    os.listdir(mnt / "d")
    assert uncached_read(f) == b"lower"
    assert opened_in_c(union_mount) == (1 if fast else 0)
    with pytest.raises(OSError):
        os.getxattr(f, "nosuch.name")
    assert uncached_read(f) == b"lower"
    counts = served(union_mount)
    assert counts.get("fast_read", 0) == (1 if fast else 0), counts
    assert not counts.get("fast_read_opened") and (not counts.get("read") or not fast), counts


def test_fastopen_read_only_mount(tmp_path, union_mount, fast):
    """A read-only mount's files are opened in C too (no upper: none is flagged so)."""
    spec = LayerSpec().file("d/a", b"top a").file("d/b", b"top b")
    layers = materialise_stack([LayerSpec().file("d/a", b"low a"), spec], tmp_path / "layers")
    mnt = union_mount(layers)
    assert sorted(os.listdir(mnt / "d")) == ["a", "b"]
    assert uncached_read(mnt / "d" / "a") == b"top a"
    assert uncached_read(mnt / "d" / "b") == b"top b"
    assert uncached_read(mnt / "d" / "a") == b"top a"
    counts = served(union_mount)
    assert counts.get("fast_read_opened", 0) == (2 if fast else 0), counts
