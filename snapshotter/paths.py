"""Where a store lives and how its staging entries are named: no imports beyond ``os``.

Light on purpose: ``mergefs pull`` starts its copy (``snapshotter.pullcopy``)
in a staging directory of the store before the store's modules are loaded.
"""
from __future__ import annotations

import os


def default_root(explicit: str | None = None) -> str:
    """``--root``, else ``$MERGEFS_ROOT``, else /var/lib/mergefs (root) or $XDG_DATA_HOME/mergefs."""
    if explicit:
        return explicit
    if os.environ.get("MERGEFS_ROOT"):
        return os.environ["MERGEFS_ROOT"]
    if os.geteuid() == 0:
        return "/var/lib/mergefs"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(xdg, "mergefs")


def proc_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, as /proc says), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[1].split()[19].decode()


def staging_name(tag: str, start: str | None = None) -> str:
    """A staging entry owned by this process: ``<pid>-<start>-<tag>-<rand>``."""
    pid = os.getpid()
    return f"{pid}-{start or proc_start(pid)}-{tag}-{os.urandom(6).hex()}"


def staging_owner_alive(name: str) -> bool:
    """A staging entry ``<pid>-<start>-<rand>`` belongs to a live process."""
    parts = name.split("-")
    if len(parts) < 3 or not parts[0].isdigit():
        return False
    return proc_start(int(parts[0])) == parts[1]
