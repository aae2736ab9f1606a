"""The mount server: ``mergefs mount-server --control SOCK``, a process that has
imported what a FUSE server needs and forks one, warm, for each mount.

A standalone mount (``mergefs -o ... TARGET``) spends ~150 ms idle, 0.5-1 s
under load, starting Python and importing trio and pyfuse3 before its server
answers; containers/storage waits for that at every container start and every
RUN step of a build. This process does the imports once
(``prefork.import_server``), freezes them out of the cyclic GC (so forked
servers share their pages), and serves ``mount`` requests (``ctlclient``; sent
by ``mergefs -o ...,service=SOCK TARGET``, ``mergefs.mounthelper``) one at a
time: ``server.start`` mounts and hands the mount to a server forked ahead
(the spare: forked between requests, it waits on a pipe with a /dev/fuse fd
that this process mounts; ``prefork.fork_waiting``), the same server as a
standalone mount's (its own process, the C fast path, its log under
/run/mergefs, gone when TARGET is unmounted), and the reply goes back once
the mount is made, before the spare is handed the mount (``_release``: the
woken server's start no longer competes with the caller's exit for a CPU).
The spare takes the fork and the first calls of a server's start
(``_warm``; then it waits in the trio loop it serves in) off
the request's path: the mount's first answer came p50 19.7 -> 12.8 ms (30
interleaved mounts, load 1.3). After forking a spare this process rehearses
a request (``_rehearse``), so that the pages it shares with the spare are
copied then and not while the next request is handled. A server whose mount
is unmounted does not exit: it offers itself back (``_offer``: a new
/dev/fuse fd and pipes, sent over the control socket) and serves a later
mount in the same process (at most MAX_SPARES wait, MOUNTS_PER_SERVER mounts
each), so that in a steady stream of mounts (podman's containers, a build's
steps) none is forked: a fork cost ~2,900 pages copied on write between the
two processes and ~25-33 ms of CPU per mount with the warm-up and the exit,
a server back ~8 pages and ~6.5 ms (20 mounts, load 3). ``{"op": "list"}``
names the servers of the mounts made here that still run, and the spares.

It must stay single-threaded and never run trio (``server.start`` forks only
then), and must share the caller's mount namespace (the request names the
caller's; refused otherwise). A forked server closes this process's sockets
and takes the default signal handlers back (``_in_child``). Children are
reaped between requests; a stopped mount server (SIGTERM) leaves its servers
running: each still ends with its mount (its offer then finds no service).
Its spares exit when the service ends, however it ends (their pipes close).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time

from .ctlclient import check_mount_namespace, error_reply, mount_request, mount_spec

log = logging.getLogger("mergefs.union")
MAX_REQUEST = 1 << 20
# the next spare is forked once no request came for this long: not while the
# server just handed a mount starts serving it (a fork beside it, on a loaded
# 2-core machine, delayed its first answer as much as the spare saved)
SPARE_DELAY = 0.1
# servers whose mount ended come back as spares (``_offer``): up to this many wait
# at once (more exit), and each serves at most MOUNTS_PER_SERVER mounts
MAX_SPARES = 2
MOUNTS_PER_SERVER = 64


class MountServer:
    def __init__(self, control: str):
        self.control = os.path.abspath(control)
        self.sock: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.stopping = False
        self.spares: list = []          # servers of the next mounts (forked ahead, or back)
        self.servers: set[int] = set()  # the servers of mounts made here, until reaped
        self.scratch: str | None = None  # the layer and target of ``_rehearse``
        self.held = None                # (spare, target): a hand-over until the reply is sent

    def run(self, ready=None) -> None:
        from . import prefork
        prefork.import_server()
        # what a server loads only when it starts serving (strace of a forked one)
        from . import fastpath, fuseloop  # noqa: F401
        from . import writable  # noqa: F401  (what build_view imports for a writable mount)
        try:
            from . import _fastpath  # noqa: F401
        except ImportError:
            pass
        from .server import pyfuse3_passes_inode
        for writes in (False, True):    # asked once here, not by every server (the marker)
            pyfuse3_passes_inode(writes)
        import gc
        gc.collect()
        gc.freeze()
        os.register_at_fork(after_in_child=self._in_child)
        try:
            os.unlink(self.control)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.control)
        os.chmod(self.control, 0o600)
        self.sock.listen(64)
        # the loop reaps children, forks the spare and sees SIGTERM at least this often
        self.sock.settimeout(1.0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        self._fork_spare()
        if ready is not None:
            ready()
        spare_at = 0.0
        try:
            while not self.stopping:
                self.servers.difference_update(_reap_children())
                wait = spare_at - time.monotonic()
                if wait <= 0:
                    self._fork_spare()
                self.sock.settimeout(min(1.0, wait) if wait > 0 else 1.0)
                try:
                    self.conn, _ = self.sock.accept()
                except (socket.timeout, InterruptedError):
                    continue
                with self.conn:
                    mounting = self._client(self.conn)
                self.conn = None
                if mounting:        # (a list request does not put the spare off)
                    spare_at = time.monotonic() + SPARE_DELAY
        finally:
            for spare in self.spares:
                spare.close()               # it reads the end of its pipe and exits
            self.sock.close()
            try:
                os.unlink(self.control)
            except FileNotFoundError:
                pass
            if self.scratch is not None:
                import shutil
                shutil.rmtree(self.scratch, ignore_errors=True)

    def _fork_spare(self, warm: bool = True) -> None:
        """Fork the server of the next mount now, between requests (``prefork``): it
        waits on a pipe, holding a /dev/fuse fd this process mounts when a request
        comes; a mount then costs no fork, and its server's first answer comes
        sooner. A spare a request did not use is kept for the next one, and so is
        a server whose mount ended (``spare_back``): then none is forked. ``warm``:
        it warms up first (``_warm``); not for one forked for a request waiting
        now, which the warm-up would only delay (~10 ms)."""
        for spare in [s for s in self.spares if not _alive(s.pid)]:
            spare.close()               # killed: hand nothing to it
            _remove_spare_dirs(spare.pid)
            self.spares.remove(spare)
        if not self.spares and not self.stopping:
            from . import prefork
            try:
                self.spares.append(prefork.fork_waiting(_warm if warm else None,
                                                        _Again(self.control)))
            except OSError as exc:
                log.warning("cannot fork ahead: %s", exc)
            if warm:
                self._rehearse()

    def spare_back(self, conn: socket.socket, fds: list[int]) -> None:
        """A server of this process whose mount ended offers itself for the next one
        (``_offer``: its hand-over and reply pipes' ends and a /dev/fuse fd): kept
        as a spare unless MAX_SPARES wait already (then its ends are closed here and
        it exits). Only a server of a mount made here is taken (the peer's pid)."""
        import struct
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  struct.calcsize("3i")))[0]
        from .prefork import Prefork
        if pid in self.servers and len(fds) == 3 and len(self.spares) < MAX_SPARES \
                and not self.stopping:
            self.servers.discard(pid)
            self.spares.append(Prefork(pid, *fds))
            return
        for fd in fds:
            os.close(fd)

    def _rehearse(self) -> None:
        """After a fork, each page this process shares with the spare is copied at
        the first write of either: ~550 of them while the next request was
        handled (~1 ms of its CPU). Take them now, between requests: a request
        like containers/storage's for a mount in a scratch directory, refused at
        its last check (the target is a file), its reply, and a writable view of
        the scratch layer, made, pickled (as a hand-over is) and closed."""
        import pickle
        import tempfile

        from .server import build_view
        if self.scratch is None:
            _remove_scratch_of_dead_servers()
            self.scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
            for name in ("lower/d", "upper", "work"):
                os.makedirs(os.path.join(self.scratch, name))
            with open(os.path.join(self.scratch, "target"), "w"):
                pass
        hexed = (lambda t: os.fsencode(t).hex())
        opts = "-o", "lowerdir=lower,upperdir=upper,workdir=work,volatile,service"
        req = json.dumps({"op": "mount-argv", "argv": [hexed(a) for a in (*opts, "target")],
                          "cwd": hexed(self.scratch),
                          "mntns": hexed(os.readlink("/proc/self/ns/mnt"))})
        try:
            self.mount(json.loads(req))
            log.warning("rehearsal: a mount at a file was made")    # (never)
        except Exception as exc:  # noqa: BLE001  (refused, as it should be)
            json.dumps(error_reply(exc))
        json.dumps({"ok": True, "pid": os.getpid(), "target": self.scratch})
        spec = mount_spec({"layers": [f"lowerdir={self.scratch}/lower",
                                      f"upperdir={self.scratch}/upper",
                                      f"workdir={self.scratch}/work"]})
        try:
            pickle.dumps((spec, self.scratch, "auto", self.scratch, True))
            build_view(spec).close()
        except Exception as exc:  # noqa: BLE001  (only a rehearsal)
            log.warning("rehearsal: %s", exc)

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _in_child(self) -> None:
        """A forked server: none of this process's sockets or signal handlers."""
        for s in (self.sock, self.conn):
            if s is not None:
                s.close()
        for spare in self.spares:       # the spares' pipe ends belong to this process
            spare.close()
        self.spares = []
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _client(self, conn: socket.socket) -> bool:
        """Answer one request; False if it was a list request (or none came)."""
        conn.settimeout(30.0)
        data = b""
        mounting = False
        try:
            data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
            if data == SPARE_OP:            # (one send: the line and its fds)
                self.spare_back(conn, fds)
                return False
            for fd in fds:
                os.close(fd)
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                chunk = conn.recv(65536)
                if not chunk:
                    return mounting
                data += chunk
            try:
                req = json.loads(data)
                mounting = not (isinstance(req, dict) and req.get("op") == "list")
                reply = self.mount(req) if mounting else self.list()
            except Exception as exc:  # noqa: BLE001  (every failure is a reply)
                reply = error_reply(exc)
                log.warning("mount request failed: %s", reply["error"])
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            finally:
                self._release()
            if reply.get("pid"):            # logged once the caller has its answer
                log.info("mounted %s (server %d)", reply["target"], reply["pid"])
        except OSError as exc:
            log.warning("control connection: %s", exc)
        finally:
            self._release()             # (a reply that failed to encode)
        return mounting

    def mount(self, req: dict) -> dict:
        from . import server
        req = mount_request(req)
        if not isinstance(req, dict) or req.get("op") != "mount":
            raise ValueError("this mount server takes mount and list requests only")
        check_mount_namespace(req, "mount server")
        # run as root, other users get in unless `private` (as cmd_mount.multi_user)
        spec = mount_spec(req, allow_other=os.geteuid() == 0 and not req.get("private"))
        target = os.path.abspath(req["target"])
        from . import prefork
        self._fork_spare(warm=False)    # (a new one if there is none: used or died)
        # server.start takes the one that waited last, or leaves it for the next;
        # its hand-over is held until the reply is sent (``_release``)
        spare = self.spares.pop() if self.spares else None
        if spare is not None:
            spare.later = True
        prefork.pend(spare)
        try:
            pid = server.start(spec, target, "auto", None)
        finally:
            left = prefork.take()
            if left is not None:
                left.later = False
                self.spares.append(left)
            elif spare is not None and spare.held is not None:
                self.held = (spare, target)
        self.servers.add(pid)
        return {"ok": True, "pid": pid, "target": target}

    def _release(self) -> None:
        """Hand the mount just made to its server, once the caller has its reply:
        the woken server's start (~1 ms of CPU: its view, the FUSE session)
        delayed the mount command's exit by as much when it came first on a busy
        machine. A server that died meanwhile leaves a mount nobody serves:
        detached, and logged."""
        if self.held is None:
            return
        (spare, target), self.held = self.held, None
        if not spare.release():
            log.error("the server of %s exited before its hand-over: unmounted", target)
            from .server import syscalls_umount
            try:
                syscalls_umount(target)
            except OSError as exc:
                log.warning("cannot unmount %s: %s", target, exc)

    def list(self) -> dict:
        """The servers of this process's mounts still running, and the spares (``spare``:
        the one the next request takes)."""
        self.servers.difference_update(_reap_children())
        return {"ok": True, "servers": sorted(self.servers),
                "spare": self.spares[-1].pid if self.spares else None,
                "spares": [s.pid for s in self.spares]}


