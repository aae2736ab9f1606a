"""Read-only views the kernel's overlayfs shows exactly as mergefs does.

A layer is *plain* when nothing in it is a deletion or a marker in either
whiteout format: no name starting with ``.wh.``, no character device 0/0, and
no ``trusted.overlay.*`` or ``user.overlay.*`` xattr on any entry (opaque
markers, redirects, xattr whiteouts, mergefs's format mark and inode
numbers). Over plain layers the merged view is the plain union (an entry of an
upper layer hides the same name below; directories merge), which mergefs in
any format and kernel overlayfs show alike: same names, kinds, modes, owners,
sizes, times, contents and xattrs (inode numbers and ``st_dev`` differ, as
they differ between any two mounts).

The mount-program form uses this for read-only mounts with no upper
(``mergefs.cli.cmd_mount_helper.kernel_read_only``): containers/storage makes
one at every commit of a build (its naive diff walks the parent layers'
mount beside the container's) and for ``podman image mount``. Such a mount
then costs a kernel mount instead of a FUSE server: no server start, and the
walk runs at kernel speed. A lone plain layer (overlayfs wants two lower
layers without an upper) is bound read-only instead. Only root in the initial
user namespace takes this path: in a user namespace ``trusted.*`` xattrs are
not even listed, so plainness could not be checked.
"""
from __future__ import annotations

import os

from . import syscalls
from .layer import OCI_WHITEOUT, OVERLAY_PREFIXES

OPTIONS_MAX = 4000      # overlayfs takes its options in one page


def _marked(dir_fd: int, name: bytes) -> bool:
    return any(a.startswith(OVERLAY_PREFIXES) for a in syscalls.listxattr(dir_fd, name))


def is_plain(path: str | bytes) -> bool:
    """Does the layer at ``path`` (its own symlink followed, none inside) hold no
    whiteout, opaque marker, redirect or other overlay xattr in either format?"""
    root = os.open(path, syscalls.O_DIR & ~os.O_NOFOLLOW)
    try:
        if _marked(root, b""):
            return False
        for _, dir_fd, de in syscalls.scan_tree_paths(root):
            name = os.fsencode(de.name)
            if name.startswith(OCI_WHITEOUT):
                return False
            if not (de.is_dir(follow_symlinks=False) or de.is_file(follow_symlinks=False)
                    or de.is_symlink()) and syscalls.is_whiteout_stat(de.stat(
                        follow_symlinks=False)):
                return False
            if _marked(dir_fd, name):
                return False
        return True
    finally:
        os.close(root)


SET_FLAGS = {"nodev": syscalls.MS_NODEV, "nosuid": syscalls.MS_NOSUID,
             "noexec": syscalls.MS_NOEXEC}
CLEAR_FLAGS = {"dev": syscalls.MS_NODEV, "suid": syscalls.MS_NOSUID, "exec": syscalls.MS_NOEXEC}


def mount_flags(options=()) -> int:
    """Read-only, and nosuid,nodev unless ``options`` ask for suid/dev (as every FUSE
    mount, so as the FUSE form of the same call); noexec when asked."""
    flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV
    for opt in options:
        flags |= SET_FLAGS.get(opt, 0)
    for opt in options:
        flags &= ~CLEAR_FLAGS.get(opt, 0)
    return flags


def mount_read_only(lowers: list[str], target: str, options=()) -> None:
    """Mount the plain layers ``lowers`` (top first, as overlayfs lists them; paths as
    given, so relative ones resolve from the working directory as the kernel's do)
    read-only at ``target``: overlayfs, or a read-only bind of a lone layer.
    ``options``: nodev, nosuid, noexec, dev, suid, exec (``mount_flags``). Raises
    OSError (ValueError for paths overlayfs options cannot carry); nothing is left
    mounted then."""
    flags = mount_flags(options)
    if len(lowers) == 1:
        syscalls.mount(lowers[0], target, syscalls.MS_BIND)
        try:
            syscalls.mount(None, target, syscalls.MS_REMOUNT | syscalls.MS_BIND | flags)
        except OSError:
            syscalls.umount(target, 2)          # MNT_DETACH
            raise
        return
    data = "lowerdir=" + ":".join(lowers)
    if any(c in p for p in lowers for c in ":,\\") or len(data) > OPTIONS_MAX:
        raise ValueError("layer paths overlayfs options cannot carry")
    syscalls.mount("overlay", target, flags, "overlay", data)


def initial_root() -> bool:
    """Root in the initial user namespace (not uid 0 of rootless podman's)?"""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False
