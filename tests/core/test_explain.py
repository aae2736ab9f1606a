"""explain: what each layer holds at a path and why it is hidden (D2, D7 included)."""
from __future__ import annotations

from mergefs.explain import explain
from mergefs.resolver import Resolver
from mergefs.testing.builders import LayerSpec, materialise_stack


def _rows(tmp_path, specs, path: bytes, fmt="oci"):
    with Resolver(materialise_stack(specs, tmp_path, fmt)) as r:
        return [(x.layer, x.kind, x.status, x.reason) for x in explain(r, path)]


def test_D7_recreated_dir_hides_lower_children(tmp_path):
    rows = _rows(tmp_path, [LayerSpec().file("d/old"), LayerSpec().whiteout("d").file("d/new")],
                 b"d/old")
    assert rows == [(1, "nothing", "absent", ""),
                    (0, "file", "hidden", "deleted by a whiteout of d in layer 1")]


def test_D2_same_layer_entry_supplies_despite_its_whiteout(tmp_path):
    rows = _rows(tmp_path, [LayerSpec().file("f", b"lower"),
                            LayerSpec().whiteout("f").file("f", b"upper")], b"f")
    assert rows == [(1, "file", "supplies", ""),
                    (0, "file", "hidden", "deleted by a whiteout of f in layer 1")]


def test_merged_dirs_and_opaque(tmp_path):
    specs = [LayerSpec().file("d/a"), LayerSpec().file("d/b"), LayerSpec().opaque_dir("e")]
    assert _rows(tmp_path, specs, b"d", "overlay") == [
        (2, "nothing", "absent", ""), (1, "dir", "supplies", ""),
        (0, "dir", "merged", "directory contents merge (M1)")]
