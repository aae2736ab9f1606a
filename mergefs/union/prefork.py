"""The server of ``mergefs mount``, forked before the command parses its arguments.

Importing pyfuse3 and trio takes the server ~150-250 ms, longer than the rest
of the command. So ``mergefs mount`` run as root forks first thing
(``start_early``): the child redirects its stdio to /dev/null, imports the
server's modules, and waits on a pipe while the parent parses its arguments,
opens the layers and mounts the FUSE connection the child already holds.
``server.start`` then hands over (``take``) one JSON message: the spec, the
mount point, the whiteout format and the log path; the child opens the layers
itself and serves. If no message comes (bad arguments, another kind of mount,
an error), the pipe closes when the parent exits or calls ``cancel`` and the
child exits without doing anything.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

from ..mountspec import MountSpec


@dataclass
class Prefork:
    pid: int
    fuse_fd: int
    pipe: int

    def hand_over(self, spec: MountSpec, mountpoint: str, fmt: str, log_path: str) -> int:
        msg = json.dumps({"spec": asdict(spec), "mountpoint": mountpoint, "format": fmt,
                          "log": log_path}).encode()
        try:
            os.write(self.pipe, msg)
        finally:
            self.close()
        return self.pid

    def close(self) -> None:
        for fd in (self.pipe, self.fuse_fd):
            if fd >= 0:
                os.close(fd)
        self.pipe = self.fuse_fd = -1


_PENDING: Prefork | None = None


def start_early() -> None:
    """Fork the server-to-be when that is safe and useful (root, one thread)."""
    global _PENDING
    if _PENDING is not None or os.geteuid() != 0 or len(os.listdir("/proc/self/task")) != 1 \
            or "trio" in sys.modules:
        return
    try:
        fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(w)
            code = _child(r, fuse_fd)
        finally:
            os._exit(code)
    os.close(r)
    _PENDING = Prefork(pid, fuse_fd, w)


def take() -> Prefork | None:
    global _PENDING
    pre, _PENDING = _PENDING, None
    return pre


def cancel() -> None:
    """Let the child go (it exits); not waited for: it may still be importing."""
    pre = take()
    if pre is not None:
        pre.close()


def _child(r: int, fuse_fd: int) -> int:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    import pyfuse3  # noqa: F401  (the point of this process: import while the parent works)
    import trio  # noqa: F401
    from . import ops  # noqa: F401
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    if not data:
        return 0
    msg = json.loads(data)
    from . import server
    spec = MountSpec(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in msg["spec"].items()})
    return server.serve_handed_over(spec, msg["mountpoint"], msg["format"], msg["log"], fuse_fd)
