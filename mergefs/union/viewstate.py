"""The state behind ``ViewFS`` (views.py): a view, a shared lower file, mount users."""
from __future__ import annotations

import hashlib
import os
import time

import pyfuse3

from ..layer import DIR
from ..mountspec import MountSpec
from .inodes import ROOT_INODE, Inode
from .lowercache import LowerCache, shared_view
from .ops import UnionOperations

ENTRY_FIELDS = ("generation", "entry_timeout", "attr_timeout", "st_mode", "st_nlink", "st_uid",
                "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks", "st_atime_ns",
                "st_mtime_ns", "st_ctime_ns")


def view_ident(name: str, spec: MountSpec, ident: str | None = None) -> bytes:
    """What a view's private gids are derived from (``ViewNumbers._gid``), the same
    when the service adds the view again after a restart: ``ident`` if the caller
    names one (the service: the snapshot key), else the upper directory of a
    writable view (its content), else the view's name."""
    if ident is not None:
        return b"ident\0" + os.fsencode(ident)
    if spec.upper is not None:
        return b"upper\0" + os.fsencode(os.path.realpath(spec.upper))
    return b"name\0" + os.fsencode(name)


class View:
    """One view: its spec, its union, and its local -> private gid map."""

    def __init__(self, vid: int, name: str, spec: MountSpec, fmt: str, cache: LowerCache,
                 ident: str | None = None):
        self.vid, self.name, self.spec = vid, name, spec
        self.seed = hashlib.blake2b(view_ident(name, spec, ident), digest_size=8)
        self.cache = cache
        self.uv = shared_view(spec, fmt, cache)
        self.ops = UnionOperations(self.uv, no_open=False, volatile=spec.volatile)
        self.up = self.uv.up if self.uv.writable else None
        self.root_gid = 0                         # set by ViewFS.add_view
        self.private: dict[int, int] = {}         # local number -> gid
        # local number -> key of the shared lower file it was (ViewFS._note_lower)
        self.lower_keys: dict[int, tuple[int, int]] = {}
        self.fhs: dict[int, int] = {}             # its open handles: local fh -> the mount's
        self.removed = False
        self.created = time.time()

    @property
    def handles(self) -> int:
        return len(self.fhs)

    @property
    def writable(self) -> bool:
        return self.up is not None

    def shows_lower(self, node) -> bool:
        return node.kind != DIR and (self.up is None or node.top != self.up)

    def close(self) -> None:
        self.ops.close()
        self.uv.close()


class Shared:
    """A lower file shown unchanged by views, under one gid.

    Views keep nothing per shared file: the gid is served by ``view`` (the first
    that showed it, another of the same lowers once that one is gone) from
    ``inode``, detached from every table (it names the file's path in its lower
    layer); ``count`` is the kernel's lookup count for the gid.

    Its open handles (``ViewFS.open``, read-only: the fd on the lower file):
    ``readers`` maps each to the view it was opened through when only one view
    can have opened it (``seen``: the vid of the only view that looked the gid
    up, -1 once another did), else None. ``moved``: the readers a copy-up in
    their view moved onto the copy (fh -> the view and its inode of the copy); while
    there are any, the gid's attributes are never cached by the kernel (each
    read asks again, with its handle: ``ViewFS._split``).
    """
    __slots__ = ("key", "view", "inode", "entry", "count", "writable", "seen", "readers",
                 "moved")

    def __init__(self, key, view: "View", inode: Inode):
        self.key, self.view, self.inode = key, view, inode
        self.entry = None
        self.count = 0
        self.writable = False
        self.seen = 0
        self.readers: dict[int, View | None] | None = None
        self.moved: dict[int, tuple[View, Inode]] | None = None


_DETACHED_ROOT = Inode(ROOT_INODE, None, b"", None)


def detached(path: bytes, node, st) -> Inode:
    """An inode outside every table naming ``path`` in the layer ``node.top``: the
    source of a shared gid, untouched by renames in the view that first showed it."""
    inode = Inode(0, _DETACHED_ROOT, path, node)
    inode.attr = st
    return inode


def copy_entry(e: pyfuse3.EntryAttributes, gid: int) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    for f in ENTRY_FIELDS:
        setattr(out, f, getattr(e, f))
    out.st_ino = gid
    return out


def mounts_using(mountpoint: str, name: str) -> list[str]:
    """Mount points that use the view: binds of it or below it, mounts inside it.
    Only the lines that name the view or the views mount are parsed (any other
    cannot be either; a full parse costs ~1 ms of the thread that answers FUSE
    requests, at every removal of a view)."""
    from .. import mounttable
    inside = os.path.join(mountpoint, name)
    root = "/" + name
    rows = mounttable.read(naming=[name, mountpoint])
    dev = None
    for r in rows:
        if r.target == mountpoint:
            dev = r.device
    out = []
    for r in rows:
        if r.target == mountpoint:
            continue
        if (r.device == dev and (r.root == root or r.root.startswith(root + "/"))) or \
                r.target == inside or r.target.startswith(inside + "/"):
            out.append(r.target)
    return out
