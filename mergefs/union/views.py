"""Many views in one FUSE mount: each top-level directory is a merged view.

One pyfuse3 mount (pyfuse3 serves one per process) whose root lists views by
name; each view is a ``MountSpec`` served by its own ``UnionView`` or
``WritableView`` and ``UnionOperations`` (the resolver, inode table, copy-up
and error translation are reused as they are; views over the same lowers
share merged listings and lstats, ``lowercache``). How numbers map
(``viewgids.ViewNumbers``, which ``ViewFS`` inherits):

- A *gid* is a FUSE inode number of this mount; a view's own inode table
  keeps *local* numbers. Directories, the view roots and everything a
  writable view changed get a private gid per (view, local number), derived
  from the view's identity (``viewstate.view_ident``) and the local number,
  so it is the same after the service restarts and adds the view again.
- A non-directory that a view shows unchanged from a lower layer gets the gid
  of its lower file, keyed by that file's ``(st_dev, st_ino)``: the same gid in
  every view that shows it, so the kernel keeps one inode and one copy of its
  pages (files open with ``keep_cache``) for N containers of one image. No
  view keeps anything for it: the gid is served from one source inode (in
  the first view that showed it, found again by path in another view of the
  same lowers when that view is removed), so N views of an image cost the
  server about what one does.
- A write to a shared gid (open for writing, setattr, setxattr, removexattr,
  link) cannot tell which view it came from. The file's key is then marked
  private for writable views and the request answered ESTALE; the kernel
  retries a path-based call once with a revalidating lookup, which now hands
  the writable view a private gid, and the call proceeds there (copy-up in
  that view only). Known limit: an fd-based change (``fchmod`` on a file open
  read-only) of a shared file gets ESTALE; a write attempted in a read-only
  view that shares the file with a writable one gets ESTALE, not EROFS
  (bind read-only views ``ro`` and the kernel answers EROFS first).
- A file opened read-only under a shared gid is read from the lower file
  (``_direct``). When the view it was opened through copies the file up, the
  handle reads the copy from then on (U4a, ``_move_readers``); the view is
  known when only one view had looked the gid up before the open (``Shared.seen``),
  else the handle keeps reading the lower file (known limit: the kernel tells
  not which view's name an open came through). Other views' handles always
  keep the lower file. The kernel keeps one inode for the gid, so while its
  readers are split, its attributes are not cached: each read asks again with
  its handle (C: fstat of the handle's fd), a new size or mtime drops the pages,
  and a view that looks the file up meanwhile gets a private gid. Without C
  (GETATTR answered without the handle) a reader moves only while no other
  view has looked the gid up; fstat, whose GETATTR never carries the handle,
  shows a moved reader the copy's attributes only then too.
- A copy-up in a writable view drops the attributes the kernel cached for
  what it changed (the parents' times, the copy's ctime) under the private
  gids the kernel knows them by (``_attrs_changed``; the inner operations'
  ``init`` is never called here); a lower file renamed in a view is looked up
  again under its new name, where the kernel's entry still names the shared gid.

Views are added and removed at run time. A removed view's name is never
reused for another view in the life of the mount: the kernel may still hold
a dentry for it. ``remove_view`` refuses while a mount (a container's bind,
or anything mounted below the view) still uses the view, since dropping the
view's dentry detaches every mount below it.

Every method here runs in the mount's trio thread; ``ViewMount`` (mountctl)
runs the mount in a thread and calls them from any other thread.
"""
from __future__ import annotations

import errno
import inspect
import logging
import os
import stat
import time
import types
from collections import OrderedDict

import pyfuse3
from pyfuse3 import FUSEError

from ..errors import AlreadyExists, FailedPrecondition, NotFound
from .. import syscalls
from ..layer import DIR, is_overlay_private
from ..mountspec import MountSpec
from .ctlclient import real_path
from .errors import fuse_errors
from .inodes import ROOT_INODE, Inode
from .lowercache import LowerCache
from .ops import DIRECT as OPS_DIRECT
from .ops import (WRITE_FLAGS, Timeouts, UnionOperations, direct_handler, entry_attributes,
                  statfs_reply)
