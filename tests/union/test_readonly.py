"""Read-only union, handler level (no mount): docs/semantics.md U1-U3, S2, H1, A3."""
from __future__ import annotations

import errno
import os
import random

import pyfuse3
import pytest
from pyfuse3 import FUSEError

from mergefs.testing import model
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.testing.tree import assert_same, model_view


def sample_stack() -> list[LayerSpec]:
    base = (LayerSpec().file("etc/passwd", b"root:x:0:0\n", mode=0o644)
            .file("etc/shadow", b"secret", mode=0o600)
            .file("bin/busybox", b"BB" * 100, mode=0o755).hardlink("bin/sh", "bin/busybox")
            .symlink("lib", "usr/lib").dir("usr/lib").file("usr/lib/libc.so", b"libc")
            .file("var/old/a", b"a").file("var/keep", b"k").fifo("run/fifo")
            .file("x/attr", b"x", xattrs={"user.mergefs": b"yes"}))
    mid = (LayerSpec().whiteout("var/old").file("etc/passwd", b"root:x:0:0:new\n")
           .opaque_dir("usr").file("usr/bin/env", b"env").dir("lib2", mode=0o700))
    top = (LayerSpec().file("etc/hosts", b"127.0.0.1\n", uid=12, gid=34)
           .dir("bin/sub").symlink("etc/link", "/etc"))
    return [base, mid, top]


@pytest.mark.parametrize("fmt", ["overlay", "oci"])
async def test_U1_view_equals_model(tmp_path, make_driver, fmt):
    specs = sample_stack()
    drv = make_driver(materialise_stack(specs, tmp_path, fmt))
    assert_same(await drv.capture(), model_view(model.merge(specs)), "union vs model")
    await drv.finish()


def random_stack(rng: random.Random, nlayers: int) -> list[LayerSpec]:
    names = ["a", "b", "c", "d"]
    specs = []
    for n in range(nlayers):
        s = LayerSpec()
        used = set()
        for _ in range(rng.randint(1, 6)):
            path = "/".join(rng.choice(names) for _ in range(rng.randint(1, 3)))
            if any(u == path or u.startswith(path + "/") or path.startswith(u + "/")
                   for u in used):
                continue
            used.add(path)
            op = rng.choice(["file", "dir", "symlink", "whiteout", "opaque"])
            try:
                if op == "file":
                    s.file(path, f"{n}:{path}".encode(), mode=rng.choice([0o644, 0o600]))
                elif op == "dir":
                    s.dir(path)
                elif op == "symlink":
                    s.symlink(path, "../" + path)
                elif op == "whiteout":
                    s.whiteout(path)
                else:
                    s.opaque_dir(path)
            except ValueError:
                pass
        specs.append(s)
    return specs


@pytest.mark.parametrize("seed", range(8))
async def test_U1_random_stacks_equal_model(tmp_path, make_driver, seed):
    rng = random.Random(seed)
    specs = random_stack(rng, rng.randint(1, 5))
    fmt = ("overlay", "oci")[seed % 2]
    drv = make_driver(materialise_stack(specs, tmp_path, fmt))
    assert_same(await drv.capture(), model_view(model.merge(specs)), f"seed {seed}")
    await drv.finish()


async def test_U2_hardlinks_share_inode_and_numbers_are_stable(tmp_path, make_driver):
    drv = make_driver(materialise_stack(sample_stack(), tmp_path))
    a = await drv.lookup("bin/busybox")
    b = await drv.lookup("bin/sh")
    assert a == b
    assert (await drv.ops.getattr(a)).st_nlink == 2
    other = await drv.lookup("etc/passwd")
    assert len({a, other}) == 2
    await drv.finish()                       # everything forgotten ...
    assert await drv.lookup("bin/sh") == a   # ... and the numbers are the same
    assert await drv.lookup("etc/passwd") == other
    await drv.finish()


async def test_U2_readdirplus_counts_lookups_and_offsets_are_stable(tmp_path, make_driver):
    spec = LayerSpec()
    for i in range(50):
        spec.file(f"d/f{i:03}", b"x")
    drv = make_driver(materialise_stack([spec], tmp_path))
    d = await drv.lookup("d")
    whole = await drv.readdir(d)
    chunked = await drv.readdir(d, chunk=7)
    assert [n for n, *_ in whole] == [n for n, *_ in chunked] == sorted(n for n, *_ in whole)
    assert len(whole) == 50
    resumed = await drv.readdir(d, start=whole[19][2])
    assert [n for n, *_ in resumed] == [n for n, *_ in whole[20:]]
    inode = drv.ops.inodes.get(whole[0][1].st_ino)
    assert inode.lookups == 2           # one per readdirplus that returned it
    await drv.finish()


async def test_U3_writes_are_erofs(tmp_path, make_driver):
    drv = make_driver(materialise_stack(sample_stack(), tmp_path))
    ino = await drv.lookup("etc/passwd")
    ctx = drv.ctx
    calls = [drv.ops.open(ino, os.O_WRONLY, ctx), drv.ops.open(ino, os.O_RDONLY | os.O_TRUNC, ctx),
             drv.ops.unlink(1, b"etc", ctx), drv.ops.rmdir(1, b"etc", ctx),
             drv.ops.mkdir(1, b"new", 0o755, ctx), drv.ops.create(1, b"new", 0o644, os.O_WRONLY, ctx),
             drv.ops.symlink(1, b"s", b"t", ctx), drv.ops.link(ino, 1, b"l", ctx),
             drv.ops.mknod(1, b"n", 0o600, 0, ctx), drv.ops.rename(1, b"etc", 1, b"e", 0, ctx),
             drv.ops.setxattr(ino, b"user.a", b"1", ctx), drv.ops.removexattr(ino, b"user.a", ctx),
             drv.ops.setattr(ino, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, ctx)]
    for call in calls:
        with pytest.raises(FUSEError) as e:
            await call
        assert e.value.errno == errno.EROFS
    await drv.finish()


