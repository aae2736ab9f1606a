"""One table of error categories feeds exit codes, errno and gRPC codes."""
from __future__ import annotations

import errno

import pytest

from mergefs import errors
from mergefs.errors import ExitCode, categorize, errno_of, message

CASES = [
    (errors.NotFound("x"), ExitCode.NOT_FOUND, errno.ENOENT, "NOT_FOUND"),
    (errors.AlreadyExists("x"), ExitCode.EXISTS, errno.EEXIST, "ALREADY_EXISTS"),
    (errors.FailedPrecondition("x"), ExitCode.ERROR, errno.EBUSY, "FAILED_PRECONDITION"),
    (errors.StoreDamaged("x"), ExitCode.ERROR, errno.EBUSY, "FAILED_PRECONDITION"),
    (errors.InvalidLayer("x"), ExitCode.ERROR, errno.EIO, "INVALID_ARGUMENT"),
    (errors.InvalidArgument("x"), ExitCode.ERROR, errno.EIO, "INVALID_ARGUMENT"),
    (errors.UnsafeContent("x"), ExitCode.ERROR, errno.EACCES, "INVALID_ARGUMENT"),
    (errors.UsageError("x"), ExitCode.USAGE, errno.EINVAL, "INVALID_ARGUMENT"),
    (OSError(errno.ENOSPC, "full"), ExitCode.NO_SPACE, errno.ENOSPC, "RESOURCE_EXHAUSTED"),
    (OSError(errno.EACCES, "no"), ExitCode.PERMISSION, errno.EACCES, "PERMISSION_DENIED"),
    (OSError(errno.EROFS, "ro"), ExitCode.PERMISSION, errno.EROFS, "PERMISSION_DENIED"),
    (OSError(errno.ENOENT, "gone"), ExitCode.NOT_FOUND, errno.ENOENT, "NOT_FOUND"),
    (OSError(errno.EXDEV, "xdev"), ExitCode.ERROR, errno.EXDEV, "UNKNOWN"),
]


@pytest.mark.parametrize("exc,code,err,grpc", CASES, ids=lambda c: getattr(c, "__name__", None))
def test_one_table(exc, code, err, grpc):
    cat = categorize(exc)
    assert (cat.exit_code, errno_of(exc), cat.grpc) == (code, err, grpc)


def test_a_bug_is_internal_everywhere():
    exc = KeyError("oops")
    assert categorize(exc).exit_code == ExitCode.INTERNAL == 70
    assert errno_of(exc) is None                 # the FUSE server logs it and answers EIO
    assert message(exc).startswith("internal error")


def test_messages_are_one_line_also_for_an_fd():
    assert message(OSError(errno.E2BIG, "Argument list too long", 7)) == "Argument list too long"
    assert message(OSError(errno.ENOENT, "No such file", b"/x\xff")) == "No such file: /x\ufffd"


def test_usage_errors_exit_2_in_process(capsys):
    from mergefs.cli import main
    assert main(["/src", "/mnt", "-o", "lowerdir=/a,bogus"]) == ExitCode.USAGE
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["no-such-verb"]) == ExitCode.USAGE


def test_readme_commands_parse():
    """Every `mergefs VERB ...` line of the README's examples is a valid command line."""
    import shlex
    from pathlib import Path
    from mergefs.cli import build_parser
    readme = Path(__file__).resolve().parents[2] / "README.md"
    lines = [line.split("#")[0].strip() for line in readme.read_text().splitlines()
             if line.startswith("    mergefs ")]          # the indented example blocks
    cmds, cur = [], []
    for line in lines:
        lex = shlex.shlex(line.replace("[", "").replace("]", ""),  # [--opt]: optional
                          posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        for tok in list(lex) + [";"]:
            if tok in (";", "&", "&&", "|", "||"):           # shell operators end a command
                if cur and cur[0] == "mergefs":
                    cmds.append(cur[1:])
                cur = []
            else:
                cur.append(tok)
    assert any(c[0] == "install-mount-helper" for c in cmds)
    parser = build_parser()
    for argv in cmds:
        parser.parse_args(argv)
