"""Parallel farm builds: one merged directory is one unit of work.

``dir_step`` builds a directory's own entries (``Mkdir`` for subdirectories,
links for the rest) and then applies its attributes. That order is all A2
asks: a directory's mtime changes only when an entry is made *in* it, and
those are all made by the same step, so directories are independent units
and any worker may take any of them once its parent's step made it.

Two exceptions are collected and applied at the end by ``finish``, in one
place and one order:

* links that need a copy, when the worker is a process (H1 needs every copy
  of an inode to go through one applier, see ``Applier.deferred``); the
  directory's attributes follow its copies;
* directories whose mode lacks ``rwx`` for the owner. A non-root build
  cannot chown, so the farm's directories are the builder's own; a layer
  directory others may enter but its owner may not (0o055) would lock the
  builder out of everything below it. They are applied last, deepest first.

Two schedulers share ``dir_step``:

* ``run_threads``: a shared stack of directories. Links and mkdirs release
  the GIL, so threads overlap kernel work (most of a cold build); a warm
  build is CPU-bound and threads then contend for the GIL.
* ``run_processes``: forked workers, no GIL. The caller first builds the
  first ``SPLIT_MIN`` entries itself (small merges never fork), then workers
  take the remaining directories from that list through a shared counter,
  each working depth first on a private stack; a worker that runs dry is
  *hungry*, and a busy worker that sees it hands over the shallowest
  directory on its stack (the biggest untouched subtree) through a pipe.
  The caller only supervises: a worker that dies (killed, out of memory)
  fails the build at once instead of hanging the others, and workers die
  with a killed caller (PR_SET_PDEATHSIG) instead of building on. Where
  no worker can start (no writable /dev/shm for the pool's semaphores, as
  in some sandboxes; fork refused under a pids limit), threads finish what
  the caller started; if only some start, they do the work.
"""
from __future__ import annotations

import os
import pickle
import struct
import threading
from typing import Sequence

from .. import syscalls
from ..layer import Layer
from ..plan import DirAttrs, MergedDir, plan_entries
from ..resolver import join
from .applier import Applier, FarmStats, merge_stats

Item = tuple  # (path, sources): a merged directory to build, as MergedDir takes it

OWNER_RWX = 0o700


def root_item(layers: Sequence[Layer]) -> Item:
    return (b"", tuple(range(len(layers) - 1, -1, -1)))


def dir_step(layers: Sequence[Layer], applier: Applier, item: Item,
             late: list) -> list[Item]:
    """Build one merged directory's entries, then its attributes; its subdirectories."""
    path, sources = item
    md = MergedDir(layers, path, sources, applier.src)     # one step from the last one
    md.release()
    records, subdirs = plan_entries(md)
    deferred = applier.deferred
    mark = len(deferred) if deferred is not None else 0
    applier.apply(records)
    attrs = DirAttrs(path, md.meta)
    if md.meta.mode & OWNER_RWX != OWNER_RWX:
        late.append(attrs)
    elif deferred is not None and len(deferred) > mark:
        deferred.append(attrs)           # after the copies made into it
    else:
        applier.apply((attrs,))
    children = md.children
    return [(join(path, name), children[name].layers) for name in subdirs]


def finish(layers: Sequence[Layer], dst_fd: int, deferred: list, late: list,
           copies: dict | None = None) -> FarmStats:
    """Apply what ``dir_step`` set aside: deferred copies, then restrictive dirs.
    ``copies``: the copies other appliers of this build made (H1)."""
    late.sort(key=lambda rec: rec.path.count(b"/"), reverse=True)
    return Applier(layers, dst_fd, copies).run(deferred + late)


