"""Lazy pull: pulled layers stay packed (their blob) until first use, then unpack once.

Real docker-registry on 127.0.0.1 (``RegistryServer``), two store roots as two
machines (A imports, merges and pushes; B pulls), as in test_registry.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from snapshotter.digest import tree_digest

from ..conftest import needs
from .conftest import Cli
from .test_registry import _app_on, _export_digest, _skopeo, a, b, registry  # noqa: F401

pytestmark = [
    pytest.mark.timeout(180),
    needs("docker-registry", "skopeo"),
]


def _rows(cli: Cli) -> dict[str, dict]:
    return {d["id"]: d for d in cli.json("ls")}


def _has_tree(cli: Cli, sid: str) -> bool:
    return (cli.root / "snapshots" / sid[7:] / "fs").is_dir()


def _pushed(a: Cli, registry, layers, tag="v1") -> tuple[str, str, dict]:
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:{tag}"
    return mid, target, json.loads(a.run("push", "app", target, "--json").stdout)


def test_pull_keeps_layers_packed_and_a_merge_unpacks_each_once(a, b, registry, layers,
                                                                 tmp_path):
    mid, target, pushed = _pushed(a, registry, layers)
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    ids = pulled["layers"]
    assert pulled["image"] == mid and pulled["packed"] == ids == [x["layer"] for x in
                                                                   pushed["layers"]]
    rows = _rows(b)
    for x in pushed["layers"]:                      # packed: the blob, no tree
        assert not _has_tree(b, x["layer"])
        assert rows[x["layer"]]["packed"] == x["digest"]
        assert (b.root / "blobs" / "sha256" / x["digest"][7:]).stat().st_size == x["size"]
    assert "[packed: sha256:" in b.out("ls")
    du = json.loads(b.out("du", "--json"))
    packed = {s["id"]: s for s in du["snapshots"] if s["kind"] == "layer (packed)"}
    assert set(packed) == set(ids)
    blob_bytes = {x["layer"]: (b.root / "blobs" / "sha256" / x["digest"][7:]).stat().st_blocks
                  * 512 for x in pushed["layers"]}
    assert du["packed_blobs"] == du["blobs"] == sum(blob_bytes.values())
    assert all(packed[i]["exclusive"] > blob_bytes[i] for i in ids)    # + meta.json ...
    assert b.run("fsck").returncode == 0

    assert b.out("merge", "--strategy", "farm", *ids) == mid    # unpacks, same id
    a_rows = _rows(a)
    rows = _rows(b)
    for i in ids:
        assert _has_tree(b, i) and rows[i]["packed"] is None
        assert rows[i]["tree_digest"] == a_rows[i]["tree_digest"]
        assert rows[i]["entries"] == a_rows[i]["entries"] > 0
    assert _export_digest(b, mid, tmp_path / "on-b") == _export_digest(a, mid, tmp_path / "on-a")
    before = {i: os.stat(b.root / "snapshots" / i[7:] / "fs").st_ino for i in ids}
    b.run("export", ids[0], "-o", tmp_path / "again")           # a second use: no unpack
    b.run("merge", "--strategy", "farm", ids[0], ids[1])
    assert {i: os.stat(b.root / "snapshots" / i[7:] / "fs").st_ino for i in ids} == before
    assert os.listdir(b.root / "staging") == []
    report = b.json("fsck")
    assert report["clean"] and report["findings"] == [], report


def test_pull_unpack_extracts_at_pull_time(a, b, registry, layers):
    mid, target, _ = _pushed(a, registry, layers)
    pulled = json.loads(b.run("pull", target, "--unpack", "--json").stdout)
    assert pulled["image"] == mid and pulled["packed"] == []
    assert all(_has_tree(b, i) for i in pulled["layers"])
    assert b.json("fsck")["findings"] == []


def test_pull_unpack_unpacks_layers_already_there_packed(a, b, registry, layers):
    mid, target, _ = _pushed(a, registry, layers)
    b.run("pull", target)
    pulled = json.loads(b.run("pull", target, "--unpack", "--json").stdout)
    assert pulled["fetched"] == [] and pulled["packed"] == []
    assert all(_has_tree(b, i) for i in pulled["layers"])


def test_views_and_mount_specs_of_a_packed_image_unpack_it(a, b, registry, layers):
    """containerd's View over a pulled image (and every other reader of trees) gets trees."""
    from snapshotter import Snapshotter
    mid, target, _ = _pushed(a, registry, layers)
    b.run("pull", target)
    with Snapshotter(b.root) as sn:
        spec = sn.view("ctr-view", "app:v1")
        assert all(os.path.isdir(d) for d in spec.lowers) and len(spec.lowers) == 3
        assert [tree_digest(d).digest for d in spec.lowers] == \
            [r["tree_digest"] for r in (_rows(a)[i] for i in sn.layers(sn.resolve("app:v1")))]
        sn.remove("ctr-view")


