"""Fixtures for the store tests: a fresh store root, the CLI (in-process or as a real process), layers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec, materialise, materialise_stack
from snapshotter.store import Store

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    """Layer fixtures need root (char 0/0 whiteouts, trusted.overlay xattrs, chown)."""
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="store tests need root (mknod, trusted xattrs)")
        for item in items:
            if "tests/store/" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture
def root(tmp_path, request) -> Path:
    """A fresh store root; the test ends with ``fsck`` of it (content re-hashed): it must
    hold no error, unless the test is marked ``damages_store`` (it breaks the store on purpose)."""
    r = tmp_path / "store"
    yield r
    if request.node.get_closest_marker("damages_store") or not (r / "meta.db").exists():
        return
    from snapshotter.fsck import fsck_store
    errors = [f for f in fsck_store(r) if f.severity == "error"]
    assert not errors, f"the test left the store inconsistent: {errors}"


@pytest.fixture
def store(root):
    s = Store(root)
    yield s
    s.close()


class Cli:
    """``mergefs --root ROOT ...``: ``main(argv)`` in this process, or a real process.

    In-process by default (no interpreter start-up: the CLI is a leaf that
    parses, calls and prints, so this runs the same code). A real process
    when environment variables are given (kill points) or ``subprocess=True``:
    a few end-to-end tests keep what users run.
    """

    def __init__(self, root: Path, subprocess: bool = False):
        self.root = root
        self.subprocess = subprocess

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("MERGEFS_TEST_KILL_AT", None)
        env.update(extra)
        return env

    def argv(self, *args) -> list[str]:
        return [sys.executable, "-m", "mergefs", "--root", str(self.root), *map(str, args)]

    def run(self, *args, check: bool = True, **env) -> subprocess.CompletedProcess:
        if env or self.subprocess:
            p = subprocess.run(self.argv(*args), capture_output=True, text=True,
                               env=self.env(**env), timeout=60)
        else:
            p = run_main(["--root", str(self.root), *map(str, args)])
        if check and p.returncode != 0:
            raise AssertionError(f"mergefs {' '.join(map(str, args))} -> {p.returncode}\n"
                                 f"{p.stdout}\n{p.stderr}")
        return p

    def out(self, *args) -> str:
        return self.run(*args).stdout.strip()

    def json(self, *args):
        return json.loads(self.run(*args, "--json").stdout)


def run_main(argv: list[str]) -> subprocess.CompletedProcess:
    """``mergefs.cli.main(argv)`` with stdout and stderr captured."""
    import contextlib
    import io
    from mergefs.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, int(code), out.getvalue(), err.getvalue())


@pytest.fixture
def cli(root) -> Cli:
    return Cli(root)


@pytest.fixture
def cli_process(root) -> Cli:
    """The CLI as a real process (end-to-end: what users and runtimes run)."""
    return Cli(root, subprocess=True)


def base_spec() -> LayerSpec:
    return (LayerSpec().file("etc/passwd", b"root:x:0:0\n").file("etc/group", b"root:x:0\n")
            .file("bin/tool", b"#!/bin/sh\necho base\n", mode=0o755)
            .hardlink("bin/tool2", "bin/tool").dir("var/cache", mode=0o750)
            .file("var/cache/a", b"a" * 5000).file("var/cache/b", b"b" * 9000)
            .symlink("lib", "usr/lib"))


def mid_spec() -> LayerSpec:
    return (LayerSpec().file("etc/hostname", b"mid\n").file("bin/tool", b"#!/bin/sh\necho mid\n",
                                                           mode=0o755)
            .whiteout("etc/group").file("usr/lib/libx.so", b"\x7fELF" + b"x" * 3000))


def top_spec() -> LayerSpec:
    return (LayerSpec().opaque_dir("var/cache").file("var/cache/fresh", b"fresh")
            .file("etc/motd", b"hello\n"))


@pytest.fixture
def layers(tmp_path) -> list[Path]:
    """Three overlay-format layers, bottom first: base, mid (whiteout), top (opaque dir)."""
    return materialise_stack([base_spec(), mid_spec(), top_spec()], tmp_path / "layers")


@pytest.fixture
def oci_layers(tmp_path) -> list[Path]:
    """The same three layers in OCI whiteout format."""
    return materialise_stack([base_spec(), mid_spec(), top_spec()], tmp_path / "oci", fmt="oci")


def snapshot_dirs(root: Path) -> list[str]:
    return sorted(os.listdir(root / "snapshots"))


__all__ = ["Cli", "base_spec", "mid_spec", "top_spec", "snapshot_dirs", "materialise"]
