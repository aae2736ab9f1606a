"""Serving a MountSpec: ``serve()`` in the foreground, ``start()`` detached.

pyfuse3 has one FUSE session per process, so each union mount is its own
server process. ``start()`` forks (or, inside a trio loop or a threaded
process, runs ``python -m mergefs.union.server``) into a new session with
stdio on a log file (never a terminal) and waits on a pipe until the child
reports the mount live ("ok") or why it failed; only then does the caller's
``mergefs mount`` return. ``unmount()`` also cleans a mount whose
server died ("Transport endpoint is not connected", U7).

Lifecycle in the server: open the layers, ``pyfuse3.init`` (the kernel mount
exists from here), report ready, run ``pyfuse3.main`` beside a task that turns
SIGTERM/SIGINT into ``pyfuse3.terminate()``; always ``pyfuse3.close()`` and
close the layer fds, in that order.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import re
import signal
import stat
import sys

from ..errors import MountError
from ..mountspec import MountSpec
from .unmount import (FSTYPE, clean_stale, is_dead, is_mergefs_mount,  # noqa: F401
                      is_mounted, mount_at, unmount)

# pyfuse3 and trio (imported, ~150-300 ms of the mount command's time) are
# imported by the server process only: ``mergefs mount`` forks before it
# imports them, so its own exit stays cheap and the mount goes live sooner.
# The rest of what only some paths use (json, hashlib, subprocess, argparse)
# is imported where used: the server must answer its first request soon
# (tests/union/test_startup_imports.py guards the import set).

log = logging.getLogger("mergefs.union")
READY_TIMEOUT = 30.0


def build_view(spec: MountSpec, fmt: str = "auto"):
    from ..layer import Layer
    from .view import UnionView
    lowers = [Layer(p, fmt) for p in spec.lowers]
    if spec.upper is None:
        return UnionView(lowers)
    from .writable import WritableView
    return WritableView(lowers, spec.upper, spec.work)


def fuse_options(spec: MountSpec) -> set[str]:
    """default_permissions always (U6); allow_other only when asked."""
    opts = {"fsname=mergefs", "subtype=mergefs", "default_permissions"}
    if spec.allow_other:
        opts.add("allow_other")
    if not spec.writable:
        opts.add("ro")
    opts.update(spec.options)
    return opts


async def _run() -> None:
    import pyfuse3
    import trio

    from .fastpath import log_counts
    async with trio.open_nursery() as nursery:
        async def on_signal(task_status=trio.TASK_STATUS_IGNORED):
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                           signal.SIGUSR1) as sigs:
                task_status.started()
                async for sig in sigs:
                    if sig == signal.SIGUSR1:
                        log_counts()
                        continue
                    log.info("signal received, stopping")
                    global SIGNALLED
                    SIGNALLED = True
                    pyfuse3.terminate()
                    return
        # Handlers installed before the first request is served: the request
        # loop may keep trio busy for a while (below), and a SIGTERM meanwhile
        # must stop the server, not kill it with the mount left behind.
        await nursery.start(on_signal)
        # One worker task: every handler runs to completion without awaiting, so
        # more workers only add a second task that takes the read lock in turn
        # (two trio scheduler passes and epoll waits per request instead of one);
        # with one, the next request can be awaited in poll(2) (fuseloop).
        from . import fuseloop
        if not fuseloop.install():
            log.info("pyfuse3's own request wait (this pyfuse3 has no _wait_fuse_readable, "
                     "or no unique /dev/fuse fd was found)")
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


# a signal stopped the server (not its unmount): a mount server's server then
# exits rather than wait for another mount (``prefork._handed_over_in_loop``)
SIGNALLED = False

INODE_FH_MARKER = "MERGEFS_INODE_FH"


def module_digest(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def module_identity(path: str) -> str:
    """The file's inode, size, mtime and ctime: any rewrite or replacement
    changes the ctime, which no one can set back."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def pyfuse3_passes_inode(writes: bool = False) -> bool:
    """Is this pyfuse3 the build that hands read()/readdir() the inode when fh is 0
    (``writes``: also write()/fsync(), and turns atomic O_TRUNC off on request: a
    v4 build or later, what a writable mount needs to run no-open)?

    Such a build carries a marker file beside its module naming the module's
    sha256 (tools/bootstrap.sh installs it with tools/pyfuse3_inode_fh.py), so
    a stock module put back by pip under a stale marker is not mistaken for
    it; stock pyfuse3 3.5.0 then keeps real opens. The installer also notes
    the module file's identity (``file DEV:INO:SIZE:MTIME:CTIME``): while
    that still matches, the digest it checked stands and is not recomputed
    (hashing loads OpenSSL, ~10 ms of a mount's start-up). ``MERGEFS_NO_OPEN=0``
    keeps real opens with either build (for comparisons and debugging).

    The answer is kept for the process (the module it loaded does not change
    under it): a mount server asks before it forks (``mountsvc``), so its
    servers, and each later mount of one, do not read the marker again, nor
    hash the module where its identity no longer matches (a touched file: 1-5
    ms of each mount's start).
    """
    if os.environ.get("MERGEFS_NO_OPEN") == "0":
        return False
    import pyfuse3
    key = (pyfuse3.__file__, writes)
    if key not in _PASSES_INODE:
        _PASSES_INODE[key] = marked_inode_fh(pyfuse3.__file__, writes)
    return _PASSES_INODE[key]


