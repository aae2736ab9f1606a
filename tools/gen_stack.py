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

The planner (``plan_stack``, in tools/stack_plan.py) is pure; ``write_stack``
materialises a plan.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stack_plan import (FORMATS, GENERATOR_VERSION, OCI_OPAQUE, POOL_SIZE,  # noqa: E402
                        DirSpec, FileSpec, LayerPlan, LinkSpec, SpecialSpec, plan_stack)

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
