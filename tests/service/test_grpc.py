"""`mergefs serve` through containerd's Snapshots gRPC API (the Python stubs; containerd's
own Go client runs in test_conformance.py and test_containerd.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from ..conftest import require
from .conftest import grpc, needs_root

pb = pytest.importorskip("snapshotter.serve._proto.snapshots_pb2",
                         reason="stubs not generated (tools/gen_proto.sh)")
pytestmark = [needs_root, pytest.mark.timeout(120)]
GC_ROOT = {"containerd.io/gc.root": "now"}


def mount_all(mounts, target) -> None:
    """What containerd's mount.All does with our answers (binds only, or mount.fuse3)."""
    os.makedirs(target, exist_ok=True)
    for m in mounts:
        if m.type == "overlay":
            subprocess.run(["mount", "-t", "overlay", m.source, str(target), "-o",
                            ",".join(m.options)], check=True)
        elif m.type == "bind":
            subprocess.run(["mount", "--bind", m.source, str(target)], check=True)
            if "ro" in m.options:
                subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        else:                                   # containerd: mount.fuse3 for "fuse3.*" types
            helper, _, subtype = m.type.partition(".")
            env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
            subprocess.run([f"mount.{helper}", m.source, str(target), "-o", ",".join(m.options),
                            "-t", subtype], check=True, env=env)


def umount(target) -> None:
    subprocess.run(["umount", str(target)], check=True)


def code_of(call, *args):
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value.code()


def committed(cl, tmp_path, name, parent, files: dict[str, bytes], key=None, mtime=None,
              root_mtime=True):
    """Prepare KEY over PARENT, write FILES through the mount, commit as NAME.

    ``mtime``: set on what was written (and the root, with ``root_mtime``), as a
    layer tar would."""
    key = key or name + "-active"
    try:
        ms = cl.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=GC_ROOT)).mounts
    except grpc.RpcError as e:                 # prepared by the caller already
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        ms = cl.Mounts(pb.MountsRequest(key=key)).mounts
    mnt = tmp_path / ("mnt-" + key.replace("/", "_").replace(" ", "_"))
    mount_all(ms, mnt)
    try:
        for rel, data in files.items():
            p = mnt / rel
            if data is None:
                os.unlink(p) if not p.is_dir() else subprocess.run(["rm", "-rf", str(p)])
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
        if mtime is not None:
            for rel in (r for r, data in files.items() if data is not None):
                os.utime(mnt / rel, (mtime, mtime))
            if root_mtime:
                os.utime(mnt, (mtime, mtime))
    finally:
        umount(mnt)
    cl.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels={"l": name}))


def test_prepare_commit_view_round_trip(service, tmp_path):
    cl = service.client()
    committed(cl, tmp_path, "ns/1/base", "", {"etc/motd": b"base\n", "bin/sh": b"sh"})
    committed(cl, tmp_path, "ns/1/app", "ns/1/base", {"etc/motd": b"app\n", "bin/sh": None})
    v = cl.View(pb.ViewSnapshotRequest(key="ns/1/v", parent="ns/1/app"))
    assert len(v.mounts) == 1 and (v.mounts[0].type != "bind" or "ro" in v.mounts[0].options)
    mnt = tmp_path / "view"
    mount_all(v.mounts, mnt)
    try:
        assert (mnt / "etc/motd").read_bytes() == b"app\n"
        assert not (mnt / "bin/sh").exists()            # the commit recorded the deletion
        with pytest.raises(OSError):
            (mnt / "new").write_bytes(b"x")               # a view is read-only
    finally:
        umount(mnt)
    info = cl.Stat(pb.StatSnapshotRequest(key="ns/1/app")).info
    assert (info.name, info.parent, info.kind, info.labels["l"]) == \
        ("ns/1/app", "ns/1/base", pb.COMMITTED, "ns/1/app")
    assert cl.Stat(pb.StatSnapshotRequest(key="ns/1/v")).info.kind == pb.VIEW
    assert cl.Mounts(pb.MountsRequest(key="ns/1/v")).mounts == v.mounts     # same view
    cl.Remove(pb.RemoveSnapshotRequest(key="ns/1/v"))
    u = cl.Usage(pb.UsageRequest(key="ns/1/app"))
    assert u.inodes >= 1 and u.size >= 0