_PASSES_INODE: dict[tuple[str, bool], bool] = {}


def marked_inode_fh(module: str, writes: bool = False) -> bool:
    """Does the marker beside ``module`` name it (identity, else digest), and, for
    ``writes``, is it of patch version 4 or later (its first word, "v4:")?"""
    try:
        with open(os.path.join(os.path.dirname(module), INODE_FH_MARKER)) as f:
            words = f.read().split()
    except FileNotFoundError:
        return False
    if len(words) < 2 or words[-2] != "sha256":
        return False
    if writes:
        version = re.match(r"v(\d+)", words[0])
        if version is None or int(version.group(1)) < 4:
            return False
    if "file" in words[:-3] and words[words.index("file") + 1] == module_identity(module):
        return True
    return words[-1] == module_digest(module)


def _start_counts() -> None:
    """A server's request counts start at zero: one forked from a process that
    served requests in-process (a test run) inherits that process's counts."""
    from .fastpath import request_counts, spin_stats
    request_counts(reset=True)
    spin_stats()


def serve(spec: MountSpec, mountpoint: str, fmt: str = "auto", ready=None) -> None:
    """Serve ``spec`` at ``mountpoint`` until unmounted or signalled."""
    with contextlib.closing(build_view(spec, fmt)) as view:
        _serve(spec, view, mountpoint, mountpoint, ready)


# The cyclic GC while serving: with Python's default (a young collection every
# 700 allocations, a full one at every 25% growth) a listing of 40k new entries
# makes it scan the inode table, listings and nodes over and over, ~10-20% of a
# `find`'s server CPU; they hold no reference cycles (an exception's traceback
# does, and waits a little longer for its collection).
GC_THRESHOLDS = (50_000, 20, 20)


def _serve(spec: MountSpec, view, target: str, mountpoint: str, ready=None) -> None:
    """Serve ``view`` through libfuse at ``target``: ``mountpoint`` itself (libfuse
    mounts and unmounts it) or ``/dev/fd/N``, a connection mounted already (then
    a dead mount left at ``mountpoint`` is unmounted here: libfuse did not mount it)."""
    import trio
    trio.run(_serve_in_loop, spec, view, target, mountpoint, ready)


