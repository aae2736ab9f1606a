"""The one place where errors become ``FUSEError`` (docs/architecture.md, "Code habits").

Domain code raises typed mergefs errors or lets ``OSError`` through; every
``Operations`` handler is wrapped in ``@fuse_errors``. pyfuse3 requires that
only ``FUSEError`` leaves a handler: anything unexpected is logged once with
its traceback and answered with EIO, so a bug fails one request, not the mount.
"""
from __future__ import annotations

import collections
import errno
import functools
import inspect
import logging

from pyfuse3 import FUSEError

from ..errors import errno_of

log = logging.getLogger("mergefs.union")


def to_errno(exc: BaseException) -> int | None:
    """The errno for an expected error, None for a bug (the table in ``mergefs.errors``)."""
    return errno_of(exc)


# Requests served, by handler name: the server logs them on SIGUSR1 (and
# resets), so benchmarks can verify each caching lever by counting requests.
REQUESTS: collections.Counter = collections.Counter()


def fuse_errors(handler):
    """Wrap a handler so that only FUSEError leaves it (and count it); the result is
    a coroutine function as pyfuse3 wants. A plain function is called inside the
    wrapper's own coroutine: one coroutine per request instead of two."""
    name = handler.__name__
    if not inspect.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def call(*args, **kwargs):
            REQUESTS[name] += 1
            try:
                return handler(*args, **kwargs)
            except FUSEError:
                raise
            except Exception as exc:
                raise _fuse_error(name, args[1:], exc) from None
        return call

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        REQUESTS[name] += 1
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            raise _fuse_error(name, args[1:], exc) from None
    return wrapper


def direct(name: str, handler):
    """``handler`` (a plain function, bound) as the C fast path calls it without a
    coroutine (mergefs/union/_fastpath.c, the direct handlers): its result, or
    the errno of the FUSEError ``fuse_errors`` would raise; never an Exception."""
    def call(*args):
        try:
            return handler(*args)
        except FUSEError as e:
            return e.errno
        except Exception as exc:
            return _fuse_error(name, args, exc).errno
    return call


def _fuse_error(name: str, args: tuple, exc: Exception) -> FUSEError:
    """The FUSEError for ``exc`` raised by handler ``name`` called with ``args``; a
    bug is logged with its traceback (call it inside the ``except``) and answered
    with EIO."""
    code = to_errno(exc)
    if code is None:
        log.exception("%s%r failed unexpectedly", name, args)
        code = errno.EIO
    return FUSEError(code)
