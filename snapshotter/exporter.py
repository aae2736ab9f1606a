"""Export a snapshot: ``dir`` here; ``tar`` and ``oci`` through ``mergefs.oci``.

``dir`` writes the merged view as a plain directory (a copy, never hardlinks
into the store: writing to an export must not reach a stored layer). A layer
or diff is written as the layer it is (overlay-format whiteouts kept). The
output appears only when complete (staged next to it, then renamed).
"""
from __future__ import annotations

import os

from mergefs.errors import InvalidLayer
from mergefs.farm import build_farm, staged_build
from mergefs.layer import Layer

from . import service
from .importer import LayerCopier
from .store import Store


def export(store: Store, ref: str, output: str, fmt: str = "dir") -> None:
    row = service.resolve_ref(store, ref)
    if fmt != "dir":
        try:
            from mergefs import oci
        except ImportError:
            raise InvalidLayer(f"--format {fmt} needs mergefs.oci, which is not installed "
                               "in this build yet") from None
        return oci_export(store, row, output, fmt, oci)
    if row.kind == "merge" and row.strategy == "union":
        staged = store.stage("export")
        try:
            build_farm(service.layer_dirs(store, row), staged.path / "fs")
            _copy_tree(staged.path / "fs", output)
        finally:
            staged.discard()
        return
    _copy_tree(service.serve_dirs(store, row)[0] if row.kind == "merge" else store.fs_of(row.id),
               output)


def _copy_tree(src, output: str) -> None:
    with Layer(src, "overlay") as layer:
        staged_build(output, lambda fd: LayerCopier(layer, fd).run())


def oci_export(store: Store, row, output: str, fmt: str, oci) -> None:
    """Hand the flattened layer directories (bottom first) to mergefs.oci."""
    layers = service.layer_dirs(store, row)
    if fmt == "tar":
        if len(layers) != 1:
            raise InvalidLayer("--format tar writes one layer; export a merge with --format oci "
                               "or --format dir")
        oci.export_layer_tar(layers[0], output)
    else:
        oci.export_layout(layers, output, ref=row.id.split(":", 1)[1][:12])
