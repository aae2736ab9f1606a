"""A views server for tests: ``mergefs views serve`` as a child process.

``ViewsServer`` (a ``mergefs.testing.services.MountService``) starts it on a
private mount point and control socket, waits until it is live, and on
``stop()`` unbinds what the test bound, terminates the server by pid and
makes sure nothing stays mounted (also on failure). ``serving(where)`` is the
tests' fixture body: a server, stopped at the end, whose log must hold no error.
"""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from mergefs.testing import mounts
from mergefs.testing.services import MountService
from mergefs.union.mountctl import bind, control_call, unbind


class ViewsServer(MountService):
    def __init__(self, where: Path):
        super().__init__("views", where)
        self.binds: list[str] = []

    def call(self, **req) -> dict:
        return control_call(self.control, req)

    def add(self, name: str, lowers, upper=None, work=None) -> Path:
        spec = {"lowers": [str(p) for p in lowers], "upper": upper and str(upper),
                "work": work and str(work)}
        return Path(self.call(op="add", name=name, spec=spec)["path"])

    def remove(self, name: str, force: bool = False) -> None:
        self.call(op="remove", name=name, force=force)

    def bind(self, view: Path, target: Path, **kw) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        bind(str(view), str(target), **kw)
        self.binds.append(str(target))
        return target

    def unbind(self, target: Path) -> None:
        unbind(str(target))
        self.binds.remove(str(target))

    def stop(self) -> None:
        for t in reversed(self.binds):
            if mounts.is_mounted(t):
                subprocess.run(["umount", "-l", t], capture_output=True)
        self.binds.clear()
        super().stop()


@contextlib.contextmanager
def serving(where: Path):
    srv = ViewsServer(where)
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.errors(), srv.errors()
