"""Comparable snapshots of trees: a real directory (farm, mount, layer) or the model.

A view maps each relative path (bytes, b"" is the root) to an ``Attrs``
tuple; ``groups`` are the hardlink groups (sets of paths that are one inode).
Compared: type, mode, uid, gid, size (not for directories: it is the
filesystem's), nanosecond mtime, rdev, symlink target, content, and xattrs
other than overlay-private ones. Not compared: atime, ctime, nlink, st_ino.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from typing import NamedTuple

from ..layer import is_overlay_private
from .builders import Spec


class Attrs(NamedTuple):
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    target: bytes
    content: str
    xattrs: tuple


@dataclass
class View:
    entries: dict[bytes, Attrs]
    groups: frozenset

    def diff(self, other: "View", limit: int = 20) -> list[str]:
        """Human-readable differences (empty when equal)."""
        out = []
        for p in sorted(self.entries.keys() | other.entries.keys()):
            a, b = self.entries.get(p), other.entries.get(p)
            if a != b:
                out.append(f"{p!r}: {_fmt(a)} != {_fmt(b)}")
        if self.groups != other.groups:
            out.append(f"hardlink groups: {sorted(map(sorted, self.groups))} != "
                       f"{sorted(map(sorted, other.groups))}")
        return out[:limit]


def _fmt(a: Attrs | None) -> str:
    if a is None:
        return "absent"
    return (f"{a.kind} mode={oct(a.mode)} {a.uid}:{a.gid} size={a.size} mtime={a.mtime_ns} "
            f"rdev={a.rdev} target={a.target!r} content={a.content[:8]} xattrs={a.xattrs}")


_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFCHR: "char", stat.S_IFBLK: "block",
          stat.S_IFSOCK: "socket"}


def _xattrs(path: bytes, private: bool = False) -> tuple:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                        for n in names if private or not is_overlay_private(n)))


def _sha(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def capture(root: str | os.PathLike, private_xattrs: bool = False) -> View:
    """Walk ``root`` without following symlinks and snapshot every entry."""
    root = os.fsencode(root)
    entries: dict[bytes, Attrs] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            # Kernel overlayfs lists a lower whiteout that has nothing below it
            # (a D6 violation) in a non-merged dir, then cannot look it up.
            continue
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        entries[rel] = Attrs(
            kind, st.st_mode, st.st_uid, st.st_gid, 0 if kind == "dir" else st.st_size,
            st.st_mtime_ns, st.st_rdev if kind in ("char", "block") else 0,
            os.readlink(full) if kind == "symlink" else b"",
            _sha(full) if kind == "file" else "", _xattrs(full, private_xattrs))
        if kind == "dir":
            stack.extend(os.path.join(rel, n) if rel else n for n in os.listdir(full))
        else:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return View(entries, _groups(inodes.values()))


def _groups(lists) -> frozenset:
    return frozenset(frozenset(ps) for ps in lists if len(ps) > 1)


_SPEC_MODE = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
              "fifo": stat.S_IFIFO, "char": stat.S_IFCHR, "block": stat.S_IFBLK,
              "socket": stat.S_IFSOCK}


def spec_attrs(e: Spec) -> Attrs:
    kind = e.kind
    return Attrs(kind, _SPEC_MODE[kind] | (0o777 if kind == "symlink" else e.mode), e.uid, e.gid,
                 len(e.data) if kind == "file" else (len(e.target) if kind == "symlink" else 0),
                 e.mtime_ns, os.makedev(*e.rdev) if kind in ("char", "block") else 0,
                 e.target if kind == "symlink" else b"",
                 hashlib.sha256(e.data).hexdigest() if kind == "file" else "",
                 tuple(sorted(e.xattrs.items())))


def model_view(state: dict) -> View:
    """The View of a ``model.merge`` result."""
    entries = {p: spec_attrs(m.spec) for p, m in state.items()}
    groups: dict = {}
    for p, m in state.items():
        if m.group is not None:
            groups.setdefault(m.group, []).append(p)
    return View(entries, _groups(groups.values()))


def assert_same(actual: View, expected: View, what: str = "trees") -> None:
    problems = actual.diff(expected)
    assert not problems, f"{what} differ:\n  " + "\n  ".join(problems)


def fingerprint(root: str | os.PathLike) -> str:
    """A digest of a tree's content and metadata (overlay xattrs included), for
    "nothing mergefs does modifies a layer"; nlink, atime and ctime excluded."""
    view = capture(root, private_xattrs=True)
    h = hashlib.sha256()
    for p in sorted(view.entries):
        h.update(p + b"\0" + repr(tuple(view.entries[p])).encode() + b"\n")
    h.update(repr(sorted(map(sorted, view.groups))).encode())
    return h.hexdigest()
