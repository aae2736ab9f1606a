"""A writable union's upper and work dir holding trees 2000 directories deep: the
redirect flattening (R2) and the work-dir clean-up walk them without recursion."""
from __future__ import annotations

import os

import pytest

from mergefs import syscalls
from mergefs.union.flatten import flatten_redirects
from mergefs.union.upper import STAGED_PREFIX, Upper

from ..conftest import needs_root
from ..store.test_deep_trees import DEPTH, bottom, make_deep

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def remove_deep_trees(tmp_path):
    """pytest's own clean-up recurses per level (shutil.rmtree): remove the trees here."""
    yield
    for name in os.listdir(tmp_path):
        syscalls.rmtree(tmp_path / name)


def dir_count(root) -> int:
    """Directories below ``root`` (os.walk recurses per level)."""
    n, stack = 0, [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    while stack:
        fd = stack.pop()
        try:
            with os.scandir(fd) as it:
                subs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            for name in subs:
                n += 1
                stack.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                     dir_fd=fd))
        finally:
            os.close(fd)
    return n


@needs_root                                   # trusted.overlay.* on the upper
def test_R2_flatten_of_a_redirect_to_a_2000_level_lower_tree(tmp_path):
    low, up = tmp_path / "low", tmp_path / "up"
    low.mkdir()
    make_deep(low / "big", DEPTH)
    (low / "big" / "top").write_bytes(b"t")
    up.mkdir()
    os.mknod(up / "big", 0o600 | 0o020000, 0)              # the old name: a whiteout
    (up / "moved").mkdir()
    os.setxattr(up / "moved", "trusted.overlay.redirect", b"/big")
    os.utime(up / "moved", ns=(1, 2_000_000_000))
    assert flatten_redirects([str(low)], up) == []
    names = os.listxattr(up / "moved")
    assert "trusted.overlay.redirect" not in names
    assert os.getxattr(up / "moved", "trusted.overlay.opaque") == b"y"
    assert (up / "moved" / "top").read_bytes() == b"t"
    assert bottom(up / "moved", DEPTH) == bottom(low / "big", DEPTH)
    assert dir_count(up / "moved") == DEPTH
    assert os.stat(up / "moved").st_mtime_ns == 2_000_000_000     # times set after children
    assert os.stat(up / "moved" / "d").st_mtime_ns == os.stat(low / "big" / "d").st_mtime_ns


def test_work_dir_trees_2000_levels_deep_are_removed(tmp_path):
    up, work = tmp_path / "up", tmp_path / "work"
    up.mkdir()
    work.mkdir()
    make_deep(work / f"{STAGED_PREFIX}1-0", DEPTH)         # left by a crashed server
    (work / "other").mkdir()                                # not ours: kept
    upper = Upper(str(up), str(work))
    try:
        assert os.listdir(work) == ["other"]
        tmp = upper.tmp_name()
        make_deep(work / os.fsdecode(tmp), DEPTH)
        upper.discard_tree(tmp)
        assert os.listdir(work) == ["other"]
    finally:
        upper.close()
