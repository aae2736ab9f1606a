"""Argument forms (issue 13): an argument means what it spells, never what exists on the host.

A layer directory is /abs, ./rel, ../rel or dir:PATH; a store ref has no '/';
'a/b' is a usage error. Read-only verbs (explain, inspect, export) never write
to the store; implicit import happens only in merge, diff and commit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergefs.union import server


def store_listing(root: Path) -> list[tuple[str, int]]:
    """Every path below the store root with its size (meta.db's content aside)."""
    out = []
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            size = 0 if n.startswith("meta.db") else os.lstat(p).st_size
            out.append((os.path.relpath(p, root), size))
    return sorted(out)


@pytest.fixture
def img(cli, layers) -> str:
    return cli.out("merge", "--name", "img", *layers)


def test_explain_ref_then_absolute_host_dir_answers_about_the_view(cli, img, root, tmp_path):
    """`explain img /etc` and `explain img /a/host/dir`: both are paths in the merged view,
    whatever the host holds there; nothing is imported."""
    host_dir = tmp_path / "host" / "usr" / "share" / "doc"
    host_dir.mkdir(parents=True)
    (host_dir / "big").write_bytes(b"x" * 100_000)
    before, rows = store_listing(root), cli.json("ls")
    out = json.loads(cli.out("explain", "img", "/etc", "--json"))
    assert out["path"] == "/etc" and out["supplied_by"] is not None
    text = cli.out("explain", "img", str(host_dir))
    assert text.splitlines()[0] == f"{host_dir}: not in the merged view"
    text = cli.out("explain", "img", "/etc/passwd", "etc/hostname")   # several PATHs
    assert "/etc/passwd: file from layer 0" in text and "/etc/hostname: file from layer 1" in text
    assert store_listing(root) == before
    assert [r["id"] for r in cli.json("ls")] == [r["id"] for r in rows]


def test_explain_with_a_directory_first_is_a_usage_error(cli, img, root, tmp_path):
    """The issue's `explain /usr/share/doc img`: refused with how to write it, no import."""
    host_dir = tmp_path / "doc"
    host_dir.mkdir()
    (host_dir / "f").write_bytes(b"f")
    before = store_listing(root)
    for args in ([str(host_dir), "img"], ["./doc", "img"], ["img"], ["a/b", "/etc"]):
        r = cli.run("explain", *args, check=False)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("mergefs: error: ") and len(r.stderr.splitlines()) == 1
    assert "mergefs explain REF PATH" in r.stderr or "./a/b" in r.stderr
    r = cli.run("explain", str(host_dir), "img", check=False)
    assert "explain -l DIR" in r.stderr and "explain REF PATH" in r.stderr
    assert store_listing(root) == before


def test_explain_layer_dirs_behind_l_never_touch_the_store(cli, layers, root):
    out = cli.out("explain", "-l", layers[0], "-l", layers[1], "-l", layers[2], "/etc/group")
    assert out.startswith("/etc/group: not in the merged view")
    assert not root.exists()                      # no store was created either
    r = cli.run("explain", "img", "/etc", check=False)
    assert r.returncode == 3 and "no store at" in r.stderr and not root.exists()


def test_a_ref_is_a_ref_even_when_a_directory_of_that_name_exists(cli, layers, root, tmp_path):
    """cwd holds ./img (a directory): `img` still names the snapshot, in every verb."""
    m = cli.out("merge", "--name", "img", *layers)
    (tmp_path / "img" / "etc").mkdir(parents=True)
    run = lambda *a: subprocess.run(cli.argv(*a), capture_output=True, text=True,  # noqa: E731
                                    env=cli.env(), cwd=tmp_path, timeout=60)
    before = store_listing(root)
    for verb in (("inspect", "img"), ("explain", "img", "etc"), ("merge", "img")):
        r = run(*verb)
        assert r.returncode == 0, (verb, r.stderr)
    assert m in run("inspect", "img", "--json").stdout
    assert store_listing(root) == before            # re-merging img reuses it
    r = run("merge", "./img")                       # spelled as a directory: imported (README)
    assert r.returncode == 0 and r.stdout.strip() != m


@pytest.mark.parametrize("argv,words", [
    (["merge", "layers/base"], "write ./layers/base"),
    (["merge", "--out", "OUT", "base"], "merge --out takes layer directories"),
    (["diff", "--out", "OUT", "base", "./x"], "diff --out takes layer directories"),
    (["export", "./dir", "-o", "OUT"], "export takes a store ref"),
    (["inspect", "/abs/dir"], "inspect takes a store ref"),
    (["mount", "base", "./x", "MNT"], "or one store ref"),
])
def test_unclear_forms_are_usage_errors(cli, root, tmp_path, argv, words):
    argv = [str(tmp_path / "out") if a == "OUT" else str(tmp_path / "mnt") if a == "MNT" else a
            for a in argv]
    r = cli.run(*argv, check=False)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_version_prints_the_installed_version():
    r = subprocess.run([sys.executable, "-m", "mergefs", "--version"], capture_output=True,
                       text=True, timeout=60)
    from importlib.metadata import version
    assert r.returncode == 0 and r.stdout.strip() == f"mergefs {version('mergefs')}"


def _mount_options(mnt: Path) -> set[str]:
    from mergefs import mounttable
    entry = mounttable.entry_at(mnt)
    assert entry is not None, f"{mnt} is not mounted"
    return set(entry.options.split(","))


@pytest.mark.timeout(60)
def test_mount_is_nosuid_nodev_unless_asked(cli, img, tmp_path):
    assert "-o dev,suid" in cli.out("mount", "--help")
    mnts = []
    try:
        for opts in ([], ["-o", "dev,suid"]):
            mnt = tmp_path / f"mnt{len(mnts)}"
            mnt.mkdir()
            mnts.append(mnt)
            cli.run("mount", "--log", tmp_path / "log", *opts, "img", mnt)
            got = _mount_options(mnt)
            if opts:
                assert not got & {"nosuid", "nodev"}, got
            else:
                assert {"nosuid", "nodev"} <= got, got
            assert (mnt / "etc" / "passwd").read_bytes() == b"root:x:0:0\n"
    finally:
        for mnt in mnts:
            if server.is_mounted(str(mnt)):
                cli.run("umount", mnt, check=False)
            if server.is_mounted(str(mnt)):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
