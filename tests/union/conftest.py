"""Fixtures for the union tests: a handler driver (no mount) and a real-mount tier.

``Driver`` calls the ``Operations`` handlers directly with a fake request
context, the way s3ql's t3 tests do; it remembers every lookup it caused so
``finish()`` can forget them all and check the invariants (no inode left with
a count, no open handle).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
from dataclasses import dataclass

import pyfuse3
import pytest

from mergefs.layer import Layer
from mergefs.testing.tree import View, Attrs, _KINDS, _groups
from mergefs.union.ops import UnionOperations
from mergefs.union.view import UnionView


@dataclass
class FakeCtx:
    uid: int = 0
    gid: int = 0
    pid: int = os.getpid()
    umask: int = 0o022


class Driver:
    """Drive UnionOperations like the kernel would, counting lookups."""

    def __init__(self, ops: UnionOperations):
        self.ops = ops
        self.ctx = FakeCtx()
        self.held: dict[int, int] = {}      # inode -> lookups we owe a forget for

    def _hold(self, ino: int) -> int:
        self.held[ino] = self.held.get(ino, 0) + 1
        return ino

    async def lookup(self, path: bytes | str) -> int:
        ino = pyfuse3.ROOT_INODE
        for part in os.fsencode(path).strip(b"/").split(b"/"):
            if part:
                entry = await self.ops.lookup(ino, part, self.ctx)
                if entry.st_ino == 0:          # a negative entry: the kernel says ENOENT
                    raise pyfuse3.FUSEError(errno.ENOENT)
                ino = self._hold(entry.st_ino)
        return ino

    def made(self, entry: pyfuse3.EntryAttributes) -> int:
        """Count the lookup a create/mkdir/mknod/symlink/link reply gave the kernel."""
        return self._hold(entry.st_ino)

    async def create(self, parent: int, name: bytes, data: bytes = b"") -> int:
        fi, entry = await self.ops.create(parent, name, 0o644, os.O_WRONLY, self.ctx)
        try:
            if data:
                await self.ops.write(fi.fh, 0, data)
        finally:
            await self.ops.release(fi.fh)
        return self.made(entry)

    async def mkdir(self, parent: int, name: bytes) -> int:
        return self.made(await self.ops.mkdir(parent, name, 0o755, self.ctx))

    async def getattr(self, path) -> pyfuse3.EntryAttributes:
        return await self.ops.getattr(await self.lookup(path), self.ctx)

    async def readdir(self, ino: int, chunk: int = 1 << 30, start: int = 0) -> list:
        """[(name, attrs, next_id)], read ``chunk`` entries per readdir call."""
        fh = await self.ops.opendir(ino, self.ctx)
        out: list = []
        try:
            while got := await self.readdir_call(fh, start, chunk):
                out += got
                start = got[-1][2]
            return out
        finally:
            await self.ops.releasedir(fh)

    async def readdir_call(self, fh: int, start: int, n: int) -> list:
        """One READDIR of at most ``n`` entries from ``start`` (``fh``: a handle, or
        the inode under no-open): [(name, attrs, next_id)]."""
        got: list = []

        def reply(token, name, attrs, next_id):
            if len(got) >= n:
                return False
            got.append((name, attrs, next_id))
            self._hold(attrs.st_ino)
            return True

        orig, pyfuse3.readdir_reply = pyfuse3.readdir_reply, reply
        try:
            await self.ops.readdir(fh, start, None)
        finally:
            pyfuse3.readdir_reply = orig
        return got

    async def read(self, path, flags=os.O_RDONLY) -> bytes:
        ino = await self.lookup(path)
        fi = await self.ops.open(ino, flags, self.ctx)
        try:
            data, off = b"", 0
            while chunk := await self.ops.read(fi.fh, off, 1 << 20):
                data += chunk
                off += len(chunk)
            return data
        finally:
            await self.ops.release(fi.fh)

    async def capture(self) -> View:
        """The merged tree as mergefs.testing.tree.View, through the handlers only."""
        entries: dict[bytes, Attrs] = {}
        inodes: dict[int, list[bytes]] = {}
        stack = [(b"", pyfuse3.ROOT_INODE)]
        while stack:
            rel, ino = stack.pop()
            a = await self.ops.getattr(ino, self.ctx)
            kind = _KINDS[stat.S_IFMT(a.st_mode)]
            target = await self.ops.readlink(ino, self.ctx) if kind == "symlink" else b""
            content = ""
            if kind == "file":
                content = hashlib.sha256(await self.read(rel)).hexdigest()
            names = await self.ops.listxattr(ino, self.ctx)
            xattrs = []
            for n in names:
                xattrs.append((n.decode(), await self.ops.getxattr(ino, n, self.ctx)))
            xattrs = tuple(sorted(xattrs))
            entries[rel] = Attrs(kind, a.st_mode, a.st_uid, a.st_gid,
                                 0 if kind == "dir" else a.st_size, a.st_mtime_ns,
                                 a.st_rdev if kind in ("char", "block") else 0,
                                 target, content, xattrs)
            if kind == "dir":
                for name, attrs, _ in await self.readdir(ino):
                    stack.append((os.path.join(rel, name) if rel else name, attrs.st_ino))
            else:
                inodes.setdefault(ino, []).append(rel)
        return View(entries, _groups(inodes.values()))

    async def finish(self) -> None:
        """Forget everything we were handed; then only the root may be live."""
        assert self.ops.check() == []
        assert self.ops.handles == {}, f"open handles left: {self.ops.handles}"
        await self.ops.forget(list(self.held.items()))
        self.held.clear()
        live = [i for i in self.ops.inodes if i.number != pyfuse3.ROOT_INODE]
        assert live == [], f"inodes still live after forgetting everything: {live}"
        assert self.ops.check() == []


@pytest.fixture
def make_driver():
    """make_driver(layer_paths_bottom_first, upper=None, work=None) -> Driver."""
    views = []

    def make(layers, upper=None, work=None, fmt="auto"):
        lowers = [Layer(p, fmt) for p in layers]
        if upper is None:
            view = UnionView(lowers)
        else:
            from mergefs.union.writable import WritableView
            view = WritableView(lowers, upper, work)
        views.append(view)
        return Driver(UnionOperations(view))

    yield make
    for v in views:
        v.close()


# -- the real-mount tier ---------------------------------------------------
import signal
import time

from mergefs.mountspec import MountSpec
from mergefs.union import server


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False            # our child, now reaped
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_server(mnt, pid: int) -> None:
    """Lazy unmount, then terminate, then kill the server by pid (never by name)."""
    if server.is_mounted(str(mnt)):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    for sig, wait in ((None, 2.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        if sig is not None and _alive(pid):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _alive(pid):
            return


@pytest.fixture(params=["default-opens", "real-opens"])
def union_mount(tmp_path, request, monkeypatch):
    """union_mount(layers, upper=None, work=None, allow_other=False, fmt=...) -> mount point.

    The server runs detached exactly as ``mergefs mount`` starts it; teardown
    unmounts and stops it even when the test failed, and fails the test if the
    server logged an unexpected error. Each test runs twice: with the installed
    pyfuse3's default (no-open on read-only mounts when bootstrap installed the
    inode-fh build; writable ones too with a v4 build: ``mount.writable_no_open``)
    and with real opens forced (stock pyfuse3 behaviour).
    """
    if request.param == "real-opens":
        monkeypatch.setenv("MERGEFS_NO_OPEN", "0")
    started = []

    def mount(layers, upper=None, work=None, allow_other=False, fmt="auto", options=(),
              mnt=None):
        n = len(started)
        if mnt is None:
            mnt = tmp_path / f"mnt{n}"
            mnt.mkdir()
        log = tmp_path / f"server{n}.log"
        spec = MountSpec(tuple(map(str, layers)), upper and str(upper), work and str(work),
                         allow_other, tuple(options))
        pid = server.start(spec, str(mnt), fmt, str(log))
        started.append((mnt, pid, log))
        return mnt

    mount.started = started
    # does a writable mount run no-open here (copy-up at the first write, not at open)?
    mount.writable_no_open = server.pyfuse3_passes_inode(writes=True)
    yield mount
    errors = []
    for mnt, pid, log in reversed(started):
        stop_server(mnt, pid)
        text = log.read_text() if log.exists() else ""
        if "failed unexpectedly" in text or "Traceback" in text:
            errors.append(f"{log}:\n{text[-3000:]}")
    assert not errors, "\n".join(errors)
