"""The client side of the views control socket (``mountctl``), importable without
pyfuse3 or trio: ``mergefs -o ...,views=SOCK`` (cmd_mount_helper) runs it in a
fresh interpreter whose start-up is all podman waits for.

One JSON object per line each way; a failure reply ``{"ok": false, "kind": K,
"error": MSG}`` raises the mergefs error of that kind.
"""
from __future__ import annotations

import json
import socket


def control_call(path: str, req: dict, timeout: float = 30.0) -> dict:
    """One request to a control socket; raises the matching mergefs error on failure."""
    from ..errors import (AlreadyExists, FailedPrecondition, InvalidArgument, MergefsError,
                          MountError, NotFound, UsageError)
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
               "invalid": InvalidArgument, "usage": UsageError,
               "mount": MountError}.get(reply.get("kind"), MergefsError)
        raise cls(reply.get("error", "failed"))
    return reply
