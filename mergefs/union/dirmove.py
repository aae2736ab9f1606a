"""Renaming a directory that lower layers serve (U5, R1).

The O(1) way, what kernel overlayfs does with ``redirect_dir=on``: the
directory itself is copied up (no children), gets ``trusted.overlay.redirect``
= the absolute path, from the mount root, where the layers below keep its
content (its path in the layer under the upper: its old path, unless it was
moved before), and is renamed inside the upper; the old name becomes a
whiteout when something below still shows there. Lookups below the upper
then use the redirect instead of the new name, so nothing at the new name
below shows through (it need not be opaque). Live inodes keep everything:
their layer paths are computed through the redirect (``view.layer_path``).
This module decides the redirect (``redirect_for``) and keeps the view's
record of it (``set_redirect``); ``rename`` makes the move itself, the same
one as for any other copied-up entry.

The copy is kept where a redirect cannot be used, so that kernel overlayfs
still reads the upper: when the upper is written without root
(``user.overlay.*`` xattrs: kernel overlayfs refuses redirect_dir with
userxattr), and when the redirect would be longer than the kernel's
``redirect_max`` (256 by default; the kernel itself answers EXDEV then and
``mv`` copies). The copy is what ``mv`` does after EXDEV: the new name holds a
full copy of the merged subtree (built in the work dir, published by one
rename; opaque when something is below the new name), hardlinks inside the
subtree stay linked, times are set after children (A2); O(subtree).
"""
from __future__ import annotations

import os
import stat

from .. import syscalls
from ..layer import DIR
from ..resolver import Node, join
from .inodes import Inode


def redirect_max() -> int:
    """The longest redirect kernel overlayfs writes (its module parameter)."""
    try:
        with open("/sys/module/overlay/parameters/redirect_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 256


def redirect_for(view, inode) -> bytes | None:
    """The redirect that keeps a merged dir's lower content when it moves, or None
    where one cannot be used (see the module docstring)."""
    value = b"/" + view.layer_path(inode, view.up - 1)
    if view.upper.opaque_xattr.startswith("user.") or len(value) > redirect_max():
        return None
    return value


def set_redirect(view, inode, value: bytes) -> None:
    """The view's side of a redirect written on ``inode``'s upper dir."""
    inode.redirects = ((view.up, value),) + tuple(r for r in inode.redirects if r[0] < view.up)
    view.redirected = True


def copy_merged_dir(view, inode, p_old, old: bytes, p_new, new: bytes, dst: Node | None) -> None:
    upper = view.upper
    old_path, new_path = join(p_old.path, old), join(p_new.path, new)
    view.ensure_upper(p_old)
    view.ensure_upper(p_new)
    tmp = _stage_tree(view, inode)
    try:
        if view.lower_has(p_new, new):
            syscalls.setxattr(upper.work_fd, tmp, upper.opaque_xattr, b"y")
        existing = upper.lstat(new_path)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            upper.remove(new_path)       # the replaced dir is empty in the view
    except BaseException:
        upper.discard_tree(tmp)
        raise
    st = upper.publish(tmp, new_path)
    view.inodes.fresh(view.up, st.st_ino)
    upper.whiteout(old_path, tree=True)  # the dir exists below, so the old name needs one
    if dst is not None:
        gone = view._live(dst)
        if gone is not None:
            view.inodes.drop_name(gone, p_new, new)
            gone.children = None
    new_node = Node(DIR, (view.up,), (st.st_ino,))
    view._set_child(p_old, old, None)
    view._set_child(p_new, new, new_node)
    view.inodes.move_name(inode, p_old, old, p_new, new)
    view.inodes.alias(inode, new_node)
    inode.attr, inode.children = st, None
    inode.redirects, inode.sources = (), None
    _rebind_descendants(view, inode)


def _stage_tree(view, inode) -> bytes:
    """Copy the merged subtree of ``inode`` into the work dir; return its tmp name.

    Entries are read through inodes of no table (``Inode(0, ...)``), so their
    paths in their layers follow redirects like every other read."""
    upper = view.upper
    links: dict[tuple[int, int], tuple[int, bytes]] = {}   # first copy of a hardlinked file
    top = inode.node.top
    st = view.resolver.lstat_in(top, view.layer_path(inode, top))
    tmp = upper.copy_of(view.layers[top].fd, view.layer_path(inode, top), st)
    try:
        fd = syscalls.open_dir(tmp, upper.work_fd)
        try:
            _fill(view, inode, fd, links)
        finally:
            os.close(fd)
        syscalls.utime_ns(tmp, st.st_atime_ns, st.st_mtime_ns, upper.work_fd)
    except BaseException:
        upper.discard_tree(tmp)
        raise
    finally:
        for fd, _ in links.values():
            os.close(fd)
    return tmp


def _fill(view, parent, dir_fd: int, links: dict) -> None:
    """Copy the merged children of the dir ``parent`` into the staged dir ``dir_fd``."""
    upper = view.upper
    path = parent.path
    for name, child in sorted(view.listing(parent).items()):
        if child.kind != DIR and child.top == view.up:
            # already in the upper: link the same inode in (as mv renames each file),
            # so hardlinks to names outside the moved tree survive
            pfd = upper.dir_fd(path)
            try:
                syscalls.link(name, name, pfd, dir_fd)
            finally:
                os.close(pfd)
            continue
        entry = Inode(0, parent, name, child)
        where = view.layer_path(entry, child.top)
        st = view.resolver.lstat_in(child.top, where)
        key = (child.top, child.inos[0])
        if child.kind != DIR and st.st_nlink > 1 and key in links:
            first_fd, first_name = links[key]
            syscalls.link(first_name, name, first_fd, dir_fd)
            continue
        tmp = upper.copy_of(view.layers[child.top].fd, where, st)
        os.rename(tmp, name, src_dir_fd=upper.work_fd, dst_dir_fd=dir_fd)
        view.inodes.fresh(view.up, syscalls.lstat(name, dir_fd).st_ino)
        if child.kind == DIR:
            cfd = syscalls.open_dir(name, dir_fd)
            try:
                _fill(view, entry, cfd, links)
            finally:
                os.close(cfd)
            syscalls.utime_ns(name, st.st_atime_ns, st.st_mtime_ns, dir_fd)
        elif st.st_nlink > 1:
            links[key] = (os.dup(dir_fd), name)


def _rebind_descendants(view, moved) -> None:
    """Live inodes below the moved dir now live in the copy: new nodes, same numbers."""
    below = []
    for inode in list(view.inodes):
        depth, cur = 0, inode.parent
        while cur is not None and cur is not moved:
            depth, cur = depth + 1, cur.parent
        if cur is moved:
            below.append((depth, inode))
    for _, inode in sorted(below, key=lambda x: x[0]):
        inode.children, inode.attr = None, None
        node = view.listing(inode.parent).get(inode.name)
        if node is None:
            inode.unlinked = True
            continue
        if inode.node.kind != DIR:
            view.inodes.unmap(inode.node)
        view.inodes.alias(inode, node)
