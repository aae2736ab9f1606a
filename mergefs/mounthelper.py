"""The mount-helper command line's options (mount.fuse3's and fuse-overlayfs's form),
and the mount of such a call through a running mount service.

``mergefs.cli.cmd_mount_helper`` documents the forms and options and turns a
call into the ``mount`` verb; this module is the option table it uses, and
``through_service`` (``service=SOCK``, or ``service`` for ``DEFAULT_SERVICE``),
which hands the mount to that service: ``mergefs mount-server``
(``mergefs.union.mountsvc``: a server forked from a process that has imported
everything) or ``mergefs views serve`` (``mergefs.union.mountctl``: a bind of
a view of its one mount). It is a leaf that imports only ``os`` at first,
and the views path runs on the standard library's C modules
(``union.ctlclient``): containers/storage waits for the whole command, whose
cost is then Python's start-up (``lean_main``: without ``site``).
"""
from __future__ import annotations

import os

LAYER_KEYS = ("lowerdir", "upperdir", "workdir")       # as mountspec.LAYER_KEYS (not imported:
DEFAULT_VIEWS = "/run/mergefs/views.sock"              # dataclasses costs ~10 M instructions)
DEFAULT_SERVICE = "/run/mergefs/mount.sock"            # `mergefs mount-server`'s

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


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
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
    positional, options = split_argv(argv)
    return len(positional) in (1, 2) and any(o.startswith("lowerdir=") for o in options)


def _usage(msg: str) -> Exception:
    from .errors import UsageError
    return UsageError(msg)


def _squash_id(opt: str, value: str) -> str:
    if not value.isdigit():
        raise _usage(f"mount option {opt!r}: expected a number")
    return value


def classify(options: list[str]) -> tuple[list[str], list[str], list[str], str | None]:
    """Options -> (layer options, ``mount`` verb flags, FUSE options, the mount
    service's socket or None); raises UsageError for a refused or unknown option."""
    layer_opts, extra, fuse, service = [], [], [], None
    for opt in options:
        key, _, value = opt.partition("=")
        if key in LAYER_KEYS or opt == "allow_other":
            layer_opts.append(opt)
        elif key == "service":
            service = value or DEFAULT_SERVICE
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
            raise _usage(f"mount option {key!r} is not supported: {REFUSED[key]}")
        elif opt in PASSED or (key in PASSED_WITH_VALUE and value):
            fuse.append(opt)
        elif opt in DROPPED or key.startswith("x-"):
            continue
        else:
            raise _usage(f"unsupported mount option {opt!r}")
    return layer_opts, extra, fuse, service


def target_and_options(argv: list[str]) -> tuple[str, list[str]]:
    positional, options = split_argv(argv)
    if len(positional) not in (1, 2):
        raise _usage(f"usage: mergefs -o lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W] "
                         f"MOUNTPOINT (got {argv})")
    return positional[-1], options


# -- through a running mount service (service=SOCK) --------------------------------------
def service_request(argv: list[str], cwd: str | None = None,
                    mntns: str | None = None) -> tuple[str, dict] | None:
    """(socket, ``mount`` request) for an argv with ``service``/``service=SOCK``, else
    None. The options are checked here as for a mount of its own (unknown and
    refused ones by name); the service refuses what it cannot do. The layer
    options go as they are, with this process's working directory, for the
    service to resolve (relative ``overlay/l/`` paths; ``ctlclient.mount_spec``)."""
    target, options = target_and_options(argv)
    layer_opts, extra, fuse, sock = classify(options)
    if sock is None:
        return None
    squash = {f: int(extra[i + 1]) for i, f in enumerate(extra)
              if f in ("--squash-uid", "--squash-gid")}
    return sock, {"op": "mount", "layers": layer_opts, "cwd": cwd or os.getcwd(),
                  "volatile": "--volatile" in extra, "private": "--private" in extra,
                  "squash_uid": squash.get("--squash-uid"),
                  "squash_gid": squash.get("--squash-gid"), "options": fuse,
                  "target": os.path.join(cwd or os.getcwd(), target),
                  "mntns": mntns or os.readlink("/proc/self/ns/mnt")}


