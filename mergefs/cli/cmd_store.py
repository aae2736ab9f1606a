"""Store verbs: import, commit, release, prune, du, ls, inspect, fsck, export.

Also the store forms of merge, diff and explain (``store_merge``,
``store_diff``, ``store_explain``), called by ``cmd_core`` when no ``--out``
is given. A REF is a name, an id or a unique id prefix; a layer directory is
spelled as a path (``refs``) and imported implicitly only by merge, diff and
commit (as the README says); explain, inspect, export and release never import. The store root is
``--root``, else ``$MERGEFS_ROOT``, else /var/lib/mergefs (root) or
$XDG_DATA_HOME/mergefs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..layer import FORMATS
from . import output, progress, refs


def _existing_store(args):
    """The store for a verb that only reads it: a missing store is not created."""
    from snapshotter.store import default_root
    from ..errors import NotFound
    root = default_root(getattr(args, "root", None))
    if not os.path.exists(os.path.join(root, "meta.db")):
        raise NotFound(f"no store at {root} (nothing has been imported there)")
    return _store(args)


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
    p.add_argument("--image", metavar="REF", help="the image to import from a layout or archive "
                   "holding several (ref name, tag, repo:tag or manifest digest)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
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
    p.add_argument("--compression", choices=("gzip", "zstd", "none"), default=None,
                   help="layer compression for tar and oci (oci default: gzip, on every core; "
                   "zstd: application/vnd.oci.image.layer.v1.tar+zstd; tar default: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)


# -- merge / diff / explain (store forms) ----------------------------------------------
def store_merge(args) -> int:
    inputs = [refs.store_arg(r) for r in args.refs]
    with _store(args) as sn, progress.task(args, "building farm") as report:
        res = sn.merge(inputs, strategy=args.strategy, name=args.name, intent=args.intent,
                       fmt=args.format, progress=report)
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
        row = sn.diff(_stack(args.lower), _stack(args.upper), name=args.name, fmt=args.format)
    print(json.dumps({"id": row.id}) if args.json else row.id)
    return 0


def _stack(arg: str) -> str:
    """diff's LOWER/UPPER for the store: directories made absolute (imported), refs as given."""
    return ":".join(a.value for a in refs.stack(arg, "diff"))


def store_explain(args) -> int:
    """explain REF PATH...: reads the store, never writes to it (a directory is no REF)."""
    from snapshotter.service import short
    from ..explain import explain
    from ..resolver import Resolver
    ref, paths = refs.ref_only(args.args[0], "explain"), args.args[1:]
    with _existing_store(args) as sn:
        row = sn.resolve(ref, args.format)
        ids = sn.layers(row)
        dirs = [sn.layer_dir(i) for i in ids]
        missing = [i for i, d in zip(ids, dirs) if not os.path.isdir(d)]
        if missing:        # a farm whose inputs were pruned: it explains itself
            ids, dirs = [row.id], [sn.layer_dir(row.id)]
            print(f"mergefs: note: inputs of {short(row.id)} were pruned; explaining "
                  "the farm as one layer", file=sys.stderr)
    with Resolver(dirs) as r:
        for path in paths:
            p = os.fsencode(path).strip(b"/")
            output.print_explanation(p, explain(r, p), [short(i) for i in ids], as_json=args.json)
    return 0


# -- store verbs ------------------------------------------------------------------
def cmd_import(args) -> int:
    from .. import oci
    from ..errors import NotFound
    if args.src != "-" and not os.path.lexists(args.src):
        raise NotFound(f"{args.src!r} does not exist")
    # a pipe is read once, by the import (issue 11.11): only a directory counts entries
    unit = "entries" if os.path.isdir(args.src) and \
        oci.detect_source(args.src) == "layer-dir" else "bytes"
    with _store(args) as sn:
        with progress.task(args, "importing", unit) as report:
            res = sn.import_(args.src, fmt=args.format, name=args.name, progress=report,
                             image=args.image)
        if res.moved:
            tag, old, new = res.moved
            print(f"mergefs: name {tag!r} moved from {old[:19]} to {new[:19]} (the old image "
                  "keeps its other names and refs)", file=sys.stderr)
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
        row = sn.commit_upper(refs.store_arg(args.upper, "UPPERDIR|KEY"),
                              parent=args.parent and refs.store_arg(args.parent, "--parent"),
                              name=args.name)
    print(json.dumps({"id": row.id}) if args.json else row.id)
    return 0


def cmd_release(args) -> int:
    with _store(args) as sn:
        for ref in args.refs:
            print(sn.release(refs.ref_only(ref, "release")).id)
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
              + ("" if d["state"] == "committed" else f" [{d['state']}]")
              + (f" [packed: {d['packed'][:19]}]" if d.get("packed") else ""))
    return 0


def cmd_inspect(args) -> int:
    ref = refs.ref_only(args.ref, "inspect")
    with _existing_store(args) as sn:
        d = sn.inspect(ref)                # also a corrupt one: inspecting it is the point
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
    from ..errors import InvalidLayer
    if args.compression and args.format == "dir":
        raise InvalidLayer("--compression is for --format tar or oci")
    compression = {None: "auto", "none": None}.get(args.compression, args.compression)
    ref = refs.ref_only(args.ref, "export")
    with _existing_store(args) as sn, progress.task(args, "exporting", "bytes") as report:
        sn.export(ref, args.output, args.format, compression, report)
    print(args.output)
    return 0
