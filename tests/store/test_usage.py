"""du is hardlink-aware (C3) and agrees with coreutils du."""
from __future__ import annotations

import re
import subprocess

from snapshotter import Snapshotter
from snapshotter.usage import measure


def coreutils_du(path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def dir_blocks(path) -> int:
    """Bytes of the directories only (what a farm owns)."""
    out = subprocess.run(["find", str(path), "-type", "d", "-printf", "%b\\n"],
                         capture_output=True, text=True, check=True)
    return sum(int(x) * 512 for x in out.stdout.split())


def test_C3_store_total_equals_coreutils_du(store, layers):
    ids = [Snapshotter(store=store).import_dir(p).id for p in layers]
    Snapshotter(store=store).merge(ids, strategy="farm")
    Snapshotter(store=store).merge(ids[:2], strategy="union")
    u = measure(store)
    assert u.total == coreutils_du(store.root)
    assert u.exclusive + u.shared + u.overhead == u.total


def test_C3_each_snapshot_exclusive_plus_shared_equals_du_of_its_dir(store, layers):
    ids = [Snapshotter(store=store).import_dir(p).id for p in layers]
    Snapshotter(store=store).merge(ids, strategy="farm")
    for su in measure(store).snapshots:
        assert su.exclusive + su.shared == coreutils_du(store.dir_of(su.row.id)), su.row.kind


def test_C3_farm_merge_owns_only_its_directories(store, layers):
    ids = [Snapshotter(store=store).import_dir(p).id for p in layers]
    m = Snapshotter(store=store).merge(ids, strategy="farm").row.id
    su = {s.row.id: s for s in measure(store).snapshots}[m]
    meta_json = coreutils_du(store.dir_of(m) / "meta.json") + \
        coreutils_du(store.dir_of(m) / "holders.json")
    assert su.exclusive == dir_blocks(store.dir_of(m)) + meta_json
    assert su.shared > 0


def test_C3_shared_bytes_become_exclusive_when_the_input_goes(store, layers):
    ids = [Snapshotter(store=store).import_dir(p).id for p in layers]
    m = Snapshotter(store=store).merge(ids[:1] + ids[1:2], strategy="farm").row.id
    before = {s.row.id: s for s in measure(store).snapshots}[m]
    Snapshotter(store=store).remove(ids[0])
    after = {s.row.id: s for s in measure(store).snapshots}[m]
    assert after.exclusive > before.exclusive
    assert after.exclusive + after.shared == coreutils_du(store.dir_of(m))


def test_du_cli_lists_parents_separated_by_semicolons(cli, layers):
    ids = [cli.out("import", p) for p in layers]
    m = cli.out("merge", "--strategy", "farm", *ids)
    report = cli.json("du")
    rec = {r["id"]: r for r in report["snapshots"]}[m]
    assert rec["parents"] == ";".join(ids)
    assert rec["description"] == "merge of " + ";".join(i[7:19] for i in ids)
    assert rec["reclaimable"] is False
    assert report["total"] > 0
    text = cli.out("du", "-v")
    assert f"Parents:      {';'.join(ids)}" in text and "Total:" in text
    # like buildctl du -v: dates and sizes for people, not epoch floats and byte counts
    assert re.search(r"^Created: +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", text, re.M)
    assert re.search(r"^Last used: +\d+ seconds ago$", text, re.M)
    assert re.search(r"^Exclusive: +[\d.]+k?B$", text, re.M)