def test_push_of_a_packed_layer_sends_its_blob_without_unpacking(a, b, registry, layers):
    mid, target, pushed = _pushed(a, registry, layers)
    b.run("pull", target)
    again = json.loads(b.run("push", "app:v1", f"{registry.address}/mergefs/again:v1",
                             "--json").stdout)
    assert again["compressed"] == 0
    assert [x["digest"] for x in again["layers"]] == [x["digest"] for x in pushed["layers"]]
    assert not any(_has_tree(b, x["layer"]) for x in pushed["layers"])   # still packed
    c = Cli(b.root.parent / "machine-c")            # and it carries the ids on
    assert json.loads(c.run("pull", f"{registry.address}/mergefs/again:v1",
                            "--json").stdout)["image"] == mid


def test_prune_of_unreferenced_packed_layers_removes_their_blobs(a, b, registry, layers):
    _, target, pushed = _pushed(a, registry, layers)
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    blobs = b.root / "blobs" / "sha256"
    assert len(os.listdir(blobs)) == 3
    b.run("release", "app:v1", *pulled["layers"])
    dry = json.loads(b.run("prune", "--all", "--dry-run", "--json").stdout)
    assert dry["freed"] >= sum(x["size"] for x in pushed["layers"])
    b.run("prune", "--all")
    assert b.json("ls") == [] and os.listdir(blobs) == []
    assert b.json("fsck")["findings"] == []


# -- a blob that does not unpack to what the image says --------------------------------------
def _bad_diff_id_image(a: Cli, registry, tmp_path: Path, index: int) -> str:
    """``app`` exported as a layout, the config's diffID of layer ``index`` replaced, pushed by
    skopeo (which checks blob digests, not diffIDs): a registry image whose blob is intact
    but does not decompress to the diffID its config names."""
    layout = tmp_path / "bad-layout"
    a.run("export", "app", "-o", layout, "--format", "oci")
    bdir = layout / "blobs" / "sha256"
    index_json = json.loads((layout / "index.json").read_text())
    mdesc = index_json["manifests"][0]
    manifest = json.loads((bdir / mdesc["digest"][7:]).read_text())
    config = json.loads((bdir / manifest["config"]["digest"][7:]).read_text())
    config["rootfs"]["diff_ids"][index] = "sha256:" + "5" * 64

    def put(obj) -> dict:
        data = json.dumps(obj).encode()
        digest = hashlib.sha256(data).hexdigest()
        (bdir / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}
    manifest["config"].update(put(config))
    mdesc.update(put(manifest))
    (layout / "index.json").write_text(json.dumps(index_json))
    target = f"{registry.address}/bad/app:v1"
    _skopeo("copy", "--dest-tls-verify=false",
            f"oci:{layout}:{mdesc['annotations']['org.opencontainers.image.ref.name']}",
            f"docker://{target}")
    return target


