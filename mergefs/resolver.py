"""The resolver: pure merge semantics over layer readers (docs/semantics.md M, D, S, H).

Layers are given bottom first, like the OCI ``layers`` array; internally the
search goes top first. A merged directory is served by a list of *sources*:
the layer indices, top first, whose same-named directory contributes children.
The list stops below an opaque directory, a whiteout, or a non-directory (M3:
a directory over a non-directory starts fresh).

``merge_listing`` is the whole rule set, as a pure function of the layers'
``LayerDir``s; the farm planner, the diff and the union mount all use it.
Paths are relative bytes (``b""`` is the root, ``b"a/b"``). Nothing follows a
symlink: a path component is only descended into when it is a real directory
in the layer that serves it (S1).

Redirects (R1, as kernel overlayfs with ``redirect_dir=on``): a directory
that carries ``trusted.overlay.redirect`` in layer k is looked up in the
layers below k at the redirect's path instead of its own: ``/p/q`` is a path
from the root, walked in each lower layer (a whiteout or a non-directory on
the way ends the search, an opaque directory on the way makes that layer the
last); a bare name replaces the directory's name in its parent. So a
directory's sources are only known by reading it, like its opacity:
``dir_sources`` does that, given where the directory was found by name.

One name is found without listing anything, as kernel overlayfs looks names
up: ``NameReader`` is a ``dir_sources`` reader that takes each layer
directory's markers and that one name (``layer.read_layer_name``), so
``merge_listing`` of what it read is exactly what the whole listings give
for that name (``Resolver.lookup``, the union's ``read_name``).
"""
from __future__ import annotations

import os
import stat
from typing import Iterable, NamedTuple, Sequence

from sortedcontainers import SortedDict

from . import syscalls
from .layer import (DIR, OCI_WHITEOUT, Layer, LayerDir, as_layers, layer_dir_markers,
                    read_layer_dir, read_layer_name)


class Node(NamedTuple):
    """A merged entry: its kind and the layers serving it, top first.

    A non-directory has exactly one source (the layer whose file is shown); a
    directory has every layer that may contribute, the first one giving
    attributes. Whether one of them is opaque is only known by reading that
    directory, so the list is cut there when it is read (``merge_listing``
    stops at an opaque listing; ``Resolver.dir_layers`` gives the cut list).
    ``inos`` are the inode numbers in those layers, aligned with ``layers``.
    """
    kind: int
    layers: tuple[int, ...]
    inos: tuple[int, ...]

    @property
    def top(self) -> int:
        return self.layers[0]


def merge_listing(listings: Iterable[tuple[int, LayerDir]]) -> dict[bytes, Node]:
    """Merge one directory's listings, given top first as (layer index, LayerDir).

    M1 later wins, dirs merge; M2 a non-dir replaces a subtree; M3 a dir over a
    non-dir starts fresh; D1 whiteouts hide lower entries; D2 not the same
    layer's; D3 an opaque directory hides every lower child.
    """
    new = tuple.__new__          # hot: one Node per name, made once unless dirs merge
    out: dict[bytes, Node] = {}
    closed: set[bytes] = set()   # names whose lower layers can no longer contribute
    for idx, ld in listings:
        if not out:              # the top listing (or all above it empty): every name is new
            out = {name: new(Node, (e.kind, (idx,), (e.ino,))) for name, e in ld.entries.items()
                   if name not in closed}
        else:
            get = out.get
            for name, e in ld.entries.items():
                cur = get(name)
                if cur is None:
                    if name not in closed:
                        out[name] = new(Node, (e.kind, (idx,), (e.ino,)))
                elif cur.kind == DIR and name not in closed:
                    if e.kind == DIR:            # dir under a dir: children merge
                        out[name] = new(Node, (DIR, cur.layers + (idx,), cur.inos + (e.ino,)))
                    else:                        # non-dir under a dir: M3
                        closed.add(name)
                # a non-dir above hides this one (M2)
        if ld.whiteouts:
            closed |= ld.whiteouts
        if ld.opaque:
            break
    return out


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Source(NamedTuple):
    """One layer serving a merged directory: the layer, the directory's path in
    it (not the merged path below a redirect), and what that layer says there."""
    layer: int
    path: bytes
    ld: LayerDir


