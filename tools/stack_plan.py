"""The pure half of tools/gen_stack.py: what a generated stack holds.

``plan_stack(layers, files, seed)`` returns one ``LayerPlan`` per layer,
bottom first, with no I/O; gen_stack's ``LayerWriter`` materialises them. See
gen_stack's docstring for what a stack holds and why.
"""
from __future__ import annotations

import os
import random
import stat
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