def test_a_blob_not_matching_its_diff_id_is_refused_at_unpack(a, b, registry, layers, tmp_path):
    _app_on(a, layers)
    target = _bad_diff_id_image(a, registry, tmp_path, 1)
    pulled = json.loads(b.run("pull", target, "--json").stdout)    # lazy: not checked yet
    bad = pulled["layers"][1]
    assert bad == "sha256:" + "5" * 64               # no annotations: stored under the diffID
    p = b.run("export", pulled["image"], "-o", tmp_path / "out", check=False)
    assert p.returncode == 1 and not (tmp_path / "out").exists()
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "mergefs: error: packed layer 555555555555" in err
    assert "diffID" in err and "marked corrupt" in err and "pull the image again" in err
    rows = _rows(b)                                  # nothing else removed or changed
    assert rows[bad]["state"] == "corrupt" and not _has_tree(b, bad)
    assert set(rows) == set(pulled["layers"]) | {pulled["image"]}
    assert len(os.listdir(b.root / "blobs" / "sha256")) == 3
    assert os.listdir(b.root / "staging") == []
    b.run("export", pulled["layers"][0], "-o", tmp_path / "good")   # the others still work
    p = b.run("merge", "--strategy", "farm", *pulled["layers"], check=False)
    assert p.returncode == 1 and "corrupt" in p.stderr and len(p.stderr.splitlines()) == 1
    report = json.loads(b.run("fsck", "--json", check=False).stdout)
    assert not report["clean"]
    assert [(f["kind"], f["subject"]) for f in report["findings"]] == [("corrupt", bad)]
    assert "layer diffID is sha256:" in report["findings"][0]["detail"]
    assert b.run("fsck", "--repair", check=False).returncode == 1   # kept, still reported
    assert _rows(b)[bad]["state"] == "corrupt"


def test_pull_unpack_refuses_the_same_blob_and_stores_nothing_of_it(a, b, registry, layers,
                                                                     tmp_path):
    _app_on(a, layers)
    target = _bad_diff_id_image(a, registry, tmp_path, 2)
    p = b.run("pull", target, "--unpack", check=False)
    assert p.returncode == 1 and "diffID" in p.stderr
    assert "sha256:" + "5" * 64 not in _rows(b)


