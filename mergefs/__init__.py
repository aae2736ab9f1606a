"""mergefs: merged container filesystem layers.

Public API (the rest is implementation):

* ``Layer``, ``LayerDir``, ``read_layer_dir`` — layer readers (mergefs.layer)
* ``Resolver``, ``merge_listing``, ``Node`` — merge semantics (mergefs.resolver)
* ``build_farm`` — a merge materialised as a hardlink farm (mergefs.farm)
* ``write_diff`` — Diff(lower, upper) as an overlay-format layer (mergefs.diff)
* the errors of ``mergefs.errors``
"""
from .errors import (AlreadyExists, FailedPrecondition, InvalidLayer, MergefsError,
                     MountError, NotFound, UnsafeContent)
from .layer import Layer, LayerDir, read_layer_dir
from .resolver import Node, Resolver, merge_listing

__all__ = [
    "AlreadyExists", "FailedPrecondition", "InvalidLayer", "MergefsError", "MountError",
    "NotFound", "UnsafeContent", "Layer", "LayerDir", "read_layer_dir", "Node", "Resolver",
    "merge_listing",
]
