"""choose_strategy is a pure function: decisions and their reasons, no I/O, no root."""
from __future__ import annotations

from snapshotter.policy import (FARM_DEFAULT_MAX_ENTRIES, FARM_FREE_ENTRIES, LINK_MAX,
                                REUSE_FOR_FARM, Capabilities, MergeSpec, choose_strategy)

BIG = FARM_DEFAULT_MAX_ENTRIES * 2
MID = (FARM_FREE_ENTRIES + FARM_DEFAULT_MAX_ENTRIES) // 2
CAPS = Capabilities()


def pick(spec, caps=CAPS, intent=None):
    d = choose_strategy(spec, caps, intent)
    assert d.reasons and all(isinstance(r, str) and r for r in d.reasons)
    return d.strategy


def test_requested_strategy_wins():
    assert pick(MergeSpec(8, 10, requested="union")) == "union"
    assert pick(MergeSpec(8, BIG, requested="farm"), intent="inspect") == "farm"


def test_small_merges_are_farms_whatever_the_intent():
    assert pick(MergeSpec(8, FARM_FREE_ENTRIES), intent="inspect") == "farm"


def test_intent_decides_for_mid_sized_merges():
    assert pick(MergeSpec(8, MID), intent="inspect") == "union"
    assert pick(MergeSpec(8, MID), intent="rootfs") == "farm"
    assert pick(MergeSpec(8, MID), intent="export") == "farm"
    assert pick(MergeSpec(8, MID)) == "farm"


def test_large_merges_without_intent_go_live_unless_reused():
    assert pick(MergeSpec(8, BIG)) == "union"
    assert pick(MergeSpec(8, BIG, reuse_count=REUSE_FOR_FARM)) == "farm"
    assert pick(MergeSpec(8, BIG), intent="rootfs") == "farm"


def test_no_fuse_means_farm():
    assert pick(MergeSpec(8, BIG), Capabilities(fuse=False), intent="inspect") == "farm"


def test_inputs_elsewhere_or_no_link_headroom_mean_union():
    assert pick(MergeSpec(8, MID), Capabilities(inputs_on_store_fs=False), "rootfs") == "union"
    assert pick(MergeSpec(8, MID, max_input_links=LINK_MAX - 1), intent="rootfs") == "union"


def test_explain_names_the_rule():
    d = choose_strategy(MergeSpec(8, MID), CAPS, "inspect")
    assert any("--for inspect" in r for r in d.reasons)
