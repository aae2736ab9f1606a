"""The writable union: lowers plus an overlay-format upper (U4, U5).

The upper is the top layer of the view (index ``self.up``); after a change,
the affected inodes' nodes and the cached listings of their parents are
updated in place, so the view always equals a fresh merge of the disk.

Rules, as kernel overlayfs (index=off, redirect_dir=off) applies them:
- modifying a lower entry copies it up first (data, owner, mode, xattrs,
  times), parents first; a directory copied up stays merged (not opaque);
- unlink/rmdir/rename-away of a name that exists below leaves a whiteout; a
  name with nothing below is just removed (D6: no whiteout where nothing is
  below, so never one inside an opaque directory);
- mkdir over a whiteout makes an opaque directory; a directory renamed into a
  place where something exists below becomes opaque;
- renaming a directory that has lower layers copies its merged subtree to
  the new name and whites out the old one (``dirmove``; what ``mv`` does
  after kernel overlayfs's EXDEV), U5. Files rename across layers (copy-up,
  then whiteout).

Hardlinks: copying up a lower file copies it once and links every name the
merged view shows for that inode to the copy, also names the kernel never
looked up (``linknames``; also below directories renamed with a redirect),
so they stay one file with one number (as kernel overlayfs with index=on
shows them; with index=off it breaks them).
"""
from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict

from sortedcontainers import SortedDict

from .. import syscalls
from ..errors import AlreadyExists, NotFound
from ..layer import DIR, LNK, REG, Layer, is_overlay_private
from ..resolver import Node, join, merge_listing
from .inodes import Inode
from .linknames import LinkNames, moved_path
from .upper import Upper
from .view import UnionView


