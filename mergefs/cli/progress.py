"""Progress of long work on stderr: a rich bar on a terminal, nothing otherwise.

The library never prints and never imports rich: a long operation takes a
``progress`` callable, ``progress(done, total=None)``, and calls it with a
running count of the units it names (entries, bytes), as often as it likes.
This module turns such calls into a display; every verb with long work
(import, export, merge, and push/pull later) gets its callable here::

    with progress.task(args, "exporting", unit="bytes") as report:
        library_call(..., progress=report)       # report is None when quiet

Quiet (``report`` is None, the library skips the calls) when stderr is not a
terminal or with ``--quiet``. Nothing shows for work under ``SHOW_AFTER``
seconds ($MERGEFS_PROGRESS_AFTER, default 1). No thread draws the bar: it is redrawn from the callback, at most
every ``REFRESH`` seconds, because a farm build forks its workers and a
caller with extra threads would not (see ``mergefs.farm.schedule``).
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

SHOW_AFTER = float(os.environ.get("MERGEFS_PROGRESS_AFTER", "1.0"))   # seconds
REFRESH = 0.1

Report = Callable[..., None]


def wanted(args, stream=None) -> bool:
    """Show progress: stderr is a terminal and ``--quiet`` was not given."""
    stream = sys.stderr if stream is None else stream
    return not getattr(args, "quiet", False) and stream.isatty()


class _Display:
    """One rich Progress line, started lazily once the work has run ``SHOW_AFTER`` s."""

    def __init__(self, description: str, unit: str, stream):
        self.description, self.unit, self.stream = description, unit, stream
        self.t0 = time.monotonic()
        self.last = 0.0
        self.bar = None
        self.task = None
        self.done, self.total = 0, None

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, total if total is not None else self.total
        now = time.monotonic()
        if now - self.last < REFRESH or now - self.t0 < SHOW_AFTER:
            return
        self.last = now
        if self.bar is None:
            self._start()
        self.bar.update(self.task, completed=self.done, total=self.total)
        self.bar.refresh()

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                                   TextColumn, TimeElapsedColumn, TransferSpeedColumn)
        count = ([DownloadColumn(), TransferSpeedColumn()] if self.unit == "bytes"
                 else [MofNCompleteColumn(), TextColumn(self.unit)])
        self.bar = Progress(TextColumn("mergefs: {task.description}"), BarColumn(), *count,
                            TimeElapsedColumn(), console=Console(file=self.stream),
                            auto_refresh=False, transient=False)
        self.task = self.bar.add_task(self.description, total=self.total)
        self.bar.start()

    def finish(self, ok: bool) -> None:
        if self.bar is None:
            return
        if ok:
            self.bar.update(self.task, completed=self.done,
                            total=self.total if self.total is not None else self.done)
        self.bar.refresh()
        self.bar.stop()


@contextmanager
def task(args, description: str, unit: str = "entries", stream=None) -> Iterator[Report | None]:
    """A ``progress`` callable for one piece of long work, or None when quiet."""
    stream = sys.stderr if stream is None else stream
    if not wanted(args, stream):
        yield None
        return
    display = _Display(description, unit, stream)
    ok = False
    try:
        yield display
        ok = True
    finally:
        display.finish(ok)
