"""Against the real tools: images built by umoci import to what ``umoci unpack`` shows,
and exported layouts are accepted by umoci and skopeo (docs/architecture.md, "What tests pin down").

Compared: content, type, mode, uid/gid, nanosecond mtime, symlink target,
rdev, xattrs minus overlay-private ones, hardlink groups. The root directory's
attributes, and those of any directory a layer did not name (umoci's repack
omits unchanged parents), are left out of the import comparison: OCI leaves
the lower directory untouched there, while in overlay format the top layer's
directory always wins (a documented caveat of the store format, see
``ExtractResult.implicit_dirs``).
"""
from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from mergefs.farm import build_farm
from mergefs.oci import detect_source, export_layout, extract_layer, open_image
from mergefs.testing import mounts, tree

from ..conftest import needs_overlay, needs_root
from .conftest import member, needs_skopeo, needs_umoci, run, tar_bytes

pytestmark = [needs_umoci, needs_root]
NS = 1_700_000_000_123_456_789


def _touch_ns(path: Path, ns: int = NS) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _layer1(rootfs: Path) -> None:
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "passwd").write_text("root:x:0:0\n")
    (rootfs / "etc" / "shadow").write_text("secret")
    os.chmod(rootfs / "etc" / "shadow", 0o600)
    (rootfs / "bin").mkdir()
    (rootfs / "bin" / "tool").write_bytes(b"\x7fELF" + os.urandom(3000))
    os.chmod(rootfs / "bin" / "tool", 0o4755)
    os.link(rootfs / "bin" / "tool", rootfs / "bin" / "tool-alias")
    os.symlink("/etc/passwd", rootfs / "bin" / "abs-link")
    os.symlink("../etc", rootfs / "bin" / "rel-link")
    (rootfs / "home" / "user" / "deep").mkdir(parents=True)
    (rootfs / "home" / "user" / "deep" / "f").write_text("deep")
    os.chown(rootfs / "home" / "user", 1000, 1000)
    os.chmod(rootfs / "home" / "user", 0o700)
    os.setxattr(rootfs / "home" / "user" / "deep" / "f", "user.tag", b"v1")
    os.mkfifo(rootfs / "fifo")
    os.mknod(rootfs / "null", 0o666 | 0o020000, os.makedev(1, 3))
    (rootfs / "var" / "cache").mkdir(parents=True)
    for i in range(5):
        (rootfs / "var" / "cache" / f"c{i}").write_text(str(i))
    (rootfs / "replace-me").mkdir()
    (rootfs / "replace-me" / "child").write_text("c")
    (rootfs / "becomes-dir").write_text("file")
    _touch_ns(rootfs / "etc" / "passwd")
    _touch_ns(rootfs / "etc")


def _layer2(rootfs: Path) -> None:
    os.unlink(rootfs / "etc" / "shadow")                      # .wh. of a file
    shutil.rmtree(rootfs / "home" / "user" / "deep")          # .wh. of a subtree
    shutil.rmtree(rootfs / "var" / "cache")                   # deleted, recreated (D7)
    (rootfs / "var" / "cache").mkdir()
    (rootfs / "var" / "cache" / "new").write_text("new")
    shutil.rmtree(rootfs / "replace-me")                      # dir -> file (M2)
    (rootfs / "replace-me").write_text("now a file")
    os.unlink(rootfs / "becomes-dir")                         # file -> dir (M3)
    (rootfs / "becomes-dir").mkdir()
    (rootfs / "becomes-dir" / "x").write_text("x")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0\nuser:x:1000:1000\n")
    _touch_ns(rootfs / "etc" / "passwd", NS + 1)


def _raw_layer3() -> bytes:
    """What umoci repack does not write: an opaque dir, and D2 (a whiteout and its name)."""
    return tar_bytes([
        member("var", "dir"), member("var/.wh..wh..opq"), member("var/only", data=b"only"),
        member("etc", "dir"), member("etc/.wh.passwd"), member("etc/passwd", data=b"d2\n"),
        member("bin/.wh.rel-link")])


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """An OCI layout built with umoci: three layers, tag ``t``."""
    base = tmp_path_factory.mktemp("umoci")
    img, bundle = base / "img", base / "bundle"
    run("umoci", "init", "--layout", img)
    run("umoci", "new", "--image", f"{img}:t")
    run("umoci", "unpack", "--image", f"{img}:t", bundle)
    _layer1(bundle / "rootfs")
    run("umoci", "repack", "--refresh-bundle", "--image", f"{img}:t", bundle)
    _layer2(bundle / "rootfs")
    run("umoci", "repack", "--image", f"{img}:t", bundle)
    (base / "l3.tar").write_bytes(_raw_layer3())
    run("umoci", "raw", "add-layer", "--image", f"{img}:t", base / "l3.tar")
    return img


@pytest.fixture(scope="module")
def reference(image, tmp_path_factory) -> tree.View:
    out = tmp_path_factory.mktemp("ref") / "bundle"
    run("umoci", "unpack", "--image", f"{image}:t", out)
    return tree.capture(out / "rootfs")


