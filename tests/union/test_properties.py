"""Random stacks (hypothesis): union == model (handlers), union == kernel overlayfs (mount)."""
from __future__ import annotations

import tempfile

import pytest
import trio
from hypothesis import HealthCheck, given, settings

from mergefs.layer import Layer
from mergefs.testing import model, mounts, tree
from mergefs.testing.builders import materialise_stack
from mergefs.testing.strategies import stacks
from mergefs.union.ops import UnionOperations
from mergefs.union.view import UnionView

from ..conftest import needs_overlay
from .conftest import Driver

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=60, **SETTINGS)
@given(specs=stacks())
def test_U1_handlers_equal_model(specs):
    for fmt in ("overlay", "oci"):
        with tempfile.TemporaryDirectory() as where:
            layers = materialise_stack(specs, where, fmt)
            view = UnionView([Layer(p) for p in layers])
            try:
                drv = Driver(UnionOperations(view))

                async def check():
                    tree.assert_same(await drv.capture(), tree.model_view(model.merge(specs)),
                                     f"union({fmt}) vs model")
                    await drv.finish()
                trio.run(check)
            finally:
                view.close()


@pytest.mark.slow
@needs_overlay
@settings(max_examples=40, **SETTINGS)
@given(specs=stacks(max_size=6))
def test_U1_mount_equals_kernel_overlay(specs, tmp_path_factory, union_mount):
    where = tmp_path_factory.mktemp("s")
    ours = materialise_stack(specs, where / "oci", "oci")
    oracle = materialise_stack(specs, where / "ovl-layers", "overlay")
    mnt = union_mount(ours)
    try:
        (where / "ovl").mkdir()
        with mounts.overlay_mount(oracle, where / "ovl") as ovl:
            tree.assert_same(tree.capture(mnt), tree.capture(ovl), "union vs kernel overlayfs")
    finally:
        from .conftest import stop_server
        stop_server(mnt, union_mount.started[-1][1])
