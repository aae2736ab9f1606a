"""Refs, release and prune (C4), and the errors of C2."""
from __future__ import annotations

import os
import time

import pytest

from mergefs.errors import AlreadyExists, FailedPrecondition, NotFound
from snapshotter import meta, Snapshotter
from snapshotter.gc import parse_duration, parse_size, prune
from snapshotter.usage import measure


def imported(store, layers):
    return [Snapshotter(store=store).import_dir(p).id for p in layers]


def visible(store):
    return {r.id for r in meta.all_rows(store.db)}


def test_C4_release_never_deletes(store, layers):
    ids = imported(store, layers)
    for i in ids:
        Snapshotter(store=store).release(i)
    assert visible(store) == set(ids)
    assert all(store.fs_of(i).is_dir() for i in ids)


def test_C4_prune_keeps_referenced(store, layers):
    ids = imported(store, layers)
    Snapshotter(store=store).release(ids[0])
    assert prune(store).deleted == [ids[0]]
    assert visible(store) == set(ids[1:])


def test_C4_prune_reports_freed_bytes(store, layers):
    ids = imported(store, layers)
    excl = {s.row.id: s.exclusive for s in measure(store).snapshots}
    Snapshotter(store=store).release(ids[2])
    report = prune(store)
    assert report.freed == excl[ids[2]] > 0


def test_C4_layer_linked_by_a_farm_frees_only_what_it_alone_holds(store, layers):
    ids = imported(store, layers)
    Snapshotter(store=store).merge(ids, strategy="farm")
    su = {s.row.id: s for s in measure(store).snapshots}[ids[0]]
    Snapshotter(store=store).release(ids[0])
    report = prune(store)
    assert report.deleted == [ids[0]] and report.freed == su.exclusive < su.size


def test_C4_dry_run_deletes_nothing(store, layers):
    ids = imported(store, layers)
    for i in ids:
        Snapshotter(store=store).release(i)
    report = prune(store, dry_run=True)
    assert set(report.deleted) == set(ids) and report.freed > 0
    assert visible(store) == set(ids)


def test_C4_named_snapshots_need_all(store, layers):
    named = Snapshotter(store=store).import_dir(layers[0], name="base").id
    Snapshotter(store=store).release(named)
    assert prune(store).deleted == []
    assert prune(store, all_named=True).deleted == [named]
    with pytest.raises(NotFound):
        store.resolve("base")


def test_C4_keep_duration(store, layers):
    ids = imported(store, layers)
    for i in ids:
        Snapshotter(store=store).release(i)
    with meta.write(store.db):
        store.db.execute("UPDATE snapshots SET last_used=? WHERE id=?", (time.time() - 7200, ids[0]))
    assert prune(store, keep_duration=parse_duration("1h")).deleted == [ids[0]]


def test_C4_keep_storage_deletes_least_recently_used_first(store, layers):
    ids = imported(store, layers)
    for n, i in enumerate(ids):
        Snapshotter(store=store).release(i)
        with meta.write(store.db):
            store.db.execute("UPDATE snapshots SET last_used=? WHERE id=?", (1000.0 + n, i))
    total = measure(store).total
    report = prune(store, keep_storage=total - 1)
    assert report.deleted == [ids[0]]            # one is enough to go under the limit
    assert prune(store, keep_storage=total * 10).deleted == []


def test_C4_union_merge_pins_its_inputs(store, layers):
    ids = imported(store, layers)
    m = Snapshotter(store=store).merge(ids, strategy="union").row.id
    for i in ids:
        Snapshotter(store=store).release(i)
    assert prune(store).deleted == []
    Snapshotter(store=store).release(m)
    assert set(prune(store).deleted) == set(ids) | {m}


def test_C4_farm_merge_does_not_pin_and_survives_its_inputs(store, layers):
    ids = imported(store, layers)
    m = Snapshotter(store=store).merge(ids, strategy="farm").row.id
    for i in ids:
        Snapshotter(store=store).release(i)
    assert set(prune(store).deleted) == set(ids)
    assert (store.fs_of(m) / "etc" / "passwd").read_bytes() == b"root:x:0:0\n"


def test_C4_active_snapshot_pins_its_parent(store, layers):
    (i,) = imported(store, layers[:1])
    Snapshotter(store=store).prepare("work", i)
    Snapshotter(store=store).release(i)
    assert prune(store).deleted == []


