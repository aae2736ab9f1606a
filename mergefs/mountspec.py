"""Mounts described as data: what to serve, where writes go, how.

The snapshotter returns a ``MountSpec``; ``mergefs.union`` serves one. Lowers
are bottom first, like every list of layers in mergefs.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
