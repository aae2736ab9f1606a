"""The store keeps the image config of an imported or pulled OCI image (issue 9 item 5):
``mergefs bundle`` of a store ref runs what the image's config says."""
from __future__ import annotations

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
