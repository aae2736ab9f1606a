"""The pyfuse3 ``Operations`` of the union: thin translators over the view.

Each handler turns FUSE arguments into one call on the ``UnionView`` (read)
or ``WritableView`` (write) and the result into pyfuse3 types; errors are
translated in one place (``@fuse_errors``, which also makes a plain function a
coroutine function for pyfuse3: a handler that never awaits is written as a
plain ``def``, one coroutine per request instead of two). Lookup counts: ``lookup``,
``create``, ``mkdir``, ``mknod``, ``symlink``, ``link`` and every entry
``readdirplus`` returns add one; ``forget`` subtracts. A file the C fast path
listed is counted in the table's lazy records, its Inode made only when a
request for it reaches Python (inodes.py, "lazy entry").

File handles: ``fh`` is a number in ``self.handles`` mapping to the inode and
its open fd (files) or a snapshot of the listing (directories, so readdir
offsets are indices that stay valid for the handle's life); ``self._held``
indexes them by inode (``_handles_of``: a copy-up or a request on an unlinked
file finds the handles of its inode without walking every open file).

No-open (``no_open``, a pyfuse3 that passes the inode when fh is 0): open and
opendir answer ENOSYS, so the kernel sends no OPEN/RELEASE/OPENDIR/RELEASEDIR
and read/write/fsync/readdir arrive with the inode number as ``fh`` (handle
numbers are small, inode numbers are not: the root is 1, every other one is
at least 2**54, docs/architecture.md). Content fds are then kept per inode
(``self.fds``, fdcache.py: the last FD_CACHE, checked against the inode's
node, so a copy-up is seen; the fd of a file unlinked while the kernel may
hold it open pinned until its FORGET), a writable mount copies a lower file
up at its first write (not at open). Writable listings are snapshots per
readdir pass (``_snapshot``).

The C fast path (fastpath.py, with a pyfuse3 build that has its hooks)
answers GETATTR, SETATTR, READ, WRITE, FSYNC, GETXATTR and LISTXATTR of the regular
files in ``self.fds`` before they reach these handlers; whatever it does not
serve comes here as before. With a v7 build it calls ``getattr``, ``lookup``
and ``mknod`` itself for the rest (``_direct``: the plain handler, errors as
errnos; no pyfuse3 coroutine per request), with v9 the namespace handlers
(``mkdir``, ``unlink``, ``rmdir``, ``symlink``, ``rename``, ``link``), the
xattr writes, ``forget``, and ``setattr`` and ``fsync`` too (``DIRECT``). None of them awaits: a handler
that must (a coroutine function) stays with pyfuse3 (``_direct`` gives None).
On a writable no-open mount C serves the common namespace requests of a
package manager itself (``_fastns.h``): LOOKUPs of names a listing at hand
has, MKNOD and MKDIR in upper directories it serves (the bookkeeping in
``_made_in_c``), RENAMEs of upper entries where no whiteout is needed (the
bookkeeping in ``WritableView.renamed``) and SETATTRs of upper directories;
``MERGEFS_FAST_LOOKUP``, ``_MKNOD``, ``_RENAME``, ``_DIR_SETATTR`` = 0 turn
each off, for comparisons.
"""
from __future__ import annotations

import errno
import fcntl
import inspect
import os
import stat
from dataclasses import dataclass
from typing import NamedTuple

import pyfuse3
from pyfuse3 import FUSEError
from sortedcontainers import SortedDict

from .. import syscalls
from ..layer import DIR, REG, is_overlay_private
from .errors import direct, fuse_errors, log
from .fdcache import FdCache
from .inodes import Inode
from .view import UnionView

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
LISTINGS, LISTED_NAMES = 64, 1 << 20   # no-opendir: readdir snapshots kept
# the handlers the C fast path calls without pyfuse3's coroutine (``_direct``):
# the first three with a v7 build, all with v9 (setattr: what C does not answer)
DIRECT = ("getattr", "lookup", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link",
          "setattr", "setxattr", "removexattr", "forget", "fsync")
GEN_SHIFT = 32                         # their offsets: generation << 32 | position


def direct_handler(ops, name: str):
    """``ops``' handler ``name`` as the C fast path calls it directly (the plain
    function under ``@fuse_errors``, errors returned as errnos), or None: pyfuse3
    calls it (a coroutine handler)."""
    plain = getattr(getattr(type(ops), name), "__wrapped__", None)
    if plain is None or inspect.iscoroutinefunction(plain):
        return None
    return direct(name, plain.__get__(ops))