from .ops import _invalidate_attrs as invalidate_attrs
from .viewgids import ViewNumbers
from .viewstate import Shared, View, copy_entry, mounts_using

log = logging.getLogger("mergefs.union")
RENAME_EXCHANGE = 2


def _plain(name: str):
    """``UnionOperations``' handler ``name`` as the plain function under its
    ``@fuse_errors``: ViewFS's own handler (counted and translated once) calls it
    without a coroutine, so a request ViewFS serves costs none at all when C
    calls ViewFS's handler directly (``ViewFS.init``)."""
    fn = getattr(UnionOperations, name).__wrapped__
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"UnionOperations.{name} must be a plain function under @fuse_errors")
    return fn


# ViewFS's handlers C may call directly (ViewFS.init): those the module's
# ``set_direct`` takes (v7 builds: the first three), but forget and fsync, which
# stay with pyfuse3 here
DIRECT = tuple(n for n in OPS_DIRECT if n not in ("forget", "fsync"))
# the inner operations' handlers: ``OPS.lookup(view.ops, local, name, ctx)``
OPS = types.SimpleNamespace(**{n: _plain(n) for n in (
    "lookup", "getattr", "readlink", "opendir", "releasedir", "open", "read", "write",
    "fsync", "release", "listxattr", "getxattr", "setxattr", "removexattr", "setattr",
    "create", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename")})


# lower stacks whose cache (merged listings, lstats) stays when their last view is
# removed: containers started one after another (podman run --rm, a build's RUN
# steps) each found it gone and listed and stat'ed the image again
IDLE_STACKS = 4


def stack_key(spec: MountSpec, fmt: str) -> tuple:
    """What a ``LowerCache`` is kept by: each lower's real path and its root's
    device, inode number and ctime (a layer removed and made again at the same
    path -- an image pulled again -- is another stack: its inode numbers, which
    the cache is keyed by, may name other files now), and the whiteout format."""
    out = []
    for p in spec.lowers:
        real = real_path(p)
        try:
            st = os.stat(real)
            out.append((real, st.st_dev, st.st_ino, st.st_ctime_ns))
        except OSError:
            out.append((real,))         # (the view then fails to open it, and says so)
    return tuple(out), fmt


class ViewFS(ViewNumbers, pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, mountpoint: str, fmt: str = "auto"):
        super().__init__()
        self.mountpoint = os.path.abspath(mountpoint)
        self.fmt = fmt
        self.views: dict[str, View] = {}          # live, by name
        self.by_vid: dict[int, View] = {}         # live and removed-but-busy
        self.retired: set[str] = set()
        self._init_numbers()
        self._direct: dict[int, tuple[int, int]] = {}  # fh -> (fd, gid): shared files open for reading
        self.fast = None                              # the C fast path (init), or None
        self._next_vid = 1
        self.root_mtime_ns = time.time_ns()
        self._root_listings: dict[int, list[str]] = {}
        self._caches: dict[tuple, LowerCache] = {}         # per lower stack
        self._idle: OrderedDict[tuple, None] = OrderedDict()  # those no view uses, oldest first

    # -- the control API (trio thread) ---------------------------------------
    def add_view(self, name: str, spec: MountSpec, ident: str | None = None) -> str:
        """Serve ``spec`` as the directory ``name``; return its path. ``ident``: what
        its numbers derive from (``viewstate.view_ident``), stable across restarts."""
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise ValueError(f"invalid view name {name!r}")
        if name in self.views or name in self.retired:
            raise AlreadyExists(f"view {name!r} exists or existed in this mount")
        key = stack_key(spec, self.fmt)
        cache = self._caches.setdefault(key, LowerCache())
        self._idle.pop(key, None)
        view = View(self._next_vid, name, spec, self.fmt, cache, ident)
        view.root_gid = self._gid(view, ROOT_INODE)
        if view.writable:
            view.uv.name_linked = lambda parent, child: self._name_linked(view, parent, child)
            view.uv.attrs_changed = lambda number: self._attrs_changed(view, number)
            moved = view.uv.copied_up           # the inner ops' (moves its readers' fds)
            view.uv.copied_up = lambda inode: self._copied_up(view, inode, moved(inode))
        cache.users += 1
        self._next_vid += 1
        self.views[name] = view
        self.by_vid[view.vid] = view
        self.root_mtime_ns = time.time_ns()
        log.info("view %s added (%d lowers, %s)", name, len(spec.lowers),
                 "writable" if view.writable else "read-only")
        return os.path.join(self.mountpoint, name)

    def remove_view(self, name: str, force: bool = False) -> None:
        """Take the view away; refused while a mount uses it (unless ``force``)."""
        view = self.views.get(name)
        if view is None:
            raise NotFound(f"no view {name!r}")
        users = self.view_mounts(name)
        if users and not force:
            raise FailedPrecondition(f"view {name!r} is still mounted at {', '.join(users)}")
        del self.views[name]
        self.retired.add(name)
        view.removed = True
        self.root_mtime_ns = time.time_ns()
        self._retire(view)
        if view.handles == 0:
            self._close_view(view)
        pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, os.fsencode(name), ignore_enoent=True)
        log.info("view %s removed", name)

    def _name_linked(self, view: View, parent: Inode, name: bytes) -> None:
        """A copy-up in ``view`` linked ``parent/name`` to the copy: the kernel may
        still hold that name as the shared lower file; make it look the name up again."""
        gid = view.private.get(parent.number)
        if gid is not None:
            pyfuse3.invalidate_entry_async(gid, name, ignore_enoent=True)

    @staticmethod
    def _attrs_changed(view: View, number: int) -> None:
        """A copy-up in ``view`` changed its local inode ``number`` behind the kernel's
        back (the parent's ctime, the copy's): drop the attributes the kernel keeps
        for the gid it knows it by (none: the kernel holds no private gid for it)."""
        gid = view.private.get(number)
        if gid is not None:
            invalidate_attrs(gid)

    def list_views(self) -> list[dict]:
        return [{"name": v.name, "path": os.path.join(self.mountpoint, v.name),
                 "lowers": list(v.spec.lowers), "upper": v.spec.upper, "work": v.spec.work,
                 "writable": v.writable, "mounts": self.view_mounts(v.name)}
                for v in sorted(self.views.values(), key=lambda v: v.name)]

    def view_mounts(self, name: str) -> list[str]:
        """Mount points that use the view: binds of it or below it, mounts inside it."""
        return mounts_using(self.mountpoint, name)

    def _close_view(self, view: View) -> None:
        self.by_vid.pop(view.vid, None)
        view.close()
        view.cache.users -= 1
        if view.cache.users == 0:           # kept for the stack's next view (IDLE_STACKS)
            for key in [k for k, c in self._caches.items() if c is view.cache]:
                self._idle[key] = None
            while len(self._idle) > IDLE_STACKS:
                self._caches.pop(self._idle.popitem(last=False)[0], None)

    def close(self) -> None:
        if self.fast is not None:
            from . import fastpath
            fastpath.unload()
            self.fast = None
        for view in list(self.by_vid.values()):
            view.close()
        self.by_vid.clear()
        self.views.clear()

    # -- the C fast path ---------------------------------------------------------
    def init(self) -> None:
        """pyfuse3 calls this once the kernel connection is up: serve what C can.

        With the compiled fast path (fastpath.py) C calls this class's plain
        handlers of LOOKUP, GETATTR and MKNOD (v7 builds; the others of ``DIRECT``
        too where the module takes them) and GETXATTR without a coroutine
        (``direct``); READ, GETATTR and FSYNC of an open file are
        served from the fd its open registered under the file handle
        (``_serve_handle``), and the request loop moves to C (``drain``, when
        fuseloop runs the loop). C never writes or sets attributes itself here
        (a handle's entry is not ``WRITE``): those reach the handlers, where a
        change to a shared gid gets its ESTALE (``_writable_target``); a handle
        C reads through belongs to a target its open chose already. Every case
        C cannot answer exactly falls through to the handlers here, which give
        the same answer."""
        from . import fastpath
        fast = fastpath.load(Timeouts().attr, (None, None), False)
        if fast is None:
            return
        fast.set_handles(True)
        self.fast = fast
        if os.environ.get("MERGEFS_FASTPATH_DIRECT") != "0":      # "0": for comparisons
            handlers = {n: direct_handler(self, n) for n in DIRECT}
            # a module that takes them by name (v9: namespace handlers too), else
            # one that takes set_direct(getattr, lookup, mknod); neither: none (the
            # handlers here answer those requests through pyfuse3, as before)
            for args, kwargs in (((), handlers), ([handlers[n] for n in DIRECT[:3]], {})):
                try:
                    fast.set_direct(*args, **kwargs)
                    break
                except TypeError as exc:
                    why = exc
            else:
                log.warning("views: no direct handlers in C (%s)", why)
            fast.set_copyup(direct_handler(self, "getxattr"), None)

    def _serve_handle(self, fh: int, fd: int, inode: Inode, synced: bool) -> None:
        """Let C serve READ, GETATTR (fstat) and FSYNC (``synced``: fsync the fd, as
        the view's ``fsync`` does unless volatile) of handle ``fh`` through ``fd``
        while ``inode.node`` is the node it is now and the inode not unlinked."""
        if self.fast is not None:
            self.fast.set(fh, fd, self.fast.HANDLE | (self.fast.UPPER if synced else 0),
                          inode, inode.node)

    def _serve_moved(self, view: View, local_fhs: list[int]) -> None:
        """A copy-up in ``view`` moved the fds of its open handles ``local_fhs`` to the
        copy (``UnionOperations._reopen_readers``): C serves them again, now for
        the copy's node (their entries still named the lower one: Python served)."""
        if self.fast is None or not local_fhs:
            return
        for local in local_fhs:
            h = view.ops.handles[local]
            self._serve_handle(view.fhs[local], h.fd, h.inode, not view.ops.volatile)

    def _copied_up(self, view: View, inode: Inode, local_fhs: list[int]) -> None:
        """A copy-up in ``view`` of its inode ``inode``: the view's own handles were
        moved to the copy (``local_fhs``), and so are the handles opened through the
        view on the gid it shared the lower file under (``_move_readers``)."""
        self._serve_moved(view, local_fhs)
        key = view.lower_keys.pop(inode.number, None) if view.lower_keys else None
        if key is not None:
            self._move_readers(view, inode, key)

    def _note_lower(self, view: View, number: int, st) -> None:
        """``view``'s local inode ``number`` is a lower file (``st``) the view showed
        under a shared gid that handles opened through the view still hold: their
        fds move to the copy if the view copies it up (``_copied_up``)."""
        gid = self._shared.get((st.st_dev, st.st_ino))
        sh = self._targets.get(gid) if gid is not None else None
        if isinstance(sh, Shared) and sh.readers and view in sh.readers.values():
            view.lower_keys[number] = sh.key

    def _move_readers(self, view: View, inode: Inode, key: tuple[int, int]) -> None:
        """A copy-up in ``view`` of the lower file ``key``: the read-only handles
        opened through ``view`` on its shared gid read the copy from now on (their
        fds ``dup2``'d onto it, as ``UnionOperations._reopen_readers`` does), as
        with kernel overlayfs; other views' handles keep reading the lower file."""
        gid = self._shared.get(key)
        sh = self._targets.get(gid) if gid is not None else None
        if not isinstance(sh, Shared) or not sh.readers:
            return
        if sh.seen != view.vid and not getattr(self.fast, "FRESH", None):
            return      # other views hold the gid too: without C's FRESH, its pages would mix
        mine = [fh for fh, v in sh.readers.items() if v is view and fh not in (sh.moved or ())]
        if mine and self._move(gid, sh, mine, view, inode):
            invalidate_attrs(gid)    # its next read asks with its handle (fstat: the copy)

    def _move(self, gid: int, sh: Shared, fhs: list[int], view: View, inode: Inode) -> bool:
        """The handles ``fhs`` of the shared gid read ``view``'s copy ``inode`` from now
        on: each keeps its fd number (``dup2``: C's entry stays valid)."""
        try:
            fd = view.uv.open_content(inode)
        except OSError as e:                 # the copy-up itself succeeded: never fail it
            log.warning("re-opening the readers of gid %d in view %s: %s", gid, view.name, e)
            return False
        try:
            for fh in fhs:
                os.dup2(fd, self._direct[fh][0], inheritable=False)
        finally:
            os.close(fd)
        if sh.moved is None:
            sh.moved = {}
        sh.moved.update(dict.fromkeys(fhs, (view, inode)))
        self._split(gid, sh)
        return True

    def _split(self, gid: int, sh: Shared) -> None:
        """The shared gid's readers are split between copies and the lower file (or
        no longer): the kernel keeps one inode, one size and one set of pages for
        the gid, so while any reader reads a copy, the gid's attributes are never
        cached (``sh.entry``, and C's GETATTR of each handle, fstat of its own fd):
        every read asks again with its handle, and a size or mtime that changed
        makes the kernel drop the pages the other readers read. No view is given
        the gid meanwhile (``_split_keys``: a lookup gets a private gid): its pages
        are the copy's as often as the lower file's."""
        sh.entry = None
        if sh.moved:
            self._split_keys.add(sh.key)
        else:
            self._split_keys.discard(sh.key)
        if self.fast is None:
            return
        fresh = getattr(self.fast, "FRESH", None)
        try:
            src = self._source(sh)[1]
        except FUSEError:                       # no view shows the lower file any more
            src = None
        for fh in sh.readers:
            inode = sh.moved[fh][1] if sh.moved and fh in sh.moved else src
            if inode is None or sh.moved and fresh is None:  # (a build without it: Python)
                self.fast.drop(fh)
            else:
                self.fast.set(fh, self._direct[fh][0],
                              self.fast.HANDLE | (fresh if sh.moved else 0), inode, inode.node)

    def _moved_entry(self, gid: int, sh: Shared) -> pyfuse3.EntryAttributes:
        """The shared gid's attributes, asked without a handle (fstat, a path's stat):
        the lower file's (``_shared_entry``) but when only one view ever looked it up
        and its readers read that view's copy (every one: moved by the copy-up or at
        their open), which no other view can then ask for: the copy's."""
        if sh.seen <= 0 or not sh.moved:
            return self._shared_entry(gid, sh)
        e = entry_attributes(gid, os.fstat(self._direct[next(iter(sh.moved))][0]), False,
                             sh.view.ops.timeouts)
        e.attr_timeout = 0
        return e

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE
        e.st_mode = stat.S_IFDIR | 0o755
        e.st_nlink = 2
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.root_mtime_ns
        e.attr_timeout = e.entry_timeout = 0
        return e

    def _view_root_entry(self, view: View, ctx) -> pyfuse3.EntryAttributes:
        e = copy_entry(OPS.getattr(view.ops, ROOT_INODE, ctx), view.root_gid)
        e.entry_timeout = 86400.0     # dropped by remove_view (invalidate_entry)
        return e

    # -- names -----------------------------------------------------------------
    @fuse_errors
    def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE:
            view = self.views.get(os.fsdecode(name))
            if view is None:
                e = pyfuse3.EntryAttributes()
                e.st_ino, e.entry_timeout = 0, 0
                return e
            return self._view_root_entry(view, ctx)
        view, local = self._dir(parent_inode)
        parent = view.uv.inodes.get(local)
        node = view.uv.child(parent, name)
        if node is not None and view.shows_lower(node):
            st = self._lower_stat(view, parent, name, node)
            if self._shareable(view, node, st):
                gid = self._share(view, parent, name, node, st, 1)
                return self._shared_entry(gid, self._targets[gid])
            e = OPS.lookup(view.ops, local, name, ctx)
            if view.writable:
                self._note_lower(view, e.st_ino, st)
            return self._out(view, e, 1)
        return self._out(view, OPS.lookup(view.ops, local, name, ctx), 1)

    @fuse_errors
    def forget(self, inode_list):
        for gid, count in inode_list:
            t = self._targets.get(gid)
            if isinstance(t, Shared):
                t.count -= count
                if t.count <= 0:
                    del self._targets[gid]
                    self._shared.pop(t.key, None)
            elif t is not None:
                view, local = t
                view.uv.inodes.forget(local, count)
            else:
                self._forget_retired(gid, count)

    @fuse_errors
    def getattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attr()
        t = self._targets.get(inode)
        if isinstance(t, Shared):
            return self._moved_entry(inode, t) if t.moved else self._shared_entry(inode, t)
        view, local = self._local(inode)
        e = copy_entry(OPS.getattr(view.ops, local, ctx), inode)
        if local == ROOT_INODE:
            e.entry_timeout = 86400.0
        return e

    @fuse_errors
    def readlink(self, inode, ctx=None):
        t = self._targets.get(inode)
        if isinstance(t, Shared):
            view, src = self._source(t)
            return view.uv.readlink(src)
        view, local = self._local(inode)
        return OPS.readlink(view.ops, local, ctx)

    # -- directories -------------------------------------------------------------
    @fuse_errors
    def opendir(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            fh = self._add_handle(None, 0)
            self._root_listings[fh] = sorted(self.views)
            return fh
        view, local = self._dir(inode)
        return self._add_handle(view, OPS.opendir(view.ops, local, ctx))

    @fuse_errors
    def readdir(self, fh, start_id, token):
        view, local_fh = self._handles[fh]
        if view is None:
            self._readdir_root(fh, start_id, token)
            return
        h = view.ops.handles[local_fh]
        parent, current = h.inode, h.inode.children
        inodes, fds = view.uv.inodes, {}
        try:
            for i, (name, node) in enumerate(h.entries[start_id:], start_id + 1):
                if current is not None and current.get(name) != node:
                    node = current.get(name)          # changed since opendir
                    if node is None:
                        continue
                st = self._entry_stat(view, node, name, parent, fds)
                if st is None:
                    continue
                if view.shows_lower(node) and self._shareable(view, node, st):
                    gid = self._share(view, parent, name, node, st, 0)
                    if not pyfuse3.readdir_reply(token, name,
                                                 self._shared_entry(gid, self._targets[gid]), i):
                        break
                    self._targets[gid].count += 1         # readdirplus counts as a lookup
                    continue
                number = inodes.number_for(node)
                if view.writable and view.shows_lower(node):
                    self._note_lower(view, number, st)
                live = inodes.live(number)
                if live is not None and live.attr is not None and not live.unlinked:
                    st = live.attr
                merged = node.kind == DIR and view.uv.merged(parent, name, node)
                attrs = entry_attributes(self._gid(view, number), st, merged,
                                         view.ops.timeouts)
                if not pyfuse3.readdir_reply(token, name, attrs, i):
                    break
                child = inodes.entry_of(parent, name, node, number)
                if child.attr is None:
                    child.attr = st
        finally:
            for fd in fds.values():
                os.close(fd)

    @staticmethod
    def _entry_stat(view: View, node, name: bytes, parent: Inode, fds: dict):
        """The lstat of a listing entry: the stack's shared one for a lower entry."""
        lower = node.top != view.up
        if lower:
            st = view.cache.stats.get((node.top, node.inos[0]))
            if st is not None:
                return st
        fd = fds.get(node.top)
        if fd is None:
            fd = fds[node.top] = syscalls.open_beneath(view.uv.layers[node.top].fd,
                                                       view.uv.layer_path(parent, node.top))
        try:
            st = syscalls.lstat(name, fd)
        except FileNotFoundError:
            return None
        return view.cache.stat_for(node, st) if lower else st

    def _readdir_root(self, fh, start_id, token):
        names = self._root_listings[fh]
        for i, name in enumerate(names[start_id:], start_id + 1):
            view = self.views.get(name)
            if view is None:
                continue
            e = self._view_root_entry(view, None)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), e, i):
                break

    @fuse_errors
    def releasedir(self, fh):
        view, local = self._drop_handle(fh)
        if view is None:
            self._root_listings.pop(fh, None)
        else:
            OPS.releasedir(view.ops, local)
            self._after_release(view)

    @fuse_errors
    def fsyncdir(self, fh, datasync):
        pass

    # -- files -------------------------------------------------------------------
    @fuse_errors
    def open(self, inode, flags, ctx=None):
        if flags & WRITE_FLAGS:
            view, local = self._writable_target(inode)
        else:
            t = self._targets.get(inode)
            if isinstance(t, Shared):       # read straight from the lower file
                view, src = self._source(t)
                fh = self._new_fh()
                fd = view.uv.open_content(src)
                self._direct[fh] = (fd, inode)
                if t.readers is None:
                    t.readers = {}
                # the view it was opened through, if only one can have been
                owner = t.readers[fh] = self.by_vid.get(t.seen) if t.seen > 0 else None
                if t.moved:         # (through /proc/PID/fd of a moved reader: its copy)
                    copy = next((c for v, c in t.moved.values() if v is owner), None)
                    if copy is None or not self._move(inode, t, [fh], owner, copy):
                        self._split(inode, t)
                else:
                    self._serve_handle(fh, fd, src, False)    # a lower file: nothing to sync
                return pyfuse3.FileInfo(fh=fh, keep_cache=True)
            view, local = self._local(inode)
        fi = OPS.open(view.ops, local, flags, ctx)
        return pyfuse3.FileInfo(fh=self._inner_handle(view, fi.fh), keep_cache=fi.keep_cache)

    def _inner_handle(self, view: View, local_fh: int) -> int:
        """A handle of this mount for the view's open file ``local_fh``, served by C."""
        fh = self._add_handle(view, local_fh)
        h = view.ops.handles[local_fh]
        self._serve_handle(fh, h.fd, h.inode, not view.ops.volatile)
        return fh

    @fuse_errors
    def read(self, fh, off, size):
        direct = self._direct.get(fh)
        if direct is not None:
            return os.pread(direct[0], size, off)
        view, local = self._handles[fh]
        return OPS.read(view.ops, local, off, size)

    @fuse_errors
    def write(self, fh, off, buf):
        view, local = self._handles[fh]
        return OPS.write(view.ops, local, off, buf)

    @fuse_errors
    def flush(self, fh):
        raise FUSEError(errno.ENOSYS)    # as UnionOperations: nothing to do on close(2)

    @fuse_errors
    def fsync(self, fh, datasync):
        if fh in self._direct:          # a lower file: nothing to sync (as kernel overlayfs)
            return
        view, local = self._handles[fh]
        OPS.fsync(view.ops, local, datasync)

    @fuse_errors
    def release(self, fh):
        if self.fast is not None:
            self.fast.drop(fh)          # before its fd closes
        direct = self._direct.pop(fh, None)
        if direct is not None:
            os.close(direct[0])
            self._release_reader(fh, direct[1])
            return
        view, local = self._drop_handle(fh)
        OPS.release(view.ops, local)
        self._after_release(view)

    def _release_reader(self, fh: int, gid: int) -> None:
        sh = self._targets.get(gid)
        if not isinstance(sh, Shared):
            return
        del sh.readers[fh]
        if sh.moved and sh.moved.pop(fh, None) is not None and not sh.moved:
            self._split(gid, sh)        # none reads a copy now: cached again

    # -- extended attributes -----------------------------------------------------
    @fuse_errors
    def listxattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return []
        t = self._targets.get(inode)
        if isinstance(t, Shared):
            view, src = self._source(t)
            return view.uv.xattr_names(src)
        view, local = self._local(inode)
        return OPS.listxattr(view.ops, local, ctx)

    @fuse_errors
    def getxattr(self, inode, name, ctx=None):
        if is_overlay_private(os.fsdecode(name)):
            raise FUSEError(errno.EOPNOTSUPP)         # as UnionOperations (and C) answer
        if inode == pyfuse3.ROOT_INODE:
            raise FUSEError(pyfuse3.ENOATTR)
        t = self._targets.get(inode)
        if isinstance(t, Shared):
            view, src = self._source(t)
            value = view.uv.getxattr(src, name)
            if value is None:
                raise FUSEError(pyfuse3.ENOATTR)
            return value
        view, local = self._local(inode)
        return OPS.getxattr(view.ops, local, name, ctx)

    @fuse_errors
    def setxattr(self, inode, name, value, ctx=None):
        view, local = self._change_target(inode)
        OPS.setxattr(view.ops, local, name, value, ctx)

    @fuse_errors
    def removexattr(self, inode, name, ctx=None):
        view, local = self._change_target(inode)
        OPS.removexattr(view.ops, local, name, ctx)

    def _change_target(self, gid: int) -> tuple[View, int]:
        if gid == pyfuse3.ROOT_INODE:
            raise FUSEError(errno.EPERM)
        return self._writable_target(gid)

    @fuse_errors
    def statfs(self, ctx=None):
        return statfs_reply(os.statvfs(self.mountpoint if not self.views else
                                       next(iter(self.views.values())).spec.lowers[-1]))

    # -- changes (each view's own rules; EROFS in a read-only view) --------------
    @fuse_errors
    def setattr(self, inode, attr, fields, fh, ctx=None):
        view, local = self._change_target(inode)
        local_fh = None
        if fh is not None and fh in self._handles:
            local_fh = self._handles[fh][1]
        return self._out(view, OPS.setattr(view.ops, local, attr, fields, local_fh, ctx), 0)

    @fuse_errors
    def create(self, parent_inode, name, mode, flags, ctx):
        view, local = self._dir(parent_inode)
        fi, e = OPS.create(view.ops, local, name, mode, flags, ctx)
        return (pyfuse3.FileInfo(fh=self._inner_handle(view, fi.fh), keep_cache=fi.keep_cache),
                self._out(view, e, 1))

    @fuse_errors
    def mkdir(self, parent_inode, name, mode, ctx):
        view, local = self._dir(parent_inode)
        return self._out(view, OPS.mkdir(view.ops, local, name, mode, ctx), 1)

    @fuse_errors
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        view, local = self._dir(parent_inode)
        return self._out(view, OPS.mknod(view.ops, local, name, mode, rdev, ctx), 1)

    @fuse_errors
    def symlink(self, parent_inode, name, target, ctx):
        view, local = self._dir(parent_inode)
        return self._out(view, OPS.symlink(view.ops, local, name, target, ctx), 1)

    @fuse_errors
    def link(self, inode, new_parent_inode, new_name, ctx):
        view, local = self._change_target(inode)
        pview, plocal = self._dir(new_parent_inode)
        if pview is not view:
            raise FUSEError(errno.EXDEV)
        return self._out(view, OPS.link(view.ops, local, plocal, new_name, ctx), 1)

    @fuse_errors
    def unlink(self, parent_inode, name, ctx):
        view, local = self._dir(parent_inode)
        OPS.unlink(view.ops, local, name, ctx)

    @fuse_errors
    def rmdir(self, parent_inode, name, ctx):
        view, local = self._dir(parent_inode)
        OPS.rmdir(view.ops, local, name, ctx)

    @fuse_errors
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        view, old = self._dir(parent_inode_old)
        nview, new = self._dir(parent_inode_new)
        if nview is not view:
            raise FUSEError(errno.EXDEV)
        moved = self._shown_lower(view, old, name_old), self._shown_lower(view, new, name_new)
        OPS.rename(view.ops, old, name_old, new, name_new, flags, ctx)
        # The kernel moves its dentry, still on the shared gid of the lower file the
        # view copied up (its attributes, not the copy's): make it look the name up.
        if moved[0]:
            pyfuse3.invalidate_entry_async(parent_inode_new, name_new, ignore_enoent=True)
        if moved[1] and flags & RENAME_EXCHANGE:
            pyfuse3.invalidate_entry_async(parent_inode_old, name_old, ignore_enoent=True)

    @staticmethod
    def _shown_lower(view: View, local: int, name: bytes) -> bool:
        """Does the view show ``name`` in its directory ``local`` as a lower file?"""
        node = view.uv.child(view.uv.inodes.get(local), name)
        return node is not None and view.shows_lower(node)