def test_a_corrupt_packed_layer_is_replaced_by_pulling_again(a, b, registry, layers, tmp_path):
    """The blob in B's store damaged after the pull: unpack refuses it (digest), marks it
    corrupt; a second pull fetches it again and replaces the corrupt layer."""
    mid, target, pushed = _pushed(a, registry, layers)
    b.run("pull", target)
    first = pushed["layers"][0]
    path = b.root / "blobs" / "sha256" / first["digest"][7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = json.loads(b.run("fsck", "--json", check=False).stdout)
    assert [(f["kind"], f["subject"]) for f in report["findings"]] == \
        [("packed-blob-digest", first["layer"])]
    assert b.json("fsck", "--fast")["findings"] == []          # --fast does not re-hash blobs
    p = b.run("merge", "--strategy", "farm", "app:v1", check=False)
    assert p.returncode == 1 and "does not match its digest" in p.stderr
    assert _rows(b)[first["layer"]]["state"] == "corrupt"
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    assert pulled["fetched"] == [first["digest"]] and pulled["image"] == mid
    assert b.out("merge", "--strategy", "farm", "app:v1") == mid
    assert b.json("fsck")["findings"] == []


def test_fsck_repairs_packed_layers(a, b, registry, layers):
    _, target, pushed = _pushed(a, registry, layers)
    b.run("pull", target)
    top = pushed["layers"][2]
    with open(b.root / "blobs" / "sha256" / top["digest"][7:], "r+b") as f:
        f.truncate(10)
    report = json.loads(b.run("fsck", "--fast", "--json", check=False).stdout)
    assert [(f["kind"], f["severity"]) for f in report["findings"]] == \
        [("packed-blob-size", "error")]
    repaired = json.loads(b.run("fsck", "--repair", "--fast", "--json",
                                check=False).stdout)["findings"]
    assert repaired[0]["repaired"].startswith("marked corrupt")
    assert _rows(b)[top["layer"]]["state"] == "corrupt"


# -- crashes -----------------------------------------------------------------------------
@pytest.mark.parametrize("step", ["unpack:mid-extract", "unpack:after-extract",
                                  "unpack:after-rename"])
def test_sigkill_during_unpack_leaves_the_layer_packed_and_usable(a, b, registry, layers,
                                                                  tmp_path, step):
    mid, target, pushed = _pushed(a, registry, layers)
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    p = b.run("merge", "--strategy", "farm", *pulled["layers"], check=False,
              MERGEFS_TEST_KILL_AT=step)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    first = pulled["layers"][0]
    if step == "unpack:after-rename":               # a verified tree beside a packed row
        assert _has_tree(b, first)
        assert b.run("ls", "--json").returncode == 0
        assert _rows(b)[first]["packed"] is not None
        report = b.json("fsck")
        assert report["clean"], report
        assert [f["kind"] for f in report["findings"]] == ["interrupted-unpack"]
    else:                                           # the half-made tree is in staging only
        staged = [e for e in os.listdir(b.root / "staging") if "-unpack-" in e]
        assert len(staged) == 1 and not _has_tree(b, first)
        assert (b.root / "staging" / staged[0] / "fs").is_dir()
        report = b.json("fsck")
        assert report["clean"] and {f["kind"] for f in report["findings"]} == \
            {"orphaned-staging"}, report
        b.run("ls")                                 # swept at open: packed as before
        assert os.listdir(b.root / "staging") == []
        assert _rows(b)[first]["packed"] == pushed["layers"][0]["digest"]
    assert b.out("merge", "--strategy", "farm", *pulled["layers"]) == mid
    assert _export_digest(b, mid, tmp_path / "on-b") == _export_digest(a, mid, tmp_path / "on-a")
    assert b.json("fsck")["findings"] == []


def test_concurrent_first_uses_unpack_once(a, b, registry, layers, monkeypatch):
    """Four threads ask for the same packed layer's tree at once: one unpack, one tree."""
    import threading
    from snapshotter import packed
    from snapshotter.store import Store
    _, target, pushed = _pushed(a, registry, layers)
    b.run("pull", target)
    lid = pushed["layers"][0]["layer"]
    calls = []
    real = packed._extract

    def counted(*args):
        calls.append(threading.get_ident())
        return real(*args)
    monkeypatch.setattr(packed, "_extract", counted)
    with Store(b.root) as store:
        got, errors = [], []

        def use():
            try:
                got.append(store.layer_tree(lid))
            except BaseException as e:       # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=use) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and len(calls) == 1
        assert got == [store.fs_of(lid)] * 4 and store.get(lid).packed is None


@pytest.mark.timeout(90)
@needs("fuse")
def test_mount_of_a_packed_image_unpacks_it_and_serves_the_pushed_tree(a, b, registry, layers,
                                                                       tmp_path):
    import subprocess
    from mergefs.union import server
    mid, target, pushed = _pushed(a, registry, layers)
    b.run("pull", target)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        b.run("mount", "--log", tmp_path / "log", "app:v1", mnt)
        assert (mnt / "etc" / "motd").read_bytes() == b"hello\n"
        assert (mnt / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho mid\n"
        assert not (mnt / "etc" / "group").exists()                # mid's whiteout
        assert sorted(os.listdir(mnt / "var" / "cache")) == ["fresh"]   # top's opaque dir
    finally:
        if server.is_mounted(str(mnt)):
            b.run("umount", mnt, check=False)
        if server.is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert all(_has_tree(b, x["layer"]) for x in pushed["layers"])


def test_one_copy_pull_keeps_finished_layers_when_a_blob_fails(a, b, registry, layers):
    """An empty store pulls with one skopeo copy (snapshotter.pullcopy): a blob the registry
    serves corrupt fails the copy; every other layer is kept, and the retry, once the
    registry is fixed, downloads only that blob."""
    from mergefs.testing.registry import blob_gets
    mid, target, pushed = _pushed(a, registry, layers)
    bad = pushed["layers"][1]
    path = registry.blob_path(bad["digest"])
    good = path.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    p = b.run("pull", target, "--retries", "0", check=False)
    assert p.returncode == 1 and "digest" in p.stderr.lower()
    kept = set(_rows(b))
    assert kept == {pushed["layers"][0]["layer"], pushed["layers"][2]["layer"]}
    path.write_bytes(good)
    mark = registry.mark()
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    assert pulled["image"] == mid and pulled["fetched"] == [bad["digest"]]
    assert blob_gets(registry.since(mark), {x["digest"] for x in pushed["layers"]}) == \
        [bad["digest"]]
    assert os.listdir(b.root / "staging") == []
    assert b.json("fsck")["findings"] == []


def test_one_copy_pull_into_a_store_with_two_of_three_layers_fetches_one_blob(
        a, b, registry, layers):
    """B has two of the three layers, pulled (so with their blobs, which seed the copy):
    the one copy of app downloads the third blob only."""
    from mergefs.testing.registry import blob_gets
    mid, target, pushed = _pushed(a, registry, layers)
    two = f"{registry.address}/mergefs/two:v1"
    a.run("merge", "--strategy", "union", "--name", "two", "base", "mid")
    a.run("push", "two", two)
    assert len(json.loads(b.run("pull", two, "--json").stdout)["fetched"]) == 2
    mark = registry.mark()
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    third = pushed["layers"][2]["digest"]
    assert pulled["fetched"] == [third] and pulled["image"] == mid
    assert blob_gets(registry.since(mark), {x["digest"] for x in pushed["layers"]}) == [third]
    assert os.listdir(b.root / "staging") == []


def test_a_union_merge_over_packed_layers_counts_their_entries_once_unpacked(
        a, b, registry, layers, tmp_path):
    """A merge's entries and bytes are its inputs' sums: the image record a lazy pull makes
    over packed layers (which have none yet) gets them when the layers are unpacked."""
    mid, target, pushed = _pushed(a, registry, layers)
    b.run("pull", target)
    ids = [x["layer"] for x in pushed["layers"]]
    b.run("export", "app:v1", "-o", tmp_path / "out")          # unpacks every layer
    rows = _rows(b)
    assert all(rows[i]["packed"] is None for i in ids)
    for field in ("entries", "bytes"):
        assert rows[mid][field] == sum(rows[i][field] for i in ids) > 0, field
        assert rows[mid][field] == _rows(a)[mid][field], field
    journal = json.loads((b.root / "snapshots" / mid[7:] / "meta.json").read_text())["row"]
    assert (journal["entries"], journal["bytes"]) == (rows[mid]["entries"], rows[mid]["bytes"])


def test_import_of_an_image_whose_layers_are_packed_unpacks_them_once(a, b, registry, layers,
                                                                       tmp_path):
    """The layers of an OCI layout B pulled lazily before (skopeo pushed it: no annotations,
    so B keeps them under their diffIDs): importing the layout reuses them, the upper ones
    (whose unnamed dirs may take their lowers' attributes) unpacked in place once, not
    extracted again beside them."""
    _app_on(a, layers)
    a.run("export", "app", "-o", tmp_path / "layout", "--format", "oci")
    target = f"{registry.address}/skopeo/app:v1"
    _skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:app",
            f"docker://{target}")
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    assert pulled["packed"] == pulled["layers"]
    imported = json.loads(b.run("import", tmp_path / "layout", "--json").stdout)
    assert [x["id"] for x in imported["layers"]] == pulled["layers"]
    rows = _rows(b)
    assert all(rows[i]["packed"] is None and _has_tree(b, i) for i in pulled["layers"][1:])
    assert b.json("fsck")["findings"] == []
