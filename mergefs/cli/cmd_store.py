"""Store verbs: import, commit, release, prune, du, ls, inspect, fsck, export.

Also the store forms of merge, diff and explain (``store_merge``,
``store_diff``, ``store_explain``), called by ``cmd_core`` when no ``--out``
is given. A REF is a name, an id, a unique id prefix, or a layer directory
(an argument containing '/', imported implicitly). The store root is
``--root``, else ``$MERGEFS_ROOT``, else /var/lib/mergefs (root) or
$XDG_DATA_HOME/mergefs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..layer import FORMATS
from . import output


def _store(args, reconcile: bool = True):
    """The ``Snapshotter`` at ``--root``; says on stderr what opening it reconciled."""
    from snapshotter import Snapshotter
    sn = Snapshotter(getattr(args, "root", None), reconcile=reconcile)
    for line in sn.reconciled:
        print(f"mergefs: reconciled: {line}", file=sys.stderr)
    return sn


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import layers into the store (dir, tar, OCI layout, "
                       "docker-archive); prints one id per layer, bottom first")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--name")
    p.add_argument("--format", choices=FORMATS, default="auto", help="whiteout format of a dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("commit", help="turn an overlay-format upper dir (or an active "
                       "snapshot) into a layer with explicit whiteouts")
    p.add_argument("upper", metavar="UPPERDIR|KEY")
    p.add_argument("--parent", metavar="REF")
    p.add_argument("--name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_commit)

    p = sub.add_parser("release", help="drop the CLI's ref on snapshots (never deletes)")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("prune", help="delete unreferenced snapshots; report what was freed")
    p.add_argument("--all", action="store_true", help="named snapshots too")
    p.add_argument("--keep-duration", metavar="D", help="keep those used within D (30m, 24h, 7d)")
    p.add_argument("--keep-storage", metavar="SIZE", help="stop once the store is at most SIZE")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("du", help="disk usage per snapshot, hardlink-aware")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_du)

    p = sub.add_parser("ls", help="list snapshots")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="one snapshot's metadata")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("fsck", help="check the store; --repair fixes what is safe to fix")
    p.add_argument("--repair", action="store_true")
    p.add_argument("--fast", action="store_true", help="skip re-hashing layer content")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser("export", help="export a snapshot as a dir, an OCI layer tar or an OCI layout")
    p.add_argument("ref", metavar="REF")
    p.add_argument("-o", "--output", required=True, metavar="PATH")
    p.add_argument("--format", choices=("dir", "tar", "oci"), default="dir")
    p.set_defaults(func=cmd_export)


# -- merge / diff / explain (store forms) ----------------------------------------------
def store_merge(args) -> int:
    with _store(args) as sn:
        res = sn.merge(args.refs, strategy=args.strategy, name=args.name, intent=args.intent,
                       fmt=args.format)
    if args.json:
        print(json.dumps({"id": res.row.id, "strategy": res.decision.strategy,
                          "reused": res.reused, "reasons": list(res.decision.reasons)}))
        return 0
    if args.explain:
        print(f"strategy: {res.decision.strategy}" + (" (reused)" if res.reused else ""))
        for r in res.decision.reasons:
            print(f"  - {r}")
    print(res.row.id)
    return 0


def store_diff(args) -> int:
    with _store(args) as sn:
        row = sn.diff(args.lower, args.upper, name=args.name, fmt=args.format)
    print(json.dumps({"id": row.id}) if args.json else row.id)
    return 0


def store_explain(args) -> int:
    from snapshotter.service import short
    from ..explain import explain
    from ..resolver import Resolver
    if len(args.args) != 2:
        from ..errors import InvalidLayer
        raise InvalidLayer("usage: mergefs explain REF PATH (or PATH LAYERDIR...)")
    ref, path = args.args
    with _store(args) as sn:
        row = sn.resolve(ref, args.format)
        ids = sn.layers(row)
        dirs = [sn.layer_dir(i) for i in ids]
        missing = [i for i, d in zip(ids, dirs) if not os.path.isdir(d)]
        if missing:        # a farm whose inputs were pruned: it explains itself
            ids, dirs = [row.id], [sn.layer_dir(row.id)]
            print(f"mergefs: note: inputs of {short(row.id)} were pruned; explaining "
                  "the farm as one layer", file=sys.stderr)
    p = os.fsencode(path).strip(b"/")
    with Resolver(dirs) as r:
        rows = explain(r, p)
    output.print_explanation(p, rows, [short(i) for i in ids], as_json=args.json)
    return 0


# -- store verbs ------------------------------------------------------------------
def cmd_import(args) -> int:
    with _store(args) as sn:
        res = sn.import_(args.src, fmt=args.format, name=args.name,
                         progress=output.progress("copied") if sys.stderr.isatty() else None)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        out = {"layers": [sn.describe(r) for r in res.layers],
               "image": sn.describe(res.image) if res.image else None} if args.json else None
    if args.json:
        print(json.dumps(out))
    else:
        for r in res.layers:
            print(r.id)
    return 0


def cmd_commit(args) -> int:
    with _store(args) as sn:
        row = sn.commit_upper(args.upper, parent=args.parent, name=args.name)
    print(json.dumps({"id": row.id}) if args.json else row.id)
    return 0


def cmd_release(args) -> int:
    with _store(args) as sn:
        for ref in args.refs:
            print(sn.release(ref).id)
    return 0


def cmd_prune(args) -> int:
    from snapshotter.gc import parse_duration, parse_size
    with _store(args) as sn:
        rep = sn.prune(all_named=args.all,
                       keep_duration=parse_duration(args.keep_duration) if args.keep_duration
                       else None,
                       keep_storage=parse_size(args.keep_storage) if args.keep_storage else None,
                       dry_run=args.dry_run)
    for sid, why in rep.kept:
        print(f"mergefs: warning: kept {sid}: its holders.json lists {why}, which the "
              "metadata lacks; run `mergefs fsck --repair`", file=sys.stderr)
    if args.json:
        print(json.dumps({"deleted": rep.deleted, "freed": rep.freed, "dry_run": rep.dry_run,
                          "kept": [sid for sid, _ in rep.kept]}))
        return 0
    verb = "would delete" if rep.dry_run else "deleted"
    for i in rep.deleted:
        print(f"{verb} {i}")
    print(f"Total: {'would free' if rep.dry_run else 'freed'} {output.human(rep.freed)} "
          f"({len(rep.deleted)} snapshots)")
    return 0


def cmd_du(args) -> int:
    with _store(args) as sn:
        u = sn.du()
    output.print_du(u, verbose=args.verbose, as_json=args.json)
    return 0


def cmd_ls(args) -> int:
    with _store(args) as sn:
        dicts = sn.ls()
    if args.json:
        print(json.dumps(dicts))
        return 0
    print(f"{'ID':<20} {'KIND':<7} {'STRATEGY':<8} {'REFS':<4} {'NAMES':<16} DESCRIPTION")
    for d in dicts:
        print(f"{d['id'][7:26]:<20} {d['kind']:<7} {d['strategy'] or '-':<8} "
              f"{len(d['refs']):<4} {','.join(d['names']) or '-':<16} {d['description']}"
              + ("" if d["state"] == "committed" else f" [{d['state']}]"))
    return 0


def cmd_inspect(args) -> int:
    with _store(args) as sn:
        d = sn.inspect(args.ref)           # also a corrupt one: inspecting it is the point
    if args.json:
        print(json.dumps(d))
    else:
        for k, v in d.items():
            print(f"{k + ':':<14}{';'.join(v) if isinstance(v, list) else v}")
    return 0


def cmd_fsck(args) -> int:
    from snapshotter.fsck import fsck_store
    findings = fsck_store(args.root, repair=args.repair, verify_content=not args.fast)
    errors = [f for f in findings if f.severity == "error" and not f.repaired]
    if args.json:
        print(json.dumps({"clean": not errors, "findings": [vars(f) for f in findings]}))
    else:
        for f in findings:
            tail = f" [{f.repaired}]" if f.repaired else ""
            print(f"{f.severity:<8} {f.kind:<18} {f.subject}: {f.detail}{tail}")
        print("store is clean" if not errors else f"{len(errors)} error(s)")
    return 1 if errors else 0


def cmd_export(args) -> int:
    with _store(args) as sn:
        sn.export(args.ref, args.output, args.format)
    print(args.output)
    return 0
