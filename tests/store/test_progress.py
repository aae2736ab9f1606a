"""Progress on long work (issue 13): a bar under a terminal, silence in a pipe or with --quiet."""
from __future__ import annotations

import os
import pty
import subprocess

import pytest


def run_on_tty(cli, *args) -> tuple[int, str, str]:
    """Run mergefs with stderr on a pseudo-terminal; (exit code, stdout, what the tty got)."""
    master, slave = pty.openpty()
    env = cli.env(MERGEFS_PROGRESS_AFTER="0", TERM="xterm", COLUMNS="100")
    p = subprocess.Popen(cli.argv(*args), stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    got = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:             # EIO: the child closed the terminal's last fd
            break
        if not data:
            break
        got += data
    os.close(master)
    out = p.stdout.read().decode()
    return p.wait(timeout=60), out, got.decode(errors="replace")


@pytest.fixture
def merged(cli, layers) -> str:
    return cli.out("merge", "--name", "img", *layers)


@pytest.mark.timeout(120)
def test_export_and_import_show_progress_on_a_terminal(cli, merged, tmp_path):
    code, out, tty = run_on_tty(cli, "export", "img", "-o", tmp_path / "o1", "--format", "oci")
    assert code == 0 and out.strip() == str(tmp_path / "o1")
    assert "mergefs: exporting" in tty and "\x1b[" in tty and "kB" in tty, tty
    code, out, tty = run_on_tty(cli, "import", tmp_path / "o1", "--name", "again")
    assert code == 0 and "mergefs: importing" in tty, tty
    code, out, tty = run_on_tty(cli, "export", "img", "-o", tmp_path / "o2", "--quiet",
                                "--format", "tar")
    assert code == 0 and tty == "", tty


@pytest.mark.timeout(120)
def test_no_progress_in_a_pipe(cli, merged, tmp_path):
    r = cli.run("export", "img", "-o", tmp_path / "o1", "--format", "oci",
                MERGEFS_PROGRESS_AFTER="0")
    assert r.stderr == ""
    r = cli.run("import", tmp_path / "o1", "--name", "again", MERGEFS_PROGRESS_AFTER="0")
    assert r.stderr == ""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_farm_build_shows_progress_and_builds_the_same_farm(cli, tmp_path, jobs):
    """Past the fork point (1,024 entries) with -j 2, sequential with -j 1."""
    from mergefs.testing import model, tree
    from mergefs.testing.builders import LayerSpec, materialise_stack
    low, top = LayerSpec(), LayerSpec()
    for d in range(30):
        for f in range(60):
            low.file(f"d{d}/f{f}", b"%d" % f)
        top.whiteout(f"d{d}/f0").file(f"d{d}/new", b"new")
    layers = materialise_stack([low, top], tmp_path / "layers", "oci")
    code, out, tty = run_on_tty(cli, "merge", "-j", jobs, "--out", tmp_path / "farm", *layers)
    assert code == 0 and "mergefs: building farm" in tty and "entries" in tty, tty
    tree.assert_same(tree.capture(tmp_path / "farm"), tree.model_view(model.merge([low, top])))
    r = cli.run("merge", "-j", jobs, "--out", tmp_path / "farm2", *layers,
                MERGEFS_PROGRESS_AFTER="0")
    assert r.stderr == ""
