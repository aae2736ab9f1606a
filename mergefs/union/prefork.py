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

import contextlib
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
        self.later = False              # hold a hand-over of a mount made (``release``)
        self.held: bytes | None = None

    def hand_over(self, spec, mountpoint: str, fmt: str, log_path: str,
                  mounted: bool = True) -> int:
        """Send the work and close this end. ``mounted``: the parent made the
        kernel mount on ``fuse_fd``; else the child mounts through libfuse and
        answers on the reply pipe, which the caller took first (``take_reply``).
        With ``later`` set, the work of a mount made is held (and this end kept
        open) until ``release``."""
        import pickle
        msg = pickle.dumps((spec, mountpoint, fmt, log_path, mounted))
        if self.later and mounted:
            self.held = msg
            return self.pid
        try:
            os.write(self.pipe, msg)
        finally:
            self.close()
        return self.pid

    def release(self) -> bool:
        """Send a held hand-over (``later``) and close this end; False if the child
        is gone (its mount then has no server: the caller unmounts it)."""
        msg, self.held = self.held, None
        try:
            if msg is not None:
                os.write(self.pipe, msg)
            return True
        except OSError:                 # EPIPE: it died after the mount was made
            return False
        finally:
            self.close()

    def take_reply(self) -> int:
        fd, self.reply = self.reply, -1
        return fd

    def close(self) -> None:
        """Close this end (a held hand-over's pipe stays open until ``release``)."""
        for fd in (self.fuse_fd, self.reply) + ((self.pipe,) if self.held is None else ()):
            if fd >= 0:
                os.close(fd)
        self.fuse_fd = self.reply = -1
        if self.held is None:
            self.pipe = -1


_PENDING: Prefork | None = None


def start_early() -> None:
    """Fork the server-to-be when that is safe (one thread, no trio loaded)."""
    global _PENDING
    if _PENDING is not None or "trio" in sys.modules or len(os.listdir("/proc/self/task")) != 1:
        return
    _PENDING = fork_waiting()


def fork_waiting(warm=None, again=None) -> Prefork:
    """Fork a server-to-be that waits for ``hand_over`` (the caller runs one thread
    and no trio loop: ``start_early``, or the mount server, which forks the
    server of its next mount ahead, ``mountsvc``); ``warm``: what the child
    runs before it waits, to make its start after the hand-over shorter;
    ``again`` (with ``warm``): called once the mount it served has ended (by
    its unmount, not a signal), the ends it waits on for its next hand-over
    (``Prefork.fds``' counterpart: hand-over pipe, reply pipe, /dev/fuse fd),
    or None: it exits."""
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
            code = _child(r, reply_w, fuse_fd, warm, again)
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


_IMPORTED = False


def import_server() -> None:
    """What the server needs before it can answer (and nothing more). Done once per
    process and its forks: a spare of the mount server (``mountsvc``) is forked
    from a process that did it (reading the compiled-code table again there cost
    each spare ~4.5 ms of CPU and imported nothing)."""
    global _IMPORTED
    if _IMPORTED:
        return
    defer_unused()
    from . import codecache
    with codecache.using(codecache.load()), pthread_in_libc():
        import_modules()
    _IMPORTED = True


@contextlib.contextmanager
def pthread_in_libc():
    """``ctypes.util.find_library("pthread")`` answers libc's name inside the block
    where glibc is 2.34 or later.

    trio, while it is imported, looks up ``pthread_setname_np`` (to name its
    worker threads) in the library ``find_library("pthread")`` names, and
    CPython 3.11 answers that by running ``ldconfig -p`` and searching its
    output: a process on the server's critical path (2-3 ms on an idle
    machine, 10-70 ms at load 6 on 2 cores). Since glibc 2.34 the pthread
    functions are libc's (libpthread.so.0 is an empty stub), so libc, which
    this process has loaded already, is where the lookup ends up anyway.
    Any other name, or another C library, is asked as before.
    """
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        newer = name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 34)
    except (ValueError, OSError, AttributeError):
        newer = False
    if not newer:
        yield
        return
    import ctypes.util
    real = ctypes.util.find_library

    def find_library(name: str):
        return LIBC if name == "pthread" else real(name)
    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = real


LIBC = "libc.so.6"      # glibc's soname


def import_modules() -> None:
    import_trio()
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401
    from . import ops, server  # noqa: F401


# Parts of trio its ``__init__`` imports for names a FUSE server never uses
# (TLS, DTLS, file I/O, paths, memory channels, the high-level socket helpers):
# ~6% of a server's work until its first answer.
TRIO_LAZY = ("_channel", "_dtls", "_file_io", "_highlevel_open_tcp_listeners",
             "_highlevel_open_tcp_stream", "_highlevel_open_unix_stream",
             "_highlevel_serve_listeners", "_highlevel_socket", "_highlevel_ssl_helpers", "_path",
             "_ssl")
