"""Layer readers: one directory of one layer, in either whiteout format.

A *layer* is an immutable directory tree. Two formats mark deletions:

* overlay (kernel overlayfs): a whiteout is a character device 0/0, or a
  regular file carrying ``trusted.overlay.whiteout`` inside a directory marked
  ``trusted.overlay.whiteouts`` (Linux 6.7 "xattr whiteouts"); an opaque
  directory carries ``trusted.overlay.opaque=y`` (``user.overlay.*`` when the
  layer was written without root); a directory moved by a rename carries
  ``trusted.overlay.redirect``, the path where the layers below keep its
  content (``/abs/path`` from the root, or a name in the same parent; see the
  resolver for how it is followed).
* OCI: a file ``.wh.NAME`` deletes NAME, ``.wh..wh..opq`` makes its directory
  opaque.

``auto`` honours both, except in a layer whose root carries the *format
mark* ``trusted.overlay.mergefs-format=overlay`` (``user.overlay.`` without
root): mergefs marks every upper it writes and every layer it stores, and a
marked layer is read as overlay format whatever its names, so a regular file
called ``.wh.keep`` stays a file (guessing would silently lose it and
``keep``). The mark is overlay-private (format, not content; kernel overlayfs
hides it). Reading never follows a symlink: directories are read through fds
opened with O_NOFOLLOW, one level at a time.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

from . import syscalls
from .errors import InvalidLayer, NotFound

FORMATS = ("auto", "overlay", "oci")
OCI_WHITEOUT = b".wh."
OCI_OPAQUE = b".wh..wh..opq"
OVERLAY_PREFIXES = ("trusted.overlay.", "user.overlay.")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
XWHITEOUTS_XATTRS = ("trusted.overlay.whiteouts", "user.overlay.whiteouts")
XWHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
FORMAT_MARKS = ("trusted.overlay.mergefs-format", "user.overlay.mergefs-format")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
# mergefs's own, on an upper: the inode number an entry kept from its origin, and
# the mark of a directory holding such entries (union/inodes.py)
NUMBER_XATTRS = ("trusted.overlay.mergefs-ino", "user.overlay.mergefs-ino")
NUMBERED_XATTRS = ("trusted.overlay.mergefs-inos", "user.overlay.mergefs-inos")

# Entry kinds are the S_IFMT bits, so they compare with st_mode directly.
DIR, REG, LNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
CHR, BLK, FIFO, SOCK = stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK
KIND_NAMES = {DIR: "dir", REG: "file", LNK: "symlink", CHR: "char", BLK: "block",
              FIFO: "fifo", SOCK: "socket"}


def is_overlay_private(attr: str) -> bool:
    """Overlay xattrs are format, not content (A3)."""
    return attr.startswith(OVERLAY_PREFIXES)


class Entry(NamedTuple):
    """One name in one layer directory: its kind and inode (for hardlink groups)."""
    kind: int
    ino: int


@dataclass
class LayerDir:
    """What one layer says about one directory: entries, deletions, opacity, and
    where the layers below keep its content when it was moved (``redirect``)."""
    entries: dict[bytes, Entry] = field(default_factory=dict)
    whiteouts: set[bytes] = field(default_factory=set)
    opaque: bool = False
    redirect: bytes | None = None
    numbered: bool = False       # some entries record their inode number (NUMBER_XATTRS)


def dir_markers(dir_fd: int) -> tuple[bool, bool, bytes | None, bool]:
    """(opaque, holds xattr whiteouts, redirect, numbered) for an open directory,
    from one listxattr."""
    names = syscalls.listxattr(dir_fd, b"")
    if not names:
        return False, False, None, False
    opaque = xwhite = numbered = False
    redirect = None
    for attr in names:
        if attr in OPAQUE_XATTRS:
            value = syscalls.getxattr(dir_fd, b"", attr)
            opaque |= value == b"y"
            xwhite |= value == b"x"
        elif attr in XWHITEOUTS_XATTRS:
            xwhite = True
        elif attr in REDIRECT_XATTRS:
            redirect = syscalls.getxattr(dir_fd, b"", attr) or None
        elif attr in NUMBERED_XATTRS:
            numbered = True
    return opaque, xwhite, redirect, numbered


def _is_xattr_whiteout(dir_fd: int, name: bytes, st: os.stat_result | None = None) -> bool:
    if st is None:
        st = syscalls.lstat(name, dir_fd)
    if st.st_size != 0:
        return False
    return any(syscalls.getxattr(dir_fd, name, a) is not None for a in XWHITEOUT_XATTRS)


_FSENC = sys.getfilesystemencoding()


def marked_format(dir_fd: int) -> str | None:
    """The format a layer root's mark declares ("overlay"), or None when unmarked."""
    for attr in FORMAT_MARKS:
        value = syscalls.getxattr(dir_fd, b"", attr)
        if value is not None:
            return value.decode("ascii", "replace")
    return None


