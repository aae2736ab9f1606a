"""Verbs that work on layer directories without a store: merge --out, diff --out, explain -l.

Without ``--out`` merge and diff go to the store (``cmd_store``), and so does
``explain REF``. Which argument is a directory and which a ref: ``refs``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..layer import FORMATS, Layer
from . import output, progress, refs
from .refs import UsageError

EXPLAIN_USAGE = ("mergefs explain REF PATH...  (a store ref first, then paths in its merged "
                 "view) or mergefs explain -l DIR [-l DIR...] PATH...  (layer directories, "
                 "bottom first)")


def dir_inputs(args: list[str], verb: str) -> list[str]:
    """Layer directories for a verb without a store (``--out``); a ref is a usage error."""
    out = []
    for a in args:
        c = refs.classify(a)
        if not c.is_dir:
            raise UsageError(f"{verb} --out takes layer directories; {a!r} is a store ref "
                             f"(write ./{a} for a directory, or drop --out to use the store)")
        out.append(c.value)
    return out


def stack_arg(arg: str, fmt: str) -> list[Layer]:
    """LOWER/UPPER of diff --out: one directory, or several joined by ':' (bottom first)."""
    parts = refs.stack(arg, "diff")
    for p in parts:
        if not p.is_dir:
            raise UsageError(f"diff --out takes layer directories; {p.value!r} is a store ref "
                             f"(write ./{p.value} for a directory, or drop --out)")
    return [Layer(p.value, fmt) for p in parts]


def _jobs(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--jobs must be at least 1, not {n}")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge layers (bottom first) into a farm or the store")
    p.add_argument("refs", nargs="+", metavar="LAYER|REF")
    p.add_argument("--out", help="build the farm at this new directory (no store)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="whiteout format of the inputs")
    p.add_argument("-j", "--jobs", type=_jobs, default=None, metavar="N",
                   help="build a farm with N parallel workers (default: up to 4; 1: sequential)")
    p.add_argument("--strategy", choices=("auto", "farm", "union"), default="auto")
    p.add_argument("--name", help="also name the result in the store")
    p.add_argument("--explain", action="store_true", help="print why the strategy was chosen")
    p.add_argument("--for", dest="intent", choices=("inspect", "rootfs", "export"), default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("diff", help="Diff(LOWER, UPPER) as a layer with explicit whiteouts")
    p.add_argument("lower", metavar="LOWER", help="a tree or ref; a stack as DIR:DIR:... bottom first")
    p.add_argument("upper", metavar="UPPER")
    p.add_argument("--out", help="write the diff layer to this new directory (no store)")
    p.add_argument("--format", choices=FORMATS, default="auto")
    p.add_argument("--name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("explain", help="which layer supplies PATH and what hid the others",
                       usage=EXPLAIN_USAGE.replace("  (", "\n         (").replace(" or ", "\n  or "),
                       description="Read-only: never writes to the store. REF is a store ref "
                       "(name, id, id prefix; never a directory). Layer directories go behind "
                       "-l, bottom first. PATHs are paths in the merged view (/etc/passwd and "
                       "etc/passwd are the same path).")
    p.add_argument("args", nargs="+", metavar="REF PATH...|PATH...")
    p.add_argument("-l", "--layer", dest="layers", action="append", default=[], metavar="DIR",
                   help="a layer directory (repeat, bottom first); then every argument is a PATH")
    p.add_argument("--format", choices=FORMATS, default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per PATH")
    p.set_defaults(func=cmd_explain)


def cmd_merge(args) -> int:
    if args.out is None:
        from .cmd_store import store_merge
        return store_merge(args)
    from ..farm import build_farm
    layers = [Layer(r, args.format) for r in dir_inputs(args.refs, "merge")]
    with progress.task(args, "building farm") as report:
        stats = build_farm(layers, args.out, workers=args.jobs, progress=report)
    for w in stats.warnings:
        print(f"mergefs: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps({"out": os.path.abspath(args.out), **stats.as_dict()}))
    else:
        print(args.out)
    return 0


def cmd_diff(args) -> int:
    if args.out is None:
        from .cmd_store import store_diff
        return store_diff(args)
    from ..diff import write_diff
    stats = write_diff(stack_arg(args.lower, args.format), stack_arg(args.upper, args.format),
                       args.out)
    if args.json:
        print(json.dumps({"out": os.path.abspath(args.out), **stats.as_dict()}))
    else:
        print(args.out)
    return 0


def cmd_explain(args) -> int:
    if not args.layers:
        first = args.args[0]
        if refs.looks_like_dir(first) or len(args.args) < 2:
            raise UsageError(f"usage: {EXPLAIN_USAGE}")
        refs.classify(first, "REF")        # 'a/b' is a usage error too
        from .cmd_store import store_explain
        return store_explain(args)
    from ..explain import explain
    from ..resolver import Resolver
    dirs = [os.path.abspath(d[len(refs.DIR_PREFIX):] if d.startswith(refs.DIR_PREFIX) else d)
            for d in args.layers]
    with Resolver([Layer(d, args.format) for d in dirs]) as r:
        for path in args.args:
            p = os.fsencode(path).strip(b"/")
            output.print_explanation(p, explain(r, p), dirs, as_json=args.json)
    return 0
