"""The per-test leak check (tests/conftest.py ``no_leaked_mounts``): which mounts it counts."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from mergefs.testing import mounts

from ..conftest import needs

pytestmark = needs("root")


def tmpfs(target) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)


def test_leak_watch_counts_registered_private_roots_and_nothing_else(tmp_path):
    """A harness's private root outside pytest's temp dir (like /tmp/mfc-*) is watched once
    registered; a mount elsewhere (another agent's) is not; one already there is not ours."""
    private = mounts.watch_below(tempfile.mkdtemp(prefix="mergefs-leakwatch-"))
    elsewhere = tempfile.mkdtemp(prefix="mergefs-unwatched-")
    made = [private / "old", private / "new", tmp_path / "m", elsewhere]
    try:
        (private / "old").mkdir()
        tmpfs(private / "old")
        watch = mounts.MountWatch(tmp_path)
        assert watch.leaked() == set()
        (private / "new").mkdir()
        (tmp_path / "m").mkdir()
        for target in made[1:]:
            tmpfs(target)
        assert watch.leaked() == {str(private / "new"), str(tmp_path / "m")}
        late = mounts.watch_below(tempfile.mkdtemp(prefix="mergefs-leakwatch-"))
        made.append(late)
        tmpfs(late)                         # registered before it was mounted: ours
        assert str(late) in watch.leaked()
    finally:
        for target in reversed(made):
            mounts.force_unmount(target)
        for d in (private, elsewhere, made[-1]):
            if os.path.isdir(d):
                shutil.rmtree(d, ignore_errors=True)
    assert watch.leaked() == set()
