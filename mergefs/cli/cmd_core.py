"""Verbs that work on layer directories without a store: merge --out, diff --out, explain.

Without ``--out`` (or with REFs that are not directories) merge, diff and
explain go to the store (``cmd_store``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..layer import FORMATS, Layer
from . import output


def is_layer_dir_arg(arg: str) -> bool:
    """An argument containing '/' names a layer directory, not a store ref."""
    return "/" in arg


def stack_arg(arg: str, fmt: str) -> list[Layer]:
    """LOWER/UPPER of diff: one directory, or several joined by ':' (bottom first)."""
    return [Layer(p, fmt) for p in arg.split(":")]


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
                       description="mergefs explain PATH LAYER... (directories, bottom first) "
                       "or mergefs explain REF PATH (store)")
    p.add_argument("args", nargs="+", metavar="PATH LAYER...|REF PATH")
    p.add_argument("--format", choices=FORMATS, default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)


def cmd_merge(args) -> int:
    if args.out is None:
        from .cmd_store import store_merge
        return store_merge(args)
    from ..farm import build_farm
    stats = build_farm([Layer(r, args.format) for r in args.refs], args.out,
                       workers=args.jobs)
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
    rest = args.args[1:]
    if not rest or not all(os.path.isdir(a) for a in rest):
        from .cmd_store import store_explain
        return store_explain(args)
    from ..explain import explain
    from ..resolver import Resolver
    path = os.fsencode(args.args[0]).strip(b"/")
    with Resolver([Layer(l, args.format) for l in rest]) as r:
        rows = explain(r, path)
    output.print_explanation(path, rows, rest, as_json=args.json)
    return 0
