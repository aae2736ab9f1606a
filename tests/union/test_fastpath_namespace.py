"""The namespace requests through the C fast path's direct handlers (pyfuse3 patch v9).

With a v9 build, MKDIR, UNLINK, RMDIR, SYMLINK, RENAME, LINK, SETXATTR,
REMOVEXATTR, FORGET and the SETATTRs and FSYNCs C does not answer itself (a
directory, a lower file that is copied up, a symlink; a file it holds no fd
for) call the plain Python handler from pyfuse3's
C callback (``_fastpath`` ``set_direct``, ``ops.DIRECT``): no coroutine, the
same answers. These tests drive every one of them the way programs do, errors
included (a handler's FUSEError is the request's errno), compare the tree, the
upper and each errno with kernel overlayfs running the same steps, and check
from the server's request counts which path served them: the direct one
(``fast_*_direct``, and no pyfuse3 coroutine of that name), pyfuse3's
coroutines with ``MERGEFS_FASTPATH_DIRECT=0``, plain Python with
``MERGEFS_FASTPATH=0``, in both open modes (the union_mount fixture). An entry
reply (MKDIR, SYMLINK, LINK) is one kernel lookup: the last test counts,
in a server run in-process, that the kernel's FORGETs take off exactly what the
handlers counted.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec

from ..conftest import needs, needs_overlay
from .test_fastpath import (forget_all, on_kernel_overlay, patch_version,  # noqa: F401
                            served, writable)

pytestmark = [needs("fuse"), pytest.mark.timeout(180)]

# the requests v9 serves direct, as the server counts them
NAMESPACE = ("mkdir", "unlink", "rmdir", "symlink", "rename", "link", "setattr", "setxattr",
             "removexattr", "fsync", "forget")


@pytest.fixture(params=["direct", "direct-pyfuse3-loop", "coroutines", "python"])
def path(request, monkeypatch, union_mount):
    """Which path serves the namespace requests: "direct" (the default: C calls the
    Python handler; also under pyfuse3's own request loop), "coroutines"
    (``MERGEFS_FASTPATH_DIRECT=0``: the fast path on, pyfuse3's coroutines for
    these) or "python" (``MERGEFS_FASTPATH=0``). What is expected of this build
    and open mode: "direct", "coroutines" or "python"."""
    mode = request.param
    if mode == "python":
        monkeypatch.setenv("MERGEFS_FASTPATH", "0")
    elif mode == "coroutines":
        monkeypatch.setenv("MERGEFS_FASTPATH_DIRECT", "0")
    elif mode == "direct-pyfuse3-loop":
        monkeypatch.setenv("MERGEFS_FASTPATH_LOOP", "0")
    fast = union_mount.writable_no_open and os.environ.get("MERGEFS_NO_OPEN") != "0" and \
        patch_version() >= 5
    if not fast or mode == "python":
        return "python"
    if mode == "coroutines" or patch_version() < 9:
        return "coroutines"
    return "direct"


SPEC = (LayerSpec().file("low", b"lower\n", mode=0o640).file("gone", b"g").file("over", b"o")
        .dir("ld", mode=0o755).file("ld/a", b"a\n").dir("ld/sub").file("ld/sub/b", b"b\n")
        .dir("full").file("full/x", b"x").dir("empty")
        .file("xf", b"x", xattrs={"user.k": b"lower value"})
        .dir("xd", xattrs={"user.d": b"dir value"}).symlink("lsl", "low"))

libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2


def renameat2(a: Path, b: Path, flags: int) -> None:
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def namespace_steps(mnt: Path) -> list:
    """Every namespace request the way programs send them, successes and errors
    that the filesystem (not the VFS) decides; each step's errno (0: done)."""
    out = []

    def do(label, fn):
        try:
            fn()
            out.append((label, 0))
        except OSError as e:
            out.append((label, e.errno))

    (mnt / "nf").write_bytes(b"new file\n")
    (mnt / "nf2").write_bytes(b"second\n")
    (mnt / "nf3").write_bytes(b"third\n")
    do("mkdir", lambda: os.mkdir(mnt / "nd", 0o750))
    do("mkdir below a new dir", lambda: os.mkdir(mnt / "nd" / "sub", 0o700))
    do("mkdir in a lower dir", lambda: os.mkdir(mnt / "ld" / "new", 0o711))
    do("mkdir name too long", lambda: os.mkdir(mnt / ("n" * 300)))
    do("mkdir over a rmdir'ed lower dir", lambda: (os.rmdir(mnt / "empty"),
                                                   os.mkdir(mnt / "empty", 0o701)))
    do("rmdir a non-empty merged dir", lambda: os.rmdir(mnt / "full"))
    do("rmdir a new dir", lambda: os.rmdir(mnt / "nd" / "sub"))
    do("rmdir a lower dir", lambda: (os.unlink(mnt / "ld" / "sub" / "b"),
                                     os.rmdir(mnt / "ld" / "sub")))
    do("unlink a lower file", lambda: os.unlink(mnt / "gone"))
    do("unlink a new file", lambda: os.unlink(mnt / "nf"))
    do("unlink a lower symlink", lambda: os.unlink(mnt / "lsl"))
    do("symlink", lambda: os.symlink("low", mnt / "sl"))
    do("symlink in a lower dir", lambda: os.symlink("../nowhere", mnt / "ld" / "dangling"))
    do("symlink name too long", lambda: os.symlink("t", mnt / ("s" * 300)))
    do("link a lower file", lambda: os.link(mnt / "low", mnt / "ld" / "low2"))
    do("link a new file", lambda: os.link(mnt / "nf2", mnt / "nf2b"))
    do("link name too long", lambda: os.link(mnt / "nf2", mnt / ("l" * 300)))
    do("rename a new file over a lower one", lambda: os.rename(mnt / "nf2b", mnt / "over"))
    do("rename a lower file", lambda: os.rename(mnt / "ld" / "a", mnt / "a2"))
    do("rename a new dir", lambda: os.rename(mnt / "nd", mnt / "ld" / "nd2"))
    do("rename a dir over a non-empty one", lambda: os.rename(mnt / "ld" / "nd2", mnt / "full"))
    do("rename exchange", lambda: renameat2(mnt / "nf3", mnt / "sl", RENAME_EXCHANGE))
    do("rename name too long", lambda: os.rename(mnt / "a2", mnt / ("r" * 300)))
    do("chmod a lower dir", lambda: os.chmod(mnt / "ld", 0o700))
    do("chown a lower dir", lambda: os.chown(mnt / "ld", 1234, 5678))
    do("utime a lower dir", lambda: os.utime(mnt / "ld", ns=(1_500_000_000_000_000_001,
                                                            1_600_000_000_000_000_002)))
    do("chmod a new dir", lambda: os.chmod(mnt / "ld" / "nd2", 0o755))
    do("utime the root", lambda: os.utime(mnt, ns=(1_400_000_000_000_000_003,
                                                   1_450_000_000_000_000_004)))
    do("chmod a lower file", lambda: os.chmod(mnt / "xf", 0o600))
    do("truncate a lower file", lambda: os.truncate(mnt / "ld" / "low2", 3))
    do("chown a symlink", lambda: os.chown(mnt / "ld" / "dangling", 7, 8,
                                           follow_symlinks=False))
    do("setxattr a lower dir", lambda: os.setxattr(mnt / "xd", "user.n", b"on dir"))
    do("setxattr a new file", lambda: os.setxattr(mnt / "nf2", "user.n", b"on file"))
    do("setxattr a lower file", lambda: os.setxattr(mnt / "over", "user.n", b"over"))
    do("setxattr an empty value", lambda: os.setxattr(mnt / "a2", "user.e", b""))
    do("setxattr XATTR_CREATE of a name there",
       lambda: os.setxattr(mnt / "xf", "user.k", b"v", os.XATTR_CREATE))
    do("setxattr XATTR_REPLACE of a name not there",
       lambda: os.setxattr(mnt / "xf", "user.absent", b"v", os.XATTR_REPLACE))
    do("removexattr of a lower dir", lambda: os.removexattr(mnt / "xd", "user.d"))
    do("removexattr of a lower file", lambda: os.removexattr(mnt / "xf", "user.k"))
    do("removexattr of a name not there", lambda: os.removexattr(mnt / "nf2", "user.absent"))
    do("fsync a lower file never read", lambda: fsync(mnt / "full" / "x"))
    return out + tree(mnt)


def fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# directory times the steps set themselves (the others move with the run's clock)
TIMED = {".", "ld"}


def tree(mnt: Path) -> list:
    """What the mount shows: each entry's type, mode, owner, size, link count,
    target or bytes, user xattrs, times where the steps set them, and which
    names share an inode."""
    out, inos = [], {}
    for d, dirs, files in os.walk(mnt):
        dirs.sort()
        for name in ["."] + sorted(dirs + files) if d == str(mnt) else sorted(dirs + files):
            p = Path(d) / name
            rel = os.path.relpath(p, mnt)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            what = os.readlink(p) if stat.S_ISLNK(st.st_mode) else \
                p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            xattrs = sorted((n, os.getxattr(p, n, follow_symlinks=False))
                            for n in os.listxattr(p, follow_symlinks=False)
                            if n.startswith("user."))
            times = st.st_mtime_ns if rel in TIMED else None    # atimes: relatime's
            out.append((rel, kind, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                        None if stat.S_ISDIR(st.st_mode) else st.st_size, st.st_nlink, what,
                        xattrs, times))
            if not stat.S_ISDIR(st.st_mode):
                inos.setdefault(st.st_ino, []).append(rel)
    return out + [sorted(sorted(names) for names in inos.values() if len(names) > 1)]


def upper_entries(up: Path) -> list:
    """The upper's names and types (whiteouts are char devices 0/0 in both)."""
    return sorted((os.path.relpath(os.path.join(d, n), up),
                   stat.S_IFMT(os.lstat(os.path.join(d, n)).st_mode))
                  for d, dirs, files in os.walk(up) for n in dirs + files)


@needs_overlay
def test_namespace_requests_as_kernel_overlay(tmp_path, union_mount, path):
    """mkdir/rmdir/unlink/symlink/link/rename, setattr of directories, lower files
    and symlinks, setxattr/removexattr: each step's errno, the tree and the
    upper's entries are kernel overlayfs's (SEMANTICS: U2 whiteouts, U4 copy-up,
    U5 opaque directories), whichever path served them; the server's counts
    say which one did."""
    mnt = writable(tmp_path, union_mount, SPEC)
    ours = namespace_steps(mnt)
    theirs = on_kernel_overlay(tmp_path, SPEC, namespace_steps)
    assert ours == theirs
    assert upper_entries(tmp_path / "m" / "up") == upper_entries(tmp_path / "k" / "up")
    forget_all()                        # FORGETs of what the steps removed
    assert (mnt / "nf2").read_bytes() == b"second\n"
    counts = served(union_mount)
    for op in NAMESPACE:
        assert (counts.get(f"fast_{op}_direct", 0) > 0) == (path == "direct"), (op, counts)
        assert (op in counts) == (path != "direct"), (op, counts)
    if path == "python":
        assert not any(k.startswith("fast_") for k in counts), counts


def test_read_only_mount_refuses_namespace_requests(tmp_path, union_mount, path):
    """On a read-only union every namespace request is EROFS (U3), answered by the
    handler (``_writer``) through the direct path as through pyfuse3's."""
    from mergefs.testing.builders import materialise_stack
    layers = materialise_stack([SPEC], tmp_path / "layers")
    mnt = union_mount(layers)
    steps = [lambda: os.mkdir(mnt / "nd"), lambda: os.unlink(mnt / "low"),
             lambda: os.rmdir(mnt / "empty"), lambda: os.symlink("t", mnt / "s"),
             lambda: os.rename(mnt / "low", mnt / "low2"),
             lambda: os.link(mnt / "low", mnt / "low2"), lambda: os.chmod(mnt / "ld", 0o700),
             lambda: os.setxattr(mnt / "xd", "user.n", b"v"),
             lambda: os.removexattr(mnt / "xf", "user.k")]
    for step in steps:
        with pytest.raises(OSError) as e:
            step()
        assert e.value.errno == errno.EROFS
    assert sorted(os.listdir(mnt)) == sorted(["low", "gone", "over", "ld", "full", "empty", "xf",
                                              "xd", "lsl"])


LOOKUPS_SCRIPT = r'''
import os, sys, threading, subprocess, time
from mergefs.mountspec import MountSpec
from mergefs.union import inodes, ops, server

mnt, up, wk, layer = sys.argv[1:5]
made, under = [], []
orig_init, orig_forget = ops.UnionOperations.__init__, inodes.InodeTable.forget

def init(self, *a, **k):
    orig_init(self, *a, **k)
    made.append(self)

def forget(self, number, count):
    inode = self._live.get(number)
    if inode is not None and inode is not self.root and count > inode.lookups:
        under.append((number, count, inode.lookups))     # the kernel held more than counted
    return orig_forget(self, number, count)

ops.UnionOperations.__init__, inodes.InodeTable.forget = init, forget

def forget_all():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")

def live(o):       # the server's thread changes them: copies first
    return [n for n in list(o.inodes._live) if n != 1] + list(o.inodes.lazy)

def settle(o):     # the kernel forgets all: what is left live or lazy, and the table's check
    forget_all()
    for _ in range(200):
        if not live(o):
            break
        time.sleep(0.02)
    print("live after forget", len(live(o)), o.check())

def work():
    try:
        while not os.path.ismount(mnt):
            time.sleep(0.01)
        o = made[0]
        for round in range(3):
            for i in range(40):
                d = os.path.join(mnt, "d%d" % i)
                os.mkdir(d)
                os.symlink("t%d" % i, os.path.join(d, "s"))
                with open(os.path.join(d, "f"), "w") as f:
                    f.write("x")
                os.link(os.path.join(d, "f"), os.path.join(d, "g"))
                os.link(os.path.join(mnt, "low"), os.path.join(d, "low"))
            os.stat(os.path.join(mnt, "d3", "g"))
            settle(o)
            for i in range(40):
                d = os.path.join(mnt, "d%d" % i)
                for n in ("s", "f", "g", "low"):
                    os.unlink(os.path.join(d, n))
                os.rmdir(d)
        print("under", under)
        from mergefs.union import fastpath
        print("served", {k: v for k, v in fastpath.stats().items() if k.endswith("_direct")})
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt])

threading.Thread(target=work, daemon=True).start()
server.serve(MountSpec((layer,), up, wk, False, ()), mnt)
'''


def counting_server(tmp_path: Path, script: str, layer) -> str:
    """Run ``script`` (a server in a child process, its table visible, as
    LOOKUPS_SCRIPT) over ``layer``: after each of three rounds nothing was left
    live or lazy once the kernel forgot everything, no FORGET took off more
    than was counted, nothing failed; returns its last line (what was served)."""
    from mergefs.testing import mounts
    dirs = [tmp_path / n for n in ("mnt", "up", "wk")]
    for d in dirs:
        d.mkdir()
    try:
        r = subprocess.run([sys.executable, "-c", script, *map(str, dirs), str(layer)],
                           capture_output=True, text=True, timeout=150)
    finally:
        if mounts.is_mounted(dirs[0]):
            subprocess.run(["fusermount3", "-u", "-z", str(dirs[0])])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[:3] == ["live after forget 0 []"] * 3, r.stdout + r.stderr[-3000:]
    assert lines[3] == "under []", r.stdout
    assert "failed unexpectedly" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    return lines[4]


def test_entry_replies_count_one_lookup_each(tmp_path, path, union_mount):
    """MKDIR, SYMLINK and LINK answer with an entry: the kernel counts one lookup
    for each, and Python must count exactly that many, whichever path sent the
    reply. A server run in a child process (its table visible): after 40
    directories with a symlink, a file and two links each (one of a lower file),
    dropping the kernel's inodes makes its FORGETs leave nothing live, and no
    FORGET takes off more than Python counted; three rounds, names reused."""
    from mergefs.testing.builders import materialise_stack
    (layer,) = materialise_stack([LayerSpec().file("low", b"lower\n")], tmp_path / "layers")
    line = counting_server(tmp_path, LOOKUPS_SCRIPT, layer)
    direct = eval(line.split(" ", 1)[1])
    want = {f"fast_{op}_direct" for op in ("mkdir", "symlink", "link", "unlink", "rmdir",
                                           "forget")}
    assert (want <= set(direct)) == (path == "direct"), direct


# two layers: "usr" and "usr/share" merged from both, "usr/lib" only in the top one,
# "etc" only in the bottom one; "usr/share/old" a file the package replaces
DPKG_LAYERS = (LayerSpec().dir("usr").dir("usr/share").file("usr/share/old", b"old 1\n")
               .file("usr/share/keep", b"k").dir("etc").file("etc/conf", b"c=1\n")
               .dir("opt").file("opt/f", b"f"),
               LayerSpec().dir("usr").dir("usr/share").file("usr/share/top", b"t")
               .dir("usr/lib").file("usr/lib/libx.so", b"elf"))
# what the package installs: new files in a merged dir, in a dir only one layer has,
# in new dirs, and a replaced lower file (dpkg's backup link, then the rename over it)
DPKG_FILES = ("usr/share/new1", "usr/share/new2", "usr/lib/libperl.so", "usr/share/pkg/a.pm",
              "usr/share/pkg/b.pm", "usr/share/pkg/sub/c.pm", "usr/share/old", "etc/conf")


def dpkg_steps(mnt: Path) -> list:
    """``dpkg -i``'s requests for one package, as it sends them (strace of dpkg
    1.21's unpack): per directory, an lstat of the name, then ``mkdir
    NAME.dpkg-new`` and a rename into place; per file, an lstat of the name and of
    ``NAME.dpkg-new`` (both absent but for a replaced file), ``open(NAME.dpkg-new,
    O_CREAT|O_EXCL)``, write, fchown, fchmod, futimens, fsync, close; then, for a
    replaced file, ``link(NAME, NAME.dpkg-tmp)``; the rename of ``NAME.dpkg-new``
    over NAME; the backup unlinked. Most lookups are of names the parent's listing
    lacks (after dpkg listed it, or after the server read it). Each step's errno or
    result, then the tree."""
    out = []

    def lookup(p: Path):
        try:
            os.lstat(p)
            out.append((str(p.relative_to(mnt)), "there"))
        except OSError as e:
            out.append((str(p.relative_to(mnt)), e.errno))

    out.append(sorted(os.listdir(mnt / "usr" / "share")))      # dpkg reads what it replaces
    # a lower directory removed and made again: opaque, empty (U5); names in it
    # looked up before and after one is made there
    os.unlink(mnt / "opt" / "f")
    os.rmdir(mnt / "opt")
    os.mkdir(mnt / "opt")
    lookup(mnt / "opt" / "f")
    (mnt / "opt" / "g").write_bytes(b"g")
    for n in ("f", "g"):
        lookup(mnt / "opt" / n)
    out.append(sorted(os.listdir(mnt / "opt")))
    for d in ("usr/share/pkg", "usr/share/pkg/sub"):
        lookup(mnt / d)
        os.mkdir(mnt / (d + ".dpkg-new"), 0o700)
        os.chmod(mnt / (d + ".dpkg-new"), 0o755)
        os.rename(mnt / (d + ".dpkg-new"), mnt / d)
    for i, f in enumerate(DPKG_FILES):
        p, new, tmp = mnt / f, mnt / (f + ".dpkg-new"), mnt / (f + ".dpkg-tmp")
        for q in (p, new, tmp):
            lookup(q)
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)
        try:
            os.write(fd, b"version 2 of %s\n" % f.encode())
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o644)
            os.utime(fd, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
            os.fsync(fd)
        finally:
            os.close(fd)
        if p.exists():
            os.link(p, tmp)
        os.rename(new, p)
        if tmp.exists():
            os.unlink(tmp)
        for q in (p, new, tmp):
            lookup(q)
    # a lower file removed (a whiteout), its name given to another file by link (U2)
    os.unlink(mnt / "usr" / "share" / "keep")
    os.link(mnt / "usr" / "share" / "new1", mnt / "usr" / "share" / "keep")
    lookup(mnt / "usr" / "share" / "keep")
    forget_all()                # the kernel's entries dropped: every lookup reaches the server
    for f in DPKG_FILES:
        for q in (mnt / f, mnt / (f + ".dpkg-new"), mnt / (f + ".dpkg-tmp")):
            lookup(q)
    # the times: the run's clock (none set by these steps but the files', shown in mtimes)
    return out + [e[:-1] if isinstance(e, tuple) else e for e in tree(mnt)]


@needs_overlay
def test_dpkg_sequence_as_kernel_overlay(tmp_path, union_mount, path):
    """A package's unpack as dpkg sends it (``dpkg_steps``) over two layers: each
    lookup's answer, the tree and the upper's entries are kernel overlayfs's
    (SEMANTICS: U2 whiteouts where a replaced lower name is renamed over and its
    backup unlinked, U4 copy-up, U5 a renamed upper directory). With the C fast
    path, the lookups of names a directory's listing at hand lacks (``NAME.dpkg-new``,
    ``NAME.dpkg-tmp``, a new file's own name) are answered in C
    (``fast_lookup_listed``), the others by the Python handler."""
    from mergefs.testing import mounts
    from mergefs.testing.builders import materialise_stack
    layers = materialise_stack(DPKG_LAYERS, tmp_path / "m" / "layers")
    for d in ("up", "wk"):
        (tmp_path / "m" / d).mkdir()
    mnt = union_mount(layers, upper=tmp_path / "m" / "up", work=tmp_path / "m" / "wk")
    ours = dpkg_steps(mnt)
    klayers = materialise_stack(DPKG_LAYERS, tmp_path / "k" / "layers")
    for d in ("up", "wk", "ovl"):
        (tmp_path / "k" / d).mkdir()
    with mounts.overlay_mount(klayers, tmp_path / "k" / "ovl", upper=tmp_path / "k" / "up",
                              work=tmp_path / "k" / "wk") as ovl:
        theirs = dpkg_steps(Path(ovl))
    assert ours == theirs
    assert upper_entries(tmp_path / "m" / "up") == upper_entries(tmp_path / "k" / "up")
    counts = served(union_mount)
    assert (counts.get("fast_lookup_listed", 0) > 10) == (path == "direct"), counts
    assert counts.get("fast_lookup_direct", 0) > 0 or path != "direct", counts
