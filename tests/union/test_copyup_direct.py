"""GETXATTR and the first WRITE of a file the C fast path has no fd for (U4).

The kernel asks for ``security.capability`` before the first write to a file;
that write copies a lower file up. With the fast path on, C calls the Python
handler of the GETXATTR directly (no pyfuse3 coroutine) and hands the WRITE's
copy-up to Python (``FdCache.write_for_c``), then writes itself through the
copy's fd (``_fastpath.set_copyup``). These tests drive both the way a user
does (appends, pwrites, getxattr(2) with every buffer size) and compare with
kernel overlayfs over the same layer; with the fast path on, the server's
request counts must show C served them (no test passes with it silently off),
and with it off (``fast`` fixture: ``MERGEFS_FASTPATH=0``) Python answers the same.

The copy-up of a hardlinked lower file links its other names, in every
directory, also the ones the kernel never looked up (``linknames``): each name
shows the written bytes and the one inode number it had before.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs, needs_overlay
from .test_copyup_fds import traced
from .test_fastpath import (fast, fast_path_expected, on_kernel_overlay,  # noqa: F401
                            raw_getxattr, served, writable)

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]


def c_copies_up(union_mount, fast) -> bool:
    """Is C meant to serve these requests (the fast path on, the mount no-open)?"""
    return bool(fast) and union_mount.writable_no_open and fast_path_expected()


XATTR_SPEC = (LayerSpec().file("low", b"x", xattrs={"user.k": b"value12345"})
              .file("plain", b"p").dir("d", xattrs={"user.d": b"dv"}))


def xattr_steps(mnt: Path) -> list:
    """getxattr(2) of lower files and a lower directory, before and after a write
    copies one up: values, lengths, ERANGE, ENODATA."""
    out = []

    def ask(rel: str) -> None:
        p = mnt / rel
        for name, sizes in (("user.k", (0, 3, 10, 1000)), ("user.d", (0, 1, 2, 100)),
                            ("user.absent", (0, 100)), ("security.capability", (0, 20))):
            for size in sizes:
                out.append((rel, name, size, raw_getxattr(p, name, size)))

    for rel in ("low", "plain", "d"):
        ask(rel)
    with open(mnt / "low", "ab") as f:          # the first write: copy-up
        f.write(b"!")
    with open(mnt / "plain", "r+b") as f:
        f.write(b"q")
    for rel in ("low", "plain"):
        ask(rel)
    out.append(((mnt / "low").read_bytes(), (mnt / "plain").read_bytes()))
    return out


@needs_overlay
def test_getxattr_of_files_c_has_no_fd_for_as_kernel_overlay(tmp_path, union_mount, fast):
    """Lower files and directories (no fd in C's table) and the copies a write made:
    every getxattr(2) answers as kernel overlayfs over the same layer does (but
    for the overlay format's own names, which mergefs refuses: EOPNOTSUPP)."""
    mnt = writable(tmp_path, union_mount, XATTR_SPEC)
    ours = xattr_steps(mnt)
    assert ours == on_kernel_overlay(tmp_path, XATTR_SPEC, xattr_steps)
    for rel in ("low", "plain", "d"):      # the overlay format's own names: EOPNOTSUPP
        for name in ("trusted.overlay.origin", "user.overlay.x"):
            assert raw_getxattr(mnt / rel, name, 0)[0] == -errno.EOPNOTSUPP
    counts = served(union_mount)
    assert (counts.get("fast_getxattr_direct", 0) > 0) == bool(fast), counts
    if fast:
        assert "getxattr" not in counts, counts        # no pyfuse3 coroutine for one


WRITE_SPEC = (LayerSpec().file("f", b"0123456789", mode=0o640).dir("d")
              .file("d/g", b"abcdef", mode=0o604).file("d/e", b"").file("big", b"z" * 300_000))


def write_steps(mnt: Path) -> list:
    """The first write to each lower file, in the ways programs write: an append,
    a pwrite into the middle, a write to an empty file, one past a large file's
    end; then what each file holds and its size and mode."""
    with open(mnt / "f", "ab") as f:
        f.write(b"!")
    fd = os.open(mnt / "d" / "g", os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"XY", 2) == 2
    finally:
        os.close(fd)
    with open(mnt / "d" / "e", "wb") as f:
        f.write(b"new")
    fd = os.open(mnt / "big", os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"tail", 400_000) == 4
    finally:
        os.close(fd)
    out = []
    for rel in ("f", "d/g", "d/e", "big"):
        st = os.stat(mnt / rel)
        data = (mnt / rel).read_bytes()
        out.append((rel, st.st_size, oct(st.st_mode), data if len(data) < 100 else
                    (data[:3], data.count(b"\0"), data[-4:])))
    return out


@needs_overlay
def test_first_write_of_lower_files_as_kernel_overlay(tmp_path, union_mount, fast):
    """The write that copies a lower file up gives the bytes, sizes and modes kernel
    overlayfs gives; each file keeps its inode number (issue 10 item 5) and its
    stat right after the write is its upper copy's."""
    mnt = writable(tmp_path, union_mount, WRITE_SPEC)
    up = tmp_path / "m" / "up"
    before = {rel: os.stat(mnt / rel).st_ino for rel in ("f", "d/g", "d/e", "big")}
    ours = write_steps(mnt)
    assert ours == on_kernel_overlay(tmp_path, WRITE_SPEC, write_steps)
    for rel, ino in before.items():
        st, upper = os.stat(mnt / rel), os.lstat(up / rel)
        assert st.st_ino == ino, rel
        assert (st.st_size, st.st_mtime_ns, st.st_ctime_ns) == \
            (upper.st_size, upper.st_mtime_ns, upper.st_ctime_ns), rel
    counts = served(union_mount)
    assert (counts.get("fast_write_copied", 0) == 4) == c_copies_up(union_mount, fast), counts
    if c_copies_up(union_mount, fast):
        assert "write" not in counts, counts           # no pyfuse3 coroutine for one


def failing_write_steps(mnt: Path) -> list:
    """A first write far past what the upper's filesystem takes (EFBIG on ext4;
    a sparse file where it fits): the same error, and afterwards the file's stat."""
    fd = os.open(mnt / "f", os.O_WRONLY)
    try:
        try:
            result = os.pwrite(fd, b"x", 1 << 44)
        except OSError as e:
            result = errno.errorcode[e.errno]
    finally:
        os.close(fd)
    st = os.stat(mnt / "f")
    return [result, st.st_size, oct(st.st_mode), (mnt / "f").read_bytes()[:10]]


@needs_overlay
def test_first_write_that_fails_after_the_copy_up(tmp_path, union_mount, fast):
    """A first write that fails on the copy (the copy-up itself went through): the
    error kernel overlayfs gives, and the kernel is told what the copy-up changed
    (the stat shows the upper copy's times at once, not the lower file's)."""
    spec = LayerSpec().file("f", b"0123456789", mode=0o640)
    mnt = writable(tmp_path, union_mount, spec)
    ino = os.stat(mnt / "f").st_ino
    ours = failing_write_steps(mnt)
    assert ours == on_kernel_overlay(tmp_path, spec, failing_write_steps)
    st, upper = os.stat(mnt / "f"), os.lstat(tmp_path / "m" / "up" / "f")
    assert (st.st_ino, st.st_ctime_ns, st.st_mtime_ns) == (ino, upper.st_ctime_ns,
                                                           upper.st_mtime_ns)


# A lower file with four names in three directories, one of them below a
# directory of the same name in the next layer (merged), and a fifth name that
# the next layer replaces with a file of its own (H2: it is not linked).
LINK_NAMES = ("a", "d1/b", "d2/sub/c", "d2/sub/c2")


def link_stack(tmp_path: Path):
    return materialise_stack(
        [LayerSpec().file("a", b"shared\n").hardlink("d1/b", "a").hardlink("d2/sub/c", "a")
         .hardlink("d2/sub/c2", "a").hardlink("d3/gone", "a").file("d1/other", b"o"),
         LayerSpec().file("d2/sub/new", b"n").file("d3/gone", b"replaced\n")],
        tmp_path / "layers")


@pytest.mark.parametrize("through", LINK_NAMES)
def test_hardlinked_lower_file_copied_up_through_each_name(tmp_path, union_mount, fast,
                                                           through):
    """Writing through any one name (the others never looked up) copies the file up
    once and links every name the view shows for it: each shows the new bytes and
    the inode number all had before; the upper holds them as one inode; the name
    a later layer replaced keeps that layer's file (H2)."""
    layers = link_stack(tmp_path)
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    mnt = union_mount(layers, upper=up, work=wk)
    ino = os.stat(mnt / through).st_ino
    with open(mnt / through, "ab") as f:
        f.write(b"more\n")
    for rel in LINK_NAMES:
        st = os.stat(mnt / rel)
        assert (mnt / rel).read_bytes() == b"shared\nmore\n", rel
        assert st.st_ino == ino, rel
    assert (mnt / "d3" / "gone").read_bytes() == b"replaced\n"
    assert os.stat(mnt / "d3" / "gone").st_ino != ino
    uppers = {os.lstat(up / rel).st_ino for rel in LINK_NAMES}
    assert len(uppers) == 1
    assert os.lstat(up / "a").st_nlink == len(LINK_NAMES)
    assert not (up / "d3" / "gone").exists()


@pytest.mark.parametrize("through", ("a", "d2/sub/c2"))
def test_hardlinked_lower_file_whose_names_were_all_listed_reads_no_layer(
        tmp_path, union_mount, fast, through):
    """After a walk of the tree (``find``: the kernel knows every name) the copy-up
    of a hardlinked lower file links the names it knows and reads no layer for
    others (strace of the server: no getdents64), when they are all its names
    (its st_nlink); the result is the same as through names never looked up.
    Where a later layer hides one of its names (d3/gone) one more name exists
    than the view shows: the layer is read, and that name stays hidden."""
    if os.geteuid() != 0 or not shutil.which("strace"):
        pytest.skip("needs root and strace")
    if not union_mount.writable_no_open:
        pytest.skip("real opens: the copy-up comes with the open")
    specs = [LayerSpec().file("a", b"shared\n").hardlink("d1/b", "a").hardlink("d2/sub/c", "a")
             .hardlink("d2/sub/c2", "a").file("d1/other", b"o").file("h", b"h\n")
             .hardlink("d1/h2", "h").hardlink("d3/gone", "h"),
             LayerSpec().file("d2/sub/new", b"n").file("d3/gone", b"replaced\n")]
    layers = materialise_stack(specs, tmp_path / "layers")
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    mnt = union_mount(layers, upper=up, work=wk)
    _, pid, _ = union_mount.started[-1]
    ino = os.stat(mnt / through).st_ino
    names = [os.path.join(d, n) for d, _, files in os.walk(mnt) for n in files]   # find
    assert len(names) == 9
    # an O_PATH fd per name pins its dentry: a drop_caches meanwhile (another process's
    # benchmark) would make the kernel forget unused names, and a forgotten name is
    # rightly found by reading the layer (seen: a flake when benchmarks ran beside)
    held = [os.open(n, os.O_PATH | os.O_NOFOLLOW) for n in names]
    out = tmp_path / "strace.out"
    try:
        with traced(pid, "getdents64", out):
            with open(mnt / through, "ab") as f:
                f.write(b"more\n")
    finally:
        for fd in held:
            os.close(fd)
    assert "getdents64" not in out.read_text()
    with traced(pid, "getdents64", out):
        with open(mnt / "h", "ab") as f:         # 3 names, 2 shown: the layer is read
            f.write(b"+")
    assert "getdents64" in out.read_text()
    for rel in LINK_NAMES:
        assert (mnt / rel).read_bytes() == b"shared\nmore\n", rel
        assert os.stat(mnt / rel).st_ino == ino, rel
    assert os.lstat(up / "a").st_nlink == len(LINK_NAMES)
    assert (mnt / "d1" / "h2").read_bytes() == b"h\n+"
    assert (mnt / "d3" / "gone").read_bytes() == b"replaced\n"
    assert os.lstat(up / "h").st_nlink == 2 and not (up / "d3" / "gone").exists()


def test_layer_walk_in_c_finds_the_names_python_finds(tmp_path):
    """``linknames.scan`` (the C walk when the module is built) gives every group of
    two or more names the Python walk gives: names that are not UTF-8, with
    spaces, deep ones, a fifo's; a symlink to a directory is a name, never
    followed; a single name and a directory give nothing."""
    from mergefs.union import linknames
    if linknames.compiled("layer_links") is None:
        pytest.skip("no C fast path module built from these sources")
    root = tmp_path / "layer"
    deep = root / "a" / "b c" / "d" / "e" / "f"
    deep.mkdir(parents=True)
    (root / "dir2").mkdir()
    (root / "empty").mkdir()
    (root / "one").write_bytes(b"1")
    (root / "f").write_bytes(b"f")
    os.link(root / "f", deep / "f-deep")
    os.link(root / "f", os.path.join(os.fsencode(root / "dir2"), b"\xff\xfe name"))
    os.mkfifo(root / "fifo")
    os.link(root / "fifo", root / "dir2" / "fifo2")
    os.symlink("a", root / "ln")                 # to a directory: a name, not walked
    os.link(root / "ln", root / "dir2" / "ln2", follow_symlinks=False)
    for i in range(300):                         # more than one getdents buffer
        (root / "dir2" / f"{'x' * 100}{i}").write_bytes(b"")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        c, py = linknames.scan(fd), linknames._scan_python(fd)
        assert linknames.scan(fd) == c          # the layer's fd is not read through
    finally:
        os.close(fd)
    norm = lambda groups: {k: sorted(v) for k, v in groups.items()}   # noqa: E731
    assert norm(c) == norm(py)
    ino = lambda p: os.lstat(p).st_ino           # noqa: E731
    assert norm(c) == {ino(root / "f"): sorted([b"f", b"a/b c/d/e/f/f-deep",
                                                b"dir2/\xff\xfe name"]),
                       ino(root / "fifo"): [b"dir2/fifo2", b"fifo"],
                       ino(root / "ln"): [b"dir2/ln2", b"ln"]}
    with pytest.raises(NotADirectoryError):
        fd = os.open(root / "one", os.O_RDONLY)
        try:
            linknames.scan(fd)
        finally:
            os.close(fd)


def test_layer_walk_deeper_than_the_fd_limit(tmp_path):
    """The C walk holds an fd per level: in a layer deeper than the fds left, it
    fails (EMFILE) and the Python walk gives the names."""
    import resource
    from mergefs.union import linknames
    root = tmp_path / "layer"
    deep = root.joinpath(*["d"] * 150)
    deep.mkdir(parents=True)
    (root / "f").write_bytes(b"f")
    os.link(root / "f", deep / "g")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 50, hard))
        groups = linknames.scan(fd)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(fd)
    assert {k: sorted(v) for k, v in groups.items()} == \
        {os.lstat(root / "f").st_ino: sorted([b"f", b"/".join([b"d"] * 150) + b"/g"])}
