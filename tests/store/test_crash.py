"""SIGKILL at each step of import, merge, commit and prune (C1, C4; docs/architecture.md, "The store on disk").

Each case runs the real CLI with MERGEFS_TEST_KILL_AT naming the step, checks
the process died of SIGKILL, that fsck finds no error, that nothing partial is
visible, that the retry succeeds with the id a clean run gives, and that the
store is then entirely clean.
"""
from __future__ import annotations

import signal

import pytest

from mergefs.testing.builders import LayerSpec, materialise

from .conftest import Cli


def crash(cli: Cli, step: str, *args) -> None:
    p = cli.run(*args, check=False, MERGEFS_TEST_KILL_AT=step)
    assert p.returncode == -signal.SIGKILL, (step, p.returncode, p.stderr)


def assert_no_errors(cli: Cli) -> None:
    report = cli.json("fsck")
    assert report["clean"], report
    assert all(f["severity"] == "garbage" for f in report["findings"])


def assert_clean(cli: Cli) -> None:
    assert cli.json("fsck")["findings"] == []


def assert_all_complete(cli: Cli) -> None:
    """Whatever is visible is complete: every layer's content matches its digest."""
    for s in cli.json("ls"):
        assert s["state"] == "committed"
    assert cli.json("fsck")["clean"]


def reference(tmp_path, *args) -> str:
    return Cli(tmp_path / "reference").out(*args)


@pytest.mark.parametrize("step", ["import:mid-copy", "import:after-build",
                                  "import:after-publish-dir"])
def test_sigkill_during_import(cli, layers, tmp_path, step):
    crash(cli, step, "import", layers[0])
    assert_no_errors(cli)
    assert_all_complete(cli)
    assert cli.out("import", layers[0]) == reference(tmp_path, "import", layers[0])
    assert_clean(cli)


@pytest.mark.parametrize("step", ["merge:after-build", "merge:after-publish-dir"])
@pytest.mark.parametrize("strategy", ["farm", "union"])
def test_sigkill_during_merge(cli, layers, tmp_path, step, strategy):
    ids = [cli.out("import", p) for p in layers]
    crash(cli, step, "merge", "--strategy", strategy, *ids)
    assert_no_errors(cli)
    visible = [s for s in cli.json("ls") if s["kind"] == "merge"]
    if step == "merge:after-build":
        assert visible == []                    # nothing was published
    assert_all_complete(cli)
    merged = cli.json("merge", "--strategy", strategy, *ids)
    assert merged["id"] == reference(tmp_path, "merge", *layers)
    assert_clean(cli)


def upper_dir(tmp_path):
    spec = (LayerSpec().file("etc/motd", b"changed\n").whiteout("etc/passwd")
            .opaque_dir("var/cache").file("var/cache/new", b"n"))
    return materialise(spec, tmp_path / "upper")


@pytest.mark.parametrize("step", ["commit:after-build", "commit:after-publish-dir"])
def test_sigkill_during_commit(cli, layers, tmp_path, step):
    base = cli.out("import", layers[0])
    upper = upper_dir(tmp_path)
    crash(cli, step, "commit", upper, "--parent", base)
    assert_no_errors(cli)
    assert_all_complete(cli)
    committed = cli.out("commit", upper, "--parent", base)
    ref = Cli(tmp_path / "reference")
    assert committed == ref.out("commit", upper, "--parent", ref.out("import", layers[0]))
    assert_clean(cli)


@pytest.mark.parametrize("step", ["prune:after-mark", "prune:after-trash"])
def test_sigkill_during_prune(cli, layers, step):
    ids = [cli.out("import", p) for p in layers]
    cli.run("release", *ids)
    crash(cli, step, "prune")
    assert_no_errors(cli)
    left = {s["id"] for s in cli.json("ls")}
    assert left <= set(ids)
    assert_all_complete(cli)
    cli.json("prune")
    assert cli.json("ls") == []
    assert_clean(cli)
