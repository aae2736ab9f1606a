"""Running the views mount (``ViewFS``) and driving it from other threads or processes.

``ViewMount`` runs the one pyfuse3 mount of this process in a thread of its
own (its own trio loop); ``add_view``/``remove_view``/``list_views`` may be
called from any other thread and return once the change is live:

    vm = ViewMount("/run/mergefs/views", allow_other=True).start()
    path = vm.add_view("c1", MountSpec(lowers=(...), upper=..., work=...))
    bind(path, "/run/bundle/rootfs", suid_dev=True)
    ...
    unbind("/run/bundle/rootfs"); vm.remove_view("c1"); vm.close()

A process that runs its own trio loop may instead call ``ViewFS`` methods
directly from that loop (see ``serve_views``). The control socket speaks
one JSON object per line each way: ``{"op": "add", "name": N, "spec": {...}}``
-> ``{"ok": true, "path": P}``; ``{"op": "remove", "name": N, "force": false}``;
``{"op": "list"}`` -> ``{"ok": true, "views": [...]}``; failures
``{"ok": false, "error": MSG, "kind": "not_found"|"exists"|"busy"|"invalid"|"error"}``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading

import pyfuse3
import trio

from .. import syscalls
from ..errors import AlreadyExists, FailedPrecondition, MergefsError, MountError, NotFound
from ..mountspec import MountSpec
from .views import ViewFS

log = logging.getLogger("mergefs.union")
MNT_DETACH = 2
KINDS = ((NotFound, "not_found"), (AlreadyExists, "exists"), (FailedPrecondition, "busy"),
         (ValueError, "invalid"), (TypeError, "invalid"))


def views_options(allow_other: bool) -> set[str]:
    """Writable views share the mount, so no ``ro``; permissions checked by the kernel."""
    opts = {"fsname=mergefs-views", "subtype=mergefs", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    return opts


def spec_from_json(raw: dict) -> MountSpec:
    return MountSpec(lowers=tuple(raw["lowers"]), upper=raw.get("upper"), work=raw.get("work"))


class ViewMount:
    """The views mount served by a background thread."""

    def __init__(self, mountpoint: str, allow_other: bool = True, fmt: str = "auto",
                 control: str | None = None):
        self.mountpoint = os.path.abspath(mountpoint)
        self.fs = ViewFS(self.mountpoint, fmt)
        self.allow_other = allow_other
        self.control = control
        self._token = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ViewMount":
        self._thread = threading.Thread(target=self._run, name="mergefs-views", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise MountError(f"mounting views at {self.mountpoint} failed: {self._error}")
        return self

    def _run(self) -> None:
        try:
            pyfuse3.init(self.fs, self.mountpoint, views_options(self.allow_other))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("views server stopped by an error")
        finally:
            pyfuse3.close(unmount=True)
            self.fs.close()
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            if self.control:
                await nursery.start(serve_control, self.fs, self.control)
            self._ready.set()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    def _call(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def add_view(self, name: str, spec: MountSpec, ident: str | None = None) -> str:
        return self._call(self.fs.add_view, name, spec, ident)

    def remove_view(self, name: str, force: bool = False) -> None:
        self._call(self.fs.remove_view, name, force)

    def list_views(self) -> list[dict]:
        return self._call(self.fs.list_views)

    def close(self, timeout: float | None = None) -> bool:
        """Stop serving and unmount (refuses nothing: unbind users first).

        With a ``timeout`` (seconds) the wait is bounded: a server that has not
        stopped by then (a request handler stuck) is left behind, its mount
        detached lazily (clients' binds keep it until they go; the FUSE
        connection ends with this process). True when the server stopped."""
        if self._thread is None:
            return True
        if self._token is not None and self._thread.is_alive():
            try:       # without waiting for the loop: it may be the thing that is stuck
                self._token.run_sync_soon(pyfuse3.terminate)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("views server at %s did not stop within %.1f s; detaching its mount",
                        self.mountpoint, timeout)
            try:
                syscalls.umount(self.mountpoint, MNT_DETACH)
            except OSError as exc:
                log.warning("lazy unmount of %s: %s", self.mountpoint, exc)
            return False
        self._thread = None
        return True

    def __enter__(self) -> "ViewMount":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- the control socket ------------------------------------------------------------
def handle_request(fs: ViewFS, req: dict) -> dict:
    try:
        op = req.get("op")
        if op == "add":
            return {"ok": True, "path": fs.add_view(req["name"], spec_from_json(req["spec"]),
                                                    req.get("ident"))}
        if op == "remove":
            fs.remove_view(req["name"], bool(req.get("force")))
            return {"ok": True}
        if op == "list":
            return {"ok": True, "views": fs.list_views()}
        return {"ok": False, "kind": "invalid", "error": f"unknown op {op!r}"}
    except (MergefsError, ValueError, TypeError, KeyError, OSError) as exc:
        kind = next((k for cls, k in KINDS if isinstance(exc, cls)), "error")
        if isinstance(exc, KeyError):
            kind, exc = "invalid", ValueError(f"missing field {exc}")
        return {"ok": False, "kind": kind, "error": str(exc)}


async def serve_control(fs: ViewFS, path: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the JSON-lines control API on a unix socket (mode 0600) until cancelled."""
    with _suppress_missing():
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_client, fs, stream)
    finally:
        with _suppress_missing():
            os.unlink(path)


