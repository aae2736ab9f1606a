"""``mergefs serve``: one foreground process that owns the store and every live view.

It serves containerd's Snapshots API (gRPC) on ``--socket`` and the CLI's
small API on ``STATE/control.sock``, applies the GC policy every
``--gc-interval`` seconds, and stops cleanly on SIGTERM/SIGINT, each step
within a deadline and logged: the gRPC server drains (``RPC_GRACE_S``), the
views mount is unmounted (``VIEWS_CLOSE_S``, then detached lazily), the store
closed; a call still stuck after that does not keep the process
(``exit_without_stragglers``).

Recovery: the store reconciles itself when opened (staging left by a killed
build, interrupted removals), and a views mount left by a killed service (its
FUSE connection is dead) is detached before a new one is mounted. Active
snapshots and their uppers are store records, so they survive; their views
are made again from those records (eagerly at start, so the CLI lists them).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent import futures
from dataclasses import dataclass

from mergefs.errors import InvalidArgument, MountError

log = logging.getLogger("mergefs.serve")
DEFAULT_STATE = "/run/mergefs"
SOCKET_NAME = "mergefs.sock"
# SIGTERM: each step of stopping has a deadline (README, "The service")
RPC_GRACE_S = 3.0         # calls in flight may finish; then they are cancelled
VIEWS_CLOSE_S = 5.0       # the views server stops; else its mount is detached lazily
STORE_CLOSE_S = 3.0
GRPC_THREADS = "mergefs-grpc"
SIGNAL_POLL_S = 0.5


@dataclass
class Options:
    root: str | None = None
    socket: str | None = None
    state: str | None = None
    gc_keep_storage: int | None = None       # bytes; None: no size-driven prune
    gc_interval: float = 0.0                 # seconds; 0: no periodic GC
    mounts: str = "auto"                     # auto | views | fuse
    unpack: str = "auto"                     # auto | overlay | same (as --mounts)
    workers: int = 8

    def resolved(self) -> "Options":
        state = self.state or (os.path.dirname(os.path.abspath(self.socket)) if self.socket
                               else DEFAULT_STATE)
        sock = os.path.abspath(self.socket or os.path.join(state, SOCKET_NAME))
        return Options(self.root, sock, os.path.abspath(state), self.gc_keep_storage,
                       self.gc_interval, self.mounts, self.unpack, self.workers)


def _is_dead_mount(path: str) -> bool:
    try:
        os.stat(path)
        return False
    except FileNotFoundError:
        return False
    except OSError as exc:                    # ENOTCONN, ECONNABORTED ...: a dead FUSE server
        log.info("%s: %s", path, exc.strerror)
        return True


def _is_mountpoint(path: str) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def detach_stale(path: str) -> bool:
    """Lazily unmount what a killed service left at ``path``; True if something was there."""
    if not (_is_dead_mount(path) or _is_mountpoint(path)):      # (lexists is False on ENOTCONN)
        return False
    for argv in (["umount", "-l", path], ["fusermount3", "-u", "-z", path]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode == 0 and not _is_mountpoint(path):
            log.info("detached a views mount left at %s by an earlier service", path)
            return True
        log.warning("%s: %s", " ".join(argv), r.stderr.strip())
    raise MountError(f"cannot detach the stale mount at {path}")


def _listen_path(path: str) -> None:
    """Make ``path`` free for a new unix socket: refuse if a live service answers there."""
    if len(os.fsencode(path)) > 107:
        raise InvalidArgument(f"socket path {path!r} is longer than a unix socket address "
                              "allows (107 bytes)")
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if not os.path.lexists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)                       # left by a killed service
        return
    finally:
        s.close()
    raise MountError(f"another service is listening on {path}")


def start_views(state: str, mode: str):
    """The views mount (``STATE/views``), or None for fuse mode."""
    if mode == "fuse":
        return None
    try:
        from mergefs.union.mountctl import ViewMount
    except ImportError:
        if mode == "views":
            raise
        log.warning("views are not available in this build; serving fuse3.mergefs mounts")
        return None
    where = os.path.join(state, "views")
    detach_stale(where)
    os.makedirs(where, mode=0o755, exist_ok=True)
    return ViewMount(where, allow_other=True).start()


def recover_views(served, router) -> int:
    """Make the view of every active and view snapshot again (after a restart)."""
    if router.views is None:
        return 0
    n = 0
    for info in served.walk():
        if int(info.kind) in (1, 2):          # VIEW, ACTIVE
            try:
                router.mounts(info.name, served.mounts(info.name))
                n += 1
            except Exception as exc:      # noqa: BLE001 - one bad record must not stop the rest
                log.warning("view of %r not re-created: %s", info.name, exc)
    return n


class GC(threading.Thread):
    """Every ``interval`` seconds: prune to ``keep_storage`` bytes (what nothing holds)."""

    def __init__(self, served, interval: float, keep_storage: int | None):
        super().__init__(name="mergefs-gc", daemon=True)
        self.served, self.interval, self.keep_storage = served, interval, keep_storage
        self.stopped = threading.Event()
        self.runs = 0

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                report = self.served.prune(keep_storage=self.keep_storage)
                self.runs += 1
                if getattr(report, "deleted", None):
                    log.info("gc: deleted %d snapshot(s)", len(report.deleted))
            except Exception:             # noqa: BLE001 - GC failing must not stop serving
                log.exception("gc failed")


def serve(opts: Options, ready=None, stop: threading.Event | None = None) -> int:
    """Run the service until SIGTERM/SIGINT (or ``stop`` is set). Returns the exit code."""
    import grpc

    from snapshotter.api import Snapshotter

    from . import control, grpc_api
    from .mounts import MountRouter, kernel_has_overlay
    from .served import Served

    opts = opts.resolved()
    stop = stop or threading.Event()
    _on_signals(stop)             # first: a SIGTERM while starting up still stops cleanly
    os.makedirs(opts.state, mode=0o755, exist_ok=True)
    _listen_path(opts.socket)
    sn = Snapshotter(opts.root, holder="serve")
    views = None
    server = None
    try:
        views = start_views(opts.state, opts.mounts)
        unpack_overlay = opts.unpack == "overlay" or (opts.unpack == "auto" and
                                                      kernel_has_overlay())
        router = MountRouter(opts.state, views, unpack_overlay)
        served = Served(sn, router)
        recovered = recover_views(served, router)
        pool = futures.ThreadPoolExecutor(max_workers=opts.workers,
                                          thread_name_prefix=GRPC_THREADS)
        server = grpc.server(pool)
        grpc_api.add_to_server(server, grpc_api.SnapshotsServicer(served, router.mounts))
        server.add_insecure_port("unix:" + opts.socket)
        ctl = control.ControlServer(os.path.join(opts.state, "control.sock"), served, router)
        server.start()
        ctl.start()
        gc = GC(served, opts.gc_interval, opts.gc_keep_storage) if opts.gc_interval > 0 else None
        if gc:
            gc.start()
        log.info("serving %s on %s (%s mounts, %d view(s) re-created)", sn.root, opts.socket,
                 router.mode, recovered)
        if ready is not None:
            ready()
        # Short waits: the kernel may hand SIGTERM to any thread (gRPC's, the views
        # server's); Python runs the handler only when the main thread next runs.
        while not stop.wait(SIGNAL_POLL_S):
            pass
        t0 = time.monotonic()
        log.info("stopping")
        if gc:
            gc.stopped.set()
        ctl.close()
        stopped = server.stop(grace=RPC_GRACE_S)
        if not stopped.wait(RPC_GRACE_S + 2):
            log.warning("gRPC server: calls still running after %.1f s; not waiting for them",
                        RPC_GRACE_S + 2)
        server = None
        pool.shutdown(wait=False, cancel_futures=True)     # idle workers end now
        _close_views(views)
        views = None
        _bounded("closing the store", sn.close, STORE_CLOSE_S)
        sn = None
        log.info("stopped in %.1f s", time.monotonic() - t0)
        return 0
    finally:
        if server is not None:
            server.stop(grace=None)
        if views is not None:
            _close_views(views)
        if sn is not None:
            _bounded("closing the store", sn.close, STORE_CLOSE_S)
        for p in (opts.socket,):
            try:
                os.unlink(p)
            except OSError:
                pass


def _close_views(views) -> None:
    """Unmount the views mount, within VIEWS_CLOSE_S (then lazily). Clients' binds of it
    are theirs: they stay (and go dead)."""
    t0 = time.monotonic()
    try:
        if views.close(timeout=VIEWS_CLOSE_S):
            log.info("views mount closed in %.1f s", time.monotonic() - t0)
    except Exception:                     # noqa: BLE001 - stopping anyway
        log.exception("closing the views mount")


def _bounded(what: str, fn, timeout: float) -> bool:
    """Run ``fn`` in a helper thread for at most ``timeout`` seconds; say if it overran."""
    done = threading.Event()

    def run():
        try:
            fn()
        except Exception:                 # noqa: BLE001 - stopping anyway
            log.exception(what)
        finally:
            done.set()
    threading.Thread(target=run, name=f"mergefs-stop-{what.split()[-1]}", daemon=True).start()
    if done.wait(timeout):
        return True
    log.warning("%s: still busy after %.1f s; not waiting", what, timeout)
    return False


def exit_without_stragglers(rc: int, wait_s: float = 1.0) -> int:
    """Return ``rc`` if every non-daemon thread ends within ``wait_s``; else exit now.

    gRPC runs calls in a thread pool whose threads the interpreter joins at
    exit: one call stuck (a store lock, a slow filesystem) would hold the
    process after ``serve`` returned. The service has stopped by then; it says
    which threads it leaves and exits."""
    def joined_at_exit(t: threading.Thread) -> bool:     # the pool's threads are daemon
        return t is not threading.current_thread() and (               # ones, joined anyway
            not t.daemon or t.name.startswith(GRPC_THREADS))
    deadline = time.monotonic() + wait_s
    for t in threading.enumerate():
        if joined_at_exit(t):
            t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate() if joined_at_exit(t) and t.is_alive()]
    if not left:
        return rc
    log.warning("exiting with %d busy thread(s) left: %s", len(left), ", ".join(left))
    logging.shutdown()
    os._exit(rc)


def _on_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``100k`` or plain bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)

