"""Declarative layer fixtures: describe a layer, then materialise it on disk.

    base = LayerSpec().file("etc/passwd", b"root:x:0:0").dir("var/log", mode=0o750)
    top = LayerSpec().whiteout("etc/passwd").opaque_dir("var")
    paths = materialise_stack([base, top], tmp_path, fmt="oci")

Parents of an entry are created implicitly (mode 0755, owner 0:0, the default
mtime) unless the spec names them. Both formats encode the same meaning, so a
spec stack can be merged by mergefs in one format and by kernel overlayfs in
the other.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

DEFAULT_MTIME_NS = 1_600_000_000_123_456_789


def _p(path: str | bytes) -> bytes:
    return os.fsencode(path).strip(b"/")


@dataclass
class Spec:
    """One entry of a layer spec."""
    kind: str                    # file dir symlink hardlink fifo char block socket whiteout
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = DEFAULT_MTIME_NS
    data: bytes = b""
    target: bytes = b""          # symlink target, or hardlink target path
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict = field(default_factory=dict)
    opaque: bool = False
    implicit: bool = False


ROOT = Spec("dir", mode=0o755)


class LayerSpec:
    """An ordered description of one layer's entries."""

    def __init__(self) -> None:
        self.entries: dict[bytes, Spec] = {}
        self.whiteouts: set[bytes] = set()

    def _put(self, path, spec: Spec) -> "LayerSpec":
        path = _p(path)
        parts = path.split(b"/")
        for i in range(1, len(parts)):
            parent = b"/".join(parts[:i])
            cur = self.entries.get(parent)
            if cur is None:
                self.entries[parent] = Spec("dir", mode=0o755, implicit=True)
            elif cur.kind != "dir":
                raise ValueError(f"{parent!r} is a {cur.kind} in this layer, not a directory")
        self.entries[path] = spec
        return self

    def file(self, path, data: bytes = b"", mode=0o644, uid=0, gid=0,
             mtime_ns=DEFAULT_MTIME_NS, xattrs=None) -> "LayerSpec":
        return self._put(path, Spec("file", mode, uid, gid, mtime_ns, data, xattrs=xattrs or {}))

    def dir(self, path, mode=0o755, uid=0, gid=0, mtime_ns=DEFAULT_MTIME_NS, xattrs=None,
            opaque=False) -> "LayerSpec":
        return self._put(path, Spec("dir", mode, uid, gid, mtime_ns, xattrs=xattrs or {},
                                    opaque=opaque))

    def opaque_dir(self, path, **kw) -> "LayerSpec":
        return self.dir(path, opaque=True, **kw)

    def symlink(self, path, target, uid=0, gid=0, mtime_ns=DEFAULT_MTIME_NS) -> "LayerSpec":
        return self._put(path, Spec("symlink", 0o777, uid, gid, mtime_ns, target=_t(target)))

    def hardlink(self, path, existing) -> "LayerSpec":
        """Another name for ``existing``, a file earlier in this same layer."""
        existing = _p(existing)
        if self.entries.get(existing, Spec("x")).kind != "file":
            raise ValueError(f"hardlink target {existing!r} is not a file of this layer")
        return self._put(path, Spec("hardlink", target=existing))

    def fifo(self, path, mode=0o644, uid=0, gid=0, mtime_ns=DEFAULT_MTIME_NS) -> "LayerSpec":
        return self._put(path, Spec("fifo", mode, uid, gid, mtime_ns))

    def char(self, path, major: int, minor: int, mode=0o644, mtime_ns=DEFAULT_MTIME_NS):
        return self._put(path, Spec("char", mode, mtime_ns=mtime_ns, rdev=(major, minor)))

    def socket(self, path, mode=0o755, mtime_ns=DEFAULT_MTIME_NS) -> "LayerSpec":
        return self._put(path, Spec("socket", mode, mtime_ns=mtime_ns))

    def whiteout(self, path) -> "LayerSpec":
        """Delete ``path`` (and its subtree) from lower layers (D1)."""
        path = _p(path)
        self.whiteouts.add(path)
        parent = path.rpartition(b"/")[0]
        if parent and parent not in self.entries:
            self._put(parent, Spec("dir", mode=0o755, implicit=True))
        return self


def _t(target) -> bytes:
    return os.fsencode(target)


_KIND_MODE = {"fifo": stat.S_IFIFO, "char": stat.S_IFCHR, "block": stat.S_IFBLK,
              "socket": stat.S_IFSOCK}


def materialise(spec: LayerSpec, dest: str | os.PathLike, fmt: str = "overlay") -> Path:
    """Write ``spec`` as a layer directory at ``dest`` (created) in ``fmt``."""
    if fmt not in ("overlay", "oci"):
        raise ValueError(fmt)
    dest = Path(dest)
    dest.mkdir(parents=True)
    root = os.fsencode(dest)
    for path in sorted(spec.entries, key=lambda p: (p.count(b"/"), p)):
        e = spec.entries[path]
        full = os.path.join(root, path)
        if not path:
            continue       # the root's attributes come last
        if e.kind == "dir":
            os.mkdir(full)
        elif e.kind == "file":
            with open(full, "wb") as f:
                f.write(e.data)
        elif e.kind == "symlink":
            os.symlink(e.target, full)
        elif e.kind == "hardlink":
            continue    # after every file exists
        else:
            os.mknod(full, _KIND_MODE[e.kind] | e.mode, os.makedev(*e.rdev))
    for path, e in spec.entries.items():
        if e.kind == "hardlink":
            os.link(os.path.join(root, e.target), os.path.join(root, path))
    overlay_opaque = set()
    for path in sorted(spec.whiteouts):
        if path in spec.entries and fmt == "overlay":
            # D2/D7: overlay format cannot hold a whiteout beside its entry; a
            # non-dir replaces the lower entry anyway, a dir must become opaque.
            if spec.entries[path].kind == "dir":
                overlay_opaque.add(path)
            continue
        full = os.path.join(root, path)
        if fmt == "overlay":
            os.mknod(full, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        else:
            head, _, name = full.rpartition(b"/")
            open(os.path.join(head, b".wh." + name), "wb").close()
    # attributes deepest first, so a directory's mtime is set after its children
    for path in sorted(spec.entries, key=lambda p: (-p.count(b"/"), p)):
        e = spec.entries[path]
        if e.kind == "hardlink" or not path:
            continue
        if path in overlay_opaque:
            e = Spec(**{**e.__dict__, "opaque": True})
        _apply(os.path.join(root, path), e, fmt)
    _apply(root, spec.entries.get(b"", ROOT), fmt)
    return dest


def _apply(full: bytes, e: Spec, fmt: str) -> None:
    if e.kind == "dir" and e.opaque:
        if fmt == "overlay":
            os.setxattr(full, "trusted.overlay.opaque", b"y")
        else:
            open(os.path.join(full, b".wh..wh..opq"), "wb").close()
    os.chown(full, e.uid, e.gid, follow_symlinks=False)
    if e.kind != "symlink":
        os.chmod(full, e.mode)
    for k, v in e.xattrs.items():
        os.setxattr(full, k, v, follow_symlinks=False)
    os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def materialise_stack(specs: Iterable[LayerSpec], where: str | os.PathLike,
                      fmt: str = "overlay") -> list[Path]:
    """Materialise layers bottom first as ``where/l0``, ``where/l1`` ..."""
    return [materialise(s, Path(where) / f"l{i}", fmt) for i, s in enumerate(specs)]
