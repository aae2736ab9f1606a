"""Issue 11, store items: id-shaped names (3), failed imports (5), lost metadata (6),
damaged, read-only and full stores (10). Each test failed before its fix."""
from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import tarfile

import pytest

from mergefs.errors import InvalidArgument
from snapshotter import Snapshotter
from snapshotter.gc import prune

from .conftest import snapshot_dirs
from ..conftest import needs


# -- 11.3: names that shadow ids, empty names, control characters -----------------------
def test_11_3_a_name_cannot_shadow_an_id(cli, layers, tmp_path):
    a = cli.out("import", layers[0])
    b = cli.out("import", layers[1])
    for bad in (a, a[len("sha256:"):], a[len("sha256:"):][:12], "", "x\ny", "tab\there", "\x7f"):
        p = cli.run("import", layers[2], "--name", bad, check=False)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, (bad, p.stderr)
        assert "name" in p.stderr
    assert cli.json("inspect", a)["id"] == a
    assert cli.json("inspect", b)["names"] == []
    assert len(snapshot_dirs(cli.root)) == 2          # the refused imports stored nothing


def test_11_3_full_ids_are_looked_up_before_names(store, layers):
    sn = Snapshotter(store=store)
    a = sn.import_dir(layers[0]).id
    b = sn.import_dir(layers[1]).id
    from snapshotter import meta
    with meta.write(store.db):                   # a store written before names were checked
        meta.add_name(store.db, a, b)
    assert store.resolve(a).id == a


def test_11_3_snapshotter_keys_and_names_are_checked(store):
    sn = Snapshotter(store=store)
    for bad in ("", "sha256:" + "0" * 64, "a\0b"):
        with pytest.raises(InvalidArgument):
            sn.prepare(bad)
    sn.prepare("k")
    with pytest.raises(InvalidArgument):
        sn.commit("sha256:abc", "k")


