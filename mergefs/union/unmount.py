"""Finding and removing a union's mount: is it mergefs's, is its server dead,
unmount it (``fusermount3 -u``; a dead or busy one detached lazily, U7).

The mount table is read through ``mergefs.mounttable`` (the one reader of
/proc/self/mountinfo). ``mergefs.union.server`` re-exports these names.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os

from .. import mounttable
from ..errors import MountError

log = logging.getLogger("mergefs.union")
FSTYPE = "fuse.mergefs"


def mount_at(mountpoint: str) -> dict | None:
    """The topmost mount at ``mountpoint``, or None.

    Keys: ``dev`` ("major:minor"), ``fstype`` and ``source``.
    """
    e = mounttable.entry_at(mountpoint)
    return None if e is None else {"dev": e.device, "fstype": e.fstype, "source": e.source}


def is_mergefs_mount(mountpoint: str) -> bool:
    info = mount_at(mountpoint)
    return info is not None and info["fstype"] == FSTYPE


def is_dead(mountpoint: str) -> bool:
    """Is the FUSE mount at ``mountpoint`` one whose server is gone?

    The kernel answers ``stat`` of a dead mount from its attribute cache, so
    ask for something it never caches: ``statfs`` goes to the server each
    time and fails with ENOTCONN once the connection was aborted (the server's
    /dev/fuse fd closed). The connection's entry in /sys/fs/fuse/connections
    (named by the mount's device number) must exist for a FUSE mount at all.
    """
    info = mount_at(mountpoint)
    if info is None or not info["fstype"].startswith("fuse"):
        return False
    try:
        os.statvfs(mountpoint)
        return False
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def clean_stale(mountpoint: str) -> bool:
    """Detach a mergefs mount at ``mountpoint`` whose server died (U7); True if one was."""
    if not is_mergefs_mount(mountpoint) or not is_dead(mountpoint):
        return False
    log.info("cleaning the mount of a dead server at %s", mountpoint)
    _detach(mountpoint)
    return not is_mounted(mountpoint)


def _detach(mountpoint: str) -> None:
    """Lazy unmount; kick the aborted connection first so nothing waits on it."""
    import subprocess
    info = mount_at(mountpoint)
    if info is not None:
        minor = info["dev"].split(":")[1]
        with contextlib.suppress(OSError):
            with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                f.write("1")
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def unmount(mountpoint: str) -> None:
    """Unmount a union; refuse any mount that is not mergefs's.

    A dead server's mount (ENOTCONN) and a busy one are detached lazily.
    """
    mountpoint = os.path.abspath(mountpoint)
    info = mount_at(mountpoint)
    if info is None:
        raise MountError(f"{mountpoint} is not mounted")
    if info["fstype"] != FSTYPE:
        raise MountError(f"{mountpoint} is not a mergefs mount (it is {info['fstype']}); "
                         "not unmounting it")
    import subprocess
    r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if r.returncode == 0 or not is_mounted(mountpoint):
        return
    _detach(mountpoint)
    if is_mounted(mountpoint):
        raise MountError(f"cannot unmount {mountpoint}: {r.stderr.strip()}")


def is_mounted(mountpoint: str) -> bool:
    return mounttable.is_mounted(mountpoint)
