"""Copy a layer directory (either whiteout format) into the store, in overlay format.

TEMPORARY HOME: format conversion belongs to ``mergefs.oci`` (the OCI helper's
module); this copier lives here until that module offers a directory import,
and only converts directories. Tars, OCI layouts and docker archives go
through ``mergefs.oci``.

Output is the store's one canonical format (docs/architecture.md, "The store on disk"):
whiteout = char device 0/0; opaque = ``trusted.overlay.opaque=y``
(``user.overlay.opaque`` when not root); never a whiteout inside an opaque
directory (D6). An OCI ``.wh.NAME`` next to a ``NAME`` of the same layer hides
only lower layers (D2): a file simply stays; a directory becomes opaque, since
it was deleted and recreated (D7). Symlinks are copied, never followed (S2);
hardlinks inside the layer stay hardlinks (H1); attributes follow A1/A2.
"""
from __future__ import annotations

import os
import stat
from typing import Callable, Iterator, NamedTuple

from mergefs import syscalls
from mergefs.attrs import Meta, apply_meta
from mergefs.errors import InvalidLayer, NotFound
from mergefs.layer import DIR, LNK, REG, SOCK, Layer, LayerDir, read_layer_dir
from mergefs.plan import refuse_redirect

from .digest import tree_digest
from .faults import kill_point
from .meta import Row

PATH_MAX = os.pathconf("/", "PC_PATH_MAX")     # 4096 on Linux
OPAQUE_ATTR = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"


class _Frame(NamedTuple):
    """One directory being copied: its fds (source, copy), path and listing."""
    src: int
    dst: int
    path: bytes
    ld: LayerDir
    names: Iterator[bytes]
    recreated: bool

    def close(self) -> None:
        os.close(self.src)
        os.close(self.dst)


class LayerCopier:
    """Copies one layer tree from ``src`` (a Layer) into the empty directory ``dst_fd``."""

    def __init__(self, src: Layer, dst_fd: int, progress: Callable[[int], None] | None = None,
                 keep_redirects: bool = False):
        self.src = src
        self.keep_redirects = keep_redirects     # a live upper's, for flatten_redirects
        self.dst = dst_fd
        self.links: dict[int, bytes] = {}       # source inode -> first copied path
        self.warnings: list[str] = []
        self.entries = 0
        self.progress = progress

    def run(self) -> None:
        """Copy the whole tree, depth first, without recursion (a layer may be thousands of
        directories deep): one frame per open directory, two fds each (source, copy)."""
        stack: list[_Frame] = []
        try:
            stack.append(self._enter(os.dup(self.src.fd), b"", os.dup(self.dst), False))
            while stack:
                frame = stack[-1]
                name = next(frame.names, None)
                if name is None:
                    stack.pop()
                    self._leave(frame)
                    continue
                child = self._copy_entry(frame, name)
                if child is not None:
                    stack.append(child)
        finally:
            for frame in stack:
                frame.close()

    def _enter(self, src_fd: int, path: bytes, dst_fd: int, recreated: bool) -> "_Frame":
        """A frame for one directory; owns (and on error closes) both fds."""
        try:
            ld = read_layer_dir(src_fd, self.src.fmt)
        except BaseException:
            os.close(src_fd)
            os.close(dst_fd)
            raise
        return _Frame(src_fd, dst_fd, path, ld, iter(sorted(ld.entries)), recreated)

    def _leave(self, frame: "_Frame") -> None:
        """After a directory's children: its whiteouts, then its own attributes (A2)."""
        try:
            ld, dst_fd = frame.ld, frame.dst
            if not ld.opaque:
                for name in sorted(ld.whiteouts - ld.entries.keys()):
                    syscalls.mknod(name, stat.S_IFCHR, 0, dst_fd)
                    self._count()
            apply_meta(dst_fd, b"", Meta.read(frame.src, b""), self.warnings)
            if ld.opaque:
                syscalls.setxattr(dst_fd, b"", OPAQUE_ATTR, b"y")
            elif ld.redirect is not None:
                if not self.keep_redirects:      # R2: a layer is read by name
                    refuse_redirect(self.src, frame.path)
                syscalls.setxattr(dst_fd, b"", OPAQUE_ATTR.replace("opaque", "redirect"),
                                  ld.redirect)
            if frame.recreated:                  # D2/D7: deleted and recreated in this layer
                syscalls.setxattr(dst_fd, b"", OPAQUE_ATTR, b"y")
        finally:
            frame.close()

    def _copy_entry(self, frame: "_Frame", name: bytes) -> "_Frame | None":
        """Copy one non-directory; for a directory, make it and return its frame."""
        src_fd, dst_fd = frame.src, frame.dst
        kind = frame.ld.entries[name].kind
        rel = frame.path + b"/" + name if frame.path else name
        self._count()
        if kind == DIR:
            syscalls.mkdir(name, dst_fd)
            sub_dst = syscalls.open_dir(name, dst_fd)
            try:
                sub_src = syscalls.open_dir(name, src_fd)
            except BaseException:
                os.close(sub_dst)
                raise
            return self._enter(sub_src, rel, sub_dst, name in frame.ld.whiteouts)
        st = syscalls.lstat(name, src_fd)
        if st.st_nlink > 1 and kind == REG and st.st_ino in self.links:
            self._link(self.links[st.st_ino], name, dst_fd)
            return None
        meta = Meta.read(src_fd, name, st)
        if kind == REG:
            syscalls.copy_file(src_fd, name, dst_fd, name, st.st_size)
            if st.st_nlink > 1:
                self.links[st.st_ino] = rel
        elif kind == LNK:
            syscalls.symlink(syscalls.readlink(name, src_fd), name, dst_fd)
        else:                      # fifo, char, block; a socket is recreated (A4)
            syscalls.mknod(name, st.st_mode, 0 if kind == SOCK else st.st_rdev, dst_fd)
        apply_meta(dst_fd, name, meta, self.warnings)
        return None

    def _link(self, first: bytes, name: bytes, dst_fd: int) -> None:
        """Hardlink ``name`` in ``dst_fd`` to the copy at ``first`` (H1), also when that path
        is too long for one system call (a deep layer)."""
        if len(first) < PATH_MAX:
            syscalls.link(first, name, self.dst, dst_fd)
            return
        parent, _, base = first.rpartition(b"/")
        pfd = syscalls.open_dir_walk(self.dst, parent)
        try:
            syscalls.link(base, name, pfd, dst_fd)
        finally:
            os.close(pfd)

    def _count(self) -> None:
        self.entries += 1
        if self.progress is not None:
            self.progress(self.entries)


