"""What the service tells a client to mount for a snapshot: a bind of a view, or a FUSE mount.

Two ways, chosen when the service starts:

* **views** (default when ``mergefs.union.mountctl`` is available): the
  service's one FUSE mount (``STATE/views``) gets a top-level directory per
  active or view snapshot, and the client gets ``bind`` of that directory
  (``rbind`` + ``rw``/``ro``), which containerd mounts with mount(2) in
  microseconds. A lower file has one FUSE inode in every view, so N containers
  of one image cache its pages once.
* **fuse**: ``fuse3.mergefs`` with overlay-style options
  (``lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W]``); containerd runs it
  through ``mount.fuse3``, which starts one ``mergefs`` process per mount
  (``mergefs`` must be on containerd's PATH).

Either way a snapshot without lowers is a bind: an active one of its upper
directory, a view one of an empty directory (read-only).

Unpacking: an active snapshot that containerd prepares to extract a layer
into (its key's last part starts with ``extract-``, containerd's
``snapshots.UnpackKeyPrefix``) is answered with a kernel overlayfs mount of the
same lowers and upper when the kernel has overlayfs (``unpack_overlay``): the
upper is in overlay format either way, so Commit reads the same thing, and
thousands of small writes skip the FUSE round trips (measured: ``ctr images
import`` of 4x500 files 12.6 s through a view, see README). Containers, views
and everything read-only stay on mergefs.

A view's name is never reused while the mount lives (the kernel may hold its
dentry); a key's view is removed only when the key is removed or committed,
and never while something is still mounted from it.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time

from mergefs.errors import FailedPrecondition
from mergefs.mountspec import MountSpec

from ..faults import STALL_S, stalling

log = logging.getLogger("mergefs.serve")
Mounts = list[tuple[str, str, list[str]]]


def fuse_mounts(spec: MountSpec) -> Mounts:
    return [("fuse3.mergefs", "mergefs", spec.to_options())]


# containerd's snapshots.UnpackKeyFormat ("extract-%s %s"), namespaced as NS/N/KEY
UNPACK_KEY = re.compile(r"(?:[^/]+/\d+/)?extract-\S+ \S+")


def is_unpack_key(key: str) -> bool:
    """containerd's key for a layer being extracted: ``[NS/N/]extract-<unique> <chainID>``."""
    return UNPACK_KEY.fullmatch(key) is not None


def overlay_mounts(spec: MountSpec) -> Mounts:
    """Kernel overlayfs over the same directories (lowerdir top first, like overlayfs)."""
    return [("overlay", "overlay", [f"workdir={spec.work}", f"upperdir={spec.upper}",
                                    f"lowerdir={':'.join(reversed(spec.lowers))}"])]


def kernel_has_overlay() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return os.geteuid() == 0 and any(line.split()[-1] == "overlay" for line in f)
    except OSError:
        return False


class MountRouter:
    """Turns MountSpecs into client mounts; owns the key -> view table."""

    def __init__(self, state_dir: str, views=None, unpack_overlay: bool = False):
        self.state_dir = state_dir
        self.views = views                    # a started ViewMount, or None (fuse mode)
        self.unpack_overlay = unpack_overlay
        self.empty = os.path.join(state_dir, "empty")
        os.makedirs(self.empty, mode=0o755, exist_ok=True)
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[str, str]] = {}     # key -> (view name, path)
        self._serial = 0
        self._orphans: list[str] = []                     # views of gone keys, still used

    @property
    def mode(self) -> str:
        return "views" if self.views is not None else "fuse"

    def mounts(self, key: str, spec: MountSpec) -> Mounts:
        access = "rw" if spec.writable else "ro"
        if not spec.lowers:
            src = spec.upper if spec.writable else self.empty
            return [("bind", src, ["rbind", access])]
        if spec.writable and self.unpack_overlay and is_unpack_key(key):
            return overlay_mounts(spec)
        if self.views is None:
            return fuse_mounts(spec)
        return [("bind", self.view_path(key, spec), ["rbind", access])]

    def view_path(self, key: str, spec: MountSpec) -> str:
        if self._orphans:
            self.sweep()
        with self._lock:
            known = self._by_key.get(key)
            if known is not None:
                return known[1]
            self._serial += 1
            name = f"{self._serial:06d}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", key)[-80:]
            if stalling("serve:views-loop"):
                self.views._call(time.sleep, STALL_S)
            path = self.views.add_view(name, spec, key)     # numbers derive from the key
            self._by_key[key] = (name, path)
            return path

    def has_view(self, key: str) -> bool:
        with self._lock:
            return key in self._by_key

    def users(self, key: str) -> list[str]:
        """Mount points still using ``key``'s view (binds of it, mounts below it)."""
        known = self._by_key.get(key)
        if known is None or self.views is None:
            return []
        return self.views.fs.view_mounts(known[0]) if hasattr(self.views, "fs") else []

    def check_unused(self, key: str) -> None:
        users = self.users(key)
        if users:
            raise FailedPrecondition(f"snapshot {key!r} is still mounted at {', '.join(users)}; "
                                     "unmount it first")

    def forget(self, key: str) -> None:
        """Drop ``key``'s view (after the key itself is gone from the store).

        A view still in use (a bind a client has not unmounted yet) is kept as an
        orphan and removed by a later ``sweep`` once nothing uses it.
        """
        with self._lock:
            known = self._by_key.pop(key, None)
            if known is not None and self.views is not None:
                self._orphans.append(known[0])
        self.sweep()

    def sweep(self) -> None:
        """Remove the orphan views nothing uses any more."""
        if self.views is None:
            return
        with self._lock:
            orphans, self._orphans = self._orphans, []
        kept = []
        for name in orphans:
            try:
                self.views.remove_view(name)
            except LookupError:
                pass
            except Exception as exc:      # noqa: BLE001 - busy: try again later
                log.debug("view %s kept: %s", name, exc)
                kept.append(name)
        with self._lock:
            self._orphans += kept

    def live(self) -> list[dict]:
        """Live views: key, view name, path and the mounts that use each."""
        with self._lock:
            items = sorted(self._by_key.items())
        return [{"key": k, "view": n, "path": p, "mounts": self.users(k)} for k, (n, p) in items]
