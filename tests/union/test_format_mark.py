"""Issue 11 item 1: an upper mergefs wrote is overlay format whatever its names.

A user may create a regular file called ``.wh.keep`` in a writable union next to
a lower ``keep``. Kernel overlayfs over that upper shows both; so must every
mergefs reader of the upper (commit, merge, diff, export), which therefore must
not guess the format from names. Export to OCI of such a file, which OCI cannot
represent, fails with one clear line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergefs.testing import mounts, tree
from mergefs.testing.builders import LayerSpec, materialise_stack

from ..conftest import needs

REPO = Path(__file__).resolve().parents[2]
OVL_OPTS = ["redirect_dir=off", "index=off"]

pytestmark = [pytest.mark.timeout(120),
              needs("root")]


def cli(root, *args, check=True):
    p = subprocess.run([sys.executable, "-m", "mergefs", "--root", str(root), *map(str, args)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    if check and p.returncode:
        raise AssertionError(f"mergefs {args} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def wh_upper(tmp_path, union_mount):
    """(lower, upper): a writable union mount where the user made ``.wh.keep``."""
    (lower,) = materialise_stack([LayerSpec().file("keep", b"lower keep\n")
                                  .file("d/x", b"x\n")], tmp_path / "layers")
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    mnt = union_mount([lower], upper=up, work=wk)
    (mnt / ".wh.keep").write_bytes(b"user data\n")
    (mnt / "d/.wh.x").write_bytes(b"more user data\n")
    assert sorted(os.listdir(mnt)) == [".wh.keep", "d", "keep"]
    from .conftest import stop_server
    stop_server(mnt, union_mount.started[-1][1])
    (tmp_path / "wk2").mkdir()
    (tmp_path / "ovl").mkdir()
    # the oracle: kernel overlayfs over the same lower and mergefs's upper shows both
    with mounts.overlay_mount([lower], tmp_path / "ovl", upper=up, work=tmp_path / "wk2",
                              options=OVL_OPTS) as ovl:
        assert sorted(os.listdir(ovl)) == [".wh.keep", "d", "keep"]
        assert sorted(os.listdir(ovl / "d")) == [".wh.x", "x"]
        oracle = tree.capture(ovl)
    return lower, up, oracle


def test_item1_commit_merge_diff_keep_wh_named_files(tmp_path, wh_upper):
    lower, up, oracle = wh_upper
    root = tmp_path / "store"
    base = cli(root, "import", lower).stdout.split()[-1]
    layer = cli(root, "commit", up, "--parent", base).stdout.strip()
    merged = cli(root, "merge", base, layer).stdout.strip()
    out = tmp_path / "export"
    cli(root, "export", merged, "-o", out)
    tree.assert_same(tree.capture(out), oracle, "export of merge(base, commit(upper))")
    # the store form of merge with the upper dir itself as a ref
    merged2 = cli(root, "merge", base, str(up) + "/").stdout.strip()
    cli(root, "export", merged2, "-o", tmp_path / "export2")
    tree.assert_same(tree.capture(tmp_path / "export2"), oracle, "merge(base, upper dir)")
    # the core form (no store)
    cli(root, "merge", lower, up, "--out", tmp_path / "farm")
    tree.assert_same(tree.capture(tmp_path / "farm"), oracle, "merge --out")
    # what mergefs wrote is read back as overlay format too (a farm as an input)
    (tmp_path / "empty").mkdir()
    cli(root, "merge", tmp_path / "empty", tmp_path / "farm", "--out", tmp_path / "farm2")
    tree.assert_same(tree.capture(tmp_path / "farm2"), oracle, "merge of a farm")
    # diff of the base and the merge gives the upper's change back: the files stay files
    d = cli(root, "diff", base, merged).stdout.strip()
    cli(root, "export", d, "-o", tmp_path / "diffdir")
    assert (tmp_path / "diffdir/.wh.keep").read_bytes() == b"user data\n"
    assert (tmp_path / "diffdir/d/.wh.x").read_bytes() == b"more user data\n"


def test_item1_export_to_oci_of_wh_named_file_fails_clearly(tmp_path, wh_upper):
    lower, up, _ = wh_upper
    root = tmp_path / "store"
    base = cli(root, "import", lower).stdout.split()[-1]
    layer = cli(root, "commit", up, "--parent", base).stdout.strip()
    merged = cli(root, "merge", base, layer).stdout.strip()
    for fmt in ("tar", "oci"):
        p = cli(root, "export", merged, "-o", tmp_path / f"out-{fmt}", "--format", fmt,
                check=False)
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and ".wh.keep" in lines[0] and "OCI" in lines[0], p.stderr
        assert not (tmp_path / f"out-{fmt}").exists()
