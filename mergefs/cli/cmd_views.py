"""Verbs ``views`` (one FUSE mount serving many views), ``mount-server`` (warm
servers forked per mount) and ``bundle``/``unbundle``.

``mergefs views serve --control SOCK MNT`` serves views in the foreground
until SIGTERM; ``views add|rm|ls|bind`` talk to it over SOCK. ``mergefs
bundle REF DIR`` writes an OCI runtime bundle (``DIR/config.json`` and the
rootfs mounted at ``DIR/rootfs``) for ``runc run -b DIR ID``; ``mergefs
unbundle DIR`` undoes the mount.
"""
from __future__ import annotations

import argparse
import os

from ..mounthelper import DEFAULT_SERVICE, DEFAULT_VIEWS as DEFAULT_CONTROL


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("views", help="one FUSE mount serving many views that share the page cache")
    vs = p.add_subparsers(dest="views_verb", metavar="ACTION", required=True)
    q = vs.add_parser("serve", help="serve the views mount at MOUNTPOINT in the foreground")
    q.add_argument("mountpoint", metavar="MOUNTPOINT")
    _control(q)
    q.add_argument("--no-allow-other", dest="allow_other", action="store_false",
                   help="only root may enter the views (default: allow_other)")
    q.set_defaults(func=cmd_serve)
    q = vs.add_parser("add", help="add view NAME: LAYER... bottom first (or one store ref)")
    q.add_argument("name")
    q.add_argument("layers", nargs="+", metavar="LAYER")
    q.add_argument("--upper")
    q.add_argument("--work")
    q.add_argument("--rw", action="store_true", help="store ref: writable, upper kept in the store")
    _control(q)
    q.set_defaults(func=cmd_add)
    q = vs.add_parser("rm", help="remove a view (refused while a mount uses it)")
    q.add_argument("name")
    q.add_argument("--force", action="store_true")
    _control(q)
    q.set_defaults(func=cmd_rm)
    q = vs.add_parser("ls", help="list views")
    q.add_argument("--json", action="store_true")
    _control(q)
    q.set_defaults(func=cmd_ls)
    q = vs.add_parser("bind", help="bind view NAME at TARGET (suid,dev unless --nosuid)")
    q.add_argument("name")
    q.add_argument("target")
    q.add_argument("--nosuid", action="store_true")
    q.add_argument("--ro", action="store_true")
    _control(q)
    q.set_defaults(func=cmd_bind)

    q = vs.add_parser("install-program", help="write DIR/mergefs-overlayfs, the lean mount "
                      "program for containers/storage (mount_program; mountopt views=SOCK)")
    q.add_argument("--dir", default="/usr/local/bin")
    q.set_defaults(func=cmd_install_program)

    p = sub.add_parser("mount-server", help="serve mount requests (`mergefs -o ...,service=SOCK "
                       "TARGET`): a warm FUSE server per mount (forked, or back from an earlier "
                       "mount), in the foreground")
    p.add_argument("--control", default=DEFAULT_SERVICE, metavar="SOCK",
                   help=f"control socket (default {DEFAULT_SERVICE})")
    p.set_defaults(func=cmd_mount_server)

    p = sub.add_parser("bundle", help="write an OCI runtime bundle for REF at DIR (config.json, "
                       "rootfs mounted); then `runc run -b DIR ID`")
    p.add_argument("ref", metavar="REF", help="a store ref, an OCI image path, or LAYER:LAYER...")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--rw", action="store_true", help="writable rootfs (an upper kept in the store)")
    p.add_argument("--user", help="container user uid[:gid] (default: the image's, else 0)")
    p.add_argument("--views", metavar="SOCK", default=None,
                   help=f"views control socket (default {DEFAULT_CONTROL} when it exists; "
                        "else the rootfs is its own mount)")
    p.add_argument("args", nargs="*", metavar="ARGS", help="after --: the process to run")
    p.set_defaults(func=cmd_bundle)
    p = sub.add_parser("unbundle", help="unmount a bundle's rootfs (and remove its view)")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_unbundle)


def _control(p) -> None:
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="SOCK",
                   help=f"control socket (default {DEFAULT_CONTROL})")


def cmd_serve(args) -> int:
    import logging
    from ..union.mountctl import serve_views
    logging.basicConfig(level=logging.INFO, format="mergefs-views %(levelname)s %(message)s")
    os.makedirs(os.path.dirname(os.path.abspath(args.control)), exist_ok=True)

    def ready():
        print(f"serving views at {os.path.abspath(args.mountpoint)} "
              f"(control {os.path.abspath(args.control)})", flush=True)
    serve_views(args.mountpoint, os.path.abspath(args.control), args.allow_other, ready)
    return 0


