"""Every raw system call that touches layers or builds results.

Callers use ``syscalls.NAME(...)`` (never ``from syscalls import NAME``) so a
test can replace one function to inject EXDEV, EMLINK or ENOSPC.

Paths are bytes, relative to a directory fd. Nothing here follows a symlink
that a layer contains: directories are opened with ``O_NOFOLLOW`` one level at
a time or through ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``, and
attribute calls use the ``*at`` forms with ``AT_SYMLINK_NOFOLLOW``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_openat2 = 437           # x86_64 and aarch64 share the generic number
_SYS_renameat2 = {"x86_64": 316, "aarch64": 276}.get(os.uname().machine, 316)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_openat2_works = True
# openat2 without ctypes: the C fast path's (mergefs.union.fastpath.load sets it)
fast_openat2 = None


def open_beneath(root_fd: int, path: bytes, flags: int = O_DIR, mode: int = 0) -> int:
    """Open ``path`` below ``root_fd`` without following any symlink on the way.

    The kernel enforces it (openat2); on kernels without openat2 the path is
    walked one component at a time with O_NOFOLLOW.
    """
    global _openat2_works
    if not path:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=root_fd)
    if _openat2_works and fast_openat2 is not None:
        try:
            return fast_openat2(root_fd, path, flags | os.O_CLOEXEC, mode)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _openat2_works = False
    if _openat2_works:
        how = _OpenHow(flags | os.O_CLOEXEC, mode,
                       RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_openat2, root_fd, path, ctypes.byref(how),
                           ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), path)
        _openat2_works = False
    parts = path.split(b"/")
    fd = os.open(".", O_DIR, dir_fd=root_fd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def renameat2(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes, flags: int) -> None:
    r = _libc.syscall(_SYS_renameat2, src_dir_fd, src, dst_dir_fd, dst, flags)
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def rename_noreplace(src: bytes | str, dst: bytes | str) -> None:
    """Publish ``src`` as ``dst``; fails with EEXIST if ``dst`` exists (even empty)."""
    renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), RENAME_NOREPLACE)


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (prctl
    PR_SET_PDEATHSIG), so a worker never outlives a killed caller; if the
    parent is already gone, die now."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def open_dir(name: bytes, dir_fd: int) -> int:
    return os.open(name, O_DIR, dir_fd=dir_fd)


def open_dir_walk(root_fd: int, path: bytes) -> int:
    """Open directory ``path`` below ``root_fd`` one component at a time (O_NOFOLLOW):
    for paths too long for one ``openat`` (PATH_MAX), where ``open_beneath`` fails."""
    fd = os.open(".", O_DIR, dir_fd=root_fd)
    try:
        for part in path.split(b"/"):
            if part:
                nxt = os.open(part, O_DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


PATH_MAX = 4096
JUMP = 8      # a DirCursor walks a path from the root if it has < JUMP x the steps


class DirCursor:
    """A directory below ``root_fd`` that moves to the one asked for in steps of one
    component: ``..`` up to the common ancestor (the root itself is never left),
    then names down with ``O_NOFOLLOW``. A depth-first walk thus opens O(1)
    directories per directory visited and holds one fd, however deep the tree
    (its paths may exceed PATH_MAX), where opening each from the root costs
    O(depth). A longer move (another worker's directory) whose path is shorter
    than ``JUMP`` x its steps and than PATH_MAX is one ``open_beneath`` instead.
    ``at`` lends the fd, valid until the next move."""

    def __init__(self, root_fd: int):
        self.root, self.fd, self.path = root_fd, root_fd, b""

    def at(self, path: bytes) -> int:
        cur = self.path
        if path == cur:
            return self.fd
        if path.startswith(cur) and (not cur or path[len(cur):len(cur) + 1] == b"/"):
            keep = len(cur)                  # below: most often a child
        else:
            keep = common_dir(cur, path)
        rest = path[keep + 1:] if keep else path
        ups = cur.count(b"/", keep) if keep else 0      # from the root: none
        steps = ups + (rest.count(b"/") + 1 if rest else 0)
        if steps > 1 and len(path) < PATH_MAX and path.count(b"/") < JUMP * steps:
            # a jump (another worker's directory): one path walk in the kernel is
            # cheaper than a system call per step, and no longer than JUMP x them
            self._set(open_beneath(self.root, path), path)
            return self.fd
        try:
            if keep == 0 and cur:
                self._set(self.root, b"")
            for _ in range(ups):
                self._up()
            for part in rest.split(b"/") if rest else ():
                if part in (b"", b".", b".."):      # never a name a listing gives
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
                fd = os.open(part, O_DIR, dir_fd=self.fd)
                self._set(fd, self.path + b"/" + part if self.path else part)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        return self.fd

    def _up(self) -> None:
        parent = self.path.rpartition(b"/")[0]
        try:
            fd = os.open(b"..", O_DIR, dir_fd=self.fd)
        except PermissionError:      # EACCES: no search permission here; from the root
            fd = open_dir_walk(self.root, parent)
        self._set(fd, parent)

    def _set(self, fd: int, path: bytes) -> None:
        if self.fd != self.root:
            os.close(self.fd)
        self.fd, self.path = fd, path

    def close(self) -> None:
        self._set(self.root, b"")


def common_dir(a: bytes, b: bytes) -> int:
    """The length of the deepest directory path both ``a`` and ``b`` are at or below
    (0: the root), found in C-speed steps (no loop over components)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        lcp = n
    else:
        x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
        lcp = n - (x.bit_length() + 7) // 8
    if (lcp == len(a) or a[lcp:lcp + 1] == b"/") and (lcp == len(b) or b[lcp:lcp + 1] == b"/"):
        return lcp
    return max(a.rfind(b"/", 0, lcp), 0)


def lstat(name: bytes, dir_fd: int) -> os.stat_result:
    if not name:
        return os.fstat(dir_fd)
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def fd_path(dir_fd: int, name: bytes) -> bytes | int:
    """What the xattr calls (which take no dir_fd) should name: ``name`` in
    ``dir_fd`` as a /proc path (not followed at its last component), or the fd
    itself when ``name`` is empty."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name) if name else dir_fd


def listxattr(dir_fd: int, name: bytes) -> list[str]:
    try:
        target = fd_path(dir_fd, name)
        if isinstance(target, int):
            return os.listxattr(target)
        return os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def getxattr(dir_fd: int, name: bytes, attr: str) -> bytes | None:
    try:
        target = fd_path(dir_fd, name)
        if isinstance(target, int):
            return os.getxattr(target, attr)
        return os.getxattr(target, attr, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def setxattr(dir_fd: int, name: bytes, attr: str, value: bytes) -> None:
    target = fd_path(dir_fd, name)
    if isinstance(target, int):
        os.setxattr(target, attr, value)
    else:
        os.setxattr(target, attr, value, follow_symlinks=False)


def removexattr(dir_fd: int, name: bytes, attr: str) -> None:
    """Remove an xattr; one that is already gone is fine."""
    target = fd_path(dir_fd, name)
    try:
        if isinstance(target, int):
            os.removexattr(target, attr)
        else:
            os.removexattr(target, attr, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise


def readlink(name: bytes, dir_fd: int) -> bytes:
    return os.readlink(name, dir_fd=dir_fd)


def link(src: bytes, dst: bytes, src_dir_fd: int, dst_dir_fd: int) -> None:
    os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)


def create_excl(name: bytes, dir_fd: int, mode: int = 0o600) -> int:
    """Create a new regular file and open it for writing; never through or over a
    symlink (O_EXCL fails with EEXIST on any existing name, a symlink included)."""
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   mode, dir_fd=dir_fd)


def mkdir(name: bytes, dir_fd: int, mode: int = 0o700) -> None:
    os.mkdir(name, mode, dir_fd=dir_fd)


def symlink(target: bytes, name: bytes, dir_fd: int) -> None:
    os.symlink(target, name, dir_fd=dir_fd)


def mknod(name: bytes, mode: int, rdev: int, dir_fd: int) -> None:
    os.mknod(name, mode, rdev, dir_fd=dir_fd)


# An empty ``name`` means ``dir_fd`` itself (a layer's or upper's root, opened
# O_RDONLY): the f* calls then act on the fd.

def lchown(name: bytes, uid: int, gid: int, dir_fd: int) -> None:
    if not name:
        os.chown(dir_fd, uid, gid)
        return
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def chmod(name: bytes, mode: int, dir_fd: int) -> None:
    """chmod a non-symlink (Linux has no lchmod; symlink modes are always 0777)."""
    if not name:
        os.chmod(dir_fd, mode)
        return
    os.chmod(name, mode, dir_fd=dir_fd)


def utime_ns(name: bytes, atime_ns: int, mtime_ns: int, dir_fd: int) -> None:
    if not name:
        os.utime(dir_fd, ns=(atime_ns, mtime_ns))
        return
    os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def unlink(name: bytes, dir_fd: int) -> None:
    os.unlink(name, dir_fd=dir_fd)


def copy_data(src_fd: int, dst_fd: int, size: int, ranged: bool = True) -> bool:
    """Copy ``size`` bytes; copy_file_range shares extents where the fs can.
    Returns False if copy_file_range was refused (the caller may pass
    ``ranged=False`` for the same two filesystems next time: sendfile at once)."""
    copied = 0
    while copied < size:
        n = -1
        if ranged:
            try:
                n = os.copy_file_range(src_fd, dst_fd, size - copied)
            except OSError as e:
                # EXDEV across filesystems (most of them), EINVAL/ENOSYS on some
                # (overlay, fuse): sendfile works everywhere.
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                ranged = False
        if n < 0:
            n = os.sendfile(dst_fd, src_fd, None, min(size - copied, 1 << 30))
        if n == 0:
            break
        copied += n
    return ranged


def copy_file(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes, size: int) -> None:
    """Copy a regular file's bytes into a new file ``dst`` (mode 0600; the
    caller applies metadata). Neither name is followed if it is a symlink."""
    sfd = os.open(src, O_READ, dir_fd=src_dir_fd)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dst_dir_fd)
        try:
            copy_data(sfd, dfd, size)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def is_whiteout_stat(st: os.stat_result) -> bool:
    """Overlay whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# -- bind mounts (views: a container's rootfs is a bind of its view) --------------
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096


