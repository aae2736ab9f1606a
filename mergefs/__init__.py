"""mergefs: merged container filesystem layers.

Public API (the rest is implementation):

* ``Layer``, ``LayerDir``, ``read_layer_dir`` — layer readers (mergefs.layer)
* ``Resolver``, ``merge_listing``, ``Node`` — merge semantics (mergefs.resolver)
* ``build_farm`` — a merge materialised as a hardlink farm (mergefs.farm)
* ``write_diff`` — Diff(lower, upper) as an overlay-format layer (mergefs.diff)
* the errors of ``mergefs.errors``
"""
import importlib

# Resolved on first use (PEP 562), so a command such as ``mergefs mount`` does
# not pay for modules it does not use before its first line runs.
_EXPORTS = {**dict.fromkeys(("AlreadyExists", "FailedPrecondition", "InvalidLayer",
                             "MergefsError", "MountError", "NotFound", "UnsafeContent"), "errors"),
            **dict.fromkeys(("Layer", "LayerDir", "read_layer_dir"), "layer"),
            **dict.fromkeys(("Node", "Resolver", "merge_listing"), "resolver")}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = [
    "AlreadyExists", "FailedPrecondition", "InvalidLayer", "MergefsError", "MountError",
    "NotFound", "UnsafeContent", "Layer", "LayerDir", "read_layer_dir", "Node", "Resolver",
    "merge_listing",
]
