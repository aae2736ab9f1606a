"""The C fast path (mergefs/union/_fastpath.c) on real writable mounts.

It answers GETATTR/SETATTR/READ/WRITE/FSYNC/GETXATTR/LISTXATTR of the regular files the
no-open fd cache holds; everything else goes through Python. These tests
make C serve a request, then make Python answer about the same file (a lookup
of another of its names, a copy-up, an unlink), and compare with kernel
overlayfs where the kernel decides (chown clearing set-uid). Each runs with
the fast path on (the default; also with pyfuse3's own loop calling its
hooks) and off (``MERGEFS_FASTPATH=0``), in both open modes; with it on, the
server's request counts must show C served them, so no test passes with the
fast path silently off.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from pathlib import Path

import pytest

from mergefs.testing import mounts
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.union import server

from ..conftest import needs_overlay

pytestmark = pytest.mark.timeout(120)


def patch_version() -> int:
    """The pyfuse3 build's patch version (tools/pyfuse3_inode_fh.py), 0 if none."""
    import pyfuse3
    try:
        with open(os.path.join(os.path.dirname(pyfuse3.__file__), server.INODE_FH_MARKER)) as f:
            return int(re.match(r"v(\d+)", f.read()).group(1))
    except (FileNotFoundError, AttributeError):
        return 0


def fast_path_expected() -> bool:
    """A v5 pyfuse3 build (with the hooks): bootstrap then builds the C module too."""
    return patch_version() >= 5


@pytest.fixture(params=["fast", "fast-pyfuse3-loop", "python"])
def fast(request, monkeypatch):
    """Is the C fast path meant to serve (on, and the mount is no-open)? Also
    with pyfuse3's own request loop calling the hooks (no ``drain``)."""
    if request.param == "python":
        monkeypatch.setenv("MERGEFS_FASTPATH", "0")
        return False
    if request.param == "fast-pyfuse3-loop":
        monkeypatch.setenv("MERGEFS_FASTPATH_LOOP", "0")
    return os.environ.get("MERGEFS_NO_OPEN") != "0" and fast_path_expected()


def served(union_mount) -> dict:
    """The request counts the server logs on SIGUSR1 (``fast_*``: served in C)."""
    _, pid, log = union_mount.started[-1]
    counts = mounts.server_requests(pid, log, timeout=10)
    assert counts, "the server logged no request counts"
    return counts


def forget_all() -> None:
    """Make the kernel forget unused dentries and inodes: the next stat is a LOOKUP,
    answered by Python from what it cached."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def uncached_read(p: Path) -> bytes:
    """The file's bytes as the server sends them (its cached pages dropped first)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def writable(tmp_path: Path, union_mount, spec: LayerSpec, name: str = "m") -> Path:
    layers = materialise_stack([spec], tmp_path / name / "layers")
    up, wk = tmp_path / name / "up", tmp_path / name / "wk"
    up.mkdir()
    wk.mkdir()
    return union_mount(layers, upper=up, work=wk)


def on_kernel_overlay(tmp_path: Path, spec, steps) -> list:
    """``steps(mnt)`` on kernel overlayfs over the same one-layer stack (the oracle;
    ``spec`` a tuple of LayerSpecs: that stack, bottom first)."""
    layers = materialise_stack(list(spec) if isinstance(spec, tuple) else [spec],
                               tmp_path / "k" / "layers")
    for d in ("up", "wk", "ovl"):
        (tmp_path / "k" / d).mkdir()
    with mounts.overlay_mount(layers, tmp_path / "k" / "ovl", upper=tmp_path / "k" / "up",
                              work=tmp_path / "k" / "wk") as ovl:
        return steps(Path(ovl))


def attrs(p: Path) -> tuple:
    st = os.stat(p)
    return st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ino


