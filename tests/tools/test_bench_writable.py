"""The ``dpkg`` step of tools/bench_writable.py: the 3-layer Debian minbase it
builds from this host's packages, and ``dpkg -i`` of perl's .debs in a chroot on
a writable mergefs mount of it, against kernel overlayfs doing the same."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_writable  # noqa: E402
import benchlib  # noqa: E402

from tests.conftest import needs  # noqa: E402

pytestmark = needs("root", "overlay", "dpkg", "apt-get", "chroot")    # ~12 s together


def _status_packages(layer: str) -> set[str]:
    with open(os.path.join(layer, "var/lib/dpkg/status")) as f:
        return {ln.split(": ", 1)[1] for ln in f.read().splitlines() if ln.startswith("Package: ")}


def _upper(upper: str) -> dict[str, int]:
    """Each entry of an upper and its file type (whiteouts are character devices)."""
    return {rel: stat.S_IFMT(os.lstat(os.path.join(upper, rel)).st_mode)
            for rel in bench_writable.upper_entries(upper)}


@pytest.fixture(scope="module")
def debian(tmp_path_factory):
    where = tmp_path_factory.mktemp("debian")
    layers = bench_writable.debian_layers(str(where / "layers"))
    try:
        debs = bench_writable.dpkg_debs(str(where / "debs"), benchlib.minbase_packages())
    except bench_writable.DebsUnavailable as e:
        pytest.skip(f"apt cannot fetch perl's .debs: {e}")
    return layers, debs


def test_three_layers_of_minbase_without_perl(debian):
    layers, debs = debian
    minbase = set(benchlib.minbase_packages())
    assert len(layers) == 3
    seen: set[str] = set()
    for layer in layers:            # each layer adds packages; its status lists those below too
        pkgs = _status_packages(layer)
        assert seen < pkgs
        seen = pkgs
    assert seen == minbase
    assert "perl-base" in minbase and "perl" not in minbase
    assert not any(os.path.lexists(os.path.join(lp, "usr/bin/cpan")) for lp in layers)
    assert os.path.exists(os.path.join(layers[0], "mnt"))        # where the .debs are bound
    names = {os.path.basename(d).split("_")[0] for d in debs}
    assert "perl" in names          # and what it needs beyond minbase (perl-base: an upgrade)
    assert not names & (minbase - {"perl-base"})
    # the same packages: the layers are reused, not rebuilt
    assert bench_writable.debian_layers(os.path.dirname(layers[0])) == layers


def _install(name: str, layers, debs, base: Path) -> dict[str, int]:
    s = bench_writable.System(name, layers, str(base), str(base) + ".log")
    s.mount()
    try:
        with bench_writable.chroot_binds(s.mnt, debs):
            r = subprocess.run(["bash", "-c", bench_writable.dpkg_command(s.mnt)],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            perl = subprocess.run(["chroot", s.mnt, "/usr/bin/perl", "-MDB_File", "-MCPAN::Meta",
                                   "-MPOSIX", "-e", "print floor(42.5)"],   # libperl, modules
                                  capture_output=True, text=True)
        assert perl.stdout == "42", perl.stderr
        assert bench_writable.dpkg_installed(s.mnt) == "install ok installed"
    finally:
        s.umount()
    return _upper(s.upper)


def test_dpkg_i_on_mergefs_writes_what_kernel_overlayfs_writes(debian, tmp_path):
    layers, debs = debian
    kernel = _install("kernel-overlay", layers, debs, tmp_path / "kernel")
    mergefs = _install("mergefs", layers, debs, tmp_path / "mergefs")
    assert "usr/bin/cpan" in mergefs and len(mergefs) > 2000
    assert mergefs == kernel
