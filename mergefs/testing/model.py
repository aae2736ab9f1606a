"""The reference model: merge layer specs in memory, the way OCI unpacking does (M5).

Deliberately written bottom-up (apply each layer onto the state of the ones
below) while mergefs resolves top-down, so the two can check each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .builders import ROOT, LayerSpec, Spec


@dataclass(frozen=True)
class ModelEntry:
    spec: Spec
    group: tuple[int, bytes] | None   # (layer, first path) identifies a hardlink group


def _under(path: bytes, top: bytes) -> bool:
    return path.startswith(top + b"/") if top else path != b""


def merge(layers: Sequence[LayerSpec]) -> dict[bytes, ModelEntry]:
    """The merged view of ``layers`` (bottom first) as path -> ModelEntry."""
    state: dict[bytes, ModelEntry] = {b"": ModelEntry(ROOT, None)}
    for n, layer in enumerate(layers):
        state[b""] = ModelEntry(layer.entries.get(b"", ROOT), None)   # the top root wins
        # D3: an opaque dir hides every lower child; D1: a whiteout deletes the
        # lower entry and its subtree. Both act only on lower layers (D2), so
        # they go first and this layer's entries are applied after them.
        for path, e in layer.entries.items():
            if e.kind == "dir" and e.opaque:
                _drop(state, path, keep_top=True)
        for path in layer.whiteouts:
            _drop(state, path, keep_top=False)
        for path in sorted(layer.entries, key=lambda p: (p.count(b"/"), p)):
            if not path:
                continue
            e = layer.entries[path]
            group = None
            if e.kind == "hardlink":
                group = (n, e.target)
                e = layer.entries[e.target]
            elif e.kind == "file" and any(x.kind == "hardlink" and x.target == path
                                          for x in layer.entries.values()):
                group = (n, path)
            old = state.get(path)
            if e.kind == "dir" and old is not None and old.spec.kind == "dir":
                pass                                 # M1: children merge
            else:
                _drop(state, path, keep_top=False)   # M2, M3: replace the subtree
            state[path] = ModelEntry(e, group)
    return state


def _drop(state: dict, top: bytes, keep_top: bool) -> None:
    for path in [p for p in state if _under(p, top) or (p == top and not keep_top)]:
        del state[path]
