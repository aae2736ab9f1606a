"""Suite-wide fixtures: root-only skips and the no-mount-left-behind check."""
from __future__ import annotations

import os

import pytest

from mergefs.testing import mounts

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown, trusted xattrs)")
needs_overlay = pytest.mark.skipif(not mounts.can_mount_overlay(),
                                   reason="needs root and kernel overlayfs")


def _mounts_under(prefixes) -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f
                if line.split()[2] in ("overlay",) or line.split()[2].startswith("fuse")
                if any(line.split()[1].startswith(p) for p in prefixes)}


@pytest.fixture(autouse=True)
def no_leaked_mounts(tmp_path_factory):
    """Every test unmounts what it mounted, also on failure (U7).

    Looks under this session's base temp dir only (tests mount there), so
    another pytest session running beside this one is never touched;
    tools/test.sh compares the whole /proc/mounts before and after the suite.
    """
    prefixes = [str(tmp_path_factory.getbasetemp())]
    before = _mounts_under(prefixes)
    yield
    leaked = _mounts_under(prefixes) - before
    for m in leaked:
        mounts.force_unmount(m)
    assert not leaked, f"test left mounts behind: {sorted(leaked)}"
