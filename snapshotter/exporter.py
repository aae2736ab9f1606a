"""Export a snapshot: ``dir`` here; ``tar`` and ``oci`` written by ``mergefs.oci``.

``dir`` writes the merged view as a plain directory (a copy, never hardlinks
into the store: writing to an export must not reach a stored layer). A layer
or diff is written as the layer it is (overlay-format whiteouts kept). The
output appears only when complete (staged next to it, then renamed).
"""
from __future__ import annotations


from mergefs.farm import build_farm, staged_build
from mergefs.layer import Layer

from . import service
from .meta import SnapshotKind, Strategy
from .importer import LayerCopier
from .store import Store


def export(store: Store, ref: str, output: str, fmt: str = "dir", compression: str | None = "auto",
           progress=None) -> None:
    """Write snapshot REF at ``output`` (must not exist) as ``dir``, ``tar`` or ``oci``.

    ``compression`` (tar, oci): None, "gzip" or "zstd"; "auto": gzip for oci, none for tar.
    ``progress(n)``: bytes of tar written so far (tar, oci).

    ``tar``: one OCI layer tar; a layer or diff as itself, a merge squashed
    into one layer (its merged view). ``oci``: an OCI image layout whose
    layers are the flattened inputs, each with explicit whiteouts against the
    ones below (D4), named by the snapshot's first name or short id.
    """
    row = service.resolve_ref(store, ref)
    if fmt == "oci":
        from mergefs import oci
        from . import meta
        oci.export_layout(service.store_layers(store, service.flatten(store, row)), output,
                          ref=meta.first_name(store.db, row.id) or service.short(row.id),
                          compression="gzip" if compression == "auto" else compression,
                          progress=progress)
        return
    if fmt == "tar":
        from mergefs import oci
        comp = None if compression == "auto" else compression
        write = lambda src: oci.export_layer_tar(Layer(src, "overlay"), output,  # noqa: E731
                                                 compression=comp, progress=progress)
    else:
        write = lambda src: _copy_tree(src, output)  # noqa: E731
    if row.kind != SnapshotKind.MERGE:
        write(store.layer_tree(row.id))
    elif row.strategy == Strategy.FARM:
        write(store.fs_of(row.id))
    else:                            # a union: materialise the view in staging first
        staged = store.stage("export")
        try:
            build_farm(service.store_layers(store, service.flatten(store, row)),
                       staged.path / "fs")
            write(staged.path / "fs")
        finally:
            staged.discard()


def _copy_tree(src, output: str) -> None:
    with Layer(src, "overlay") as layer:
        staged_build(output, lambda fd: LayerCopier(layer, fd).run())
