"""Crash injection for tests: ``MERGEFS_TEST_KILL_AT=STEP`` SIGKILLs the process at STEP;
``MERGEFS_TEST_STALL_AT=STEP`` makes the thread at STEP hang (``STALLS``: what a
stuck call does to the service's shutdown).

Steps are named ``OP:WHEN`` (``merge:after-build``); every step is listed in
``STEPS`` so the crash tests can drive each one with a real subprocess. The
check costs one dict lookup when the variable is unset.
"""
from __future__ import annotations

import os
import signal

STEPS = (
    "import:mid-copy",          # half the files copied into staging
    "import:after-build",       # staged and digested, nothing published
    "import:after-publish-dir", # renamed into snapshots/, metadata not committed
    "merge:after-build",
    "merge:after-publish-dir",
    "commit:after-build",
    "commit:after-publish-dir",
    "move-commit:after-move",   # upper moved into the layer's dir, transaction not committed
    "move-commit:after-commit", # committed; the active snapshot's directory still there
    "prune:after-mark",         # rows marked deleting, directories still in place
    "prune:after-trash",        # one directory moved to staging, its row not yet gone
    "unpack:mid-extract",       # a packed layer half read: its tree half made in staging
    "unpack:after-extract",     # extracted and checked in staging, nothing published
    "unpack:after-rename",      # tree renamed into the layer's dir, the row still packed
)


def kill_point(step: str) -> None:
    """Die here, without any clean-up, if the test asked for it."""
    if os.environ.get("MERGEFS_TEST_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


STALLS = (
    "serve:commit",             # a Commit hangs holding the service's writer lock
    "serve:views-loop",         # the views server's loop hangs (a stuck FUSE handler)
)
STALL_S = 600.0


def stalling(step: str) -> bool:
    return os.environ.get("MERGEFS_TEST_STALL_AT") == step


def stall_point(step: str) -> None:
    """Hang here (a long sleep) if the test asked for it."""
    if stalling(step):
        import time
        time.sleep(STALL_S)
