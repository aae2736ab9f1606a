"""containerd's snapshotter conformance suite against `mergefs serve` (slow tier).

tests/service/conformance/conformance_test.go runs ``snapshots/testsuite`` from
Debian's golang-github-containerd-containerd-dev through containerd's proxy
snapshotter client over the service's gRPC socket, a fresh service per test,
plus the suite's Rename check (which the suite itself skips for kernel
overlayfs). Built offline in GOPATH mode; the binary is cached by source hash.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import needs
from mergefs.testing.mounts import watch_below

from .conftest import needs_root

HERE = Path(__file__).parent / "conformance"
GOPATH = "/usr/share/gocode"
SUITE = Path(GOPATH) / "src/github.com/containerd/containerd/snapshots/testsuite"
pytestmark = [needs_root, pytest.mark.slow,
              needs("go", "containerd-testsuite")]


def go_env() -> dict:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergefs-go"
    return {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "",
            "GOCACHE": str(cache / "build")}


def conformance_binary() -> Path:
    src = (HERE / "conformance_test.go").read_bytes()
    env = go_env()
    out = Path(env["GOCACHE"]).parent / f"conformance-{hashlib.sha256(src).hexdigest()[:16]}.test"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(["go", "test", "-c", "-o", str(tmp), "."], cwd=HERE, env=env, check=True,
                       timeout=1200)
        tmp.rename(out)
    return out


@pytest.fixture
def short_tmp():
    import tempfile
    d = watch_below(tempfile.mkdtemp(prefix="mfc-", dir="/tmp"))   # the leak check covers it
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("mode", ["views", "fuse"])
def test_containerd_snapshotter_suite(mode, tmp_path, short_tmp):
    binary = conformance_binary()
    env = {**os.environ, "TMPDIR": str(short_tmp),    # unix socket paths must stay short
           "MERGEFS_SERVE": f"{sys.executable} -m mergefs serve --mounts {mode}",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    r = subprocess.run([str(binary), "-test.v", "-test.parallel", "4", "-test.timeout", "1800s"],
                       env=env, capture_output=True, text=True, timeout=2000)
    log = r.stdout + r.stderr
    (tmp_path / "conformance.log").write_text(log)
    results = {name: res for res, name in re.findall(r"--- (PASS|FAIL|SKIP): (\S+)", log)}
    failed = sorted(n for n, res in results.items() if res == "FAIL")
    assert r.returncode == 0 and not failed, \
        f"failed: {failed}\n" + "\n".join(l for l in log.splitlines()
                                          if re.search(r"\.go:\d+:", l)
                                          and "helpers_unix.go" not in l)[-6000:]
    suite = [n for n in results if n.startswith("TestMergefsSnapshotter/")]
    assert len(suite) >= 21 and results.get("TestRename") == "PASS", results
    skipped = sorted(n for n, res in results.items() if res == "SKIP")
    assert skipped == ["TestMergefsSnapshotter/Rename"], skipped   # the suite's own skip
