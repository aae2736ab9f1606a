"""Safe extraction of one layer tar into a new directory in overlay format.

Everything is created relative to directory fds opened one component at a
time with O_NOFOLLOW, inside a directory this module just made, so no member
can make us read or write outside it (S2): a symlink the layer contains is
never followed, and a member whose parent is such a symlink is refused.

Decisions (OCI image-spec layer.md, docs/semantics.md D2/D3/D5/D6/D7, A1/A2/A3):
* Duplicate paths are refused (InvalidLayer): layer.md says a layer "MUST NOT
  include duplicate entries", and refusing is the only choice that cannot
  silently differ from another runtime's "later wins" or "first wins".
* ``.wh.NAME`` and an overlay whiteout member (char 0/0) hide NAME in lower
  layers only (D2). If this layer also has NAME, NAME is kept and no whiteout
  is written (overlay format cannot hold both); NAME itself replaces the lower
  entry, and a directory NAME is made opaque so nothing of the lower one shows
  (D2 + D7). ``.wh..wh..opq`` (or a ``*.overlay.opaque=y`` xattr) makes its
  directory opaque wherever it stands in the tar (D3). Whiteouts below an
  opaque directory are dropped at the end (D6). Other ``.wh..wh.*`` names
  (aufs bookkeeping) are skipped.
* A whiteout below a non-directory of the same layer (umoci 0.4 writes ``f``
  then ``f/.wh.child`` when a directory became a file) does nothing: that
  entry already replaces the lower subtree (M2). Nothing is written, even when
  the non-directory is a symlink.
* Parents that no member names (``ExtractResult.implicit_dirs``; b"" is the
  root without a ``./`` member): OCI applies such a layer without touching the
  lower directory's attributes (umoci unpack, containerd and Docker keep them;
  umoci's repack omits unchanged parents, e.g. ``home/`` above a changed
  ``home/user/``). Overlay format cannot say "no attributes" (the top layer's
  directory always wins), so when ``lower`` (the layers below, bottom first)
  is given, such a directory takes the attributes of the lower merged view's
  directory there (mode, owner, mtime, content xattrs), listed in
  ``ExtractResult.inherited``: the result then depends on the lowers, and a
  store must key it by them too. Without a lower directory there (or without
  ``lower``) it is 0755, owner 0:0, mtime 0 (the epoch), so the same tar
  always gives the same tree.
* Hardlinks must point to a non-directory member that came earlier in the
  same tar. Whiteouts get mode 0 and mtime 0 (deterministic, like the kernel's).
* Metadata: numeric owners (chown only as root), then chmod, then xattrs (pax
  ``SCHILY.xattr.*``; overlay-private ones are format, not content; a refused
  xattr is a warning, A3), then nanosecond times. Directories get theirs after
  all members, deepest first, so creating children cannot disturb them.
* A member more than ``MAX_DEPTH`` (256) directories deep is refused
  (InvalidLayer): no image needs it, and every reader below walks the levels.
* Device nodes other than whiteouts need root; without root they are refused
  (UnsafeContent) rather than silently dropped.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass, field

from .. import syscalls
from ..attrs import XATTR_REFUSED
from ..errors import AlreadyExists, InvalidLayer, NotFound, UnsafeContent
from ..layer import DIR, OPAQUE_XATTRS, XWHITEOUT_XATTRS, content_xattrs, is_overlay_private
from . import _tar
from ._stream import open_tar_stream

MAX_DEPTH = 256        # directory levels of a member; every reader of a layer walks them
O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_CACHED_FDS = 256
IMPLICIT_DIR = (0o755, 0, 0, {}, 0, 0)        # mode, uid, gid, xattrs, atime_ns, mtime_ns


@dataclass
class ExtractResult:
    """What one extraction produced. ``diff_id`` is ``sha256:<hex>`` of the uncompressed tar."""
    diff_id: str
    compression: str              # "none", "gzip" or "zstd"
    tar_size: int                 # uncompressed bytes
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0             # fifos and device nodes
    whiteouts: int = 0            # whiteouts written (char 0/0)
    opaque_dirs: int = 0
    skipped: int = 0              # aufs .wh..wh.* bookkeeping, dropped overlay xattrs
    warnings: list[str] = field(default_factory=list)
    # Directories no member named (b"" = the root had no "./" entry): made 0755,
    # 0:0, mtime 0. OCI would leave a lower directory's attributes there; overlay
    # format cannot say "no attributes", so a merge shows these instead.
    implicit_dirs: list[bytes] = field(default_factory=list)
    # Of those, the ones that took the attributes of the lower layers' directory.
    inherited: list[bytes] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Directory entries in the result (the root excluded)."""
        return (self.files + self.dirs + self.symlinks + self.hardlinks + self.specials
                + self.whiteouts)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["entries"] = self.entries
        d["implicit_dirs"] = [p.decode("utf-8", "surrogateescape") for p in self.implicit_dirs]
        d["inherited"] = [p.decode("utf-8", "surrogateescape") for p in self.inherited]
        return d