def argv_request(req: dict) -> dict:
    """The ``mount`` request of a ``mount-argv`` one (the C mount program,
    mountclient.c: the raw argv, working directory and mount namespace, each
    hex-encoded bytes), checked as ``service_request`` checks its own argv."""
    text = (lambda h: os.fsdecode(bytes.fromhex(h)))
    got = service_request([text(a) for a in req["argv"]], text(req["cwd"]), text(req["mntns"]))
    if got is None:
        raise _usage("the mount command names no service= option")
    return got[1]


def through_service(argv: list[str]) -> int | None:
    """Mount a helper-form call with ``service=SOCK`` through that running service
    (``mergefs mount-server``: a server forked from a warm process; ``mergefs
    views serve``: a bind of a view): one request, answered once the mount is
    live. None when the call names no service; else the exit code, errors
    printed on one line. A service that does not answer is an error (exit 1),
    never a silent mount of its own: a wrong storage.conf should show, not cost
    every container a cold server start."""
    try:
        got = service_request(argv)
        if got is None:
            return None
        sock, req = got
        from .union.ctlclient import mount_call
        try:
            mount_call(sock, req)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            from .errors import MountError
            raise MountError(f"the mount service at {sock} does not answer ({exc.strerror}): "
                             f"start `mergefs mount-server --control {sock}`, or drop "
                             "service= from the mount options") from None
    except Exception as exc:  # noqa: BLE001  (one line and the table's exit code)
        import sys
        from .errors import categorize, message
        print(f"mergefs: error: {message(exc)}", file=sys.stderr)
        return int(categorize(exc).exit_code)
    return 0


def lean_main() -> None:
    """The entry of the script ``mergefs views install-program`` writes, run by
    ``python -I -S`` (no ``site``: ~60 M instructions less at every start): a call
    through a mount service runs on the standard library's C modules alone;
    anything else loads ``site`` (the environment's packages) and runs the whole
    CLI as the ``mergefs`` console script does."""
    import sys
    code = through_service(sys.argv[1:]) if is_mount_helper_call(sys.argv[1:]) else None
    if code is None:
        import site
        site.main()
        from .cli import main
        code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


PROGRAM_NAME = "mergefs-overlayfs"


def program_script() -> str:
    """The lean mount program: this interpreter without ``site`` (``-I -S``; Linux
    passes one argument after the interpreter, hence ``-IS``), this mergefs first on
    the path, ``lean_main``."""
    import sys
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (f"#!{sys.executable} -IS\n# written by `mergefs views install-program`: "
            f"containers/storage's mount_program\nimport sys\nsys.path.insert(0, {top!r})\n"
            "from mergefs.mounthelper import lean_main\nlean_main()\n")


def install_program(directory: str) -> str:
    """Write DIR/mergefs-overlayfs; return its path. With a C compiler (``cc``) it is
    mountclient.c compiled (statically linked where the C library allows), with the
    Python program as DIR/mergefs-overlayfs.py for everything but a call through a
    service; without, the Python program."""
    import shutil
    import subprocess
    path = os.path.join(directory, PROGRAM_NAME)
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mountclient.c")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists(source):
        return write_script(path, program_script())
    python = write_script(path + ".py", program_script())
    tmp = path + ".tmp"
    argv = [cc, "-O2", "-Wall", f"-DFALLBACK={python!r}".replace("'", '"'), "-o", tmp, source]
    # static where the C library can be (no loader and no libc to map at each exec:
    # ~0.4-0.5 ms less per mount, measured on an empty program), else as usual
    if subprocess.run([*argv, "-static"], capture_output=True).returncode != 0:
        subprocess.run(argv, check=True, capture_output=True)
    os.rename(tmp, path)
    return path


def write_script(path: str, text: str) -> str:
    """An executable script at ``path``, staged, then renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)
    return path