TRIO_IMPORT = r"^from \.(_\w+) import (\([^)]*\)|[^\n(]*)\n"
TRIO_GETATTR = """
def __getattr__(name, _before=globals().get("__getattr__")):
    try:
        part, original = _LAZY[name]
    except KeyError:
        if _before is not None:         # trio's own (deprecated names)
            return _before(name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{part}"), original)
    from ._util import fixup_module_metadata
    fixup_module_metadata(__name__, {name: value})
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
"""


def import_trio() -> None:
    """Import trio with the names of ``TRIO_LAZY`` loaded on their first use.

    trio's ``__init__`` is run from its own text minus those parts' ``from
    ._part import A as A, ...`` statements, plus a module ``__getattr__``
    (PEP 562) that imports a part when one of its names is first asked for
    (``trio.open_file``, ``from trio import SSLStream``) and gives the value
    trio's public module name, as trio's ``__init__`` does for the others
    (and a ``__dir__`` that lists them).
    Anything unexpected in the text (another trio, a statement in another
    form) and trio is imported as usual.
    """
    if "trio" in sys.modules:
        return
    import importlib.util
    import re
    spec = importlib.util.find_spec("trio")
    try:
        with open(spec.origin, encoding="utf-8") as f:
            text = f.read()
    except (AttributeError, TypeError, OSError):
        return
    lazy: dict[str, tuple[str, str]] = {}
    seen: list[str] = []

    def drop(m: re.Match) -> str:
        if m.group(1) not in TRIO_LAZY:
            return m.group(0)
        seen.append(m.group(1))
        for item in m.group(2).strip("()\n ").split(","):
            original, _, name = item.strip().partition(" as ")
            if item.strip():
                lazy[(name or original).strip()] = (m.group(1), original.strip())
        return ""
    text = re.sub(TRIO_IMPORT, drop, text, flags=re.M)
    if sorted(seen) != sorted(TRIO_LAZY) or not all(
            n.isidentifier() and o.isidentifier() for n, (_, o) in lazy.items()):
        return                              # not the trio this was written for
    text += f"\n_LAZY = {lazy!r}\n{TRIO_GETATTR}"
    module = importlib.util.module_from_spec(spec)
    sys.modules["trio"] = module
    try:
        exec(compile(text, spec.origin, "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop("trio", None)
        for name in [n for n in sys.modules if n.startswith("trio.")]:
            del sys.modules[name]
        raise


def _child(r: int, reply: int, fuse_fd: int, warm=None, again=None) -> int:
    import gc
    gc.disable()                    # ~4% of the imports' time is collections that free nothing
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    import_server()                 # the point of this process: import while the parent works
    from . import server
    server.quiet_usr1()             # before any mount it will serve is live
    gc.freeze()                     # the modules stay: keep them out of later collections
    gc.enable()
    if warm is not None:
        warm()
        import trio
        got = trio.run(_handed_over_in_loop, r, reply, fuse_fd, again)
        return got if isinstance(got, int) else _serve_message(got, reply, fuse_fd)
    return _serve_message(_message(r), reply, fuse_fd)


def _message(r: int) -> tuple | None:
    """The hand-over (``Prefork.hand_over``: written, then the pipe closed), or None."""
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    if not data:
        return None
    import pickle
    return pickle.loads(data)


async def _handed_over_in_loop(r: int, reply: int, fuse_fd: int, again=None):
    """A warmed-up spare (the mount server's) waits for its hand-over inside a
    running trio loop: the loop's start (~1 ms after the hand-over) is behind it
    when the mount comes. Serves a mount made for it, then, while ``again``
    gives it the ends of a next hand-over, waits for that one and serves it in
    the same process and loop; returns the exit code, or the message of a mount
    it is to make through libfuse (served outside this loop:
    ``serve_reporting`` runs its own)."""
    import trio

    from . import server
    while True:
        await trio.lowlevel.wait_readable(r)
        msg = _message(r)
        if msg is None:
            return 0
        spec, mountpoint, fmt, log_path, mounted = msg
        if not mounted:
            return msg
        os.close(reply)
        code = await server.serve_handed_over_in_loop(spec, mountpoint, fmt, log_path, fuse_fd)
        if code or again is None or server.SIGNALLED:
            return code
        ends = again()
        if ends is None:
            return code
        r, reply, fuse_fd = ends


def _serve_message(msg: tuple | None, reply: int, fuse_fd: int) -> int:
    if msg is None:
        return 0
    spec, mountpoint, fmt, log_path, mounted = msg
    from . import server
    if mounted:
        os.close(reply)
        return server.serve_handed_over(spec, mountpoint, fmt, log_path, fuse_fd)
    if fuse_fd >= 0:
        os.close(fuse_fd)
    return server.serve_reporting(spec, mountpoint, fmt, log_path, reply)
