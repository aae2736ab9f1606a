"""rename(2) on the writable union, with RENAME_NOREPLACE and RENAME_EXCHANGE (U5).

Files move across layers: the source is copied up, renamed inside the upper,
and a whiteout is left at the old name when something below still shows
there. A directory that lower layers serve (by name or through a redirect)
is moved in O(1) as kernel overlayfs with ``redirect_dir=on`` moves it: the
directory itself is copied up, marked with ``trusted.overlay.redirect``
(where the layers below keep its content) and renamed (``dirmove``);
``WritableView(dir_rename=False)`` gives EXDEV instead, as kernel overlayfs
without redirect_dir. A directory that lives only in the upper moves freely;
it is made opaque when its new name has something below, so nothing of the
lower tree shows through it. RENAME_EXCHANGE gives merged directories
redirects the same way (EXDEV where a redirect cannot be used).
"""
from __future__ import annotations

import errno
import os
import stat

from .. import syscalls
from ..errors import AlreadyExists
from ..layer import DIR
from ..resolver import Node, join
from .dirmove import copy_merged_dir, redirect_for, set_redirect

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def rename(view, p_old, old: bytes, p_new, new: bytes, flags: int) -> None:
    src = view._child(p_old, old)
    dst = view.child(p_new, new)
    if flags & RENAME_EXCHANGE:
        if dst is None:
            raise _err(errno.ENOENT)
        return _exchange(view, p_old, old, src, p_new, new, dst)
    if dst is not None:
        if flags & RENAME_NOREPLACE:
            raise AlreadyExists(new)
        if view.inodes.number_for(src) == view.inodes.number_for(dst):
            return                      # two names of one file: rename(2) does nothing
        if (dst.kind == DIR) != (src.kind == DIR):     # the VFS checks types first
            raise _err(errno.EISDIR if dst.kind == DIR else errno.ENOTDIR)
    if dst is not None:
        _check_replace(view, p_new, new, src, dst)
    up = view.up
    if src.kind != DIR and src.layers[0] == up and p_new.node.layers[0] == up:
        # an upper file (dpkg's NAME.dpkg-new): nothing to copy up, no subtree to
        # move; its inode is the live one the name names, else one made for the move
        inode = view.inodes.named(p_old, old, src)
        if inode is not None:
            _move(view, inode, p_old, old, p_new, new, dst)
            return
    with _held(view, p_old, old, src) as inode:
        if src.kind == DIR and view.has_lower(inode):
            if not view.dir_rename:
                raise _err(errno.EXDEV)     # as kernel overlayfs without redirect_dir
            redirect = redirect_for(view, inode)
            if redirect is None:
                copy_merged_dir(view, inode, p_old, old, p_new, new, dst)
                return
        else:
            redirect = None
        view.ensure_upper(inode)
        view.ensure_upper(p_new)
        _move(view, inode, p_old, old, p_new, new, dst, redirect)


def _check_replace(view, p_new, new, src: Node, dst: Node) -> None:
    if dst.kind == DIR:
        if src.kind != DIR:
            raise _err(errno.EISDIR)
        target = view._live(dst)
        listing = view.listing(target) if target is not None else view.listing_of(p_new, new, dst)
        if listing:
            raise _err(errno.ENOTEMPTY)
    elif src.kind == DIR:
        raise _err(errno.ENOTDIR)


class _held:
    """The inode of parent/name (the view's ``node`` there), held (lookup count +1)
    for the length of a block; its attributes are not read (a rename drops them)."""

    def __init__(self, view, parent, name, node: Node):
        self.view, self.parent, self.name, self.node = view, parent, name, node

    def __enter__(self):
        self.inode = self.view.inodes.entry(self.parent, self.name, self.node)
        return self.inode

    def __exit__(self, *exc):
        self.view.inodes.forget(self.inode.number, 1)


