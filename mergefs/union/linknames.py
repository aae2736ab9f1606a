"""Every name one layer gives an inode: what a copy-up of a hardlinked lower file links.

Kernel overlayfs with ``index=on`` keeps the names of a lower hardlink one inode
after a copy-up through any of them (it finds the copy again through its index
when another name is looked up). A writable view does it on disk instead, at the
copy-up: every name the merged view shows for the lower file becomes a link to
the one upper copy (``WritableView.ensure_upper``), so kernel overlayfs without
an index reads the same upper the same way (U4). This module finds those names.

A layer is read once, at the first copy-up of one of its hardlinked files
whose names the kernel does not all know (``WritableView._copied_up``), and
only its groups of two or more names are kept (layers never change). A name
below a directory renamed in the upper (a redirect, R1) shows at another
path: ``moved_dirs`` reads the upper's redirects (when a name is not found at
its own path) and ``moved_path`` maps a layer path through them.
"""
from __future__ import annotations

import os

from .. import syscalls
from ..resolver import join, redirect_value
from .fastpath import compiled


class LinkNames:
    """Per layer: inode number -> its paths in that layer (only inodes with 2+ names)."""

    def __init__(self) -> None:
        self._groups: dict[int, dict[int, tuple[bytes, ...]]] = {}

    def names(self, index: int, layer_fd: int, ino: int) -> tuple[bytes, ...]:
        """The paths (relative to the layer's root) that name inode ``ino`` in layer
        ``index``, whose root is open as ``layer_fd``."""
        groups = self._groups.get(index)
        if groups is None:
            groups = self._groups[index] = scan(layer_fd)
        return groups.get(ino, ())


def scan(layer_fd: int) -> dict[int, tuple[bytes, ...]]:
    """Every name group of the layer: the C fast path's walk (``layer_links``: no
    Python object per entry, ~10x faster), or ``_scan_python`` without it or
    where it fails (it holds an fd per level of depth: EMFILE in a very deep
    layer; a real error, EACCES ..., the Python walk meets again and raises)."""
    fast = compiled("layer_links")          # None without a module built from these sources
    if fast is not None:
        try:
            return fast(layer_fd)
        except OSError:
            pass
    return _scan_python(layer_fd)


def _scan_python(layer_fd: int) -> dict[int, tuple[bytes, ...]]:
    """Every non-directory's inode number from the layer's getdents. Directories are
    listed by path below /proc/self/fd/LAYER_FD (opendir: open, getdents, close;
    an fd-based scandir dups and rewinds each one too, ~4 syscalls a directory
    more); a layer never changes, so the paths name what the listing saw."""
    seen: dict[int, bytes] = {}            # ino -> its first name
    more: dict[int, list] = {}             # ino -> its other names
    root = b"/proc/self/fd/%d" % layer_fd
    stack = [b""]
    while stack:
        parent = stack.pop()
        prefix = parent + b"/" if parent else b""
        with os.scandir(root + b"/" + parent if parent else root) as it:
            for de in it:
                if de.is_dir(follow_symlinks=False):       # A4: never hardlinked
                    stack.append(prefix + de.name)
                    continue
                ino = de.inode()
                if ino in seen:
                    more.setdefault(ino, []).append(prefix + de.name)
                else:
                    seen[ino] = prefix + de.name
    return {ino: (seen[ino], *names) for ino, names in more.items()}


def moved_dirs(upper_fd: int, attr: str) -> list[tuple[bytes, bytes]]:
    """(path in the layers below, path in the view) of every directory of the upper
    whose xattr ``attr`` redirects it, the longest first. A relative redirect is a
    name beside the parent's own path below (itself maybe redirected)."""
    below: dict[bytes, bytes] = {}          # view path -> path below
    for parent, fd, de in syscalls.scan_tree_paths(upper_fd):    # parents first
        if not de.is_dir(follow_symlinks=False):
            continue
        name = os.fsencode(de.name)
        value = redirect_value(syscalls.getxattr(fd, name, attr))
        if value is not None:
            below[join(parent, name)] = value[1:] if value.startswith(b"/") else \
                join(_mapped(parent, below.items()) or parent, value)
    return sorted(((src, view) for view, src in below.items()), key=lambda m: -len(m[0]))


def moved_path(path: bytes, moves: list[tuple[bytes, bytes]]) -> bytes | None:
    """``path`` (in a layer below) where the view shows it after the moves
    (``moved_dirs``), or None if no move covers it."""
    return _mapped(path, moves)


def _mapped(path: bytes, pairs) -> bytes | None:
    """``path`` with its longest prefix ``a`` of the (a, b) pairs replaced by b."""
    best = None
    for a, b in pairs:
        if (path == a or path.startswith(a + b"/")) and (best is None or len(a) > len(best[0])):
            best = (a, b)
    return None if best is None else best[1] + path[len(best[0]):]
