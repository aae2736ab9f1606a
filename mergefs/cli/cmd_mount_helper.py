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
FUSE, ``allow_other`` maps to ``--allow-other`` (on anyway when root mounts;
``private`` maps to ``--private`` and keeps other users out), ``default_permissions`` is
always on, and bookkeeping options (``auto``, ``noauto``, ``user``, ``nofail``,
``_netdev``, ``x-*``, ``defaults``) are dropped.
"""
from __future__ import annotations

import os


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
    """mount.fuse3 argv -> ``mount [--upper U --work W] [--allow-other] [-o ..] LAYER... MNT``."""
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
        raise SystemExit(f"mergefs: usage: mergefs SOURCE MOUNTPOINT -o lowerdir=TOP:...:BOTTOM "
                         f"(got {argv})")
    out, fuse, lowers = ["mount"], [], []
    for opt in filter(None, options):
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            lowers = [os.path.abspath(p) for p in value.split(":")][::-1]
        elif key in ("upperdir", "workdir"):
            out += ["--upper" if key == "upperdir" else "--work", os.path.abspath(value)]
        elif key == "allow_other":
            out.append("--allow-other")
        elif key == "private":
            out.append("--private")
        elif key in PASSED:
            fuse.append(key)
        elif key in DROPPED or key.startswith("x-"):
            continue
        else:
            raise SystemExit(f"mergefs: unsupported mount option {opt!r}")
    if not lowers:
        raise SystemExit("mergefs: lowerdir= is required")
    if fuse:
        out += ["-o", ",".join(fuse)]
    return out + lowers + [os.path.abspath(positional[1])]


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
