"""The ``mergefs`` command line: a leaf that parses, calls the library, prints.

Each group of verbs lives in its own module with a ``register(subparsers)``
function; ``main`` is the one place that maps exceptions to exit codes.
Exit codes: 0 ok, 1 mergefs error, 2 usage, 3 not found, 4 exists,
5 no space, 6 permission denied, 70 internal error.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from ..errors import AlreadyExists, MergefsError, NotFound, UsageError

VERB_MODULES = ("core", "mount", "store")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergefs", description="Merged container filesystem layers "
        "(inputs are given bottom first; an argument containing '/' is a layer directory).")
    parser.add_argument("--root", help="store root (default $MERGEFS_ROOT, /var/lib/mergefs "
                        "as root, else $XDG_DATA_HOME/mergefs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    import importlib
    for mod in VERB_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.cmd_{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.cmd_{mod}":
                raise
            continue
        module.register(sub)
    return parser


def _exit_code(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, UsageError):
        return 2, str(exc)
    if isinstance(exc, NotFound):
        return 3, str(exc)
    if isinstance(exc, AlreadyExists):
        return 4, str(exc)
    if isinstance(exc, MergefsError):
        return 1, str(exc)
    if isinstance(exc, OSError):
        where = f": {os.fsdecode(exc.filename)}" if exc.filename else ""
        msg = f"{exc.strerror or exc}{where}"
        if exc.errno == errno.ENOSPC:
            return 5, msg
        if exc.errno in (errno.EACCES, errno.EPERM):
            return 6, msg
        if exc.errno == errno.ENOENT:
            return 3, msg
        if exc.errno == errno.EEXIST:
            return 4, msg
        return 1, msg
    return 70, f"internal error: {exc!r}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import cmd_mount_helper
    if cmd_mount_helper.is_mount_helper_call(argv):
        # mount.fuse3 convention: mergefs SOURCE MOUNTPOINT -o OPTIONS
        try:
            argv = cmd_mount_helper.translate(argv)
        except UsageError as e:
            print(f"mergefs: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the one place errors become exit codes
        if args.debug:
            raise
        code, msg = _exit_code(exc)
        print(f"mergefs: error: {msg}", file=sys.stderr)
        return code
