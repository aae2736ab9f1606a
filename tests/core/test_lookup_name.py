"""One name looked up in each layer (``layer.read_layer_name``, ``resolver.NameReader``)
gives exactly what the merged listing gives for it (M1-M3, D1-D3, R1), over random
stacks in both formats, with redirects, xattr whiteouts and names that are OCI
markers; and it lists no layer directory."""
from __future__ import annotations

import os
import random
import stat
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergefs.layer import DIR, OCI_WHITEOUT, Layer, read_layer_dir, read_layer_name
from mergefs.resolver import Resolver, join
from mergefs.testing.builders import LayerSpec, materialise, materialise_stack
from mergefs.testing.strategies import NAMES, stacks

from ..conftest import needs_root

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def by_listing(res: Resolver, path: bytes):
    """The node at ``path`` found through whole listings (the reference)."""
    return res.lookup(path, listings=True)


def layer_paths(layers) -> set[bytes]:
    """Every relative path any layer holds, also as the name an OCI marker stands for."""
    out = set()
    for layer in layers:
        root = os.fsencode(layer)
        for d, dirs, files in os.walk(root):
            rel = os.path.relpath(d, root)
            rel = b"" if rel == b"." else rel
            for name in dirs + files:
                out.add(join(rel, name))
                if name.startswith(OCI_WHITEOUT):
                    out.add(join(rel, name[len(OCI_WHITEOUT):]))
    return out


def decorate(layers, rnd: random.Random) -> None:
    """Overlay-format extras the strategies do not make: redirects (absolute and
    relative, also to nowhere), xattr whiteouts in marked directories, an empty
    file with the whiteout xattr in an unmarked one (a file), a user.overlay opaque."""
    dirs = sorted(p for p in layer_paths(layers) if p)
    for layer in layers[1:]:
        for d, subdirs, files in os.walk(os.fsencode(layer)):
            for name in subdirs:
                full = os.path.join(d, name)
                roll = rnd.random()
                if roll < 0.25 and dirs:
                    os.setxattr(full, "trusted.overlay.redirect",
                                b"/" + rnd.choice(dirs + [b"nowhere"]))
                elif roll < 0.35:
                    os.setxattr(full, "trusted.overlay.redirect", rnd.choice(NAMES))
                elif roll < 0.4:
                    os.setxattr(full, "user.overlay.opaque", b"y")
            for name in files:
                full = os.path.join(d, name)
                st_ = os.lstat(full)
                if stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0 and rnd.random() < 0.5:
                    os.unlink(full)                       # a Linux 6.7 xattr whiteout
                    open(full, "wb").close()
                    os.setxattr(full, "trusted.overlay.whiteout", b"")
                    os.setxattr(d, rnd.choice(["trusted.overlay.whiteouts",
                                               "trusted.overlay.opaque"]),
                                b"x" if rnd.random() < 0.5 else b"y")
                elif stat.S_ISREG(st_.st_mode) and st_.st_size == 0 and rnd.random() < 0.3:
                    os.setxattr(full, "trusted.overlay.whiteout", b"")


def check_stack(layers, fmt: str, may_list: bool = False) -> None:
    res = Resolver([Layer(str(p), fmt) for p in layers])
    try:
        paths = layer_paths(layers)
        paths |= {join(p, b"missing") for p in paths} | {b"missing", b".wh.a", b"a/.wh..opq"}
        for path in sorted(paths):
            expected = by_listing(res, path)
            listed = res.dirs_listed
            assert res.lookup(path) == expected, (fmt, path)
            assert may_list or res.dirs_listed == listed, "a lookup read a directory whole"
    finally:
        res.close()


@SETTINGS
@given(specs=stacks(max_size=4))
def test_M1_D1_D3_name_lookup_equals_listing_both_formats(specs):
    for fmt in ("overlay", "oci"):
        with tempfile.TemporaryDirectory() as where:
            check_stack(materialise_stack(specs, where, fmt), "auto")
            check_stack(materialise_stack(specs, Path(where) / "f", fmt), fmt)


