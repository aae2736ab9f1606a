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
``{"op": "list"}`` -> ``{"ok": true, "views": [...]}``; ``{"op": "stats", "reset":
false}`` -> ``{"ok": true, "requests": {NAME: N, "fast_NAME": N}, "cpu": S}`` (the
requests served since the last reset, by handler; ``fast_*``: served by the C
fast path, ``fastpath.stats``; the process's CPU seconds, user plus system); failures
``{"ok": false, "error": MSG, "kind": "not_found"|"exists"|"busy"|"invalid"|"usage"|"mount"|"error"}``
(``ctlclient.error_reply``).

``{"op": "mount", "layers": ["lowerdir=TOP:...", "upperdir=U", "workdir=W"],
"cwd": DIR, "volatile": false, "options": ["suid", ...], "target": T, "mntns": NS}``
-> ``{"ok": true, "name": N, "path": P}`` is ``mergefs -o ...,service=SOCK T``
(``mergefs.mounthelper``, which checked the options; ``mountsvc`` serves the
same request with a server of its own): the service adds a view
(``ctlclient.mount_spec``) under a name of its own (never reused), binds it
at T with the mount flags of ``options`` (``bind_flags``: nosuid,nodev unless
``suid``/``dev``, as a FUSE mount of its own; ro for a view without upper)
and answers once the bind is live; ``private`` and ``squash_*`` are refused
(one server serves every view alike). The bind is made by the service, so it must share the
caller's mount namespace (``NS``, the caller's ``/proc/self/ns/mnt`` link;
refused otherwise: the service could not see the bind go). Such a view goes
away by itself when its last mount goes (``fusermount3 -u T`` or ``umount
T``): ``AutoViews``, checked at every change of the service's mount table
(``watch_mounts``: ``/proc/self/mountinfo`` polls POLLPRI on a change).
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import socket
import threading

import pyfuse3
import trio

from .. import syscalls
from .. import mounttable
from ..errors import (FailedPrecondition, InvalidArgument, MergefsError, MountError, NotFound,
                      UsageError)
from ..mountspec import MountSpec
from . import fastpath
from .ctlclient import (check_mount_namespace, control_call,  # noqa: F401 (control_call:
                        error_reply, mount_request, mount_spec)  # re-exported)
from .views import ViewFS

