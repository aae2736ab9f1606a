"""fsck finds each kind of damage, reports it, and repairs only what is safe."""
from __future__ import annotations

import os
import shutil

import pytest

from mergefs.errors import FailedPrecondition
from snapshotter import Snapshotter
from snapshotter.fsck import fsck
from snapshotter.store import Store


def kinds(findings):
    return sorted((f.severity, f.kind) for f in findings)


@pytest.fixture
def populated(store, layers):
    ids = [Snapshotter(store=store).import_dir(p).id for p in layers]
    m = Snapshotter(store=store).merge(ids, strategy="farm").row.id
    return ids, m


def reopen(store) -> Store:
    store.close()
    return Store(store.root, reconcile=False)


def test_fsck_clean_store(store, populated):
    assert fsck(store) == []


def test_fsck_orphaned_staging_dir_is_garbage_swept_on_repair(store, populated):
    orphan = store.staging / "999999999-1-import-deadbeef"
    os.makedirs(orphan / "fs")
    s = reopen(store)
    assert kinds(fsck(s)) == [("garbage", "orphaned-staging")]
    assert fsck(s, repair=True)[0].repaired == "removed"
    assert not orphan.exists() and fsck(s) == []
    s.close()


def test_fsck_live_staging_dir_is_left_alone(store, populated):
    staged = store.stage("merge")          # ours: this process is alive
    assert fsck(store, repair=True) == []
    assert staged.path.exists()
    staged.discard()


def test_fsck_row_without_dir(store, populated):
    ids, m = populated
    shutil.rmtree(store.dir_of(m))
    found = fsck(store)
    assert kinds(found) == [("error", "row-without-dir")] and found[0].subject == m
    fsck(store, repair=True)
    assert store.get(m) is None and fsck(store) == []


def test_fsck_dir_without_row_is_moved_to_lost_and_found(store, populated):
    stray = store.snapshots / ("ab" * 32)
    os.makedirs(stray / "fs")
    (stray / "fs" / "something").write_text("x")
    s = reopen(store)
    assert kinds(fsck(s)) == [("error", "dir-without-row")]
    fsck(s, repair=True)
    assert (s.root / "lost+found" / ("ab" * 32) / "fs" / "something").read_text() == "x"
    assert fsck(s) == []
    s.close()


@pytest.mark.damages_store
def test_fsck_modified_layer_is_reported_never_deleted(store, populated):
    ids, m = populated
    target = store.fs_of(ids[0]) / "etc" / "passwd"
    target.write_text("tampered\n")             # the farm shares this inode, too
    found = fsck(store)
    assert kinds(found) == [("error", "digest-mismatch")] and found[0].subject == ids[0]
    fsck(store, repair=True)
    assert target.read_text() == "tampered\n"  # kept for inspection
    assert store.get(ids[0]).state == "corrupt"
    assert kinds(fsck(store)) == [("error", "corrupt")]      # still not clean
    with pytest.raises(FailedPrecondition):
        Snapshotter(store=store).merge([ids[0], ids[1]])


def test_reimport_replaces_a_corrupt_layer(store, layers, populated):
    ids, _ = populated
    (store.fs_of(ids[0]) / "etc" / "passwd").write_text("tampered\n")
    fsck(store, repair=True)
    assert Snapshotter(store=store).import_dir(layers[0]).id == ids[0]
    assert store.get(ids[0]).state == "committed"
    assert (store.fs_of(ids[0]) / "etc" / "passwd").read_text() == "root:x:0:0\n"
    assert fsck(store) == []


def test_fsck_cli_exit_codes(cli_process, layers):
    """End to end, as a real process."""
    cli = cli_process
    i = cli.out("import", layers[0])
    assert cli.run("fsck").returncode == 0
    shutil.rmtree(cli.root / "snapshots" / i[7:])
    p = cli.run("fsck", check=False)
    assert p.returncode == 1 and "row-without-dir" in p.stdout
    assert cli.run("fsck", "--repair").returncode == 0
    assert cli.run("fsck").returncode == 0


@pytest.mark.damages_store
def test_a_corrupt_layer_can_still_be_inspected(cli, layers):
    i = cli.out("import", layers[0])
    (cli.root / "snapshots" / i[7:] / "fs" / "etc" / "passwd").write_text("x\n")
    cli.run("fsck", "--repair")
    assert cli.json("inspect", i)["state"] == "corrupt"
    assert cli.run("merge", i, layers[1], check=False).returncode == 1


MARK = "trusted.overlay.mergefs-format"


def unmark(store, snapshot_id) -> None:
    """What a store made before the overlay-format mark existed holds."""
    os.removexattr(store.fs_of(snapshot_id), MARK)


def is_marked(store, snapshot_id) -> bool:
    return MARK in os.listxattr(store.fs_of(snapshot_id))


def test_fsck_unmarked_trees_are_reported_and_marked_on_repair(store, populated):
    ids, m = populated
    for i in ids + [m]:
        unmark(store, i)
    for verify in (True, False):               # --fast reports them too
        found = fsck(store, verify_content=verify)
        assert kinds(found) == [("error", "unmarked-layer")] * (len(ids) + 1)
        assert {f.subject for f in found} == set(ids) | {m}
    repaired = fsck(store, repair=True, verify_content=False)   # repair verifies anyway
    assert all(f.repaired.startswith("marked overlay format") for f in repaired), repaired
    assert all(is_marked(store, i) for i in ids + [m])
    assert fsck(store) == []


@pytest.mark.damages_store
def test_fsck_repair_never_marks_an_unverifiable_tree(store, populated):
    """A layer whose content no longer matches its digest, and a farm holding a .wh.*
    name (a guessing reader would read it as a whiteout): reported, left unmarked."""
    ids, m = populated
    unmark(store, ids[0])
    (store.fs_of(ids[0]) / "etc" / "passwd").write_text("tampered\n")
    unmark(store, m)
    (store.fs_of(m) / ".wh.keep").write_text("a file, or a whiteout?\n")
    assert {(f.kind, f.subject) for f in fsck(store)} == {
        ("digest-mismatch", ids[0]), ("unmarked-layer", ids[0]), ("unmarked-layer", m)}
    fast = {(f.kind, f.subject): f for f in fsck(store, repair=True, verify_content=False)}
    f = fast[("unmarked-layer", ids[0])]
    assert not f.repaired and "left unmarked" in f.detail
    found = {(f.kind, f.subject): f for f in fsck(store, repair=True)}
    assert found[("digest-mismatch", ids[0])].repaired.startswith("marked corrupt")
    f = found[("unmarked-layer", m)]
    assert not f.repaired and "left unmarked" in f.detail
    assert not is_marked(store, ids[0]) and not is_marked(store, m)
    assert ("unmarked-layer", m) in {(f.kind, f.subject) for f in fsck(store)}
