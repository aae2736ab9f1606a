"""Import of layer directories (either format), export, and explain through the store."""
from __future__ import annotations

import json
import os

import pytest

from mergefs.testing import model, tree
from mergefs.testing.builders import LayerSpec, materialise_stack
from snapshotter import Snapshotter

from .conftest import base_spec, mid_spec, top_spec


def rich_specs():
    """Attributes and kinds the importer must carry: xattrs, modes, owners, devices, links."""
    lower = (LayerSpec().file("bin/su", b"su", mode=0o4755, uid=0, gid=0)
             .file("etc/shadow", b"s", mode=0o600, uid=0, gid=42)
             .file("data/x", b"x", xattrs={"user.k": b"v"}).hardlink("data/y", "data/x")
             .fifo("run/fifo").char("dev/null", 1, 3, mode=0o666).symlink("abs", "/etc/shadow")
             .dir("var/cache").file("var/cache/old", b"o").file("keep/me", b"k"))
    # D2/D7 in OCI form: var/cache deleted and recreated in the same layer.
    upper = (LayerSpec().whiteout("var/cache").dir("var/cache").file("var/cache/new", b"n")
             .whiteout("keep/me").file("keep/me", b"again"))
    return [lower, upper]


@pytest.mark.parametrize("fmt", ["overlay", "oci"])
def test_imported_stack_merges_like_the_reference_model(store, tmp_path, fmt):
    specs = rich_specs()
    paths = materialise_stack(specs, tmp_path / fmt, fmt=fmt)
    m = Snapshotter(store=store).merge([str(p) for p in paths], strategy="farm")
    tree.assert_same(tree.capture(store.fs_of(m.row.id)), tree.model_view(model.merge(specs)),
                     f"farm of imported {fmt} layers vs model")


def test_D2_same_layer_whiteout_and_dir_is_stored_opaque(store, tmp_path):
    paths = materialise_stack(rich_specs(), tmp_path / "oci", fmt="oci")
    upper = Snapshotter(store=store).import_dir(paths[1])
    cache = store.fs_of(upper.id) / "var" / "cache"
    assert os.getxattr(cache, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    assert not os.path.lexists(cache.parent / ".wh.cache")
    assert (store.fs_of(upper.id) / "keep" / "me").read_bytes() == b"again"


def test_imported_layers_are_never_modified(store, layers):
    before = [tree.fingerprint(p) for p in layers]
    ids = [Snapshotter(store=store).import_dir(p).id for p in layers]
    Snapshotter(store=store).merge(ids, strategy="farm")
    Snapshotter(store=store).diff(ids[0], ids[2])
    assert [tree.fingerprint(p) for p in layers] == before


def test_export_dir_is_the_merged_view_and_a_copy(cli, layers, tmp_path):
    specs = [base_spec(), mid_spec(), top_spec()]
    for strategy in ("farm", "union"):
        m = cli.out("merge", "--strategy", strategy, *layers)
        out = tmp_path / f"export-{strategy}"
        cli.run("export", m, "-o", out, "--format", "dir")
        tree.assert_same(tree.capture(out), tree.model_view(model.merge(specs)), strategy)
        st = os.stat(out / "etc" / "passwd")
        assert st.st_nlink == 1                      # not a hardlink into the store
    assert cli.run("export", m, "-o", out, check=False).returncode == 4   # exists


def test_explain_a_store_ref(cli, layers):
    m = cli.out("merge", *layers)
    out = json.loads(cli.out("explain", m, "/etc/group", "--json"))
    assert out["supplied_by"] is None
    assert any("whiteout" in r["reason"] for r in out["layers"])
    text = cli.out("explain", m[:12], "var/cache/fresh")
    assert "from layer 2" in text


def test_merge_explain_prints_strategy_and_reasons(cli, layers):
    out = cli.out("merge", "--explain", "--for", "inspect", *layers).splitlines()
    assert out[0].startswith("strategy: ") and out[1].startswith("  - ")
    assert out[-1].startswith("sha256:")
    again = cli.out("merge", "--explain", *layers).splitlines()
    assert "(reused)" in again[0] and again[-1] == out[-1]
