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
    """Wrap an async handler so that only FUSEError leaves it (and count it)."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        REQUESTS[name] += 1
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            code = to_errno(exc)
            if code is None:
                log.exception("%s%r failed unexpectedly", handler.__name__, args[1:])
                code = errno.EIO
            raise FUSEError(code) from None
    return wrapper