LOWER_DIR_FDS = 32      # lower directories kept open (``lower_dir``; per view)
_new_node = tuple.__new__   # Node(...) without the namedtuple's Python-level __new__


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class WritableView(UnionView):
    writable = True

    def __init__(self, lowers: list[Layer], upper: str, work: str, dir_rename: bool = True):
        self.upper = Upper(upper, work)
        super().__init__(list(lowers) + [self.upper.layer])
        self.up = len(lowers)
        self.dir_rename = dir_rename     # False: EXDEV for merged dirs, as overlayfs
        self.links = LinkNames()         # the names of lower hardlinks, for copy-up
        # Told the numbers of inodes whose attributes a copy-up changed behind the
        # kernel's back (the ops set it once the kernel connection is up).
        self.attrs_changed = lambda number: None
        # Told (parent inode, name) of a name a copy-up linked to the copy that this
        # view's table never handed out (the views mount may show it as shared).
        self.name_linked = lambda parent, name: None
        # Told each non-directory inode a copy-up moved to the upper (real opens:
        # the ops move the fds their handles opened on the lower file to the copy).
        self.copied_up = lambda inode: None
        self._lower_dirs: OrderedDict[tuple[int, bytes], int] = OrderedDict()

    def close(self) -> None:
        for fd in self._lower_dirs.values():
            os.close(fd)
        self._lower_dirs.clear()
        super().close()
        self.upper.close()

    def lower_dir(self, layer: int, path: bytes) -> int:
        """A kept fd of directory ``path`` of lower layer ``layer`` (never close it;
        the last LOWER_DIR_FDS are kept): a lower layer never changes, so the fd
        stays right. A copy-up reads its file's entry three times (the lstat of
        its lookup, the xattr names the kernel asks for before the first write,
        then the copy) and its parent's once: one open of the directory for all."""
        key = (layer, path)
        fd = self._lower_dirs.get(key)
        if fd is not None:
            self._lower_dirs.move_to_end(key)
            return fd
        fd = syscalls.open_beneath(self.layers[layer].fd, path)
        self._lower_dirs[key] = fd
        if len(self._lower_dirs) > LOWER_DIR_FDS:
            os.close(self._lower_dirs.popitem(last=False)[1])
        return fd

    def entry_dir(self, parent: Inode, node: Node) -> int:
        """The fd of the directory holding the entry of the non-directory ``node``
        named in ``parent``, in its top layer (the one ``_parent_fd`` gives): kept
        by the fd caches (``Upper.borrow_dir``, ``lower_dir``), never to be
        closed; -1 where it cannot be opened (the caller's handler then meets the
        error itself). The C fast path reads a GETXATTR's value through it
        (``_fastpath.set_xattr_at``) without making the file's Inode; the copy-up
        that follows reads the lower file through the same kept fd."""
        top = node[1][0]
        try:
            if top == self.up:
                return self.upper.borrow_dir(parent.path)
            return self.lower_dir(top, self.layer_path(parent, top))
        except OSError:
            return -1

    def _open_layer_dir(self, layer: int, path: bytes) -> tuple[int, bool]:
        """``read_name``'s directories from the fd caches, left open: the upper's
        (``Upper.borrow_dir``) and the lowers' (``lower_dir``)."""
        if layer == self.up:
            return self.upper.borrow_dir(path), False
        return self.lower_dir(layer, path), False

    def attr(self, inode: Inode) -> os.stat_result:
        """As the view's, with the parent dir's fd kept (upper: ``Upper.borrow_dir``,
        lower: ``lower_dir``)."""
        st = inode._attr
        if st is None and inode._parent is not None:
            fd, name = self._entry_fd(inode)
            inode.attr = st = syscalls.lstat(name, fd)
            return st
        return super().attr(inode)

    def merged(self, parent: Inode | None, name: bytes, node: Node,
               inode: Inode | None = None) -> bool:
        """As the view's, but an inode's serving layers are read once and kept on
        it (``dir_sources``): its next attributes need no markers read again, and
        the C fast path answers its GETATTRs from then on (``FdCache.serve_dir``
        wants them known)."""
        if inode is not None and inode.sources is None and parent is not None and \
                not inode.unlinked:
            self.dir_sources(inode)
        return super().merged(parent, name, node, inode)

    def _upper_entry(self, inode: Inode) -> tuple[int, bytes]:
        """(the cached fd of the upper dir holding ``inode``'s entry, its name), or
        (the upper's root fd, b"") for the root: never close the fd; valid until
        the upper's directories change (``Upper.borrow_dir``)."""
        path = inode.path
        if not path:
            return self.upper.layer.fd, b""
        parent, _, name = path.rpartition(b"/")
        return self.upper.borrow_dir(parent), name

    def _parent_fd(self, inode: Inode, layer: int | None = None):
        """Directories come from the fd caches (not closed after use): the upper's
        (``Upper.borrow_dir``) and the lowers' (``lower_dir``)."""
        if inode._parent is None and (layer if layer is not None else inode.node[1][0]) != self.up:
            return super()._parent_fd(inode, layer)
        return _Borrowed(*self._entry_fd(inode, layer))

    def _entry_fd(self, inode: Inode, layer: int | None = None) -> tuple[int, bytes]:
        """``_parent_fd``'s (kept dir fd, name) of an inode other than a lower root."""
        layer = inode.node[1][0] if layer is None else layer
        if layer == self.up:
            return self._upper_entry(inode)
        parent, _, name = self.layer_path(inode, layer).rpartition(b"/")
        return self.lower_dir(layer, parent), name

    # -- helpers ----------------------------------------------------------
    def _child(self, parent: Inode, name: bytes) -> Node:
        node = self.child(parent, name)
        if node is None:
            raise NotFound(name)
        return node

    def _set_child(self, parent: Inode, name: bytes, node: Node | None) -> None:
        children = parent.children
        if node is None:
            if children is not None:
                children.pop(name, None)
        else:
            if node.layers[0] == self.up and self.inodes.recorded(node):
                self.upper.mark_numbered(parent.path)     # U8: look for recorded numbers here
            if children is not None:
                children[name] = node
        parent.attr = None

    def _live(self, node: Node) -> Inode | None:
        return self.inodes.live(self.inodes.number_for(node))

    def has_lower(self, inode: Inode) -> bool:
        """Does a lower layer serve this directory (by its name or a redirect)?"""
        return any(i != self.up for i in self.dir_sources(inode))

    def lower_has(self, parent: Inode, name: bytes) -> bool:
        """Does anything below the upper show at ``name`` under ``parent``?

        The lower layers' merged names are kept on the parent (``Inode.below``):
        lowers never change, so they stay right as long as the same layers are
        read at the same paths, which is the key they are kept under (a rename or
        a redirect changes the paths, an opaque mark the layers)."""
        layers, up = parent.sources or parent.node.layers, self.up
        if len(layers) == 1 and layers[0] == up:    # an upper-only directory (mostly)
            return False
        lowers = tuple(i for i in layers if i != up)
        if not lowers:
            return False
        if self.redirected:
            key = (lowers, tuple(self.layer_path(parent, i) for i in lowers))
        else:
            key = (lowers, (parent.path,) * len(lowers))
        if parent.below is None or parent.below[0] != key:
            parent.below = (key, merge_listing(
                (i, self.resolver.layer_dir(i, path)) for i, path in zip(*key)))
        return name in parent.below[1]

    def ensure_upper(self, inode: Inode, with_data: bool = True) -> None:
        """Copy ``inode`` (and its parents) up unless the upper already supplies it."""
        fd = self._copy_up(inode, with_data)
        if fd >= 0:
            os.close(fd)

    def _copy_up(self, inode: Inode, with_data: bool = True, for_write: bool = False) -> int:
        """``ensure_upper``; returns an O_RDWR fd on the copy of a regular file made
        now (the caller closes it), else -1. ``for_write``: see ``_copied_up``."""
        node, up = inode.node, self.up
        top = node.layers[0]
        if top == up:
            return -1
        parent = inode.parent
        parent_copied = parent.node.layers[0] != up
        if parent_copied:           # (an upper parent: nothing to copy, no call)
            self.ensure_upper(parent)
        path = inode.path
        src = self.layer_path(inode, top) if self.redirected else path
        upper = self.upper
        if node.kind == REG:        # through fds; an unnamed file linked in when complete
            src_dir, _, name = src.rpartition(b"/")
            fd, ino, nlink, new = upper.copy_up_file(
                self.lower_dir(top, src_dir), name, path, inode.number, with_data,
                self._content_xattrs(inode, node))
            try:
                self._copied_up(inode, node, ino, nlink, new, parent_copied, for_write)
            except BaseException:
                os.close(fd)
                raise
            return fd
        root_fd = self.layers[top].fd
        if node.kind == DIR:
            ino, new = upper.copy_up_dir(root_fd, src, path, inode.number,
                                         self._content_xattrs(inode, node))
            self._copied_up(inode, node, ino, 1, new, parent_copied, for_write)
            return -1
        st = self.resolver.lstat_in(top, src)
        tmp = upper.copy_of(root_fd, src, st, with_data, inode.number)   # U8
        new = upper.publish(tmp, path, keep_parent_times=True)
        self._copied_up(inode, node, new.st_ino, st.st_nlink, new, parent_copied, for_write)
        return -1

    @staticmethod
    def _content_xattrs(inode: Inode, node: Node) -> bool:
        """May the lower file of ``node`` have content xattrs? Not if the names read
        for it (``view.getxattr``: the kernel asks for security.capability before
        the first write) were all the overlay format's own, or none."""
        known = inode.xattrs
        return known is None or known[0] is not node or \
            any(not is_overlay_private(os.fsdecode(a)) for a in known[1])

    def _copied_up(self, inode: Inode, node: Node, new_ino: int, nlink: int,
                   new: os.stat_result | None, parent_copied: bool = False,
                   for_write: bool = False) -> None:
        """The view after ``inode``'s lower entry ``node`` (``nlink`` names) was copied
        to the upper (inode ``new_ino``, lstat ``new`` if read): the inode keeps its
        number, its other names become links to the copy. ``parent_copied``: the parent was copied up in
        this same request, its cached attributes already dropped (the kernel
        cannot have asked for them since: one handler at a time). ``for_write``:
        the copy-up serves a WRITE request that will succeed or tell the caller
        (ops.write): the kernel drops the file's cached times and size after
        the write itself (what the copy changed: its ctime), so its attributes
        are not dropped here (one notification less per appended lower file)."""
        inodes, up, kind = self.inodes, self.up, node.kind
        inodes.fresh(up, new_ino)
        if kind == DIR:           # stays merged with its lower layers
            new_node = Node(DIR, (up,) + node.layers, (new_ino,) + node.inos)
        else:
            new_node = Node(kind, (up,), (new_ino,))
            inodes.unmap(node)
        inodes.alias(inode, new_node)
        if kind == DIR and inode.sources is not None:
            inode.sources = (up,) + inode.sources
        inode.attr = new
        parent = inode.parent
        self._set_child(parent, inode.name, new_node)
        if not parent_copied:
            self.attrs_changed(parent.number)           # its ctime: the copy was linked into it
        if not for_write:
            self.attrs_changed(inode.number)            # now the copy's ctime
        if kind == DIR:
            return
        self.copied_up(inode)
        known = 1                   # names of the lower file now linked to the copy
        for parent, name in inode.others or ():
            if self.child(parent, name) == node:      # (not one removed meanwhile)
                self._link_known_name(inode, parent, name)
                known += 1
        if nlink > known:           # names the kernel never looked up
            self._link_unseen_names(inode, node)

    def _link_known_name(self, inode: Inode, parent: Inode, name: bytes) -> None:
        """Copy-up of a hardlinked lower file: every name the kernel knows for this
        inode becomes a link to the one upper copy, so they stay one file."""
        self.ensure_upper(parent)
        tmp = self._stage_link(inode)
        inode.attr = self.upper.publish(tmp, join(parent.path, name), keep_parent_times=True)
        self._set_child(parent, name, inode.node)
        self.attrs_changed(parent.number)

    def _link_unseen_names(self, inode: Inode, lower: Node) -> None:
        """Copy-up of a hardlinked lower file: its names the kernel never looked up
        become links to the copy too, wherever the merged view still shows that
        lower file (not where a later layer replaced or deleted the name: H2, H3).
        Only called while the lower file has more names (st_nlink) than the kernel
        knows: after a ``find`` of the tree every name is known, and the layer is
        never read for its names (``linknames``: a read of the whole layer)."""
        layer, ino = lower.top, lower.inos[0]

        def shows_it(found) -> bool:
            return found is not None and found[2].top == layer and found[2].inos[0] == ino

        for path in self.links.names(layer, self.layers[layer].fd, ino):
            found = self._find(path)
            if not shows_it(found):             # below a renamed directory (R1)?
                moved = moved_path(path, self.upper.moved_dirs())
                found = moved and self._find(moved)
            if shows_it(found):
                self._link_known_name(inode, found[0], found[1])
                self.name_linked(found[0], found[1])

    def _find(self, path: bytes) -> tuple[Inode, bytes, Node] | None:
        """(parent inode, name, node) of ``path`` in the merged view, or None. The
        directories on the way are the table's inodes where they exist, else
        inodes of no table (with the numbers the table gives them)."""
        cur = self.inodes.root
        *dirs, name = path.split(b"/")
        for d in dirs:
            node = self.listing(cur).get(d)
            if node is None or node.kind != DIR:
                return None
            number = self.inodes.number_for(node)
            cur = self.inodes.known(number) or Inode(number, cur, d, node)
        node = self.listing(cur).get(name)
        return None if node is None else (cur, name, node)

    def _stage_link(self, inode: Inode) -> bytes:
        """A new name for ``inode``'s upper file in the work dir, ready to publish."""
        src_parent, _, src_name = inode.path.rpartition(b"/")
        tmp = self.upper.tmp_name()
        syscalls.link(src_name, tmp, self.upper.borrow_dir(src_parent), self.upper.work_fd)
        return tmp

    def _placed(self, parent: Inode, name: bytes, tmp: bytes) -> Inode:
        """Publish a staged new entry at parent/name and hand out its inode."""
        return self._new_inode(parent, name, self.upper.publish(tmp, join(parent.path, name)))

    def _new_inode(self, parent: Inode, name: bytes, st: os.stat_result) -> Inode:
        """The inode of a new upper entry now at parent/name (lstat ``st``)."""
        inode = self.made(parent, name, stat.S_IFMT(st.st_mode), st.st_ino)
        inode.attr = st
        return inode

    def made(self, parent: Inode, name: bytes, kind: int, ino: int) -> Inode:
        """The inode of a new upper entry of type ``kind`` now at parent/name (upper
        inode ``ino``; its attributes not read): the listing and the inode table
        take it, counted once (also for the C fast path's MKNOD, _fastns.h)."""
        up = self.up
        self.inodes.fresh(up, ino)
        node = _new_node(Node, (kind, (up,), (ino,)))
        self._set_child(parent, name, node)
        inode = self.inodes.entry(parent, name, node)
        if kind == DIR:           # served by the upper alone: no markers to read (U1 nlink)
            inode.redirects, inode.sources = (), (self.up,)
            # and empty (made in place, or opaque over a whiteout): its listing is at
            # hand, the lookups of the names made in it next need no layer read
            inode.children = SortedDict()
        return inode

    def _prepare_new(self, parent: Inode, name: bytes, ctx) -> tuple[os.stat_result, int]:
        """Checks for a new name and copies its parent up; returns the parent's lstat
        and its upper directory's kept fd (``Upper.borrow_dir``)."""
        if self.child(parent, name) is not None:
            raise AlreadyExists(name)
        if parent.node[1][0] != self.up:
            self.ensure_upper(parent)
        pfd = self.upper.borrow_dir(parent.path) if parent._parent is not None \
            else self.upper.layer.fd
        pst = parent._attr
        if pst is None:             # (dropped by every entry made in it) through its kept fd
            parent.attr = pst = os.fstat(pfd)
        return pst, pfd

    def _make(self, parent: Inode, name: bytes, kind: int, mode: int, ctx, rdev: int = 0,
              target: bytes = b"") -> tuple[Inode, int]:
        """A new entry at parent/name: made in place where it hides nothing (a name
        the view does not show and the upper holds no whiteout for), else staged in
        the work dir and renamed over the whiteout (a directory then opaque).
        The upper is not asked first: making the entry in place fails with EEXIST
        where a whiteout is (one lstat less for every new name)."""
        pst, pfd = self._prepare_new(parent, name, ctx)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
        if kind == DIR:
            mode |= pst.st_mode & stat.S_ISGID
        try:
            st, fd = self.upper.make_in_place(pfd, name, kind, mode, ctx.uid, gid, rdev, target)
        except FileExistsError:
            if not self.upper.is_whiteout(join(parent.path, name)):
                raise
        else:
            try:
                return self._new_inode(parent, name, st), fd
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
        tmp, fd = self.upper.new_entry(kind, mode, ctx.uid, gid, rdev, target,
                                       opaque=kind == DIR)
        try:
            return self._placed(parent, name, tmp), fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    # -- creating ---------------------------------------------------------
    def create(self, parent: Inode, name: bytes, mode: int, flags: int, ctx,
               list_xattrs: bool = True):
        """A new regular file and an fd on it; ``list_xattrs``: note its xattr names
        now (a default ACL, a security label), cheaply through the fd (not needed
        while the C fast path answers GETXATTR through that fd)."""
        inode, fd = self._make(parent, name, REG, mode, ctx)
        if list_xattrs:
            inode.xattrs = (inode.node, frozenset(os.fsencode(a) for a in os.listxattr(fd)))
        return inode, fd

    def mkdir(self, parent: Inode, name: bytes, mode: int, ctx) -> Inode:
        return self._make(parent, name, DIR, mode, ctx)[0]

    def mknod(self, parent: Inode, name: bytes, mode: int, rdev: int, ctx) -> Inode:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM)    # a whiteout is format, never content (as overlayfs)
        inode, fd = self._make(parent, name, stat.S_IFMT(mode), mode, ctx, rdev)
        if fd >= 0:
            os.close(fd)
        return inode

    def symlink(self, parent: Inode, name: bytes, target: bytes, ctx) -> Inode:
        return self._make(parent, name, LNK, 0o777, ctx, target=target)[0]

    def link(self, inode: Inode, parent: Inode, name: bytes) -> Inode:
        if inode.is_dir:
            raise _err(errno.EPERM)
        if self.child(parent, name) is not None:
            raise AlreadyExists(name)
        self.ensure_upper(inode)
        self.ensure_upper(parent)
        st = self._link_to(inode, parent, name)
        self._set_child(parent, name, inode.node)
        inode.attr = st
        return self.inodes.entry(parent, name, inode.node)

    def _link_to(self, inode: Inode, parent: Inode, name: bytes) -> os.stat_result:
        """Another name at parent/name for ``inode``'s upper file: linked there at
        once where it hides nothing (as ``_make`` makes new entries in place),
        staged in the work dir and renamed over the whiteout that makes the link
        fail with EEXIST (the upper is not asked first). Returns its lstat."""
        src_parent, _, src_name = inode.path.rpartition(b"/")
        sfd = self.upper.borrow_dir(src_parent)
        dfd = self.upper.borrow_dir(parent.path)
        try:
            syscalls.link(src_name, name, sfd, dfd)
        except FileExistsError:
            path = join(parent.path, name)
            if not self.upper.is_whiteout(path):
                raise
            return self.upper.publish(self._stage_link(inode), path)
        return syscalls.lstat(name, dfd)

    # -- content and attributes --------------------------------------------
    def open_for_write(self, inode: Inode, flags: int, for_write: bool = False) -> int:
        """An fd to write ``inode`` through, copied up first if it is lower
        (``for_write``: by a WRITE request, ``_copied_up``)."""
        if inode.is_dir:
            raise _err(errno.EISDIR)
        fd = self._copy_up(inode, with_data=not flags & os.O_TRUNC, for_write=for_write)
        # never O_APPEND: the kernel sends the offset, pwrite must honour it
        keep = flags & (os.O_ACCMODE | os.O_TRUNC | os.O_SYNC | os.O_DSYNC)
        inode.attr = None
        if fd >= 0:
            if not keep & os.O_DSYNC:    # the copy's own fd (O_RDWR, empty if O_TRUNC)
                return fd
            os.close(fd)                 # O_SYNC/O_DSYNC: only open(2) sets them
        return syscalls.open_beneath(self.upper.layer.fd, inode.path,
                                     keep | os.O_NOFOLLOW | os.O_CLOEXEC)

    def detached_copy(self, inode: Inode) -> int:
        """An O_RDWR fd on a copy of ``inode``'s lower file that no name shows: a
        no-open mount's writes to a lower file unlinked while held open go there
        (a real-open mount copied it up at the open, before the unlink)."""
        top = inode.node.top
        _, tmp, fd = self.upper.stage_file(self.layers[top].fd, self.layer_path(inode, top), None)
        if tmp is not None:
            self.upper.discard(tmp)
        return fd

    # A file unlinked (or renamed over) while held open has no name left: the ops
    # pass ``held``, an fd on it (the upper file it was, or a detached copy of a
    # lower one), and every change goes through that fd, never by path: a copy-up
    # or a change by path would bring the name back or hit what replaced it.
    def setattr(self, inode: Inode, attr, fields, fd: int, held: int = -1) -> None:
        if held >= 0:
            try:
                self._apply_attrs(held, b"", inode, attr, fields, held)
            finally:
                inode.attr = None
            return
        self.ensure_upper(inode, with_data=not (fields.update_size and attr.st_size == 0))
        pfd, name = self._upper_entry(inode)         # the root: its own fd, b""
        try:
            self._apply_attrs(pfd, name, inode, attr, fields, fd)
        finally:
            inode.attr = None
        if not inode.unlinked:      # the new attributes now, through the fd at hand
            inode.attr = syscalls.lstat(name, pfd)

    def _apply_attrs(self, pfd, name, inode, attr, fields, fd) -> None:
        if fields.update_size:
            if fd >= 0:
                os.ftruncate(fd, attr.st_size)
            else:
                tfd = syscalls.open_beneath(self.upper.layer.fd, inode.path,
                                            os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.ftruncate(tfd, attr.st_size)
                finally:
                    os.close(tfd)
        if fields.update_uid or fields.update_gid:
            syscalls.lchown(name, attr.st_uid if fields.update_uid else -1,
                            attr.st_gid if fields.update_gid else -1, pfd)
        if fields.update_mode and inode.kind != LNK:
            syscalls.chmod(name, stat.S_IMODE(attr.st_mode), pfd)
        if fields.update_atime or fields.update_mtime:
            # the time not asked for is kept (an lstat only then: futimens sets both)
            cur = None if fields.update_atime and fields.update_mtime else \
                syscalls.lstat(name, pfd)
            syscalls.utime_ns(name, attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                              attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns, pfd)

    def setxattr(self, inode: Inode, attr: bytes, value: bytes, held: int = -1) -> None:
        if is_overlay_private(os.fsdecode(attr)):
            raise _err(errno.EOPNOTSUPP)      # as kernel overlayfs for its own prefix
        if held >= 0:
            syscalls.setxattr(held, b"", os.fsdecode(attr), value)
            inode.attr = inode.xattrs = None
            return
        self.ensure_upper(inode)
        try:
            syscalls.setxattr(*self._upper_entry(inode), os.fsdecode(attr), value)
        finally:
            inode.attr = inode.xattrs = None

    def removexattr(self, inode: Inode, attr: bytes, held: int = -1) -> None:
        if is_overlay_private(os.fsdecode(attr)):
            raise _err(errno.EOPNOTSUPP)
        if self.getxattr(inode, attr, held) is None:
            raise _err(errno.ENODATA)       # pyfuse3.ENOATTR on Linux
        if held >= 0:
            os.removexattr(held, os.fsdecode(attr))
            inode.attr = inode.xattrs = None
            return
        self.ensure_upper(inode)
        with self._parent_fd(inode, self.up) as (fd, name):
            os.removexattr(syscalls.fd_path(fd, name), os.fsdecode(attr), follow_symlinks=False)
        inode.attr = inode.xattrs = None

    # -- removing -----------------------------------------------------------
    def _remove_name(self, parent: Inode, name: bytes, node: Node) -> None:
        """Take ``name`` out of the merged view: remove from upper, whiteout if below."""
        below = self.lower_has(parent, name)
        path = join(parent.path, name)
        if below:
            self.ensure_upper(parent)
            self.upper.whiteout(path)      # replaces the upper entry, if any, atomically
        elif node.top == self.up:
            self.upper.remove(path, is_dir=node.kind == DIR)
        self._set_child(parent, name, None)
        child = self._live(node)
        if child is not None:
            self.inodes.drop_name(child, parent, name)
            if child.unlinked:
                child.children = None      # keep the last attributes for getattr
            else:
                child.attr = None          # its nlink changed

    def unlink(self, parent: Inode, name: bytes) -> None:
        node = self._child(parent, name)
        if node.kind == DIR:
            raise _err(errno.EISDIR)
        child = self._live(node)
        if child is not None and child.attr is None:
            self.attr(child)           # keep the last attributes for open handles
        self._remove_name(parent, name, node)

    def rmdir(self, parent: Inode, name: bytes) -> None:
        node = self._child(parent, name)
        if node.kind != DIR:
            raise _err(errno.ENOTDIR)
        child = self._live(node)
        listing = self.listing(child) if child is not None else self.listing_of(parent, name, node)
        if listing:
            raise _err(errno.ENOTEMPTY)
        self._remove_name(parent, name, node)

    # -- renaming ------------------------------------------------------------
    def rename(self, p_old: Inode, old: bytes, p_new: Inode, new: bytes, flags: int) -> None:
        _renames().rename(self, p_old, old, p_new, new, flags)

    def renamed(self, p_old: Inode, old: bytes, p_new: Inode, new: bytes, inode: Inode,
                dst: Node | None) -> None:
        """The C fast path renamed the upper entry of ``inode``, live and named
        ``p_old/old``, to ``p_new/new`` where the view showed ``dst`` (or None),
        as ``rename`` would have (_fastns.h, ``rename_made``: nothing below to
        white out, what was at the new name pinned first where ``rename`` pins
        it; a directory the upper alone serves, to a name that hides nothing):
        the view and the inode table follow (``rename.follow_move``)."""
        if inode.node.kind == DIR:      # its path and those below it changed
            self.upper.forget_dirs(join(p_old.path, old))
            self.upper.forget_dirs(join(p_new.path, new))
        _renames().follow_move(self, inode, p_old, old, p_new, new, dst)


_rename_module = None


def _renames():
    """The rename module, imported at the first rename (a mount starts without it;
    an import statement per call costs ~10 us)."""
    global _rename_module
    if _rename_module is None:
        from . import rename
        _rename_module = rename
    return _rename_module


class _Borrowed:
    """``with _Borrowed(fd, name) as (fd, name)``: a cached dir fd, left open."""

    def __init__(self, fd: int, name: bytes):
        self.pair = (fd, name)

    def __enter__(self) -> tuple[int, bytes]:
        return self.pair

    def __exit__(self, *exc) -> None:
        pass
