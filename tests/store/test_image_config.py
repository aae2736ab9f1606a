"""The store keeps the image config of an imported or pulled OCI image (issue 9 item 5):
``mergefs bundle`` of a store ref runs what the image's config says."""
from __future__ import annotations

import json
import subprocess

import pytest

from mergefs.oci import export_layout
from snapshotter import Snapshotter

from ..conftest import needs
from .conftest import Cli

pytestmark = needs("umoci")


def umoci_image(where, layers, ref: str, greeting: str):
    """An OCI layout of ``layers`` whose config umoci set: Entrypoint, Cmd, Env, WorkingDir, User."""
    export_layout([str(p) for p in layers], where, ref=ref)
    subprocess.run(["umoci", "config", "--image", f"{where}:{ref}",
                    "--config.entrypoint", "/bin/sh", "--config.entrypoint", "-c",
                    "--config.cmd", "echo $GREETING; pwd; id -u",
                    "--config.env", f"GREETING={greeting}", "--config.workingdir", "/etc",
                    "--config.user", "65534"], check=True, capture_output=True)
    return where


def test_import_keeps_the_config_by_name_and_id(root, layers, tmp_path):
    a = umoci_image(tmp_path / "a", layers, "app", "from-a")
    b = umoci_image(tmp_path / "b", layers, "other", "from-b")    # same layers, other config
    with Snapshotter(root) as sn:
        image = sn.import_(str(a)).image
        sn.import_(str(b))
        cfg = sn.image_config("app")["config"]
        assert cfg["Entrypoint"] == ["/bin/sh", "-c"] and cfg["WorkingDir"] == "/etc"
        assert cfg["Env"] == ["GREETING=from-a"] and cfg["User"] == "65534"
        assert sn.image_config("other")["config"]["Env"] == ["GREETING=from-b"]
        assert sn.image_config(image.id)["config"]["Env"] == ["GREETING=from-b"]  # the last one
        assert "rootfs" not in sn.image_config("app")
        assert sn.image_config(sn.layers(image)[0]) is None     # a layer of it is no image
        sn.release(image.id)
        for name in ("app", "other"):
            sn.remove(name)
        sn.prune(all_named=True)
        assert sn.store.db.execute("SELECT COUNT(*) FROM image_configs").fetchone()[0] == 0


@needs("docker-registry", "skopeo")
@pytest.mark.timeout(180)
def test_pull_keeps_the_config(layers, tmp_path):
    from mergefs.testing.registry import RegistryServer
    image = umoci_image(tmp_path / "img", layers, "app", "pulled")
    server = RegistryServer(tmp_path / "registry").start()
    try:
        target = f"{server.address}/umoci/app:v1"
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{image}:app",
                        f"docker://{target}"], check=True, capture_output=True, timeout=120)
        cli = Cli(tmp_path / "store")
        cli.run("pull", target, "--name", "pulled")
    finally:
        server.stop()
    with Snapshotter(tmp_path / "store") as sn:
        assert sn.image_config("pulled")["config"]["Env"] == ["GREETING=pulled"]


@needs("fuse")                      # bundle mounts the rootfs (a union mount)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("loss", ["deleted", "damaged"])
def test_lost_meta_db_keeps_the_config_through_fsck_repair(cli, layers, tmp_path, loss):
    """The config is recorded beside the snapshot (holders.json), so rebuilding a lost or
    damaged meta.db from the snapshot directories keeps what ``bundle`` runs."""
    image = umoci_image(tmp_path / "img", layers, "app", "kept")
    cli.run("import", image, "--name", "app")
    for f in ("meta.db", "meta.db-wal", "meta.db-shm"):
        if (cli.root / f).exists():
            (cli.root / f).unlink()
    if loss == "damaged":
        (cli.root / "meta.db").write_bytes(b"this is not a database\n" * 500)
    cli.run("fsck", "--repair")
    b = tmp_path / "bundle"
    cli.run("bundle", "app", b)
    try:
        process = json.loads((b / "config.json").read_text())["process"]
    finally:
        cli.run("unbundle", b)
    assert process["args"][:2] == ["/bin/sh", "-c"] and process["cwd"] == "/etc"
    assert "GREETING=kept" in process["env"] and process["user"]["uid"] == 65534
    with Snapshotter(cli.root) as sn:
        assert sn.image_config("app")["config"]["Env"] == ["GREETING=kept"]


def test_fsck_records_a_config_holders_json_lacks(cli, layers, tmp_path):
    """A store made before holders.json recorded image configs: fsck says so, repair
    records them, and a rebuilt meta.db then keeps them."""
    image = umoci_image(tmp_path / "img", layers, "app", "old")
    cli.run("import", image, "--name", "app")
    with Snapshotter(cli.root) as sn:
        sid = sn.store.resolve("app").id
        record = sn.store.dir_of(sid) / "holders.json"
    data = json.loads(record.read_text())
    assert set(data.pop("image_configs")) == {"app", sid}
    record.write_text(json.dumps(data))             # what such a store has on disk
    p = cli.run("fsck", check=False)
    assert p.returncode == 1 and "unrecorded-image-config" in p.stdout
    assert "recorded in holders.json" in cli.out("fsck", "--repair")
    assert cli.run("fsck").returncode == 0
    (cli.root / "meta.db").write_bytes(b"this is not a database\n" * 500)
    cli.run("fsck", "--repair")
    with Snapshotter(cli.root) as sn:
        assert sn.image_config("app")["config"]["Env"] == ["GREETING=old"]