def mount(source: str | None, target: str, flags: int, fstype: str | None = None,
          data: str | None = None) -> None:
    """mount(2); ``data`` is the filesystem's option string; raises OSError."""
    enc = (lambda s: None if s is None else os.fsencode(s))
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                   enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def scan_tree(dir_fd: int):
    """Every entry below the open directory ``dir_fd`` (an ``os.DirEntry``, usable until
    the next one is asked for), parents before children, one open fd per level: depth
    safe, never following a symlink. A directory that vanishes meanwhile is skipped."""
    for _, _, de in scan_tree_paths(dir_fd):
        yield de


def scan_tree_paths(dir_fd: int):
    """``scan_tree``, each entry as (the path of the directory holding it, bytes,
    relative to ``dir_fd`` (b"" for ``dir_fd`` itself), an fd of that directory
    (valid until the next entry is asked for), the entry)."""
    fd = os.open(".", O_DIR, dir_fd=dir_fd)
    stack = [(fd, os.scandir(fd), b"")]
    try:
        while stack:
            fd, it, path = stack[-1]
            de = next(it, None)
            if de is None:
                stack.pop()
                it.close()
                os.close(fd)
                continue
            yield path, fd, de
            if de.is_dir(follow_symlinks=False):
                try:
                    sub = os.open(de.name, O_DIR, dir_fd=fd)
                except FileNotFoundError:
                    continue
                name = os.fsencode(de.name)
                stack.append((sub, os.scandir(sub), path + b"/" + name if path else name))
    finally:
        for fd, it, _ in stack:
            it.close()
            os.close(fd)


