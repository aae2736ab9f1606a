"""Reusable test helpers for mergefs and for anything that implements its semantics.

* ``builders``: declarative layer specs (``LayerSpec().file(...).whiteout(...)``)
  materialised in overlay or OCI format.
* ``model``: the in-memory reference merge (OCI unpack semantics, M5).
* ``tree``: ``capture(path)`` a comparable snapshot of a real tree,
  ``assert_same(a, b)``, ``fingerprint(path)`` for "layers are unchanged".
* ``mounts``: kernel overlayfs as an oracle, and forced unmounts.
* ``strategies``: hypothesis strategies for random layer stacks.
* ``conformance``: the named checks of docs/semantics.md, run against any implementation.
"""
