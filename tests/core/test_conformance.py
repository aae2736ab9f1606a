"""docs/semantics.md M, D, S, H, A: every named check against every implementation.

Each check asserts its rule on the implementation's view, and the whole view
must also equal the reference model's (so the model is checked by the rules,
and the implementations by the rules and the model).
"""
from __future__ import annotations

import pytest

from mergefs.testing import conformance, model, tree
from mergefs.testing.tree import View


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__[6:])
def test_conformance(check, merge_impl):
    name, merge = merge_impl

    def merge_and_compare(specs) -> View:
        view = merge(specs)
        if name != "model":
            tree.assert_same(view, tree.model_view(model.merge(specs)), f"{name} vs model")
        return view

    check(merge_and_compare)
