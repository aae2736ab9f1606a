"""A cheaper wait for the next FUSE request than pyfuse3's (one worker task).

pyfuse3's worker loop awaits ``_wait_fuse_readable()`` before each request:
it takes a trio lock and parks the task in ``trio.lowlevel.wait_readable``,
so every request costs trio scheduler passes, an ``epoll_ctl`` and two
``epoll_wait`` calls -- in this server, more CPU than the handler itself
(issue 10: ~100 us a request against fuse-overlayfs's ~10 us).

``install()`` replaces that function (pyfuse3's loop looks it up by name in
its module on every call) with one that first waits in a plain ``poll(2)`` on
the /dev/fuse fd, without giving control to trio. Nothing else in the server
needs trio while a request stream flows: every handler runs to completion
without awaiting. Trio gets control back when the fd stays quiet for
``POLL_MS`` (the server is idle: it then sleeps in trio's epoll, where a
signal wakes it) and every ``YIELD_EVERY`` requests (so SIGTERM is handled
under a steady stream too). With the C fast path on (fastpath.py), the wait
itself moves to C (``drain``: poll, read, dispatch): requests C serves cost
no Python at all, and the coroutine of one that reaches Python is awaited
here, as pyfuse3's loop would. Only valid with one worker task
(``pyfuse3.main(max_tasks=1)``): the read lock it skips is what keeps
several workers from reading the fd at once.
"""
from __future__ import annotations

import os
import select

POLL_MS = 50
YIELD_EVERY = 64


def fuse_fd() -> int | None:
    """The one /dev/fuse fd of this process (pyfuse3 keeps its own copy private)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def install(wake_fd: int | None = None) -> bool:
    """Use the poll-first wait in pyfuse3's loop; False (pyfuse3's own wait
    kept) when this pyfuse3 has no such function or the fd is not unique.
    ``wake_fd`` (the views service: trio's own epoll fd, readable when a
    control connection, a thread's result or a signal waits for trio) ends
    the plain poll (and C's, ``drain``) early: trio then runs what is ready."""
    import pyfuse3
    import trio

    from . import fastpath
    fd = fuse_fd()
    if fd is None or not callable(getattr(pyfuse3, "_wait_fuse_readable", None)):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    served = 0

    async def wait_fuse_readable() -> bool:
        nonlocal served
        served += 1
        drain = fastpath.drain
        if drain is not None and served % YIELD_EVERY:
            for _ in range(YIELD_EVERY):
                pending = drain(YIELD_EVERY, POLL_MS) if wake_fd is None \
                    else drain(YIELD_EVERY, POLL_MS, wake_fd)
                if pending is None:
                    break
                await pending
        if served % YIELD_EVERY and any(f == fd for f, _ in poller.poll(POLL_MS)):
            return True
        try:
            await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:      # pyfuse3.terminate() closed it
            return False
        return True

    pyfuse3._wait_fuse_readable = wait_fuse_readable
    return True