def redirect_value(value: bytes | None) -> bytes | None:
    """A redirect normalised (``/a/b`` or a bare name), or None when it is absent or
    invalid (kernel overlayfs ignores those too)."""
    if not value:
        return None
    if value.startswith(b"/"):
        parts = [p for p in value.split(b"/") if p]
        if not parts or b".." in parts or b"." in parts:
            return None
        return b"/" + b"/".join(parts)
    if b"/" in value or value in (b".", b".."):
        return None
    return value


def dir_sources(layers: Sequence[Layer], cands, read, parent_path=None) -> list[Source]:
    """The layers serving one merged directory, top first, each read with ``read``.

    ``cands``: (layer, path) where the directory was found by name, top first
    (a ``Node``'s layers with the parent's paths): right down to the first
    redirect, which replaces the rest. ``read(layer, path) -> LayerDir``.
    ``parent_path(layer)`` is the parent's path in a layer (relative redirects).
    The list stops after an opaque directory (D3).
    """
    out: list[Source] = []
    pending = iter(cands)
    while True:
        nxt = next(pending, None)
        if nxt is None:
            return out
        idx, path = nxt
        ld = read(idx, path)
        out.append(Source(idx, path, ld))
        if ld.opaque:
            return out
        value = redirect_value(ld.redirect)
        if value is not None and idx > 0:
            if value.startswith(b"/"):
                pending = _absolute(layers, idx, value[1:].split(b"/"))
            elif parent_path is not None:
                pending = _relative(layers, idx, value, parent_path)


def _absolute(layers: Sequence[Layer], k: int, parts: list[bytes]):
    """(layer, path) of the directory at ``parts`` in each layer below ``k``."""
    for j in range(k - 1, -1, -1):
        found, stop, after = _find_dir(layers[j], parts)
        if found:
            yield j, b"/".join(parts)
        if stop:
            return
        parts = after


def _relative(layers: Sequence[Layer], k: int, name: bytes, parent_path):
    """(layer, path) of ``name`` in the parent's directory of each layer below ``k``
    that serves the parent."""
    for j in range(k - 1, -1, -1):
        ppath = parent_path(j)
        if ppath is None:
            continue
        found, stop = _find_child(layers[j], ppath, name)
        if found:
            yield j, join(ppath, name)
        if stop:
            return


def _find_child(layer: Layer, parent: bytes, name: bytes) -> tuple[bool, bool]:
    """(is a directory, ends the search) for ``parent/name`` in one layer."""
    try:
        fd = syscalls.open_beneath(layer.fd, parent)
    except OSError:
        return False, False
    try:
        return _entry_state(layer, fd, name)
    finally:
        os.close(fd)


def _entry_state(layer: Layer, fd: int, name: bytes) -> tuple[bool, bool]:
    try:
        st = syscalls.lstat(name, fd)
    except FileNotFoundError:
        if layer.fmt != "overlay" and _exists(OCI_WHITEOUT + name, fd):
            return False, True            # an OCI whiteout
        return False, False
    if stat.S_ISDIR(st.st_mode):
        return True, False
    return False, True                    # a whiteout or a non-directory ends it


def _exists(name: bytes, fd: int) -> bool:
    try:
        syscalls.lstat(name, fd)
        return True
    except FileNotFoundError:
        return False


def _find_dir(layer: Layer, parts: list[bytes]) -> tuple[bool, bool, list[bytes]]:
    """Walk ``parts`` in one layer as overlayfs walks an absolute redirect.

    Returns (found a directory, no lower layer may be searched, the path for
    the layers below: a redirect on the way rewrites it)."""
    fd = os.dup(layer.fd)
    after, stop = list(parts), False
    try:
        for n, name in enumerate(parts):
            found, ends = _entry_state(layer, fd, name)
            if not found:
                return False, stop or ends, after
            child = syscalls.open_dir(name, fd)
            os.close(fd)
            fd = child
            if n == len(parts) - 1:
                return True, stop, after
            opaque, redirect = _markers(layer, fd)
            stop |= opaque
            value = redirect_value(redirect)
            if value is not None:
                rest = parts[n + 1:]
                if value.startswith(b"/"):
                    after = value[1:].split(b"/") + rest
                else:
                    after = after[:len(after) - len(parts) + n] + [value] + rest
        return True, stop, after
    finally:
        os.close(fd)


