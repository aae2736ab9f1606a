"""Namespace requests answered in C (``_fastns.h``): LOOKUPs of a name the
parent's listing at hand has (``fast_lookup_named``), whose inode is live and
served by the C table (the kernel revalidating a dentry it holds: a rename's
source or target, ``open(O_CREAT|O_EXCL)`` of a name there), or a file no
Inode holds yet (counted in the table's lazy records, inodes.py "lazy
entry"); MKNODs of regular files in an upper directory the table serves
and MKDIRs there (``fast_mknod_made``, ``fast_mkdir_made``: made in C,
Python's bookkeeping called from there);
RENAMEs of an upper file the kernel holds by its name (or of a directory
the upper alone serves) where no whiteout is needed (``fast_rename_made``);
SETATTRs of upper directories the table serves (``fast_setattr_dir``).

They must answer what the Python handlers answer (the differential test
against kernel overlayfs: names made, looked up again, renamed, linked,
listed, removed, made again over a whiteout, in an opaque directory, then
after a remount with the same inode numbers, U8) and count exactly what
they count (the server in a child process: after the kernel forgets
everything, nothing is live or lazy, and no FORGET takes off more than was
counted), whichever path serves them (``MERGEFS_FAST_LOOKUP=0``,
``MERGEFS_FAST_MKNOD=0``, ``MERGEFS_FAST_RENAME=0``,
``MERGEFS_FAST_DIR_SETATTR=0``: the Python handlers), in both open modes.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs, needs_overlay
from .conftest import stop_server
from .test_fastpath import forget_all, on_kernel_overlay, patch_version, served
from .test_fastpath_namespace import LOOKUPS_SCRIPT, counting_server, tree, upper_entries

pytestmark = [needs("fuse"), pytest.mark.timeout(180)]

LOWER = (LayerSpec().dir("d").file("d/a", b"a\n").file("d/b", b"b\n").file("d/c", b"c\n")
         .file("d/h1", b"h\n").hardlink("d/h2", "d/h1").symlink("d/l", "a")
         .dir("o").file("o/x", b"x\n").dir("o/sub").file("o/sub/y", b"y\n"),
         LayerSpec().dir("d").file("d/top", b"top\n").whiteout("d/c"))


@pytest.fixture(params=["c", "python"])
def lookups(request, monkeypatch, union_mount):
    """Who answers the LOOKUPs of names a listing at hand has and the MKNODs of new
    files, the RENAMEs of upper entries and SETATTRs of upper directories: "c"
    (the default, where the build has it: no-open writable mounts with the C
    fast path) or "python" (``MERGEFS_FAST_*=0``)."""
    if request.param == "python":
        monkeypatch.setenv("MERGEFS_FAST_LOOKUP", "0")
        monkeypatch.setenv("MERGEFS_FAST_MKNOD", "0")
        monkeypatch.setenv("MERGEFS_FAST_RENAME", "0")
        monkeypatch.setenv("MERGEFS_FAST_DIR_SETATTR", "0")
        return "python"
    fast = union_mount.writable_no_open and os.environ.get("MERGEFS_NO_OPEN") != "0" and \
        os.environ.get("MERGEFS_FASTPATH") != "0" and patch_version() >= 9
    return "c" if fast else "python"


def lstat_or_errno(p: Path):
    try:
        st = os.lstat(p)
        return (st.st_mode, st.st_size, st.st_nlink)
    except OSError as e:
        return e.errno


def steps(mnt: Path) -> list:
    """Names made, looked up again (by the kernel revalidating its dentries and
    after it forgot them), renamed, linked, listed and removed; what each
    lookup saw, then the tree."""
    out = []

    def see(*names):
        out.append([(n, lstat_or_errno(mnt / n)) for n in names])

    os.listdir(mnt / "d")                     # the listing at hand from here on
    see("d/a", "d/h1", "d/h2", "d/l", "d/top", "d/c")
    forget_all()                              # every name looked up again: lazily in C
    see("d/a", "d/b", "d/h1", "d/h2", "d/l", "d/top", "d/c")
    for n in ("new", "n2"):                   # dpkg's new file: made, revalidated, renamed
        fd = os.open(mnt / "d" / (n + ".dpkg-new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, n.encode())
        os.close(fd)
        with pytest.raises(FileExistsError):  # LOOKUP_EXCL: the dentry revalidated
            os.open(mnt / "d" / (n + ".dpkg-new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.rename(mnt / "d" / (n + ".dpkg-new"), mnt / "d" / n)
    os.mkdir(mnt / "d" / "nd.dpkg-new", 0o755)
    with pytest.raises(FileExistsError):
        os.mkdir(mnt / "d" / "nd.dpkg-new")
    os.rename(mnt / "d" / "nd.dpkg-new", mnt / "d" / "nd")
    (mnt / "d" / "nd" / "f").write_bytes(b"f\n")
    os.rename(mnt / "d" / "n2", mnt / "d" / "b")      # over a lower file
    os.rename(mnt / "d" / "b", mnt / "d" / "b2")      # away from it: a whiteout (U2)
    os.rename(mnt / "d" / "b2", mnt / "d" / "b")      # and back over it
    os.rename(mnt / "d" / "b", mnt / "d" / "b3")
    os.link(mnt / "d" / "a", mnt / "d" / "a.dpkg-tmp")    # a lower file copied up
    os.rename(mnt / "d" / "new", mnt / "d" / "a")
    os.unlink(mnt / "d" / "a.dpkg-tmp")
    os.unlink(mnt / "d" / "top")                      # whiteouts (U2)
    os.rename(mnt / "d" / "l", mnt / "d" / "l2")
    see("d/a", "d/b", "d/b2", "d/b3", "d/top", "d/l", "d/l2", "d/nd", "d/nd/f")
    (mnt / "d" / "top").write_bytes(b"again\n")       # over its whiteout (staged)
    (mnt / "d" / "c").write_bytes(b"c again\n")       # over the top layer's whiteout
    old = os.umask(0)
    try:                                              # modes made exactly or fixed up
        for name, mode in (("m600", 0o600), ("m4755", 0o4755), ("m1644", 0o1644)):
            os.close(os.open(mnt / "d" / "nd" / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    finally:
        os.umask(old)
    os.mkdir(mnt / "d" / "sg", 0o2777)              # a set-gid directory: its group
    os.chown(mnt / "d" / "sg", 0, 77)
    os.chmod(mnt / "d" / "sg", 0o2777)
    (mnt / "d" / "sg" / "g").write_bytes(b"g\n")
    os.mkdir(mnt / "d" / "sg" / "sub", 0o755)         # set-gid and its group inherited
    os.mkdir(mnt / "d" / "sg" / "sticky", 0o1777)     # a mode made 0, then set
    os.mkdir(mnt / "d" / "sg" / "sub" / "deeper", 0o700)
    os.link(mnt / "d" / "nd" / "f", mnt / "d" / "nd" / "f2")
    with pytest.raises(FileExistsError):              # the other name revalidated
        os.open(mnt / "d" / "nd" / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.rename(mnt / "d" / "nd" / "f", mnt / "d" / "f3")
    for n in ("v1", "v2", "v3"):
        (mnt / "d" / "nd" / n).write_bytes(n.encode())
    os.rename(mnt / "d" / "nd" / "m600", mnt / "d" / "nd" / "m600b")
    forget_all()                                      # v2 no longer held by the kernel
    os.rename(mnt / "d" / "nd" / "v1", mnt / "d" / "nd" / "v2")
    os.rename(mnt / "d" / "nd" / "v3", mnt / "d" / "v3")
    os.rename(mnt / "d" / "nd" / "f2", mnt / "d" / "nd" / "m600b")   # over a held file
    os.mkdir(mnt / "d" / "m.dpkg-new")                # a directory with content moved
    os.mkdir(mnt / "d" / "m.dpkg-new" / "sub")
    (mnt / "d" / "m.dpkg-new" / "sub" / "f").write_bytes(b"f\n")
    os.rename(mnt / "d" / "m.dpkg-new", mnt / "d" / "m")
    (mnt / "d" / "m" / "sub" / "g").write_bytes(b"g\n")     # made through its new path
    os.mkdir(mnt / "d" / "m.dpkg-new")                # the old names again: new directories
    os.mkdir(mnt / "d" / "m.dpkg-new" / "sub")
    (mnt / "d" / "m.dpkg-new" / "sub" / "k").write_bytes(b"k\n")
    os.rename(mnt / "d" / "m" / "sub", mnt / "d" / "nd" / "msub")
    (mnt / "d" / "nd" / "msub" / "h").write_bytes(b"h\n")
    os.rename(mnt / "d" / "m", mnt / "d" / "l")       # over the whiteout of "l": opaque
    see("d/m", "d/l", "d/nd/msub/f", "d/nd/msub/g", "d/nd/msub/h", "d/nd/msub/k",
        "d/m.dpkg-new/sub/k")
    for i, p in enumerate((mnt / "d" / "nd", mnt / "d" / "nd" / "msub", mnt / "d")):
        os.chown(p, 5 + i, 6 + i)                     # a directory's attributes (dpkg's)
        os.chmod(p, 0o2750 - i)
        os.utime(p, ns=(1_500_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
        os.utime(p, ns=(1_500_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
        st = os.lstat(p)
        out.append((str(p.relative_to(mnt)), oct(st.st_mode), st.st_uid, st.st_gid,
                    st.st_atime_ns, st.st_mtime_ns, st.st_nlink))
    os.chmod(mnt / "d", 0o755)
    (mnt / "d" / "nd" / "held").write_bytes(b"old bytes\n")
    (mnt / "d" / "nd" / "repl").write_bytes(b"new\n")
    with open(mnt / "d" / "nd" / "held", "rb") as f:     # open while renamed over
        os.rename(mnt / "d" / "nd" / "repl", mnt / "d" / "nd" / "held")
        forget_all()
        out.append((f.read(), os.fstat(f.fileno()).st_size))
    see("d/sg/sub", "d/sg/sticky", "d/sg/sub/deeper", "d/top", "d/c", "d/f3", "d/nd/f", "d/nd/f2", "d/nd/m600", "d/nd/m600b", "d/nd/m4755",
        "d/nd/v1", "d/nd/v2", "d/v3")
    for p in ("o/sub/y", "o/x"):                      # an opaque directory (U5)
        os.unlink(mnt / p)
    os.rmdir(mnt / "o" / "sub")
    os.rmdir(mnt / "o")
    os.mkdir(mnt / "o")
    (mnt / "o" / "x").write_bytes(b"new x\n")
    os.mkdir(mnt / "o" / "sub")
    (mnt / "o" / "sub" / "z").write_bytes(b"z\n")
    forget_all()
    see("d/a", "d/b", "d/h1", "d/h2", "d/l2", "d/nd", "d/nd/f", "o/x", "o/sub", "o/sub/y",
        "o/sub/z", "d/top")
    out.append(sorted(os.listdir(mnt / "d")))
    return out + shown(mnt)


def shown(mnt: Path) -> list:
    """``tree`` without times (no step sets any: they move with the run's clock)."""
    return [e[:-1] if isinstance(e, tuple) else e for e in tree(mnt)]


def numbers(mnt: Path) -> dict:
    return {os.path.relpath(os.path.join(d, n), mnt): os.lstat(os.path.join(d, n)).st_ino
            for d, dirs, files in os.walk(mnt) for n in dirs + files}


@needs_overlay
def test_lookups_as_kernel_overlay_and_after_remount(tmp_path, union_mount, lookups):
    """The steps' lookups, the tree and the upper's entries are kernel overlayfs's
    (U2 whiteouts, U4 copy-up, U5 an opaque directory); the mount made again over
    the same upper shows the same tree with the same inode numbers (U8); with the
    C lookups on, some were answered there."""
    layers = materialise_stack(LOWER, tmp_path / "m" / "layers")
    up, wk = tmp_path / "m" / "up", tmp_path / "m" / "wk"
    up.mkdir()
    wk.mkdir()
    mnt = union_mount(layers, upper=up, work=wk)
    ours = steps(mnt)
    counts = served(union_mount)
    assert ours == on_kernel_overlay(tmp_path, LOWER, steps)
    assert upper_entries(up) == upper_entries(tmp_path / "k" / "up")
    assert (counts.get("fast_lookup_named", 0) > 5) == (lookups == "c"), counts
    assert (counts.get("fast_mknod_made", 0) >= 5) == (lookups == "c"), counts
    assert (counts.get("fast_rename_made", 0) >= 3) == (lookups == "c"), counts
    assert (counts.get("fast_setattr_dir", 0) >= 8) == (lookups == "c"), counts
    assert (counts.get("fast_mkdir_made", 0) >= 5) == (lookups == "c"), counts
    before = numbers(mnt)
    seen = shown(mnt)
    _, pid, _ = union_mount.started[-1]
    stop_server(mnt, pid)
    again = union_mount(layers, upper=up, work=wk, mnt=mnt)
    assert numbers(again) == before
    assert shown(again) == seen


# the server in-process with its table visible (test_fastpath_namespace's set-up),
# and a FORGET wrapper that also checks the lazy records' counts
COUNTS_SCRIPT = LOOKUPS_SCRIPT.split("def work():")[0] + r'''
def forget(self, number, count):
    inode = self._live.get(number)
    record = self.lazy.get(number)
    held = inode.lookups if inode is not None else record[0] if record is not None else 0
    if inode is not self.root and count > held:
        under.append((number, count, held))          # the kernel held more than counted
    return orig_forget(self, number, count)

inodes.InodeTable.forget = forget

def excl(p):
    try:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass

def work():
    try:
        while not os.path.ismount(mnt):
            time.sleep(0.01)
        o = made[0]
        os.listdir(os.path.join(mnt, "d"))
        for round in range(3):
            d = os.path.join(mnt, "d")
            for i in range(30):
                f = os.path.join(d, "f%d" % i)
                os.lstat(f)                               # lower files: lazily, in C
                os.lstat(os.path.join(d, "h%d" % (i % 2)))    # hardlinked names
                with open(f + ".new", "w") as out:
                    out.write("x")
                excl(f + ".new")                          # revalidated: live, in C
                os.mkdir(f + ".dir")
                excl(f + ".dir")
                for n in ("x", "y"):                      # new files in a new dir: made in C
                    with open(os.path.join(f + ".dir", n), "w") as out:
                        out.write(n)
                os.link(os.path.join(f + ".dir", "x"), os.path.join(f + ".dir", "x2"))
                excl(os.path.join(f + ".dir", "x"))       # a hardlink's other name revalidated
                os.rename(os.path.join(f + ".dir", "y"), os.path.join(f + ".dir", "x"))
                with open(os.path.join(f + ".dir", "z"), "w") as out:
                    out.write("z")
                os.rename(os.path.join(f + ".dir", "z"), os.path.join(f + ".dir", "w"))
                os.rename(f + ".new", f)                  # over the lower file
                os.lstat(f)
                excl(f)
            forget_all()
            for i in range(30):
                os.lstat(os.path.join(d, "f%d" % i))
                os.lstat(os.path.join(d, "f%d.dir" % i))
                os.lstat(os.path.join(d, "f%d.dir" % i, "x2"))
            settle(o)
            for i in range(30):
                for n in ("x", "x2", "w"):
                    os.unlink(os.path.join(d, "f%d.dir" % i, n))
                os.rmdir(os.path.join(d, "f%d.dir" % i))
        print("under", under)
        from mergefs.union import fastpath
        stats = fastpath.stats()
        print("served", stats.get("fast_lookup_named", 0), stats.get("fast_mknod_made", 0),
              stats.get("fast_rename_made", 0))
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt])

threading.Thread(target=work, daemon=True).start()
server.serve(MountSpec((layer,), up, wk, False, ()), mnt)
'''


def test_lookups_count_exactly(tmp_path, union_mount, lookups):
    """Every lookup counted once, in the live table or the lazy records, whoever
    answered it: a server in a child process (its table visible); lower files
    looked up (two hardlinked names among them), new files and directories
    revalidated by the kernel, renamed over lower files, looked up again after
    the kernel forgot them; once it forgets everything, nothing is live or lazy
    and no FORGET took off more than was counted. Three rounds, names reused."""
    spec = LayerSpec().dir("d").file("d/h0", b"h").hardlink("d/h1", "d/h0")
    for i in range(30):
        spec = spec.file(f"d/f{i}", b"lower %d\n" % i)
    (layer,) = materialise_stack([spec], tmp_path / "layers")
    named, made, renamed = map(int, counting_server(tmp_path, COUNTS_SCRIPT, layer).split()[1:])
    assert (named > 100) == (lookups == "c")
    assert (made >= 180) == (lookups == "c")
    assert (renamed >= 90) == (lookups == "c")
