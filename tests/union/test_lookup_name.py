"""A cold LOOKUP looks its name up in each layer, as kernel overlayfs does, and lists
no layer directory (``UnionView.read_name``); READDIR still lists, and a listing at
hand answers lookups. The answers are the listing's (M1-M3, D1-D3, R1, U8)."""
from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path

import pyfuse3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergefs.layer import Layer
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.testing.strategies import stacks
from mergefs.union.lowercache import LowerCache, SharedUnionView
from mergefs.union.view import UnionView
from mergefs.union.writable import WritableView

from ..conftest import needs_root
from ..core.test_lookup_name import decorate, layer_paths
from .test_copyup_fds import traced

BIG = 5000


def big_stack() -> list[LayerSpec]:
    """A 5k-entry directory over three layers: a whiteout, an opaque subdirectory,
    a directory merged from two layers, a file replaced in the top layer."""
    base = LayerSpec().file("big/sub/low", b"l").file("big/opq/hidden", b"h").file("etc/x", b"x")
    for i in range(BIG):
        base = base.file(f"big/f{i:05d}", b"%d" % i)
    mid = (LayerSpec().whiteout("big/f00007").opaque_dir("big/opq").file("big/opq/top", b"t")
           .file("big/sub/mid", b"m"))
    top = LayerSpec().file("big/f00009", b"top").file("new", b"n")
    return [base, mid, top]


LOOKED_UP = {"big/f01234": b"1234", "big/f00009": b"top", "big/sub/low": b"l",
             "big/sub/mid": b"m", "big/opq/top": b"t"}
ABSENT = ["big/f00007", "big/opq/hidden", "big/nothing"]


def views(tmp_path, layers):
    yield "read-only", UnionView([Layer(str(p)) for p in layers])
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    yield "writable", WritableView([Layer(str(p)) for p in layers], tmp_path / "up",
                                   tmp_path / "wk")
    yield "shared", SharedUnionView([Layer(str(p)) for p in layers], LowerCache())


def listed_paths(view) -> list:
    """The (layer, path)s of the layer directories ``view`` reads whole from now on."""
    got, read = [], view.resolver.layer_dir
    view.resolver.layer_dir = lambda i, p: got.append((i, p)) or read(i, p)
    return got


async def test_M1_D1_D3_cold_lookup_lists_no_layer_directory(tmp_path, make_driver):
    """Handlers: looking up names (present, replaced, whited out, hidden by an opaque
    directory, absent) in a 5k-entry directory lists none of its layer directories,
    and gives the answers a listing gives; READDIR then lists them. (The root, which
    every path's walk looks a name up in, is listed after NAMES_PER_LISTING names.)"""
    from .conftest import Driver
    from mergefs.union.ops import UnionOperations

    layers = materialise_stack(big_stack(), tmp_path / "layers", "overlay")
    for kind, view in views(tmp_path, layers):
        drv = Driver(UnionOperations(view))
        listed = listed_paths(view)
        try:
            found = {}
            for path in LOOKED_UP:
                found[path] = await drv.getattr(path)
            for path in ABSENT:
                with pytest.raises(pyfuse3.FUSEError) as e:
                    await drv.lookup(path)
                assert e.value.errno == errno.ENOENT
            assert {p for _, p in listed} <= {b""}, (kind, listed)
            for path, data in LOOKED_UP.items():
                assert await drv.read(path) == data
            big = await drv.lookup("big")
            names = {n for n, _, _ in await drv.readdir(big)}
            assert (0, b"big") in listed                   # READDIR lists
            assert len(names) == BIG - 1 + 2 and b"f00007" not in names
            listed = view.resolver.dirs_listed
            for path, attrs in found.items():                # from the listing now
                again = await drv.getattr(path)
                assert (again.st_ino, again.st_mode, again.st_size) == \
                    (attrs.st_ino, attrs.st_mode, attrs.st_size), (kind, path)
            assert view.resolver.dirs_listed == listed
            await drv.finish()
        finally:
            view.close()


@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
def test_U1_cold_lookup_on_a_mount_reads_no_directory(tmp_path, union_mount, writable):
    """A mounted server, cold: stat of files in a 5k-entry directory (and of names it
    does not show) makes no getdents64 (strace of the server); ``ls`` then does."""
    if os.geteuid() != 0 or not shutil.which("strace"):
        pytest.skip("needs root and strace")
    layers = materialise_stack(big_stack(), tmp_path / "layers", "overlay")
    extra = {}
    if writable:
        for name in ("up", "wk"):
            (tmp_path / name).mkdir()
        extra = dict(upper=tmp_path / "up", work=tmp_path / "wk")
    mnt = union_mount(layers, **extra)
    _, pid, _ = union_mount.started[-1]
    assert (mnt / "new").read_bytes() == b"n"        # the server's start-up done
    out = tmp_path / "strace.out"
    with traced(pid, "getdents64", out):
        for path, data in LOOKED_UP.items():
            assert (mnt / path).read_bytes() == data
        for path in ABSENT:
            assert not os.path.lexists(mnt / path)
    assert "getdents64" not in out.read_text(), out.read_text()
    with traced(pid, "getdents64", out):
        assert len(os.listdir(mnt / "big")) == BIG + 1
    assert "getdents64" in out.read_text()
    if writable:                  # an append copies up; the merged view stays right
        with open(mnt / "big/f01234", "ab") as f:
            f.write(b"+")
        assert (mnt / "big/f01234").read_bytes() == b"1234+"
        assert sorted(os.listdir(tmp_path / "up" / "big")) == ["f01234"]