def _markers(layer: Layer, fd: int) -> tuple[bool, bytes | None]:
    """(opaque, redirect) of an open directory of ``layer``."""
    opaque, _, redirect, _ = layer_dir_markers(fd, layer.fmt)
    return opaque, redirect


class KeptMarkers(dict):
    """What directories of layers that never change say of themselves, kept:
    (layer, path) -> (``layer_dir_markers``, st_size); at most ``limit`` of them
    (all forgotten when full)."""

    def __init__(self, limit: int = 1 << 15):
        super().__init__()
        self.limit = limit

    def of(self, idx: int, path: bytes, fd: int, fmt: str) -> tuple[tuple, int]:
        """The entry for the directory ``path`` of layer ``idx``, open as ``fd``."""
        kept = self.get((idx, path))
        if kept is None:
            if len(self) >= self.limit:
                self.clear()
            kept = self[(idx, path)] = (layer_dir_markers(fd, fmt), os.fstat(fd).st_size)
        return kept


class NameReader:
    """A ``read`` for ``dir_sources`` that looks up one name instead of listing:
    each layer directory's markers and what it says about ``name``
    (``read_layer_name``), so ``merge_listing`` of what it read gives exactly the
    node the whole listings give for ``name`` (every rule of the merge is per
    name, given the directories' opacity). Once a layer decides the name (its
    whiteout, or a non-directory: nothing below shows, M2, M3, D1), the layers
    below are read for their markers only, which the directory's sources (and
    the redirects its children's layer paths follow) still need.

    ``open_dir(layer, path) -> (fd, close it?)`` gives the layer's directory;
    ``stats`` holds the lstat of the name in each layer that has an entry.
    ``marks``: the caller's ``KeptMarkers``, for every layer but ``mutable``;
    ``sizes`` the st_size of each of those directories read (what listing them
    would cost). ``unsure``: an entry read is on another filesystem than its
    layer's root (a mount point, or below one), whose lstat's st_ino is not the
    d_ino a listing gives (the inode number of the entry depends on it): the
    caller asks the listings instead."""

    def __init__(self, layers: Sequence[Layer], name: bytes, open_dir,
                 marks: KeptMarkers | None = None, mutable: int | None = None):
        self.layers, self.name, self.open_dir = layers, name, open_dir
        self.marks, self.mutable = marks, mutable
        self.stats: dict[int, os.stat_result] = {}
        self.sizes: list[int] = []
        self.decided = self.unsure = False

    def __call__(self, idx: int, path: bytes) -> LayerDir:
        fd, owned = self.open_dir(idx, path)
        try:
            fmt = self.layers[idx].fmt
            marks = self.marks
            got = None
            if marks is not None and idx != self.mutable:
                got, size = marks.of(idx, path, fd, fmt)
                self.sizes.append(size)
            ld, st = read_layer_name(fd, self.name, fmt, not self.decided, got)
        finally:
            if owned:
                os.close(fd)
        if st is not None:
            self.stats[idx] = st
            self.decided = stat.S_IFMT(st.st_mode) != DIR
            if st.st_dev != self.layers[idx].dev:
                self.unsure = True
        if self.name in ld.whiteouts:
            self.decided = True
        return ld

    def node(self, found: Sequence[Source]) -> Node | None:
        return merge_listing((s.layer, s.ld) for s in found).get(self.name)