def cmd_mount_server(args) -> int:
    import logging
    from ..union.mountsvc import serve_mounts
    logging.basicConfig(level=logging.INFO, format="mergefs-mounts %(levelname)s %(message)s")
    os.makedirs(os.path.dirname(os.path.abspath(args.control)), exist_ok=True)

    def ready():
        print(f"serving mounts (control {os.path.abspath(args.control)})", flush=True)
    serve_mounts(args.control, ready)
    return 0


def cmd_install_program(args) -> int:
    from ..mounthelper import install_program
    print(install_program(args.dir))
    return 0


def _spec(args, name: str):
    """Layer dirs (``--upper``/``--work`` for a writable view) or one store ref
    (``--rw``: an active snapshot keyed ``view:NAME``, kept in the store)."""
    import importlib
    from ..errors import InvalidLayer
    from ..mountspec import MountSpec
    from . import refs
    if (args.upper is None) != (args.work is None):
        raise InvalidLayer("--upper and --work go together")
    layers = [refs.classify(a) for a in args.layers]     # the CLI's one rule for paths and refs
    if all(a.is_dir for a in layers):
        if args.rw:
            raise InvalidLayer("--rw is for store refs; give --upper and --work for directories")
        return MountSpec(tuple(a.value for a in layers),
                         args.upper and os.path.abspath(args.upper),
                         args.work and os.path.abspath(args.work))
    if len(args.layers) != 1:
        raise InvalidLayer("give either layer directories (with '/') or one store ref")
    snapshotter = importlib.import_module("snapshotter")
    with snapshotter.Snapshotter(args.root) as sn:
        spec = sn.mount_spec(args.layers[0], args.rw, key=f"view:{name}")
    return MountSpec(spec.lowers, args.upper or spec.upper, args.work or spec.work)


def cmd_add(args) -> int:
    from ..union.mountctl import control_call
    spec = _spec(args, args.name)
    reply = control_call(args.control, {"op": "add", "name": args.name, "spec": {
        "lowers": list(spec.lowers), "upper": spec.upper, "work": spec.work}})
    print(reply["path"])
    return 0


def cmd_rm(args) -> int:
    from ..union.mountctl import control_call
    control_call(args.control, {"op": "remove", "name": args.name, "force": args.force})
    return 0


def cmd_ls(args) -> int:
    import json
    from ..union.mountctl import control_call
    views = control_call(args.control, {"op": "list"})["views"]
    if args.json:
        print(json.dumps(views, indent=2))
        return 0
    for v in views:
        print(f"{v['name']}\t{'rw' if v['writable'] else 'ro'}\t{len(v['lowers'])} lowers\t"
              f"{','.join(v['mounts']) or '-'}")
    return 0


def cmd_bind(args) -> int:
    from ..union.mountctl import bind, control_call
    views = {v["name"]: v for v in control_call(args.control, {"op": "list"})["views"]}
    if args.name not in views:
        from ..errors import NotFound
        raise NotFound(f"no view {args.name!r}")
    bind(views[args.name]["path"], args.target, suid_dev=not args.nosuid, readonly=args.ro)
    return 0


def cmd_bundle(args) -> int:
    from ..bundle import write_bundle
    control = args.views or (DEFAULT_CONTROL if os.path.exists(DEFAULT_CONTROL) else None)
    spec, image = bundle_source(args)
    print(write_bundle(args.dir, spec, image, args.args or None, args.user, control))
    return 0


def bundle_source(args):
    """(MountSpec, image config or None) for REF: layer dirs ``A:B`` (bottom first,
    ``--rw`` puts the upper in DIR), an OCI image path (imported into the store;
    its config is used), or a store ref."""
    import importlib
    from ..mountspec import MountSpec
    ref, bundle = args.ref, os.path.abspath(args.dir)
    rootfs = os.path.join(bundle, "rootfs")
    image = None
    if "/" in ref:
        from .. import oci
        parts = ref.split(":")
        if len(parts) > 1 or oci.detect_source(ref) == "layer-dir":
            upper = work = None
            if args.rw:
                upper, work = os.path.join(bundle, "upper"), os.path.join(bundle, "work")
                os.makedirs(upper, exist_ok=True)
                os.makedirs(work, exist_ok=True)
            return MountSpec(tuple(os.path.abspath(p) for p in parts), upper, work), None
        with oci.open_image(ref) as img:
            image = img.config
    snapshotter = importlib.import_module("snapshotter")
    with snapshotter.Snapshotter(args.root) as sn:
        if image is not None:
            res = sn.import_(ref)
            ref = (res.image or res.layers[-1]).id
        else:
            image = _stored_image_config(sn, ref)
        spec = sn.mount_spec(ref, args.rw, mountpoint=rootfs)
    return spec, image


def _stored_image_config(sn, ref):
    """The image config the store kept at import, when this store keeps them."""
    get = getattr(sn, "image_config", None)
    return get(ref) if get is not None else None


def cmd_unbundle(args) -> int:
    from ..bundle import remove_bundle
    remove_bundle(args.dir)
    return 0
