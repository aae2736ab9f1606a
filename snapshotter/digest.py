"""Snapshot ids: content digests, so one merge has one id on every machine.

* **layer imported from a tar**: the OCI diffID, ``sha256`` of the
  uncompressed tar (computed by ``mergefs.oci``).
* **layer imported from a directory, or made by commit**: the *tree digest*
  ``mergefs-tree-v1`` below. It depends only on what the layer means, not on
  how it is encoded: OCI ``.wh.`` files and overlay char 0/0 whiteouts of the
  same deletion give the same digest, and so do the trusted/user opaque xattrs.
* **merge**: ``sha256("mergefs-merge-v1\\n" + flattened input ids, one per
  line)``. Nested merges are flattened first (M4), so
  ``Merge(Merge(A,B),C)`` and ``Merge(A,B,C)`` are one snapshot. How a merge is
  served (farm or union) is not part of its id: it is the same content.
* **diff**: ``sha256("mergefs-diff-v1\\n" + lower ids + "--\\n" + upper ids)``:
  known before anything is built, so a repeated diff is found without work.
* **active / view**: ``sha256("mergefs-key-v1\\n" + key)``: named by their key.

mergefs-tree-v1: the layer is walked depth first, children of a directory in
bytewise name order, the root first. Each entry gives one record, a sequence
of netstring fields ``<len>:<bytes>,``:
``path kind mode uid gid mtime_ns detail xattrs``
where ``kind`` is dir/file/symlink/char/block/fifo/socket/whiteout/hardlink,
``detail`` is ``sha256(content)`` and size for files, the target for symlinks,
``major,minor`` for devices, ``opaque`` or empty for directories, and the first
path of the inode for a later name of a hardlinked file (``hardlink``).
``xattrs`` are the content xattrs (overlay-private ones excluded, A3), sorted,
as ``name=value`` netstrings. Whiteouts carry only path and kind. The digest is
``sha256`` over all records.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import Iterable, NamedTuple

from mergefs import syscalls
from mergefs.layer import (BLK, CHR, DIR, FIFO, LNK, REG, SOCK, Layer, content_xattrs,
                           is_overlay_private, read_layer_dir)

PREFIX = "sha256:"
KINDS = {DIR: b"dir", REG: b"file", LNK: b"symlink", CHR: b"char", BLK: b"block",
         FIFO: b"fifo", SOCK: b"socket"}
CHUNK = 1 << 20


def sha256_id(data: bytes) -> str:
    return PREFIX + hashlib.sha256(data).hexdigest()


def merge_id(flat_ids: Iterable[str]) -> str:
    return sha256_id(b"mergefs-merge-v1\n" + b"".join(i.encode() + b"\n" for i in flat_ids))


def diff_id(lower_ids: Iterable[str], upper_ids: Iterable[str]) -> str:
    body = b"".join(i.encode() + b"\n" for i in lower_ids) + b"--\n" + \
        b"".join(i.encode() + b"\n" for i in upper_ids)
    return sha256_id(b"mergefs-diff-v1\n" + body)


def key_id(key: str) -> str:
    return sha256_id(b"mergefs-key-v1\n" + key.encode())


def hexpart(snapshot_id: str) -> str:
    return snapshot_id.split(":", 1)[-1]


def _ns(*fields: bytes) -> bytes:
    return b"".join(b"%d:%s," % (len(f), f) for f in fields)


def _fd_xattrs(fd: int) -> dict[str, bytes]:
    """Content xattrs of an open file or directory (flistxattr: no path lookup)."""
    out = {}
    for attr in os.listxattr(fd):
        if not is_overlay_private(attr):
            try:
                out[attr] = os.getxattr(fd, attr)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
    return out


def _file_digest(dir_fd: int, name: bytes) -> tuple[bytes, dict[str, bytes]]:
    """(sha256 hex of the content, content xattrs) of a regular file, from one open."""
    h = hashlib.sha256()
    fd = os.open(name, syscalls.O_READ, dir_fd=dir_fd)
    try:
        xattrs = _fd_xattrs(fd)
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest().encode(), xattrs


class TreeSummary(NamedTuple):
    digest: str
    entries: int      # names in the layer, whiteouts included
    bytes: int        # apparent size of regular files (each inode once)


class _Walker:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.seen: dict[tuple[int, int], bytes] = {}
        self.entries = 0
        self.bytes = 0

    def record(self, dir_fd: int, path: bytes, name: bytes, kind: int, opaque: bool) -> None:
        st = os.fstat(dir_fd) if not name else syscalls.lstat(name, dir_fd)
        kname, detail, xattrs = KINDS[kind], b"", None
        if kind == DIR:
            detail = b"opaque" if opaque else b""
            xattrs = _fd_xattrs(dir_fd)          # name is b"": dir_fd is the directory
        elif kind == REG and st.st_nlink > 1 and (st.st_dev, st.st_ino) in self.seen:
            kname, detail = b"hardlink", self.seen[(st.st_dev, st.st_ino)]
        elif kind == REG:
            digest, xattrs = _file_digest(dir_fd, name)
            detail = digest + b" %d" % st.st_size
            self.bytes += st.st_size
            if st.st_nlink > 1:
                self.seen[(st.st_dev, st.st_ino)] = path
        elif kind == LNK:
            detail = syscalls.readlink(name, dir_fd)
        elif kind in (CHR, BLK):
            detail = b"%d,%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))
        if xattrs is None:
            xattrs = content_xattrs(dir_fd, name)
        xa = b"".join(_ns(os.fsencode(a) + b"=" + v) for a, v in sorted(xattrs.items()))
        self.h.update(_ns(path, kname, b"%o" % stat.S_IMODE(st.st_mode), b"%d" % st.st_uid,
                          b"%d" % st.st_gid, b"%d" % st.st_mtime_ns, detail, xa))
        self.entries += 1

    def walk(self, root_fd: int, ld) -> None:
        """Records below the open root, depth first in name order, without recursion
        (a layer may be thousands of directories deep): one open fd per level."""
        stack = [(os.dup(root_fd), b"", iter(sorted(set(ld.entries) | ld.whiteouts)), ld)]
        try:
            while stack:
                dir_fd, path, names, ld = stack[-1]
                name = next(names, None)
                if name is None:
                    os.close(stack.pop()[0])
                    continue
                child = self.visit(dir_fd, path, name, ld)
                if child is not None:
                    stack.append(child)
        finally:
            for frame in stack:
                os.close(frame[0])

    def visit(self, dir_fd: int, path: bytes, name: bytes, ld):
        """Record one name; for a directory, the frame to walk next."""
        sub = path + b"/" + name if path else name
        entry = ld.entries.get(name)
        if entry is None:
            self.h.update(_ns(sub, b"whiteout"))
            self.entries += 1
            return None
        if entry.kind != DIR:
            self.record(dir_fd, sub, name, entry.kind, False)
            return None
        fd = syscalls.open_dir(name, dir_fd)
        try:
            sub_ld = read_layer_dir(fd, "overlay")
            self.record(fd, sub, b"", DIR, sub_ld.opaque)
        except BaseException:
            os.close(fd)
            raise
        return fd, sub, iter(sorted(set(sub_ld.entries) | sub_ld.whiteouts)), sub_ld


def tree_digest(path: str | bytes | os.PathLike) -> TreeSummary:
    """mergefs-tree-v1 of the layer directory at ``path``, a store layer: always read as
    overlay format (a regular file named ``.wh.x`` is a file, issue 11 item 1)."""
    with Layer(path) as layer:
        w = _Walker()
        ld = read_layer_dir(layer.fd, "overlay")
        w.record(layer.fd, b"", b"", DIR, ld.opaque)
        w.walk(layer.fd, ld)
    return TreeSummary(PREFIX + w.h.hexdigest(), w.entries, w.bytes)