async def _client(fs: ViewFS, stream) -> None:
    buf = b""
    async with stream:
        try:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > 1 << 20:
                    return
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        req = json.loads(line)
                        if not isinstance(req, dict):
                            raise ValueError("not an object")
                    except ValueError as exc:
                        reply = {"ok": False, "kind": "invalid", "error": f"bad request: {exc}"}
                    else:
                        reply = handle_request(fs, req)
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, FileNotFoundError)


def control_call(path: str, req: dict, timeout: float = 30.0) -> dict:
    """One request to a control socket; raises the matching mergefs error on failure."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise MountError(f"{path}: the views server closed the connection")
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        cls = {"not_found": NotFound, "exists": AlreadyExists, "busy": FailedPrecondition,
               "invalid": ValueError}.get(reply.get("kind"), MergefsError)
        raise cls(reply.get("error", "failed"))
    return reply


def serve_views(mountpoint: str, control: str, allow_other: bool = True, ready=None) -> None:
    """Foreground: the views mount plus its control socket, until SIGTERM/SIGINT."""
    fs = ViewFS(mountpoint)
    pyfuse3.init(fs, os.path.abspath(mountpoint), views_options(allow_other))

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, fs, control)

            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signal)
            if ready is not None:
                ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
        fs.close()


# -- binds ---------------------------------------------------------------------------
def bind(view_path: str, target: str, suid_dev: bool = True, readonly: bool = False) -> None:
    """Bind ``view_path`` at ``target``; libfuse mounts nosuid,nodev, so a container
    image that needs setuid binaries or device nodes gets them back on the bind
    (``suid_dev``); ``readonly`` makes the kernel refuse writes (EROFS) itself."""
    try:
        syscalls.mount(view_path, target, syscalls.MS_BIND)
    except OSError as exc:
        raise MountError(f"cannot bind {view_path} at {target}: {exc.strerror}") from None
    flags = syscalls.MS_REMOUNT | syscalls.MS_BIND
    if not suid_dev:
        flags |= syscalls.MS_NOSUID | syscalls.MS_NODEV
    if readonly:
        flags |= syscalls.MS_RDONLY
    try:
        syscalls.mount(None, target, flags)
    except OSError as exc:
        unbind(target)
        raise MountError(f"cannot set the flags of the bind at {target}: {exc.strerror}") from None


def unbind(target: str) -> None:
    try:
        syscalls.umount(target)
    except OSError as exc:
        raise MountError(f"cannot unmount {target}: {exc.strerror}") from None