def mark_overlay_path(path) -> None:
    """``mark_overlay`` of the directory at ``path`` (never through a symlink)."""
    fd = os.open(path, syscalls.O_DIR)
    try:
        mark_overlay(fd)
    finally:
        os.close(fd)


def mark_overlay(dir_fd: int) -> None:
    """Mark an open layer root as overlay format (an upper mergefs writes, a store layer)."""
    if marked_format(dir_fd) == "overlay":
        return
    attr = FORMAT_MARKS[0] if os.geteuid() == 0 else FORMAT_MARKS[1]
    try:
        syscalls.setxattr(dir_fd, b"", attr, b"overlay")
    except OSError as e:     # a filesystem without (user) xattrs: readers fall back to auto
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            raise


def read_layer_dir(dir_fd: int, fmt: str = "auto", scan=None) -> LayerDir:
    """Read one open directory of a layer into a LayerDir (names are bytes).

    ``scan``: the C reader (``_fastpath.layer_entries``, given by the union),
    which reads ``dir_fd`` itself (its offset moves: the caller opened it for
    this read) with no Python object per name; not where xattr whiteouts need
    a look at each empty file."""
    overlay, oci = fmt != "oci", fmt != "overlay"
    out = LayerDir()
    xwhite = False
    if overlay:
        out.opaque, xwhite, out.redirect, out.numbered = dir_markers(dir_fd)
    if scan is not None and not xwhite:
        out.entries, out.whiteouts, oci_opaque = scan(dir_fd, Entry, oci, overlay)
        out.opaque |= oci_opaque
        return out
    entries, whiteouts = out.entries, out.whiteouts
    encode, new_entry = str.encode, tuple.__new__    # hot loop: one pass per entry per layer
    with os.scandir(dir_fd) as it:
        for de in it:
            name = encode(de.name, _FSENC, "surrogateescape")   # == os.fsencode
            if oci and name.startswith(OCI_WHITEOUT):
                if name == OCI_OPAQUE:
                    out.opaque = True
                else:
                    whiteouts.add(name[4:])
                continue
            if de.is_dir(follow_symlinks=False):
                kind = DIR
            elif de.is_symlink():
                kind = LNK
            elif de.is_file(follow_symlinks=False):
                if xwhite and _is_xattr_whiteout(dir_fd, name):
                    whiteouts.add(name)
                    continue
                kind = REG
            else:
                st = de.stat(follow_symlinks=False)
                if overlay and syscalls.is_whiteout_stat(st):
                    whiteouts.add(name)
                    continue
                kind = stat.S_IFMT(st.st_mode)
            entries[name] = new_entry(Entry, (kind, de.inode()))
    # D2: an entry of the same layer is not hidden by its own whiteout.
    return out


