"""The service's small API for the ``mergefs`` CLI: ``STATE/control.sock``, JSON lines.

One request object per line, one answer per line:

* ``{"op": "ping"}`` -> ``{"ok": true, "mode": "views"|"fuse", "root": R, "pid": P}``
* ``{"op": "list"}`` -> ``{"ok": true, "views": [{"key", "view", "path", "mounts"}]}``:
  the live views and the mount points that use each (their users).
* ``{"op": "mount", "ref": REF, "target": DIR, "rw": false}`` -> ``{"ok": true,
  "key": K, "mounts": [...]}``: a view (or, with ``rw``, an active snapshot keyed
  ``mount:DIR``, continued if it exists over the same parent) of REF, bound at
  DIR by the service.
* ``{"op": "umount", "target": DIR}``: unbind DIR; a read-only key is removed,
  an active one is kept (commit it with ``mergefs commit mount:DIR``).

Failures: ``{"ok": false, "error": MSG, "code": "NOT_FOUND"|...}`` with the
same code names as the gRPC API.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading

from mergefs.errors import FailedPrecondition, MountError

log = logging.getLogger("mergefs.serve")
MAX_LINE = 1 << 20


class ControlServer:
    def __init__(self, path: str, served, router):
        self.path, self.served, self.router = path, served, router
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if os.path.lexists(self.path):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)
        s.listen(16)
        self._sock = s
        self._thread = threading.Thread(target=self._accept, name="mergefs-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in iter(lambda: f.readline(MAX_LINE), b""):
                f.write(json.dumps(self.handle(line)).encode() + b"\n")
                f.flush()

    def handle(self, line: bytes) -> dict:
        from .grpc_api import grpc_code
        try:
            req = json.loads(line)
            op = getattr(self, "op_" + str(req.get("op")), None) if isinstance(req, dict) else None
            if op is None:
                return {"ok": False, "error": f"unknown request {line[:80]!r}",
                        "code": "INVALID_ARGUMENT"}
            return {"ok": True, **op(req)}
        except ValueError as exc:
            if not isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
                return {"ok": False, "error": str(exc), "code": grpc_code(exc).name}
            return {"ok": False, "error": "not JSON", "code": "INVALID_ARGUMENT"}
        except Exception as exc:          # noqa: BLE001 - every failure is an answer
            return {"ok": False, "error": str(exc), "code": grpc_code(exc).name}

    # -- requests --------------------------------------------------------------------
    def op_ping(self, req: dict) -> dict:
        return {"mode": self.router.mode, "root": str(self.served.sn.root), "pid": os.getpid()}

    def op_list(self, req: dict) -> dict:
        return {"views": self.router.live()}

    def op_mount(self, req: dict) -> dict:
        target = os.path.abspath(req["target"])
        if self.router.views is None:
            raise FailedPrecondition("this service serves fuse3.mergefs mounts, not views; "
                                     "mount without the service")
        parent = self.served.sn.resolve(req["ref"]).id
        key = "mount:" + target
        if req.get("rw"):
            try:
                info = self.served.stat(key)
                if int(info.kind) != 2:
                    raise FailedPrecondition(f"{key!r} exists and is not an active snapshot")
                spec = self.served.mounts(key)
            except LookupError:
                spec = self.served.prepare(key, parent)
        else:
            spec = self.served.view(key, parent)
        mounts = self.router.mounts(key, spec)
        try:
            for typ, src, options in mounts:
                _bind(src, target, readonly="ro" in options)
        except Exception:
            if not req.get("rw"):
                self.served.remove(key)
            raise
        return {"key": key, "mounts": [list(m) for m in mounts]}

    def op_umount(self, req: dict) -> dict:
        target = os.path.abspath(req["target"])
        key = "mount:" + target
        r = subprocess.run(["umount", target], capture_output=True, text=True)
        if r.returncode != 0:
            raise MountError(f"cannot unmount {target}: {r.stderr.strip()}")
        try:
            kind = int(self.served.stat(key).kind)
        except LookupError:
            return {"key": None}
        if kind == 1:
            self.served.remove(key)
        else:
            self.router.forget(key)
        return {"key": key}


def _bind(src: str, target: str, readonly: bool) -> None:
    """Bind ``src`` at ``target`` with suid,dev (libfuse mounts nosuid,nodev); ro if asked."""
    for args in (["--bind", src, target],
                 ["-o", "remount,bind,suid,dev" + (",ro" if readonly else ""), target]):
        r = subprocess.run(["mount", *args], capture_output=True, text=True)
        if r.returncode != 0:
            if args[0] == "-o":
                subprocess.run(["umount", target], capture_output=True)
            raise MountError(f"mount {' '.join(args)}: {r.stderr.strip()}")


def call(path: str, req: dict, timeout: float = 30.0) -> dict:
    """One request to the control socket at ``path`` (raises OSError if nothing listens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline(MAX_LINE)
    if not line:
        raise ConnectionError(f"no answer from {path}")
    return json.loads(line)


def candidates(state: str | None = None) -> list[str]:
    """Where a service's control socket may be: STATE, $MERGEFS_STATE, /run/mergefs."""
    dirs = [state, os.environ.get("MERGEFS_STATE"), "/run/mergefs"]
    return [os.path.join(d, "control.sock") for d in dirs if d]


def find_service(root: str | None, state: str | None = None) -> str | None:
    """The control socket of a live service that owns the store at ``root``, if any."""
    from snapshotter import default_root
    want = os.path.realpath(default_root(root))
    for path in candidates(state):
        if not os.path.exists(path):
            continue
        try:
            pong = call(path, {"op": "ping"}, timeout=5)
        except (OSError, ValueError):
            continue
        if pong.get("ok") and os.path.realpath(pong.get("root", "")) == want:
            return path
    return None


def checked(answer: dict) -> dict:
    """An answer, or the mergefs error its code names."""
    if answer.get("ok"):
        return answer
    from mergefs import errors
    cls = {"NOT_FOUND": errors.NotFound, "ALREADY_EXISTS": errors.AlreadyExists,
           "FAILED_PRECONDITION": errors.FailedPrecondition,
           "INVALID_ARGUMENT": errors.InvalidArgument}.get(answer.get("code"), errors.MergefsError)
    raise cls(answer.get("error", "the service failed"))
