"""Slow tier: a realistic generated stack (tools/gen_stack.py) through tar and back.

The same stack is generated in OCI and overlay format; every OCI layer is tarred
by GNU tar and imported. The farm of the imported layers must equal the farm
of the overlay-format stack, and an exported layout must unpack with umoci to
the same tree.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mergefs.farm import build_farm
from mergefs.oci import export_layout, extract_layer
from mergefs.testing import tree

from ..conftest import needs_root
from .conftest import needs_umoci, run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import gen_stack  # noqa: E402

pytestmark = [pytest.mark.slow, needs_root, pytest.mark.timeout(600)]
LAYERS, FILES = 4, 20_000


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    base = tmp_path_factory.mktemp("genstack")
    oci_layers = gen_stack.generate(base / "oci", LAYERS, FILES, seed=3, fmt="oci")
    overlay_layers = gen_stack.generate(base / "overlay", LAYERS, FILES, seed=3, fmt="overlay")
    return base, oci_layers, overlay_layers


def test_generated_stack_imports_like_the_overlay_stack(stacks, tmp_path):
    base, oci_layers, overlay_layers = stacks
    imported = []
    for i, layer in enumerate(oci_layers):
        tar = tmp_path / f"l{i}.tar"
        subprocess.run(["tar", "--format=posix", "--xattrs", "--xattrs-include=*",
                        "--numeric-owner", "-C", layer, "-cf", tar, "."], check=True)
        r = extract_layer(tar, tmp_path / f"i{i}")
        assert not r.warnings, r.warnings[:5]
        imported.append(tmp_path / f"i{i}")
    build_farm(imported, tmp_path / "farm_imported")
    build_farm(overlay_layers, tmp_path / "farm_overlay")
    tree.assert_same(tree.capture(tmp_path / "farm_imported"),
                     tree.capture(tmp_path / "farm_overlay"), "imported vs generated")


@needs_umoci
def test_generated_stack_exports_for_umoci(stacks, tmp_path):
    base, _, overlay_layers = stacks
    export_layout(overlay_layers, tmp_path / "img", ref="g")
    run("umoci", "unpack", "--image", f"{tmp_path}/img:g", tmp_path / "bundle")
    build_farm(overlay_layers, tmp_path / "farm")
    tree.assert_same(tree.capture(tmp_path / "bundle" / "rootfs"), tree.capture(tmp_path / "farm"),
                     "umoci unpack of export vs farm")
