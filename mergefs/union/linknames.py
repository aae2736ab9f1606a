"""Every name one layer gives an inode: what a copy-up of a hardlinked lower file links.

Kernel overlayfs with ``index=on`` keeps the names of a lower hardlink one inode
after a copy-up through any of them (it finds the copy again through its index
when another name is looked up). A writable view does it on disk instead, at the
copy-up: every name the merged view shows for the lower file becomes a link to
the one upper copy (``WritableView.ensure_upper``), so kernel overlayfs without
an index reads the same upper the same way (U4). This module finds those names.

A layer is read once, at the first copy-up of one of its hardlinked files, and
only its groups of two or more names are kept (layers never change).
"""
from __future__ import annotations

import os

from .. import syscalls


class LinkNames:
    """Per layer: inode number -> its paths in that layer (only inodes with 2+ names)."""

    def __init__(self) -> None:
        self._groups: dict[int, dict[int, tuple[bytes, ...]]] = {}

    def names(self, index: int, layer_fd: int, ino: int) -> tuple[bytes, ...]:
        """The paths (relative to the layer's root) that name inode ``ino`` in layer
        ``index``, whose root is open as ``layer_fd``."""
        groups = self._groups.get(index)
        if groups is None:
            groups = self._groups[index] = _scan(layer_fd)
        return groups.get(ino, ())


def _scan(layer_fd: int) -> dict[int, tuple[bytes, ...]]:
    seen: dict[int, tuple] = {}            # ino -> (parent, name) of its first name
    more: dict[int, list] = {}             # ino -> its other names
    for parent, de in syscalls.scan_tree_paths(layer_fd):
        if de.is_dir(follow_symlinks=False):
            continue                       # A4: never hardlinked
        ino = de.inode()
        if ino not in seen:
            seen[ino] = (parent, de.name)
        else:
            more.setdefault(ino, []).append((parent, de.name))
    return {ino: tuple(_path(p, n) for p, n in [seen[ino]] + names)
            for ino, names in more.items()}


def _path(parent: bytes, name: str) -> bytes:
    return parent + b"/" + os.fsencode(name) if parent else os.fsencode(name)