def _lstat_or_none(name: bytes, dir_fd: int) -> os.stat_result | None:
    """lstat of ``name``, None where there is none (ENAMETOOLONG: a ``.wh.`` name
    made of a name near NAME_MAX, which no layer can hold)."""
    try:
        return syscalls.lstat(name, dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return None
        raise


def layer_dir_markers(dir_fd: int, fmt: str = "auto") -> tuple[bool, bool, bytes | None, bool]:
    """(opaque, holds xattr whiteouts, redirect, numbered) of an open directory of a
    layer read as ``fmt`` (both formats' opacity), without its entries."""
    opaque = xwhite = numbered = False
    redirect = None
    if fmt != "oci":
        opaque, xwhite, redirect, numbered = dir_markers(dir_fd)
    if fmt != "overlay" and _lstat_or_none(OCI_OPAQUE, dir_fd) is not None:
        opaque = True
    return opaque, xwhite, redirect, numbered


def read_layer_name(dir_fd: int, name: bytes, fmt: str = "auto", look: bool = True,
                    markers: tuple | None = None) -> tuple[LayerDir, os.stat_result | None]:
    """What one open directory of a layer says about one ``name``, without listing
    it: a LayerDir with the directory's markers (opaque, redirect, numbered, as
    ``read_layer_dir`` reads them) and, of its entries and whiteouts, at most
    ``name``'s, exactly as ``read_layer_dir`` would hold them (both formats, xattr
    whiteouts, D2); and the entry's lstat (None when it has no entry).

    An OCI whiteout ``.wh.NAME`` beside a non-directory NAME is not looked for:
    what lies below a non-directory never shows (M2, M3), so it changes nothing.
    ``look=False``: the markers only (the name is decided by a layer above).
    ``markers``: the directory's ``layer_dir_markers``, when the caller has them."""
    overlay, oci = fmt != "oci", fmt != "overlay"
    opaque, xwhite, redirect, numbered = markers or layer_dir_markers(dir_fd, fmt)
    out = LayerDir(opaque=opaque, redirect=redirect, numbered=numbered)
    if not look:
        return out, None
    st = None
    if not (oci and name.startswith(OCI_WHITEOUT)):     # such a name is a marker in OCI
        st = _lstat_or_none(name, dir_fd)
    kind = None
    if st is not None:
        kind = stat.S_IFMT(st.st_mode)
        if overlay and (syscalls.is_whiteout_stat(st) or kind == REG and xwhite
                        and _is_xattr_whiteout(dir_fd, name, st)):
            out.whiteouts.add(name)
            return out, None
        out.entries[name] = Entry(kind, st.st_ino)
    if oci and kind in (None, DIR) and OCI_WHITEOUT + name != OCI_OPAQUE and \
            _lstat_or_none(OCI_WHITEOUT + name, dir_fd) is not None:
        out.whiteouts.add(name)
    return out, st


def content_xattrs(dir_fd: int, name: bytes) -> dict[str, bytes]:
    """The xattrs of an entry that are content (not overlay format)."""
    out = {}
    for attr in syscalls.listxattr(dir_fd, name):
        if not is_overlay_private(attr):
            value = syscalls.getxattr(dir_fd, name, attr)
            if value is not None:
                out[attr] = value
    return out


class Layer:
    """An input layer: a directory tree in overlay or OCI format.

    ``Layer(path)`` checks the path; ``open()`` returns the root directory fd,
    held until ``close()``. Layers are never written to.
    """

    def __init__(self, path: str | bytes | os.PathLike, fmt: str = "auto"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown layer format {fmt!r}; use one of {FORMATS}")
        self.path = os.fsencode(path)
        self._fmt = fmt
        self._fd: int | None = None
        self._dev: int | None = None

    def __repr__(self) -> str:
        return f"Layer({os.fsdecode(self.path)!r}, fmt={self._fmt!r})"

    @property
    def fmt(self) -> str:
        """The format to read with: ``auto`` becomes ``overlay`` on a marked layer."""
        if self._fmt == "auto":
            self.fd          # opening resolves the mark
        return self._fmt

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = open_layer_root(self.path)
            if self._fmt == "auto" and marked_format(self._fd) == "overlay":
                self._fmt = "overlay"
        return self._fd

    @property
    def dev(self) -> int:
        """The st_dev of the layer's root (an entry on another is a mount point)."""
        if self._dev is None:
            self._dev = os.fstat(self.fd).st_dev
        return self._dev

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Layer":
        self.fd
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_layer_root(path: bytes) -> int:
    """Open a layer's root directory, with clear errors for the usual mistakes."""
    try:
        return os.open(path, syscalls.O_DIR & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"layer {os.fsdecode(path)!r} does not exist") from None
    except NotADirectoryError:
        raise InvalidLayer(f"layer {os.fsdecode(path)!r} is not a directory") from None


def as_layers(layers) -> list[Layer]:
    """Accept Layer objects or paths."""
    return [l if isinstance(l, Layer) else Layer(l) for l in layers]