def copy_layer(src: str | os.PathLike | bytes, dst: str | os.PathLike, fmt: str = "auto",
               progress: Callable[[int], None] | None = None,
               keep_redirects: bool = False) -> list[str]:
    """Copy layer directory ``src`` to the new directory ``dst``; returns warnings."""
    os.mkdir(dst, 0o700)
    with Layer(src, fmt) as layer:
        dst_fd = os.open(dst, syscalls.O_DIR)
        try:
            copier = LayerCopier(layer, dst_fd, progress, keep_redirects)
            copier.run()
        finally:
            os.close(dst_fd)
    return copier.warnings


# -- into the store: one owner for importing a layer directory and publishing a layer ----
def import_dir(store, src: str | os.PathLike, fmt: str = "auto", name: str | None = None,
               holder: str | None = "cli", progress=None):
    """Copy a layer directory into the store; its id is its tree digest (mergefs-tree-v1)."""
    src = os.path.abspath(os.fspath(src))
    if not os.path.isdir(src):
        raise NotFound(f"layer directory {src!r} does not exist") if not os.path.lexists(src) \
            else InvalidLayer(f"{src!r} is not a directory")
    staged = store.stage("import")
    try:
        if os.environ.get("MERGEFS_TEST_KILL_AT") == "import:mid-copy":
            progress = lambda n: n == 3 and kill_point("import:mid-copy")  # noqa: E731
        copy_layer(src, staged.path / "fs", fmt, progress=progress)
        summary = tree_digest(staged.path / "fs")
        return publish_layer(store, staged, summary, summary.digest, "layer", f"import of {src}",
                             src, name, holder, op="import")
    finally:
        staged.discard()


def publish_layer(store, staged, summary, tree: str, kind: str, description: str,
                  source: str, name: str | None, holder: str | None, op: str):
    """Publish a staged layer whose id is ``summary.digest`` (reused if already stored)."""
    store.check_name(name, summary.digest)
    with store.build_lock(summary.digest):
        existing = store.reuse(summary.digest, holder, name)
        if existing is not None:
            return existing
        row = Row(id=summary.digest, kind=kind, description=description, entries=summary.entries,
                  bytes=summary.bytes, tree_digest=tree, source=source)
        return store.publish(staged, row, [], op, holder, name)