def _in_group(group: int, gid: int, pid: int) -> bool:
    """Is ``group`` the caller's fsgid ``gid`` or one of process ``pid``'s
    supplementary groups (/proc; False once the process is gone)?"""
    if group == gid:
        return True
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return group in map(int, line.split()[1:])
    except OSError:
        pass
    return False


class _Mode(NamedTuple):
    """A SETATTR's attributes that only change the mode (``_kill_suidgid``)."""
    st_mode: int


class _Fields(NamedTuple):
    """pyfuse3.SetattrFields as Writable.setattr reads it."""
    update_size: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_mode: bool = False
    update_atime: bool = False
    update_mtime: bool = False


_MODE_ONLY = _Fields(update_mode=True)


@dataclass
class Handle:
    inode: Inode
    fd: int = -1                     # files: the content fd
    entries: list | None = None      # directories: (name, Node) snapshot
    names: list | None = None        # its names (readdir: ``_pass``)


def statfs_reply(sv: os.statvfs_result) -> "pyfuse3.StatvfsData":
    """An os.statvfs result as pyfuse3's statfs reply."""
    out = pyfuse3.StatvfsData()
    for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
              "f_ffree", "f_favail", "f_namemax"):
        setattr(out, f, getattr(sv, f))
    return out


@dataclass
class Timeouts:
    """How long the kernel may cache (seconds); layers are immutable (U3)."""
    entry: float = 86400.0
    attr: float = 86400.0


def entry_attributes(number: int, st: os.stat_result, merged_dir: bool,
                     t: Timeouts, squash: tuple = (None, None)) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = number
    e.generation = 0
    e.entry_timeout = t.entry
    e.attr_timeout = t.attr
    e.st_mode = st.st_mode
    # kernel overlayfs reports nlink 1 for a dir merged from several layers (U1)
    e.st_nlink = 1 if merged_dir else st.st_nlink
    e.st_uid, e.st_gid, e.st_rdev, e.st_size = st.st_uid, st.st_gid, st.st_rdev, st.st_size
    if squash[0] is not None:           # squash_to_root / squash_to_uid: ownership as shown
        e.st_uid = squash[0]
    if squash[1] is not None:
        e.st_gid = squash[1]
    e.st_blksize, e.st_blocks = st.st_blksize, st.st_blocks
    e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return e


def _invalidate_attrs(number: int) -> None:
    """Drop the kernel's cached attributes of inode ``number`` (not its pages: no
    writeback cache, so this never blocks inside a handler)."""
    try:
        pyfuse3.invalidate_inode(number, attr_only=True)
    except OSError as e:                 # the copy-up itself succeeded: never fail it here
        if e.errno != errno.ENOENT:      # ENOENT: the kernel holds nothing for it
            log.warning("invalidating the attributes of inode %d: %s", number, e)


class UnionOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    # read by the patched pyfuse3's init (tools/pyfuse3_inode_fh.py): False turns
    # FUSE_CAP_ATOMIC_O_TRUNC off, so open(O_TRUNC) reaches a no-open server as SETATTR
    atomic_o_trunc = True

    def __init__(self, view: UnionView, timeouts: Timeouts | None = None, no_open: bool = False,
                 volatile: bool = False, squash: tuple = (None, None)):
        super().__init__()
        self.volatile = volatile         # fsync is a no-op (overlay's "volatile")
        if view.writable:   # copy-ups fsynced (kernel overlayfs's default; fuse-overlayfs's not)
            view.upper.sync_copies = not volatile and \
                os.environ.get("MERGEFS_COPYUP_FSYNC") == "1"
        self.squash = squash
        self.view = view
        self.inodes = view.inodes
        self.timeouts = timeouts or Timeouts()
        # A negative entry (st_ino 0) the kernel may cache: every change of the view
        # goes through the kernel, which drops it when needed. Built once: pyfuse3
        # only reads it.
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino, self._negative.entry_timeout = 0, self.timeouts.entry
        self.handles: dict[int, Handle] = {}
        self._held: dict[Inode, dict[int, None]] = {}     # inode -> its handles (a set, ordered)
        self._next_fh = 1
        # no-open needs a pyfuse3 that passes the inode as fh when fh is 0
        # (see the module docstring; writable mounts: a v4 build, server.py)
        self.no_open = no_open
        self.atomic_o_trunc = not (no_open and view.writable)
        self.fds = FdCache(view)              # no-open: content fds per inode (fdcache)
        if view.writable and not no_open:     # (no-open: the fd cache sees the new node)
            view.copied_up = self._reopen_readers
        self._snapshots: dict[int, tuple] = {}    # generation -> (dir number, names)
        self._listed = 0                      # names in all snapshots
        self._gen = 0

    def init(self) -> None:
        """pyfuse3 calls this once the kernel connection is up: from now on a copy-up
        drops the kernel's cached attributes of what it changed (the parent's ctime),
        or they stay stale for attr_timeout and surface later ("file changed as we
        read it" from tar once a readdir makes the kernel ask again)."""
        from . import fastpath
        if self.view.writable:
            self.view.attrs_changed = self._attrs_changed
            # FUSE_HANDLE_KILLPRIV_V2, when server.py routed the session's reads and
            # writes through C (fastpath.prepare_io): the INIT reply agrees it
            fastpath.agree_killpriv(self._kill_suidgid)
        if self.no_open:      # the C fast path serves the files of the fd cache
            self.fds.fast = fastpath.load(self.timeouts.attr, self.squash, self.volatile)
            if self.fds.fast is not None:
                self.fds.fast.set_miss(self._open_for_c)
                if os.environ.get("MERGEFS_FASTPATH_DIRECT") != "0":    # "0": for comparisons
                    self.fds.fast.set_direct(**{n: direct_handler(self, n) for n in DIRECT})
                    # a LOOKUP of a name the parent's listing at hand lacks: answered in C
                    self.fds.fast.set_listed(self.inodes._live, self.timeouts.entry)
                    # GETXATTR and a lower file's first WRITE (its copy-up) without a coroutine
                    self.fds.fast.set_copyup(direct_handler(self, "getxattr"), direct(
                        "write", self.fds.write_for_c) if self.view.writable else None)
                    # ... and the GETXATTRs of files C holds no fd for, read in C through
                    # the entry's directory (a lower file's before its first write)
                    if self.view.writable:
                        self.fds.fast.set_xattr_at(self.inodes._live, self.inodes.lazy,
                                                   self.view.entry_dir)
                    # a LOOKUP of a name the parent's listing at hand has: in C when its
                    # inode is live and served there, or a file no Inode holds yet (lstat
                    # through entry_dir, counted lazily; _fastns.h). "0": for comparisons
                    if self.view.writable and os.environ.get("MERGEFS_FAST_LOOKUP") != "0" \
                            and hasattr(self.fds.fast, "set_named"):
                        self.fds.fast.set_named(self.inodes._numbers, self.inodes._claims,
                                                self.inodes.lazy, self.view.entry_dir,
                                                direct("lookup", self.inodes.entry),
                                                self.timeouts.entry)
                    # open(O_CREAT) of a new file, mkdir, in an upper directory C serves:
                    # made in C, the bookkeeping here (_made_in_c). "0": for comparisons
                    if self.view.writable and os.environ.get("MERGEFS_FAST_MKNOD") != "0" \
                            and hasattr(self.fds.fast, "set_made"):
                        upper = self.view.upper
                        self.fds.fast.set_made(direct("mknod", self._made_in_c), SortedDict,
                                               *upper._creator, upper._not_exact,
                                               self.timeouts.entry)
                    # chown/chmod/utimes of an upper directory C serves: in C. "0": off
                    if self.view.writable and os.environ.get("MERGEFS_FAST_DIR_SETATTR") != "0" \
                            and hasattr(self.fds.fast, "set_dir_setattr"):
                        self.fds.fast.set_dir_setattr(True)
                    # rename of an upper file the kernel holds by that name, nothing below
                    # to white out: in C (needs set_named's tables), the bookkeeping in
                    # WritableView.renamed. "0": for comparisons
                    if self.view.writable and os.environ.get("MERGEFS_FAST_RENAME") != "0" \
                            and hasattr(self.fds.fast, "set_renamed"):
                        self.fds.fast.set_renamed(direct("rename", self.view.renamed),
                                                  self.view.lower_has,
                                                  direct("rename", self.fds.pin), self.view.up)
                    # READDIRPLUS replies filled in C (v8 builds; _readdir_direct)
                    self.fds.fast.set_readdir(direct("readdir", self._readdir_direct),
                                              self._unlisted, self.timeouts.entry)
                if os.environ.get("MERGEFS_FASTOPEN") != "0":      # "0": for comparisons
                    # a READ with no fd: the file opened in C from its lazy record or Inode
                    up = self.view.up if self.view.writable else -1
                    self.fds.fast.set_fastopen(self.inodes.lazy, self.inodes._live,
                                               self.fds.fds, self.fds.max_fds, up,
                                               self._layer_dir)

    def _kill_suidgid(self, number: int, gid: int, pid: int) -> None:
        """FUSE_HANDLE_KILLPRIV_V2 (``_fastio.h``): a caller without CAP_FSETID (its
        fsgid ``gid``, process ``pid``) is about to write to, or truncate, inode
        ``number``; the kernel left it to the server to clear what it clears:
        the set-user-ID bit, and the set-group-ID bit of a group-executable file
        or of one whose group the caller is not in (setattr_should_drop_sgid).
        Cleared as the kernel's own SETATTR of the mode did it (a lower file is
        copied up first), and the kernel's cached attributes dropped. An error
        is logged and the request goes on (the cost of doing this before libfuse
        dispatches it; the kernel's write would have failed)."""
        try:
            inode = self.inodes.get(number)
            st = self._stat(inode)
            kill = st.st_mode & stat.S_ISUID
            if st.st_mode & stat.S_ISGID and (st.st_mode & stat.S_IXGRP or
                                              not _in_group(st.st_gid, gid, pid)):
                kill |= stat.S_ISGID
            if not kill or not stat.S_ISREG(st.st_mode):
                return
            self.setattr.__wrapped__(self, number, _Mode(st.st_mode & ~kill), _MODE_ONLY, None)
        except (FUSEError, OSError) as e:
            log.warning("clearing the set-id bits of inode %d: %s", number, e)
            return
        _invalidate_attrs(number)

    def _attrs_changed(self, number: int) -> None:
        """A copy-up changed inode ``number`` (the parent's ctime): the kernel drops
        its attributes and will ask again; a directory's GETATTR then goes to
        C at once (``serve_dir``; else its first one would come to Python)."""
        _invalidate_attrs(number)
        if self.fds.fast is not None:
            inode = self.inodes.live(number)
            if inode is not None:
                self.fds.serve_dir(inode)       # (nothing for a file)

    def _reopen_readers(self, inode: Inode) -> list[int]:
        """A copy-up moved ``inode`` to the upper: the handles opened read-only before
        it (on the lower file) read the copy from now on, as with kernel overlayfs
        (its file operations re-open the real file); else they read the old bytes,
        and a read past the old end comes back short, which makes the FUSE kernel
        shrink the file's cached size for every opener. Each handle keeps its fd
        number (``dup2``: what registered it, such as C's HANDLE entries, stays
        valid). Returns the handles moved."""
        if inode.kind != REG:
            return []
        held = [fh for fh in self._held.get(inode, ()) if self.handles[fh].fd >= 0]
        if not held:
            return []
        try:
            fd = self.view.open_content(inode)
        except OSError as e:                 # the copy-up itself succeeded: never fail it
            log.warning("re-opening the readers of inode %d: %s", inode.number, e)
            return []
        moved = []
        try:
            for fh in held:
                h = self.handles[fh]
                if fcntl.fcntl(h.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                    os.dup2(fd, h.fd, inheritable=False)
                    moved.append(fh)
        finally:
            os.close(fd)
        return moved

    def _open_for_c(self, number: int) -> None:
        """The C fast path found no fd for a READ and could not open the file itself
        (_fastopen.h: a hardlink, a non-regular or unlinked inode, ...): open the
        file's content fd (the cache hands it to C), as ``read`` would; errors are
        left to ``read``."""
        inode = self.inodes.live(number)
        if inode is not None and inode.kind == REG and not inode.unlinked:
            self.fds.content_fd(inode)

    def close(self) -> None:
        self.fds.close()

    # -- helpers ---------------------------------------------------------
    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        if inode.entry is not None and not inode.unlinked:
            return inode.entry
        st = self._stat(inode)
        merged = inode.is_dir and self.view.merged(inode.parent, inode.name, inode.node, inode)
        e = entry_attributes(inode.number, st, merged, self.timeouts, self.squash)
        if st is inode.attr:
            inode.entry = e
        return e

    def _stat(self, inode: Inode) -> os.stat_result:
        if inode.unlinked:
            pinned = self.fds.pinned.get(inode.number)
            if pinned is not None:
                return os.fstat(pinned[0])
            for h in self._handles_of(inode):
                return os.fstat(h.fd)
        return self.view.attr(inode)

    def _add_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        self._held.setdefault(handle.inode, {})[fh] = None
        return fh

    def _drop_handle(self, fh: int) -> Handle:
        h = self.handles.pop(fh)
        fhs = self._held[h.inode]
        del fhs[fh]
        if not fhs:
            del self._held[h.inode]
        return h

    def _handles_of(self, inode: Inode) -> list[Handle]:
        """The open file handles (those with a content fd) of ``inode``."""
        fhs = self._held.get(inode)
        if not fhs:
            return []
        return [h for fh in fhs if (h := self.handles[fh]).fd >= 0]

    def _writer(self):
        if not self.view.writable:
            raise FUSEError(errno.EROFS)
        return self.view

    def check(self) -> list[str]:
        """Invariants for tests: the inode table's, every handle's inode is live, and
        the handles by inode are the handles."""
        problems = self.inodes.check()
        by_inode: dict[Inode, dict[int, None]] = {}
        for fh, h in self.handles.items():
            if h.inode.lookups <= 0:
                problems.append(f"handle {fh} on forgotten {h.inode!r}")
            by_inode.setdefault(h.inode, {})[fh] = None
        if by_inode != self._held:
            problems.append(f"handles by inode {self._held} != {by_inode}")
        return problems

    # -- names -----------------------------------------------------------
    @fuse_errors
    def lookup(self, parent_inode, name, ctx=None):
        # one name looked up in the layers, no directory listed (view.read_name);
        # before every new name: no exception raised for its absence
        inode = self.view.lookup_or_none(self.inodes.get(parent_inode), name)
        return self._negative if inode is None else self._entry(inode)

    @fuse_errors
    def forget(self, inode_list):
        for number, count in inode_list:
            if self.inodes.forget(number, count) and self.fds:
                self.fds.drop(number)      # the kernel holds it no more: no read can come

    @fuse_errors
    def getattr(self, inode, ctx=None):
        inode = self.inodes.get(inode)
        if inode.is_dir and self.fds.fast is not None:
            self.fds.serve_dir(inode)       # C answers its next GETATTR
        return self._entry(inode)

    @fuse_errors
    def readlink(self, inode, ctx=None):
        return self.view.readlink(self.inodes.get(inode))

    # -- directories -----------------------------------------------------
    @fuse_errors
    def opendir(self, inode, ctx=None):
        if self.no_open:
            raise FUSEError(errno.ENOSYS)    # the kernel caches listings itself from now on
        node = self.inodes.get(inode)
        return self._add_handle(Handle(node, entries=list(self.view.listing(node).items())))

    @fuse_errors
    def readdir(self, fh, start_id, token):
        parent, keys, current, start, base = self._pass(fh, start_id)
        reply = pyfuse3.readdir_reply
        pos = start

        def present():
            nonlocal pos
            for k in range(start, len(keys)):
                node = current.get(keys[k])
                if node is not None:
                    pos = k + 1
                    yield keys[k], node
        entries = self.view.entries(parent, present())
        try:
            for name, node, number, st, attrs in entries:
                if attrs is None:
                    attrs = self._entry_attrs(parent, name, node, number, st)
                if not reply(token, name, attrs, base | pos):
                    break
                child = self.inodes.entry_of(parent, name, node, number)  # readdirplus counts
                if child.attr is None:
                    child.attr = st
                    child.entry = attrs
        finally:
            entries.close()

    def _readdir_direct(self, fh: int, start_id: int, size: int) -> tuple:
        """READDIRPLUS as the C fast path answers it (``_fastpath.set_readdir``; no-open):
        what C walks, ``(parent, keys, start, base, current, live, lazy, numbers,
        claims, opener, slow)``. C takes the names ``keys[start:]`` that
        ``current`` still has while they fit in ``size`` bytes (offset ``base |
        position + 1``). A non-directory the table does not hold live (``live``)
        C lstats in ``opener(layer)``, the parent's directory in that layer (an
        fd C closes, or -errno), and counts in ``lazy`` (inodes.py, "lazy
        entry"): no Inode, no Python per file. Any other entry (a directory: its
        attributes are Python's, nlink 1 when merged, U1; a live inode; a number
        the table must decide, ``numbers``/``claims``) goes to ``slow(name,
        node, fd)``, which counts it and returns its EntryAttributes (None: gone
        from its layer; an int: an errno)."""
        parent, keys, current, start, base = self._pass(fh, start_id)
        view, inodes = self.view, self.inodes

        def opener(layer: int) -> int:
            return self._layer_dir(parent, layer)

        def slow(name: bytes, node, fd: int):
            number = inodes.number_for(node)
            inode = inodes.live(number)
            if inode is not None and inode.attr is not None and not inode.unlinked:
                st, attrs = inode.attr, inode.entry
            else:
                try:
                    st = syscalls.lstat(name, fd)
                except FileNotFoundError:
                    return None
                attrs = None
            if attrs is None:
                attrs = self._entry_attrs(parent, name, node, number, st)
            child = inodes.entry_of(parent, name, node, number)
            if child.attr is None:
                child.attr = st
                child.entry = attrs
            return attrs
        return (parent, keys, start, base, current, inodes._live, inodes.lazy, inodes._numbers,
                inodes._claims, opener, direct("readdir", slow))

    def _layer_dir(self, parent: Inode, layer: int) -> int:
        """An fd on ``parent``'s directory in ``layer`` (the caller closes it), or
        -errno: where the C fast path finds the entries of a READDIRPLUS and the
        files whose first READ it opens itself (``_fastpath.set_fastopen``)."""
        view = self.view
        try:
            return syscalls.open_beneath(view.layers[layer].fd, view.layer_path(parent, layer))
        except OSError as e:
            return -(e.errno or errno.EIO)

    def _unlisted(self, numbers: list) -> None:
        """The C fast path could not answer these entries of a READDIRPLUS after
        ``slow`` counted them (a bug: C measures before it asks): the kernel's
        lookups did not happen."""
        for number in numbers:
            self.inodes.forget(number, 1)

    def _entry_attrs(self, parent: Inode, name: bytes, node, number: int,
                     st: os.stat_result) -> pyfuse3.EntryAttributes:
        merged = node.kind == DIR and self.view.merged(parent, name, node)
        return entry_attributes(number, st, merged, self.timeouts, self.squash)

    def _pass(self, fh: int, start_id: int) -> tuple:
        """What a readdir request walks: ``(parent, keys, current, start, base)``,
        the names ``keys[start:]`` that the listing ``current`` still has (an
        entry removed since the snapshot ``keys`` is skipped, and moves no other's
        offset); the offset after ``keys[k]`` is ``base | k + 1``.

        With opendir, the handle's snapshot; no-open, the pass's snapshot
        (``_snapshot``)."""
        if not self.no_open:
            h = self.handles[fh]
            if h.names is None:
                h.names = [name for name, _ in h.entries]
            parent, keys, start, base = h.inode, h.names, start_id, 0
        else:    # fh is the inode (patched pyfuse3)
            parent = self.inodes.get(fh)
            gen, keys = self._snapshot(parent, start_id)
            start, base = start_id & ((1 << GEN_SHIFT) - 1), gen << GEN_SHIFT
        # a removed directory is empty (rmdir needs it so): never read it again
        current = self.view.listing(parent) if not parent.unlinked else parent.children or {}
        return parent, keys, current, start, base

    def _snapshot(self, parent: Inode, offset: int) -> tuple[int, list]:
        """The names a readdir pass of a directory walks (no-opendir).

        A pass starts at offset 0 with a snapshot of the listing under a new
        generation; every offset handed out is ``generation << 32 | position``,
        so the later calls of the pass read the same snapshot whatever is created
        or removed meanwhile (``rm -rf`` removes while it reads): a name removed
        since is skipped, a new one shows in the next pass, every other name
        comes exactly once. The newest LISTINGS snapshots (at most LISTED_NAMES
        names) are kept; an offset whose snapshot is gone falls back to the
        position in a snapshot of the current listing."""
        gen = offset >> GEN_SHIFT
        kept = self._snapshots.get(gen) if offset else None
        if kept is not None and kept[0] == parent.number:
            return gen, kept[1]
        names = list(self.view.listing(parent))
        if not offset:
            self._gen = self._gen % ((1 << 31) - 1) + 1     # offsets stay below 2**63
            gen = self._gen
        old = self._snapshots.pop(gen, None)
        if old is not None:
            self._listed -= len(old[1])
        self._snapshots[gen] = (parent.number, names)
        self._listed += len(names)
        while len(self._snapshots) > LISTINGS or self._listed > LISTED_NAMES and \
                len(self._snapshots) > 1:
            self._listed -= len(self._snapshots.pop(next(iter(self._snapshots)))[1])
        return gen, names

    @fuse_errors
    def releasedir(self, fh):
        self._drop_handle(fh)

    @fuse_errors
    def fsyncdir(self, fh, datasync):
        pass

    # -- files -----------------------------------------------------------
    @fuse_errors
    def open(self, inode, flags, ctx=None):
        if self.no_open:    # no OPEN/RELEASE any more, for any flags; pages cached
            raise FUSEError(errno.ENOSYS)
        node = self.inodes.get(inode)
        if flags & WRITE_FLAGS:
            fd = self._writer().open_for_write(node, flags)
        else:
            fd = self.view.open_content(node)
        fh = self._add_handle(Handle(node, fd))
        # keep_cache: layers never change under a read-only mount (U3); a
        # writable mount sends every write through here, so its pages agree too.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors
    def read(self, fh, off, size):
        if self.no_open and fh not in self.handles:    # fh is the inode
            return os.pread(self.fds.content_fd(self.inodes.get(fh)), size, off)
        return os.pread(self.handles[fh].fd, size, off)

    @fuse_errors
    def write(self, fh, off, buf):
        h = self.handles.get(fh) if self.no_open else self.handles[fh]
        if h is None:                       # no-open: fh is the inode
            inode = self.inodes.get(fh)
            # a copy-up made here leaves the file's cached attributes to the kernel,
            # which drops them after a write that succeeded (Writable._copied_up)
            try:
                n = os.pwrite(self.fds.write_fd(inode, self._writer(), True), buf, off)
            except OSError:
                if self.view.writable:
                    self.view.attrs_changed(inode.number)
                raise
            finally:
                inode.attr = None
            return n
        n = os.pwrite(h.fd, buf, off)
        h.inode.attr = None
        return n

    @fuse_errors
    def flush(self, fh):
        # Nothing to do on close(2): writes go straight to the upper. ENOSYS
        # makes the kernel stop sending FLUSH for good (fc->no_flush), one
        # request less per open file.
        raise FUSEError(errno.ENOSYS)

    @fuse_errors
    def fsync(self, fh, datasync):
        if self.volatile:
            return
        h = self.handles.get(fh) if self.no_open else self.handles[fh]
        if h is not None:
            fd = h.fd
        else:                # no-open: fh is the inode; a lower file has nothing to sync
            inode = self.inodes.get(fh)   # (kernel overlayfs syncs only an upper file too)
            if not self.view.writable or inode.node.top != self.view.up:
                return
            fd = self.fds.content_fd(inode)
        (os.fdatasync if datasync else os.fsync)(fd)

    @fuse_errors
    def release(self, fh):
        os.close(self._drop_handle(fh).fd)

    # -- extended attributes ---------------------------------------------
    @fuse_errors
    def listxattr(self, inode, ctx=None):
        node = self.inodes.get(inode)
        return self.view.xattr_names(node, self._held_fd(node, False) if node.unlinked else -1)

    @fuse_errors
    def getxattr(self, inode, name, ctx=None):
        if is_overlay_private(os.fsdecode(name)):
            raise FUSEError(errno.EOPNOTSUPP)   # as kernel overlayfs answers its own prefix
        node = self.inodes.get(inode)
        value = self.view.getxattr(node, name, self._held_fd(node, False) if node.unlinked else -1)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    def setxattr(self, inode, name, value, ctx=None):
        node, w = self.inodes.get(inode), self._writer()
        w.setxattr(node, name, value, self._held_fd(node, True) if node.unlinked else -1)

    @fuse_errors
    def removexattr(self, inode, name, ctx=None):
        node, w = self.inodes.get(inode), self._writer()
        w.removexattr(node, name, self._held_fd(node, True) if node.unlinked else -1)

    def _held_fd(self, inode: Inode, change: bool, fd: int = -1) -> int:
        """The fd through which a file unlinked (or renamed over) while held open is
        read or changed: SETATTR without fh, SETXATTR and GETXATTR come by inode
        and its name is gone. -1: none needed (a read-only mount, not a file, a
        lower file only read: its layer still has it). ``change``: a copy of a
        lower file, private to the holders, is made (``detached_copy``), the
        view's reads go there from then on. ``fd``: the request's handle's fd."""
        if not self.view.writable or inode.kind != REG:
            return -1
        if fd >= 0:
            return fd
        if self.no_open:
            return self.fds.write_fd(inode, self._writer()) if change \
                else self.fds.cached(inode, False)
        got = self.fds.pinned.get(inode.number)
        if got is not None:
            return got[0]
        held = self._handles_of(inode)
        w, node = self.view, inode.node
        if node.top == w.up:        # opened for writing (copied up at the open) or later
            for h in held:
                st = os.fstat(h.fd)
                if st.st_ino == node.inos[0] and st.st_dev == os.fstat(w.upper.layer.fd).st_dev:
                    return h.fd
        elif not change:
            return -1
        if not held:
            raise FUSEError(errno.ESTALE)      # no name, no handle: nothing reaches it
        if node.top == w.up:
            raise FUSEError(errno.ESTALE)
        # only read-only handles on a lower file: they move to a private copy
        copy = w.detached_copy(inode)
        self.fds.pinned[inode.number] = (copy, node, "rw", False)
        for h in held:
            os.close(h.fd)
            h.fd = os.dup(copy)
        return copy

    @fuse_errors
    def statfs(self, ctx=None):
        return statfs_reply(self.view.statvfs())

    # -- writes (EROFS on a read-only mount, U3) --------------------------
    @fuse_errors
    def setattr(self, inode, attr, fields, fh, ctx=None):
        node = self.inodes.get(inode)
        fd = self.handles[fh].fd if fh is not None and fh in self.handles else -1
        held = self._held_fd(node, True, fd) if node.unlinked else -1
        self._writer().setattr(node, attr, fields, fd, held)
        return self._entry(node)

    @fuse_errors
    def create(self, parent_inode, name, mode, flags, ctx):
        w = self._writer()
        if self.no_open:
            # the kernel then makes new files with MKNOD and opens them no-open:
            # no RELEASE per new file (mknod keeps the create's fd for the writes)
            raise FUSEError(errno.ENOSYS)
        node, fd = w.create(self.inodes.get(parent_inode), name, mode, flags, ctx)
        fh = self._add_handle(Handle(node, fd))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(node)

    @fuse_errors
    def mkdir(self, parent_inode, name, mode, ctx):
        inode = self._writer().mkdir(self.inodes.get(parent_inode), name, mode, ctx)
        if self.fds.fast is not None:
            self.fds.serve_dir(inode)       # C answers its GETATTRs
        return self._entry(inode)

    @fuse_errors
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        w = self._writer()
        if self.no_open and mode & 0o170000 == 0o100000:   # S_IFREG: an open(O_CREAT)
            # the fd cache hands the fd to C, which answers the getxattrs through it
            inode, fd = w.create(self.inodes.get(parent_inode), name, mode, os.O_RDWR, ctx,
                                 list_xattrs=self.fds.fast is None)
            self.fds.keep(inode, fd, True)      # its writes come next, by inode
            return self._entry(inode)
        return self._entry(w.mknod(self.inodes.get(parent_inode), name, mode, rdev, ctx))

    def _made_in_c(self, parent_number: int, name: bytes, ino: int, fd: int) -> int:
        """The C fast path made ``name`` (upper inode ``ino``) in the upper directory
        of live inode ``parent_number``, as ``mknod`` (a regular file, open as
        ``fd``) or ``mkdir`` (``fd`` -1) would have (``_fastns.h``,
        ``made_in``): the view and the inode table take it; the fd cache a
        file's fd (handed back to C) for the writes that follow, a directory
        is served by C as ``mkdir`` has it. Returns its number (the entry C
        replies with)."""
        parent = self.inodes.get(parent_number)
        if fd < 0:
            inode = self.view.made(parent, name, DIR, ino)
            self.fds.serve_dir(inode)
            return inode.number
        inode = self.view.made(parent, name, REG, ino)
        self.fds.keep(inode, fd, True)
        return inode.number

    @fuse_errors
    def symlink(self, parent_inode, name, target, ctx):
        w = self._writer()
        return self._entry(w.symlink(self.inodes.get(parent_inode), name, target, ctx))

    @fuse_errors
    def link(self, inode, new_parent_inode, new_name, ctx):
        w = self._writer()
        node = w.link(self.inodes.get(inode), self.inodes.get(new_parent_inode), new_name)
        return self._entry(node)

    @fuse_errors
    def unlink(self, parent_inode, name, ctx):
        parent, w = self.inodes.get(parent_inode), self._writer()
        if self.no_open:
            self.fds.pin(parent, name)
        w.unlink(parent, name)

    @fuse_errors
    def rmdir(self, parent_inode, name, ctx):
        self._writer().rmdir(self.inodes.get(parent_inode), name)

    @fuse_errors
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        w = self._writer()
        p_new = self.inodes.get(parent_inode_new)
        if self.no_open and not flags & 2:          # RENAME_EXCHANGE unlinks nothing
            self.fds.pin(p_new, name_new)
        w.rename(self.inodes.get(parent_inode_old), name_old, p_new, name_new, flags)
