"""The numbers of a ``ViewFS`` (views.py): gids, shared lower files, file handles.

A *gid* is a FUSE inode number of the views mount; a view's own inode table
keeps *local* numbers. Directories, view roots and what a writable view
changed or made get a private gid per (view, local number), derived from
both (a hash of the view's identity and the local number, which the view's
table keeps across restarts: U8); a non-directory a view shows unchanged
from a lower layer gets a gid derived from the file's ``(st_dev, st_ino)``
like xino, the same in every view. Both are the same after a restart.
``ViewNumbers`` keeps the maps between them and the handle table (handles count
from ``HANDLE_BASE``, never a gid); ``ViewFS`` inherits it and answers the requests.
"""
from __future__ import annotations

import errno
import os

import pyfuse3
from pyfuse3 import FUSEError

from ..resolver import join
from .inodes import MAX_LAYER, ROOT_INODE, XINO_SHIFT, Inode
from .ops import entry_attributes
from .viewstate import Shared, View, copy_entry, detached


# Private gids derived from (view, local number) lie in [PRIVATE_BASE, 2 * PRIVATE_BASE);
# the counter's below; shared lower files' at 1 << XINO_SHIFT and above.
PRIVATE_BASE = 1 << (XINO_SHIFT - 1)
# File handles count from HANDLE_BASE, far above the counter's gids: the C fast path
# keeps the fds of open files under their handles in the table it keeps open
# files under by inode number elsewhere (views.py, ``_serve_handle``).
HANDLE_BASE = 1 << (XINO_SHIFT - 2)


