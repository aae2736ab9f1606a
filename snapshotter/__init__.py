"""The mergefs snapshotter: a persistent layer store with idempotent merges.

Glossary (containerd's words, BuildKit's semantics):

* **snapshot**: anything in the store, identified by an id ``sha256:<hex>``
  (see ``snapshotter.digest``). Kinds: ``layer`` (imported or committed),
  ``merge`` (served as a ``farm`` or a ``union``), ``diff`` (committed,
  immutable), ``active`` (a writable upper over a committed parent) and
  ``view`` (a read-only use of a committed snapshot).
* **name**: an alias (``--name``); **key**: the name of an active or view
  snapshot; **parent**: a snapshot's base (an active/view's parent, a merge's
  flattened inputs, a diff's lower and upper).
* **ref**: a holder keeping a snapshot alive. The CLI holds one on what it
  makes until ``release``; releasing never deletes (C4); ``prune`` deletes
  what nothing holds, pins (union merges, active/view) or mounts (leases).

Lifecycle of a merge: resolve REFs -> flatten (M4) -> id = digest of the
flattened input ids -> if committed: take a ref, done (no rebuild) -> else,
under a per-id build lock, choose a strategy (``policy.choose_strategy``),
build in ``staging/``, publish by rename in one metadata transaction (C1: a
racer that lost adds its ref and discards its copy).

Public API: ``Store``, ``default_root``, the ``service`` functions
(``import_path``, ``merge``, ``diff``, ``commit``, ``prepare``, ``release``,
``mount_spec``), ``gc.prune``, ``usage.measure``, ``fsck.fsck``, and
``policy.choose_strategy`` / ``Decision``.
"""
from .policy import Capabilities, Decision, MergeSpec, choose_strategy
from .service import commit, diff, import_path, merge, mount_spec, prepare, release
from .store import Store, default_root

__all__ = ["Capabilities", "Decision", "MergeSpec", "choose_strategy", "commit", "diff",
           "import_path", "merge", "mount_spec", "prepare", "release", "Store", "default_root"]