IMPLICIT: set[bytes] = set()     # directories no layer named and no lower layer had


def import_layers(src, where: Path, ref: str | None = "t") -> list[Path]:
    """Each layer extracted over the ones below it (implicit dirs inherit, issue 11 item 16)."""
    paths = []
    with open_image(src, ref) as img:
        for i, (desc, reader) in enumerate(img.iter_layers()):
            dest = where / f"l{i}"
            r = extract_layer(reader, dest, expected_diff_id=desc.diff_id, lower=list(paths))
            assert r.diff_id == desc.diff_id
            IMPLICIT.update(set(r.implicit_dirs) - set(r.inherited))
            paths.append(dest)
    return paths


def without_implicit(view: tree.View) -> tree.View:
    """Directories no layer named and nothing below had: umoci makes them with its own
    defaults, mergefs with 0755 0:0 mtime 0; only their kind is compared."""
    entries = {p: (a._replace(mode=0, uid=0, gid=0, mtime_ns=0) if p in IMPLICIT else a)
               for p, a in view.entries.items()}
    return tree.View(entries, view.groups)


def test_image_layout_is_read(image):
    assert detect_source(image) == "oci-layout"
    with open_image(image, "t") as img:
        assert img.ref_name == "t" and img.kind == "oci-layout"
        assert len(img.layers) == 3
        assert all(l.media_type.endswith("tar+gzip") for l in img.layers)


def test_M5_import_and_farm_equals_umoci_unpack(image, reference, tmp_path):
    layers = import_layers(image, tmp_path)
    build_farm(layers, tmp_path / "farm")
    view = tree.capture(tmp_path / "farm")
    tree.assert_same(without_implicit(view), without_implicit(reference), "farm vs umoci unpack")
    assert view.entries[b"var/only"].content and b"var/cache" not in view.entries
    assert b"etc/shadow" not in view.entries and b"bin/rel-link" not in view.entries


@needs_overlay
def test_M5_import_and_kernel_overlay_equals_umoci_unpack(image, reference, tmp_path):
    layers = import_layers(image, tmp_path)
    with mounts.overlay_mount(layers) as mnt:
        view = tree.capture(mnt)
    tree.assert_same(without_implicit(view), without_implicit(reference), "overlay vs umoci unpack")


@needs_skopeo
def test_docker_archive_and_oci_archive_import_the_same(image, tmp_path):
    run("skopeo", "copy", "-q", f"oci:{image}:t", f"docker-archive:{tmp_path}/d.tar:repo/x:tag1")
    run("skopeo", "copy", "-q", f"oci:{image}:t", f"oci-archive:{tmp_path}/o.tar:t")
    assert detect_source(tmp_path / "d.tar") == "docker-archive"
    assert detect_source(tmp_path / "o.tar") == "oci-layout"
    with open_image(tmp_path / "d.tar") as img:
        assert img.ref_name == "docker.io/repo/x:tag1"
    views = []
    for name, ref in (("d.tar", "tag1"), ("o.tar", "t")):
        where = tmp_path / name.replace(".", "_")
        where.mkdir()
        layers = import_layers(tmp_path / name, where, ref)
        build_farm(layers, where / "farm")
        views.append(tree.capture(where / "farm"))
    direct = tmp_path / "direct"
    direct.mkdir()
    build_farm(import_layers(image, direct), direct / "farm")
    tree.assert_same(views[0], tree.capture(direct / "farm"), "docker-archive")
    tree.assert_same(views[1], tree.capture(direct / "farm"), "oci-archive")


def test_export_round_trip_through_umoci(image, tmp_path):
    layers = import_layers(image, tmp_path)
    build_farm(layers, tmp_path / "farm")
    exported = export_layout(layers, tmp_path / "out", ref="rt")
    assert [b.diff_id for b in exported.layers][0].startswith("sha256:")
    run("umoci", "unpack", "--image", f"{tmp_path}/out:rt", tmp_path / "unpacked")
    tree.assert_same(tree.capture(tmp_path / "unpacked" / "rootfs"), tree.capture(tmp_path / "farm"),
                     "umoci unpack of export vs merged view")


def test_D4_export_uses_explicit_whiteouts(image, tmp_path):
    layers = import_layers(image, tmp_path)
    exported = export_layout(layers, tmp_path / "out", ref="rt")
    blob = tmp_path / "out" / "blobs" / "sha256" / exported.layers[2].digest.split(":")[1]
    with tarfile.open(blob) as t:
        names = t.getnames()
    assert not any(n.endswith(".wh..wh..opq") for n in names)
    assert "var/.wh.cache" in names            # the opaque var/ of layer 3, made explicit
    assert "etc/.wh.passwd" not in names       # D2: etc/passwd of the same layer replaces it


def test_export_is_deterministic_and_reimports(image, tmp_path):
    layers = import_layers(image, tmp_path)
    a = export_layout(layers, tmp_path / "a", ref="x")
    b = export_layout(layers, tmp_path / "b", ref="x")
    assert a.manifest_digest == b.manifest_digest
    again = tmp_path / "again"
    again.mkdir()
    re_layers = import_layers(tmp_path / "a", again, "x")
    build_farm(layers, tmp_path / "f1")
    build_farm(re_layers, tmp_path / "f2")
    tree.assert_same(tree.capture(tmp_path / "f2"), tree.capture(tmp_path / "f1"))


