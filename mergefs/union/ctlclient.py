"""The client side of the control sockets of the views service (``mountctl``) and
of the mount server (``mountsvc``), importable without pyfuse3 or trio: ``mergefs
-o ...,service=SOCK`` (``mergefs.mounthelper``) runs it in a fresh interpreter
whose start-up is all containers/storage waits for; and ``mount_spec``, how
both services read a ``mount`` request.

One JSON object per line each way; a failure reply ``{"ok": false, "kind": K,
"error": MSG}`` raises the mergefs error of that kind. ``mount_call`` sends a
request without the ``json`` and ``socket`` modules (their imports, ``re``
and ``enum``, cost ~50 M instructions, more than the rest of a lean start):
the request is written by ``_dumps`` (strings escaped by the C encoder of
``json``, as ``json.dumps`` does), and a success reply is recognised by its
first bytes (the service writes ``ok`` first); any other reply is parsed
with ``json``.
"""
from __future__ import annotations

import _socket
import os

OK = b'{"ok": true'


def _exchange(path: str, line: bytes, timeout: float) -> bytes:
    """Send one line, return the reply line."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                from ..errors import MountError
                raise MountError(f"{path}: the views server closed the connection")
            data += chunk
    finally:
        s.close()
    return data


def _raise(reply: dict) -> None:
    from ..errors import (AlreadyExists, FailedPrecondition, InvalidArgument, MergefsError,
                          MountError, NotFound, UsageError)
    cls = {"not_found": NotFound, "exists": AlreadyExists, "busy": FailedPrecondition,
           "invalid": InvalidArgument, "usage": UsageError,
           "mount": MountError}.get(reply.get("kind"), MergefsError)
    raise cls(reply.get("error", "failed"))


def error_reply(exc: BaseException) -> dict:
    """The failure reply for ``exc`` (the inverse of ``_raise``)."""
    from ..errors import (AlreadyExists, FailedPrecondition, MountError, NotFound,
                          UsageError)
    kinds = ((UsageError, "usage"), (NotFound, "not_found"), (AlreadyExists, "exists"),
             (FailedPrecondition, "busy"), (MountError, "mount"), (ValueError, "invalid"),
             (TypeError, "invalid"))
    from ..errors import categorize
    kind = next((k for cls, k in kinds if isinstance(exc, cls)), "error")
    if isinstance(exc, KeyError):
        kind, exc = "invalid", ValueError(f"missing field {exc}")
    # "exit": the CLI's exit code for it (the C mount program exits with it)
    return {"ok": False, "kind": kind, "error": str(exc), "exit": int(categorize(exc).exit_code)}


def mount_request(req: dict) -> dict:
    """A ``mount`` request as it is, or the one a ``mount-argv`` request stands for."""
    if isinstance(req, dict) and req.get("op") == "mount-argv":
        from ..mounthelper import argv_request
        return argv_request(req)
    return req


def check_mount_namespace(req: dict, service: str) -> None:
    """Refuse a ``mount`` request made in another mount namespace than the service's
    (``req["mntns"]``, the caller's ``/proc/self/ns/mnt`` link): the mount would
    be made, or watched, where the caller cannot see it."""
    own = os.readlink("/proc/self/ns/mnt")
    if req.get("mntns", own) != own:
        from ..errors import MountError
        raise MountError(f"the {service} runs in mount namespace {own}, this mount in "
                         f"{req['mntns']}: start it where the mounts are made")


def control_call(path: str, req: dict, timeout: float = 30.0) -> dict:
    """One request to a control socket; raises the matching mergefs error on failure."""
    import json
    reply = json.loads(_exchange(path, json.dumps(req).encode() + b"\n", timeout))
    if not reply.get("ok"):
        _raise(reply)
    return reply


def mount_call(path: str, req: dict, timeout: float = 30.0) -> None:
    """``control_call`` for a request of strings, lists, bools and None, on C modules
    alone; returns nothing (the reply's fields are not needed)."""
    data = _exchange(path, _dumps(req).encode() + b"\n", timeout)
    if not data.startswith(OK):
        import json
        _raise(json.loads(data))


def _dumps(v) -> str:
    from _json import encode_basestring_ascii
    if isinstance(v, str):
        return encode_basestring_ascii(v)
    if v is True or v is False or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(_dumps, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{encode_basestring_ascii(k)}: {_dumps(x)}"
                               for k, x in v.items()) + "}"
    raise TypeError(f"cannot encode {type(v).__name__}")


def mount_spec(req: dict, allow_other: bool = False):
    """The ``MountSpec`` of a ``mount`` request: overlay-style layer options, paths
    relative to the caller's directory ``cwd``, the lowerdir paths themselves
    resolved (containers/storage's ``overlay/l/`` symlinks); FUSE ``options``,
    ``volatile`` (writable only: nothing to sync otherwise), ``squash_uid``/
    ``squash_gid``. UsageError if malformed."""
    from ..errors import InvalidArgument, UsageError
    from ..mountspec import MountSpec, from_options
    try:
        spec = from_options(list(req["layers"]))
    except InvalidArgument as exc:          # as a mount of its own (cmd_mount_helper)
        raise UsageError(str(exc)) from None
    cwd = req.get("cwd", "/")
    at = (lambda p: p and os.path.normpath(os.path.join(cwd, p)))
    return MountSpec(tuple(real_path(at(p)) for p in spec.lowers), at(spec.upper),
                     at(spec.work), allow_other or spec.allow_other,
                     tuple(req.get("options", ())),
                     bool(req.get("volatile")) and spec.upper is not None,
                     req.get("squash_uid"), req.get("squash_gid"))


def real_path(path: str) -> str:
    """``os.path.realpath`` of an existing path in three system calls (an O_PATH open,
    the readlink of its /proc/self/fd link, the close: the kernel resolves the
    symlinks) where realpath lstats every component (a containers/storage
    lowerdir, ``.../overlay/l/ID`` to ``../LAYER/diff``: ~10 lstats, ~40 us of
    the mount server per layer); realpath's own answer for anything else."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        got = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        got = ""
    finally:
        os.close(fd)
    return got if got.startswith("/") and not got.endswith(" (deleted)") else \
        os.path.realpath(path)