async def _serve_in_loop(spec: MountSpec, view, target: str, mountpoint: str,
                         ready=None) -> None:
    """``_serve`` in a running trio loop."""
    import pyfuse3
    from .ops import UnionOperations
    adopted = target != mountpoint
    ops = UnionOperations(view, no_open=pyfuse3_passes_inode(writes=spec.writable),
                          volatile=spec.volatile,
                          squash=(spec.squash_uid, spec.squash_gid))
    pyfuse3.init(ops, target, fuse_options(spec))
    if spec.writable:
        from . import fastpath
        fastpath.prepare_io()       # before the kernel's INIT is read (ops.init agrees it)
    clean = False
    try:
        log.info("serving %d layers at %s (%s%s)", len(spec.lowers), mountpoint,
                 "writable" if spec.writable else "read-only", ", no-open" if ops.no_open else "")
        if ready is not None:
            ready()
        _start_counts()
        gc.set_threshold(*GC_THRESHOLDS)
        await _run()
        clean = True
    except BaseException:
        log.exception("server stopped by an error")
        raise
    finally:
        pyfuse3.close(unmount=not adopted)
        ops.close()
        if adopted and is_mergefs_mount(mountpoint) and is_dead(mountpoint):
            with contextlib.suppress(OSError):
                syscalls_umount(mountpoint)
        log.info("stopped")
        if clean:
            drop_quiet_log(mountpoint)


def drop_quiet_log(mountpoint: str) -> bool:
    """Remove this server's log if it is the default one of ``mountpoint``
    (``default_log_path``, where stderr points) and says nothing but INFO lines
    (serving, stopped, request counts): gone with its mount, as a container's
    is with the container, instead of one file per container piling up in
    /run/mergefs until the next boot. A warning, an error or anything written
    to stderr keeps it. True if removed."""
    try:
        path = os.readlink("/proc/self/fd/2")
        if path != default_log_path(mountpoint):
            return False                  # --log FILE, a terminal, a pipe: the caller's
        with open(path, "rb") as f:
            data = f.read(1 << 16)
        if len(data) == 1 << 16 or not all(b" INFO " in line for line in data.splitlines()):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False


def default_log_path(mountpoint: str) -> str:
    """/run/mergefs as root; else (also uid 0 of a user namespace, which cannot
    write /run) $XDG_RUNTIME_DIR/mergefs, or /tmp/mergefs-UID."""
    user = os.path.join(os.environ["XDG_RUNTIME_DIR"], "mergefs") \
        if os.environ.get("XDG_RUNTIME_DIR") else f"/tmp/mergefs-{os.getuid()}"
    base = user
    if os.geteuid() == 0:
        try:
            os.makedirs("/run/mergefs", exist_ok=True)
            if os.access("/run/mergefs", os.W_OK):
                base = "/run/mergefs"
        except PermissionError:
            pass
    os.makedirs(base, exist_ok=True)
    name = os.path.abspath(mountpoint).strip("/").replace("/", "_") or "root"
    return os.path.join(base, f"mount-{name}.log")


def create_log(log_path: str) -> None:
    """Create the server's log file (kept if it exists) before anything is mounted:
    it exists when ``start`` returns, though the server opens it only later (for
    appending, so nothing is lost), and a path that cannot be a file fails here."""
    try:
        os.close(open_log(log_path))
    except OSError as exc:
        raise MountError(f"cannot open the log file {log_path}: {exc.strerror}") from None


def start(spec: MountSpec, mountpoint: str, fmt: str = "auto", log_path: str | None = None) -> int:
    """Start a detached server; return its pid once the mount is live.

    The server is this process forked (no new interpreter, no re-import: the
    mount is live in milliseconds) when that is safe -- one thread and no trio
    loop running here; otherwise a fresh ``python -m mergefs.union.server``.
    """
    mountpoint = os.path.abspath(mountpoint)
    if is_mounted(mountpoint):      # one read of the mount table when nothing is there
        clean_stale(mountpoint)
        if is_mounted(mountpoint):
            raise MountError(f"{mountpoint} is already a mount point")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint!r} is not a directory")
    default_log = log_path is None
    log_path = log_path or default_log_path(mountpoint)
    create_log(log_path)
    try:
        return _start_logged(spec, mountpoint, fmt, log_path)
    except BaseException:
        if default_log:               # made here, and nothing was written to it
            with contextlib.suppress(OSError):
                if os.stat(log_path).st_size == 0:
                    os.unlink(log_path)
        raise


