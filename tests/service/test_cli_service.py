"""The mergefs CLI uses a running service: `mount REF MNT` is a bind of a view; `ps`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .conftest import needs_root

pytestmark = [needs_root, pytest.mark.timeout(120)]


def cli(svc, *args, check=True):
    env = {**os.environ, "MERGEFS_STATE": str(svc.state)}
    r = subprocess.run([sys.executable, "-m", "mergefs", "--root", str(svc.root), *args],
                       capture_output=True, text=True, env=env)
    assert not check or r.returncode == 0, r.stderr
    return r


def mount_source(path) -> str | None:
    with open("/proc/self/mounts") as f:
        rows = [line.split() for line in f]
    return next((r[0] for r in rows if r[1] == str(path)), None)


def test_mount_is_a_view_of_the_service_and_ps_lists_it(service, tmp_path):
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc/motd").write_text("hello\n")
    cli(service, "import", str(layer), "--name", "base")
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    t0 = time.monotonic()
    cli(service, "mount", "--log", str(tmp_path / "mount.log"), "base", str(ro))
    took = time.monotonic() - t0
    try:
        assert (tmp_path / "mount.log").exists()                    # made, though empty
        assert mount_source(ro) == "mergefs-views", took          # a bind of the views mount
        assert (ro / "etc/motd").read_text() == "hello\n"
        cli(service, "mount", "--rw", "base", str(rw))
        (rw / "written").write_text("kept\n")
        views = json.loads(cli(service, "ps", "--state", str(service.state), "--json").stdout)
        users = {v["key"]: v["mounts"] for v in views}
        assert users == {f"mount:{ro}": [str(ro)], f"mount:{rw}": [str(rw)]}
    finally:
        cli(service, "umount", str(ro), check=False)
        cli(service, "umount", str(rw), check=False)
    assert mount_source(ro) is None and mount_source(rw) is None
    views = json.loads(cli(service, "ps", "--state", str(service.state), "--json").stdout)
    assert views == []
    cli(service, "mount", "--rw", "base", str(rw))        # the same upper again
    try:
        assert (rw / "written").read_text() == "kept\n"
    finally:
        cli(service, "umount", str(rw))


def test_ps_without_a_service_says_so(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mergefs", "ps", "--state", str(tmp_path)],
                       capture_output=True, text=True,
                       env={**os.environ, "MERGEFS_STATE": str(tmp_path)})
    if os.path.exists("/run/mergefs/control.sock"):
        pytest.skip("a system mergefs service is running")
    assert r.returncode == 3 and "no mergefs service" in r.stderr
