"""Layer readers: every whiteout and opaque encoding mergefs accepts on import."""
from __future__ import annotations

import os

from mergefs.layer import read_layer_dir
from mergefs.farm import build_farm
from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise

from ..conftest import needs_overlay, needs_root


def _layer_with_xattr_whiteout(path, dir_marker: tuple[str, bytes]):
    (path / "d").mkdir(parents=True)
    (path / "d/gone").write_bytes(b"")
    os.setxattr(path / "d/gone", "trusted.overlay.whiteout", b"")
    (path / "d/kept-empty").write_bytes(b"")          # an empty file without the xattr
    os.setxattr(path / "d", *dir_marker)


@needs_overlay
def test_D1_xattr_whiteouts_match_kernel_overlayfs(tmp_path):
    """Linux 6.7+ xattr whiteouts: a 0-size file with overlay.whiteout in a dir marked
    overlay.opaque=x (or overlay.whiteouts): the file hides lower entries, the dir is
    not opaque."""
    lower = materialise(LayerSpec().file("d/gone", b"lower").file("d/other", b"o"), tmp_path / "l0")
    for n, marker in enumerate([("trusted.overlay.opaque", b"x"),
                                ("trusted.overlay.whiteouts", b"y")]):
        upper = tmp_path / f"u{n}"
        _layer_with_xattr_whiteout(upper, marker)
        fd = os.open(upper / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            ld = read_layer_dir(fd, "overlay")
        finally:
            os.close(fd)
        assert ld.whiteouts == {b"gone"} and not ld.opaque and b"kept-empty" in ld.entries
        build_farm([lower, upper], tmp_path / f"farm{n}")
        farm = tree.capture(tmp_path / f"farm{n}")
        assert set(farm.entries) == {b"", b"d", b"d/other", b"d/kept-empty"}
        if marker[1] == b"x":     # the kernel's own marker (Linux 6.8+)
            with mounts.overlay_mount([lower, upper]) as mnt:
                tree.assert_same(farm, tree.capture(mnt), "farm vs kernel overlayfs")


@needs_root
def test_D3_user_overlay_opaque_is_honoured(tmp_path):
    """Layers written without root carry user.overlay.opaque."""
    lower = materialise(LayerSpec().file("d/old"), tmp_path / "l0")
    upper = tmp_path / "l1"
    (upper / "d").mkdir(parents=True)
    (upper / "d/new").write_bytes(b"")
    os.setxattr(upper / "d", "user.overlay.opaque", b"y")
    build_farm([lower, upper], tmp_path / "farm")
    assert os.listdir(tmp_path / "farm/d") == ["new"]
    assert not os.listxattr(tmp_path / "farm/d"), "overlay xattrs are format, not content (A3)"


def test_format_choice_restricts_markers(tmp_path):
    """fmt='overlay' takes .wh.* names literally; fmt='oci' ignores char 0/0 semantics."""
    layer = tmp_path / "l"
    layer.mkdir()
    (layer / ".wh.x").write_bytes(b"")
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_layer_dir(fd, "oci").whiteouts == {b"x"}
        assert b".wh.x" in read_layer_dir(fd, "overlay").entries
        assert read_layer_dir(fd, "auto").whiteouts == {b"x"}
    finally:
        os.close(fd)