def _start_logged(spec: MountSpec, mountpoint: str, fmt: str, log_path: str) -> int:
    """``start`` once the log file exists."""
    from . import prefork
    pre = prefork.take()            # a server forked early by the CLI, if any
    try:
        if os.geteuid() == 0 and _can_fork() and premountable(spec):
            pid = _start_premounted(spec, mountpoint, fmt, log_path, pre)
            if pid is not None:
                return pid
        if pre is not None:         # it mounts through libfuse and reports
            r = pre.take_reply()
            pid = pre.hand_over(spec, mountpoint, fmt, log_path, mounted=False)
        else:
            r, w = os.pipe()
            try:
                pid = _fork_server(spec, mountpoint, fmt, log_path, w, r) if _can_fork() else \
                    _spawn_server(spec, mountpoint, fmt, log_path, w)
            finally:
                os.close(w)
    finally:
        if pre is not None:
            pre.close()             # idempotent; without a hand-over the child exits
    try:
        msg = _read_ready(r, pid)
    finally:
        os.close(r)
    if msg != b"ok":
        _reap(pid, kill=True)
        raise MountError(f"mounting {mountpoint} failed: {msg.decode(errors='replace')} "
                         f"(log: {log_path})")
    return pid


# -- the fast path: the mount made here, served by a forked child -----------------
# Run as root with only these options, ``start()`` opens /dev/fuse and mounts
# it itself (what libfuse would do), then forks the server, which imports
# pyfuse3 and trio and adopts the fd (libfuse's ``/dev/fd/N`` mount point). The
# command returns once the kernel mount exists; requests made before the server
# reads them wait in the connection, and if the server dies first the kernel
# aborts the connection (ENOTCONN; ``umount`` and the next mount clean it up).
# Everything that can fail on bad input (layers, upper, options) fails here first.
MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "sync": 16, "noatime": 1024,
               "nodiratime": 2048, "relatime": 1 << 21, "lazytime": 1 << 25}
CLEAR_FLAGS = {"suid": 2, "dev": 4, "exec": 8, "rw": 1, "async": 16, "atime": 1024,
               "diratime": 2048, "norelatime": 1 << 21}
KERNEL_OPTIONS = ("default_permissions", "allow_other")
OWN_OPTIONS = ("fsname=mergefs", "subtype=mergefs")


def premountable(spec: MountSpec) -> bool:
    return all(o in MOUNT_FLAGS or o in CLEAR_FLAGS or o in KERNEL_OPTIONS or o in OWN_OPTIONS
               for o in fuse_options(spec))


def kernel_mount_args(spec: MountSpec, fd: int) -> tuple[int, str]:
    """mount(2) flags and data for ``spec`` over the FUSE connection ``fd`` (libfuse's
    defaults: nosuid,nodev unless dev/suid are asked for)."""
    flags = MOUNT_FLAGS["nosuid"] | MOUNT_FLAGS["nodev"]
    opts = fuse_options(spec)
    for o in sorted(opts):
        flags = flags | MOUNT_FLAGS.get(o, 0)
    for o in sorted(opts):
        flags = flags & ~CLEAR_FLAGS.get(o, 0)
    data = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
    data += [o for o in KERNEL_OPTIONS if o in opts]
    return flags, ",".join(data)


