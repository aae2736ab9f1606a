"""Verbs ``mount`` and ``umount``: a live union of layers (bottom first).

``mergefs mount LAYER... MOUNTPOINT`` returns once the mount is live and the
server has detached (its log goes to a file, never this terminal); run as
root, "live" means the kernel mount exists and requests wait for the server,
which may still be starting (``mergefs.union.prefork``);
``--foreground`` serves in this process until unmounted. A LAYER spelled as a
path (``/abs``, ``./rel``, ``dir:PATH``) is a directory, else a store ref,
resolved by ``Snapshotter.mount_spec`` when the store exists.
"""
from __future__ import annotations

import argparse
import importlib
import os

from ..errors import InvalidLayer
from ..layer import FORMATS
from ..mountspec import MountSpec
from . import refs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount", help="serve layers (bottom first) as a live union at MOUNTPOINT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve layers (bottom first) as a live union at MOUNTPOINT.\n\n"
        "Like every FUSE mount (and fuse-overlayfs), it is nosuid,nodev by default:\n"
        "set-uid bits are ignored and device nodes cannot be opened, so a chroot into\n"
        "it fails at the first /dev/null. For a root filesystem you trust, ask for both:\n\n"
        "  mergefs mount -o dev,suid rootfs /mnt/rootfs\n"
        "  chroot /mnt/rootfs /bin/sh")
    p.add_argument("layers", nargs="+", metavar="LAYER", help="layer directories or one store ref")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--upper", help="writable: overlay-format upper directory")
    p.add_argument("--work", help="writable: work directory on the upper's filesystem")
    p.add_argument("--rw", action="store_true",
                   help="store refs: writable, with an upper kept in the store (commit it later)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users (containers) in (the default when run as root)")
    p.add_argument("--private", action="store_true",
                   help="only the mounting user gets in (the default when not root)")
    p.add_argument("--volatile", action="store_true",
                   help="writable: make fsync a no-op (faster; the upper is lost on a crash)")
    p.add_argument("--squash-uid", type=int, help="report every entry as owned by this uid")
    p.add_argument("--squash-gid", type=int, help="report every entry as owned by this gid")
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("--format", choices=FORMATS, default="auto", help="whiteout format of the layers")
    p.add_argument("--log", help="server log file, created (appended to if it exists) before "
                   "the command returns (default /run/mergefs/mount-*.log, removed at a clean "
                   "unmount when it holds only INFO lines; empty when a "
                   "running service serves the mount: it logs to its own log)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="extra FUSE mount options (comma separated); -o dev,suid lifts the "
                   "nosuid,nodev default")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("install-mount-helper",
                       help="write DIR/mount.fuse.mergefs so `mount -t fuse.mergefs` finds mergefs")
    p.add_argument("--dir", default="/sbin")
    p.set_defaults(func=cmd_install_helper)

    p = sub.add_parser("umount", help="unmount a union (also one whose server died)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)


def multi_user(args) -> bool:
    """allow_other: asked for, or mounted by root and not --private (like kernel
    overlayfs, and fuse-overlayfs run as root); permissions are then the kernel's
    (default_permissions is always on)."""
    if args.private and args.allow_other:
        raise InvalidLayer("--private and --allow-other contradict each other")
    return args.allow_other or (os.geteuid() == 0 and not args.private)


def mount_spec(args) -> MountSpec:
    if (args.upper is None) != (args.work is None):
        raise InvalidLayer("--upper and --work go together")
    options = tuple(o for opts in args.options for o in opts.split(",") if o)
    if "private" in options:                       # ours, not FUSE's
        args.private = True
        options = tuple(o for o in options if o != "private")
    args.allow_other = multi_user(args)
    layers = [refs.classify(a) for a in args.layers]
    if all(a.is_dir for a in layers):
        if args.rw:
            raise InvalidLayer("--rw is for store refs; give --upper and --work for directories")
        return MountSpec(tuple(a.value for a in layers),
                         _abs(args.upper), _abs(args.work), args.allow_other, options,
                         **_extras(args))
    if len(layers) != 1:
        raise refs.UsageError("give either layer directories (/abs, ./rel or dir:PATH) "
                              "or one store ref")
    try:
        snapshotter = importlib.import_module("snapshotter")
        Snapshotter = snapshotter.Snapshotter
    except (ModuleNotFoundError, AttributeError):
        raise InvalidLayer(f"{args.layers[0]!r} is a store ref (not spelled as a path) and this "
                           "installation has no store to resolve refs") from None
    # --upper/--work put a private upper over the ref; --rw keeps the upper in the store
    with Snapshotter(args.root) as sn:
        spec = sn.mount_spec(args.layers[0], args.rw and args.upper is None,
                             mountpoint=os.path.abspath(args.mountpoint))
    return MountSpec(spec.lowers, _abs(args.upper) or spec.upper, _abs(args.work) or spec.work,
                     args.allow_other or (spec.allow_other and not args.private), spec.options + options,
                     **_extras(args))


def _extras(args) -> dict:
    if args.volatile and args.upper is None and not args.rw:
        raise InvalidLayer("--volatile is for writable mounts (--upper/--work or --rw)")
    return {"volatile": args.volatile, "squash_uid": args.squash_uid,
            "squash_gid": args.squash_gid}


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def _service(args) -> str | None:
    """The control socket of a running ``mergefs serve`` that owns this store, if any."""
    if os.environ.get("MERGEFS_NO_SERVICE") or args.foreground or args.upper or args.work or \
            len(args.layers) != 1 or refs.looks_like_dir(args.layers[0]) or args.options:
        return None
    try:
        from snapshotter.serve.control import find_service
    except ImportError:
        return None
    return find_service(args.root)


def cmd_mount(args) -> int:
    from ..union import server
    ctl = _service(args)
    if ctl is not None:             # a bind of a view of the service: milliseconds
        if args.log:                # the service logs to its own log: FILE stays empty
            server.create_log(args.log)
        from snapshotter.serve.control import call, checked
        checked(call(ctl, {"op": "mount", "ref": args.layers[0], "rw": args.rw,
                           "target": os.path.abspath(args.mountpoint)}))
        return 0
    spec = mount_spec(args)
    if args.foreground:
        import logging
        logging.basicConfig(level=logging.INFO, format="mergefs %(levelname)s %(message)s")
        server.serve(spec, os.path.abspath(args.mountpoint), args.format)
        return 0
    server.start(spec, args.mountpoint, args.format, args.log)
    return 0


def cmd_umount(args) -> int:
    from ..union import server
    try:
        from snapshotter.serve.control import call, checked, find_service
        ctl = None if os.environ.get("MERGEFS_NO_SERVICE") else find_service(args.root)
    except ImportError:
        ctl = None
    if ctl is not None:
        target = os.path.abspath(args.mountpoint)
        views = checked(call(ctl, {"op": "list"}))["views"]
        if any(v["key"] == "mount:" + target for v in views):
            checked(call(ctl, {"op": "umount", "target": target}))
            return 0
    server.unmount(args.mountpoint)
    return 0


def cmd_install_helper(args) -> int:
    from .cmd_mount_helper import install_helper
    print(install_helper(args.dir))
    return 0
