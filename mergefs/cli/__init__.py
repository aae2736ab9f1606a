"""The ``mergefs`` command line: a leaf that parses, calls the library, prints.

Each group of verbs lives in its own module with a ``register(subparsers)``
function; ``main`` is the one place that maps exceptions to exit codes,
through the table in ``mergefs.errors`` (``ExitCode``): 0 ok, 1 mergefs
error, 2 usage, 3 not found, 4 exists, 5 no space, 6 permission denied or
read-only, 70 internal error (a bug), 130 interrupted. Commands return an
exit code or raise; none calls ``sys.exit``.
"""
from __future__ import annotations

import os
import sys

from ..errors import ExitCode, UsageError, categorize, message

VERB_MODULES = ("core", "mount", "store", "views", "registry", "serve")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mergefs")
    except PackageNotFoundError:        # run from a source tree that was never installed
        return "unknown (not installed)"


def _version_action():
    """``--version``, with importlib.metadata (~40 ms) imported only when asked."""
    import argparse

    class VersionAction(argparse.Action):
        def __init__(self, option_strings, dest=argparse.SUPPRESS, **kw):
            super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                             help="show program's version number and exit", **kw)

        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog} {_version()}")
            parser.exit()
    return VersionAction


# verbs whose module is known without importing every verb module: ``mergefs mount``
# (and pull, push) builds only its own parser (every module's argparse set-up costs ~30 ms)
FAST_VERBS = {"mount": "mount", "umount": "mount", "pull": "registry", "push": "registry"}


def _verb_modules(argv: list[str] | None) -> tuple[str, ...]:
    """The verb's module alone when the first word after the global options is a fast verb."""
    args = list(argv or ())
    while args[:1] in (["--debug"], ["--root"]) or args[:1] and args[0].startswith("--root="):
        del args[:2 if args[0] == "--root" else 1]
    if args and args[0] in FAST_VERBS:
        return (FAST_VERBS[args[0]],)
    return VERB_MODULES


def build_parser(argv: list[str] | None = None):
    import argparse
    parser = argparse.ArgumentParser(
        prog="mergefs", description="Merged container filesystem layers. Inputs are given "
        "bottom first. A layer directory is spelled as a path (/abs, ./rel, ../rel, dir:PATH); "
        "a store ref (name, id, id prefix) has no '/'; 'a/b' is refused (write ./a/b).")
    parser.add_argument("--version", action=_version_action())
    parser.add_argument("--root", help="store root (default $MERGEFS_ROOT, /var/lib/mergefs "
                        "as root, else $XDG_DATA_HOME/mergefs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    import importlib
    for mod in _verb_modules(argv):
        try:
            module = importlib.import_module(f"{__name__}.cmd_{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.cmd_{mod}":
                raise
            continue
        module.register(sub)
    return parser


def _exit_code(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line for ``exc`` (the table in ``mergefs.errors``)."""
    return int(categorize(exc).exit_code), message(exc)


def _serves_a_mount(args: list[str]) -> bool:
    """``mount`` or a mount-helper argv (``-o lowerdir=...``), not in the foreground:
    worth forking the server before anything else (a wrong guess costs an idle fork)."""
    if {"--foreground", "-h", "--help"} & set(args):
        return False
    return args[:1] == ["mount"] or (args[:1] != [] and args[0] not in VERB_WORDS
                                     and any("lowerdir=" in a for a in args))


VERB_WORDS = {"umount", "serve", "views", "store", "registry"}


def main(argv: list[str] | None = None) -> int:
    mounting = argv is None and _serves_a_mount(sys.argv[1:])
    quick_exit = mounting or (argv is None and _verb_modules(sys.argv[1:]) == ("registry",))
    if mounting and not any("upperdir=" in a for a in sys.argv[1:]):
        # read-only over plain layers: the kernel's overlayfs, no server (cmd_mount_helper)
        from .cmd_mount_helper import kernel_read_only
        if kernel_read_only(sys.argv[1:]) == 0:
            os._exit(0)
    if mounting and any("service" in a for a in sys.argv[1:]):
        # service=SOCK: mounted by that running service (cmd_mount_helper), no cold start
        from .cmd_mount_helper import through_service
        code = through_service(sys.argv[1:])
        if code is not None:
            sys.stderr.flush()
            os._exit(code)
    if mounting:
        from ..union import prefork     # the server imports pyfuse3/trio meanwhile
        prefork.start_early()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if quick_exit and not mounting:
            from . import cmd_registry  # pull: skopeo starts from argv, before argparse
            cmd_registry.start_early(argv)
        code = _main(argv)
    finally:
        if "mergefs.union.prefork" in sys.modules:
            sys.modules["mergefs.union.prefork"].cancel()
        if "mergefs.cli.cmd_registry" in sys.modules:
            sys.modules["mergefs.cli.cmd_registry"].stop_early()
    if quick_exit:
        # a mount (or push, pull) command is done: skip tearing down the interpreter
        # (~10 ms of the time podman, or a pull's caller, waits for it); nothing it
        # made needs a finaliser (stores are closed, skopeo processes waited for)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str]) -> int:
    from . import cmd_mount_helper
    if cmd_mount_helper.is_mount_helper_call(argv):
        # mount.fuse3 convention: mergefs SOURCE MOUNTPOINT -o OPTIONS
        try:
            argv = cmd_mount_helper.translate(argv)
        except UsageError as e:
            print(f"mergefs: error: {e}", file=sys.stderr)
            return ExitCode.USAGE
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:         # argparse's usage errors and --help, for in-process callers
        return e.code if isinstance(e.code, int) else ExitCode.USAGE
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK
    except Exception as exc:  # the one place errors become exit codes
        if args.debug:
            raise
        code, msg = _exit_code(exc)
        print(f"mergefs: error: {msg}", file=sys.stderr)
        return code
