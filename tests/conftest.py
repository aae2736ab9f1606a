"""Suite-wide test harness: skips with reasons, and the no-mount-left-behind check.

* ``needs(*what)``: the one skip helper for a missing oracle or privilege;
  each need has its reason (``needs("root")``, ``needs("overlay", "umoci")``;
  a name not in ``NEEDS`` is a program on PATH). ``require(*what)`` is the
  same inside a test or fixture. ``needs_root`` and ``needs_overlay`` are the
  two most used.
* ``no_leaked_mounts`` (autouse): the one leak check. Every test unmounts
  what it mounted, also on failure (U7); a mount left below this session's
  temp dir, or below a private root registered with ``mounts.watch_below``,
  fails the test (and is unmounted). The mount table is read by
  ``mergefs.mounttable`` (the one reader; it decodes mountinfo's escapes).
* Store tests add a store that ends every test with ``fsck`` (tests/store/conftest.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mergefs.testing import mounts


def _have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and os.geteuid() == 0


def _libfuse3_dev() -> bool:
    return shutil.which("pkg-config") is not None and subprocess.run(
        ["pkg-config", "--exists", "fuse3"]).returncode == 0


BUSYBOX = "/bin/busybox"
CONTAINERD_SUITE = Path("/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite")

# Needs that are not simply a program on PATH (any other name is one: needs("podman")).
NEEDS = {
    "root": (lambda: os.geteuid() == 0, "needs root (mknod, chown, trusted xattrs, mounts)"),
    "overlay": (mounts.can_mount_overlay, "needs root and kernel overlayfs"),
    "fuse": (_have_fuse, "needs root and /dev/fuse"),
    "busybox": (lambda: os.path.exists(BUSYBOX), f"needs busybox-static ({BUSYBOX})"),
    "docker-registry": (lambda: os.path.exists("/usr/bin/docker-registry"),
                        "needs docker-registry (/usr/bin/docker-registry)"),
    "libfuse3-dev": (_libfuse3_dev, "needs libfuse3-dev (pkg-config fuse3)"),
    "containerd-testsuite": (CONTAINERD_SUITE.is_dir,
                             "needs golang-github-containerd-containerd-dev (its snapshot testsuite)"),
}


def unmet(*what: str) -> str | None:
    """The reason for the first need in ``what`` that is not met, or None."""
    for w in what:
        check, reason = NEEDS.get(w) or (lambda w=w: shutil.which(w) is not None, f"needs {w}")
        if not check():
            return reason
    return None


def needs(*what: str) -> pytest.MarkDecorator:
    """Skip unless every need in ``what`` is met; the reason names the first that is not."""
    reason = unmet(*what)
    return pytest.mark.skip(reason=reason) if reason else pytest.mark.skipif(False, reason="")


def require(*what: str) -> None:
    """``needs`` inside a test or fixture (a need of one parameter only, say)."""
    reason = unmet(*what)
    if reason:
        pytest.skip(reason)


needs_root = needs("root")
needs_overlay = needs("overlay")


@pytest.fixture(autouse=True)
def no_leaked_mounts(tmp_path_factory):
    """Every test unmounts what it mounted, also on failure (U7).

    Looks below this session's base temp dir and below every private root a
    test or harness registered with ``mounts.watch_below`` (e.g. the
    containerd conformance harness's /tmp/mfc-*), so mounts of another pytest
    session or agent are never counted (``mounts.MountWatch`` says why).
    """
    watch = mounts.MountWatch(tmp_path_factory.getbasetemp())
    yield
    leaked = watch.leaked()
    for m in sorted(leaked, key=len, reverse=True):      # innermost first
        mounts.force_unmount(m)
    assert not leaked, f"test left mounts behind: {sorted(leaked)}"
