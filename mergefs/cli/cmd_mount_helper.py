"""Mount-helper command lines: mount.fuse3's and fuse-overlayfs's, turned into ``mount``.

Two conventions run ``mergefs`` with options instead of a verb:

* mount.fuse3: ``mergefs SOURCE MOUNTPOINT -o OPTIONS``. ``mount -t fuse.mergefs
  mergefs MNT -o lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W]`` (or an fstab
  line) makes util-linux run ``/sbin/mount.fuse`` (it tries ``mount.fuse.mergefs``
  first, then the part before the dot), which is mount.fuse3; that runs the
  program named by the subtype, ``mergefs``, found on ``PATH``. mount(8) runs
  helpers with a fixed PATH, so a virtualenv's ``mergefs`` is not found that
  way: ``mergefs install-mount-helper`` writes ``/sbin/mount.fuse.mergefs``
  (tried first by mount(8)) that execs this installation's ``mergefs``.
* fuse-overlayfs: ``mergefs -o OPTIONS MOUNTPOINT`` (no SOURCE), the command
  line containers/storage (podman, buildah) runs as its overlay
  ``mount_program``; it works under any program name (a symlink
  ``mergefs-overlayfs`` to ``mergefs``). It returns once the mount is live and
  is undone with ``fusermount3 -u`` or ``umount``; the server then exits.
  Run as root (also uid 0 of a user namespace), this form implies
  ``allow_other``, as fuse-overlayfs does: a container's processes need not
  be root.

``translate`` turns either argv into the ``mount`` verb. ``lowerdir`` lists
layers top first, like overlayfs; the ``mount`` verb takes them bottom first.
The lowerdir paths themselves are resolved (containers/storage passes
``overlay/l/ID`` symlinks, relative to its working directory); symlinks
inside the layers are never followed.

Options: ``upperdir``/``workdir`` make the mount writable; ``volatile`` (or
fuse-overlayfs's ``fsync=0``) makes fsync a no-op on the upper;
``squash_to_root`` / ``squash_to_uid=N`` / ``squash_to_gid=N`` report every
file as owned by 0 (or N); ``allow_other`` maps to ``--allow-other`` (on anyway when root mounts);
``private`` maps to ``--private`` and keeps other users out;
``ro``, ``dev``/``suid``/``exec`` and their ``no`` forms, the ``*atime`` and
sync options and SELinux ``context=`` options are passed to FUSE;
``default_permissions`` is always on; ``noacl`` is accepted because mergefs
never turns on FUSE POSIX ACLs (ACL xattrs are stored, the kernel checks only
the mode bits); bookkeeping options (``auto``, ``noauto``, ``user``,
``nofail``, ``_netdev``, ``x-*``, ``defaults``) are dropped. ``uidmapping``
and ``gidmapping`` (rootless containers/storage with per-container id maps)
are refused: mergefs does not shift ids. Any other option is refused by name
(exit code 2), never ignored.

A read-only mount in the fuse-overlayfs form (``lowerdir`` only: what
containers/storage mounts for the parent layers at each commit of a build)
over *plain* layers (no whiteout, opaque marker or other overlay xattr in
either format: ``mergefs.kernelview``) is mounted by the kernel's overlayfs,
which shows exactly what mergefs would (``kernel_read_only``), when run as
root in the initial user namespace and with no option that needs the FUSE
server (``squash_to_*``, ``private``, SELinux contexts, ...). ``nokernel``
keeps such a mount on FUSE.

``service=SOCK`` (``service``: ``/run/mergefs/mount.sock``) hands the mount to
a running service instead of starting a server (``mergefs.mounthelper``,
``through_service``): ``mergefs mount-server`` forks a warm server,
``mergefs views serve`` binds a new view. The option table and that path
live in ``mergefs.mounthelper``, a leaf the lean programs of ``mergefs views
install-program`` import without the CLI.
"""
from __future__ import annotations

import os

from ..errors import UsageError
from ..mounthelper import (DROPPED, classify, is_mount_helper_call,  # noqa: F401
                           split_argv, target_and_options, through_service, write_script)

def translate(argv: list[str]) -> list[str]:
    """Helper argv -> ``mount [--upper U --work W] [--allow-other] [--volatile] [--squash-*]
    [-o ..] LAYER... MNT``; raises UsageError for a wrong argv or an unsupported option."""
    from ..errors import InvalidArgument
    from ..mountspec import from_options
    target, options = target_and_options(argv)
    layer_opts, extra, fuse, _ = classify(options)
    try:
        spec = from_options(layer_opts)
    except InvalidArgument as e:
        raise UsageError(str(e)) from None
    out = ["mount"]
    if spec.upper is not None:
        out += ["--upper", os.path.abspath(spec.upper), "--work", os.path.abspath(spec.work)]
    # run as root (also uid 0 of a user namespace) the mount verb lets other users
    # in unless `private` is given, as fuse-overlayfs does (cmd_mount.multi_user)
    if spec.allow_other:
        out.append("--allow-other")
    out += extra
    if fuse:
        out += ["-o", ",".join(fuse)]
    # the lowerdir paths themselves are resolved (overlay/l/ID symlinks), never what is in them
    return out + [os.path.realpath(p) for p in spec.lowers] + [os.path.abspath(target)]


# what a kernel mount of plain layers (kernel_read_only) takes: mount flags, and options
# that change nothing for a read-only mount the kernel serves with the mounter's rights
KERNEL_FLAGS = {"nodev", "nosuid", "noexec", "dev", "suid", "exec"}
KERNEL_NEUTRAL = {"ro", "rw", "volatile", "fsync=0", "fsync=1", "allow_other"}


def kernel_read_only(argv: list[str]) -> int | None:
    """Mount a read-only fuse-overlayfs-form call over plain layers with the kernel's
    overlayfs (``mergefs.kernelview``); 0 once mounted, None when the call is not
    one (an upper, another option, layers that are not plain, not root of the
    initial user namespace, a mount(2) that fails): then it goes through FUSE."""
    positional, options = split_argv(argv)
    if len(positional) != 1:
        return None
    lowers, flags = None, set()
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            lowers = value.split(":")
        elif opt in KERNEL_FLAGS:
            flags.add(opt)
        elif not (opt in KERNEL_NEUTRAL or opt in DROPPED - {"nokernel"}
                  or key.startswith("x-") or key == "service"):
            return None
    if not lowers:
        return None
    from .. import kernelview
    try:
        if not kernelview.initial_root() or not all(map(kernelview.is_plain, lowers)):
            return None
        kernelview.mount_read_only(lowers, positional[0], flags)
    except (OSError, ValueError):
        return None
    return 0


HELPER_NAME = "mount.fuse.mergefs"


def helper_script() -> str:
    import sys
    return (f"#!/bin/sh\n# written by `mergefs install-mount-helper`\n"
            f"exec {sys.executable} -m mergefs \"$@\"\n")


def install_helper(directory: str = "/sbin") -> str:
    """Write DIR/mount.fuse.mergefs (staged, then renamed into place); return its path."""
    return write_script(os.path.join(directory, HELPER_NAME), helper_script())
