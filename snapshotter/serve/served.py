"""The Snapshotter as the service exposes it: the store's verbs plus the live views.

``Served`` wraps a ``Snapshotter`` so that removing or committing a key also
drops its view, and refuses (FAILED_PRECONDITION) while something is still
mounted from that view. Everything else is the Snapshotter's own verb.
"""
from __future__ import annotations

import threading

from ..faults import stall_point
from .mounts import MountRouter


class Served:
    def __init__(self, snapshotter, router: MountRouter):
        self.sn = snapshotter
        self.router = router
        self._write = threading.Lock()       # one writer of the store at a time

    # read-only verbs
    def stat(self, key):
        return self.sn.stat(key)

    def mounts(self, key):
        return self.sn.mounts(key)

    def walk(self, *filters):
        return self.sn.walk(*filters)

    def usage(self, key):
        return self.sn.usage(key)

    # verbs that change the store
    def prepare(self, key, parent=None, labels=None):
        with self._write:
            return self.sn.prepare(key, parent, labels=labels)

    def view(self, key, parent=None, labels=None):
        with self._write:
            return self.sn.view(key, parent, labels=labels)

    def commit(self, name, key, labels=None):
        # containerd commits a snapshot that may still be mounted (its overlay
        # snapshotter only reads the upper): allowed; a view still bound is
        # retired later, once its last user is gone (MountRouter.sweep).
        # Its upper becomes the layer by a rename unless a view of it lives (a
        # client may still write through it): then the upper is copied.
        with self._write:
            stall_point("serve:commit")
            info = self.sn.commit(name, key, labels=labels, move=not self.router.has_view(key))
        self.router.forget(key)
        return info

    def remove(self, key):
        self.router.check_unused(key)
        with self._write:
            self.sn.remove(key)
        self.router.forget(key)

    def update(self, info, fieldpaths=()):
        with self._write:
            return self.sn.update(info, fieldpaths)

    def cleanup(self):
        with self._write:
            self.sn.cleanup()

    def prune(self, **policy):
        with self._write:
            return self.sn.prune(**policy)
