"""`mergefs serve --gc-interval N --gc-keep-storage SIZE` prunes what nothing holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .conftest import needs_root

pytestmark = [needs_root, pytest.mark.timeout(120)]


def cli(svc, *args):
    r = subprocess.run([sys.executable, "-m", "mergefs", "--root", str(svc.root), *args],
                       capture_output=True, text=True,
                       env={**os.environ, "MERGEFS_NO_SERVICE": "1"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_periodic_gc_prunes_released_snapshots_and_keeps_held_ones(service_factory, tmp_path):
    svc = service_factory("--gc-interval", "0.3", "--gc-keep-storage", "0")
    for name in ("kept", "dropped"):
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text(name * 1000)
    kept = json.loads(cli(svc, "import", str(tmp_path / "kept"), "--json"))
    dropped = json.loads(cli(svc, "import", str(tmp_path / "dropped"), "--json"))
    ids = lambda: {s["id"] for s in json.loads(cli(svc, "ls", "--json"))}  # noqa: E731
    kid, did = kept["layers"][0]["id"], dropped["layers"][0]["id"]
    assert {kid, did} <= ids()
    cli(svc, "release", did)
    deadline = time.monotonic() + 30
    while did in ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ids() >= {kid} and did not in ids()
    assert svc.stop() == 0