def _warm() -> None:
    """What the spare runs before it waits (in a running trio loop: ``prefork``): a
    writable view of a small temporary layer with its handlers (a lookup and
    getattr of each entry; closed again; nothing global: the C fast path is
    loaded only by ``UnionOperations.init``), then the log's streams and
    handler (``server.streams_ahead``). Done first in a forked process, each
    costs more than the next (pages copied on write, first set-up): the view
    and handlers took 1.6-5 ms off the mount's first answer (p50 12.5 -> 10.9
    and 20.3 -> 15.1 ms, 30 interleaved mounts each, load 3-4), the lookups
    and getattrs 0.6-0.8 ms more (9.2 -> 8.6, 10.5 -> 9.7, load 2). (A first
    ``trio.run`` of its own, ~4 ms of CPU, was here until the spare waited in
    the loop it serves in.)"""
    import tempfile

    import pyfuse3

    from ..mountspec import MountSpec
    from . import server
    from .ops import UnionOperations

    # named with the service's pid and its own: a spare killed while it warms
    # up leaves it, and the service (or, once it is gone, the next one) removes it
    with tempfile.TemporaryDirectory(prefix=f"{SPARE_PREFIX}{os.getppid()}-{os.getpid()}-") as d:
        lower, upper, work = (os.path.join(d, n) for n in ("lower", "upper", "work"))
        for p in (lower, upper, work):
            os.mkdir(p)
        os.mkdir(os.path.join(lower, "d"))
        with open(os.path.join(lower, "f"), "w") as f:
            f.write("x")
        view = server.build_view(MountSpec((lower,), upper, work))
        try:
            ops = UnionOperations(view, no_open=server.pyfuse3_passes_inode(writes=True))
            # the first requests' handlers, unwrapped (no coroutine, no request count)
            lookup, getattr_ = UnionOperations.lookup.__wrapped__, UnionOperations.getattr.__wrapped__
            for name in (b"f", b"d", b"none"):
                e = lookup(ops, pyfuse3.ROOT_INODE, name)
                if e.st_ino:
                    getattr_(ops, e.st_ino)
            getattr_(ops, pyfuse3.ROOT_INODE)
            ops.close()
        finally:
            view.close()
    server.streams_ahead()


