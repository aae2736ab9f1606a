"""The mergefs snapshotter: a persistent layer store with idempotent merges.

Glossary (containerd's words, BuildKit's semantics):

* **snapshot**: anything in the store, identified by an id ``sha256:<hex>``
  (see ``snapshotter.digest``). Kinds: ``layer`` (imported or committed),
  ``merge`` (served as a ``farm`` or a ``union``), ``diff`` (committed,
  immutable), ``active`` (a writable upper over a committed parent) and
  ``view`` (a read-only use of a committed snapshot). A layer pulled from a
  registry is **packed** (its blob only) until the first use of its tree
  unpacks it (``snapshotter.packed``, ``Store.layer_tree``).
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

REFs (CLI and API): a name, a key, an id ``sha256:<hex>``, a unique id prefix
(at least 4 hex digits), or a layer directory: an argument containing ``/`` is
imported implicitly (copied into the store; the copy holds no ref of its own,
so prune may remove it once nothing uses it). Importing an OCI layout or a
docker archive also makes an **image record**: the union merge of its layers,
named by the image's tag (it pins the layers).

Caveats:

* Merge ids do not depend on the strategy: asking for a merge that exists
  returns it as it is, except ``--strategy farm`` on a union merge, which
  materialises the farm under the same id.
* A farm shares inodes with its input layers: a layer modified behind the
  store's back changes every farm built on it (fsck reports the layer).
* Names are aliases, not refs: a named snapshot without refs is pruned only by
  ``prune --all``.
* Concurrent builders of one id serialise on a per-id lock file; a prune racing
  a farm build over the same inputs makes that build fail (retry succeeds).

Public API: ``Snapshotter`` (containerd's verbs ``prepare``, ``view``,
``mounts``, ``commit``, ``remove``, ``stat``, ``update``, ``walk``,
``usage``, ``cleanup``, and mergefs's ``merge``, ``diff``, ``import_``,
``export``, ``release``, ``prune``, ``du``, ``fsck``) with ``Info``, ``Kind``
and ``Usage``; ``Store`` and ``default_root``; ``policy.choose_strategy`` /
``Decision``. The modules behind it (``service``, ``store``, ``meta``, ``gc``,
``usage``, ``fsck``) are the implementation.
"""
__all__ = ["Capabilities", "Decision", "Info", "Kind", "MergeSpec", "Snapshotter", "Store",
           "Usage", "choose_strategy", "default_root"]

# Imported on first use (PEP 562), so that a light module (``snapshotter.distribution``)
# costs no import of the whole store: ``mergefs pull`` starts skopeo before the rest loads.
_HOMES = {"Info": "api", "Kind": "api", "Snapshotter": "api", "Usage": "api",
          "Capabilities": "policy", "Decision": "policy", "MergeSpec": "policy",
          "choose_strategy": "policy", "Store": "store", "default_root": "store"}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'snapshotter' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
