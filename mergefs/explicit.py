"""Rewrite an overlay-format upper in place so that it states every deletion (D4, D6, A3).

A writable mount's upper (kernel overlayfs or mergefs's own) records deletions
the overlay way: a char 0/0 whiteout per deleted name, and an opaque directory
(``trusted.overlay.opaque=y``) where a directory was deleted and made again.
A layer mergefs generates says every deletion explicitly (D4).
``make_explicit(upper, lowers)`` walks the upper once, against the merged
lowers it was written over, and

* turns an opaque directory into a plain one plus one whiteout for each name
  the lowers hold there and the upper does not; below it, every directory the
  lowers also hold as a directory gets the same treatment (the opaque
  directory started fresh, so nothing of the lowers may show through beneath);
* removes whiteouts that hide nothing (D6);
* removes overlay-private xattrs (``origin``, ``impure``, ``uuid`` ...: format
  of one mount, not content, A3), keeping the format mark of a layer root;
* keeps each directory's mtime (content, F2): adding or removing a whiteout
  would touch it.

Afterwards ``Merge(lowers, upper)`` is what it was. Copy-ups of unchanged
entries stay (a diff would drop them; a commit keeps what the upper holds).
Redirected directories (a rename on a mount with ``redirect_dir=on``, or on
any writable mergefs mount, R1) are resolved first (``flatten_redirects``:
they become opaque and hold their merged subtree, R2). Uppers this cannot
rewrite raise ``NotRewritable`` (what was rewritten before keeps its
meaning, so the caller may fall back to another way): metacopy xattrs
(kernel overlayfs with ``metacopy`` on) and xattr whiteouts. Nothing is followed
through a symlink: every directory is opened below its parent's fd.
"""
from __future__ import annotations

import os
import stat
from typing import Iterator, NamedTuple, Sequence

from . import syscalls
from .layer import DIR, FORMAT_MARKS, OVERLAY_PREFIXES, XWHITEOUTS_XATTRS, Layer, read_layer_dir
from .resolver import Node, Resolver, join

# xattrs that change what the overlay shows: an upper holding them is not rewritten here
_MEANINGFUL = tuple(p + n for p in OVERLAY_PREFIXES for n in ("redirect", "metacopy"))


class NotRewritable(Exception):
    """The upper uses an overlay feature ``make_explicit`` does not rewrite."""


def make_explicit(upper: str | os.PathLike, lowers: Sequence[Layer | str]) -> None:
    """Rewrite ``upper`` (an overlay-format directory) as described in the module doc."""
    from .union.flatten import flatten_redirects
    flatten_redirects(lowers, upper)
    fd = os.open(upper, syscalls.O_DIR)
    res = Resolver(lowers) if lowers else None
    try:
        _Rewriter(res).dir(fd, b"", res.root if res else None, fresh=False, root=True)
    finally:
        os.close(fd)
        if res is not None:
            res.close()


class _Frame(NamedTuple):
    """One directory being rewritten: its children still to visit, and what to do after."""
    fd: int
    own: bool               # opened here (closed on leaving); the root's fd is the caller's
    path: bytes
    st: os.stat_result      # its times before any change (kept: F2)
    entries: Iterator
    listing: dict           # the lowers' merged children here
    fresh: bool
    changed: bool


class _Rewriter:
    def __init__(self, res: Resolver | None):
        self.res = res

    def dir(self, fd: int, path: bytes, below: Node | None, fresh: bool, root: bool = False) -> None:
        """Rewrite the open directory ``fd`` at ``path`` and everything below it, without
        recursion (an upper may be thousands of directories deep): one frame per level."""
        stack = [self._enter(fd, False, path, below, fresh, root)]
        try:
            while stack:
                f = stack[-1]
                item = next(f.entries, None)
                if item is None:
                    stack.pop()
                    self._leave(f)
                    continue
                name, entry = item
                if entry.kind != DIR:
                    for attr in _private_xattrs(f.fd, name):
                        syscalls.removexattr(f.fd, name, attr)
                    continue
                node = f.listing.get(name)
                sub = syscalls.open_dir(name, f.fd)
                try:
                    stack.append(self._enter(sub, True, join(f.path, name),
                                             node if node and node.kind == DIR else None, f.fresh))
                except BaseException:
                    os.close(sub)
                    raise
        finally:
            for f in stack:
                if f.own:
                    os.close(f.fd)

    def _enter(self, fd: int, own: bool, path: bytes, below: Node | None, fresh: bool,
               root: bool = False) -> _Frame:
        """The directory's own rewrite; ``below``: the lowers' merged directory there (None:
        they hold none); ``fresh``: an ancestor was opaque."""
        st = os.fstat(fd)
        attrs = _private_xattrs(fd, b"")
        if any(a in XWHITEOUTS_XATTRS for a in attrs):
            raise NotRewritable(f"{path.decode(errors='replace') or '/'}: xattr whiteouts")
        ld = read_layer_dir(fd, "overlay")
        fresh = fresh or ld.opaque
        subdirs = [n for n, e in ld.entries.items() if e.kind == DIR]
        listing = {}
        if below is not None and (fresh or ld.whiteouts or subdirs):
            listing = self.res.listdir(path, below)
        changed = False
        for name in ld.whiteouts:
            if name not in listing:              # hides nothing (D6)
                syscalls.unlink(name, fd)
                changed = True
        if fresh:
            for name in listing:
                if name not in ld.entries and name not in ld.whiteouts:
                    syscalls.mknod(name, stat.S_IFCHR, 0, fd)
                    changed = True
        for attr in attrs:
            if not (root and attr in FORMAT_MARKS):
                syscalls.removexattr(fd, b"", attr)
        return _Frame(fd, own, path, st, iter(list(ld.entries.items())), listing, fresh, changed)

    @staticmethod
    def _leave(f: _Frame) -> None:
        """After the children: the directory's times as they were (F2)."""
        try:
            if f.changed:
                syscalls.utime_ns(b"", f.st.st_atime_ns, f.st.st_mtime_ns, f.fd)
        finally:
            if f.own:
                os.close(f.fd)


def _private_xattrs(fd: int, name: bytes) -> list[str]:
    """The overlay-private xattrs of an entry; NotRewritable if one changes what it shows."""
    attrs = [a for a in syscalls.listxattr(fd, name) if a.startswith(OVERLAY_PREFIXES)]
    for a in attrs:
        if a in _MEANINGFUL:
            raise NotRewritable(f"{name.decode(errors='replace')}: {a}")
    return attrs