def test_fastpath_changes_then_lookup_through_python(tmp_path, union_mount, fast):
    """Each of chown/chmod/truncate/write/utime served in C after a Python lookup
    filled Python's cache of the file; then a lookup of another of its names
    (one the kernel has not seen, so Python answers it, and the kernel takes
    its attributes from that answer) must show the new attributes."""
    mnt = writable(tmp_path, union_mount, LayerSpec().file("low", b"lower data"))
    f = mnt / "new"
    f.write_bytes(b"0123456789")
    for i in range(6):
        os.link(f, mnt / f"h{i}")
    forget_all()                       # the kernel knows no name now; Python forgot the fd

    def append():
        with open(f, "ab") as fh:      # WRITE with fh 0: Python opens and keeps an rw fd
            fh.write(b"XY")

    append()
    os.stat(mnt / "h0")                # a LOOKUP: Python caches the attributes
    for i, change in enumerate((lambda: os.chown(f, 1234, 5678), lambda: os.chmod(f, 0o640),
                                lambda: os.truncate(f, 7), append,
                                lambda: os.utime(f, ns=(1_500_000_000_123, 1_600_000_000_456)))):
        change()
        now = attrs(f)
        assert attrs(mnt / f"h{i + 1}") == now        # Python's answer, cached by the kernel
        assert attrs(f) == now
    assert now[:5] == (9, 0o640, 1234, 5678, 1_600_000_000_456)
    assert uncached_read(f) == b"0123456XY"
    forget_all()
    assert attrs(f) == now
    counts = served(union_mount)
    if fast:
        for op in ("getattr", "setattr", "write", "read"):
            assert counts.get(f"fast_{op}", 0) > 0, (op, counts)
    else:
        assert not any(k.startswith("fast_") for k in counts), counts


def test_fastpath_copy_up_after_c_served_the_lower_file(tmp_path, union_mount, fast):
    """C serves reads and getattr of a lower file through its lower fd; a chmod
    (Python, U4: copy-up) and a truncate then change the upper copy: reads and
    attributes must come from the upper from then on, also after a forget."""
    mnt = writable(tmp_path, union_mount, LayerSpec().file("low", b"lower data"))
    f = mnt / "low"
    for _ in range(3):
        assert uncached_read(f) == b"lower data"
        os.stat(f)
    os.chmod(f, 0o600)                     # copy-up (Python)
    os.truncate(f, 5)                      # on the upper copy
    assert uncached_read(f) == b"lower"
    assert attrs(f)[:2] == (5, 0o600)
    with open(f, "ab") as fh:
        fh.write(b"++")
    forget_all()
    assert uncached_read(f) == b"lower++"
    assert (tmp_path / "m" / "up" / "low").read_bytes() == b"lower++"
    counts = served(union_mount)
    assert (counts.get("fast_read", 0) > 0) == fast, counts


def test_fastpath_file_held_open_after_unlink_and_rename_over(tmp_path, union_mount, fast):
    """Files held open after their name went (unlink, rename over): their fd keeps
    reading, writing and stating the file it had (Python serves unlinked ones)."""
    mnt = writable(tmp_path, union_mount, LayerSpec().file("low", b"lower"))
    (mnt / "a").write_bytes(b"aaaa")
    (mnt / "b").write_bytes(b"bbbbbb")
    os.stat(mnt / "a")
    held_a = os.open(mnt / "a", os.O_RDWR)
    held_b = os.open(mnt / "b", os.O_RDWR)
    try:
        os.unlink(mnt / "a")
        os.rename(mnt / "low", mnt / "b")          # b's file is renamed over
        for fd, data in ((held_a, b"aaaa"), (held_b, b"bbbbbb")):
            assert os.pread(fd, 100, 0) == data
            assert os.fstat(fd).st_nlink == 0
            os.pwrite(fd, b"Z", 0)
            os.ftruncate(fd, 3)
            os.fchmod(fd, 0o604)
            st = os.fstat(fd)
            assert (st.st_size, stat.S_IMODE(st.st_mode)) == (3, 0o604)
            assert os.pread(fd, 100, 0) == b"Z" + data[1:3]
        assert (mnt / "b").read_bytes() == b"lower"
        assert sorted(os.listdir(mnt)) == ["b"]
    finally:
        os.close(held_a)
        os.close(held_b)
    assert sorted(os.listdir(tmp_path / "m" / "up")) == ["b", "low"]   # b, low's whiteout


libc = ctypes.CDLL(None, use_errno=True)
libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
libc.getxattr.restype = ctypes.c_ssize_t


