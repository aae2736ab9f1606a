"""Resolve an upper's redirects in place, so that it means the same as a plain layer (R2).

A live upper moves merged directories with ``trusted.overlay.redirect``
(``dirmove``). Anything that turns an upper into a layer (a commit, a diff,
an export, a farm) reads layers by name, and kernel overlayfs honours a
redirect only with ``redirect_dir=on``; so before that, ``flatten_redirects``
rewrites a *copy* of the upper: each redirected directory becomes opaque
and holds its whole merged subtree (what the lowers supplied through the
redirect is copied in, hardlinks inside it kept as one inode, times set
after children, A2), and no redirect is left anywhere. The tree the upper
shows over the same lowers does not change; the cost is the size of the
redirected subtrees, paid once at commit time instead of at rename time.
"""
from __future__ import annotations

import os
import stat

from .. import syscalls
from ..attrs import Meta, apply_meta
from ..layer import DIR, LNK, OPAQUE_XATTRS, REDIRECT_XATTRS, REG, Layer
from .view import UnionView


def flatten_redirects(lowers, upper: str | os.PathLike) -> list[str]:
    """Rewrite ``upper`` (overlay format, over ``lowers`` bottom first) without
    redirects; return the warnings of attributes the filesystem refused (A3).
    An upper without redirects costs one listxattr per directory."""
    found = _redirected(os.fsencode(upper))
    if not found:
        return []
    view = UnionView([Layer(p) if not isinstance(p, Layer) else p for p in lowers]
                     + [Layer(upper, "overlay")])
    warnings: list[str] = []
    try:
        up = len(view.layers) - 1
        for path in found:
            inode = view.inodes.root
            for name in path.split(b"/"):
                inode = view.lookup(inode, name)
            view.listing(inode)                  # reads its redirects
            _materialise(view, up, inode, warnings)
    finally:
        view.close()
    return warnings


def _redirected(upper: bytes) -> list[bytes]:
    """The outermost directories of ``upper`` that carry a redirect, parents first."""
    out: list[bytes] = []
    stack = [(b"", os.open(upper, syscalls.O_DIR))]
    while stack:
        path, fd = stack.pop()
        try:
            with os.scandir(fd) as it:
                subdirs = sorted(os.fsencode(e.name) for e in it if e.is_dir(follow_symlinks=False))
            for name in subdirs:
                child = syscalls.open_dir(name, fd)
                cpath = path + b"/" + name if path else name
                if any(a in REDIRECT_XATTRS for a in syscalls.listxattr(child, b"")):
                    out.append(cpath)
                    os.close(child)
                else:
                    stack.append((cpath, child))
        finally:
            os.close(fd)
    return sorted(out)


def _materialise(view: UnionView, up: int, inode, warnings: list[str]) -> None:
    """Make the upper dir of ``inode`` opaque and self-contained."""
    links: dict[tuple[int, int], bytes] = {}
    root = view.layers[up].fd
    _fill(view, up, inode, root, links, warnings)
    fd = syscalls.open_beneath(root, inode.path)
    try:
        st = os.fstat(fd)
        for attr in REDIRECT_XATTRS:
            _drop_xattr(fd, attr)
        syscalls.setxattr(fd, b"", _opaque_name(fd), b"y")
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


def _opaque_name(fd: int) -> str:
    """The opaque xattr in the namespace the upper already uses."""
    names = syscalls.listxattr(fd, b"")
    return OPAQUE_XATTRS[1] if any(n.startswith("user.overlay.") for n in names) \
        else OPAQUE_XATTRS[0]


def _drop_xattr(fd: int, attr: str) -> None:
    try:
        os.removexattr(fd, attr)
    except OSError:
        pass


def _fill(view: UnionView, up: int, top, root: int, links: dict, warnings: list[str]) -> None:
    """Copy into the upper dir ``top`` every merged child a lower supplies, and so
    down its subdirectories. Iterative (a stack of open directories, as
    ``syscalls.rmtree``), so no depth hits Python's recursion limit; each
    directory's times are set back after its children are done (A2)."""
    stack = [_open_fill(view, top, syscalls.open_beneath(root, top.path), None, None)]
    try:
        while stack:
            inode, dfd, dst, items, _, _ = frame = stack[-1]
            item = next(items, None)
            if item is None:                     # done: its times, then its entry's in the parent
                stack.pop()
                try:
                    os.utime(dfd, ns=(dst.st_atime_ns, dst.st_mtime_ns))
                finally:
                    os.close(dfd)
                name, cst = frame[4], frame[5]
                if stack:
                    syscalls.utime_ns(name, cst.st_atime_ns, cst.st_mtime_ns, stack[-1][1])
                continue
            name, node = item
            child = view.inodes.entry(inode, name, node)
            if node.top != up:
                _copy(view, child, root, dfd, name, links, warnings)
            if node.kind == DIR:
                view.listing(child)              # read (redirects followed) before the rewrite
                cfd = syscalls.open_dir(name, dfd)
                try:
                    cst = os.fstat(cfd)
                    for attr in REDIRECT_XATTRS + OPAQUE_XATTRS:
                        _drop_xattr(cfd, attr)
                except BaseException:
                    os.close(cfd)
                    raise
                stack.append(_open_fill(view, child, cfd, name, cst))
    finally:
        for frame in stack:
            os.close(frame[1])


def _open_fill(view: UnionView, inode, dfd: int, name, cst) -> tuple:
    """A directory of ``_fill`` (its fd taken over): whiteouts removed (they mean
    nothing under an opaque dir); (inode, fd, its stat, merged children, its
    name in the parent, the parent entry's stat to restore)."""
    try:
        dst = os.fstat(dfd)
        for n in os.listdir(dfd):
            bname = os.fsencode(n)
            if syscalls.is_whiteout_stat(syscalls.lstat(bname, dfd)):
                syscalls.unlink(bname, dfd)
        items = iter(list(view.listing(inode).items()))
    except BaseException:
        os.close(dfd)
        raise
    return inode, dfd, dst, items, name, cst


def _copy(view: UnionView, inode, root: int, dfd: int, name: bytes, links: dict,
          warnings: list[str]) -> None:
    """One lower entry (a dir without its children) into the upper dir ``dfd``."""
    st = view.attr(inode)
    kind = stat.S_IFMT(st.st_mode)
    key = (inode.node.top, st.st_ino)
    if kind != DIR and st.st_nlink > 1 and key in links:
        os.link(links[key], name, src_dir_fd=root, dst_dir_fd=dfd, follow_symlinks=False)
        return
    if kind == DIR:
        syscalls.mkdir(name, dfd, 0o700)
    elif kind == LNK:
        syscalls.symlink(view.readlink(inode), name, dfd)
    elif kind == REG:
        src = view.open_content(inode)
        try:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=dfd)
            try:
                syscalls.copy_data(src, out, st.st_size)
            finally:
                os.close(out)
        finally:
            os.close(src)
    else:
        syscalls.mknod(name, kind | 0o600, st.st_rdev, dfd)
    xattrs = {os.fsdecode(a): view.getxattr(inode, a) for a in view.xattr_names(inode)}
    apply_meta(dfd, name, Meta(st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns,
                               st.st_mtime_ns, xattrs), warnings)
    if kind != DIR and st.st_nlink > 1:
        links[key] = inode.path
