"""C1 under contention: N real processes making the same snapshot at once."""
from __future__ import annotations

import multiprocessing
import os
import subprocess

from .conftest import snapshot_dirs

N = 8


def run_all(cli, *args):
    procs = [subprocess.Popen(cli.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cli.env()) for _ in range(N)]
    outs = [p.communicate(timeout=90) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def test_C1_eight_processes_same_merge_one_snapshot(cli, layers):
    ids = [cli.out("import", p) for p in layers]
    results = run_all(cli, "merge", "--strategy", "farm", *ids)
    assert [r[0] for r in results] == [0] * N, results
    merged = {r[1].strip() for r in results}
    assert len(merged) == 1
    assert len(snapshot_dirs(cli.root)) == len(ids) + 1
    assert len([s for s in cli.json("ls") if s["kind"] == "merge"]) == 1
    assert "store is clean" in cli.out("fsck")


def test_C1_eight_processes_same_import_on_a_fresh_store(cli, layers):
    """Also the store's creation (schema, WAL) races here: the root does not exist yet."""
    results = run_all(cli, "import", layers[0])
    assert [r[0] for r in results] == [0] * N, results
    assert len({r[1] for r in results}) == 1
    assert len(snapshot_dirs(cli.root)) == 1
    assert cli.run("fsck").returncode == 0


def test_C1_eight_processes_same_merge_of_directories(cli, layers):
    """Implicit imports and the merge itself, all racing."""
    results = run_all(cli, "merge", *layers)
    assert [r[0] for r in results] == [0] * N, results
    assert len({r[1] for r in results}) == 1
    assert len(snapshot_dirs(cli.root)) == len(layers) + 1
    assert "store is clean" in cli.out("fsck")


def _open_fresh_stores(root: str, rounds: int, barrier, errors) -> None:
    from snapshotter.store import Store
    for i in range(rounds):
        barrier.wait()
        try:
            Store(os.path.join(root, str(i)), reconcile=False).close()
        except Exception as e:     # reported to the test, which fails on any
            errors.put(f"round {i}: {e!r}")


def test_C1_processes_creating_the_same_store_in_lockstep(tmp_path):
    """The store's creation races in lockstep, round after round. SQLite's busy
    timeout does not cover two connections switching a new database to WAL at
    once (one gets 'database is locked' at once): creation must be serialised."""
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_open_fresh_stores, args=(str(tmp_path), 40, barrier, errors))
             for _ in range(N)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * N
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found