def _start_premounted(spec: MountSpec, mountpoint: str, fmt: str, log_path: str,
                      pre=None) -> int | None:
    """Mount here and let a server adopt the fd: ``pre`` (forked early by the
    CLI) or a child forked now. None if the kernel refuses the mount (EPERM:
    uid 0 of a user namespace that does not own its mount namespace); libfuse
    then gets its chance (fusermount3)."""
    from .. import syscalls
    fd = -1
    own_fd = pre is None or pre.fuse_fd < 0
    try:
        view = build_view(spec, fmt)
    except Exception as exc:        # (nothing logged: the message says it all)
        raise MountError(f"mounting {mountpoint} failed: {str(exc) or repr(exc)}") from None
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC) if own_fd else pre.fuse_fd
        flags, data = kernel_mount_args(spec, fd)
        try:
            syscalls.mount("mergefs", mountpoint, flags, "fuse.mergefs", data)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                return None
            raise MountError(f"mounting {mountpoint} failed: {exc.strerror}") from None
        if not own_fd:
            return pre.hand_over(spec, mountpoint, fmt, log_path)
        if pre is not None:         # it cannot serve this fd: let it go
            pre.close()
        return _fork_premounted(spec, view, mountpoint, fd, log_path)
    finally:
        view.close()                # the server has (or opens) its own
        if own_fd and fd >= 0:
            os.close(fd)


def _fork_child(body) -> int:
    """Fork; the child runs ``body()`` and exits with its code (1 if it raised)."""
    sys.stdout.flush()
    sys.stderr.flush()
    # the child ignores SIGUSR1 from its first instruction (quiet_usr1)
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    pid = os.fork()
    if pid:
        signal.signal(signal.SIGUSR1, usr1)
        return pid
    code = 1
    try:
        code = body()
    finally:
        os._exit(code)


def _fork_premounted(spec, view, mountpoint: str, fd: int, log_path: str) -> int:
    return _fork_child(lambda: serve_handed_over(spec, mountpoint, "auto", log_path, fd, view))


def serve_handed_over(spec: MountSpec, mountpoint: str, fmt: str, log_path: str, fd: int,
                      view=None) -> int:
    """Body of a server process whose mount the parent made: detach, log to
    ``log_path``, serve the connection ``fd``; if anything fails, or on a signal,
    detach the mount (nobody serves it; libfuse does not: it did not mount it)."""
    import trio
    return trio.run(serve_handed_over_in_loop, spec, mountpoint, fmt, log_path, fd, view)


async def serve_handed_over_in_loop(spec: MountSpec, mountpoint: str, fmt: str, log_path: str,
                                    fd: int, view=None) -> int:
    """``serve_handed_over`` in a running trio loop (the mount server's spare waits
    for its mount in one: ``prefork``)."""
    if os.getsid(0) != os.getpid():     # (a mount server's server, on its next mount: it is)
        os.setsid()
    _detach_stdio(log_path)
    if not _STREAMS_AHEAD:
        _log_to_stderr()
    try:
        os.set_inheritable(fd, False)
        if view is None:
            view = build_view(spec, fmt)
        try:
            await _serve_in_loop(spec, view, f"/dev/fd/{fd}", mountpoint)
        finally:
            view.close()            # (a process that serves another mount next keeps no fds)
        return 0
    except BaseException:
        log.exception("cannot serve %s", mountpoint)
        with contextlib.suppress(OSError):
            syscalls_umount(mountpoint)
        return 1


def syscalls_umount(mountpoint: str) -> None:
    from .. import syscalls
    syscalls.umount(mountpoint, 2)          # MNT_DETACH


