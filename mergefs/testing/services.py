"""A mount service for tests and benchmarks: ``mergefs mount-server`` (``fork``) or
``mergefs views serve`` (``views``) as a child process on private paths.

``MountService(kind, where)`` starts it (``tree``: the mergefs of that source
tree instead, for a before/after benchmark) and waits until it serves; ``left()``
names what it still holds (views: the views; fork: its live forked servers),
``wait_empty()`` waits for that to drain, and ``stop()`` ends it by pid and
unmounts the views mount (lazily if it must), also after a failure.
``program(where)`` writes the lean mount program (``mergefs views
install-program``) for storage.conf's ``mount_program``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("fork", "views")


class MountService:
    def __init__(self, kind: str, where: Path, tree: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown service {kind!r}; one of {KINDS}")
        self.kind, self.where = kind, Path(where)
        self.where.mkdir(parents=True, exist_ok=True)
        os.chmod(self.where, 0o755)
        self.control = str(self.where / f"{kind}.sock")
        self.log = self.where / f"{kind}.log"
        self.mnt = self.where / "views"
        argv = [sys.executable, "-m", "mergefs"]
        if kind == "fork":
            argv += ["mount-server", "--control", self.control]
        else:
            self.mnt.mkdir(exist_ok=True)
            argv += ["views", "serve", "--control", self.control, str(self.mnt)]
        # (-m puts the working directory first on the path: run it in the tree)
        env = None if tree is None else {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf,
                                         stdin=subprocess.DEVNULL, env=env, cwd=tree)
        if not self.proc.stdout.readline().startswith(b"serving"):
            self.stop()
            raise RuntimeError(f"{kind} service did not start: {self.log.read_text()}")

    def left(self) -> list[str]:
        """Views still there, or forked servers still running (not the spare)."""
        from mergefs.union.ctlclient import control_call
        reply = control_call(self.control, {"op": "list"})
        if self.kind == "views":
            return [v["name"] for v in reply["views"]]
        return [str(p) for p in reply["servers"]]

    def wait_empty(self, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := self.left()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def errors(self) -> list[str]:
        """The log's ERROR lines and tracebacks, each traceback with the exception it
        ends with (a failing assert then says which errno, not only where)."""
        found, in_tb = [], False
        for line in self.log.read_text(errors="replace").splitlines():
            if "ERROR" in line or "Traceback" in line:
                found.append(line)
                in_tb = in_tb or "Traceback" in line
            elif in_tb and line and not line[0].isspace():
                found.append(line)                    # the exception that ended it
                in_tb = False
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.kind == "views":
            from mergefs import mounttable
            deadline = time.monotonic() + 5
            while mounttable.is_mounted(self.mnt) and time.monotonic() < deadline:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
                time.sleep(0.05)


def program(where: Path) -> str:
    """The lean mount program (``mergefs views install-program``) in ``where``."""
    from mergefs.mounthelper import install_program
    return install_program(str(where))