def test_error_codes_are_containerds(service, tmp_path):
    cl = service.client()
    C = grpc.StatusCode
    assert code_of(cl.Stat, pb.StatSnapshotRequest(key="nope")) == C.NOT_FOUND
    assert code_of(cl.Mounts, pb.MountsRequest(key="nope")) == C.NOT_FOUND
    assert code_of(cl.Remove, pb.RemoveSnapshotRequest(key="nope")) == C.NOT_FOUND
    assert code_of(cl.Prepare, pb.PrepareSnapshotRequest(key="k", parent="nope")) == C.NOT_FOUND
    cl.Prepare(pb.PrepareSnapshotRequest(key="k"))
    assert code_of(cl.Prepare, pb.PrepareSnapshotRequest(key="k")) == C.ALREADY_EXISTS
    assert code_of(cl.View, pb.ViewSnapshotRequest(key="k")) == C.ALREADY_EXISTS
    cl.Commit(pb.CommitSnapshotRequest(name="c", key="k"))
    cl.Prepare(pb.PrepareSnapshotRequest(key="child", parent="c"))
    assert code_of(cl.Remove, pb.RemoveSnapshotRequest(key="c")) == C.FAILED_PRECONDITION
    assert code_of(cl.Prepare, pb.PrepareSnapshotRequest(key="")) == C.INVALID_ARGUMENT
    assert code_of(cl.Commit, pb.CommitSnapshotRequest(name="c", key="child")) == \
        C.ALREADY_EXISTS
    cl.Remove(pb.RemoveSnapshotRequest(key="child"))
    cl.Remove(pb.RemoveSnapshotRequest(key="c"))
    assert code_of(cl.Stat, pb.StatSnapshotRequest(key="c")) == C.NOT_FOUND


def test_list_streams_in_blocks_and_filters(service):
    cl = service.client()
    for i in range(230):
        cl.View(pb.ViewSnapshotRequest(key=f"v{i:03d}", labels={"n": str(i % 2)}))
    blocks = list(cl.List(pb.ListSnapshotsRequest()))
    assert [len(b.info) for b in blocks] == [100, 100, 30]
    odd = [i.name for b in cl.List(pb.ListSnapshotsRequest(filters=["labels.n==1"]))
           for i in b.info]
    assert len(odd) == 115 and all(int(n[1:]) % 2 for n in odd)
    assert [i.name for b in cl.List(pb.ListSnapshotsRequest(filters=["name==v007", "name==v009"]))
            for i in b.info] == ["v007", "v009"]


def test_update_labels(service):
    cl = service.client()
    cl.View(pb.ViewSnapshotRequest(key="v", labels={"a": "1", "b": "2"}))
    info = pb.Info(name="v", labels={"a": "9", "c": "3"})
    req = pb.UpdateSnapshotRequest(info=info)
    req.update_mask.paths.extend(["labels.a", "labels.b"])
    got = cl.Update(req).info
    assert dict(got.labels) == {"a": "9"}
    bad = pb.UpdateSnapshotRequest(info=pb.Info(name="v"))
    bad.update_mask.paths.append("parent")
    assert code_of(cl.Update, bad) == grpc.StatusCode.INVALID_ARGUMENT


def test_same_content_committed_twice_is_stored_once(service, tmp_path):
    cl = service.client()
    committed(cl, tmp_path, "one", "", {"f": b"same"}, mtime=1e9)
    committed(cl, tmp_path, "two", "", {"f": b"same"}, mtime=1e9)
    service.stop()
    from snapshotter.api import Snapshotter
    with Snapshotter(service.root) as sn:
        layers = [d for d in sn.ls() if d["kind"] == "layer"]
    assert len(layers) == 1, layers


