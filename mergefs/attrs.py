"""Entry metadata as data, and the one place that applies it (A1, A2, A3).

Apply order is chown -> chmod -> xattrs -> times: chown clears setuid bits and
file capabilities, so they must come after it, and any write (xattrs
included) would disturb times set earlier.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

from . import syscalls
from .layer import LNK, content_xattrs

# Errors that mean "this filesystem or this user cannot hold that attribute";
# A3 says they are reported, not fatal (e.g. security.selinux on ext4 without
# SELinux, trusted.* without CAP_SYS_ADMIN).
XATTR_REFUSED = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EINVAL)


class Meta(NamedTuple):
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    xattrs: dict

    @classmethod
    def read(cls, dir_fd: int, name: bytes, st: os.stat_result | None = None) -> "Meta":
        """Metadata of ``name`` in ``dir_fd`` (``name`` b"" means the directory itself)."""
        if st is None:
            st = os.fstat(dir_fd) if not name else syscalls.lstat(name, dir_fd)
        return cls(st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns,
                   content_xattrs(dir_fd, name))


def apply_meta(dir_fd: int, name: bytes, meta: Meta, warnings: list[str],
               shown: bytes | None = None) -> None:
    """Give ``name`` in ``dir_fd`` the metadata ``meta`` (b"" = the directory itself);
    warnings name it ``shown`` if given (its path in the tree being built)."""
    target = name or b"."
    shown = name if shown is None else shown
    try:
        syscalls.lchown(target, meta.uid, meta.gid, dir_fd)
    except PermissionError:
        st = syscalls.lstat(target, dir_fd)
        if (st.st_uid, st.st_gid) != (meta.uid, meta.gid):
            warnings.append(f"{os.fsdecode(shown) or '/'}: cannot chown to "
                            f"{meta.uid}:{meta.gid} without root")
    if not stat.S_ISLNK(meta.mode):
        syscalls.chmod(target, stat.S_IMODE(meta.mode), dir_fd)
    set_xattrs(dir_fd, name, meta.xattrs, warnings, shown)
    syscalls.utime_ns(target, meta.atime_ns, meta.mtime_ns, dir_fd)


def set_xattrs(dir_fd: int, name: bytes, xattrs: dict, warnings: list[str],
               shown: bytes | None = None) -> None:
    """The one A3 rule: an xattr the filesystem refuses (XATTR_REFUSED) is a warning;
    any other failure (ENOSPC, EIO ...) is raised."""
    shown = name if shown is None else shown
    for attr, value in xattrs.items():
        try:
            syscalls.setxattr(dir_fd, name, attr, value)
        except OSError as e:
            if e.errno not in XATTR_REFUSED:
                raise
            warnings.append(f"{os.fsdecode(shown) or '/'}: xattr {attr} not set: {e.strerror}")


def is_symlink_meta(meta: Meta) -> bool:
    return stat.S_IFMT(meta.mode) == LNK