SPARE_OP = b'{"op": "spare"}\n'     # a server back (``_offer``), with its ends as SCM_RIGHTS


class _Again:
    """``prefork.fork_waiting``'s ``again`` for a mount server's spare: after each
    mount it served (at most MOUNTS_PER_SERVER), offer this process to the
    service for the next one (``_offer``)."""

    def __init__(self, control: str):
        self.control, self.served = control, 0

    def __call__(self):
        self.served += 1
        # the last mount's objects are held in reference cycles (its view and
        # handlers, ~670 objects, its inode table with them); with the server's GC
        # thresholds nothing collects them, and a server's memory grew ~140 kB per
        # mount (300 files read each): one full collection, ~0.5 ms, keeps it level
        if self.served >= MOUNTS_PER_SERVER:
            return None
        import gc
        gc.collect()
        return _offer(self.control)


def _offer(control: str):
    """In a server whose mount ended: stdio back on /dev/null (nothing more goes to
    that mount's log), a new /dev/fuse fd and hand-over and reply pipes, their
    service's ends sent to the service (``MountServer.spare_back``). The ends
    to wait on, or None (no service, or no /dev/fuse: exit). A forked server is
    ~1,600 pages copied on write (~4.5 us each here) plus its warm-up and exit,
    ~15 ms of CPU per mount; this one has its pages already."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    try:
        fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    r, w = os.pipe()
    reply_r, reply_w = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(control)
            socket.send_fds(s, [SPARE_OP], [fuse_fd, w, reply_r])    # (Prefork's order)
    except OSError:
        for fd in (fuse_fd, r, reply_w):
            os.close(fd)
        return None
    finally:
        os.close(w)
        os.close(reply_r)
    return r, reply_w, fuse_fd


SCRATCH_PREFIX = "mergefs-mount-server-"     # then the service's pid, a dash
SPARE_PREFIX = "mergefs-spare-"              # a spare's warm-up (_warm): the same


def _remove_spare_dirs(spare: int) -> None:
    """The warm-up directory of this service's spare ``spare``, dead: it was
    killed while it warmed up, if there is one."""
    import glob
    import shutil
    import tempfile
    pattern = f"{SPARE_PREFIX}{os.getpid()}-{spare}-*"
    for path in glob.glob(os.path.join(tempfile.gettempdir(), pattern)):
        shutil.rmtree(path, ignore_errors=True)


def _remove_scratch_of_dead_servers() -> None:
    """A mount server that was killed (SIGKILL) left its scratch directory, and
    maybe a spare's warm-up directory: remove those whose pid runs no mount
    server any more."""
    import glob
    import tempfile
    for prefix in (SCRATCH_PREFIX, SPARE_PREFIX):
        for path in glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*-*")):
            pid = os.path.basename(path)[len(prefix):].partition("-")[0]
            if pid.isdigit():
                _remove_unless_serving(path, pid)


def _remove_unless_serving(path: str, pid: str) -> None:
    import shutil
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"mount-server" in f.read():
                return              # running (or a reused pid of another mount server)
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:           # reaped already
        return False


def _reap_children() -> list[int]:
    out = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append(pid)


def serve_mounts(control: str, ready=None) -> None:
    """Foreground: serve mount requests on ``control`` until SIGTERM/SIGINT."""
    MountServer(control).run(ready)
