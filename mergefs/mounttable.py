"""The mount table of this process's mount namespace: the one reader of it.

``/proc/self/mountinfo`` writes a space, tab, newline or backslash in a path
as an octal escape (``\\040``, ``\\011``, ``\\012``, ``\\134``); ``read``
decodes them, so a mount point with a space in its name is found. Used by the
union server (is it mounted?), the store (live leases) and the test harness
(no test leaves a mount behind).
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


class MountEntry(NamedTuple):
    mount_id: int
    parent_id: int
    device: str         # "major:minor" of the mounted filesystem
    root: str           # the path inside the filesystem that is mounted
    target: str         # where it is mounted
    options: str        # per-mount options (rw, nosuid, ...)
    fstype: str         # "overlay", "fuse.mergefs", "tmpfs", ...
    source: str
    super_options: str = ""   # the filesystem's options (overlay: lowerdir=, upperdir= ...)


def unescape(field: bytes) -> str:
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_line(line: bytes) -> MountEntry:
    """One mountinfo line: ``ID PARENT MAJ:MIN ROOT TARGET OPTS [OPTIONAL...] - TYPE SOURCE SUPER``."""
    fields = line.split()
    sep = fields.index(b"-", 6)
    return MountEntry(int(fields[0]), int(fields[1]), fields[2].decode(), unescape(fields[3]),
                      unescape(fields[4]),
                      fields[5].decode(), unescape(fields[sep + 1]), unescape(fields[sep + 2]),
                      unescape(fields[sep + 3]) if len(fields) > sep + 3 else "")


def escape(path: str) -> bytes:
    """``path`` as mountinfo writes it (the inverse of ``unescape``)."""
    out = os.fsencode(path)
    for c in (b"\\", b" ", b"\t", b"\n"):      # the backslash first
        out = out.replace(c, b"\\%03o" % c[0])
    return out


def read(path: str = MOUNTINFO, naming=None) -> list[MountEntry]:
    """Every mount, in mount order (a later entry at the same target covers an earlier one).
    ``naming``: only the lines that name one of these paths (or names) somewhere;
    the others are not parsed."""
    keys = None if naming is None else [escape(n) for n in naming]
    with open(path, "rb") as f:
        return [parse_line(line) for line in f
                if line.strip() and (keys is None or any(k in line for k in keys))]


def targets(below: str | None = None, fstypes: tuple[str, ...] | None = None) -> set[str]:
    """Mount points (below a directory, of some filesystem types: ``fuse`` matches ``fuse.*``)."""
    out = set()
    for e in read():
        if below is not None and not (e.target == below or e.target.startswith(below.rstrip("/") + "/")):
            continue
        if fstypes is not None and not any(e.fstype == t or e.fstype.startswith(t + ".")
                                           for t in fstypes):
            continue
        out.add(e.target)
    return out


def canonical(path: str | os.PathLike) -> str:
    """An absolute path with the parent's symlinks resolved, without touching ``path``
    itself (stat of a dead FUSE mount fails)."""
    p = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(p)
    return os.path.join(os.path.realpath(parent), name) if name else p


def entry_at(path: str | os.PathLike) -> MountEntry | None:
    """The mount on top at ``path`` (the last one mounted there), or None."""
    target = canonical(path)
    return next((e for e in reversed(read()) if e.target == target), None)


def is_mounted(path: str | os.PathLike) -> bool:
    target = canonical(path)
    return any(e.target == target for e in read(naming=(target,)))


def users_of(path: str | os.PathLike) -> list[str]:
    """Mount points that show directory ``path`` or something below it: a bind of it
    (same device, a root at or below it) or an overlay with it as upper/work/lower dir."""
    p = os.path.realpath(path)
    st = os.stat(p)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    entries = read()
    home = max((e for e in entries if e.device == dev and _below(p, e.target)),
               key=lambda e: len(e.target), default=None)
    rel = None
    if home is not None:
        rest = os.path.relpath(p, home.target)
        rel = os.path.normpath(os.path.join(home.root, rest)) if rest != "." else home.root
    out = []
    for e in entries:
        if rel is not None and e.device == dev and e is not home and _below(e.root, rel):
            out.append(e.target)
        elif e.fstype == "overlay" and any(
                _below(d, p) for opt in e.super_options.split(",")
                if opt.startswith(("upperdir=", "workdir=", "lowerdir="))
                for d in opt.split("=", 1)[1].split(":")):
            out.append(e.target)
    return out


def _below(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")