def raw_getxattr(path: Path, name: str, size: int):
    """getxattr(2) with a buffer of ``size`` bytes: (result or -errno, value)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = libc.getxattr(os.fsencode(path), name.encode(), buf if size else None, size)
    return (-ctypes.get_errno(), None) if n < 0 else (n, buf.raw[:n] if size else None)


def test_fastpath_getxattr_rules(tmp_path, union_mount, fast):
    """Overlay-private names: EOPNOTSUPP (as kernel overlayfs); size 0 asks for the
    length; a buffer too small: ERANGE; an absent name: ENODATA."""
    mnt = writable(tmp_path, union_mount, LayerSpec().file("low", b"x"))
    f = mnt / "new"
    f.write_bytes(b"data")
    os.setxattr(f, "user.k", b"value12345")
    low = mnt / "low"
    low.read_bytes()                       # a lower file's fd in the cache too
    for p in (f, low):
        for name in ("trusted.overlay.origin", "user.overlay.x"):
            assert raw_getxattr(p, name, 0)[0] == -errno.EOPNOTSUPP
            assert raw_getxattr(p, name, 100)[0] == -errno.EOPNOTSUPP
        assert raw_getxattr(p, "user.absent", 0)[0] == -errno.ENODATA
        assert raw_getxattr(p, "user.absent", 100)[0] == -errno.ENODATA
    assert raw_getxattr(f, "user.k", 0) == (10, None)
    assert raw_getxattr(f, "user.k", 3)[0] == -errno.ERANGE
    assert raw_getxattr(f, "user.k", 10) == (10, b"value12345")
    assert raw_getxattr(f, "user.k", 1000) == (10, b"value12345")
    counts = served(union_mount)
    assert (counts.get("fast_getxattr", 0) > 0) == fast, counts


@needs_overlay
def test_fastpath_setuid_chown_and_write_as_kernel_overlay(tmp_path, union_mount, fast):
    """chown of a set-uid/set-gid file clears the bits (the kernel's rule); the
    mount shows what kernel overlayfs shows for the same steps."""
    def steps(root: Path) -> list:
        f = root / "s"
        f.write_bytes(b"#!/bin/sh\n")
        os.chmod(f, 0o6755)
        out = [stat.S_IMODE(os.stat(f).st_mode)]
        os.chown(f, 1000, 1000)
        out.append(attrs(f)[1:4])
        os.chmod(f, 0o4711)
        os.chown(f, -1, 2000)
        out.append(attrs(f)[1:4])
        with open(f, "ab") as fh:
            fh.write(b"exit 0\n")
        out.append(attrs(f)[:4])
        low = root / "low"
        os.chown(low, 7, 8)                # a lower file: copy-up first
        out.append(attrs(low)[:4])
        return out

    spec = LayerSpec().file("low", b"x", mode=0o4755)
    ours = steps(writable(tmp_path, union_mount, spec))
    assert ours == on_kernel_overlay(tmp_path, spec, steps)


libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
libc.listxattr.restype = ctypes.c_ssize_t


def raw_listxattr(path: Path, size: int):
    """listxattr(2) with a buffer of ``size`` bytes: (result or -errno, names)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = libc.listxattr(os.fsencode(path), buf if size else None, size)
    return (-ctypes.get_errno(), None) if n < 0 else (n, buf.raw[:n] if size else None)


def visible_names(backing: Path) -> bytes:
    """What the mount must list for the layer file ``backing``: its names in the
    filesystem's order, less the overlay format's own (A3)."""
    names = [n for n in os.listxattr(backing, follow_symlinks=False)
             if not n.startswith(("trusted.overlay.", "user.overlay."))]
    return b"".join(os.fsencode(n) + b"\0" for n in names)


MIX = {"user.a": b"1", "trusted.overlay.zz": b"q", "user.overlay.y": b"w", "trusted.t": b"22",
       "user.b": b"333"}


def test_fastpath_listxattr_rules(tmp_path, union_mount, fast):
    """A trusted.overlay.* / user.overlay.* / user.* / trusted.* mix, on a lower
    file and on an upper one: the overlay format's names are hidden; size 0
    asks for the length; a buffer too small: ERANGE; exact fit and larger
    buffers get the names; a file with only hidden names lists none."""
    mnt = writable(tmp_path, union_mount, LayerSpec().file("low", b"x", xattrs=MIX))
    up = tmp_path / "m" / "up"
    f, bare = mnt / "new", mnt / "bare"
    f.write_bytes(b"data")
    bare.write_bytes(b"b")
    for k, v in MIX.items():           # the overlay names straight into the upper layer
        os.setxattr(up / "new", k, v)
    os.setxattr(up / "bare", "trusted.overlay.only", b"1")
    lower = next((tmp_path / "m" / "layers").iterdir()) / "low"
    for p in (f, bare, mnt / "low"):
        p.read_bytes()                 # its fd in the cache (C serves it when on)
    for p, backing in ((f, up / "new"), (mnt / "low", lower), (bare, up / "bare")):
        want = visible_names(backing)
        assert raw_listxattr(p, 0) == (len(want), None), p
        assert raw_listxattr(p, len(want) + 100) == (len(want), want), p
        if want:
            assert raw_listxattr(p, len(want)) == (len(want), want), p
            assert raw_listxattr(p, len(want) - 1)[0] == -errno.ERANGE, p
            assert raw_listxattr(p, 1)[0] == -errno.ERANGE, p
    assert sorted(os.listxattr(f)) == ["trusted.t", "user.a", "user.b"]
    assert sorted(os.listxattr(mnt / "low")) == ["trusted.t", "user.a", "user.b"]
    assert raw_listxattr(bare, 0) == (0, None)
    os.setxattr(f, "user.c", b"4")     # Python (setxattr), then C lists it
    os.removexattr(f, "user.a")
    assert sorted(os.listxattr(f)) == ["trusted.t", "user.b", "user.c"]
    counts = served(union_mount)
    assert (counts.get("fast_listxattr", 0) > 0) == (fast and patch_version() >= 6), counts
    if not fast:
        assert not any(k.startswith("fast_") for k in counts), counts


@needs_overlay
def test_fastpath_listxattr_as_kernel_overlay(tmp_path, union_mount, fast):
    """The names listed for a lower file, a new file, a copied-up one and after
    setxattr/removexattr are those kernel overlayfs lists (its own trusted.overlay.*
    hidden; user.overlay.* is not the kernel's prefix here, so the mix leaves it out)."""
    mix = {k: v for k, v in MIX.items() if not k.startswith("user.overlay.")}

    def steps(root: Path) -> list:
        out = []
        low, new = root / "low", root / "new"
        low.read_bytes()
        out.append(sorted(os.listxattr(low)))
        new.write_bytes(b"n")
        os.setxattr(new, "user.n", b"1")
        new.read_bytes()
        out.append(sorted(os.listxattr(new)))
        os.setxattr(low, "user.added", b"2")         # copy-up
        low.read_bytes()
        out.append(sorted(os.listxattr(low)))
        os.removexattr(low, "user.a")
        out.append(sorted(os.listxattr(low)))
        return out

    spec = LayerSpec().file("low", b"x", xattrs=mix)
    ours = steps(writable(tmp_path, union_mount, spec))
    counts = served(union_mount)
    assert (counts.get("fast_listxattr", 0) > 0) == (fast and patch_version() >= 6), counts
    assert ours == on_kernel_overlay(tmp_path, spec, steps)


def dir_attrs(p: Path) -> tuple:
    st = os.stat(p)
    return st.st_nlink, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def dir_steps(root: Path, check=lambda rel: None) -> list:
    """Names made, removed and renamed in an upper-only directory (``d``, then
    ``e``) and in a merged one (``low``); every directory's nlink, mode and
    owner after each step (``check(rel)`` after each too)."""
    out = []

    def seen(*rels):
        for rel in rels:
            out.append((rel, dir_attrs(root / rel)))
            check(rel)

    os.mkdir(root / "d")
    seen("d")
    for step in (lambda: os.mkdir(root / "d" / "s1"), lambda: os.mkdir(root / "d" / "s2"),
                 lambda: os.symlink("t", root / "d" / "l"), lambda: os.mkfifo(root / "d" / "p"),
                 lambda: (root / "d" / "f").write_bytes(b"f"),
                 lambda: os.rmdir(root / "d" / "s1"),
                 lambda: os.rename(root / "d" / "s2", root / "d" / "s3"),
                 lambda: os.chmod(root / "d", 0o750),
                 lambda: os.rename(root / "low" / "x", root / "d" / "x"),
                 lambda: os.mkdir(root / "low" / "y"), lambda: os.rmdir(root / "low" / "y"),
                 lambda: os.mkdir(root / "low" / "z")):
        step()
        seen("d", "d/s3" if (root / "d" / "s3").exists() else "d", "low")
    os.rename(root / "d", root / "e")
    os.mkdir(root / "e" / "after")
    seen("e", "low")
    for i in range(70):                    # more than the fd cache's directories
        os.mkdir(root / f"m{i}")
        os.mkdir(root / f"m{i}" / "c")
        seen(f"m{i}")
    os.rmdir(root / "m0" / "c")
    os.mkdir(root / "e" / "again")
    seen("m0", "e")
    return out


@needs_overlay
def test_fastpath_directory_getattr_as_kernel_overlay(tmp_path, union_mount, fast):
    """C answers GETATTR of an upper directory no lower layer serves (fstat of an
    O_PATH fd, its own nlink): after names are made, removed and renamed in it,
    after it is renamed and after it left the fd cache, every directory shows the
    nlink, mode and owner kernel overlayfs shows (a merged one: nlink 1, U1), and
    the times, nlink and size of its upper directory."""
    spec = LayerSpec().dir("low").file("low/x", b"x")
    up = tmp_path / "m" / "up"
    mnt = writable(tmp_path, union_mount, spec)

    def same_as_upper(rel: str) -> None:
        ours = os.stat(mnt / rel)
        if not (up / rel).exists():
            return                         # low, not copied up yet
        upper = os.lstat(up / rel)
        assert (ours.st_size, ours.st_mtime_ns, ours.st_ctime_ns) == \
            (upper.st_size, upper.st_mtime_ns, upper.st_ctime_ns), rel
        if rel != "low":                   # merged: nlink 1 (U1, compared with the kernel's)
            assert ours.st_nlink == upper.st_nlink, rel

    ours = dir_steps(mnt, same_as_upper)
    assert ours == on_kernel_overlay(tmp_path, spec, dir_steps)
    counts = served(union_mount)
    assert (counts.get("fast_getattr_dir", 0) > 0) == fast, counts


def merged_dir_steps(root: Path, check=lambda rel: None) -> list:
    """Changes inside the lower directory ``a`` once it is merged with its upper
    copy: copy-ups of children (a write, a rename), names made and removed,
    lower-only children removed (whiteouts), a child directory copied up, then
    emptied, removed and made again (opaque: not merged); the nlink, mode and
    owner of ``a`` (and ``a/deep``) after each step (``check(rel)`` too)."""
    out = []
    a = root / "a"

    def seen(*rels):
        for rel in rels:
            out.append((rel, dir_attrs(root / rel)))
            check(rel)

    def append(p: Path) -> None:
        with open(p, "ab") as f:
            f.write(b"+")

    seen("a")
    for step in (lambda: append(a / "f1"),              # copies a up: merged now
                 lambda: os.mkdir(a / "n"), lambda: os.rmdir(a / "n"),
                 lambda: (a / "new").write_bytes(b"n"), lambda: os.unlink(a / "new"),
                 lambda: os.rename(a / "f2", a / "f3"),
                 lambda: os.rmdir(a / "sub"), lambda: os.unlink(a / "g"),
                 lambda: os.symlink("t", a / "l"), lambda: os.mkfifo(a / "p"),
                 lambda: append(a / "deep" / "h"),      # copies a/deep up: merged
                 lambda: os.chmod(a, 0o750), forget_all,
                 lambda: os.chown(a, 7, 8)):
        step()
        seen("a", "a/deep")
    os.unlink(a / "deep" / "h")
    seen("a", "a/deep")
    os.rmdir(a / "deep")
    os.mkdir(a / "deep")                               # opaque: served by the upper alone
    seen("a", "a/deep")
    os.mkdir(a / "deep" / "x")
    seen("a", "a/deep")
    return out


@needs_overlay
def test_fastpath_merged_directory_getattr_as_kernel_overlay(tmp_path, union_mount, fast):
    """C answers GETATTR of an upper directory merged with a lower one too: nlink 1
    as kernel overlayfs shows it (U1), mode, owner, size and times of the upper
    directory, after copy-ups into it, names made and removed, whiteouts, and a
    child directory removed and made again (opaque: its own nlink again)."""
    spec = (LayerSpec().dir("a").file("a/f1", b"1").file("a/f2", b"2").file("a/g", b"g")
            .dir("a/sub").dir("a/deep").file("a/deep/h", b"h"))
    up = tmp_path / "m" / "up"
    mnt = writable(tmp_path, union_mount, spec)

    def same_as_upper(rel: str) -> None:
        ours = os.stat(mnt / rel)
        if not (up / rel).exists():
            return                         # not copied up yet
        upper = os.lstat(up / rel)
        assert (ours.st_size, ours.st_mtime_ns, ours.st_ctime_ns, ours.st_blocks) == \
            (upper.st_size, upper.st_mtime_ns, upper.st_ctime_ns, upper.st_blocks), rel

    ours = merged_dir_steps(mnt, same_as_upper)
    assert ours == on_kernel_overlay(tmp_path, spec, merged_dir_steps)
    # renamed (redirected: kernel overlayfs without redirect_dir says EXDEV), still
    # merged: nlink 1 before and after names are made in it again
    os.rename(mnt / "a", mnt / "b")
    assert os.stat(mnt / "b").st_nlink == 1
    os.mkdir(mnt / "b" / "again")
    assert os.stat(mnt / "b").st_nlink == 1
    assert sorted(os.listdir(mnt / "b")) == ["again", "deep", "f1", "f3", "l", "p"]
    assert os.stat(mnt / "b").st_nlink == 1
    counts = served(union_mount)
    assert (counts.get("fast_getattr_merged_dir", 0) > 0) == fast, counts


def looked_up_dir_steps(root: Path) -> list:
    """A lower directory copied up (a file made in it), forgotten by the kernel,
    looked up by name (never listed), then changed and stat'ed again and again:
    its nlink (1: merged, U1), mode and the names in it after each change."""
    out = []
    (root / "a" / "new0").write_bytes(b"0")
    forget_all()
    for i in range(1, 4):
        st = os.stat(root / "a")
        out.append((st.st_nlink, oct(st.st_mode), st.st_uid))
        (root / "a" / f"new{i}").write_bytes(b"%d" % i)       # drops its attributes
    os.chmod(root / "a", 0o705)
    st = os.stat(root / "a")
    out.append((st.st_nlink, oct(st.st_mode), sorted(os.listdir(root / "a"))))
    return out


@needs_overlay
def test_fastpath_looked_up_merged_directory_getattr(tmp_path, union_mount, fast):
    """A merged directory the kernel found by LOOKUP (its listing never read),
    changed and stat'ed again and again: nlink 1 (U1), mode and names as kernel
    overlayfs shows them, whether C (its serving layers known: ``serve_dir``) or
    Python answers each GETATTR; C answers some."""
    spec = LayerSpec().dir("a").file("a/f", b"f").dir("a/sub")
    mnt = writable(tmp_path, union_mount, spec)
    ours = looked_up_dir_steps(mnt)
    assert ours == on_kernel_overlay(tmp_path, spec, looked_up_dir_steps)
    assert ours[0][0] == 1
    counts = served(union_mount)
    assert (counts.get("fast_getattr_merged_dir", 0) > 0) == fast, counts


def append_steps(root: Path, check=lambda rel: None) -> list:
    """Appends to lower files (the first write copies each up), each stat'ed
    before, right after the append that copied it up, and after one more."""
    out = []
    for rel in ("f", "d/g"):
        p = root / rel
        before = os.stat(p)
        out.append((rel, before.st_size, before.st_nlink))
        for data in (b"+", b"++"):
            with open(p, "ab") as f:
                f.write(data)
            st = os.stat(p)
            out.append((rel, st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_ino == before.st_ino, p.read_bytes()))
            check(rel)
    return out


@needs_overlay
def test_fastpath_attributes_right_after_a_copy_up_by_write(tmp_path, union_mount, fast):
    """A WRITE that copies a lower file up leaves the file's cached attributes to
    the kernel (it drops them after the write): a stat right after shows the
    upper file's size and times, the same inode number, and what kernel
    overlayfs shows."""
    spec = LayerSpec().file("f", b"x" * 10, mode=0o640).dir("d").file("d/g", b"y", mode=0o604)
    up = tmp_path / "m" / "up"
    mnt = writable(tmp_path, union_mount, spec)

    def same_as_upper(rel: str) -> None:
        ours, upper = os.stat(mnt / rel), os.lstat(up / rel)
        assert (ours.st_size, ours.st_mtime_ns, ours.st_ctime_ns, ours.st_blocks) == \
            (upper.st_size, upper.st_mtime_ns, upper.st_ctime_ns, upper.st_blocks), rel

    ours = append_steps(mnt, same_as_upper)
    assert ours == on_kernel_overlay(tmp_path, spec, append_steps)


def new_entry_steps(root: Path, upper: Path | None = None) -> list:
    """New entries of many modes, made with no umask, in a plain and in a set-gid
    directory, by root and by uid/gid 1234; each one's type, mode and owner in
    the mount and in its upper (where ``upper`` is given: kernel overlayfs'
    is read after its unmount by the caller)."""
    old = os.umask(0)
    try:
        os.mkdir(root / "sg", 0o777)
        os.chown(root / "sg", 0, 77)
        os.chmod(root / "sg", 0o2777)       # (mkdir drops the set-gid bit of its mode)
        os.mkdir(root / "shared", 0o777)
        for d in ("sg", "shared"):
            base = root / d
            for name, mode in (("f644", 0o644), ("f666", 0o666), ("f4755", 0o4755),
                               ("f2755", 0o2755), ("f1644", 0o1644)):
                os.close(os.open(base / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
            for name, mode in (("d755", 0o755), ("d1777", 0o1777), ("d2775", 0o2775),
                               ("d777", 0o777)):
                os.mkdir(base / name, mode)
            os.mkfifo(base / "p640", 0o640)
            os.symlink("t", base / "ln")
            pid = os.fork()
            if pid == 0:                   # another user, through an fd on the directory
                try:
                    dfd = os.open(base, os.O_PATH | os.O_DIRECTORY)
                    os.setgroups([])
                    os.setgid(1234)
                    os.setuid(1234)
                    os.close(os.open("u644", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644,
                                     dir_fd=dfd))
                    os.close(os.open("u4755", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o4755,
                                     dir_fd=dfd))
                    os.mkdir("ud", 0o755, dir_fd=dfd)
                    os.symlink("t", "uln", dir_fd=dfd)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.umask(old)
    out = []
    for d in ("sg", "shared"):
        for name in sorted(os.listdir(root / d)):
            st = os.lstat(root / d / name)
            out.append((d, name, stat.S_IFMT(st.st_mode), oct(stat.S_IMODE(st.st_mode)),
                        st.st_uid, st.st_gid))
            if upper is not None:
                ours, up = st, os.lstat(upper / d / name)
                assert (ours.st_mode, ours.st_uid, ours.st_gid, ours.st_ctime_ns) == \
                    (up.st_mode, up.st_uid, up.st_gid, up.st_ctime_ns), (d, name)
    return out


@needs_overlay
def test_new_entries_mode_and_owner_as_kernel_overlay(tmp_path, union_mount, fast):
    """Entries made in place in the upper (some with their final mode at once, no
    chown or chmod: root's, with a mode the umask keeps, no set-id or sticky
    bit) show the type, mode and owner kernel overlayfs gives them, by root
    and by another user, in a set-gid directory too; the upper holds the same."""
    spec = LayerSpec().file("low", b"x")
    layers = materialise_stack([spec], tmp_path / "m" / "layers")
    up, wk = tmp_path / "m" / "up", tmp_path / "m" / "wk"
    up.mkdir()
    wk.mkdir()
    mnt = union_mount(layers, upper=up, work=wk, allow_other=True)
    ours = new_entry_steps(mnt, up)
    assert ours == on_kernel_overlay(tmp_path, spec, new_entry_steps)


def test_fastpath_direct_handlers(tmp_path, union_mount, fast):
    """With a v7 build, LOOKUP, MKNOD and the GETATTR C has no fd for call the
    Python handler without pyfuse3's coroutine: same answers, errors included
    (a whiteout device: EPERM, as kernel overlayfs; a name below a file: ENOTDIR)."""
    mnt = writable(tmp_path, union_mount, LayerSpec().file("low", b"x").dir("ld"))
    assert not (mnt / "absent").exists()                        # negative lookup
    os.mknod(mnt / "fifo", stat.S_IFIFO | 0o640)
    os.mknod(mnt / "reg", stat.S_IFREG | 0o604)
    with pytest.raises(PermissionError):
        os.mknod(mnt / "wh", stat.S_IFCHR | 0o600, 0)
    with pytest.raises(FileExistsError):
        os.mknod(mnt / "low", stat.S_IFREG | 0o600)
    with pytest.raises(NotADirectoryError):
        os.mknod(mnt / "low" / "x", stat.S_IFREG | 0o600)
    os.symlink("target", mnt / "ln")
    forget_all()
    assert stat.S_IMODE(os.stat(mnt / "fifo").st_mode) == 0o640
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)
    assert stat.S_IMODE(os.stat(mnt / "reg").st_mode) == 0o604
    assert os.readlink(mnt / "ln") == "target"
    assert os.lstat(mnt / "ln").st_size == 6
    assert os.stat(mnt / "ld").st_nlink == 2
    assert sorted(os.listdir(mnt)) == ["fifo", "ld", "ln", "low", "reg"]
    assert sorted(os.listdir(tmp_path / "m" / "up")) == ["fifo", "ln", "reg"]
    counts = served(union_mount)
    direct = fast and patch_version() >= 7
    for op in ("lookup_direct", "mknod_direct", "getattr_direct"):
        assert (counts.get(f"fast_{op}", 0) > 0) == direct, (op, counts)
    if direct:
        assert not {"lookup", "mknod"} & set(counts), counts


@pytest.mark.parametrize("changed", [False, True])
def test_fastpath_module_built_from_other_sources_is_refused(tmp_path, changed):
    """A checkout whose C sources moved after the build (``git merge`` without
    ``tools/bootstrap.sh``) keeps serving, in Python: the compiled module carries
    the identity of the sources it was built from, and a server whose sources
    differ refuses it with one warning instead of calling functions whose
    arguments changed (before, every mount's server died)."""
    import shutil
    import subprocess
    import sys
    import mergefs
    pkg = Path(mergefs.__file__).parent
    if not fast_path_expected():
        pytest.skip("no pyfuse3 build with the fast path's hooks")
    copy = tmp_path / "mergefs"
    shutil.copytree(pkg, copy, symlinks=True)
    if changed:
        src = copy / "union" / "_fastpath.c"
        src.write_bytes(src.read_bytes() + b"\n/* moved on */\n")
    code = ("import logging, sys; logging.basicConfig(stream=sys.stderr);"
            "from mergefs.union import fastpath;"
            "print(fastpath.load(1.0, (None, None), False) is not None)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(not changed)
    assert ("built from other sources" in r.stderr) == changed, r.stderr


def test_server_counts_start_at_zero_in_a_forked_server(tmp_path, union_mount):
    """The counts a server logs on SIGUSR1 are its own: a server forked from a
    process that counted requests in-process (this test process, after an
    in-process handler test) does not report those (seen as a test-order
    failure of test_fastpath_direct_handlers)."""
    from mergefs.union.errors import REQUESTS
    REQUESTS["inherited_from_parent"] += 7
    try:
        mnt = writable(tmp_path, union_mount, LayerSpec().file("low", b"x"))
        assert (mnt / "low").read_bytes() == b"x"
        counts = served(union_mount)
    finally:
        del REQUESTS["inherited_from_parent"]
    assert "inherited_from_parent" not in counts, counts