def test_garbage_and_a_vanishing_client_do_not_hurt(service):
    for junk in (os.urandom(4096), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(64), b"\0"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(service.socket))
            s.sendall(junk)
            s.settimeout(5)
            try:
                s.recv(100)
            except OSError:
                pass
    cl = service.client()
    for i in range(150):
        cl.View(pb.ViewSnapshotRequest(key=f"v{i}"))
    ch = service.channel()                 # a List cut off after its first block
    stream = pb_grpc().SnapshotsStub(ch).List(pb.ListSnapshotsRequest())
    next(stream)
    stream.cancel()
    ch.close()
    with socket.socket(socket.AF_UNIX) as s:          # a client gone mid-request
        s.connect(str(service.socket))
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00")
    assert cl.Stat(pb.StatSnapshotRequest(key="v3")).info.name == "v3"
    assert service.proc.poll() is None


def pb_grpc():
    from snapshotter.serve._proto import snapshots_pb2_grpc
    return snapshots_pb2_grpc


def test_sigterm_stops_cleanly(service):
    cl = service.client()
    cl.Prepare(pb.PrepareSnapshotRequest(key="a"))
    cl.Mounts(pb.MountsRequest(key="a"))
    assert service.stop() == 0
    assert not service.socket.exists()
    with open("/proc/self/mounts") as f:
        assert str(service.state) not in f.read()


def test_kill9_then_restart_recovers_actives_and_views(service_factory, tmp_path):
    svc = service_factory()
    cl = svc.client()
    committed(cl, tmp_path, "base", "", {"etc/os": b"base\n"})
    ms = cl.Prepare(pb.PrepareSnapshotRequest(key="ctr", parent="base")).mounts
    mnt = tmp_path / "rootfs"
    mount_all(ms, mnt)                        # a "container" is using it
    (mnt / "written").write_bytes(b"before the crash\n")
    os.sync()
    svc.kill()
    time.sleep(0.2)
    with pytest.raises(OSError):
        os.listdir(mnt)                        # its server is gone
    subprocess.run(["umount", "-l", str(mnt)], check=True)   # containerd's task cleanup
    svc.start()
    cl = svc.client()
    assert cl.Stat(pb.StatSnapshotRequest(key="ctr")).info.kind == pb.ACTIVE
    ms = cl.Mounts(pb.MountsRequest(key="ctr")).mounts
    mount_all(ms, mnt)
    try:
        assert (mnt / "written").read_bytes() == b"before the crash\n"
        assert (mnt / "etc/os").read_bytes() == b"base\n"
    finally:
        umount(mnt)
    views = [v for v in os.listdir(svc.state / "views")]
    assert len(views) == 1, views             # re-created at start from the store's records
    assert svc.stop() == 0


def test_unpack_keys_get_kernel_overlayfs_and_commit_the_same(service, tmp_path):
    """containerd's extract-* keys are written through kernel overlayfs; the commit
    is what the same writes through a view give."""
    from snapshotter.serve.mounts import is_unpack_key, kernel_has_overlay
    assert is_unpack_key("default/3/extract-861070036-Kx7K sha256:b5e0")
    assert not is_unpack_key("default/3/sha256:b5e0") and not is_unpack_key("mount:/x/extract-1")
    require("overlay")
    cl = service.client()
    committed(cl, tmp_path, "base", "", {"d/a": b"a", "d/b": b"b"}, mtime=1e9)
    files = {"d/a": None, "d/c": b"c"}
    key = "ns/1/extract-1 sha256:x"
    ms = cl.Prepare(pb.PrepareSnapshotRequest(key=key, parent="base")).mounts
    assert [m.type for m in ms] == ["overlay"]
    committed(cl, tmp_path, "via-overlay", "base", files, key=key, mtime=1e9, root_mtime=False)
    committed(cl, tmp_path, "via-view", "base", files, key="ns/1/plain", mtime=1e9,
              root_mtime=False)
    for name in ("via-overlay", "via-view"):
        v = cl.View(pb.ViewSnapshotRequest(key=name + "-v", parent=name))
        mnt = tmp_path / (name + "-mnt")
        mount_all(v.mounts, mnt)
        try:
            assert sorted(os.listdir(mnt / "d")) == ["b", "c"]
        finally:
            umount(mnt)


def test_utime_on_the_root_of_a_writable_view(service, tmp_path):
    cl = service.client()
    committed(cl, tmp_path, "base", "", {"f": b"f"})
    committed(cl, tmp_path, "top", "base", {"g": b"g"}, key="plain", mtime=1e9)
