"""``mergefs serve``: the long-running service (containerd's Snapshots API, views, GC).

Foreground; logs to stderr; SIGTERM or SIGINT stops it cleanly. See
``snapshotter.serve.daemon`` for what it owns and how it recovers after a crash.
"""
from __future__ import annotations

import argparse
import logging


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the store to containerd (proxy snapshotter) and "
                       "the CLI on a unix socket, in the foreground",
                       description="Serve the store: containerd's Snapshots gRPC API on --socket, "
                       "live views in one FUSE mount, the CLI's API on STATE/control.sock.")
    p.add_argument("--root", default=argparse.SUPPRESS,
                   help="store root (as before the verb; default $MERGEFS_ROOT or /var/lib/mergefs)")
    p.add_argument("--socket", help="gRPC socket (default /run/mergefs/mergefs.sock)")
    p.add_argument("--state", help="run-time directory: views mount, control socket "
                   "(default: the socket's directory, else /run/mergefs)")
    p.add_argument("--gc-keep-storage", metavar="SIZE", type=_size, help="prune what nothing holds down to "
                   "SIZE bytes (k/M/G/T suffixes) at every GC run")
    p.add_argument("--gc-interval", type=_seconds, default=0.0, metavar="SECONDS",
                   help="run GC every SECONDS (default 0: never)")
    p.add_argument("--mounts", choices=("auto", "views", "fuse"), default="auto",
                   help="give clients binds of views in the service's FUSE mount (views), or "
                   "fuse3.mergefs mounts run by mount.fuse3 (fuse); auto: views when available")
    p.add_argument("--unpack-mounts", dest="unpack", choices=("auto", "overlay", "same"),
                   default="auto", help="what containerd extracts layers into: kernel overlayfs "
                   "over the same upper (overlay), or what --mounts gives (same); auto: overlay "
                   "when the kernel has it and we are root")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)
    p = sub.add_parser("ps", help="list the live views of a running `mergefs serve` and the "
                       "mounts using each")
    p.add_argument("--state", help="the service's run-time directory (default $MERGEFS_STATE, "
                   "/run/mergefs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)


def _size(text: str) -> int:
    from snapshotter.serve.daemon import parse_size
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or k/M/G/T)") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from snapshotter.serve.daemon import Options, exit_without_stragglers, serve
    logging.basicConfig(level=args.log_level.upper(),
                        format="mergefs serve: %(levelname)s %(message)s")
    return exit_without_stragglers(serve(Options(
        root=args.root, socket=args.socket, state=args.state,
        gc_keep_storage=args.gc_keep_storage, gc_interval=args.gc_interval,
        mounts=args.mounts, unpack=args.unpack)))


def cmd_ps(args: argparse.Namespace) -> int:
    import json

    from mergefs.errors import NotFound
    from snapshotter.serve.control import call, candidates, checked
    for path in candidates(args.state):
        try:
            views = checked(call(path, {"op": "list"}))["views"]
        except OSError:
            continue
        if args.json:
            print(json.dumps(views, indent=2))
            return 0
        print(f"{'KEY':<40} {'VIEW':<40} USERS")
        for v in views:
            print(f"{v['key']:<40} {v['path']:<40} {','.join(v['mounts']) or '-'}")
        return 0
    raise NotFound("no mergefs service is running (looked for " + ", ".join(candidates(args.state))
                   + ")")
