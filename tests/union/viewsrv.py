"""A views server for tests: ``mergefs views serve`` as a child process.

``ViewsServer`` starts it on a private mount point and control socket, waits
until it is live, and on ``stop()`` unbinds what the test bound, terminates
the server by pid and makes sure nothing stays mounted (also on failure).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mergefs.testing import mounts
from mergefs.union.mountctl import bind, control_call, unbind


class ViewsServer:
    def __init__(self, where: Path):
        self.mnt = where / "views"
        self.mnt.mkdir(parents=True)
        os.chmod(where, 0o755)
        self.control = str(where / "views.sock")
        self.log = where / "views.log"
        self.binds: list[str] = []
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mergefs", "views", "serve", "--control", self.control,
                 str(self.mnt)], stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if not line.startswith(b"serving"):
            self.stop()
            raise RuntimeError(f"views server did not start: {self.log.read_text()}")

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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        deadline = time.monotonic() + 5
        while mounts.is_mounted(self.mnt) and time.monotonic() < deadline:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            time.sleep(0.05)

    def errors(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if "ERROR" in line or "Traceback" in line]