def test_C4_a_live_mount_lease_pins(store, layers):
    (i,) = imported(store, layers[:1])
    Snapshotter(store=store).mount_spec(i, mountpoint="/")     # "/" is always mounted
    Snapshotter(store=store).release(i)
    assert prune(store).deleted == []
    with meta.write(store.db):
        store.db.execute("UPDATE leases SET mountpoint='/nonexistent/mnt'")
    assert prune(store).deleted == [i]         # the mount went away: the lease is stale


def test_C2_prepare_with_a_used_key_fails(store, layers):
    (i,) = imported(store, layers[:1])
    Snapshotter(store=store).prepare("k", i)
    with pytest.raises(AlreadyExists):
        Snapshotter(store=store).prepare("k", i)
    with pytest.raises(AlreadyExists):
        Snapshotter(store=store).view("k", i)


def test_C2_removing_what_others_depend_on_fails(store, layers):
    ids = imported(store, layers)
    m = Snapshotter(store=store).merge(ids, strategy="union").row.id
    with pytest.raises(FailedPrecondition):
        Snapshotter(store=store).remove(ids[0])
    Snapshotter(store=store).remove(m)
    Snapshotter(store=store).remove(ids[0])
    assert visible(store) == set(ids[1:])


def test_C2_commit_of_a_view_fails(store, layers):
    (i,) = imported(store, layers[:1])
    Snapshotter(store=store).view("v", i)
    with pytest.raises(FailedPrecondition):
        Snapshotter(store=store).commit_upper("v")


def test_C2_name_taken_by_other_content_fails_same_content_succeeds(store, layers):
    a = Snapshotter(store=store).import_dir(layers[0], name="n").id
    assert Snapshotter(store=store).import_dir(layers[0], name="n").id == a       # C1
    with pytest.raises(AlreadyExists):
        Snapshotter(store=store).import_dir(layers[1], name="n")


def test_cli_exit_codes(cli_process, layers):
    """End to end, as a real process."""
    cli = cli_process
    assert cli.run("inspect", "nosuchref", check=False).returncode == 3
    cli.out("import", layers[0], "--name", "x")
    p = cli.run("import", layers[1], "--name", "x", check=False)
    assert p.returncode == 4 and p.stderr.startswith("mergefs: error: name 'x'")
    assert cli.run("import", "/nonexistent/dir", check=False).returncode == 3


def test_cli_prune_dry_run_and_json(cli, layers):
    i = cli.out("import", layers[0])
    cli.run("release", i)
    out = cli.out("prune", "--dry-run")
    assert f"would delete {i}" in out
    assert cli.json("prune", "--keep-duration", "1h")["deleted"] == []
    assert cli.json("prune", "--keep-storage", "1k")["deleted"] == [i]


def test_sizes_and_durations_parse():
    assert parse_size("1.5G") == 3 << 29 and parse_size("512MiB") == 512 << 20
    assert parse_duration("24h") == 86400 and parse_duration("90") == 90


def test_store_root_resolution(monkeypatch, tmp_path):
    from snapshotter.store import default_root
    monkeypatch.setenv("MERGEFS_ROOT", str(tmp_path / "env"))
    assert default_root(str(tmp_path / "explicit")) == str(tmp_path / "explicit")
    assert default_root() == str(tmp_path / "env")
    monkeypatch.delenv("MERGEFS_ROOT")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = "/var/lib/mergefs" if os.geteuid() == 0 else str(tmp_path / "xdg" / "mergefs")
    assert default_root() == expected


@pytest.mark.damages_store
def test_schema_version_is_recorded_and_a_newer_one_refused(store):
    from snapshotter.meta import SCHEMA_VERSION
    from snapshotter.store import Store
    (v,) = store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert int(v) == SCHEMA_VERSION
    with meta.write(store.db):
        store.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(FailedPrecondition):
        Store(store.root)


def test_C4_union_merge_cannot_pin_an_input_a_prune_is_removing(store, layers):
    """The race prune-vs-merge: publish re-checks pinned inputs in its transaction."""
    from snapshotter.digest import merge_id
    from snapshotter.meta import Parent, Row
    a, b = imported(store, layers[:2])
    with meta.write(store.db):
        store.db.execute("UPDATE snapshots SET state='deleting' WHERE id=?", (a,))
    staged = store.stage("merge")
    row = Row(id=merge_id([a, b]), kind="merge", strategy="union")
    with pytest.raises(FailedPrecondition):
        store.publish(staged, row, [Parent(a, pin=True), Parent(b, pin=True)], "merge")
    assert store.get(row.id) is None and not staged.path.exists()
