#!/usr/bin/env python3
"""Generate a realistic, deterministic layer stack for benchmarks and tests.

    python tools/gen_stack.py OUTDIR --layers 8 --files 100000 --seed 1 --format overlay

writes OUTDIR/l0 .. OUTDIR/l7 (bottom first) and, last, OUTDIR/stack.json (the
parameters and counts; its presence marks a complete stack, see ``ensure_stack``).
Importable: ``generate(outdir, layers=8, files=100000, seed=1, fmt="overlay")``
returns the layer paths, bottom first.

What a stack holds (same seed + parameters -> same tree, bytes and mtimes):

* ``files`` non-directory entries in total (regular files, symlinks, hardlink
  names), about 35% in l0 and the rest spread evenly over the later layers;
  files live in directories 3-6 levels deep; sizes 0-16 KiB, skewed to small
  (5% empty, the rest log-normal with a median near 1 KiB).
* In every layer above l0: ~5% of its entries override a lower file, a few type
  changes (file->dir, dir->file, file->symlink), whiteouts of ~1% lower files
  and of a few lower directories, a few opaque directories (fresh children),
  directories deleted earlier and recreated (D7), overrides and deletions of one
  name of a lower hardlink pair (H2, H3).
* Symlinks (relative, absolute, dangling, self-loop), hardlink pairs within a
  layer, a few user.* and trusted.* xattrs on files and dirs, some non-root
  ownership, a few odd modes (setuid, 0600, read-only dirs), nanosecond mtimes,
  names that are not UTF-8 or contain a newline, one FIFO and (as root) one
  character device in l0.

Formats: ``overlay`` writes whiteouts as char 0/0 devices and opaque dirs as
``trusted.overlay.opaque=y`` (``user.overlay.opaque`` when not root; mknod of a
whiteout needs root). A directory replacing a non-directory is written opaque
(M3). ``oci`` writes ``.wh.NAME`` and ``.wh..wh..opq``. Whiteouts are only
emitted where something below exists and never inside an opaque dir (D6).

The planner (``plan_stack``) is pure; ``write_stack`` materialises a plan.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

FORMATS = ("overlay", "oci")
GENERATOR_VERSION = 1
EPOCH_NS = 1_700_000_000 * 10**9
DAY_NS = 86_400 * 10**9
POOL_SIZE = 1 << 20
OCI_OPAQUE = b".wh..wh..opq"
MAX_SIZE = 16 * 1024

TOP_DIRS = [b"usr", b"etc", b"var", b"opt", b"lib", b"srv", b"home", b"app"]
WORDS = [b"lib", b"share", b"python3", b"site-packages", b"include", b"local", b"cache",
         b"doc", b"locale", b"node_modules", b"src", b"conf.d", b"plugins", b"data",
         b"bin", b"man", b"zoneinfo", b"certs", b"modules", b"vendor", b"x86_64", b"tests"]
EXTS = [b"", b".py", b".so", b".h", b".txt", b".json", b".conf", b".gz", b".js", b".pyc", b".mo"]
ODD_NAMES = [b"caf\xe9.txt", b"new\nline", b" leading space", b"-dash", b"tab\tname", b"\xff\xfe"]
FILE_MODES = [(0o644, 0.84), (0o755, 0.10), (0o600, 0.03), (0o444, 0.02), (0o4755, 0.01)]
OWNERS = [(0, 0)] * 46 + [(1000, 1000), (33, 33), (65534, 65534), (0, 42)]


class FileSpec(NamedTuple):
    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    offset: int          # where the content starts in the shared random pool
    xattrs: tuple        # ((name, value), ...)


class LinkSpec(NamedTuple):
    path: bytes
    target: bytes
    uid: int
    gid: int
    mtime_ns: int


class SpecialSpec(NamedTuple):
    path: bytes
    mode: int            # includes S_IFIFO / S_IFCHR
    rdev: int
    mtime_ns: int


@dataclass
class DirSpec:
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    opaque: bool = False         # hides all lower children (D3)
    replaces_nondir: bool = False  # M3: written opaque in overlay format
    xattrs: tuple = ()


@dataclass
class LayerPlan:
    index: int
    root: DirSpec
    dirs: dict = field(default_factory=dict)        # path -> DirSpec (parents included)
    files: list = field(default_factory=list)       # FileSpec
    hardlinks: list = field(default_factory=list)   # (new path, existing path in this layer)
    symlinks: list = field(default_factory=list)    # LinkSpec
    specials: list = field(default_factory=list)    # SpecialSpec
    whiteouts: list = field(default_factory=list)   # paths deleted from lower layers

    def counts(self) -> dict:
        return {"dirs": len(self.dirs), "files": len(self.files),
                "hardlinks": len(self.hardlinks), "symlinks": len(self.symlinks),
                "specials": len(self.specials), "whiteouts": len(self.whiteouts),
                "opaque": sum(d.opaque or d.replaces_nondir for d in self.dirs.values())}


def _parent(path: bytes) -> bytes:
    i = path.rfind(b"/")
    return path[:i] if i >= 0 else b""


def _depth(path: bytes) -> int:
    return path.count(b"/") + 1


class StackPlanner:
    """Plans a stack layer by layer against a model of the merged view so far.

    Trees are nested dicts (a directory) with str leaves: "f" file, "l" symlink,
    "s" special, "w" whiteout (layer trees only). Each path is touched at most
    once per layer, so applying a layer's entries in any order gives the view.
    """

    def __init__(self, layers: int, files: int, seed: int):
        if layers < 1 or files < 0:
            raise ValueError("need layers >= 1 and files >= 0")
        self.rng = random.Random(seed)
        self.layers, self.files = layers, files
        self.view: dict = {}
        self.view_files: list[bytes] = []   # candidates; may be stale (checked on use)
        self.view_dirs: list[bytes] = []
        self.pairs: list[tuple[bytes, bytes]] = []
        self.deleted_dirs: list[bytes] = []
        self.counter = 0

    # -- trees --------------------------------------------------------------
    @staticmethod
    def _get(tree: dict, path: bytes):
        node = tree
        for part in path.split(b"/"):
            if not isinstance(node, dict):
                return None
            node = node.get(part)
            if node is None:
                return None
        return node

    @staticmethod
    def _set(tree: dict, path: bytes, value) -> None:
        parent = StackPlanner._get(tree, _parent(path)) if b"/" in path else tree
        parent[path.rsplit(b"/", 1)[-1]] = value

    def _remove_view(self, path: bytes) -> None:
        parent = self._get(self.view, _parent(path)) if b"/" in path else self.view
        del parent[path.rsplit(b"/", 1)[-1]]

    def _view_kind(self, path: bytes):
        node = self._get(self.view, path)
        return "d" if isinstance(node, dict) else node

    # -- attributes ---------------------------------------------------------
    def _mtime(self) -> int:
        return EPOCH_NS + self.k * DAY_NS + self.rng.randrange(DAY_NS)

    def _owner(self) -> tuple[int, int]:
        return self.rng.choice(OWNERS)

    def _dir_spec(self) -> DirSpec:
        r = self.rng.random()
        mode = 0o755 if r < 0.95 else (0o700 if r < 0.98 else 0o555)
        uid, gid = self._owner()
        xattrs = ((b"user.bench.dir", b"d%d" % self.counter),) if self.rng.random() < 0.01 else ()
        return DirSpec(mode, uid, gid, self._mtime(), xattrs=xattrs)

    def _new_name(self, ext: bool = True) -> bytes:
        self.counter += 1
        name = self.rng.choice(WORDS) + b"_%d" % self.counter
        return name + self.rng.choice(EXTS) if ext else name

    # -- layer-tree primitives ------------------------------------------------
    def _ensure_dir(self, path: bytes) -> bool:
        """Make ``path`` and its parents directories in this layer and the view.

        False (and nothing changed) if that would need an implicit type change
        or collide with a non-directory of this layer.
        """
        parts = path.split(b"/") if path else []
        lnode, vnode, prefix = self.layer_tree, self.view, b""
        for part in parts:  # check first, then create: no partial changes
            prefix = prefix + b"/" + part if prefix else part
            lchild = lnode.get(part) if isinstance(lnode, dict) else None
            vchild = vnode.get(part) if isinstance(vnode, dict) else None
            if (lchild is not None and not isinstance(lchild, dict)) or \
               (lchild is None and vchild is not None and not isinstance(vchild, dict)):
                return False
            lnode = lchild if lchild is not None else {}
            vnode = vchild if vchild is not None else {}
        lnode, vnode, prefix = self.layer_tree, self.view, b""
        for part in parts:
            prefix = prefix + b"/" + part if prefix else part
            if part not in lnode:
                lnode[part] = {}
                self.lp.dirs[prefix] = self._dir_spec()
            if part not in vnode:
                vnode[part] = {}
                self.view_dirs.append(prefix)
            lnode, vnode = lnode[part], vnode[part]
        return True

    def _free_in_layer(self, path: bytes) -> bool:
        """``path`` is not yet used by this layer and its parents can be made dirs."""
        return self._get(self.layer_tree, path) is None and self._ensure_dir(_parent(path))

    def _add_file(self, path: bytes, size: int | None = None) -> None:
        rng = self.rng
        if size is None:
            size = 0 if rng.random() < 0.05 else min(MAX_SIZE, int(rng.lognormvariate(7.0, 1.3)))
        r, acc, mode = rng.random(), 0.0, 0o644
        for m, p in FILE_MODES:
            acc += p
            if r < acc:
                mode = m
                break
        uid, gid = self._owner()
        xattrs = ()
        if rng.random() < 0.003:
            xattrs = ((b"user.bench", b"v%d" % self.counter),)
            if rng.random() < 0.3:
                xattrs += ((b"trusted.bench", b"t%d" % self.counter),)
        self.lp.files.append(FileSpec(path, mode, uid, gid, self._mtime(), size,
                                      rng.randrange(POOL_SIZE - size + 1), xattrs))
        self._set(self.layer_tree, path, "f")
        self._set(self.view, path, "f")
        self.view_files.append(path)

    def _add_symlink(self, path: bytes, target: bytes) -> None:
        uid, gid = self._owner()
        self.lp.symlinks.append(LinkSpec(path, target, uid, gid, self._mtime()))
        self._set(self.layer_tree, path, "l")
        self._set(self.view, path, "l")

    def _add_whiteout(self, path: bytes) -> None:
        self.lp.whiteouts.append(path)
        self._set(self.layer_tree, path, "w")
        self._remove_view(path)

    def _pick(self, candidates: list[bytes], kind: str, min_depth: int = 1):
        """A random path of ``kind`` in the view, not touched by this layer yet."""
        for _ in range(50):
            if not candidates:
                return None
            path = self.rng.choice(candidates)
            if _depth(path) >= min_depth and self._view_kind(path) == kind \
                    and self._free_in_layer(path):
                return path
        return None

    # -- placement of new entries ------------------------------------------
    def _new_dir(self) -> bytes:
        """A directory 3-6 deep for new files: mostly existing parents, some new."""
        rng = self.rng
        while True:
            depth, node, path = rng.randint(3, 6), self.view, b""
            for level in range(depth):
                last = level == depth - 1
                p_existing = 0.3 if last else (0.9 if level < 2 else 0.75)
                subdirs = [n for n, v in node.items() if isinstance(v, dict)] \
                    if rng.random() < p_existing else []
                if subdirs:
                    name = rng.choice(subdirs)
                elif level == 0:
                    name = rng.choice(TOP_DIRS)
                else:
                    name = self._new_name(ext=False)
                path = path + b"/" + name if path else name
                node = node.get(name, {}) if isinstance(node, dict) else {}
            if self._ensure_dir(path):
                return path

    def _new_files(self, n: int) -> None:
        left, quota, d = n, 0, b""
        while left > 0:
            if quota == 0:
                d, quota = self._new_dir(), self.rng.randint(1, 40)
            self._add_file(d + b"/" + self._new_name())
            left, quota = left - 1, quota - 1

    def _layer_dir(self) -> bytes:
        """A directory of this layer that is 3+ deep (for link names)."""
        return self.rng.choice(self._deep_dirs) if self._deep_dirs else self._new_dir()

    # -- the layer phases ----------------------------------------------------
    def _opaque_dirs(self, n: int) -> int:
        made = 0
        for _ in range(n):
            path = self._pick(self.view_dirs, "d", min_depth=2)
            if path is None or not self._ensure_dir(path):
                continue
            self.lp.dirs[path].opaque = True
            self._set(self.view, path, {})
            self._set(self.layer_tree, path, {})
            for _ in range(self.rng.randint(0, 4)):
                self._add_file(path + b"/" + self._new_name())
                made += 1
        return made

    def _whiteouts(self, files: int, dirs: int) -> None:
        for _ in range(dirs):
            path = self._pick(self.view_dirs, "d", min_depth=3)
            if path is not None:
                self._add_whiteout(path)
                self.deleted_dirs.append(path)
        for _ in range(files):
            path = self._pick(self.view_files, "f")
            if path is not None:
                self._add_whiteout(path)
        for a, b in self.rng.sample(self.pairs, min(1, len(self.pairs))):  # H3
            if self._view_kind(a) == "f" and self._free_in_layer(a):
                self._add_whiteout(a)

    def _overrides(self, n: int) -> int:
        made = 0
        for _ in range(n):
            path = self._pick(self.view_files, "f")
            if path is not None:
                self._add_file(path)
                made += 1
        for a, b in self.rng.sample(self.pairs, min(1, len(self.pairs))):  # H2
            if self._view_kind(b) == "f" and self._free_in_layer(b):
                self._add_file(b)
                made += 1
        return made

    def _type_changes(self, n: int) -> int:
        made = 0
        for _ in range(n):
            path = self._pick(self.view_files, "f", min_depth=3)   # file -> dir (M3)
            if path is not None:
                self._set(self.layer_tree, path, {})
                self._set(self.view, path, {})
                self.lp.dirs[path] = self._dir_spec()
                self.lp.dirs[path].replaces_nondir = True
                self._add_file(path + b"/" + self._new_name())
                made += 1
            path = self._pick(self.view_dirs, "d", min_depth=4)    # dir -> file (M2)
            if path is not None:
                self._add_file(path)
                made += 1
            path = self._pick(self.view_files, "f")                # file -> symlink
            if path is not None:
                self._add_symlink(path, b"../" + self._new_name())
                made += 1
        return made

    def _recreate_deleted(self) -> int:
        """D7: a directory deleted by an earlier layer comes back with new children."""
        made = 0
        for path in self.rng.sample(self.deleted_dirs, min(1, len(self.deleted_dirs))):
            if self._view_kind(path) is None and self._free_in_layer(path) \
                    and self._ensure_dir(path):
                self._add_file(path + b"/" + self._new_name())
                made += 1
        return made

    def _symlinks(self, n: int) -> None:
        for _ in range(n):
            d = self._layer_dir()
            r = self.rng.random()
            if r < 0.6 and self.view_files:
                target = os.path.relpath(self.rng.choice(self.view_files), d)
            elif r < 0.8:
                target = b"/usr/lib/" + self._new_name()
            elif r < 0.9:
                target = b".."
            else:
                target = None
            name = self._new_name()
            self._add_symlink(d + b"/" + name, target if target is not None else name)

    def _hardlinks(self, n: int) -> None:
        for _ in range(n):
            d = self._layer_dir()
            first = d + b"/" + self._new_name()
            self._add_file(first)
            second = self._layer_dir() + b"/" + self._new_name()
            self.lp.hardlinks.append((second, first))
            self._set(self.layer_tree, second, "f")
            self._set(self.view, second, "f")
            self.view_files.append(second)
            self.pairs.append((first, second))

    def _odd_entries(self) -> None:
        base = b"srv/odd names/\xe9t\xe9"
        self._ensure_dir(base)
        for name in ODD_NAMES:
            self._add_file(base + b"/" + name)
        self._ensure_dir(b"run")
        self.lp.specials.append(SpecialSpec(b"run/initctl", stat.S_IFIFO | 0o600, 0, self._mtime()))
        self.lp.specials.append(SpecialSpec(b"run/null", stat.S_IFCHR | 0o666,
                                            os.makedev(1, 3), self._mtime()))
        for s in self.lp.specials:
            self._set(self.layer_tree, s.path, "s")
            self._set(self.view, s.path, "s")

    def plan_layer(self, k: int, budget: int) -> LayerPlan:
        self.k, self.layer_tree = k, {}
        self.lp = LayerPlan(k, DirSpec(0o755, 0, 0, self._mtime()))
        made = 0
        if k == 0:
            self._odd_entries()
            made += len(ODD_NAMES)
        else:
            few = max(1, budget // 2000)
            made += self._opaque_dirs(few)
            self._whiteouts(files=max(1, budget // 100), dirs=few)
            made += self._overrides(budget * 5 // 100)
            made += self._type_changes(few)
            made += self._recreate_deleted()
        n_sym, n_hard = budget // 100, max(1, budget // 200)
        self._new_files(max(0, budget - made - n_sym - 2 * n_hard))
        self._deep_dirs = [p for p in self.lp.dirs if _depth(p) >= 3]
        self._symlinks(n_sym)
        self._hardlinks(n_hard)
        return self.lp

    def plan(self) -> list[LayerPlan]:
        if self.layers == 1:
            budgets = [self.files]
        else:
            first = self.files * 35 // 100
            rest = self.files - first
            each = [rest // (self.layers - 1)] * (self.layers - 1)
            each[-1] += rest - sum(each)
            budgets = [first] + each
        return [self.plan_layer(k, b) for k, b in enumerate(budgets)]


def plan_stack(layers: int = 8, files: int = 100_000, seed: int = 1) -> list[LayerPlan]:
    """The pure plan of a stack (no I/O)."""
    return StackPlanner(layers, files, seed).plan()


# -- writing ------------------------------------------------------------------
class LayerWriter:
    """Materialises one LayerPlan under a new directory, in one whiteout format."""

    def __init__(self, root: bytes, fmt: str, pool: bytes):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
        self.root, self.fmt, self.pool = root, fmt, memoryview(pool)
        self.as_root = os.geteuid() == 0
        if fmt == "overlay" and not self.as_root:
            raise PermissionError("overlay-format whiteouts (mknod char 0/0) need root")
        self.opaque_xattr = "trusted.overlay.opaque" if self.as_root else "user.overlay.opaque"

    def write(self, lp: LayerPlan) -> None:
        os.mkdir(self.root, 0o755)
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for path in sorted(lp.dirs):             # parents sort before children
                os.mkdir(path, 0o755, dir_fd=self.fd)
            for f in lp.files:
                self._file(f)
            for new, old in lp.hardlinks:
                os.link(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
            for s in lp.symlinks:
                self._symlink(s)
            for s in lp.specials:
                self._special(s)
            for path in lp.whiteouts:
                self._whiteout(path, lp.root.mtime_ns)
            for path in sorted(lp.dirs, reverse=True):  # children before parents (A2)
                self._dir_attrs(path, lp.dirs[path])
            self._dir_attrs(b".", lp.root)
        finally:
            os.close(self.fd)

    def _owner(self, path_or_fd, uid: int, gid: int, **kw) -> None:
        if self.as_root and (uid or gid):
            os.chown(path_or_fd, uid, gid, **kw)

    def _xattrs(self, target, xattrs) -> None:
        for name, value in xattrs:
            if self.as_root or not name.startswith(b"trusted."):
                os.setxattr(target, name, value)

    def _file(self, f: FileSpec) -> None:
        fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, f.mode & 0o777,
                     dir_fd=self.fd)
        try:
            if f.size:
                os.write(fd, self.pool[f.offset:f.offset + f.size])
            self._owner(fd, f.uid, f.gid)
            if f.mode & ~0o777 or (self.as_root and (f.uid or f.gid)):
                os.fchmod(fd, f.mode)                # A1: chown clears setuid, chmod after
            self._xattrs(fd, f.xattrs)
            os.utime(fd, ns=(f.mtime_ns, f.mtime_ns))
        finally:
            os.close(fd)

    def _symlink(self, s: LinkSpec) -> None:
        os.symlink(s.target, s.path, dir_fd=self.fd)
        self._owner(s.path, s.uid, s.gid, dir_fd=self.fd, follow_symlinks=False)
        os.utime(s.path, ns=(s.mtime_ns, s.mtime_ns), dir_fd=self.fd, follow_symlinks=False)

    def _special(self, s: SpecialSpec) -> None:
        if stat.S_ISCHR(s.mode) and not self.as_root:
            return                                   # device nodes need root
        os.mknod(s.path, s.mode, s.rdev, dir_fd=self.fd)
        os.utime(s.path, ns=(s.mtime_ns, s.mtime_ns), dir_fd=self.fd, follow_symlinks=False)

    def _whiteout(self, path: bytes, mtime_ns: int) -> None:
        if self.fmt == "overlay":
            os.mknod(path, stat.S_IFCHR, 0, dir_fd=self.fd)
        else:
            i = path.rfind(b"/")
            path = path[:i + 1] + b".wh." + path[i + 1:]
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644,
                             dir_fd=self.fd))
        os.utime(path, ns=(mtime_ns, mtime_ns), dir_fd=self.fd, follow_symlinks=False)

    def _dir_attrs(self, path: bytes, d: DirSpec) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            if d.opaque or (d.replaces_nondir and self.fmt == "overlay"):
                if self.fmt == "overlay":
                    os.setxattr(fd, self.opaque_xattr, b"y")
                else:
                    os.close(os.open(OCI_OPAQUE, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_CLOEXEC, 0o644, dir_fd=fd))
                    os.utime(OCI_OPAQUE, ns=(d.mtime_ns, d.mtime_ns), dir_fd=fd)
            self._owner(fd, d.uid, d.gid)
            os.fchmod(fd, d.mode)
            self._xattrs(fd, d.xattrs)
            os.utime(fd, ns=(d.mtime_ns, d.mtime_ns))
        finally:
            os.close(fd)


def layer_paths(outdir, layers: int) -> list[str]:
    return [os.path.join(os.fsdecode(outdir), f"l{k}") for k in range(layers)]


def _write_layers(paths, plans, fmt: str, seed: int) -> None:
    pool = random.Random(seed ^ 0x5EED).randbytes(POOL_SIZE)
    old_umask = os.umask(0)
    try:
        for path, lp in zip(paths, plans):
            LayerWriter(os.fsencode(path), fmt, pool).write(lp)
    finally:
        os.umask(old_umask)


def write_stack(outdir, plans: list[LayerPlan], fmt: str, seed: int, jobs: int = 0) -> list[str]:
    """Write every layer; ``jobs`` worker processes (0: one per CPU) share the layers.

    Layers are independent, so the split changes nothing but inode numbers.
    Creating inodes is mostly kernel time, which is why processes help.
    """
    paths = layer_paths(outdir, len(plans))
    jobs = min(jobs or os.cpu_count() or 1, len(plans))
    if jobs <= 1:
        _write_layers(paths, plans, fmt, seed)
        return paths
    order = sorted(range(len(plans)), key=lambda k: -len(plans[k].files))
    shares = [order[j::jobs] for j in range(jobs)]   # biggest layers spread first
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_layers, args=([paths[k] for k in share],
                                                     [plans[k] for k in share], fmt, seed))
             for share in shares]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"gen_stack: a writer process failed (exit codes {failed})")
    return paths


def generate(outdir, layers: int = 8, files: int = 100_000, seed: int = 1,
             fmt: str = "overlay", force: bool = False, jobs: int = 0) -> list[str]:
    """Write the stack to OUTDIR/l0.. (bottom first); returns the layer paths.

    Refuses to touch an OUTDIR that already holds a stack unless ``force``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
    outdir = os.fsdecode(outdir)
    os.makedirs(outdir, exist_ok=True)
    existing = [n for n in os.listdir(outdir) if n == "stack.json"
                or (n.startswith("l") and n[1:].isdigit())]
    if existing and not force:
        raise FileExistsError(f"{outdir} already holds a stack ({', '.join(sorted(existing))}); "
                              "use force=True / --force to replace it")
    for name in existing:
        p = os.path.join(outdir, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    t0 = time.perf_counter()
    plans = plan_stack(layers, files, seed)
    t1 = time.perf_counter()
    paths = write_stack(outdir, plans, fmt, seed, jobs)
    t2 = time.perf_counter()
    meta = {"generator_version": GENERATOR_VERSION, "layers": layers, "files": files,
            "seed": seed, "format": fmt, "plan_seconds": round(t1 - t0, 3),
            "write_seconds": round(t2 - t1, 3), "counts": [lp.counts() for lp in plans]}
    with open(os.path.join(outdir, "stack.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return paths


def read_meta(outdir) -> dict | None:
    try:
        with open(os.path.join(os.fsdecode(outdir), "stack.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ensure_stack(outdir, layers: int = 8, files: int = 100_000, seed: int = 1,
                 fmt: str = "overlay") -> list[str]:
    """Reuse OUTDIR if its stack.json matches these parameters, else (re)generate it."""
    meta = read_meta(outdir)
    want = {"generator_version": GENERATOR_VERSION, "layers": layers, "files": files,
            "seed": seed, "format": fmt}
    if meta and all(meta.get(k) == v for k, v in want.items()) \
            and all(os.path.isdir(p) for p in layer_paths(outdir, layers)):
        return layer_paths(outdir, layers)
    return generate(outdir, layers, files, seed, fmt, force=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--format", choices=FORMATS, default="overlay")
    ap.add_argument("--force", action="store_true", help="replace an existing stack in OUTDIR")
    ap.add_argument("--jobs", type=int, default=0, help="writer processes (default: one per CPU)")
    args = ap.parse_args(argv)
    try:
        paths = generate(args.outdir, args.layers, args.files, args.seed, args.format,
                         args.force, args.jobs)
    except (FileExistsError, PermissionError, ValueError) as e:
        print(f"gen_stack: {e}", file=sys.stderr)
        return 2
    meta = read_meta(args.outdir)
    total = {k: sum(c[k] for c in meta["counts"]) for k in meta["counts"][0]}
    print(f"wrote {len(paths)} layers to {args.outdir} in "
          f"{meta['plan_seconds'] + meta['write_seconds']:.1f}s "
          f"(plan {meta['plan_seconds']:.1f}s, write {meta['write_seconds']:.1f}s): "
          + ", ".join(f"{v} {k}" for k, v in total.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
