"""syscalls.open_beneath through the C fast path's openat2 (set by
fastpath.load in a server): the same fds and the same errors as through ctypes."""
from __future__ import annotations

import errno
import os

import pytest

from mergefs import syscalls


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_bytes(b"content")
    (tmp_path / "d/link").symlink_to("f")
    (tmp_path / "outside").write_bytes(b"o")
    fd = os.open(tmp_path / "d", syscalls.O_DIR)
    yield fd
    os.close(fd)


def outcomes(fd: int) -> list:
    out = []
    for path in (b"f", b"link", b"../outside", b"missing", b"f/x"):
        try:
            got = syscalls.open_beneath(fd, path, syscalls.O_READ)
        except OSError as e:
            out.append((type(e), e.errno, e.filename))
        else:
            out.append(os.read(got, 100))
            assert os.get_inheritable(got) is False
            os.close(got)
    return out


def test_open_beneath_in_c_as_through_ctypes(tree, monkeypatch):
    try:
        from mergefs.union import _fastpath
    except ImportError:
        pytest.skip("no C fast path module")
    monkeypatch.setattr(syscalls, "fast_openat2", None)
    plain = outcomes(tree)
    monkeypatch.setattr(syscalls, "fast_openat2", _fastpath.openat2)
    assert outcomes(tree) == plain
    assert plain[0] == b"content" and plain[1][1] == errno.ELOOP
    assert plain[2][1] == errno.EXDEV and plain[3][0] is FileNotFoundError
    assert plain[4][1] == errno.ENOTDIR