def clean_path(name: bytes) -> bytes:
    """A member name as a relative path without ``.`` parts; b"" is the root.

    Absolute names and ``..`` components are refused (S2).
    """
    if name.startswith(b"./"):
        name = name[2:]
    if not (name.startswith((b"/", b".")) or name.endswith(b"/") or b"/." in name
            or b"//" in name or b"\0" in name or not name):
        return name                               # the common case: nothing to clean
    if name.startswith(b"/"):
        raise UnsafeContent(f"tar member {name!r} has an absolute path")
    if b"\0" in name:
        raise InvalidLayer(f"tar member {name!r} has a NUL byte in its name")
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise UnsafeContent(f"tar member {name!r} has a '..' component")
    return b"/".join(parts)


def _split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, base = path.rpartition(b"/")
    return parent, base


class Extractor:
    """One extraction into ``root_fd`` (an empty directory this process made)."""

    def __init__(self, root_fd: int, result: ExtractResult, is_root: bool, lower=None):
        self.lower = lower                    # a Resolver over the layers below, or None
        self.root_fd = root_fd
        self.r = result
        self.is_root = is_root
        self.opaque_xattr = OPAQUE_XATTRS[0] if is_root else OPAQUE_XATTRS[1]
        self.fds: dict[bytes, int] = {}
        self.seen: set[bytes] = set()         # member paths (duplicates are refused)
        self.linkable: set[bytes] = set()     # non-directories made by members
        self.dirs: dict[bytes, tuple] = {b"": IMPLICIT_DIR}   # deferred dir metadata
        self.implicit: set[bytes] = {b""}
        self.whiteouts: set[bytes] = set()
        self.opaque: set[bytes] = set()
        self.member = b""                     # for error messages
        self.umask = os.umask(0o022)
        os.umask(self.umask)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    # -- directories -------------------------------------------------------
    def dir_fd(self, path: bytes) -> int:
        """The fd of directory ``path``, creating missing parents (D5), never via a symlink."""
        if not path:
            return self.root_fd
        fd = self.fds.get(path)
        if fd is not None:
            return fd
        parent, base = _split(path)
        pfd = self.dir_fd(parent)
        try:
            fd = syscalls.open_dir(base, pfd)
        except FileNotFoundError:
            self._mkdir(pfd, base, path, implicit=True)
            fd = syscalls.open_dir(base, pfd)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            self._replace_non_dir(pfd, base, path)
            fd = syscalls.open_dir(base, pfd)
        if len(self.fds) >= MAX_CACHED_FDS:
            self.close()
        self.fds[path] = fd
        return fd

    def _replace_non_dir(self, pfd: int, base: bytes, path: bytes) -> None:
        """``path`` is needed as a directory but holds something else."""
        st = syscalls.lstat(base, pfd)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeContent(f"tar member {self.member!r} would be written through "
                                f"{path!r}, a symlink in this layer")
        if path not in self.whiteouts:
            raise InvalidLayer(f"tar member {self.member!r} needs {path!r} to be a directory, "
                               "but an earlier member made it something else")
        self._drop_whiteout(pfd, base, path, becomes_dir=True)
        self._mkdir(pfd, base, path, implicit=True)

    def _mkdir(self, pfd: int, base: bytes, path: bytes, implicit: bool) -> None:
        syscalls.mkdir(base, pfd, 0o700)
        self.dirs[path] = IMPLICIT_DIR
        self.r.dirs += 1
        if implicit:
            self.implicit.add(path)

    # -- collisions --------------------------------------------------------
    def _drop_whiteout(self, pfd: int, base: bytes, path: bytes, becomes_dir: bool) -> None:
        """D2: an entry of this layer takes the place of this layer's whiteout."""
        syscalls.unlink(base, pfd)
        self.whiteouts.discard(path)
        self.r.whiteouts -= 1
        if becomes_dir:
            self.opaque.add(path)   # the lower directory must not show through (D7)

    def _make_room(self, pfd: int, base: bytes, path: bytes, becomes_dir: bool) -> None:
        """Called on EEXIST: only a whiteout of this layer may be replaced."""
        if path in self.whiteouts:
            self._drop_whiteout(pfd, base, path, becomes_dir)
            return
        raise InvalidLayer(f"tar member {self.member!r} collides with {path!r}, which earlier "
                           "members needed as a directory")

    def _create(self, path: bytes, make, becomes_dir: bool = False):
        parent, base = _split(path)
        pfd = self.dir_fd(parent)
        try:
            return pfd, base, make(pfd, base)
        except FileExistsError:
            self._make_room(pfd, base, path, becomes_dir)
            return pfd, base, make(pfd, base)

    # -- members -----------------------------------------------------------
    def add(self, m: _tar.Member, reader: _tar.TarReader) -> None:
        self.member = m.name
        path = clean_path(m.name)
        if path.count(b"/") >= MAX_DEPTH:
            raise InvalidLayer(f"tar member {m.name[:80]!r}... is {path.count(b'/') + 1} levels "
                               f"deep; mergefs refuses layers nested deeper than {MAX_DEPTH}")
        if b".wh." in path:
            parent, base = _split(path)
            if b"/.wh." in b"/" + parent:
                raise InvalidLayer(f"tar member {m.name!r}: a whiteout cannot have children")
            if base.startswith(b".wh."):
                self._seen(path)
                return self.whiteout_member(parent, base)
        seen = self.seen
        if path in seen:
            self._seen(path)                  # raises
        seen.add(path)
        typ = m.type
        if not path and typ != _tar.DIR:
            raise InvalidLayer(f"tar member {m.name!r} names the layer root but is not a directory")
        if typ in _tar.FILE_TYPES:
            self.file(path, m, reader)
        elif typ == _tar.DIR:
            self.directory(path, m)
        elif typ == _tar.SYM:
            self.symlink(path, m)
        elif typ == _tar.LNK:
            self.hardlink(path, m)
        elif typ == _tar.CHR and m.devmajor == 0 and m.devminor == 0:
            parent, base = _split(path)
            self.whiteout(parent, base)
        else:
            self.special(path, m)

    def _seen(self, path: bytes) -> None:
        if path in self.seen:
            raise InvalidLayer(f"tar has two entries for {path.decode(errors='replace') or '/'!r} "
                               "(OCI layers must not have duplicate entries)")
        self.seen.add(path)

    def file(self, path: bytes, m: _tar.Member, reader: _tar.TarReader) -> None:
        if m.xattrs and _is_xattr_whiteout(m):
            parent, base = _split(path)
            return self.whiteout(parent, base)
        parent, _, base = path.rpartition(b"/")
        pfd = self.fds.get(parent) if parent else self.root_fd
        if pfd is None:
            pfd = self.dir_fd(parent)
        mode = m.mode & 0o7777
        # Created with its final mode when the umask keeps it, no chown follows
        # and there is no setuid/setgid bit (chown clears them, and so does a
        # write without CAP_FSETID): saves one chmod per file.
        chown = self.is_root and (m.uid or m.gid)
        exact = not chown and mode & (self.umask | 0o6000) == 0
        try:
            fd = syscalls.create_excl(base, pfd, mode if exact else 0o600)
        except FileExistsError:
            self._make_room(pfd, base, path, False)
            fd = syscalls.create_excl(base, pfd, mode if exact else 0o600)
        try:
            if m.size:
                reader.copy_data(fd)
            if chown:
                os.fchown(fd, m.uid, m.gid)
            if not exact:
                os.fchmod(fd, mode)
            if m.xattrs:
                self._xattrs(m.xattrs, path, lambda a, v: os.setxattr(fd, a, v))
            os.utime(fd, ns=(m.mtime_ns if m.atime_ns is None else m.atime_ns, m.mtime_ns))
        finally:
            os.close(fd)
        self.linkable.add(path)
        self.r.files += 1

    def directory(self, path: bytes, m: _tar.Member) -> None:
        if path and path not in self.implicit:
            self._create(path, lambda pfd, base: self._mkdir(pfd, base, path, implicit=False),
                         becomes_dir=True)
        self.implicit.discard(path)
        self.dirs[path] = (m.mode, m.uid, m.gid, m.xattrs, m.atime_ns, m.mtime_ns)
        if any(m.xattrs.get(a) == b"y" for a in OPAQUE_XATTRS):
            self.opaque.add(path)                 # an overlay-format opaque directory

    def symlink(self, path: bytes, m: _tar.Member) -> None:
        if not m.linkname:
            raise InvalidLayer(f"tar member {m.name!r} is a symlink with an empty target")
        pfd, base, _ = self._create(path, lambda pfd, base: syscalls.symlink(m.linkname, base, pfd))
        self._meta_at(pfd, base, None, m, path)
        self.linkable.add(path)
        self.r.symlinks += 1

    def hardlink(self, path: bytes, m: _tar.Member) -> None:
        target = clean_path(m.linkname)
        if target not in self.linkable:
            raise UnsafeContent(f"tar member {m.name!r} is a hardlink to {m.linkname!r}, which is "
                                "not an earlier non-directory member of this layer")
        tparent, tbase = _split(target)
        tfd = os.dup(self.dir_fd(tparent))     # dir_fd(parent) below may evict the cache
        try:
            self._create(path, lambda pfd, base: syscalls.link(tbase, base, tfd, pfd))
        finally:
            os.close(tfd)
        self.linkable.add(path)
        self.r.hardlinks += 1

    def special(self, path: bytes, m: _tar.Member) -> None:
        kind = {_tar.FIFO: stat.S_IFIFO, _tar.CHR: stat.S_IFCHR, _tar.BLK: stat.S_IFBLK}[m.type]
        if kind != stat.S_IFIFO and not self.is_root:
            raise UnsafeContent(f"tar member {m.name!r} is a device node; only root may import it")
        rdev = os.makedev(m.devmajor, m.devminor)
        pfd, base, _ = self._create(path, lambda pfd, base: syscalls.mknod(base, kind | 0o600, rdev, pfd))
        self._meta_at(pfd, base, m.mode & 0o7777, m, path)
        self.linkable.add(path)
        self.r.specials += 1

    # -- deletions ---------------------------------------------------------
    def _whiteout_parent(self, parent: bytes) -> int | None:
        """The directory a whiteout goes in; None when this layer has a non-directory
        on the way (umoci writes ``f`` then ``f/.wh.child``): that entry replaces the
        whole lower subtree already (M2), so the whiteout has nothing to do."""
        try:
            return self.dir_fd(parent)
        except (UnsafeContent, InvalidLayer):
            self.r.skipped += 1
            return None

    def whiteout_member(self, parent: bytes, base: bytes) -> None:
        if base == b".wh..wh..opq":
            if self._whiteout_parent(parent) is not None:
                self.opaque.add(parent)
            return
        if base.startswith(b".wh..wh."):
            self.r.skipped += 1           # aufs metadata (.wh..wh.plnk, .wh..wh.aufs)
            return
        name = base[4:]
        if name in (b"", b".", b".."):
            raise UnsafeContent(f"tar member {self.member!r} is a whiteout of {name!r}")
        self.whiteout(parent, name)

    def whiteout(self, parent: bytes, name: bytes) -> None:
        """Hide ``parent/name`` of lower layers (D1), unless this layer has it (D2)."""
        path = parent + b"/" + name if parent else name
        pfd = self._whiteout_parent(parent)
        if pfd is None or path in self.whiteouts:
            return
        if path in self.linkable or path in self.dirs:
            if path in self.dirs:
                self.opaque.add(path)    # D2 + D7: this layer's dir replaces the lower one
            return
        syscalls.mknod(name, stat.S_IFCHR, 0, pfd)
        syscalls.utime_ns(name, 0, 0, pfd)        # deterministic: the same tar, the same tree
        self.whiteouts.add(path)
        self.r.whiteouts += 1

    # -- metadata (A1: chown -> chmod -> xattrs -> times) --------------------
    def _xattrs(self, xattrs: dict, path: bytes, setter) -> None:
        for attr, value in xattrs.items():
            if is_overlay_private(attr):
                if not (attr in OPAQUE_XATTRS and value == b"y"):
                    self.r.skipped += 1           # redirect, origin...: meaningless here
                continue
            try:
                setter(attr, value)
            except OSError as e:
                if e.errno in (errno.E2BIG, errno.ERANGE) or not attr \
                        or e.errno == errno.EINVAL and "." not in attr:
                    # the member's own fault (a 200 KB value, an empty or bare name):
                    # say which member, not the fd the kernel refused
                    raise InvalidLayer(f"tar member {self.member!r}: xattr {attr!r} "
                                       f"({len(value)} bytes) cannot be set: "
                                       f"{e.strerror}") from None
                if e.errno not in XATTR_REFUSED:
                    raise
                self.r.warnings.append(f"{path.decode(errors='replace')}: xattr {attr} "
                                       f"not set: {e.strerror}")

    def _meta_fd(self, fd, mode, uid, gid, xattrs, atime_ns, mtime_ns, path) -> None:
        if self.is_root and (uid or gid):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode & 0o7777)
        if xattrs:
            self._xattrs(xattrs, path, lambda a, v: os.setxattr(fd, a, v))
        os.utime(fd, ns=(mtime_ns if atime_ns is None else atime_ns, mtime_ns))

    def _meta_at(self, pfd: int, base: bytes, mode: int | None, m: _tar.Member, path) -> None:
        if self.is_root and (m.uid or m.gid):
            syscalls.lchown(base, m.uid, m.gid, pfd)
        if mode is not None:
            syscalls.chmod(base, mode, pfd)
        if m.xattrs:
            self._xattrs(m.xattrs, path, lambda a, v: syscalls.setxattr(pfd, base, a, v))
        syscalls.utime_ns(base, m.mtime_ns if m.atime_ns is None else m.atime_ns,
                          m.mtime_ns, pfd)

    # -- the end -----------------------------------------------------------
    def finish(self) -> None:
        self.close()
        self._drop_whiteouts_below_opaque()
        self.r.opaque_dirs = len(self.opaque)
        self.r.implicit_dirs = sorted(self.implicit)
        if self.lower is not None:
            self._inherit()
        # Deepest first: a directory's times are set after everything inside it.
        for path in sorted(self.dirs, key=lambda p: p.count(b"/") + bool(p), reverse=True):
            fd = self.root_fd if not path else syscalls.open_beneath(self.root_fd, path)
            try:
                mode, uid, gid, xattrs, atime_ns, mtime_ns = self.dirs[path]
                if path in self.opaque:
                    os.setxattr(fd, self.opaque_xattr, b"y")
                self._meta_fd(fd, mode, uid, gid, xattrs, atime_ns, mtime_ns, path)
            finally:
                if path:
                    os.close(fd)

    def _inherit(self) -> None:
        """Implicit directories take the lower merged directory's attributes (OCI)."""
        for path in self.r.implicit_dirs:
            node = self.lower.lookup(path)
            if node is None or node.kind != DIR:
                continue
            layer = self.lower.layers[node.top]
            fd = os.dup(layer.fd) if not path else syscalls.open_beneath(layer.fd, path)
            try:
                st = os.fstat(fd)
                xattrs = content_xattrs(fd, b"")
            finally:
                os.close(fd)
            self.dirs[path] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs,
                               None, st.st_mtime_ns)
            self.r.inherited.append(path)

    def _drop_whiteouts_below_opaque(self) -> None:
        """D6: an opaque directory already hides every lower child; no whiteout below it."""
        if not self.opaque:
            return
        for path in sorted(self.whiteouts):
            parent = _split(path)[0]
            while True:
                if parent in self.opaque:
                    pparent, base = _split(path)
                    fd = syscalls.open_beneath(self.root_fd, pparent)
                    try:
                        syscalls.unlink(base, fd)
                    finally:
                        os.close(fd)
                    self.whiteouts.discard(path)
                    self.r.whiteouts -= 1
                    break
                if not parent:
                    break
                parent = _split(parent)[0]