@needs_skopeo
def test_skopeo_accepts_the_export(image, tmp_path):
    layers = import_layers(image, tmp_path)
    export_layout(layers, tmp_path / "out", ref="rt", compression="zstd")
    out = run("skopeo", "inspect", f"oci:{tmp_path}/out:rt")
    assert '"Layers"' in out
    run("skopeo", "copy", "-q", f"oci:{tmp_path}/out:rt", f"oci:{tmp_path}/copy:rt")
    with open_image(tmp_path / "copy", "rt") as img:
        assert len(img.layers) == 3


def test_tampered_blob_is_refused(image, tmp_path):
    work = tmp_path / "img"
    shutil.copytree(image, work)
    with open_image(work, "t") as img:
        victim = work / img.layers[0].path
    data = bytearray(victim.read_bytes())
    # keep it valid gzip (rewrite the gzip mtime field): only the digest check can notice
    data[4] ^= 0xFF
    victim.write_bytes(bytes(data))
    from mergefs.errors import InvalidLayer
    with pytest.raises(InvalidLayer, match="digest"):
        import_layers(work, tmp_path, "t")
    assert not (tmp_path / "l0").exists()


def _item16_image(tmp_path) -> tuple[Path, tree.View]:
    img, bundle = tmp_path / "img", tmp_path / "bundle"
    run("umoci", "init", "--layout", img)
    run("umoci", "new", "--image", f"{img}:t")
    run("umoci", "unpack", "--image", f"{img}:t", bundle)
    rootfs = bundle / "rootfs"
    (rootfs / "a/b").mkdir(parents=True)
    os.chown(rootfs / "a/b", 1000, 1001)
    os.chmod(rootfs / "a/b", 0o750)
    os.setxattr(rootfs / "a/b", "user.k", b"v")
    os.chmod(rootfs / "a", 0o711)
    _touch_ns(rootfs / "a/b")
    _touch_ns(rootfs / "a", NS + 5)
    run("umoci", "repack", "--image", f"{img}:t", bundle)
    (tmp_path / "l2.tar").write_bytes(tar_bytes([member("a/b/f", data=b"new\n")]))
    run("umoci", "raw", "add-layer", "--image", f"{img}:t", tmp_path / "l2.tar")
    run("umoci", "unpack", "--image", f"{img}:t", tmp_path / "ref")
    return img, tree.capture(tmp_path / "ref/rootfs")


def test_item16_unnamed_dir_keeps_the_lower_attributes_like_umoci(tmp_path):
    """Issue 11 item 16: a layer holding only a/b/f leaves a/ and a/b/ as the lower had them."""
    img, reference = _item16_image(tmp_path)
    (tmp_path / "layers").mkdir()
    layers = import_layers(img, tmp_path / "layers")
    build_farm(layers, tmp_path / "farm")
    view = tree.capture(tmp_path / "farm")
    for p in (b"a", b"a/b"):
        assert view.entries[p] == reference.entries[p], p
    assert view.entries[b"a/b"].uid == 1000 and view.entries[b"a/b"].mode & 0o7777 == 0o750
    with mounts.overlay_mount(layers) as mnt:
        kernel = tree.capture(mnt)
    tree.assert_same(without_implicit(kernel), without_implicit(reference), "kernel overlay")
    tree.assert_same(without_implicit(view), without_implicit(reference), "farm")


def test_item16_store_import_inherits_even_when_the_layer_was_stored_alone(tmp_path):
    """The store keys a layer that inherited attributes by its lowers too: the same tar
    imported alone first (no lower: 0755 0:0) must not be reused for the image."""
    import subprocess
    import sys
    img, reference = _item16_image(tmp_path)
    repo = Path(__file__).resolve().parents[2]

    def cli(*args):
        p = subprocess.run([sys.executable, "-m", "mergefs", "--root", str(tmp_path / "store"),
                            *map(str, args)], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(repo)))
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    alone = cli("import", tmp_path / "l2.tar")
    cli("import", img)
    cli("export", "t", "-o", tmp_path / "out")
    view = tree.capture(tmp_path / "out")
    for p in (b"a", b"a/b", b"a/b/f"):
        assert view.entries[p] == reference.entries[p], p
    cli("export", alone, "-o", tmp_path / "alone")        # the lone layer is unchanged
    assert tree.capture(tmp_path / "alone").entries[b"a/b"].mode & 0o7777 == 0o755
    # and the image exported to OCI and unpacked by umoci gives the same tree again
    cli("export", "t", "-o", tmp_path / "again", "--format", "oci")
    run("umoci", "unpack", "--image", f"{tmp_path}/again:t", tmp_path / "again-bundle")
    again = tree.capture(tmp_path / "again-bundle/rootfs")
    for p in (b"a", b"a/b", b"a/b/f"):
        assert again.entries[p] == reference.entries[p], p