def open_log(log_path: str) -> int:
    """The server's log fd, opened without waiting for anything: a FIFO nobody
    reads yet is opened read-write (which never blocks on Linux; the lines wait
    in the pipe for a reader), and a FIFO's fd stays non-blocking, so a full
    pipe drops lines instead of stopping the server and every process using
    its mount. Anything else is written as usual (blocking)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(log_path, flags, 0o640)
    except OSError as exc:
        if exc.errno != errno.ENXIO:        # ENXIO: a FIFO with no reader
            raise
        fd = os.open(log_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)
    return fd


def _detach_stdio(log_path: str) -> None:
    logfd = open_log(log_path)
    nullfd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nullfd, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(nullfd)            # (a mount server's server serves other mounts after this one)
    os.close(logfd)
    if not _STREAMS_AHEAD:
        _streams_on_fds()


def _streams_on_fds() -> None:
    """sys.stdout and sys.stderr on fds 1 and 2 (under pytest's capture, sys.stderr
    is not fd 2)."""
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


_STREAMS_AHEAD = False


def streams_ahead() -> None:
    """What the mount server's spare (``mountsvc``) does before it is handed a
    mount: the stdio streams on fds 1 and 2 and the log handler on them, so
    that ``serve_handed_over`` only points the fds at the mount's log file
    (making the streams and the handler's formatter took ~0.3-0.5 ms between
    the hand-over and the first answer)."""
    global _STREAMS_AHEAD
    _streams_on_fds()
    _log_to_stderr()
    _STREAMS_AHEAD = True


def _log_to_stderr() -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s mergefs[{os.getpid()}] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _can_fork() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return len(os.listdir("/proc/self/task")) == 1
    try:
        trio.lowlevel.current_root_task()
        return False                      # a forked trio loop is unusable
    except RuntimeError:
        # every OS thread, not only Python's: a thread started by a C library
        # (or a thread pool) is just as unsafe to fork under
        return len(os.listdir("/proc/self/task")) == 1


def _fork_server(spec, mountpoint, fmt, log_path, ready_fd, parent_end) -> int:
    def body() -> int:
        os.close(parent_end)
        return serve_reporting(spec, mountpoint, fmt, log_path, ready_fd)
    return _fork_child(body)


def serve_reporting(spec: MountSpec, mountpoint: str, fmt: str, log_path: str,
                    ready_fd: int) -> int:
    """Body of a forked server that mounts through libfuse: detach, log to
    ``log_path``, report "ok" or the error on ``ready_fd``, serve."""
    os.setsid()
    _detach_stdio(log_path)
    return _serve_detached(spec, mountpoint, fmt, ready_fd)


def _spawn_server(spec, mountpoint, fmt, log_path, ready_fd) -> int:
    import json
    import subprocess
    from dataclasses import asdict
    with open(open_log(log_path), "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mergefs.union.server", "--ready-fd", str(ready_fd),
             "--format", fmt, json.dumps(asdict(spec)), mountpoint],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(ready_fd,),
            start_new_session=True)
    proc.returncode = 0       # reaped by _reap or by whoever waits for the pid
    return proc.pid


def _reap(pid: int, kill: bool) -> None:
    try:
        if kill:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _serve_detached(spec: MountSpec, mountpoint: str, fmt: str, ready_fd: int) -> int:
    """Body of a server process: log to stderr (the log file), report readiness on ready_fd."""
    _log_to_stderr()
    state = {"fd": ready_fd}

    def ready():
        os.write(state["fd"], b"ok")
        os.close(state["fd"])
        state["fd"] = None
    try:
        serve(spec, mountpoint, fmt, ready)
    except Exception as exc:
        if state["fd"] is not None:
            os.write(state["fd"], (str(exc) or repr(exc)).encode())
        return 1
    return 0


def _read_ready(fd: int, pid: int) -> bytes:
    import select
    import time
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                return data or b"the server exited before the mount was live"
            data += chunk
    return data or b"timed out waiting for the server"


def quiet_usr1() -> None:
    """A server process ignores SIGUSR1 until its loop logs the counts on it
    (``_run``): the mount is live before that, and the signal's default action
    would kill the server and leave the mount dead."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _child_main(argv: list[str]) -> int:
    import argparse
    import json
    quiet_usr1()
    p = argparse.ArgumentParser(prog="mergefs-server")
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--format", default="auto")
    p.add_argument("spec")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    raw = json.loads(args.spec)
    spec = MountSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    from . import prefork
    prefork.import_server()         # as a forked server does: deferred modules, compiled attrs
    return _serve_detached(spec, args.mountpoint, args.format, args.ready_fd)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
