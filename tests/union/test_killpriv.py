"""Set-id bits under FUSE_HANDLE_KILLPRIV_V2 (mergefs/union/_fastio.h).

A writable mount whose C module is built agrees FUSE_HANDLE_KILLPRIV_V2 with
the kernel: the kernel then no longer asks for ``security.capability`` before
each write (only a file's first) nor refreshes the mode before a chown, and
leaves clearing set-id bits to the server when a caller without CAP_FSETID
writes or truncates (SEMANTICS U6: the mount shows what kernel overlayfs
shows). These tests do that as another user and as root, on lower files
(copied up by the clearing) and upper ones, through write, truncate,
open(O_TRUNC) and chown, and compare every mode with kernel overlayfs; and
count the requests the agreement saves. Each runs with the agreement and
without it (``MERGEFS_KILLPRIV=0``: the kernel's own SETATTR of the mode),
with the fast path on and off (``MERGEFS_FASTPATH=0``; the agreement does not
depend on it), in both open modes.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs_overlay
from .test_fastpath import fast, fast_path_expected, on_kernel_overlay, served  # noqa: F401
from .test_fastpath import writable

pytestmark = pytest.mark.timeout(120)

USER = 1234
MODES = {"suid": 0o4755, "sgid_x": 0o2775, "sgid_nox": 0o2745, "both": 0o6755, "plain": 0o755,
         "root_suid": 0o4777, "root_sgid_nox": 0o2747}


@pytest.fixture(params=["killpriv", "no-killpriv"])
def agreed(request, monkeypatch) -> bool:
    """Is FUSE_HANDLE_KILLPRIV_V2 meant to be agreed (the C module built, and not
    turned off with ``MERGEFS_KILLPRIV=0``)?"""
    if request.param == "no-killpriv":
        monkeypatch.setenv("MERGEFS_KILLPRIV", "0")
        return False
    return fast_path_expected()


def spec() -> LayerSpec:
    s = LayerSpec().dir("d", mode=0o777)
    for name, mode in MODES.items():
        owner = 0 if name.startswith("root") else USER
        s.file(f"d/{name}", b"lower bytes\n", mode=mode, uid=owner, gid=owner)
        s.file(f"d/t_{name}", b"lower bytes\n", mode=mode, uid=owner, gid=owner)
        s.file(f"d/o_{name}", b"lower bytes\n", mode=mode, uid=owner, gid=owner)
    return s


def as_user(d: Path, fn) -> None:
    """``fn(dfd)`` in a child running as USER (no CAP_FSETID, no supplementary
    groups), ``dfd`` an fd on the directory ``d`` (opened before: the test's
    temporary directories are not USER's to walk)."""
    dfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(USER)
                os.setuid(USER)
                fn(dfd)
                os._exit(0)
            except BaseException:
                import traceback
                traceback.print_exc()
                os._exit(1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(dfd)


def opened(dfd: int, name: str, flags: int, mode: int = 0o644) -> int:
    return os.open(name, flags, mode, dir_fd=dfd)


def modes(d: Path) -> list:
    return [(n, oct(stat.S_IMODE(os.stat(d / n).st_mode)), os.stat(d / n).st_size)
            for n in sorted(os.listdir(d))]


def steps(root: Path) -> list:
    d = root / "d"
    out = []

    def by_user(dfd):
        def append(name, data=b"+"):
            fd = opened(dfd, name, os.O_WRONLY | os.O_APPEND)
            os.write(fd, data)
            os.close(fd)
        for name in MODES:
            if name.startswith("root"):
                continue
            append(name)                                 # WRITE: lower file, copied up
            fd = opened(dfd, f"t_{name}", os.O_WRONLY)
            os.ftruncate(fd, 3)                          # SETATTR of the size
            os.close(fd)
            os.close(opened(dfd, f"o_{name}", os.O_WRONLY | os.O_TRUNC))   # open(O_TRUNC)
        append("root_suid")                              # another's file, world-writable
        append("root_sgid_nox")                          # ... of a group USER is not in
        fd = opened(dfd, "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, b"x")
        os.fchmod(fd, 0o4755)                            # an upper file's bit, then
        os.write(fd, b"y")                               # its write through the same fd
        os.close(fd)
        append("plain")                                  # no bit: nothing to clear
    as_user(d, by_user)
    out.append(modes(d))
    for name in ("suid", "sgid_x", "both"):              # set again; root writes: kept
        os.chmod(d / name, MODES[name])
        with open(d / name, "ab") as f:
            f.write(b"r")
    out.append(modes(d))
    os.chown(d / "suid", USER, USER)                     # a chown clears them, root's too
    os.chown(d / "sgid_nox", USER, USER)
    os.chown(d / "both", 0, 0)
    out.append(modes(d))
    return out


@needs_overlay
def test_set_id_bits_cleared_as_kernel_overlay(tmp_path, union_mount, fast, agreed):
    """Another user's write, truncate and open(O_TRUNC) of set-id files (lower ones,
    copied up by it; an upper one through the fd that set its bit) clear what the
    kernel clears (set-uid; set-gid when group-executable), root's writes keep
    them, chown clears them: the same modes and sizes as kernel overlayfs."""
    layers = materialise_stack([spec()], tmp_path / "m" / "layers")
    for d in ("up", "wk"):
        (tmp_path / "m" / d).mkdir()
    mnt = union_mount(layers, upper=tmp_path / "m" / "up", work=tmp_path / "m" / "wk",
                      allow_other=True)
    ours, theirs = steps(mnt), on_kernel_overlay(tmp_path, spec(), steps)
    if not agreed:
        # without the agreement the kernel's FUSE client clears the bits itself,
        # and differs from kernel overlayfs twice (docs/semantics.md, U6): it
        # clears set-group-ID only of a group-executable file (root_sgid_nox),
        # and with real opens, which truncate in the OPEN (atomic_o_trunc), it
        # sends no SETATTR of the mode at all (o_*)
        real_opens = os.environ.get("MERGEFS_NO_OPEN") == "0"

        def known(out):
            return [[e for e in step if "root_sgid_nox" not in e[0] and
                     not (real_opens and e[0].startswith("o_"))] for step in out]
        ours, theirs = known(ours), known(theirs)
    assert ours == theirs


def test_killpriv_no_getxattr_per_write_no_getattr_per_chown(tmp_path, union_mount, fast,
                                                            agreed):
    """Files written with many write(2)s each, then chowned: with the agreement the
    kernel asks for security.capability once per file (its first write) and
    never refreshes the mode before a chown (the chown's own ask stays);
    without it, it asks before every write and refreshes before every chown."""
    mnt = writable(tmp_path, union_mount, LayerSpec().file("low", b"x"))
    os.listdir(mnt)
    served(union_mount)                                  # counts from here on

    def asked(counts, what):
        return sum(v for k, v in counts.items() if k.split("_")[0 if k[:5] != "fast_" else 1]
                   == what and not k.endswith("_dir"))
    for i in range(10):
        fd = os.open(mnt / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        for _ in range(8):
            os.write(fd, b"y" * 100)
        os.close(fd)
    written = served(union_mount)
    for i in range(10):
        os.chown(mnt / f"f{i}", USER, USER)
    chowned = served(union_mount)
    assert asked(written, "getxattr") == (10 if agreed else 80), written
    assert asked(chowned, "getxattr") == 10, chowned
    # (the root's attributes, dropped by the creates, are asked for once)
    assert (asked(chowned, "getattr") <= 1) == agreed, chowned
    assert all(os.stat(mnt / f"f{i}").st_size == 800 for i in range(10))
