"""Farms and diffs of trees thousands of directories deep: O(1) work per directory.

The builder and the differ reach each directory from the last one visited
(``syscalls.DirCursor``), never by its path from a layer's root: that cost
O(depth) per directory (the kernel walks the path; the differ also rescanned
its stack of frames per record), O(depth^2) in all, and failed past PATH_MAX.
Measured with work counters, not time: Python lines run (``sys.settrace``)
and path components handed to the kernel (audit events of the ``os`` calls
and ctypes' raw system calls).
"""
from __future__ import annotations

import errno
import os
import sys

import pytest

from mergefs import syscalls
from mergefs.diff import write_diff
from mergefs.farm import build_farm

from ..store.test_deep_trees import bottom, make_deep, remove_deep_trees  # noqa: F401
from .conftest import inject_link_error

pytestmark = pytest.mark.timeout(300)

WANT = {"leaf": b"changed\n", "leaf2": b"changed\n", "link": b"-> leaf"}


def _pair(tmp_path, depth: int, name: str = "d"):
    a, b = tmp_path / f"a{depth}", tmp_path / f"b{depth}"
    make_deep(a, depth, name)
    make_deep(b, depth, name, leaf=b"changed\n")
    # The two symlinks have one target; F2 sees b's as changed by its mtime only,
    # which the kernel's coarse clock can make equal to a's when the trees are
    # made within one tick (a flaky diff case): one second later, always.
    fa, fb = _deepest(a, depth, name), _deepest(b, depth, name)
    try:
        t = os.stat("link", dir_fd=fa, follow_symlinks=False).st_mtime_ns + 1_000_000_000
        os.utime("link", ns=(t, t), dir_fd=fb, follow_symlinks=False)
    finally:
        os.close(fa)
        os.close(fb)
    return a, b


def _deepest(root, depth: int, name: str = "d") -> int:
    """An fd on the deepest directory of ``make_deep(root, depth)``, reached by fds."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = sub
    return fd


def _components(args) -> int:
    n = 0
    for a in args:
        if isinstance(a, (bytes, str)):
            n += a.count(b"/" if isinstance(a, bytes) else "/") + 1
        elif isinstance(a, (tuple, list)):
            n += _components(a)
    return n


class Work:
    """Python lines run in this thread and path components passed to the kernel."""

    def __init__(self):
        self.lines = self.components = 0
        self.on = False
        sys.addaudithook(self._audit)         # hooks stay for the process: ``on`` gates it

    def _audit(self, event, args):
        if self.on and (event == "open" or event.startswith("os.")
                        or event == "ctypes.call_function"):
            self.components += _components(args)

    def _trace(self, frame, event, arg):
        if event == "line":
            self.lines += 1
        return self._trace

    def run(self, fn) -> "Work":
        self.on = True
        sys.settrace(self._trace)
        try:
            fn()
        finally:
            sys.settrace(None)
            self.on = False
        return self


WORK = Work()


def _measure(tmp_path, depth: int, what: str) -> tuple[int, int]:
    a, b = _pair(tmp_path, depth)
    out = tmp_path / f"{what}{depth}"
    fn = {"farm": lambda: build_farm([a, b], out, workers=1),
          "diff": lambda: write_diff([a], [b], out)}[what]
    WORK.lines = WORK.components = 0
    WORK.run(fn)
    assert bottom(out, depth) == WANT
    return WORK.lines, WORK.components


@pytest.mark.parametrize("what", ["farm", "diff"])
def test_work_per_directory_does_not_grow_with_depth(tmp_path, what):
    small, big = (_measure(tmp_path, d, what) for d in (300, 1200))
    # linear: 4x the directories, 4x the work (+ a constant); O(depth^2): 16x
    assert big[0] < 5 * small[0], ("Python lines", small[0], big[0])
    assert big[1] < 5 * small[1], ("path components", small[1], big[1])


# 1500 levels named "ddd": paths of 6000 bytes, past PATH_MAX (4096)
DEPTH, NAME = 1500, "ddd"


@pytest.fixture(scope="module")
def past_path_max(tmp_path_factory):
    a, b = _pair(tmp_path_factory.mktemp("past-path-max"), DEPTH, NAME)
    yield a, b
    for p in (a, b):
        syscalls.rmtree(p)


@pytest.mark.parametrize("workers,parallel", [(1, "thread"), (2, "thread"), (2, "process")])
def test_farm_and_diff_of_a_tree_deeper_than_path_max(tmp_path, past_path_max, workers,
                                                      parallel):
    """Paths past PATH_MAX, and no recursion either (1500 levels)."""
    a, b = past_path_max
    build_farm([a, b], tmp_path / "farm", workers=workers, parallel=parallel)
    assert bottom(tmp_path / "farm", DEPTH, NAME) == WANT
    if workers == 1:
        write_diff([a], [b], tmp_path / "diff")
        assert bottom(tmp_path / "diff", DEPTH, NAME) == WANT       # F3: the parent chain


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EMLINK])
def test_copies_of_a_tree_deeper_than_path_max_keep_hardlinks(tmp_path, monkeypatch,
                                                              past_path_max, err):
    """The copy fallback past PATH_MAX: the second name links to the first copy (H1)."""
    a, b = past_path_max
    inject_link_error(monkeypatch, err)
    stats = build_farm([a, b], tmp_path / "farm", workers=1)
    assert bottom(tmp_path / "farm", DEPTH, NAME) == WANT
    assert sum(stats.copies.values()) == 3 and stats.links == 0
    fd = os.open(tmp_path / "farm", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            fd, old = os.open(NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
        st = [os.stat(n, dir_fd=fd, follow_symlinks=False) for n in ("leaf", "leaf2")]
    finally:
        os.close(fd)
    assert st[0].st_ino == st[1].st_ino and st[0].st_nlink == 2
