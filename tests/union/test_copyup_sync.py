"""Copy-ups fsynced before a name shows them, on request (U4; kernel overlayfs's default).

Kernel overlayfs fsyncs a copied-up file before it links it into the upper
unless mounted ``volatile``; fuse-overlayfs never does. mergefs does not by
default (one fsync per copy-up made the append step ~5-10x slower on ext4);
``MERGEFS_COPYUP_FSYNC=1`` turns it on for a server, and a volatile mount
never syncs. Checked by tracing the server's fsync calls during the write that
copies a lower file up: one per copied file when on, none otherwise; the bytes
are the same every way.
"""
from __future__ import annotations

import os
import shutil

import pytest

from mergefs.mountspec import MountSpec
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.union import server

from ..conftest import needs
from .test_copyup_fds import traced

pytestmark = [needs("fuse"), pytest.mark.timeout(120)]


@pytest.mark.parametrize("how, synced", [("default", False), ("env", True),
                                         ("env-volatile", False)])
def test_copy_up_fsynced_only_when_asked_and_not_volatile(tmp_path, union_mount, monkeypatch,
                                                          how, synced):
    if os.geteuid() != 0 or not shutil.which("strace"):
        pytest.skip("needs root and strace")
    if how != "default":
        monkeypatch.setenv("MERGEFS_COPYUP_FSYNC", "1")
    layers = materialise_stack([LayerSpec().file("d/a", b"a\n").file("d/b", b"b\n" * 5000)],
                               tmp_path / "layers", "overlay")
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    if how == "env-volatile":        # the fixture's teardown stops it
        mnt, log = tmp_path / "vmnt", tmp_path / "vserver.log"
        mnt.mkdir()
        spec = MountSpec((str(layers[0]),), str(up), str(wk), False, (), volatile=True)
        pid = server.start(spec, str(mnt), "auto", str(log))
        union_mount.started.append((mnt, pid, log))
    else:
        mnt = union_mount(layers, upper=up, work=wk)
        pid = union_mount.started[-1][1]
    os.listdir(mnt / "d")
    out = tmp_path / "strace.out"
    with traced(pid, "fsync,fdatasync", out):
        for name in ("a", "b"):
            with open(mnt / "d" / name, "ab") as f:
                f.write(b"+")
    calls = [line for line in out.read_text().splitlines() if "fsync(" in line]
    assert len(calls) == (2 if synced else 0), calls
    assert (mnt / "d" / "a").read_bytes() == b"a\n+"
    assert (up / "d" / "b").read_bytes() == b"b\n" * 5000 + b"+"
