"""The server of ``mergefs mount``, forked before the command parses its arguments.

Importing pyfuse3 and trio takes the server ~150-250 ms, longer than the rest
of the command. So ``mergefs mount`` and the mount-helper forms (``mergefs -o
lowerdir=... TARGET``) fork first thing (``start_early``), before the CLI
imports anything but this module (os and sys): the child redirects its stdio
to /dev/null, imports what serving needs (``import_server``), and waits on a
pipe while the parent parses its arguments, opens the layers and, run as
root, mounts the FUSE connection the child already holds. ``server.start``
then hands over (``take``) one message -- the spec, the mount point, the
whiteout format, the log path, and whether the parent mounted -- and the
child opens the layers itself and serves: the adopted fd, or (the parent
could not mount: not root, options the kernel mount cannot take, or EPERM
as uid 0 of a user namespace without its own mount namespace) a mount it
makes through libfuse, reporting "ok" or the error back on a second pipe.
If no message comes (bad arguments, another kind of mount, an error), the
pipe closes when the parent exits or calls ``cancel`` and the child exits
without doing anything.

The message is a pickle: pyfuse3 imports pickle anyway, and both ends are
this program (json would cost the child ~10 ms of imports).
"""
from __future__ import annotations

import os
import sys

# trio imports these at import time for TLS, DTLS and IDNA host names, which a
# FUSE server never uses; ssl and hmac load OpenSSL (~15% of the server's
# import time). trio's ``ctypes.util`` imports shutil (which imports bz2, lzma
# and zlib) and tempfile for its fallbacks when ``ldconfig -p`` fails; a
# writable server uses shutil to remove staged trees (~1.5% together).
# logging imports traceback (used when an exception is logged), linecache
# imports tokenize (used to read a source file's lines for a traceback) and
# subprocess imports locale (for text-mode pipes): ~2% together. The server
# defers them: each is a module object that runs its code on first
# attribute access (so any use still works, only later).
DEFERRED = ("ssl", "hmac", "idna", "shutil", "tempfile", "locale", "traceback", "tokenize",
            "token")


class Prefork:
    """The parent's end: the child's pid, the FUSE fd, and the two pipes."""

    def __init__(self, pid: int, fuse_fd: int, pipe: int, reply: int):
        self.pid, self.fuse_fd, self.pipe, self.reply = pid, fuse_fd, pipe, reply

    def hand_over(self, spec, mountpoint: str, fmt: str, log_path: str,
                  mounted: bool = True) -> int:
        """Send the work and close this end. ``mounted``: the parent made the
        kernel mount on ``fuse_fd``; else the child mounts through libfuse and
        answers on the reply pipe, which the caller took first (``take_reply``)."""
        import pickle
        msg = pickle.dumps((spec, mountpoint, fmt, log_path, mounted))
        try:
            os.write(self.pipe, msg)
        finally:
            self.close()
        return self.pid

    def take_reply(self) -> int:
        fd, self.reply = self.reply, -1
        return fd

    def close(self) -> None:
        for fd in (self.pipe, self.fuse_fd, self.reply):
            if fd >= 0:
                os.close(fd)
        self.pipe = self.fuse_fd = self.reply = -1


_PENDING: Prefork | None = None


def start_early() -> None:
    """Fork the server-to-be when that is safe (one thread, no trio loaded)."""
    global _PENDING
    if _PENDING is not None or "trio" in sys.modules or len(os.listdir("/proc/self/task")) != 1:
        return
    _PENDING = fork_waiting()


def fork_waiting(warm=None) -> Prefork:
    """Fork a server-to-be that waits for ``hand_over`` (the caller runs one thread
    and no trio loop: ``start_early``, or the mount server, which forks the
    server of its next mount ahead, ``mountsvc``); ``warm``: what the child
    runs before it waits, to make its start after the hand-over shorter."""
    fuse_fd = -1
    if os.geteuid() == 0:           # also uid 0 of a user namespace: it may mount FUSE
        try:
            fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            pass
    r, w = os.pipe()
    reply_r, reply_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(w)
            os.close(reply_r)
            code = _child(r, reply_w, fuse_fd, warm)
        finally:
            os._exit(code)
    os.close(r)
    os.close(reply_w)
    return Prefork(pid, fuse_fd, w, reply_r)


def take() -> Prefork | None:
    global _PENDING
    pre, _PENDING = _PENDING, None
    return pre


def pend(pre: Prefork | None) -> None:
    """Make ``pre`` the server the next ``server.start`` takes."""
    global _PENDING
    _PENDING = pre


def cancel() -> None:
    """Let the child go (it exits); not waited for: it may still be importing."""
    pre = take()
    if pre is not None:
        pre.close()


def defer_unused() -> None:
    """Put a deferred module object in ``sys.modules`` for each of ``DEFERRED``
    not imported yet. Not ``importlib.util.LazyLoader``: in Python 3.11 an
    ``import`` statement reads the module's ``__spec__``, which makes a
    LazyLoader module load at once; this one loads on the first attribute it
    does not have."""
    import importlib.util
    for name in DEFERRED:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            continue
        module = importlib.util.module_from_spec(spec)
        module.__class__ = _Deferred
        sys.modules[name] = module


class _Deferred(type(sys)):
    def __getattr__(self, attr: str):
        self.__class__ = type(sys)              # a plain module from here on
        try:
            self.__spec__.loader.exec_module(self)
        except BaseException:
            sys.modules.pop(self.__name__, None)
            raise
        return getattr(self, attr)


def import_server() -> None:
    """What the server needs before it can answer (and nothing more)."""
    defer_unused()
    from . import codecache
    with codecache.using(codecache.load()):     # attrs' generated methods, compiled once
        import_modules()


def import_modules() -> None:
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401
    from . import ops, server  # noqa: F401


def _child(r: int, reply: int, fuse_fd: int, warm=None) -> int:
    import gc
    gc.disable()                    # ~4% of the imports' time is collections that free nothing
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    import_server()                 # the point of this process: import while the parent works
    gc.freeze()                     # the modules stay: keep them out of later collections
    gc.enable()
    if warm is not None:
        warm()
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    if not data:
        return 0
    import pickle
    spec, mountpoint, fmt, log_path, mounted = pickle.loads(data)
    from . import server
    if mounted:
        os.close(reply)
        return server.serve_handed_over(spec, mountpoint, fmt, log_path, fuse_fd)
    if fuse_fd >= 0:
        os.close(fuse_fd)
    return server.serve_reporting(spec, mountpoint, fmt, log_path, reply)
