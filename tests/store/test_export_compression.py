"""export --compression (issue 13): zstd layers and multi-core gzip, checked by umoci and skopeo."""
from __future__ import annotations

import gzip
import json
import subprocess

import pytest
import zstandard

from mergefs.oci import _compress

from ..conftest import needs
from .test_oci_roundtrip import image, same_below_root, sh  # noqa: F401  (image: a fixture)

pytestmark = needs("umoci", "skopeo")

MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
         "none": "application/vnd.oci.image.layer.v1.tar"}


def diff_ids(layout) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: (layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes()  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    return json.loads(blob(manifest["config"]["digest"]))["rootfs"]["diff_ids"]


def layer_blobs(layout) -> list[tuple[str, bytes]]:
    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: (layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes()  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    return [(d["mediaType"], blob(d["digest"])) for d in manifest["layers"]]


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_export_compression_unpacks_with_umoci_and_skopeo(cli, image, tmp_path,  # noqa: F811
                                                          compression):
    ids = [row["id"] for row in cli.json("import", image)["layers"]]
    m = cli.out("merge", "--strategy", "farm", *ids, "--name", "exp")
    out = tmp_path / "out"
    cli.run("export", m, "-o", out, "--format", "oci", "--compression", compression)
    blobs = layer_blobs(out)
    assert [t for t, _ in blobs] == [MEDIA[compression]] * 3
    for _, data in blobs:
        if compression == "zstd":
            assert data[:4] == b"\x28\xb5\x2f\xfd"
            zstandard.ZstdDecompressor().decompressobj().decompress(data)
        elif compression == "gzip":
            gzip.decompress(data)
            subprocess.run(["gzip", "-t"], input=data, check=True)   # the system gunzip too
    info = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out}:exp"], check=True,
                                     capture_output=True, text=True).stdout)
    assert len(info["Layers"]) == 3
    # skopeo reads every layer (for zstd: decompresses it to write gzip, as a registry
    # client without zstd would get it); Debian 12's umoci 0.4.7 refuses the zstd media
    # type ("blob is not correct mediatype"), so it unpacks skopeo's gzip copy then
    recompress = ["--dest-compress", "--dest-compress-format", "gzip"] \
        if compression == "zstd" else []
    sh("skopeo", "copy", *recompress, f"oci:{out}:exp", f"oci:{tmp_path / 'copy'}:exp")
    got = tmp_path / "got"
    sh("umoci", "unpack", "--image", f"{tmp_path / 'copy' if recompress else out}:exp", got)
    same_below_root(got / "rootfs", cli.root / "snapshots" / m[7:] / "fs",
                    f"umoci unpack of the {compression} export vs the merged view")
    again = cli.json("import", tmp_path / "copy", "--name", "copied")
    assert [r["id"] for r in again["layers"]] == diff_ids(out)   # the exported layers again


def test_parallel_gzip_is_gzip_and_the_same_bytes_for_any_thread_count():
    data = b"".join(bytes([i % 251]) * (i * 97 % 5000) + b"layer %d\n" % i for i in range(4000))
    data = data * 3
    outs = []
    for threads in (1, 2, 5):
        g = _compress.ParallelGzip(threads)
        outs.append(b"".join([g.compress(data[i:i + 100_000])
                              for i in range(0, len(data), 100_000)] + [g.flush()]))
    assert len(data) > 2 * _compress.BLOCK and outs[0] == outs[1] == outs[2]
    assert gzip.decompress(outs[0]) == data
    assert len(outs[0]) < len(gzip.compress(data, 6)) * 1.01
