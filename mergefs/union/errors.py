"""The one place where errors become ``FUSEError`` (STYLE habit 1).

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

from ..errors import AlreadyExists, FailedPrecondition, InvalidLayer, NotFound, UnsafeContent

log = logging.getLogger("mergefs.union")

# Typed errors -> errno. UnsafeContent is EACCES: the content exists but the
# server refuses to follow it out of its layer (S2).
_TYPED = ((NotFound, errno.ENOENT), (AlreadyExists, errno.EEXIST),
          (UnsafeContent, errno.EACCES), (InvalidLayer, errno.EIO),
          (FailedPrecondition, errno.EBUSY))


def to_errno(exc: BaseException) -> int | None:
    """The errno for an expected error, None for a bug."""
    for cls, code in _TYPED:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return None


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
