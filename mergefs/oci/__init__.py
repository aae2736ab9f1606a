"""OCI import and export: layer tars, image layouts, docker-archives.

The store format is kernel overlayfs format (docs/architecture.md, "The store on disk"; docs/semantics.md); this
package converts between it and OCI. Nothing here knows about the store: it
extracts into a directory the caller names and the caller publishes it.

Import one layer tar (plain, gzip or zstd, found by magic bytes)::

    r = oci.extract_layer(src, staging / "fs")     # src: path or binary file
    r.diff_id        # "sha256:..." of the uncompressed tar, computed while reading
    r.entries        # entry count (also r.files, r.dirs, r.symlinks, r.hardlinks,
                     # r.specials, r.whiteouts, r.opaque_dirs); r.warnings (A3)
    # extract_layer(src, dest, lower=[l0, l1]): directories the tar does not name
    # take the lower merged view's attributes (r.inherited), as OCI applies a layer
    rename(staging / "fs", final)                   # the caller publishes

``dest`` must not exist; on any error it is removed again and the error is
raised: ``UnsafeContent`` (``..``, absolute names, hardlinks to anything but
an earlier member, writing through a symlink of the layer, device nodes
without root), ``InvalidLayer`` (corrupt or truncated gzip/zstd/tar,
duplicate entries, diffID not the expected one), ``AlreadyExists``,
``NotFound``, or ``OSError`` (ENOSPC...). Whiteout rules: see ``_extract``.

Import an image (OCI layout or docker-archive, directory or tar)::

    kind = oci.detect_source(path)   # "layer-dir" | "layer-tar" | "oci-layout" | "docker-archive"
    with oci.open_image(path, ref=None) as img:    # ref: tag, ref name or digest if several
        img.ref_name, img.config                    # tag, parsed image config
        for desc in img.layers:                     # bottom first
            if already_stored(desc.diff_id):        # known before reading any blob
                continue
            r = oci.extract_layer(img.open_layer(desc), staging,
                                  expected_diff_id=desc.diff_id)
    # img.open_layer() checks the blob digest and size when read to the end,
    # extract_layer() reads to the end and checks the diffID: a layer that
    # returns has been verified twice. img.iter_layers() yields (desc, reader).

Export (D4: explicit whiteouts when the lower layers are given)::

    blob = oci.export_layer_tar(layer_dir, "out.tar", lower=[l0, l1],
                                compression=None | "gzip" | "zstd")
    img = oci.export_layout([l0, l1, l2], "out-dir", ref="latest",
                            compression="gzip", config={"config": {"Cmd": ["sh"]}})
    # umoci unpack --image out-dir:latest; skopeo copy oci:out-dir:latest ...

``write_layer_tar(layer, fileobj, ...)`` writes to an open file instead.
Output paths must not exist; results are staged next to them and renamed.
"""
from ._export import ExportedImage, LayerBlob, export_layer_tar, export_layout, write_layer_tar
from ._extract import ExtractResult, clean_path, extract_layer
from ._image import Image, LayerDescriptor, detect_source, open_image

__all__ = [
    "ExtractResult", "extract_layer", "clean_path",
    "Image", "LayerDescriptor", "open_image", "detect_source",
    "LayerBlob", "ExportedImage", "write_layer_tar", "export_layer_tar", "export_layout",
]