# -- threads ----------------------------------------------------------------------
def run_threads(layers: Sequence[Layer], dst_fd: int, workers: int,
                todo: list[Item] | None = None, copies: dict | None = None,
                progress=None, base: int = 0) -> FarmStats:
    """Build Merge(layers) into ``dst_fd`` with ``workers`` threads (or, given
    ``todo``, the directories on that stack and everything below them; the
    copies they make are recorded in ``copies``)."""
    cond = threading.Condition()
    todo = [root_item(layers)] if todo is None else todo
    state = {"active": 0, "error": None}
    late: list = []
    copies, copy_lock = {} if copies is None else copies, threading.Lock()
    appliers = [Applier(layers, dst_fd, copies, copy_lock) for _ in range(workers)]

    def worker(applier: Applier) -> None:
        while True:
            with cond:
                while not todo and state["active"] and state["error"] is None:
                    cond.wait()
                if state["error"] is not None or not todo:
                    cond.notify_all()
                    return
                item = todo.pop()
                state["active"] += 1
            try:
                more = dir_step(layers, applier, item, late)
            except BaseException as e:
                more = []
                with cond:
                    state["error"] = state["error"] or e
            with cond:
                todo.extend(reversed(more))
                state["active"] -= 1
                if progress is not None:
                    progress(base + sum(a.stats.links + a.stats.dirs for a in appliers))
                cond.notify_all()

    threads = [threading.Thread(target=worker, args=(a,), name=f"farm-{i}")
               for i, a in enumerate(appliers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a in appliers:
        a.close()
    if state["error"] is not None:
        raise state["error"]
    return merge_stats([a.stats for a in appliers] + [finish(layers, dst_fd, [], late, copies)])


# -- processes --------------------------------------------------------------------
# The caller builds this many entries itself before it forks. Measured on 2
# cores, warm, journaled ext4, 8-layer gen_stack trees (sequential / forking
# after 1,024 / after 4,096 entries): 1.5k files 25 / 41 / 29 ms, 3k 44 / 49 /
# 44 ms, 6k 87 / 73 / 96 ms, 10k 175 / 110 / 152 ms; a 6.8k-entry Debian
# minbase 122 / 103 / 120 ms. Starting 4 workers costs ~10 ms, so merges of
# 1-4k entries lose up to that, and every bigger one gains more.
SPLIT_MIN = 1024

# slots of the shared counters (guarded by the condition's lock)
NEXT, DONATED, ACTIVE, HUNGRY, FAILED = range(5)
PROGRESS_EVERY = 0.1      # seconds between progress reports while workers run


class WorkerDied(RuntimeError):
    """A farm worker process ended without reporting (killed, out of memory)."""


class PoolUnavailable(OSError):
    """No worker could be started: no POSIX semaphores for the pool (a sandbox
    without a writable /dev/shm) or fork refused (EAGAIN under a pids limit,
    ENOMEM). Threads finish the build instead."""


class _Pool:
    """The work shared by forked workers: a list fixed before the fork, read
    through a shared counter, plus directories handed over through a pipe."""

    def __init__(self, ctx, initial: list[Item], workers: int):
        self.initial = initial
        self.cond = ctx.Condition()
        self.n = ctx.RawArray("q", 5)
        self.built = ctx.RawArray("q", workers)     # entries per worker, for progress only
        self.rfd, self.wfd = os.pipe()

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)

    def failed(self) -> bool:
        return bool(self.n[FAILED])

    def join(self) -> None:
        """A worker starts, counted as busy until its first ``take``."""
        with self.cond:
            self.n[ACTIVE] += 1

    def fail(self) -> None:
        with self.cond:
            self.n[FAILED] = 1
            self.cond.notify_all()

    def take(self) -> Item | None:
        """The next directory for a worker that has none; None when all is done."""
        n = self.n
        with self.cond:
            n[ACTIVE] -= 1
            while True:
                if n[FAILED]:
                    return None
                if n[NEXT] < len(self.initial):
                    n[NEXT] += 1
                    n[ACTIVE] += 1
                    return self.initial[n[NEXT] - 1]
                if n[DONATED]:
                    n[DONATED] -= 1
                    n[ACTIVE] += 1
                    return self._read()
                if n[ACTIVE] == 0:       # nobody holds work that could be shared
                    self.cond.notify_all()
                    return None
                n[HUNGRY] += 1
                self.cond.wait()
                n[HUNGRY] -= 1

    def share(self, stack: list[Item]) -> None:
        """Hand the bottom of ``stack`` to a hungry worker (cheap when none is)."""
        n = self.n
        if not n[HUNGRY] or len(stack) < 2:     # unlocked read: a hint
            return
        with self.cond:
            if n[HUNGRY] > n[DONATED]:
                # at most workers-1 items of < 8 KiB wait in the pipe: it never fills
                data = pickle.dumps(stack.pop(0))
                data = struct.pack("I", len(data)) + data
                while data:
                    data = data[os.write(self.wfd, data):]
                n[DONATED] += 1
                self.cond.notify()

    def _read(self) -> Item:
        size = struct.unpack("I", self._read_exactly(4))[0]
        return pickle.loads(self._read_exactly(size))

    def _read_exactly(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            out += os.read(self.rfd, size - len(out))
        return out


def _work(layers: Sequence[Layer], dst_fd: int, pool: _Pool, conn, parent: int,
          slot: int) -> None:
    """A worker process: build directories until the pool is empty, then report."""
    syscalls.die_with_parent(parent)     # a killed caller takes its workers along
    pool.join()
    applier = Applier(layers, dst_fd, deferred=[])
    late: list = []
    stack: list[Item] = []
    try:
        while not pool.failed():
            if not stack:
                item = pool.take()
                if item is None:
                    break
                stack.append(item)
            stack.extend(reversed(dir_step(layers, applier, stack.pop(), late)))
            pool.built[slot] = applier.stats.links + applier.stats.dirs   # this worker's own slot
            pool.share(stack)
        report = ("ok", applier.stats, applier.deferred, late)
    except BaseException as e:
        pool.fail()
        report = ("error", e)
    finally:
        applier.close()
    try:
        conn.send(report)
    except Exception as e:      # an exception that does not pickle
        conn.send(("error", RuntimeError(f"farm worker failed: {report[1]!r} ({e})")))


def run_processes(layers: Sequence[Layer], dst_fd: int, workers: int,
                  progress=None) -> FarmStats:
    """Build Merge(layers) into ``dst_fd`` with ``workers`` forked processes.

    Only call from a single-threaded process: a fork copies only the calling
    thread, and a lock another thread holds would stay locked in the child.
    """
    applier = Applier(layers, dst_fd, deferred=[])
    late: list = []
    stack = [root_item(layers)]
    try:
        while stack and applier.stats.links + applier.stats.dirs < SPLIT_MIN:
            stack.extend(reversed(dir_step(layers, applier, stack.pop(), late)))
    finally:
        applier.close()
    parts = [applier.stats]
    deferred, copies = applier.deferred, {}
    base = applier.stats.links + applier.stats.dirs
    if stack:
        try:
            for _, stats, their_deferred, their_late in _run_pool(
                    layers, dst_fd, stack[::-1], workers,            # shallowest first
                    progress and (lambda n: progress(base + n))):
                parts.append(stats)
                deferred += their_deferred
                late += their_late
        except PoolUnavailable:              # raised before any worker ran
            parts.append(run_threads(layers, dst_fd, workers, stack, copies, progress, base))
    parts.append(finish(layers, dst_fd, deferred, late, copies))
    return merge_stats(parts)


def _run_pool(layers, dst_fd: int, initial: list[Item], workers: int,
              progress=None) -> list[tuple]:
    """Run ``workers`` processes over ``initial``; their reports, or the first error.

    With ``progress``, the caller wakes every ``PROGRESS_EVERY`` s to report
    the entries the workers have built (each writes its own counter)."""
    import multiprocessing.connection    # here: a merge that never forks skips its import
    ctx = multiprocessing.get_context("fork")
    try:
        pool = _Pool(ctx, initial, workers)
    except OSError as e:
        raise PoolUnavailable(e) from e
    procs, conns = [], {}
    try:
        for i in range(workers):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_work, args=(layers, dst_fd, pool, send, os.getpid(), i),
                            name=f"mergefs-farm-{i}", daemon=True)
            try:
                p.start()
            except OSError as e:             # fork refused: go on with the started ones
                recv.close()
                send.close()
                if not procs:
                    raise PoolUnavailable(e) from e
                break
            send.close()
            procs.append(p)
            conns[recv] = p
        reports, error = [], None
        waiting = dict(conns)
        while waiting:
            ready = multiprocessing.connection.wait(
                list(waiting), None if progress is None else PROGRESS_EVERY)
            if progress is not None:
                progress(sum(pool.built))
            for conn in ready:
                p = waiting.pop(conn)
                try:
                    report = conn.recv()
                except EOFError:             # died before it could report
                    p.join()
                    raise WorkerDied(f"farm worker {p.pid} ended without a report "
                                     f"(exit code {p.exitcode})") from None
                if report[0] == "error":
                    error = error or report[1]
                else:
                    reports.append(report)
        if error is not None:
            raise error
        return reports
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for conn in conns:
            conn.close()
        pool.close()