@needs_root
@SETTINGS
@given(specs=stacks(min_size=2, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_R1_D1_name_lookup_equals_listing_with_redirects_and_xattr_whiteouts(specs, seed):
    with tempfile.TemporaryDirectory() as where:
        layers = materialise_stack(specs, where, "overlay")
        decorate(layers, random.Random(seed))
        check_stack(layers, "overlay")


def test_D2_read_layer_name_holds_what_read_layer_dir_holds(tmp_path):
    """Every name of a directory with OCI markers, a same-layer whiteout and entry
    (D2), a char device that is not a whiteout, names near NAME_MAX: one name read
    says of it what the whole listing says (entry kind and inode, whiteout), and the
    directory's markers alike."""
    long = "n" * 255
    spec = (LayerSpec().file("d/a", b"a").whiteout("d/a").dir("d/sub").whiteout("d/sub")
            .whiteout("d/gone").char("d/tty", 5, 0).file(f"d/{long}", b"l").opaque_dir("d"))
    for fmt in ("overlay", "oci"):
        layer = materialise(spec, tmp_path / fmt, fmt)
        fd = os.open(layer / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            whole = read_layer_dir(fd, fmt)
            names = {os.fsencode(n) for n in os.listdir(layer / "d")} | {b"a", b"sub", b"gone",
                                                                        b"none", b".wh.a"}
            for name in names:
                one, st_ = read_layer_name(fd, name, fmt)
                assert (one.opaque, one.redirect) == (whole.opaque, whole.redirect)
                assert one.entries == {k: v for k, v in whole.entries.items() if k == name}
                held = name in whole.whiteouts
                if name in one.entries and one.entries[name].kind != DIR:
                    held = False            # not looked for beside a non-directory (M2)
                if name in one.entries:
                    assert (stat.S_IFMT(st_.st_mode), st_.st_ino) == whole.entries[name]
                assert (name in one.whiteouts) == held, (fmt, name)
        finally:
            os.close(fd)


def test_D2_D7_recreated_directory_over_a_directory(tmp_path):
    """A layer that whites out a directory and makes it again (D2, D7): the name is
    the new directory alone, nothing of the lower one merges in."""
    specs = [LayerSpec().file("d/old", b"o").file("e/keep", b"k"),
             LayerSpec().whiteout("d").dir("d").file("d/new", b"n").dir("e")]
    for fmt in ("overlay", "oci"):
        layers = materialise_stack(specs, tmp_path / fmt, fmt)
        check_stack(layers, fmt)
        res = Resolver([Layer(str(p), fmt) for p in layers])
        try:
            assert res.dir_layers(b"d", res.lookup(b"d")) == (1,)    # cut where opaque
            assert res.lookup(b"d/old") is None and res.lookup(b"d/new") is not None
            assert res.lookup(b"e").layers == (1, 0) and res.lookup(b"e/keep") is not None
        finally:
            res.close()


@needs_root
def test_U2_a_mount_point_in_a_layer_gets_the_listings_numbers(tmp_path):
    """A directory of a layer with a filesystem mounted on it: its lstat's st_ino is
    the mounted root's, not the d_ino its parent's listing gives, and entries below
    it are on that other filesystem. Looking such a name up alone would change the
    inode number the listing gives (U2): the listings answer there."""
    import subprocess
    from mergefs.union.view import UnionView

    layers = materialise_stack([LayerSpec().dir("m").file("m/hidden", b"h").file("f", b"f"),
                                LayerSpec().file("top", b"t")], tmp_path / "s", "overlay")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(layers[0] / "m")], check=True)
    try:
        (layers[0] / "m" / "x").write_bytes(b"x")
        check_stack(layers, "overlay", may_list=True)
        views = [UnionView([Layer(str(p)) for p in layers]) for _ in range(2)]
        try:
            by_name, by_listing = views
            root1, root2 = by_name.inodes.root, by_listing.inodes.root
            m1 = by_name.lookup(root1, b"m")
            by_listing.listing(root2)
            m2 = by_listing.lookup(root2, b"m")
            assert m1.node == m2.node and m1.number == m2.number
            x1 = by_name.lookup(m1, b"x")
            by_listing.listing(m2)
            assert x1.node == by_listing.lookup(m2, b"x").node
            assert by_name.lookup_or_none(m1, b"hidden") is None
        finally:
            for v in views:
                v.close()
    finally:
        subprocess.run(["umount", "-l", str(layers[0] / "m")], check=True)
