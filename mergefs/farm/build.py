"""Publishing a build (staging dir + rename) and ``build_farm``."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

from .. import syscalls
from ..errors import AlreadyExists, InvalidArgument, NotFound
from ..layer import Layer, as_layers, mark_overlay
from ..plan import plan_merge
from .applier import Applier, FarmStats
from .schedule import run_processes, run_threads

PARALLEL = ("auto", "process", "thread")


def staged_build(out: str | os.PathLike, build) -> FarmStats:
    """Run ``build(staging_fd)`` in a staging dir next to ``out``, then publish by rename.

    The result is marked overlay format (``mergefs.layer``): a farm, a diff and
    a directory export are read back as such, whatever their names.

    ``out`` must not exist. On any error the staging dir is removed and
    nothing is left at ``out``.
    """
    out = Path(os.fsdecode(out)).absolute()
    if os.path.lexists(out):
        raise AlreadyExists(f"{out} already exists")
    if not out.parent.is_dir():
        raise NotFound(f"parent directory {out.parent} does not exist")
    staging = out.parent / f".{out.name}.mergefs-staging-{uuid.uuid4().hex[:12]}"
    os.mkdir(staging, 0o700)
    try:
        fd = os.open(staging, syscalls.O_DIR)
        try:
            stats = build(fd)
            mark_overlay(fd)      # what mergefs writes is overlay format, whatever its names
        finally:
            os.close(fd)
        try:
            syscalls.rename_noreplace(staging, out)
        except FileExistsError:
            raise AlreadyExists(f"{out} already exists") from None
    except BaseException:
        syscalls.rmtree(staging, ignore_errors=True)
        raise
    return stats


# Workers when the caller does not say, measured by tools/bench_farm.py on 2
# cores: 2 processes halve a warm build and 4 also overlap a cold build's
# directory reads; beyond 2 threads only add GIL contention.
DEFAULT_WORKERS = {"process": min(4, 2 * (os.cpu_count() or 1)), "thread": 2}


def pick_parallel(layers: Sequence[Layer], dst_fd: int, parallel: str) -> str:
    """``process`` when it is safe and pays, else ``thread``.

    Forking is only safe from a single-threaded process (a lock held by
    another thread stays locked in the child), and when a layer is on
    another filesystem every one of its entries is copied, which threads do
    in parallel but processes defer to one applier (H1).
    """
    if parallel != "auto":
        return parallel
    if len(os.listdir("/proc/self/task")) > 1:    # every OS thread, not only Python's
        return "thread"
    dev = os.fstat(dst_fd).st_dev
    if any(os.fstat(layer.fd).st_dev != dev for layer in layers):
        return "thread"
    return "process"


def build_farm(layers: Sequence[Layer | str | os.PathLike], out: str | os.PathLike,
               workers: int | None = None, parallel: str = "auto", progress=None) -> FarmStats:
    """Materialise Merge(layers) (bottom first) as a hardlink farm at ``out``.

    ``workers`` > 1 builds it with that many forked processes or threads
    (``parallel``: auto, process, thread; see ``mergefs.farm.schedule``);
    1 runs the sequential plan, in name order; None: ``DEFAULT_WORKERS``.
    ``progress(entries)``, if given, is called from time to time with the
    number of entries (directories and links) built so far; the caller's
    thread calls it, except in threads mode (a worker thread, under a lock).
    """
    if parallel not in PARALLEL:
        raise ValueError(f"unknown parallel mode {parallel!r}; use one of {PARALLEL}")
    layers = as_layers(layers)

    def build(fd: int) -> FarmStats:
        if workers is not None and workers <= 1:
            applier = Applier(layers, fd)
            records = plan_merge(layers, applier.src)    # the planner moves the applier's cursors
            return applier.run(records if progress is None else _counted(records, progress))
        mode = pick_parallel(layers, fd, parallel)
        n = DEFAULT_WORKERS[mode] if workers is None else workers
        if mode == "process":
            return run_processes(layers, fd, n, progress)
        return run_threads(layers, fd, n, progress=progress)

    refuse_out_inside(layers, out)
    try:
        for layer in layers:
            layer.fd   # open every layer first: a bad one fails before any work
        return staged_build(out, build)
    finally:
        for layer in layers:
            layer.close()


def refuse_out_inside(layers, out, role: str = "input layer") -> None:
    """An output inside an input layer would be built into (and read from) that input.

    Compared by identity, not by name: every existing ancestor of ``out``
    (symlinks resolved) is checked against each layer root's (st_dev, st_ino),
    so a symlink to a layer or a bind mount of it is caught too.
    """
    roots = {}
    for layer in layers:
        try:
            st = os.stat(layer.path)
        except OSError:
            continue            # a missing input fails later with its own message
        roots[(st.st_dev, st.st_ino)] = layer.path
    for anc in _existing_ancestors(os.fsencode(out)):
        st = os.stat(anc)
        hit = roots.get((st.st_dev, st.st_ino))
        if hit is not None:
            raise InvalidArgument(f"the output {os.fsdecode(out)!r} is inside the {role} "
                                  f"{os.fsdecode(hit)!r}; put it outside every input")


def _existing_ancestors(path: bytes):
    """``path`` (if it exists) and every directory above it, up to ``/``, symlinks resolved."""
    cur = os.path.realpath(os.path.abspath(path))
    while True:
        if os.path.exists(cur):
            yield cur
        parent = os.path.dirname(cur)
        if parent == cur:
            return
        cur = parent


def _counted(records, progress, every: int = 1024):
    """``records`` unchanged; ``progress(n)`` after every ``every`` of them."""
    n = 0
    for n, rec in enumerate(records, 1):
        yield rec
        if n % every == 0:
            progress(n)
    progress(n)
