"""Fast checks of tools/gen_stack.py (the benchmark stack generator) at small scale,
and of the farm-vs-overlay check in tools/bench_farm.py that keeps benchmarks honest."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_farm  # noqa: E402
import gen_stack  # noqa: E402

from mergefs.resolver import Resolver  # noqa: E402
from mergefs.testing import tree  # noqa: E402
from mergefs.testing.mounts import can_mount_overlay, overlay_mount  # noqa: E402

from tests.conftest import needs

root_only = needs("root")


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            yield path, os.lstat(path)


def _snapshot(paths):
    """Everything of each layer, overlay xattrs included (mtimes, bytes, links)."""
    return [tree.capture(p, private_xattrs=True) for p in paths]


@root_only
@pytest.mark.parametrize("fmt", gen_stack.FORMATS)
def test_same_seed_same_stack(tmp_path, fmt):
    a = gen_stack.generate(tmp_path / "a", layers=3, files=600, seed=7, fmt=fmt, jobs=1)
    b = gen_stack.generate(tmp_path / "b", layers=3, files=600, seed=7, fmt=fmt, jobs=2)
    for va, vb in zip(_snapshot(a), _snapshot(b)):
        tree.assert_same(va, vb, "layers of one seed")


def test_plan_depends_on_the_seed():
    one, two = gen_stack.plan_stack(3, 600, 1), gen_stack.plan_stack(3, 600, 2)
    assert [lp.files for lp in one] != [lp.files for lp in two]
    assert [lp.files for lp in one] == [lp.files for lp in gen_stack.plan_stack(3, 600, 1)]


@root_only
def test_requested_layer_count_bottom_first(tmp_path):
    paths = gen_stack.generate(tmp_path, layers=5, files=300, seed=1)
    assert paths == [str(tmp_path / f"l{k}") for k in range(5)]
    assert sorted(n for n in os.listdir(tmp_path) if n != "stack.json") == [f"l{k}" for k in range(5)]
    assert gen_stack.read_meta(tmp_path)["layers"] == 5


def test_plan_counts_match_the_request():
    plans = gen_stack.plan_stack(8, 20_000, 3)
    entries = sum(len(lp.files) + len(lp.symlinks) + len(lp.hardlinks) for lp in plans)
    assert abs(entries - 20_000) < 20_000 * 0.05
    for lp in plans[1:]:
        c = lp.counts()
        assert c["whiteouts"] >= 1 and c["opaque"] >= 1 and c["hardlinks"] >= 1
    sizes = [f.size for lp in plans for f in lp.files]
    assert max(sizes) <= 16 * 1024 and sorted(sizes)[len(sizes) // 2] < 4096   # skewed small
    depths = [f.path.count(b"/") for lp in plans for f in lp.files]
    assert min(depths) >= 2 and max(depths) <= 7


@root_only
def test_overlay_format_whiteouts_and_opaque_dirs(tmp_path):
    paths = gen_stack.generate(tmp_path, layers=3, files=1500, seed=2, fmt="overlay")
    for k, layer in enumerate(paths):
        entries = list(_walk(Path(layer)))
        whiteouts = [p for p, st in entries if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0]
        opaque = [p for p, st in entries if stat.S_ISDIR(st.st_mode)
                  and b"trusted.overlay.opaque" in map(os.fsencode, os.listxattr(p))]
        assert not [p for p, _ in entries if os.path.basename(p).startswith(b".wh.")]
        assert (len(whiteouts) > 0, len(opaque) > 0) == (k > 0, k > 0)


@root_only
def test_oci_format_whiteouts_and_opaque_dirs(tmp_path):
    paths = gen_stack.generate(tmp_path, layers=3, files=1500, seed=2, fmt="oci")
    for k, layer in enumerate(paths):
        entries = list(_walk(Path(layer)))
        names = [os.path.basename(p) for p, _ in entries]
        assert not [p for p, st in entries if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0]
        assert not [p for p, _ in entries if b"trusted.overlay.opaque"
                    in map(os.fsencode, os.listxattr(p, follow_symlinks=False))]
        has_wh = any(n.startswith(b".wh.") and n != b".wh..wh..opq" for n in names)
        assert (has_wh, b".wh..wh..opq" in names) == (k > 0, k > 0)


@root_only
@pytest.mark.parametrize("fmt", gen_stack.FORMATS)
def test_whiteouts_hide_something_and_never_sit_in_opaque_dirs_D6(tmp_path, fmt):
    """D6: a whiteout only where something below exists, never inside an opaque dir."""
    paths = gen_stack.generate(tmp_path, layers=4, files=1200, seed=5, fmt=fmt)
    plans = gen_stack.plan_stack(4, 1200, 5)
    for k in range(1, 4):
        with Resolver(paths[:k]) as below:
            for path in plans[k].whiteouts:
                assert below.lookup(path) is not None, (k, path)
        opaque = [p for p, d in plans[k].dirs.items() if d.opaque or d.replaces_nondir]
        for path in plans[k].whiteouts:
            assert not any(path.startswith(o + b"/") for o in opaque), (k, path)


@root_only
def test_refuses_to_overwrite_and_reuses_a_matching_stack(tmp_path):
    gen_stack.generate(tmp_path, layers=2, files=100, seed=1)
    with pytest.raises(FileExistsError):
        gen_stack.generate(tmp_path, layers=2, files=100, seed=1)
    mtime = os.stat(tmp_path / "stack.json").st_mtime_ns
    gen_stack.ensure_stack(tmp_path, layers=2, files=100, seed=1)
    assert os.stat(tmp_path / "stack.json").st_mtime_ns == mtime
    gen_stack.ensure_stack(tmp_path, layers=2, files=120, seed=1)
    assert gen_stack.read_meta(tmp_path)["files"] == 120


def test_cli_reports_a_clear_error(tmp_path, capsys):
    (tmp_path / "l0").mkdir()
    assert gen_stack.main([str(tmp_path), "--layers", "1", "--files", "5"]) == 2
    assert "already holds a stack" in capsys.readouterr().err


@needs("overlay")
def test_bench_check_accepts_the_farm_and_catches_a_wrong_one(tmp_path):
    """The benchmark's correctness check: farm == kernel overlayfs, and a farm
    missing one whiteout's effect (a resurrected file) is reported."""
    from mergefs.farm import build_farm
    paths = gen_stack.generate(tmp_path / "s", layers=4, files=1500, seed=3)
    farm = tmp_path / "farm"
    build_farm(paths, farm)
    assert bench_farm.verify_farm(paths, str(farm), sample=200)["paths"] > 1000
    with Resolver(paths[:1]) as base:
        deleted = next(p for lp in gen_stack.plan_stack(4, 1500, 3)[1:] for p in lp.whiteouts
                       if base.lookup(p) is not None
                       and stat.S_ISREG(os.lstat(os.path.join(paths[0].encode(), p)).st_mode))
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(farm), str(bad)], check=True)
    os.makedirs(os.path.dirname(os.path.join(os.fsencode(bad), deleted)), exist_ok=True)
    shutil.copy2(os.path.join(paths[0].encode(), deleted), os.path.join(os.fsencode(bad), deleted))
    with overlay_mount(paths) as mnt:
        problems, _ = bench_farm.compare_trees(str(mnt), str(bad), sample=50)
    assert any(b"only in the farm" in p.encode() for p in problems)


@pytest.mark.slow
@needs("overlay")
@pytest.mark.parametrize("parallel", ["process", "thread"])
def test_M5_parallel_build_of_a_realistic_stack_equals_kernel_overlay(tmp_path, parallel):
    """build_farm's defaults on a stack big enough to split (the caller builds the
    first 1,024 entries, then workers share the rest): every path, attribute and
    hardlink group as kernel overlayfs shows them."""
    from mergefs.farm import build_farm
    paths = gen_stack.generate(tmp_path / "s", layers=8, files=20000, seed=5)
    stats = build_farm(paths, tmp_path / "farm", parallel=parallel)
    assert stats.links + stats.dirs > 20000
    checked = bench_farm.verify_farm(paths, str(tmp_path / "farm"), sample=500)
    assert checked["paths"] > 20000 and checked["hardlink_groups"] > 0