def rmtree(path: str | bytes | os.PathLike, dir_fd: int | None = None,
           ignore_errors: bool = False) -> None:
    """Remove the tree at ``path`` (relative to ``dir_fd``, if given), never following a
    symlink. Iterative and fd-relative, so a tree thousands of directories deep (whose
    paths exceed PATH_MAX) goes too; ``shutil.rmtree`` recurses once per level.
    ``ignore_errors``: remove what can be removed, raise nothing (like shutil's)."""
    path = os.fsencode(path)
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path, dir_fd=dir_fd)
            return
        _rmtree_children(os.open(path, O_DIR, dir_fd=dir_fd), ignore_errors)
        os.rmdir(path, dir_fd=dir_fd)
    except OSError:
        if not ignore_errors:
            raise


def _rmtree_children(top_fd: int, ignore_errors: bool) -> None:
    """Empty the open directory ``top_fd`` (closed on return), deepest entries first."""
    stack = [(top_fd, iter(os.listdir(top_fd)), b"")]   # (dir fd, names left, its name)
    try:
        while stack:
            fd, names, dname = stack[-1]
            name = next(names, None)
            try:
                if name is None:
                    stack.pop()
                    os.close(fd)
                    if stack:
                        os.rmdir(dname, dir_fd=stack[-1][0])
                    continue
                name = os.fsencode(name)
                try:
                    child = os.open(name, O_DIR, dir_fd=fd)
                except OSError as e:   # ENOTDIR, ELOOP (a symlink): not a directory
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    os.unlink(name, dir_fd=fd)
                    continue
                stack.append((child, iter(os.listdir(child)), name))
            except OSError:
                if not ignore_errors:
                    raise
    finally:
        for fd, _, _ in stack:
            os.close(fd)