async def test_S2_layer_symlinks_are_never_followed(tmp_path, make_driver):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"host secret")
    spec = (LayerSpec().symlink("etc", str(tmp_path / "outside"))
            .symlink("up", "../outside").symlink("f", str(tmp_path / "outside" / "secret")))
    drv = make_driver(materialise_stack([spec], tmp_path / "layers"))
    etc = await drv.lookup("etc")
    assert await drv.ops.readlink(etc) == os.fsencode(tmp_path / "outside")
    for path in ("etc/secret", "up/secret"):
        with pytest.raises(FUSEError) as e:
            await drv.lookup(path)
        assert e.value.errno in (errno.ENOTDIR, errno.ENOENT)
    with pytest.raises(FUSEError) as e:
        await drv.ops.open(await drv.lookup("f"), os.O_RDONLY, drv.ctx)
    assert e.value.errno == errno.ELOOP
    await drv.finish()


async def test_A3_overlay_xattrs_hidden(tmp_path, make_driver):
    specs = [LayerSpec().file("d/a", b"1"), LayerSpec().opaque_dir("d", xattrs={"user.k": b"v"})]
    drv = make_driver(materialise_stack(specs, tmp_path, "overlay"))
    d = await drv.lookup("d")
    assert await drv.ops.listxattr(d) == [b"user.k"]
    assert await drv.ops.getxattr(d, b"user.k") == b"v"
    with pytest.raises(FUSEError) as e:
        await drv.ops.getxattr(d, b"trusted.overlay.opaque")
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(FUSEError) as e:
        await drv.ops.getxattr(d, b"user.missing")
    assert e.value.errno == pyfuse3.ENOATTR
    assert await drv.readdir(d) == []
    await drv.finish()


async def test_lookup_missing_is_enoent_and_statfs(tmp_path, make_driver):
    drv = make_driver(materialise_stack(sample_stack(), tmp_path))
    with pytest.raises(FUSEError) as e:
        await drv.lookup("nope")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(FUSEError) as e:
        await drv.ops.getattr(999999)
    assert e.value.errno == errno.ENOENT
    assert (await drv.ops.statfs(drv.ctx)).f_bsize > 0
    await drv.finish()


async def test_unexpected_error_is_eio(tmp_path, make_driver, monkeypatch, caplog):
    drv = make_driver(materialise_stack(sample_stack(), tmp_path))
    monkeypatch.setattr(drv.ops.view, "readlink", lambda inode: 1 / 0)
    with pytest.raises(FUSEError) as e:
        await drv.ops.readlink(await drv.lookup("lib"))
    assert e.value.errno == errno.EIO
    assert "ZeroDivisionError" in caplog.text
    await drv.finish()


async def test_600_layers(tmp_path, make_driver):
    specs = [LayerSpec().file(f"f{i}", str(i).encode()).file("shared", str(i).encode())
             .dir("d").file(f"d/{i}", b"") for i in range(600)]
    specs[300].whiteout("f0")
    drv = make_driver(materialise_stack(specs, tmp_path))
    names = [n for n, *_ in await drv.readdir(1)]
    assert len(names) == 599 + 2 and b"f0" not in names
    assert await drv.read("shared") == b"599"
    assert len(await drv.readdir(await drv.lookup("d"))) == 600
    await drv.finish()


async def test_no_open_mode_reads_and_lists_by_inode(tmp_path):
    """With a pyfuse3 that passes the inode as fh (no-open), open/opendir are ENOSYS
    and read/readdir take the inode; a writable view never uses no-open."""
    from mergefs.layer import Layer
    from mergefs.union.ops import UnionOperations
    from mergefs.union.view import UnionView
    from .conftest import Driver
    view = UnionView([Layer(p) for p in materialise_stack(sample_stack(), tmp_path)])
    try:
        drv = Driver(UnionOperations(view, no_open=True))
        etc = await drv.lookup("etc")
        for call in (drv.ops.open(etc, os.O_RDONLY, drv.ctx), drv.ops.opendir(etc, drv.ctx)):
            with pytest.raises(FUSEError) as e:
                await call
            assert e.value.errno == errno.ENOSYS
        got = []

        def reply(token, name, attrs, next_id):
            got.append((name, next_id))
            drv._hold(attrs.st_ino)
            return len(got) < 2
        orig, pyfuse3.readdir_reply = pyfuse3.readdir_reply, reply
        try:
            await drv.ops.readdir(etc, 0, None)
            await drv.ops.readdir(etc, got[0][1], None)
        finally:
            pyfuse3.readdir_reply = orig
        assert [n for n, _ in got] == [b"hosts", b"link", b"link"]   # 2nd call resumes at 1
        passwd = await drv.lookup("etc/passwd")
        assert await drv.ops.read(passwd, 5, 100) == b"x:0:0:new\n"
        await drv.finish()
        drv.ops.close()
    finally:
        view.close()


def test_public_api_is_pinned():
    import mergefs.union as union
    assert sorted(union.__all__) == ["UnionOperations", "UnionView", "WritableView",
                                     "clean_stale", "is_mounted", "serve", "start", "unmount"]
    assert all(hasattr(union, name) for name in union.__all__)
