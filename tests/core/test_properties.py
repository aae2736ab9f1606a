"""Random layer stacks: farm == reference model == kernel overlayfs (U1's oracle),
in both whiteout formats; Merge(A, Diff(A, B)) == B (F1); layers never change."""
from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings

from mergefs.diff import write_diff
from mergefs.explain import explain
from mergefs.farm import build_farm, schedule
from mergefs.testing import model, mounts, tree
from mergefs.testing.builders import LayerSpec, materialise, materialise_stack
from mergefs.testing.strategies import stacks

from ..conftest import needs_overlay, needs_root

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _farm_view(layers, where: Path, workers: int = 2, parallel: str = "auto") -> tree.View:
    prints = [tree.fingerprint(l) for l in layers]
    with mock.patch.object(schedule, "SPLIT_MIN", 0):    # fork even for tiny stacks
        build_farm(layers, where, workers=workers, parallel=parallel)
    assert [tree.fingerprint(l) for l in layers] == prints, "a layer was modified"
    return tree.capture(where)


@needs_overlay
@SETTINGS
@given(specs=stacks())
def test_M5_random_stack_farm_equals_model_and_kernel_overlay(specs):
    expected = tree.model_view(model.merge(specs))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        oci = materialise_stack(specs, d / "oci", "oci")
        ovl = materialise_stack(specs, d / "ovl", "overlay")
        tree.assert_same(_farm_view(oci, d / "farm-oci", workers=1), expected, "farm(oci) vs model")
        tree.assert_same(_farm_view(ovl, d / "farm-ovl", parallel="process"), expected,
                         "farm(overlay, processes) vs model")
        tree.assert_same(_farm_view(ovl, d / "farm-ovl-t", parallel="thread"), expected,
                         "farm(overlay, threads) vs model")
        with mounts.overlay_mount(ovl) as mnt:
            tree.assert_same(tree.capture(mnt), expected, "kernel overlayfs vs model")


def _without_groups(view: tree.View) -> tree.View:
    return tree.View(view.entries, frozenset())


@needs_root
@SETTINGS
@given(a=stacks(max_size=2), b=stacks(max_size=2))
def test_F1_merge_of_diff_round_trips(a, b):
    """Merge(A, Diff(A, B)) == B. Hardlink groups are not part of F2's change
    set (two equal files linked in B but not in A are 'unchanged'), so they are
    left out of this comparison."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        la = materialise_stack(a, d / "a", "oci")
        lb = materialise_stack(b, d / "b", "overlay")
        write_diff(la, lb, d / "diff")
        got = _farm_view(la + [d / "diff"], d / "merged")
        want = _farm_view(lb, d / "want")
        tree.assert_same(_without_groups(got), _without_groups(want), "Merge(A, Diff(A,B)) vs B")


@needs_root
@SETTINGS
@given(x=stacks(max_size=3))
def test_F1_diff_of_same_is_empty_and_from_scratch_is_itself(x):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        lx = materialise_stack(x, d / "x", "overlay")
        write_diff(lx, lx, d / "same")
        assert tree.capture(d / "same").entries.keys() == {b""}
        scratch = materialise(LayerSpec(), d / "scratch")
        write_diff([scratch], lx, d / "full")
        got = _farm_view([d / "full"], d / "m1")
        want = _farm_view(lx, d / "m2")
        tree.assert_same(_without_groups(got), _without_groups(want), "Diff(scratch, X) vs X")


@needs_root
@SETTINGS
@given(specs=stacks())
def test_resolver_lookup_and_explain_agree_with_model(specs):
    """Point look-ups (the union's path) and explain name what the model shows."""
    from mergefs.layer import KIND_NAMES
    from mergefs.resolver import Resolver
    expected = tree.model_view(model.merge(specs))
    probes = set(expected.entries) | {p for s in specs for p in s.entries} | \
        {w for s in specs for w in s.whiteouts}
    with tempfile.TemporaryDirectory() as d:
        layers = materialise_stack(specs, Path(d), "oci")
        with Resolver(layers) as r:
            for path in sorted(probes):
                node = r.lookup(path)
                want = expected.entries.get(path)
                assert (node is None) == (want is None), path
                rows = explain(r, path)
                sup = [x for x in rows if x.status == "supplies"]
                if want is None:
                    assert not sup, (path, rows)
                else:
                    assert KIND_NAMES[node.kind] == want.kind
                    assert len(sup) == 1 and sup[0].layer == node.top, (path, rows)
                    assert sup[0].kind in (want.kind, "opaque dir")


@pytest.mark.slow
@pytest.mark.timeout(600)     # 500 examples: ~50 s alone, several times that on a loaded machine
@needs_overlay
@settings(max_examples=500, deadline=None)
@given(specs=stacks(max_size=6))
def test_M5_random_stack_farm_equals_kernel_overlay_many(specs):
    """The slow tier: more and taller stacks than the default tier."""
    test_M5_random_stack_farm_equals_model_and_kernel_overlay.hypothesis.inner_test(specs)
