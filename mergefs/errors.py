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

Only two places translate them: ``mergefs.cli`` (to one line and an exit code)
and ``mergefs.union`` (to ``FUSEError``).
"""


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
