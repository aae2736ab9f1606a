"""OCI runtime bundles: ``config.json`` plus a mounted ``rootfs`` for ``runc run -b``.

The config is the runtime spec's defaults (those ``runc spec`` writes, minus
the terminal) with the image config applied when there is one: Env,
Entrypoint + Cmd (or the caller's ARGS), WorkingDir and User (a name is
looked up in the rootfs's /etc/passwd and /etc/group). The rootfs is a bind
of a view of the views mount when a views control socket is given (the
view is shared with every other container of the image), else a union mount
of its own; either way ``suid`` and ``dev`` are allowed on it, and other users
may enter it (allow_other), so a non-root container user works.

``DIR/mergefs-bundle.json`` records how the rootfs was mounted;
``remove_bundle(DIR)`` unmounts it (and removes the view) and leaves
config.json.
"""
from __future__ import annotations

import json
import os
import uuid

from .errors import InvalidLayer, MountError
from .mountspec import MountSpec

STATE = "mergefs-bundle.json"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def default_config(readonly: bool) -> dict:
    """The runtime spec defaults (as ``runc spec``), not on a terminal."""
    nodev = ["nosuid", "noexec", "nodev"]
    return {
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
                    "env": [DEFAULT_PATH, "TERM=xterm"], "cwd": "/",
                    "capabilities": {k: list(CAPS) for k in
                                     ("bounding", "effective", "permitted", "ambient")},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": "mergefs",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": nodev + ["mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": list(nodev)},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": nodev + ["ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


def apply_image_config(cfg: dict, image: dict | None, argv: list[str] | None,
                       user: str | None, rootfs: str) -> dict:
    """The image config's process settings over the defaults; ARGS and --user win."""
    ic = (image or {}).get("config") or {}
    proc = cfg["process"]
    if ic.get("Env"):
        proc["env"] = list(ic["Env"])
    if not any(e.startswith("PATH=") for e in proc["env"]):
        proc["env"].insert(0, DEFAULT_PATH)
    if argv:
        proc["args"] = list(argv)
    elif ic.get("Entrypoint") or ic.get("Cmd"):
        proc["args"] = list(ic.get("Entrypoint") or []) + list(ic.get("Cmd") or [])
    if ic.get("WorkingDir"):
        proc["cwd"] = ic["WorkingDir"]
    who = user if user is not None else ic.get("User")
    if who:
        uid, gid = resolve_user(who, rootfs)
        proc["user"] = {"uid": uid, "gid": gid}
    return cfg


def resolve_user(who: str, rootfs: str) -> tuple[int, int]:
    """``uid``, ``uid:gid``, ``name`` or ``name:group`` against the rootfs's files."""
    name, _, group = who.partition(":")
    passwd = _table(os.path.join(rootfs, "etc/passwd"))
    if name.isdigit():
        uid = int(name)
        gid = next((int(r[3]) for r in passwd if r[2] == name), uid)
    else:
        row = next((r for r in passwd if r[0] == name), None)
        if row is None:
            raise InvalidLayer(f"user {name!r} is not in the image's /etc/passwd")
        uid, gid = int(row[2]), int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            row = next((r for r in _table(os.path.join(rootfs, "etc/group")) if r[0] == group),
                       None)
            if row is None:
                raise InvalidLayer(f"group {group!r} is not in the image's /etc/group")
            gid = int(row[2])
    return uid, gid


def _table(path: str) -> list[list[str]]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f
                    if line.count(":") >= 2 and not line.startswith("#")]
    except OSError:
        return []


def mount_rootfs(spec: MountSpec, rootfs: str, control: str | None) -> dict:
    """Mount ``spec`` at ``rootfs``: a bind of a new view, or a union mount of its own."""
    os.makedirs(rootfs, exist_ok=True)
    if control:
        from .union.mountctl import bind, control_call
        name = f"bundle-{uuid.uuid4().hex[:16]}"
        path = control_call(control, {"op": "add", "name": name, "spec": {
            "lowers": list(spec.lowers), "upper": spec.upper, "work": spec.work}})["path"]
        try:
            bind(path, rootfs, suid_dev=True)
        except MountError:
            control_call(control, {"op": "remove", "name": name})
            raise
        return {"rootfs": rootfs, "how": "view", "control": control, "view": name}
    from .union import server
    own = MountSpec(spec.lowers, spec.upper, spec.work, allow_other=True,
                    options=tuple(spec.options) + ("suid", "dev"))
    pid = server.start(own, rootfs)
    return {"rootfs": rootfs, "how": "mount", "pid": pid}


def write_bundle(bundle: str, spec: MountSpec, image: dict | None, argv: list[str] | None,
                 user: str | None, control: str | None) -> str:
    """Mount the rootfs, then write config.json; returns the bundle dir."""
    bundle = os.path.abspath(bundle)
    os.makedirs(bundle, exist_ok=True)
    if os.path.exists(os.path.join(bundle, STATE)):
        from .errors import AlreadyExists
        raise AlreadyExists(f"{bundle} already has a mounted rootfs (mergefs unbundle it first)")
    rootfs = os.path.join(bundle, "rootfs")
    state = mount_rootfs(spec, rootfs, control)
    try:
        with open(os.path.join(bundle, STATE), "w") as f:
            json.dump(state, f)
        cfg = apply_image_config(default_config(readonly=not spec.writable), image, argv,
                                 user, rootfs)
        tmp = os.path.join(bundle, ".config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, os.path.join(bundle, "config.json"))
    except BaseException:
        remove_bundle(bundle)
        raise
    return bundle


def remove_bundle(bundle: str) -> None:
    """Unmount the rootfs a bundle was given (and remove its view); keep config.json."""
    bundle = os.path.abspath(bundle)
    try:
        with open(os.path.join(bundle, STATE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        from .errors import NotFound
        raise NotFound(f"{bundle} has no rootfs mounted by mergefs") from None
    if state["how"] == "view":
        from .union.mountctl import control_call, unbind
        from .union.server import is_mounted
        if is_mounted(state["rootfs"]):
            unbind(state["rootfs"])
        control_call(state["control"], {"op": "remove", "name": state["view"]})
    else:
        from .union import server
        if server.is_mounted(state["rootfs"]):
            server.unmount(state["rootfs"])
        _wait_exit(state.get("pid"))
    os.unlink(os.path.join(bundle, STATE))


def _wait_exit(pid: int | None, timeout: float = 10.0) -> None:
    import time
    if not pid:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.02)
