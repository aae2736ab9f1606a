"""Suite-wide test harness: skips with reasons, and the no-mount-left-behind check.

* ``needs(*what)``: the one skip helper; each need has its reason
  (``needs("root")``, ``needs("overlay", "umoci")``). ``needs_root`` and
  ``needs_overlay`` are the two most used.
* ``no_leaked_mounts`` (autouse): the one leak check. Every test unmounts
  what it mounted, also on failure (U7); a mount left below this session's
  temp dir fails the test (and is unmounted). The mount table is read by
  ``mergefs.mounttable`` (the one reader; it decodes mountinfo's escapes).
* Store tests add a store that ends every test with ``fsck`` (tests/store/conftest.py).
"""
from __future__ import annotations

import os
import shutil

import pytest

from mergefs import mounttable
from mergefs.testing import mounts


def _have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and os.geteuid() == 0


NEEDS = {
    "root": (lambda: os.geteuid() == 0, "needs root (mknod, chown, trusted xattrs, mounts)"),
    "overlay": (mounts.can_mount_overlay, "needs root and kernel overlayfs"),
    "fuse": (_have_fuse, "needs root and /dev/fuse"),
    "umoci": (lambda: shutil.which("umoci") is not None, "needs umoci"),
    "skopeo": (lambda: shutil.which("skopeo") is not None, "needs skopeo"),
    "runc": (lambda: shutil.which("runc") is not None, "needs runc"),
}


def needs(*what: str) -> pytest.MarkDecorator:
    """Skip unless every need in ``what`` is met; the reason names the first that is not."""
    for w in what:
        check, reason = NEEDS[w]
        if not check():
            return pytest.mark.skip(reason=reason)
    return pytest.mark.skipif(False, reason="")


needs_root = needs("root")
needs_overlay = needs("overlay")


@pytest.fixture(autouse=True)
def no_leaked_mounts(tmp_path_factory):
    """Every test unmounts what it mounted, also on failure (U7).

    Looks under this session's base temp dir only (tests mount there), so
    another pytest session running beside this one is never touched;
    tools/test.sh compares the whole mount table before and after the suite.
    """
    base = str(tmp_path_factory.getbasetemp())
    before = mounttable.targets(below=base)
    yield
    leaked = mounttable.targets(below=base) - before
    for m in sorted(leaked, key=len, reverse=True):      # innermost first
        mounts.force_unmount(m)
    assert not leaked, f"test left mounts behind: {sorted(leaked)}"