class Resolver:
    """Point look-ups and listings of a merged view (used by union and explain).

    Holds one root fd per layer and caches nothing: each call reads the layer
    directories it needs (the union mount keeps its own cache per inode).
    """

    # A faster reader of a layer directory's entries (``read_layer_dir``'s ``scan``),
    # set by the union when its C module is there.
    scan = None
    # How many layer directories were read whole (``layer_dir``): what a cold
    # lookup must not cost (``NameReader``); tests and benchmarks read it.
    dirs_listed = 0

    def __init__(self, layers: Sequence[Layer | str | bytes]):
        self.layers = as_layers(layers)
        n = len(self.layers)
        top_first = self.dir_layers(b"", Node(DIR, tuple(range(n - 1, -1, -1)), (0,) * n))
        self.root = Node(DIR, top_first, tuple(os.fstat(self.layers[i].fd).st_ino
                                               for i in top_first))

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> "Resolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def layer_dir(self, idx: int, path: bytes) -> LayerDir:
        """One layer's view of one directory (path must be a directory there)."""
        layer = self.layers[idx]
        fd = syscalls.open_beneath(layer.fd, path)
        self.dirs_listed += 1
        try:
            return read_layer_dir(fd, layer.fmt, self.scan)
        finally:
            os.close(fd)

    def layer_markers(self, idx: int, path: bytes) -> LayerDir:
        """One layer's opacity and redirect for a directory, without its entries."""
        layer = self.layers[idx]
        fd = syscalls.open_beneath(layer.fd, path)
        try:
            opaque, redirect = _markers(layer, fd)
        finally:
            os.close(fd)
        return LayerDir(opaque=opaque, redirect=redirect)

    def open_dir(self, idx: int, path: bytes) -> tuple[int, bool]:
        """A ``NameReader``'s ``open_dir``: a new fd on the layer's directory."""
        return syscalls.open_beneath(self.layers[idx].fd, path), True

    def sources(self, cands, parent_path=None, read=None) -> list[Source]:
        """``dir_sources`` over this resolver's layers (full listings read, unless
        ``read`` is ``layer_markers``)."""
        return dir_sources(self.layers, cands, read or self.layer_dir, parent_path)

    def listdir(self, path: bytes, node: Node, parent_path=None) -> SortedDict:
        """The merged children of directory ``node`` at ``path`` (its path in every
        layer that found it by name), sorted by name; redirects followed."""
        found = self.sources([(i, path) for i in node.layers], parent_path)
        return SortedDict(merge_listing((s.layer, s.ld) for s in found))

    def dir_layers(self, path: bytes, node: Node) -> tuple[int, ...]:
        """The layers a directory really merges from: ``node.layers`` cut after
        the first opaque one (a listing cannot know that without reading the
        child directories, so ``Node.layers`` of a directory may run longer),
        or replaced below a redirect. Reads the directories' markers only."""
        return tuple(s.layer for s in self.sources([(i, path) for i in node.layers],
                                                   read=self.layer_markers))

    def lstat(self, path: bytes, node: Node) -> os.stat_result:
        """Attributes of a merged entry: those of its top layer's entry."""
        return self.lstat_in(node.top, path)

    def lstat_in(self, idx: int, path: bytes) -> os.stat_result:
        if not path:
            return os.fstat(self.layers[idx].fd)
        parent, _, name = path.rpartition(b"/")
        fd = syscalls.open_beneath(self.layers[idx].fd, parent)
        try:
            return syscalls.lstat(name, fd)
        finally:
            os.close(fd)

    def lookup(self, path: bytes, listings: bool = False) -> Node | None:
        """The merged node at ``path``, or None if the merged view has nothing there.
        Each name is looked up alone (``NameReader``), unless ``listings``: then
        the whole listings of the directories on the way are read."""
        node = self.root
        paths = {i: b"" for i in node.layers}      # the current dir's path in each layer
        up: dict = {}                               # its parent's
        for name in path.split(b"/") if path else ():
            if node.kind != DIR:
                return None
            cands = [(i, paths[i]) for i in node.layers]
            read = None if listings else NameReader(self.layers, name, self.open_dir)
            found = self.sources(cands, up.get, read)
            if read is not None and read.unsure:                    # a mount point: list
                found = self.sources(cands, up.get)
            node = merge_listing((s.layer, s.ld) for s in found).get(name)
            if node is None:
                return None
            up = {s.layer: s.path for s in found}
            paths = {i: join(up[i], name) for i in node.layers}
        return node
