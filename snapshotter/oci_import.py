"""Import of layer tars (and, once mergefs.oci offers them, OCI layouts and docker archives).

``mergefs.oci.extract_layer`` (owned by the OCI module) unpacks a layer tar
(plain, gzip, zstd) safely into a new directory, in overlay format, and
returns its diffID (sha256 of the uncompressed tar). The layer is stored under
that diffID; its tree digest (mergefs-tree-v1) is recorded too, so fsck can
check the stored content. Unsafe or malformed tars raise before anything is
published: the staging dir goes, the store is unchanged.
"""
from __future__ import annotations

import os

from mergefs.errors import InvalidLayer

from .digest import TreeSummary, tree_digest
from .meta import Row
from .store import CLI_HOLDER, Store


def import_archive(store: Store, src: str, name: str | None = None,
                   holder: str | None = CLI_HOLDER) -> list[Row]:
    from mergefs import oci
    if os.path.isdir(src) or _is_docker_archive(src):
        image_import = getattr(oci, "import_image", None)
        if image_import is None:
            raise InvalidLayer(f"{src!r}: importing OCI layouts and docker archives needs "
                               "mergefs.oci.import_image, which this build lacks")
        return image_import(store, src, name, holder)     # pragma: no cover (not there yet)
    return [import_layer_tar(store, src, name, holder)]


def _is_docker_archive(path: str) -> bool:
    import tarfile
    try:
        with tarfile.open(path) as t:
            return "manifest.json" in t.getnames()[:64]
    except (tarfile.TarError, OSError):
        return False


def import_layer_tar(store: Store, src, name: str | None = None,
                     holder: str | None = CLI_HOLDER, expected_diff_id: str | None = None,
                     description: str | None = None) -> Row:
    """One layer tar (path or binary file) into the store, under its diffID."""
    from mergefs import oci
    from .service import publish_layer
    staged = store.stage("import")
    try:
        result = oci.extract_layer(src, staged.path / "fs", expected_diff_id=expected_diff_id)
        tree = tree_digest(staged.path / "fs")
        summary = TreeSummary(result.diff_id, tree.entries, tree.bytes)
        return publish_layer(store, staged, summary, tree.digest, "layer",
                             description or f"import of {src}", str(src), name, holder, "import")
    finally:
        staged.discard()
