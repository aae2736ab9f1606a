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
"""
from __future__ import annotations

import os

from ..errors import UsageError

LAYER_KEYS = ("lowerdir", "upperdir", "workdir")       # as mountspec.LAYER_KEYS (not imported:
DEFAULT_VIEWS = "/run/mergefs/views.sock"              # dataclasses costs the views path 12 ms)

PASSED = {"ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
          "relatime", "norelatime", "strictatime", "sync", "async", "dirsync"}
PASSED_WITH_VALUE = {"context", "fscontext", "defcontext", "rootcontext"}
DROPPED = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "nofail",
           "_netdev", "default_permissions", "loop", "noacl", "nokernel"}
REFUSED = {
    "uidmapping": "mergefs does not shift ids; run podman without per-container id "
                  "mappings (--userns/--uidmap) or use fuse-overlayfs for them",
    "gidmapping": "mergefs does not shift ids; run podman without per-container id "
                  "mappings (--userns/--uidmap) or use fuse-overlayfs for them",
}
SOURCE_NAMES = ("mergefs",)


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    positional, options, it = [], [], iter(argv)
    for arg in it:
        if arg == "-o":
            options += next(it, "").split(",")
        elif arg.startswith("-o") and len(arg) > 2:
            options += arg[2:].split(",")
        elif arg in ("-n", "-v", "-s", "-f", "-r", "-w"):
            continue                              # flags mount(8) may add for helpers
        elif arg == "-t":
            next(it, None)
        else:
            positional.append(arg)
    return positional, [o for o in options if o]


def is_mount_helper_call(argv: list[str]) -> bool:
    """An argv with ``-o`` options naming a lowerdir= and no verb (either convention)."""
    positional, options = _split(argv)
    return len(positional) in (1, 2) and any(o.startswith("lowerdir=") for o in options)


def _squash_id(opt: str, value: str) -> str:
    if not value.isdigit():
        raise UsageError(f"mount option {opt!r}: expected a number")
    return value


def _classify(options: list[str]) -> tuple[list[str], list[str], list[str], str | None]:
    """Options -> (layer options, ``mount`` verb flags, FUSE options, views socket or
    None); raises UsageError for a refused or unknown option."""
    layer_opts, extra, fuse, views = [], [], [], None
    for opt in options:
        key, _, value = opt.partition("=")
        if key in LAYER_KEYS or opt == "allow_other":
            layer_opts.append(opt)
        elif key == "views":
            views = value or DEFAULT_VIEWS
        elif opt == "private":
            extra.append("--private")
        elif key == "volatile" or opt == "fsync=0":
            extra.append("--volatile")
        elif opt == "fsync=1":
            continue                              # fuse-overlayfs's default: fsync honoured
        elif key == "squash_to_root":
            extra += ["--squash-uid", "0", "--squash-gid", "0"]
        elif key in ("squash_to_uid", "squash_to_gid"):
            extra += [f"--squash-{key[-3:]}", _squash_id(opt, value)]
        elif key in REFUSED:
            raise UsageError(f"mount option {key!r} is not supported: {REFUSED[key]}")
        elif opt in PASSED or (key in PASSED_WITH_VALUE and value):
            fuse.append(opt)
        elif opt in DROPPED or key.startswith("x-"):
            continue
        else:
            raise UsageError(f"unsupported mount option {opt!r}")
    return layer_opts, extra, fuse, views


def _mountpoint(argv: list[str]) -> tuple[str, list[str]]:
    positional, options = _split(argv)
    if len(positional) not in (1, 2):
        raise UsageError(f"usage: mergefs -o lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W] "
                         f"MOUNTPOINT (got {argv})")
    return positional[-1], options


def translate(argv: list[str]) -> list[str]:
    """Helper argv -> ``mount [--upper U --work W] [--allow-other] [--volatile] [--squash-*]
    [-o ..] LAYER... MNT``; raises UsageError for a wrong argv or an unsupported option."""
    from ..errors import InvalidArgument
    from ..mountspec import from_options
    target, options = _mountpoint(argv)
    layer_opts, extra, fuse, _ = _classify(options)
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


# -- through a running views service (views=SOCK) ----------------------------------------
VIEWS_REFUSED = {"--private": "private", "--squash-uid": "squash_to_*",
                 "--squash-gid": "squash_to_*"}


def views_request(argv: list[str]) -> tuple[str, dict] | None:
    """(socket, ``mount`` request) for an argv with ``views``/``views=SOCK``, else None.

    The options are checked here as for a mount of its own (unknown and refused
    ones by name); what only a server of its own can do (``private``,
    ``squash_to_*``) is refused. The layer options go as they are, with this
    process's working directory, for the service to resolve (relative
    ``overlay/l/`` paths); the FUSE options go as bind options (``mountctl``)."""
    target, options = _mountpoint(argv)
    layer_opts, extra, fuse, sock = _classify(options)
    if sock is None:
        return None
    for flag in extra:
        if flag in VIEWS_REFUSED:
            raise UsageError(f"mount option {VIEWS_REFUSED[flag]!r} is not supported with "
                             "views= (one server serves every view alike); drop views= "
                             "for this mount")
    return sock, {"op": "mount", "layers": layer_opts, "cwd": os.getcwd(),
                  "volatile": "--volatile" in extra, "options": fuse,
                  "target": os.path.abspath(target), "mntns": os.readlink("/proc/self/ns/mnt")}


def through_views(argv: list[str]) -> int | None:
    """Mount a helper-form call with ``views=SOCK`` through that running views service:
    one request, which returns once the bind is live (no server of its own). None
    when the call names no views service; else the exit code, errors printed on
    one line. A service that does not answer is an error (exit 1), never a silent
    mount of its own: a wrong storage.conf should show, not cost every container
    a server."""
    import sys
    from ..errors import categorize, message
    try:
        got = views_request(argv)
        if got is None:
            return None
        sock, req = got
        from ..union.ctlclient import control_call
        try:
            control_call(sock, req)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            from ..errors import MountError
            raise MountError(f"the views service at {sock} does not answer ({exc.strerror}): "
                             f"start `mergefs views serve --control {sock} MOUNTPOINT`, or "
                             "drop views= from the mount options") from None
    except Exception as exc:  # noqa: BLE001  (one line and the table's exit code)
        print(f"mergefs: error: {message(exc)}", file=sys.stderr)
        return int(categorize(exc).exit_code)
    return 0


# what a kernel mount of plain layers (kernel_read_only) takes: mount flags, and options
# that change nothing for a read-only mount the kernel serves with the mounter's rights
KERNEL_FLAGS = {"nodev", "nosuid", "noexec", "dev", "suid", "exec"}
KERNEL_NEUTRAL = {"ro", "rw", "volatile", "fsync=0", "fsync=1", "allow_other"}


def kernel_read_only(argv: list[str]) -> int | None:
    """Mount a read-only fuse-overlayfs-form call over plain layers with the kernel's
    overlayfs (``mergefs.kernelview``); 0 once mounted, None when the call is not
    one (an upper, another option, layers that are not plain, not root of the
    initial user namespace, a mount(2) that fails): then it goes through FUSE."""
    positional, options = _split(argv)
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
                  or key.startswith("x-") or key == "views"):
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
    path = os.path.join(directory, HELPER_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(helper_script())
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)
    return path