# -- 11.5: a failed multi-layer import leaves its layers unreferenced -----------------------
def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def oci_layout(path, layers: list[bytes], corrupt: int | None = None, tag: str = "t") -> None:
    """A minimal OCI image layout; layer ``corrupt`` has bytes that do not match its digest."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, stored: bytes | None = None) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data if stored is None else stored)
        return {"digest": "sha256:" + digest, "size": len(data)}
    descs = []
    for i, data in enumerate(layers):
        bad = None if i != corrupt else data[:-1] + bytes([data[-1] ^ 0xFF])
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(data, bad)})
    config = blob(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [d["digest"] for d in descs]}}).encode())
    manifest = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": descs}).encode())
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


def test_11_5_failed_image_import_leaves_layers_for_prune(cli, tmp_path):
    layers = [_tar({"a": b"first"}), _tar({"b": b"second"}), _tar({"c": b"third"})]
    oci_layout(tmp_path / "bad", layers, corrupt=2)
    p = cli.run("import", tmp_path / "bad", check=False)
    assert p.returncode != 0 and p.stderr.count("\n") == 1, p.stderr
    stored = cli.json("ls")
    assert len(stored) == 2 and all(s["refs"] == [] for s in stored)
    assert len(cli.json("prune")["deleted"]) == 2
    oci_layout(tmp_path / "good", layers)
    out = cli.json("import", tmp_path / "good")         # a good import holds the CLI's refs
    assert [l["refs"] for l in out["layers"]] == [["cli"]] * 3 and out["image"]["refs"] == ["cli"]


def test_11_5_refs_of_a_dead_importer_are_dropped_at_open(store, layers):
    from snapshotter import meta
    a = Snapshotter(store=store, holder=None).import_dir(layers[0]).id
    with meta.write(store.db):        # what a kill -9 in the middle of an import leaves
        meta.add_ref(store.db, a, "import:999999999-1-abc")
    store.close()
    with Snapshotter(store.root) as sn:
        assert any("import:999999999-1-abc" in line for line in sn.reconciled)
        assert sn.inspect(a)["refs"] == []


# -- 11.6: a lost or emptied meta.db -------------------------------------------------------
def _named_store(cli, layers):
    ids = [cli.out("import", l, "--name", f"n{i}") for i, l in enumerate(layers)]
    m = cli.out("merge", "n0", "n1", "--strategy", "union", "--name", "img")
    cli.out("release", ids[2])
    return ids, m


def test_11_6_lost_meta_db_comes_back_with_names_and_refs(cli, layers):
    ids, m = _named_store(cli, layers)
    before = {d["id"]: (d["names"], d["refs"]) for d in cli.json("ls")}
    for f in ("meta.db", "meta.db-wal", "meta.db-shm"):
        if (cli.root / f).exists():
            (cli.root / f).unlink()
    after = {d["id"]: (d["names"], d["refs"]) for d in cli.json("ls")}
    assert after == before
    assert cli.json("prune")["deleted"] == []


def test_11_6_emptied_tables_prune_refuses_fsck_repair_restores(cli, layers):
    ids, m = _named_store(cli, layers)
    before = {d["id"]: (d["names"], d["refs"]) for d in cli.json("ls")}
    db = sqlite3.connect(cli.root / "meta.db")
    db.executescript("DELETE FROM names; DELETE FROM refs;")
    db.close()
    p = cli.run("prune", "--all", "--json")
    assert json.loads(p.stdout)["deleted"] == [] and "fsck --repair" in p.stderr
    assert cli.run("fsck", check=False).returncode == 1
    assert "lost-holders" in cli.out("fsck", "--repair")
    assert cli.run("fsck").returncode == 0
    after = {d["id"]: (d["names"], d["refs"]) for d in cli.json("ls")}
    assert after == before


def test_11_6_labels_and_parents_of_names_come_back(root):
    with Snapshotter(root) as sn:
        sn.prepare("default/1/a", labels={"k": "v"})
        base = sn.commit("default/1/base", "default/1/a", labels={"c": "1"})
        sn.prepare("default/1/b", base.name, labels={"x": "y"})
        before = sorted(sn.walk(), key=lambda i: i.name)
    for f in ("meta.db", "meta.db-wal", "meta.db-shm"):
        if (root / f).exists():
            (root / f).unlink()
    with Snapshotter(root) as sn:
        assert sorted(sn.walk(), key=lambda i: i.name) == before


# -- 11.10: damaged, read-only and full stores ----------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_11_10_damaged_meta_db_one_line_and_fsck_repair_rebuilds(cli_process, layers, damage):
    cli = cli_process                   # end to end: a real process
    ids, m = _named_store(cli, layers)
    before = {d["id"]: (d["names"], d["refs"]) for d in cli.json("ls")}
    path = cli.root / "meta.db"
    if damage == "garbage":
        path.write_bytes(b"this is not a database\n" * 500)
    else:
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    for verb in (("ls",), ("import", layers[0])):
        p = cli.run(*verb, check=False)
        assert p.returncode == 1, (verb, p.returncode, p.stderr)
        assert p.stderr.count("\n") == 1 and "fsck --repair" in p.stderr, (verb, p.stderr)
    p = cli.run("fsck", check=False)
    assert p.returncode == 1 and "damaged-metadata" in p.stdout and "--repair" in p.stdout
    p = cli.run("fsck", "--repair")
    assert "damaged-metadata" in p.stdout
    assert any(n.startswith("meta.db.damaged-") for n in os.listdir(cli.root))
    assert {d["id"]: (d["names"], d["refs"]) for d in cli.json("ls")} == before
    assert cli.run("fsck").returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs at tmp_path/fs, unmounted at teardown (also on failure)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt]).returncode != 0:
            subprocess.run(["umount", "-l", mnt])


def _fill(path) -> None:
    """Fill the filesystem: big writes, then small ones, until ENOSPC."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


@needs("root")
def test_11_10_full_store_filesystem_is_exit_5(small_fs, layers):
    from .conftest import Cli
    cli = Cli(small_fs / "store")
    a = cli.out("import", layers[0], "--name", "a")
    _fill(small_fs)
    for verb in (("import", layers[1]), ("release", a), ("merge", "a", layers[2])):
        p = cli.run(*verb, check=False)
        assert p.returncode == 5, (verb, p.returncode, p.stderr)
        assert p.stderr.count("\n") == 1 and "space" in p.stderr.lower(), (verb, p.stderr)
    (small_fs / "filler").unlink()
    assert cli.run("fsck").returncode == 0
    assert cli.json("inspect", "a")["refs"] == ["cli"]        # the failed release changed nothing


@needs("root")
def test_11_10_read_only_store_is_exit_6(small_fs, layers):
    from .conftest import Cli
    cli = Cli(small_fs / "store")
    cli.out("import", layers[0], "--name", "a")
    subprocess.run(["mount", "-o", "remount,ro", small_fs], check=True)
    for verb in (("ls",), ("import", layers[1]), ("fsck",)):
        p = cli.run(*verb, check=False)
        assert p.returncode == 6, (verb, p.returncode, p.stderr)
        assert p.stderr.count("\n") == 1 and "read-only" in p.stderr.lower(), (verb, p.stderr)