def _is_xattr_whiteout(m: _tar.Member) -> bool:
    """An overlay "xattr whiteout" (Linux 6.7): an empty file with overlay.whiteout."""
    return m.size == 0 and any(a in m.xattrs for a in XWHITEOUT_XATTRS)


def _remove_tree(path: bytes) -> None:
    def onerror(func, p, exc):
        # Without root a directory we already made read-only must be opened up first.
        parent = os.path.dirname(p)
        os.chmod(parent, 0o700)
        func(p)
    shutil.rmtree(path, onerror=onerror)


def extract_layer(source, dest, *, expected_diff_id: str | None = None,
                  is_root: bool | None = None, lower=None) -> ExtractResult:
    """Extract a layer tar (plain, gzip or zstd; path or binary file) into ``dest``.

    ``dest`` must not exist; it is created, and on any error removed again, so
    a failed extraction leaves nothing behind. The caller publishes ``dest``
    (rename) when this returns. ``expected_diff_id`` (e.g. from an image
    config) is checked after the whole stream was read. ``lower`` (layers or
    paths, bottom first): the layers this one goes on, whose directories give
    their attributes to the directories the tar does not name (see above).
    """
    dest = os.fsencode(dest)
    if is_root is None:
        is_root = os.geteuid() == 0
    if os.path.lexists(dest):
        raise AlreadyExists(f"{os.fsdecode(dest)} already exists")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise NotFound(f"parent directory {os.fsdecode(parent)} does not exist")
    own = not hasattr(source, "read")
    raw = open(source, "rb") if own else source
    try:
        os.mkdir(dest, 0o700)
        try:
            return _extract_into(raw, dest, expected_diff_id, is_root, lower)
        except BaseException:
            _remove_tree(dest)
            raise
    finally:
        if own:
            raw.close()


def _extract_into(raw, dest: bytes, expected_diff_id: str | None, is_root: bool,
                  lower) -> ExtractResult:
    from ..resolver import Resolver
    resolver = Resolver(lower) if lower else None
    stream = open_tar_stream(raw)
    result = ExtractResult("", stream.compression, 0)
    root_fd = os.open(dest, syscalls.O_DIR)
    ex = Extractor(root_fd, result, is_root, resolver)
    try:
        reader = _tar.TarReader(stream)
        for member in reader:
            ex.add(member, reader)
        stream.drain()
        ex.finish()
    finally:
        stream.close()
        ex.close()
        os.close(root_fd)
        if resolver is not None:
            resolver.close()
    result.diff_id, result.tar_size = stream.diff_id, stream.size
    if expected_diff_id is not None and expected_diff_id != result.diff_id:
        raise InvalidLayer(f"layer diffID is {result.diff_id}, the image says {expected_diff_id}")
    if not is_root:
        result.warnings.append("not root: owners were not preserved")
    return result
