"""The errors mergefs raises.

Domain code raises these typed errors, or lets ``OSError`` through (ENOSPC,
EACCES, EXDEV ...). Each is also the natural builtin, so callers that do not
know mergefs can still catch them::

    MergefsError
     ├── NotFound            (LookupError)      unknown layer, ref or path
     ├── AlreadyExists       (FileExistsError)  an output or key that is taken
     ├── InvalidLayer        (ValueError)       not a directory, malformed input
 ├── InvalidArgument     (ValueError)       a malformed name or request
     ├── UnsafeContent       (ValueError)       traversal, links out of a layer
     ├── FailedPrecondition  (RuntimeError)     removing what others depend on
     ├── MountError          (RuntimeError)     a mount that did not come up
 └── UsageError          (ValueError)       a command line that cannot be run as given

Every boundary translates them through one table, ``CATEGORIES`` below: the
CLI (``mergefs.cli``: one line and an exit code), the FUSE server
(``mergefs.union``: an errno in ``FUSEError``) and the gRPC service (a status
code). ``categorize`` gives the category of any exception: a typed error by
its class, an ``OSError`` by its errno, anything else is ``INTERNAL`` (a bug).
"""


import enum
import errno
from typing import NamedTuple


class MergefsError(Exception):
    """Base of every error mergefs raises on purpose."""


class NotFound(MergefsError, LookupError):
    pass


class AlreadyExists(MergefsError, FileExistsError):
    pass


class InvalidLayer(MergefsError, ValueError):
    pass


class InvalidArgument(MergefsError, ValueError):
    """A request that can never succeed as given: a malformed name, an immutable field."""


class UnsafeContent(MergefsError, ValueError):
    pass


class FailedPrecondition(MergefsError, RuntimeError):
    pass


class MountError(MergefsError, RuntimeError):
    pass


class UsageError(MergefsError, ValueError):
    """A command line that cannot be run as given (the CLI's exit code 2)."""


class StoreDamaged(FailedPrecondition):
    """The store's metadata cannot be read (a corrupt or truncated ``meta.db``)."""


class ExitCode(enum.IntEnum):
    """The CLI's exit codes (documented in the README and ``mergefs --help``)."""
    OK = 0
    ERROR = 1              # a mergefs error: bad input, failed precondition, damaged store
    USAGE = 2              # the command line cannot be run as given
    NOT_FOUND = 3
    EXISTS = 4
    NO_SPACE = 5           # the store's (or the output's) filesystem is full
    PERMISSION = 6         # permission denied, read-only filesystem or database
    INTERRUPTED = 130
    INTERNAL = 70          # a bug: please report it (``--debug`` shows the traceback)


class Category(NamedTuple):
    name: str
    exit_code: ExitCode
    errno: int              # what the FUSE server answers
    grpc: str               # the gRPC status code's name (grpc.StatusCode.<grpc>)


NOT_FOUND = Category("not-found", ExitCode.NOT_FOUND, errno.ENOENT, "NOT_FOUND")
EXISTS = Category("exists", ExitCode.EXISTS, errno.EEXIST, "ALREADY_EXISTS")
PRECONDITION = Category("failed-precondition", ExitCode.ERROR, errno.EBUSY,
                        "FAILED_PRECONDITION")
INVALID = Category("invalid", ExitCode.ERROR, errno.EIO, "INVALID_ARGUMENT")
# UnsafeContent is EACCES: the content exists but mergefs refuses to follow it
# out of its layer (S2).
UNSAFE = Category("unsafe", ExitCode.ERROR, errno.EACCES, "INVALID_ARGUMENT")
USAGE = Category("usage", ExitCode.USAGE, errno.EINVAL, "INVALID_ARGUMENT")
MOUNT = Category("mount", ExitCode.ERROR, errno.EIO, "UNKNOWN")
NO_SPACE = Category("no-space", ExitCode.NO_SPACE, errno.ENOSPC, "RESOURCE_EXHAUSTED")
PERMISSION = Category("permission", ExitCode.PERMISSION, errno.EACCES, "PERMISSION_DENIED")
OS_ERROR = Category("os-error", ExitCode.ERROR, errno.EIO, "UNKNOWN")
INTERNAL = Category("internal", ExitCode.INTERNAL, errno.EIO, "UNKNOWN")

# Typed errors, most specific first.
CATEGORIES: tuple[tuple[type, Category], ...] = (
    (UsageError, USAGE), (NotFound, NOT_FOUND), (AlreadyExists, EXISTS),
    (FailedPrecondition, PRECONDITION), (InvalidLayer, INVALID), (InvalidArgument, INVALID),
    (UnsafeContent, UNSAFE), (MountError, MOUNT), (MergefsError, OS_ERROR),
)

# OSError by errno; other errnos are OS_ERROR (exit 1) and keep their errno for FUSE.
ERRNO_CATEGORIES = {
    errno.ENOENT: NOT_FOUND, errno.EEXIST: EXISTS, errno.ENOSPC: NO_SPACE,
    errno.EDQUOT: NO_SPACE, errno.EACCES: PERMISSION, errno.EPERM: PERMISSION,
    errno.EROFS: PERMISSION,
}


def categorize(exc: BaseException) -> Category:
    for cls, cat in CATEGORIES:
        if isinstance(exc, cls):
            return cat
    if isinstance(exc, OSError):
        return ERRNO_CATEGORIES.get(exc.errno, OS_ERROR)
    return INTERNAL


def errno_of(exc: BaseException) -> int | None:
    """The errno the FUSE server answers for ``exc``; None for a bug (answered EIO + logged)."""
    if isinstance(exc, OSError) and not isinstance(exc, MergefsError) and exc.errno:
        return exc.errno
    cat = categorize(exc)
    return None if cat is INTERNAL else cat.errno


def message(exc: BaseException) -> str:
    """One line for a user: the error's text, with the path an OSError names."""
    if isinstance(exc, OSError) and not isinstance(exc, MergefsError):
        name = exc.filename
        where = f": {_short(name if isinstance(name, str) else name.decode(errors='replace'))}" \
            if isinstance(name, (str, bytes)) and name else ""
        return f"{exc.strerror or exc}{where}"
    if categorize(exc) is INTERNAL:
        return f"internal error: {exc!r}"
    return str(exc)


def _short(path: str, keep: int = 100) -> str:
    """A path for one line: a very long one (ENAMETOOLONG deep in a layer) keeps its ends."""
    if len(path) <= 2 * keep + 40:
        return path
    return f"{path[:keep]}...{path[-keep:]} ({len(path)} characters)"
