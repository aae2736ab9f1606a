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
from typing import Callable

from mergefs import syscalls
from mergefs.attrs import Meta, apply_meta
from mergefs.errors import InvalidLayer, NotFound
from mergefs.layer import DIR, LNK, REG, SOCK, Layer, read_layer_dir
from mergefs.plan import refuse_redirect

from .digest import tree_digest
from .faults import kill_point
from .meta import Row

OPAQUE_ATTR = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"


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
        self._copy_dir(os.dup(self.src.fd), b"", self.dst)

    def _copy_dir(self, src_fd: int, path: bytes, dst_fd: int) -> None:
        """Copy the children of one directory, then its own attributes (A2). Closes src_fd."""
        try:
            ld = read_layer_dir(src_fd, self.src.fmt)
            for name in sorted(ld.entries):
                self._copy_entry(src_fd, dst_fd, path, name, ld.entries[name].kind,
                                 recreated=name in ld.whiteouts)
            if not ld.opaque:
                for name in sorted(ld.whiteouts - ld.entries.keys()):
                    syscalls.mknod(name, stat.S_IFCHR, 0, dst_fd)
                    self._count()
            apply_meta(dst_fd, b"", Meta.read(src_fd, b""), self.warnings)
            if ld.opaque:
                syscalls.setxattr(dst_fd, b"", OPAQUE_ATTR, b"y")
            elif ld.redirect is not None:
                if not self.keep_redirects:      # R2: a layer is read by name
                    refuse_redirect(self.src, path)
                syscalls.setxattr(dst_fd, b"", OPAQUE_ATTR.replace("opaque", "redirect"),
                                  ld.redirect)
        finally:
            os.close(src_fd)

    def _copy_entry(self, src_fd: int, dst_fd: int, path: bytes, name: bytes, kind: int,
                    recreated: bool) -> None:
        rel = path + b"/" + name if path else name
        self._count()
        if kind == DIR:
            syscalls.mkdir(name, dst_fd)
            sub_dst = syscalls.open_dir(name, dst_fd)
            try:
                self._copy_dir(syscalls.open_dir(name, src_fd), rel, sub_dst)
                if recreated:      # D2/D7: deleted and recreated in this layer
                    syscalls.setxattr(sub_dst, b"", OPAQUE_ATTR, b"y")
            finally:
                os.close(sub_dst)
            return
        st = syscalls.lstat(name, src_fd)
        if st.st_nlink > 1 and kind == REG and st.st_ino in self.links:
            syscalls.link(self.links[st.st_ino], rel, self.dst, self.dst)
            return
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
