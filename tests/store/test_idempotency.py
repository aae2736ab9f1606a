"""Idempotent commit (C1) and merge identity (M4): the BuildKit case that motivates the store."""
from __future__ import annotations

import os

import pytest

from mergefs.testing import mounts, tree
from snapshotter import Snapshotter
from snapshotter.digest import merge_id
from snapshotter.gc import prune
from snapshotter.store import Store

from .conftest import snapshot_dirs
from ..conftest import needs


def ids(store, paths):
    return [Snapshotter(store=store).import_dir(p).id for p in paths]


def test_C1_same_merge_twice_same_id_no_rebuild(store, layers):
    first = Snapshotter(store=store).merge([str(p) for p in layers], strategy="farm")
    ino = os.stat(store.fs_of(first.row.id)).st_ino
    again = Snapshotter(store=store).merge([str(p) for p in layers], strategy="farm")
    assert again.row.id == first.row.id and again.reused and not first.reused
    assert os.stat(store.fs_of(first.row.id)).st_ino == ino


def test_C1_buildkit_merge_release_merge_reuses(cli, layers):
    """merge, release, merge again -> same id, no rebuild, no 'already exists'."""
    a, b, c = (cli.out("import", p) for p in layers)
    m1 = cli.json("merge", a, b, c)
    created = cli.json("inspect", m1["id"])["created"]
    cli.run("release", m1["id"])
    assert cli.json("inspect", m1["id"])["refs"] == []          # C4: release deletes nothing
    m2 = cli.json("merge", a, b, c)
    assert m2["id"] == m1["id"] and m2["reused"]
    assert cli.json("inspect", m2["id"])["created"] == created


def test_C4_merge_release_prune_merge_rebuilds(cli, layers):
    a, b, c = (cli.out("import", p) for p in layers)
    m1 = cli.json("merge", a, b, c)
    created = cli.json("inspect", m1["id"])["created"]
    cli.run("release", m1["id"])
    pruned = cli.json("prune")
    assert pruned["deleted"] == [m1["id"]]
    assert cli.run("inspect", m1["id"], check=False).returncode == 3
    m2 = cli.json("merge", a, b, c)
    assert m2["id"] == m1["id"] and not m2["reused"]
    assert cli.json("inspect", m2["id"])["created"] > created


def test_M4_nested_merges_flatten_to_one_id(store, layers):
    a, b, c = ids(store, layers)
    ab = Snapshotter(store=store).merge([a, b]).row.id
    nested = Snapshotter(store=store).merge([ab, c])
    flat = Snapshotter(store=store).merge([a, b, c])
    assert nested.row.id == flat.row.id == merge_id([a, b, c])
    assert flat.reused


def test_M4_one_input_merge_is_that_input(store, layers):
    a = ids(store, layers[:1])[0]
    assert Snapshotter(store=store).merge([a]).row.id == a


def test_merge_id_is_order_sensitive(store, layers):
    a, b, _ = ids(store, layers)
    assert Snapshotter(store=store).merge([a, b]).row.id != Snapshotter(store=store).merge([b, a]).row.id


def test_same_layer_at_two_positions_stored_once(store, layers):
    a, b, _ = ids(store, layers)
    assert Snapshotter(store=store).import_dir(layers[0]).id == a        # importing again: same id
    m = Snapshotter(store=store).merge([a, b, a], strategy="farm")
    assert len(snapshot_dirs(store.root)) == 4                  # a, b, c and the merge
    assert Snapshotter(store=store).layers(m.row) == [a, b, a]


def test_layer_id_is_independent_of_whiteout_format(store, layers, oci_layers):
    """An OCI-format dir and an overlay-format dir of the same layer are one snapshot."""
    assert ids(store, layers) == ids(store, oci_layers)


def test_layer_id_is_the_same_in_another_store(tmp_path, layers):
    """The same merge on another machine has the same key (ids are content digests)."""
    ms = []
    for n in ("one", "two"):
        with Store(tmp_path / n) as s:
            ms.append(Snapshotter(store=s).merge([str(p) for p in layers]).row.id)
    assert ms[0] == ms[1]


@needs("overlay")
def test_farm_merge_equals_kernel_overlay(store, layers):
    """The stored farm of imported layers == kernel overlayfs of the original layers."""
    m = Snapshotter(store=store).merge([str(p) for p in layers], strategy="farm")
    with mounts.overlay_mount(layers) as mnt:
        expected = tree.capture(mnt)
    tree.assert_same(tree.capture(store.fs_of(m.row.id)), expected, "farm vs kernel overlay")


def test_union_merge_stores_only_metadata_and_pins_inputs(store, layers):
    m = Snapshotter(store=store).merge([str(p) for p in layers], strategy="union")
    d = store.dir_of(m.row.id)
    assert sorted(os.listdir(d)) == ["holders.json", "meta.json"]
    from snapshotter import meta
    assert all(p.pin for p in meta.parents(store.db, m.row.id))


def test_prune_after_release_of_everything_keeps_union_inputs_until_union_goes(store, layers):
    a, b, c = ids(store, layers)
    m = Snapshotter(store=store).merge([a, b, c], strategy="union").row.id
    for i in (a, b, c):
        Snapshotter(store=store).release(i)
    Snapshotter(store=store).release(m)
    report = prune(store)
    assert report.deleted[0] == m and set(report.deleted[1:]) == {a, b, c}   # cascade


def test_union_merge_asked_for_as_farm_is_materialised_under_the_same_id(store, layers):
    u = Snapshotter(store=store).merge([str(p) for p in layers], strategy="union")
    f = Snapshotter(store=store).merge([str(p) for p in layers], strategy="farm")
    assert f.row.id == u.row.id and f.row.strategy == "farm"
    assert (store.fs_of(f.row.id) / "etc" / "motd").read_bytes() == b"hello\n"
    from snapshotter import meta
    assert not any(p.pin for p in meta.parents(store.db, f.row.id))
    from snapshotter.fsck import fsck
    assert fsck(store) == []


def test_union_merge_asked_for_often_becomes_a_farm(store, layers):
    """Policy input 'reuse count': REUSE_FOR_FARM requests of a union merge amortise a farm."""
    from snapshotter.policy import REUSE_FOR_FARM
    ids = [Snapshotter(store=store).import_dir(p).id for p in layers]
    first = Snapshotter(store=store).merge(ids, strategy="union")
    for _ in range(REUSE_FOR_FARM - 1):
        assert Snapshotter(store=store).merge(ids).row.strategy == "union"
    res = Snapshotter(store=store).merge(ids)
    assert res.row.id == first.row.id and res.row.strategy == "farm"
    assert any("materialised" in r for r in res.decision.reasons)
    assert Snapshotter(store=store).merge(ids, strategy="union").row.strategy == "farm"   # stays a farm
