"""Registry verbs: push a snapshot to an OCI registry, pull an image into the store.

    mergefs push REF REGISTRY/REPO:TAG [--compression gzip|zstd]
    mergefs pull REGISTRY/REPO:TAG [--name N] [--unpack]

skopeo speaks the distribution protocol (see ``snapshotter.distribution``):
credentials come from ``--authfile``, ``$REGISTRY_AUTH_FILE``, containers'
``auth.json`` or ``~/.docker/config.json``; plain HTTP needs ``--insecure``
unless the registry is on a loopback address. On a terminal, skopeo's
progress bars and one line per layer go to stderr.
"""
from __future__ import annotations

import json
import sys


def _target(text: str):
    import argparse

    from snapshotter.distribution import parse_target
    try:
        return parse_target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _retries(value: str) -> int:
    n = int(value)
    if n < 0:
        import argparse
        raise argparse.ArgumentTypeError(f"--retries must be at least 0, not {n}")
    return n


def _common(p) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP and unverified TLS (always allowed for loopback)")
    p.add_argument("--authfile", metavar="FILE", help="credentials file (auth.json format)")
    p.add_argument("--creds", metavar="USER[:PASSWORD]", help="basic auth credentials")
    p.add_argument("--registry-token", metavar="TOKEN", help="a bearer token")
    p.add_argument("--retries", type=_retries, default=3, metavar="N",
                   help="retries with exponential backoff (1 s, 2 s, 4 s...); default 3")
    p.add_argument("--json", action="store_true")


def register(sub) -> None:
    p = sub.add_parser("push", help="push a layer, merge or image to an OCI registry")
    p.add_argument("ref", metavar="REF")
    p.add_argument("target", metavar="REGISTRY/REPO:TAG", type=_target)
    p.add_argument("--compression", choices=("gzip", "zstd"), default="gzip")
    _common(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="pull an image from an OCI registry into the store "
                       "(only the layers it lacks)")
    p.add_argument("target", metavar="REGISTRY/REPO:TAG", type=_target)
    p.add_argument("--name", help="name of the image record (default: REPO:TAG's last part)")
    p.add_argument("--unpack", action="store_true",
                   help="extract and verify every layer now (default: keep the layers packed, "
                   "as their blobs, and unpack each on first use)")
    _common(p)
    p.set_defaults(func=cmd_pull)


def _client(args):
    from snapshotter.distribution import Skopeo
    return Skopeo(insecure=args.insecure, authfile=args.authfile, creds=args.creds,
                  token=args.registry_token, retries=args.retries, progress=_shown(args))


# -- mergefs pull: skopeo started from the command line alone ------------------------------
_PULL_FLAGS = {"--insecure": "insecure", "--unpack": "unpack", "--json": "json"}
_PULL_VALUES = {"--name": "name", "--authfile": "authfile", "--creds": "creds",
                "--registry-token": "registry_token", "--retries": "retries"}


class _Early:
    """What ``start_early`` started for one reading of the command line."""

    def __init__(self, key: tuple):
        self.key, self.copy, self.procs = key, None, []


_early: _Early | None = None


def _read_pull_argv(argv: list[str]):
    """``[--root R] [--debug] pull TARGET [options]`` read as argparse reads it, into
    (root, an args-like namespace), or None for anything else (abbreviations, ``--``,
    ``-h``, a repeated or missing operand...): argparse then reads it alone."""
    from types import SimpleNamespace
    root, i = None, 0
    while i < len(argv) and argv[i] != "pull":
        if argv[i] == "--root" and i + 1 < len(argv):
            root, i = argv[i + 1], i + 2
        elif argv[i].startswith("--root="):
            root, i = argv[i][7:], i + 1
        elif argv[i] == "--debug":
            i += 1
        else:
            return None
    ns = SimpleNamespace(target=None, name=None, authfile=None, creds=None,
                         registry_token=None, retries="3", insecure=False, unpack=False,
                         json=False)
    args = argv[i + 1:]
    while args:
        word = args.pop(0)
        key, eq, value = word.partition("=")
        if word in _PULL_FLAGS:
            setattr(ns, _PULL_FLAGS[word], True)
        elif key in _PULL_VALUES and (eq or args) and not (value or args[0]).startswith("-"):
            setattr(ns, _PULL_VALUES[key], value if eq else args.pop(0))
        elif not word.startswith("-") and ns.target is None:
            ns.target = word
        else:
            return None
    if i >= len(argv) or ns.target is None:
        return None
    return root, ns


