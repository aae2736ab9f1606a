"""The mergefs CLI as a user runs it: merge --out, diff --out, explain, and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergefs.testing import model, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs_root

STACK = [LayerSpec().file("etc/motd", b"hi").file("d/x").file("srv", b"file"),
         LayerSpec().whiteout("etc/motd").opaque_dir("d").file("d/y").file("srv/index")]


def mergefs(*args, check=None, no_dac=False, process=False):
    """Run the CLI: ``main(argv)`` in this process, or a real process when ``process``
    (end to end) or ``no_dac`` (drops root's power to ignore file permissions)."""
    if not (no_dac or process):
        r = _in_process([str(a) for a in args])
        if check is not None:
            assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
        return r
    cmd = [sys.executable, "-m", "mergefs", *map(str, args)]
    if no_dac:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check is not None:
        assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
    return r


def _in_process(argv: list[str]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    from mergefs.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, int(code), out.getvalue(), err.getvalue())


@needs_root
def test_merge_out_builds_farm_and_prints_it(tmp_path):
    layers = materialise_stack(STACK, tmp_path, "oci")
    r = mergefs("merge", "--out", tmp_path / "farm", *layers, check=0)
    assert r.stdout.strip() == str(tmp_path / "farm")
    tree.assert_same(tree.capture(tmp_path / "farm"), tree.model_view(model.merge(STACK)))


@needs_root
def test_merge_jobs_builds_the_same_farm(tmp_path):
    """-j N: a stack past the point where the CLI forks workers (1,024 entries)
    gives the farm -j 1 (the sequential plan) gives; -j 0 is a usage error."""
    low, top = LayerSpec(), LayerSpec()
    for d in range(40):
        for f in range(40):
            low.file(f"d{d}/f{f}", b"%d" % f)
        top.whiteout(f"d{d}/f0").file(f"d{d}/new", b"new")
    layers = materialise_stack([low, top], tmp_path, "oci")
    expected = tree.model_view(model.merge([low, top]))
    for jobs in ("1", "2", None):
        out = tmp_path / f"farm-{jobs}"
        mergefs("merge", *(["-j", jobs] if jobs else []), "--out", out, *layers, check=0,
                process=True)     # end to end: the CLI process forks its workers
        tree.assert_same(tree.capture(out), expected, f"-j {jobs}")
    r = mergefs("merge", "-j", "0", "--out", tmp_path / "zero", *layers, check=2, process=True)
    assert "--jobs must be at least 1" in r.stderr and not (tmp_path / "zero").exists()


@needs_root
def test_diff_out_and_merge_round_trip(tmp_path):
    layers = materialise_stack(STACK, tmp_path, "overlay")
    mergefs("merge", "--out", tmp_path / "b", *layers, check=0)
    mergefs("diff", "--out", tmp_path / "d", layers[0], tmp_path / "b", check=0)
    # a whiteout for etc/motd and d/x, explicit (D4): no opaque dir in a diff
    assert os.stat(tmp_path / "d/etc/motd").st_rdev == 0
    assert not os.listxattr(tmp_path / "d/d")
    mergefs("merge", "--out", tmp_path / "again", layers[0], tmp_path / "d", check=0)
    tree.assert_same(tree.capture(tmp_path / "again"), tree.capture(tmp_path / "b"))


@needs_root
def test_diff_accepts_stacks_joined_by_colons(tmp_path):
    layers = materialise_stack(STACK, tmp_path, "overlay")
    mergefs("diff", "--out", tmp_path / "d", layers[0], f"{layers[0]}:{layers[1]}", check=0)
    assert os.path.exists(tmp_path / "d/srv/index")


@needs_root
def test_explain_names_the_supplier_and_what_hid_the_rest(tmp_path):
    layers = materialise_stack(STACK, tmp_path, "oci")
    ls = [x for layer in layers for x in ("-l", layer)]
    out = mergefs("explain", "/etc/motd", *ls, check=0).stdout
    assert "not in the merged view" in out and "deleted by a whiteout of etc/motd in layer 1" in out
    out = json.loads(mergefs("explain", "--json", "srv", *ls, check=0).stdout)
    assert out["supplied_by"] == 1
    assert out["layers"][1] == {"layer": 0, "source": str(layers[0]), "holds": "file",
                                "status": "hidden",
                                "reason": "replaced by a directory in layer 1 (type change)"}
    out = mergefs("explain", "d/x", *ls, check=0).stdout
    assert "hidden by opaque directory d in layer 1" in out


@pytest.mark.parametrize("case,code,words", [
    ("missing-layer", 3, "does not exist"),
    ("not-a-dir", 1, "is not a directory"),
    ("out-exists", 4, "already exists"),
])
def test_errors_are_one_line_and_nonzero(tmp_path, case, code, words):
    (tmp_path / "l0").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "exists").mkdir()
    args = {"missing-layer": [tmp_path / "nope"], "not-a-dir": [tmp_path / "file"],
            "out-exists": [tmp_path / "l0"]}[case]
    out = tmp_path / ("exists" if case == "out-exists" else "farm")
    r = mergefs("merge", "--out", out, *args, check=code)
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("mergefs: error: ")
    assert not (tmp_path / "farm").exists()


@needs_root
def test_permission_denied_is_exit_6(tmp_path):
    layer = tmp_path / "secret"
    (layer / "d").mkdir(parents=True)
    os.chown(layer / "d", 1234, 1234)
    (layer / "d").chmod(0o700)
    out = tmp_path / "pub"
    out.mkdir()
    r = mergefs("merge", "--out", out / "farm", layer, check=6, no_dac=True)
    assert "Permission denied" in r.stderr
    assert os.listdir(out) == []


@needs_root
def test_no_space_is_exit_5_and_leaves_nothing(tmp_path):
    layer = tmp_path / "l0"
    layer.mkdir()
    (layer / "big").write_bytes(os.urandom(512 * 1024))
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        r = mergefs("merge", "--out", mnt / "farm", layer, check=5)
        assert "No space left on device" in r.stderr
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_python_dash_m_and_console_script_agree():
    a = mergefs("--help", check=0).stdout
    b = subprocess.run([str(Path(sys.executable).parent / "mergefs"), "--help"],
                       capture_output=True, text=True).stdout
    assert a == b and "merge" in a