def _move(view, inode, p_old, old: bytes, p_new, new: bytes, dst: Node | None,
          redirect: bytes | None = None) -> None:
    """Rename ``inode`` (copied up, as ``p_new``) inside the upper and the view.
    A directory with ``redirect`` is a merged one (``dirmove``): the redirect,
    not opacity, decides what lies below its new name."""
    upper = view.upper
    below_old = view.lower_has(p_old, old)
    is_dir = inode.node.kind == DIR
    if is_dir or redirect is not None:
        old_path, new_path = join(p_old.path, old), join(p_new.path, new)
        if redirect is not None:
            upper.set_redirect(old_path, redirect)
        elif view.lower_has(p_new, new):
            upper.set_opaque(old_path)
        # A file renames over whatever the upper has at the new name (a whiteout, or the
        # file the view shows: a directory there would be in the view, EISDIR above),
        # so only a directory's rename looks first (one lstat less per dpkg -i file).
        existing = upper.lstat(new_path)
        if existing is not None and (syscalls.is_whiteout_stat(existing)
                                     or stat.S_ISDIR(existing.st_mode)):
            upper.remove(new_path)      # a whiteout a dir cannot replace, or an emptied dir
        upper.forget_dirs(old_path)     # (a file's name has no cached dir fds)
        upper.forget_dirs(new_path)
    ofd = upper.borrow_dir(p_old.path)
    nfd = ofd if p_new is p_old else upper.borrow_dir(p_new.path)
    os.rename(old, new, src_dir_fd=ofd, dst_dir_fd=nfd)
    if below_old:
        upper.whiteout(join(p_old.path, old))
    follow_move(view, inode, p_old, old, p_new, new, dst)
    if redirect is not None:
        set_redirect(view, inode, redirect)


def follow_move(view, inode, p_old, old: bytes, p_new, new: bytes, dst: Node | None) -> None:
    """The view after the upper's entry of ``inode`` moved from ``p_old/old`` to
    ``p_new/new`` (over ``dst``, the node the view showed there, or None); also
    after the C fast path renamed an upper file (``WritableView.renamed``)."""
    if dst is not None:
        gone = view._live(dst)
        if gone is not None:
            view.inodes.drop_name(gone, p_new, new)
            gone.children = None
    view._set_child(p_old, old, None)
    view._set_child(p_new, new, inode.node)
    view.inodes.move_name(inode, p_old, old, p_new, new)
    inode.attr = None


def _exchange(view, p_old, old, src: Node, p_new, new, dst: Node) -> None:
    with _held(view, p_old, old, src) as a, _held(view, p_new, new, dst) as b:
        moved = {}                      # merged dirs: their redirects (R1)
        for x in (a, b):
            if x.is_dir and view.has_lower(x):
                value = redirect_for(view, x)
                if value is None or not view.dir_rename:
                    raise _err(errno.EXDEV)
                moved[x.number] = value
        if p_old is p_new and old == new:
            return
        view.ensure_upper(a)
        view.ensure_upper(b)
        upper = view.upper
        for inode, parent, name in ((a, p_new, new), (b, p_old, old)):
            if inode.number in moved:
                upper.set_redirect(inode.path, moved[inode.number])
                set_redirect(view, inode, moved[inode.number])
            elif inode.is_dir and view.lower_has(parent, name):
                upper.set_opaque(inode.path)
        upper.forget_dirs(join(p_old.path, old))
        upper.forget_dirs(join(p_new.path, new))
        ofd, nfd = upper.borrow_dir(p_old.path), upper.borrow_dir(p_new.path)
        syscalls.renameat2(ofd, old, nfd, new, syscalls.RENAME_EXCHANGE)
        view._set_child(p_old, old, b.node)
        view._set_child(p_new, new, a.node)
        if a is not b:
            view.inodes.move_name(a, p_old, old, p_new, new)
            view.inodes.move_name(b, p_new, new, p_old, old)
        a.attr = b.attr = None
