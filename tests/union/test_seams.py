"""Small seams of the union server: one A1/A3 xattr rule, fork safety counts OS threads."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from mergefs import syscalls
from mergefs.union.upper import Upper


@pytest.fixture
def upper(tmp_path):
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    u = Upper(str(tmp_path / "upper"), str(tmp_path / "work"))
    yield u
    u.close()


def _failing_setxattr(code):
    def setxattr(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return setxattr


def test_A3_copy_up_does_not_swallow_enospc(upper, monkeypatch):
    """set_meta applies the one A3 rule: refused xattrs are reported, a full disk is an error."""
    fd = os.open(b"x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=upper.work_fd)
    os.close(fd)
    st = os.stat(b"x", dir_fd=upper.work_fd)
    monkeypatch.setattr(syscalls, "setxattr", _failing_setxattr(errno.ENOSPC))
    with pytest.raises(OSError) as e:
        upper.set_meta(b"x", st, {"user.big": b"v" * 100})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(syscalls, "setxattr", _failing_setxattr(errno.EOPNOTSUPP))
    upper.set_meta(b"x", st, {"security.selinux": b"ctx"})       # refused: reported, not fatal


def test_can_fork_counts_os_threads_not_only_pythons():
    code = ("import _thread, threading, time; from mergefs.union.server import _can_fork; "
            "print(_can_fork()); _thread.start_new_thread(time.sleep, (30,)); time.sleep(0.1); "
            "assert threading.active_count() == 1; print(_can_fork())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["True", "False"], r.stderr
