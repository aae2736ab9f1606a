"""The mount.fuse3 convention: ``mergefs SOURCE MOUNTPOINT -o OPTIONS``.

``mount -t fuse.mergefs mergefs MNT -o lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W]``
(or an fstab line) makes util-linux run ``/sbin/mount.fuse`` (it tries
``mount.fuse.mergefs`` first, then the part before the dot), which is
mount.fuse3; that runs the program named by the subtype, ``mergefs``, found
on ``PATH``, as ``mergefs SOURCE MOUNTPOINT -o OPTIONS``. mount(8) runs helpers with a
fixed PATH, so a virtualenv's ``mergefs`` is not found that way:
``mergefs install-mount-helper`` writes ``/sbin/mount.fuse.mergefs`` (tried
first by mount(8)) that execs this installation's ``mergefs``. ``translate`` turns
that argv into the ``mount`` verb. ``lowerdir`` lists layers top first, like
overlayfs; the ``mount`` verb takes them bottom first.

Generic mount options are tolerated: ``rw``/``ro`` (``ro`` drops nothing but
is passed on), ``dev``/``suid``/``exec`` and their ``no`` forms are passed to
FUSE, ``allow_other`` maps to ``--allow-other``, ``default_permissions`` is
always on, and bookkeeping options (``auto``, ``noauto``, ``user``, ``nofail``,
``_netdev``, ``x-*``, ``defaults``) are dropped.
"""
from __future__ import annotations

import os

from ..errors import InvalidArgument, UsageError
from ..mountspec import LAYER_KEYS, from_options

PASSED = {"ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
          "relatime", "norelatime", "strictatime", "sync", "async", "dirsync"}
DROPPED = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "nofail",
           "_netdev", "default_permissions", "loop"}
SOURCE_NAMES = ("mergefs",)


def is_mount_helper_call(argv: list[str]) -> bool:
    """``SOURCE MOUNTPOINT -o OPTS`` with a lowerdir= option, whatever the SOURCE."""
    if "-o" not in argv or len(argv) < 4:
        return False
    i = argv.index("-o")
    return i + 1 < len(argv) and any(o.startswith("lowerdir=") for o in argv[i + 1].split(","))


def translate(argv: list[str]) -> list[str]:
    """mount.fuse3 argv -> ``mount [--upper U --work W] [--allow-other] [-o ..] LAYER... MNT``.

    Raises UsageError for a wrong argv or an unsupported option.
    """
    positional, options, it = [], [], iter(argv)
    for arg in it:
        if arg == "-o":
            options += next(it, "").split(",")
        elif arg in ("-n", "-v", "-s", "-f", "-r", "-w"):
            continue                              # flags mount(8) may add for helpers
        elif arg == "-t":
            next(it, None)
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError(f"usage: mergefs SOURCE MOUNTPOINT -o lowerdir=TOP:...:BOTTOM "
                         f"(got {argv})")
    layer_opts, fuse = [], []
    for opt in filter(None, options):
        key = opt.partition("=")[0]
        if key in LAYER_KEYS or opt == "allow_other":
            layer_opts.append(opt)
        elif opt in PASSED:
            fuse.append(opt)
        elif opt in DROPPED or key.startswith("x-"):
            continue
        else:
            raise UsageError(f"unsupported mount option {opt!r}")
    try:
        spec = from_options(layer_opts)
    except InvalidArgument as e:
        raise UsageError(str(e)) from None
    out = ["mount"]
    if spec.upper is not None:
        out += ["--upper", os.path.abspath(spec.upper), "--work", os.path.abspath(spec.work)]
    if spec.allow_other:
        out.append("--allow-other")
    if fuse:
        out += ["-o", ",".join(fuse)]
    return out + [os.path.abspath(p) for p in spec.lowers] + [os.path.abspath(positional[1])]


HELPER_NAME = "mount.fuse.mergefs"


def helper_script() -> str:
    import sys
    return (f"#!/bin/sh\n# written by `mergefs install-mount-helper`\n"
            f"exec {sys.executable} -m mergefs \"$@\"\n")


def install_helper(directory: str = "/sbin") -> str:
    """Write DIR/mount.fuse.mergefs (staged, then renamed into place); return its path."""
    path = os.path.join(directory, HELPER_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(helper_script())
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)
    return path
