"""The mount server: ``mergefs mount-server --control SOCK``, a process that has
imported what a FUSE server needs and forks one, warm, for each mount.

A standalone mount (``mergefs -o ... TARGET``) spends ~150 ms idle, 0.5-1 s
under load, starting Python and importing trio and pyfuse3 before its server
answers; containers/storage waits for that at every container start and every
RUN step of a build. This process does the imports once
(``prefork.import_server``), freezes them out of the cyclic GC (so forked
servers share their pages), and serves ``mount`` requests (``ctlclient``; sent
by ``mergefs -o ...,service=SOCK TARGET``, ``mergefs.mounthelper``) one at a
time: ``server.start`` mounts and forks the server, the same server as a
standalone mount's (its own process, the C fast path, its log under
/run/mergefs, gone when TARGET is unmounted), and the reply goes back once
the mount is live.

It must stay single-threaded and never run trio (``server.start`` forks only
then), and must share the caller's mount namespace (the request names the
caller's; refused otherwise). A forked server closes this process's sockets
and takes the default signal handlers back (``_in_child``). Children are
reaped between requests; a stopped mount server (SIGTERM) leaves its servers
running: each still ends with its mount.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket

from .ctlclient import check_mount_namespace, error_reply, mount_request, mount_spec

log = logging.getLogger("mergefs.union")
MAX_REQUEST = 1 << 20


class MountServer:
    def __init__(self, control: str):
        self.control = os.path.abspath(control)
        self.sock: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.stopping = False

    def run(self, ready=None) -> None:
        from . import prefork
        prefork.import_server()
        # what a server loads only when it starts serving (strace of a forked one)
        from . import fastpath, fuseloop  # noqa: F401
        try:
            from . import _fastpath  # noqa: F401
        except ImportError:
            pass
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
        self.sock.settimeout(1.0)       # the loop reaps children and sees SIGTERM this often
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        if ready is not None:
            ready()
        try:
            while not self.stopping:
                _reap_children()
                try:
                    self.conn, _ = self.sock.accept()
                except (socket.timeout, InterruptedError):
                    continue
                with self.conn:
                    self._client(self.conn)
                self.conn = None
        finally:
            self.sock.close()
            try:
                os.unlink(self.control)
            except FileNotFoundError:
                pass

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _in_child(self) -> None:
        """A forked server: none of this process's sockets or signal handlers."""
        for s in (self.sock, self.conn):
            if s is not None:
                s.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _client(self, conn: socket.socket) -> None:
        conn.settimeout(30.0)
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            try:
                reply = self.mount(json.loads(data))
            except Exception as exc:  # noqa: BLE001  (every failure is a reply)
                reply = error_reply(exc)
                log.warning("mount request failed: %s", reply["error"])
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError as exc:
            log.warning("control connection: %s", exc)

    def mount(self, req: dict) -> dict:
        from . import server
        req = mount_request(req)
        if not isinstance(req, dict) or req.get("op") != "mount":
            raise ValueError("this mount server takes mount requests only")
        check_mount_namespace(req, "mount server")
        # run as root, other users get in unless `private` (as cmd_mount.multi_user)
        spec = mount_spec(req, allow_other=os.geteuid() == 0 and not req.get("private"))
        target = os.path.abspath(req["target"])
        pid = server.start(spec, target, "auto", None)
        log.info("mounted %s (server %d)", target, pid)
        return {"ok": True, "pid": pid}


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve_mounts(control: str, ready=None) -> None:
    """Foreground: serve mount requests on ``control`` until SIGTERM/SIGINT."""
    MountServer(control).run(ready)