def start_early(argv: list[str]) -> None:
    """``mergefs pull``: start skopeo before argparse, the verbs' modules and the store's
    load (~40 ms of a pull's start): the whole image's copy when the store's blobs say
    what it has (``snapshotter.pullcopy``), then the manifest's and config's inspects.
    ``cmd_pull`` uses them if argparse read the same command, else stops them."""
    global _early
    read = _read_pull_argv(argv)
    if read is None:
        return
    root, ns = read
    from snapshotter.distribution import parse_target
    try:
        ns.target = parse_target(ns.target)
        ns.retries = _retries(ns.retries)
    except Exception:           # noqa: BLE001 - argparse says what is wrong
        return
    client = _client(ns)
    from snapshotter import pullcopy
    _early = early = _Early((root, ns.target, client, ns.unpack, ns.name))
    try:
        early.copy = pullcopy.start(root, client, ns.target, ns.unpack,
                                    ns.name or ns.target.default_name())
        early.procs.append(client.inspect(ns.target))
        early.procs.append(client.inspect(ns.target, config=True))
    except Exception:           # noqa: BLE001 - no skopeo...: cmd_pull says it, as one line
        stop_early()


def stop_early() -> None:
    """Stop what ``start_early`` started and ``cmd_pull`` did not take (by pid)."""
    global _early
    early, _early = _early, None
    if early is None:
        return
    from snapshotter.distribution import stop
    for proc in early.procs:
        stop(proc)
    if early.copy is not None:
        early.copy.cancel()


def _shown(args) -> bool:
    """Progress on a terminal unless --quiet (the CLI's one rule, ``progress.wanted``)."""
    from .progress import wanted
    return wanted(args)


def _progress(msg: str) -> None:
    print(f"mergefs: {msg}", file=sys.stderr, flush=True)


def _store(args):
    """The store at ``--root``, opened as the CLI's ``Snapshotter`` opens it (its ``cli``
    holder keeps what a push or pull records), without loading ``snapshotter.api``."""
    from snapshotter.store import Store
    store = Store(getattr(args, "root", None))
    for line in store.reconciled:
        print(f"mergefs: reconciled: {line}", file=sys.stderr)
    return store


def cmd_push(args) -> int:
    from snapshotter import registry, registry_push
    with _store(args) as store:
        res = registry_push.push(store, args.ref, args.target, _client(args), args.compression,
                                 progress=_progress if _shown(args) else registry._quiet)
    if args.json:
        print(json.dumps({"target": res.target, "manifest": res.manifest_digest,
                          "compressed": res.compressed,
                          "layers": [b._asdict() for b in res.layers]}, indent=2))
    else:
        print(f"{res.target}@{res.manifest_digest}")
    return 0


def cmd_pull(args) -> int:
    global _early
    client = _client(args)
    # skopeo starts before the store opens (and its modules import): first the whole
    # image's copy, when the store's blobs say what it has (pullcopy), the long part;
    # then the manifest's and config's inspects, most of a small image's pull.
    # Started by start_early when main saw the command, else now
    key = (getattr(args, "root", None), args.target, client, args.unpack, args.name)
    if _early is not None and _early.key == key and len(_early.procs) == 2:
        copy, early = _early.copy, tuple(_early.procs)
        _early = None
    else:
        stop_early()
        from snapshotter import pullcopy
        copy = pullcopy.start(getattr(args, "root", None), client, args.target, args.unpack,
                              args.name or args.target.default_name())
        early = ()
    try:
        if not early:
            early = (client.inspect(args.target), client.inspect(args.target, config=True))
        from snapshotter import registry
        from snapshotter.store import CLI_HOLDER
        with _store(args) as store:
            res = registry.pull(store, args.target, args.name, client, holder=CLI_HOLDER,
                                progress=_progress if _shown(args) else registry._quiet,
                                unpack=args.unpack, inspected=early, copy=copy)
    finally:
        from snapshotter.distribution import stop
        for proc in early:
            stop(proc)
        if copy is not None:
            copy.cancel()
    if args.json:
        print(json.dumps({"target": res.target, "manifest": res.manifest_digest,
                          "layers": [r.id for r in res.layers], "fetched": res.fetched,
                          "packed": res.packed,
                          "image": res.image.id if res.image else None}, indent=2))
    else:
        print(res.image.id if res.image else "")
    return 0
