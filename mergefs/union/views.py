"""Many views in one FUSE mount: each top-level directory is a merged view.

One pyfuse3 mount (pyfuse3 serves one per process) whose root lists views by
name; each view is a ``MountSpec`` served by its own ``UnionView`` or
``WritableView`` and ``UnionOperations`` (the resolver, inode table, copy-up
and error translation are reused as they are). This module only maps numbers:

- A *gid* is a FUSE inode number of this mount; a view's own inode table
  keeps *local* numbers. Directories, the view roots and everything a
  writable view changed get a private gid per (view, local number).
- A non-directory that a view shows unchanged from a lower layer gets the gid
  of its lower file, keyed by that file's ``(st_dev, st_ino)``: the same gid in
  every view that shows it, so the kernel keeps one inode and one copy of its
  pages (files open with ``keep_cache``) for N containers of one image.
- A write to a shared gid (open for writing, setattr, setxattr, removexattr,
  link) cannot tell which view it came from. The file's key is then marked
  private for writable views and the request answered ESTALE; the kernel
  retries a path-based call once with a revalidating lookup, which now hands
  the writable view a private gid, and the call proceeds there (copy-up in
  that view only). Known limit: an fd-based change (``fchmod`` on a file open
  read-only) of a shared file gets ESTALE; a write attempted in a read-only
  view that shares the file with a writable one gets ESTALE, not EROFS
  (bind read-only views ``ro`` and the kernel answers EROFS first).

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
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import pyfuse3
from pyfuse3 import FUSEError

from ..errors import AlreadyExists, FailedPrecondition, NotFound
from ..layer import DIR
from ..mountspec import MountSpec
from .errors import fuse_errors
from .inodes import ROOT_INODE
from .ops import WRITE_FLAGS, UnionOperations, entry_attributes
from .server import build_view

log = logging.getLogger("mergefs.union")
ENTRY_FIELDS = ("generation", "entry_timeout", "attr_timeout", "st_mode", "st_nlink", "st_uid",
                "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks", "st_atime_ns",
                "st_mtime_ns", "st_ctime_ns")


class View:
    """One view: its spec, its union, and its local -> private gid map."""

    def __init__(self, vid: int, name: str, spec: MountSpec, fmt: str, root_gid: int):
        self.vid, self.name, self.spec, self.root_gid = vid, name, spec, root_gid
        self.uv = build_view(spec, fmt)
        self.ops = UnionOperations(self.uv, no_open=False)
        self.up = self.uv.up if self.uv.writable else None
        self.private: dict[int, int] = {ROOT_INODE: root_gid}
        self.handles = 0
        self.removed = False
        self.created = time.time()

    @property
    def writable(self) -> bool:
        return self.up is not None

    def shows_lower(self, node) -> bool:
        return node.kind != DIR and (self.up is None or node.top != self.up)

    def close(self) -> None:
        self.ops.close()
        self.uv.close()


@dataclass
class Shared:
    """A lower file shown unchanged by views: members (vid, local) -> lookups given."""
    key: tuple[int, int]
    members: dict = field(default_factory=dict)


def copy_entry(e: pyfuse3.EntryAttributes, gid: int) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    for f in ENTRY_FIELDS:
        setattr(out, f, getattr(e, f))
    out.st_ino = gid
    return out


class ViewFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, mountpoint: str, fmt: str = "auto"):
        super().__init__()
        self.mountpoint = os.path.abspath(mountpoint)
        self.fmt = fmt
        self.views: dict[str, View] = {}          # live, by name
        self.by_vid: dict[int, View] = {}         # live and removed-but-busy
        self.retired: set[str] = set()
        self._targets: dict[int, object] = {}     # gid -> (View, local) | Shared
        self._shared: dict[tuple[int, int], int] = {}
        self._private_keys: set[tuple[int, int]] = set()
        self._handles: dict[int, tuple[View | None, int]] = {}
        self._next_gid = ROOT_INODE + 1
        self._next_fh = 1
        self._next_vid = 1
        self.root_mtime_ns = time.time_ns()
        self._root_listings: dict[int, list[str]] = {}

    # -- the control API (trio thread) ---------------------------------------
    def add_view(self, name: str, spec: MountSpec) -> str:
        """Serve ``spec`` as the directory ``name``; return its path."""
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise ValueError(f"invalid view name {name!r}")
        if name in self.views or name in self.retired:
            raise AlreadyExists(f"view {name!r} exists or existed in this mount")
        gid = self._new_gid()
        view = View(self._next_vid, name, spec, self.fmt, gid)
        self._next_vid += 1
        self._targets[gid] = (view, ROOT_INODE)
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
        for gid in view.private.values():
            self._targets.pop(gid, None)
        if view.handles == 0:
            self._close_view(view)
        pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, os.fsencode(name), ignore_enoent=True)
        log.info("view %s removed", name)

    def list_views(self) -> list[dict]:
        return [{"name": v.name, "path": os.path.join(self.mountpoint, v.name),
                 "lowers": list(v.spec.lowers), "upper": v.spec.upper, "work": v.spec.work,
                 "writable": v.writable, "mounts": self.view_mounts(v.name)}
                for v in sorted(self.views.values(), key=lambda v: v.name)]

    def view_mounts(self, name: str) -> list[str]:
        """Mount points that use the view: binds of it or below it, mounts inside it."""
        inside = os.path.join(self.mountpoint, name)
        root = "/" + name
        dev = None
        out = []
        with open("/proc/self/mountinfo") as f:
            rows = [line.split() for line in f]
        for r in rows:
            if r[4] == self.mountpoint:
                dev = r[2]
        for r in rows:
            mnt_root, target = _unescape(r[3]), _unescape(r[4])
            if target == self.mountpoint:
                continue
            if (r[2] == dev and (mnt_root == root or mnt_root.startswith(root + "/"))) or \
                    target == inside or target.startswith(inside + "/"):
                out.append(target)
        return out

    def _close_view(self, view: View) -> None:
        self.by_vid.pop(view.vid, None)
        view.close()

    def close(self) -> None:
        for view in list(self.by_vid.values()):
            view.close()
        self.by_vid.clear()
        self.views.clear()

    # -- numbers ---------------------------------------------------------------
    def _new_gid(self) -> int:
        gid = self._next_gid
        self._next_gid += 1
        return gid

    def _gid(self, view: View, number: int, node, st: os.stat_result, count: int) -> int:
        """The gid for a view's local inode; ``count`` lookups handed to the kernel."""
        if view.shows_lower(node):
            key = (st.st_dev, st.st_ino)
            if not (view.writable and key in self._private_keys):
                gid = self._shared.get(key)
                if gid is None:
                    gid = self._shared[key] = self._new_gid()
                    self._targets[gid] = Shared(key)
                if count:
                    members = self._targets[gid].members
                    members[(view.vid, number)] = members.get((view.vid, number), 0) + count
                return gid
        gid = view.private.get(number)
        if gid is None:
            gid = view.private[number] = self._new_gid()
            self._targets[gid] = (view, number)
        return gid

    def _out(self, view: View, e: pyfuse3.EntryAttributes, count: int) -> pyfuse3.EntryAttributes:
        if e.st_ino == 0:
            return e
        inode = view.uv.inodes.get(e.st_ino)
        return copy_entry(e, self._gid(view, inode.number, inode.node, view.uv.attr(inode), count))

    def _local(self, gid: int) -> tuple[View, int]:
        t = self._targets.get(gid)
        if t is None:
            raise FUSEError(errno.ESTALE)
        if isinstance(t, Shared):
            return self._member(t)
        return t

    def _member(self, sh: Shared) -> tuple[View, int]:
        """A view that can serve a shared gid: one still showing the lower file first."""
        fallback = None
        for vid, number in sh.members:
            view = self.by_vid.get(vid)
            inode = view.uv.inodes.live(number) if view is not None else None
            if inode is None or inode.unlinked:
                continue
            if view.shows_lower(inode.node):
                return view, number
            fallback = fallback or (view, number)
        if fallback is None:
            raise FUSEError(errno.ESTALE)
        return fallback

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
            views = [self.by_vid.get(vid) for vid, _ in t.members]
            if not any(v is not None and v.writable for v in views):
                raise FUSEError(errno.EROFS)
            self._private_keys.add(t.key)
            raise FUSEError(errno.ESTALE)
        return self._local(gid)

    def _add_handle(self, view: View | None, local_fh: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = (view, local_fh)
        if view is not None:
            view.handles += 1
        return fh

    def _drop_handle(self, fh: int) -> tuple[View | None, int]:
        view, local = self._handles.pop(fh)
        if view is not None:
            view.handles -= 1
        return view, local

    def _after_release(self, view: View | None) -> None:
        if view is not None and view.removed and view.handles == 0 and view.vid in self.by_vid:
            self._close_view(view)

    # -- the root directory ------------------------------------------------------
    def _root_attr(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE
        e.st_mode = stat.S_IFDIR | 0o755
        e.st_nlink = 2
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.root_mtime_ns
        e.attr_timeout = e.entry_timeout = 0
        return e

    async def _view_root_entry(self, view: View, ctx) -> pyfuse3.EntryAttributes:
        e = copy_entry(await view.ops.getattr(ROOT_INODE, ctx), view.root_gid)
        e.entry_timeout = 86400.0     # dropped by remove_view (invalidate_entry)
        return e

    # -- names -----------------------------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE:
            view = self.views.get(os.fsdecode(name))
            if view is None:
                e = pyfuse3.EntryAttributes()
                e.st_ino, e.entry_timeout = 0, 0
                return e
            return await self._view_root_entry(view, ctx)
        view, local = self._dir(parent_inode)
        return self._out(view, await view.ops.lookup(local, name, ctx), 1)

    @fuse_errors
    async def forget(self, inode_list):
        for gid, count in inode_list:
            t = self._targets.get(gid)
            if isinstance(t, Shared):
                self._forget_shared(gid, t, count)
            elif t is not None:
                view, local = t
                view.uv.inodes.forget(local, count)

    def _forget_shared(self, gid: int, sh: Shared, count: int) -> None:
        while count > 0 and sh.members:
            member = max(sh.members, key=sh.members.get)
            n = min(count, sh.members[member])
            view = self.by_vid.get(member[0])
            if view is not None:
                view.uv.inodes.forget(member[1], n)
            count -= n
            sh.members[member] -= n
            if sh.members[member] <= 0:
                del sh.members[member]
        if not sh.members:
            del self._targets[gid]
            self._shared.pop(sh.key, None)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attr()
        view, local = self._local(inode)
        e = copy_entry(await view.ops.getattr(local, ctx), inode)
        if local == ROOT_INODE:
            e.entry_timeout = 86400.0
        return e

    @fuse_errors
    async def readlink(self, inode, ctx=None):
        view, local = self._local(inode)
        return await view.ops.readlink(local, ctx)

    # -- directories -------------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            fh = self._add_handle(None, 0)
            self._root_listings[fh] = sorted(self.views)
            return fh
        view, local = self._dir(inode)
        return self._add_handle(view, await view.ops.opendir(local, ctx))

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        view, local_fh = self._handles[fh]
        if view is None:
            await self._readdir_root(fh, start_id, token)
            return
        h = view.ops.handles[local_fh]
        parent = h.inode
        entries = view.uv.entries(parent, h.entries[start_id:])
        inodes = view.uv.inodes
        try:
            for i, (name, node, number, st, attrs) in enumerate(entries, start_id + 1):
                gid = self._gid(view, number, node, st, 0)
                if attrs is None:
                    merged = node.kind == DIR and len(node.layers) > 1
                    attrs = entry_attributes(number, st, merged, view.ops.timeouts)
                if not pyfuse3.readdir_reply(token, name, copy_entry(attrs, gid), i):
                    break
                child = inodes.entry_of(parent, name, node, number)   # readdirplus counts
                if child.attr is None:
                    child.attr = st
                self._gid(view, number, node, st, 1)
        finally:
            entries.close()

    async def _readdir_root(self, fh, start_id, token):
        names = self._root_listings[fh]
        for i, name in enumerate(names[start_id:], start_id + 1):
            view = self.views.get(name)
            if view is None:
                continue
            e = await self._view_root_entry(view, None)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), e, i):
                break

    @fuse_errors
    async def releasedir(self, fh):
        view, local = self._drop_handle(fh)
        if view is None:
            self._root_listings.pop(fh, None)
        else:
            await view.ops.releasedir(local)
            self._after_release(view)

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        pass

    # -- files -------------------------------------------------------------------
    @fuse_errors
    async def open(self, inode, flags, ctx=None):
        if flags & WRITE_FLAGS:
            view, local = self._writable_target(inode)
        else:
            view, local = self._local(inode)
        fi = await view.ops.open(local, flags, ctx)
        return pyfuse3.FileInfo(fh=self._add_handle(view, fi.fh), keep_cache=fi.keep_cache)

    @fuse_errors
    async def read(self, fh, off, size):
        view, local = self._handles[fh]
        return await view.ops.read(local, off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        view, local = self._handles[fh]
        return await view.ops.write(local, off, buf)

    @fuse_errors
    async def flush(self, fh):
        raise FUSEError(errno.ENOSYS)    # as UnionOperations: nothing to do on close(2)

    @fuse_errors
    async def fsync(self, fh, datasync):
        view, local = self._handles[fh]
        await view.ops.fsync(local, datasync)

    @fuse_errors
    async def release(self, fh):
        view, local = self._drop_handle(fh)
        await view.ops.release(local)
        self._after_release(view)

    # -- extended attributes -----------------------------------------------------
    @fuse_errors
    async def listxattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return []
        view, local = self._local(inode)
        return await view.ops.listxattr(local, ctx)

    @fuse_errors
    async def getxattr(self, inode, name, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            raise FUSEError(pyfuse3.ENOATTR)
        view, local = self._local(inode)
        return await view.ops.getxattr(local, name, ctx)

    @fuse_errors
    async def setxattr(self, inode, name, value, ctx=None):
        view, local = self._change_target(inode)
        await view.ops.setxattr(local, name, value, ctx)

    @fuse_errors
    async def removexattr(self, inode, name, ctx=None):
        view, local = self._change_target(inode)
        await view.ops.removexattr(local, name, ctx)

    def _change_target(self, gid: int) -> tuple[View, int]:
        if gid == pyfuse3.ROOT_INODE:
            raise FUSEError(errno.EPERM)
        return self._writable_target(gid)

    @fuse_errors
    async def statfs(self, ctx=None):
        out = pyfuse3.StatvfsData()
        sv = os.statvfs(self.mountpoint if not self.views else
                        next(iter(self.views.values())).spec.lowers[-1])
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(out, f, getattr(sv, f))
        return out

    # -- changes (each view's own rules; EROFS in a read-only view) --------------
    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx=None):
        view, local = self._change_target(inode)
        local_fh = None
        if fh is not None and fh in self._handles:
            local_fh = self._handles[fh][1]
        return self._out(view, await view.ops.setattr(local, attr, fields, local_fh, ctx), 0)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        view, local = self._dir(parent_inode)
        fi, e = await view.ops.create(local, name, mode, flags, ctx)
        return (pyfuse3.FileInfo(fh=self._add_handle(view, fi.fh), keep_cache=fi.keep_cache),
                self._out(view, e, 1))

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        view, local = self._dir(parent_inode)
        return self._out(view, await view.ops.mkdir(local, name, mode, ctx), 1)

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        view, local = self._dir(parent_inode)
        return self._out(view, await view.ops.mknod(local, name, mode, rdev, ctx), 1)

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        view, local = self._dir(parent_inode)
        return self._out(view, await view.ops.symlink(local, name, target, ctx), 1)

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        view, local = self._change_target(inode)
        pview, plocal = self._dir(new_parent_inode)
        if pview is not view:
            raise FUSEError(errno.EXDEV)
        return self._out(view, await view.ops.link(local, plocal, new_name, ctx), 1)

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        view, local = self._dir(parent_inode)
        await view.ops.unlink(local, name, ctx)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        view, local = self._dir(parent_inode)
        await view.ops.rmdir(local, name, ctx)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        view, old = self._dir(parent_inode_old)
        nview, new = self._dir(parent_inode_new)
        if nview is not view:
            raise FUSEError(errno.EXDEV)
        await view.ops.rename(old, name_old, new, name_new, flags, ctx)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field
