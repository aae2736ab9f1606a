"""The client side of the views control socket (``mountctl``), importable without
pyfuse3 or trio: ``mergefs -o ...,views=SOCK`` (``mergefs.mounthelper``) runs it in
a fresh interpreter whose start-up is all containers/storage waits for.

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