log = logging.getLogger("mergefs.union")
MNT_DETACH = 2
# what a bind of a view takes (mount(8)'s names): flags set, flags cleared
BIND_FLAGS = {"ro": syscalls.MS_RDONLY, "nosuid": syscalls.MS_NOSUID,
              "nodev": syscalls.MS_NODEV, "noexec": syscalls.MS_NOEXEC, "noatime": 1024,
              "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
BIND_CLEARS = {"rw": syscalls.MS_RDONLY, "suid": syscalls.MS_NOSUID, "dev": syscalls.MS_NODEV,
               "exec": syscalls.MS_NOEXEC, "atime": 1024, "norelatime": 1 << 21}


def bind_flags(options) -> int:
    """The flags of a bind for mount options: nosuid,nodev unless ``suid``/``dev``
    (as libfuse mounts); an option a bind cannot set (``sync``, ``context=``: the
    views mount's own) is an InvalidArgument."""
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
    for opt in options:
        if opt in BIND_FLAGS:
            flags |= BIND_FLAGS[opt]
        elif opt in BIND_CLEARS:
            flags &= ~BIND_CLEARS[opt]
        else:
            raise InvalidArgument(f"mount option {opt!r} cannot be set on a bind of a view "
                                  "(a views service); drop service= for this mount")
    return flags


def views_options(allow_other: bool) -> set[str]:
    """Writable views share the mount, so no ``ro``; permissions checked by the kernel."""
    opts = {"fsname=mergefs-views", "subtype=mergefs", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    return opts


def spec_from_json(raw: dict) -> MountSpec:
    return MountSpec(lowers=tuple(raw["lowers"]), upper=raw.get("upper"), work=raw.get("work"),
                     volatile=bool(raw.get("volatile")))


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
        if op == "stats":
            return {"ok": True, "requests": fastpath.request_counts(bool(req.get("reset"))),
                    "cpu": sum(os.times()[:2])}
        return {"ok": False, "kind": "invalid", "error": f"unknown op {op!r}"}
    except (MergefsError, ValueError, TypeError, KeyError, OSError) as exc:
        return error_reply(exc)


class AutoViews:
    """The views of ``mount`` requests: each goes when no mount uses it any more."""

    def __init__(self, fs: ViewFS):
        self.fs = fs
        self.names: set[str] = set()
        self._count = 0

    def new_name(self, target: str) -> str:
        """A name no view of this mount had: ``mount-N-TAG`` (TAG from the target's
        path, e.g. containers/storage's layer id, for people reading ``views ls``)."""
        parts = [p for p in target.split("/") if p and p not in ("merged", "rootfs")]
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", parts[-1] if parts else "root")[:16]
        while True:
            self._count += 1
            name = f"mount-{self._count}-{tag}"
            if name not in self.fs.views and name not in self.fs.retired:
                return name

    async def mount(self, req: dict) -> dict:
        """Add a view for ``req["spec"]`` and bind it at ``req["target"]``."""
        check_mount_namespace(req, "views service")
        try:
            flags = bind_flags(req.get("options", ()))
            if req.get("private") or req.get("squash_uid") is not None \
                    or req.get("squash_gid") is not None:
                raise InvalidArgument("mount options 'private' and 'squash_to_*' are not "
                                      "supported by a views service (one server serves every "
                                      "view alike); use `mergefs mount-server` for them")
            spec = mount_spec(req)
        except InvalidArgument as exc:
            raise UsageError(str(exc)) from None
        if spec.upper is None:       # as a read-only mount of its own: EROFS from the kernel
            flags |= syscalls.MS_RDONLY
        target = os.path.abspath(req["target"])
        name = self.new_name(target)
        path = self.fs.add_view(name, spec)
        try:       # in a thread: the kernel's lookup of the view is served by this loop
            await trio.to_thread.run_sync(bind_with_flags, path, target, flags)
        except MountError:
            self.fs.remove_view(name, force=True)
            raise
        self.names.add(name)
        log.info("view %s bound at %s", name, target)
        return {"ok": True, "name": name, "path": path}

    def check(self) -> None:
        """Remove every auto view that no mount uses any more."""
        if not self.names:
            return
        for name in sorted(self.names - bound_views(self.fs.mountpoint, self.names)):
            try:
                self.fs.remove_view(name)
            except FailedPrecondition:        # something is mounted inside it: keep watching
                continue
            except NotFound:                  # removed by hand (views rm)
                pass
            self.names.discard(name)


def bound_views(mountpoint: str, names=None) -> set[str]:
    """Names of the views that a mount of this process's table uses: a bind of the
    view (or below it), or a mount inside it (``viewstate.mounts_using``, for all
    views at once). ``names``: only these matter; a line that names none of them
    nor the views mount cannot make one bound and is not parsed (the service
    checks at every change of the table, the host's included: parsing all of it
    took ~0.8 ms of the thread that answers FUSE requests, ~10 times a container)."""
    rows = mounttable.read(naming=None if names is None else [*names, mountpoint])
    dev = next((r.device for r in reversed(rows) if r.target == mountpoint), None)
    inside = mountpoint.rstrip("/") + "/"
    out = set()
    for r in rows:
        if r.target == mountpoint:
            continue
        if r.device == dev and r.root.startswith("/") and len(r.root) > 1:
            out.add(r.root[1:].split("/", 1)[0])
        if r.target.startswith(inside):
            out.add(r.target[len(inside):].split("/", 1)[0])
    return out


RECHECK = 1.0


async def watch_mounts(on_change, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Call ``on_change()`` after every change of this process's mount table, until
    cancelled. ``/proc/self/mountinfo`` reports POLLPRI|POLLERR once per change (it is
    always readable); an epoll set holding only those events is readable exactly
    then, and trio waits on that set's fd."""
    fd = os.open(mounttable.MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLPRI | select.EPOLLERR)
        task_status.started()
        while True:
            # and once a RECHECK without one: the views loop polls trio's epoll fd
            # (fuseloop's wake_fd), and that poll, checking the nested epoll set,
            # consumes mountinfo's once-per-change event before trio sees it
            with trio.move_on_after(RECHECK):
                await trio.lowlevel.wait_readable(ep.fileno())
            ep.poll(0)
            on_change()
    finally:
        ep.close()
        os.close(fd)


async def serve_control(fs: ViewFS, path: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the JSON-lines control API on a unix socket (mode 0600) until cancelled,
    and remove the views of ``mount`` requests when their mounts go."""
    with _suppress_missing():
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    auto = AutoViews(fs)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_mounts, auto.check)
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_client, fs, stream, auto)
    finally:
        with _suppress_missing():
            os.unlink(path)


async def _client(fs: ViewFS, stream, auto: AutoViews) -> None:
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
                        reply = await _mount(auto, req) \
                            if req.get("op") in ("mount", "mount-argv") \
                            else handle_request(fs, req)
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _mount(auto: AutoViews, req: dict) -> dict:
    try:
        return await auto.mount(mount_request(req))
    except (MergefsError, ValueError, TypeError, KeyError, OSError) as exc:
        return error_reply(exc)


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, FileNotFoundError)


def serve_views(mountpoint: str, control: str, allow_other: bool = True, ready=None) -> None:
    """Foreground: the views mount plus its control socket, until SIGTERM/SIGINT
    (SIGUSR1: one log line ``requests {...}``, the counts since the last one, as
    a mount's own server logs them)."""
    fs = ViewFS(mountpoint)
    pyfuse3.init(fs, os.path.abspath(mountpoint), views_options(allow_other))

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, fs, control)

            async def on_signal(task_status=trio.TASK_STATUS_IGNORED):
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGUSR1) as sigs:
                    task_status.started()
                    async for sig in sigs:
                        if sig == signal.SIGUSR1:
                            fastpath.log_counts()
                            continue
                        pyfuse3.terminate()
                        return
            await nursery.start(on_signal)
            if ready is not None:
                ready()
            # as a server of its own (server._run): one worker task, which waits
            # for the next request in poll(2) while requests flow; every handler
            # runs to completion without awaiting (a bind's lookups are served
            # while the bind runs in a thread)
            from . import fuseloop
            wake = _trio_epoll_fd()
            if wake is not None and fuseloop.install(wake):
                log.info("views: one worker, the next request awaited in poll(2)")
            else:
                log.info("views: pyfuse3's own request wait")
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            nursery.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
        fs.close()


def _trio_epoll_fd() -> int | None:
    """The epoll fd of the running trio loop (trio has no public way to name it)."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT
        return GLOBAL_RUN_CONTEXT.runner.io_manager._epoll.fileno()
    except AttributeError:
        return None


# -- binds ---------------------------------------------------------------------------
def bind(view_path: str, target: str, suid_dev: bool = True, readonly: bool = False) -> None:
    """Bind ``view_path`` at ``target``; libfuse mounts nosuid,nodev, so a container
    image that needs setuid binaries or device nodes gets them back on the bind
    (``suid_dev``); ``readonly`` makes the kernel refuse writes (EROFS) itself."""
    flags = 0 if suid_dev else syscalls.MS_NOSUID | syscalls.MS_NODEV
    bind_with_flags(view_path, target, flags | (syscalls.MS_RDONLY if readonly else 0))


def bind_with_flags(view_path: str, target: str, flags: int) -> None:
    """Bind ``view_path`` at ``target``, then set the bind's flags (``BIND_FLAGS``)."""
    try:
        syscalls.mount(view_path, target, syscalls.MS_BIND)
    except OSError as exc:
        raise MountError(f"cannot bind {view_path} at {target}: {exc.strerror}") from None
    try:
        syscalls.mount(None, target, syscalls.MS_REMOUNT | syscalls.MS_BIND | flags)
    except OSError as exc:
        unbind(target)
        raise MountError(f"cannot set the flags of the bind at {target}: {exc.strerror}") from None


def unbind(target: str) -> None:
    try:
        syscalls.umount(target)
    except OSError as exc:
        raise MountError(f"cannot unmount {target}: {exc.strerror}") from None