async def test_a_directory_is_listed_once_looking_names_up_costs_as_much(tmp_path, make_driver):
    """In a small directory the first NAMES_PER_LISTING names are looked up alone;
    the next lookup reads the listing, which answers every lookup after it. In the
    5k-entry directory a hundred names are looked up alone (its size says a listing
    costs more)."""
    from mergefs.union import view as view_mod
    from .conftest import Driver
    from mergefs.union.ops import UnionOperations

    layers = materialise_stack(big_stack(), tmp_path / "layers", "overlay")
    for kind, view in views(tmp_path, layers):
        drv = Driver(UnionOperations(view))
        try:
            sub = await drv.lookup("big/sub")
            big = await drv.lookup("big")
            listed = listed_paths(view)
            names = [b"low", b"mid", b"none", b"low", b"mid", b"x"]
            for n, name in enumerate(names):
                entry = await drv.ops.lookup(sub, name, drv.ctx)
                if entry.st_ino:
                    drv.made(entry)
                assert bool(entry.st_ino) == (name in (b"low", b"mid")), (kind, name)
                want = [] if n < view_mod.NAMES_PER_LISTING else [(1, b"big/sub"),
                                                                  (0, b"big/sub")]
                assert listed == want, (kind, n)
            del listed[:]
            for i in range(0, 5000, 50):
                entry = await drv.ops.lookup(big, b"f%05d" % i, drv.ctx)
                assert entry.st_ino != 0 or i == 7
                drv.made(entry)
            assert listed == [], kind
            await drv.finish()
        finally:
            view.close()


# -- property: read_name == the listing's answer, over generated stacks ----------

def walk(view, path: bytes, by_listing: bool):
    """The directory inode at ``path``, found by names alone or through listings
    (None: the view has no directory there)."""
    cur = view.inodes.root
    for name in path.split(b"/") if path else ():
        if by_listing:
            view.listing(cur)
        cur = view.lookup_or_none(cur, name)
        if cur is None or not cur.is_dir:
            return None
    return cur


def number_upper(upper: Path, rnd: random.Random) -> None:
    """Some upper entries recorded the number they had (U8), their dirs marked."""
    for d, dirs, files in os.walk(os.fsencode(upper)):
        for name in dirs + files:
            full = os.path.join(d, name)
            if not os.path.islink(full) and rnd.random() < 0.3:
                os.setxattr(full, "trusted.overlay.mergefs-ino", b"%d" % rnd.randrange(2, 1 << 40))
                os.setxattr(d, "trusted.overlay.mergefs-inos", b"y")


def compare_views(make, paths) -> None:
    """Two fresh views: one finds every name by ``read_name``, the other through
    listings; nodes, inode numbers and attributes agree."""
    names_view, listing_view = make(), make()
    try:
        for path in sorted(paths):
            parent_path, _, name = path.rpartition(b"/")
            a = walk(names_view, parent_path, False)
            b = walk(listing_view, parent_path, True)
            assert (a is None) == (b is None), path
            if a is None:
                continue
            listed = names_view.resolver.dirs_listed
            node, st_ = names_view.read_name(a, name)
            assert names_view.resolver.dirs_listed == listed, path
            assert node == listing_view.listing(b).get(name), path
            x, y = names_view.lookup_or_none(a, name), listing_view.lookup_or_none(b, name)
            assert (x is None) == (node is None), path
            if x is not None:
                assert x.number == y.number, path
                sx, sy = names_view.attr(x), listing_view.attr(y)
                assert (sx.st_ino, sx.st_mode, sx.st_size) == (sy.st_ino, sy.st_mode,
                                                                sy.st_size), path
                if st_ is not None:
                    assert (st_.st_ino, st_.st_mode) == (sx.st_ino, sx.st_mode), path
    finally:
        names_view.close()
        listing_view.close()


SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(specs=stacks(max_size=4))
def test_M1_D1_D3_read_name_equals_listing_in_a_view(specs):
    for fmt in ("overlay", "oci"):
        with tempfile.TemporaryDirectory() as where:
            layers = materialise_stack(specs, where, fmt)
            paths = layer_paths(layers) | {b"missing"}
            compare_views(lambda: UnionView([Layer(str(p)) for p in layers]), paths)


@needs_root
@SETTINGS
@given(specs=stacks(min_size=2, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_R1_U8_read_name_equals_listing_in_a_writable_view(specs, seed):
    """The top layer as a writable view's upper, with redirects, xattr whiteouts and
    recorded inode numbers: names, numbers and attributes as the listings give them."""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as where:
        layers = materialise_stack(specs, where, "overlay")
        decorate(layers, rnd)
        number_upper(layers[-1], rnd)
        os.mkdir(os.path.join(where, "work"))
        paths = layer_paths(layers) | {b"missing"}
        compare_views(lambda: WritableView([Layer(str(p)) for p in layers[:-1]], layers[-1],
                                           os.path.join(where, "work")), paths)
