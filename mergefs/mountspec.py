"""Mounts described as data: what to serve, where writes go, how.

The snapshotter returns a ``MountSpec``; ``mergefs.union`` serves one. Lowers
are bottom first, like every list of layers in mergefs.

``to_options``/``from_options`` convert to and from overlayfs-style mount
options, the form containerd's ``Mount.options`` and ``mount -t
fuse.mergefs -o ...`` use: ``lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W]``
(top first, as overlayfs lists them). Other options are kept in ``options``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidArgument

LAYER_KEYS = ("lowerdir", "upperdir", "workdir")


@dataclass(frozen=True)
class MountSpec:
    lowers: tuple[str, ...]                 # layer directories, bottom first
    upper: str | None = None                # writable: overlay-format upper dir
    work: str | None = None                 # writable: work dir on the upper's fs
    allow_other: bool = False
    options: tuple[str, ...] = field(default=())   # extra FUSE options
    volatile: bool = False                  # writable: fsync is a no-op (nothing is synced)
    squash_uid: int | None = None           # report every entry as owned by this uid
    squash_gid: int | None = None           # ... and this gid

    @property
    def writable(self) -> bool:
        return self.upper is not None

    def to_options(self) -> list[str]:
        """Overlay-style options: ``lowerdir=`` (top first), ``upperdir=``, ``workdir=``, extras."""
        for p in self.lowers + tuple(x for x in (self.upper, self.work) if x):
            if any(c in p for c in ":,"):
                raise InvalidArgument(f"layer path {p!r} holds ':' or ',', which mount "
                                      "options cannot carry")
        out = [f"lowerdir={':'.join(reversed(self.lowers))}"] if self.lowers else []
        if self.upper is not None:
            out += [f"upperdir={self.upper}", f"workdir={self.work}"]
        if self.allow_other:
            out.append("allow_other")
        return out + list(self.options)


def from_options(options: list[str] | str) -> MountSpec:
    """The inverse of ``MountSpec.to_options`` (a list, or one comma-separated string).

    Raises InvalidArgument without ``lowerdir=``, or with only one of
    ``upperdir=``/``workdir=``. Options other than the three layer keys and
    ``allow_other`` are kept, in order, in ``options``.
    """
    if isinstance(options, str):
        options = options.split(",")
    lowers: tuple[str, ...] | None = None
    upper = work = None
    allow_other, rest = False, []
    for opt in filter(None, options):
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            lowers = tuple(reversed([p for p in value.split(":") if p]))
        elif key == "upperdir":
            upper = value
        elif key == "workdir":
            work = value
        elif key == "allow_other":
            allow_other = True
        else:
            rest.append(opt)
    if not lowers:
        raise InvalidArgument("lowerdir= is required")
    if (upper is None) != (work is None):
        raise InvalidArgument("upperdir= and workdir= go together")
    return MountSpec(lowers, upper, work, allow_other, tuple(rest))