class ViewNumbers:
    """Gid <-> (view, local number) | Shared, and fh <-> (view, local fh)."""

    def _init_numbers(self) -> None:
        self._targets: dict[int, object] = {}     # gid -> (View, local) | Shared
        self._shared: dict[tuple[int, int], int] = {}
        self._private_keys: set[tuple[int, int]] = set()
        self._split_keys: set[tuple[int, int]] = set()     # ViewFS._split: shared no more
        self._handles: dict[int, tuple[View | None, int]] = {}
        self._next_gid = ROOT_INODE + 1                    # counter gids: below PRIVATE_BASE
        self._retired: dict[int, int] = {}          # gid of a removed view -> kernel's lookups
        self._next_fh = HANDLE_BASE
        self._dev_classes: dict[int, int | None] = {}      # st_dev -> high bits of shared gids

    def _new_gid(self) -> int:
        gid = self._next_gid
        self._next_gid += 1
        return gid

    def _lower_gid(self, key: tuple[int, int]) -> int:
        """The gid of a shared lower file, derived from its ``(st_dev, st_ino)`` like
        xino (U8): ``class(st_dev) << 54 | st_ino``, the same after a restart; the
        class is ``st_dev mod 1023 + 1``, the next free one if another device has it.
        Private gids come from the counter, below ``1 << 54``: never one of these."""
        dev, ino = key
        cls = self._dev_classes.get(dev)
        if cls is None:
            taken = set(self._dev_classes.values())
            cls = next((c for i in range(MAX_LAYER + 1)
                        if (c := (dev + i) % (MAX_LAYER + 1) + 1) not in taken), None)
            self._dev_classes[dev] = cls
        if cls is None or ino >> XINO_SHIFT or not ino:
            return self._new_gid()
        return cls << XINO_SHIFT | ino

    def _gid(self, view: View, number: int) -> int:
        """The private gid of a view's local inode (its root, directories, what a
        writable view changed or made), derived from the view's identity and the
        local number (which U8 keeps across restarts), so it is the same after the
        service restarts and adds the view again. One the kernel may still hold
        for another target gets a number from the counter (for this mount only)."""
        gid = view.private.get(number)
        if gid is None:
            h = view.seed.copy()
            h.update(number.to_bytes(8, "little"))
            gid = PRIVATE_BASE | int.from_bytes(h.digest(), "little") & (PRIVATE_BASE - 1)
            if gid in self._targets or gid in self._retired:
                gid = self._new_gid()
            view.private[number] = gid
            self._targets[gid] = (view, number)
        return gid

    def _retire(self, view: View) -> None:
        """A removed view's gids: no longer served, and not given to another target
        while the kernel may still hold them (until it forgets them)."""
        for number, gid in view.private.items():
            self._targets.pop(gid, None)
            inode = view.uv.inodes.live(number)
            if inode is not None:
                self._retired[gid] = inode.lookups

    def _forget_retired(self, gid: int, count: int) -> None:
        left = self._retired.get(gid)
        if left is not None:
            if left <= count:
                del self._retired[gid]
            else:
                self._retired[gid] = left - count

    def _shareable(self, view: View, node, st) -> bool:
        return view.shows_lower(node) and not (
            view.writable and (st.st_dev, st.st_ino) in self._private_keys) and not (
            self._split_keys and (st.st_dev, st.st_ino) in self._split_keys)

    def _lower_stat(self, view: View, parent: Inode, name: bytes, node) -> os.stat_result:
        st = view.cache.stats.get((node.top, node.inos[0]))
        if st is None:
            where = join(view.uv.layer_path(parent, node.top), name)    # R1: maybe redirected
            st = view.cache.stat_for(node, view.uv.resolver.lstat_in(node.top, where))
        return st

    def _share(self, view: View, parent: Inode, name: bytes, node, st, count: int) -> int:
        key = (st.st_dev, st.st_ino)
        gid = self._shared.get(key)
        if gid is None:
            gid = self._shared[key] = self._lower_gid(key)
            where = join(view.uv.layer_path(parent, node.top), name)    # its path in its layer
            self._targets[gid] = Shared(key, view, detached(where, node, st))
        sh = self._targets[gid]
        sh.count += count
        sh.writable = sh.writable or view.writable
        if sh.seen != view.vid:
            sh.seen = view.vid if not sh.seen else -1
        return gid

    def _shared_entry(self, gid: int, sh: Shared) -> pyfuse3.EntryAttributes:
        if sh.entry is None:
            sh.entry = entry_attributes(gid, sh.inode.attr, False, sh.view.ops.timeouts)
            if sh.moved:            # readers split between a copy and the lower file
                sh.entry.attr_timeout = 0
        return sh.entry

    def _source(self, sh: Shared) -> tuple[View, Inode]:
        """The view and inode that serve a shared gid; found again, by its path, in
        another view showing the same lower file once the first view is gone."""
        if sh.view.vid in self.by_vid:
            return sh.view, sh.inode
        path = sh.inode.path
        for view in sorted(self.views.values(), key=lambda v: v.cache is not sh.view.cache):
            found = self._walk(view, path)
            if found is None or not view.shows_lower(found[1]):
                continue
            parent, node = found
            st = self._lower_stat(view, parent, path.rpartition(b"/")[2], node)
            if (st.st_dev, st.st_ino) == sh.key:
                sh.view, sh.inode = view, detached(path, node, st)
                return view, sh.inode
        raise FUSEError(errno.ESTALE)

    @staticmethod
    def _walk(view: View, path: bytes):
        """(parent inode, node) of ``path`` in the view, through inodes of no table."""
        cur, node = view.uv.inodes.root, None
        names = path.split(b"/")
        for i, name in enumerate(names):
            node = view.uv.child(cur, name)
            if node is None:
                return None
            if i < len(names) - 1:
                cur = Inode(0, cur, name, node)
        return cur, node

    def _out(self, view: View, e: pyfuse3.EntryAttributes, count: int) -> pyfuse3.EntryAttributes:
        if e.st_ino == 0:
            return e
        return copy_entry(e, self._gid(view, e.st_ino))

    def _local(self, gid: int) -> tuple[View, int]:
        """The view and local number of a private gid (ESTALE if it is gone)."""
        t = self._targets.get(gid)
        if t is None or isinstance(t, Shared):
            raise FUSEError(errno.ESTALE)
        return t

    def _dir(self, gid: int) -> tuple[View, int]:
        if gid == pyfuse3.ROOT_INODE:
            raise FUSEError(errno.EPERM)
        t = self._targets.get(gid)
        if t is None or isinstance(t, Shared):
            raise FUSEError(errno.ESTALE if t is None else errno.ENOTDIR)
        return t

    def _writable_target(self, gid: int) -> tuple[View, int]:
        """The target of a change; a shared gid is made private first (ESTALE, retried)."""
        t = self._targets.get(gid)
        if isinstance(t, Shared):
            if not t.writable:
                raise FUSEError(errno.EROFS)
            self._private_keys.add(t.key)
            raise FUSEError(errno.ESTALE)
        return self._local(gid)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _add_handle(self, view: View | None, local_fh: int) -> int:
        fh = self._new_fh()
        self._handles[fh] = (view, local_fh)
        if view is not None:
            view.fhs[local_fh] = fh
        return fh

    def _drop_handle(self, fh: int) -> tuple[View | None, int]:
        view, local = self._handles.pop(fh)
        if view is not None:
            del view.fhs[local]
        return view, local

    def _after_release(self, view: View | None) -> None:
        if view is not None and view.removed and view.handles == 0 and view.vid in self.by_vid:
            self._close_view(view)

    # -- the root directory ------------------------------------------------------
