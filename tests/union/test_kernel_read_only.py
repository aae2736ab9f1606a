"""Read-only fuse-overlayfs-form mounts over plain layers go to the kernel's overlayfs.

containers/storage mounts the parent layers (``lowerdir`` only) at every
commit of a build and walks them beside the container's mount. When no layer
holds a whiteout or overlay marker in either format, the kernel's overlayfs
shows what mergefs shows; the mount program then mounts that instead of
starting a server (``mergefs.kernelview``). Each check compares the kernel
mount with the FUSE mount of the same call (``nokernel``), entry by entry.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from mergefs import kernelview
from mergefs.cli.cmd_mount_helper import translate
from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.testing.mounts import servers_of
from mergefs.testing.tree import capture
from mergefs.union import server

from ..conftest import needs

pytestmark = [pytest.mark.timeout(120)]
MTIME = 1_600_000_000_123_456_789
# vfs_cap_data revision 2, effective, permitted CAP_NET_RAW (bit 13)
CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def plain_stack(where) -> list:
    """Bottom: modes, owners, ns times, an xattr, a hardlink pair, a symlink, a fifo,
    a dir and a file the top replaces by each other; top: a file over the bottom's,
    a new entry in a merged dir."""
    return materialise_stack([
        LayerSpec().file("etc/motd", b"bottom\n", mode=0o600, uid=7, gid=8, mtime_ns=MTIME)
        .file("etc/caps", b"c", xattrs={"user.k": b"v", "security.capability": CAP_NET_RAW})
        .file("data/a", b"a").hardlink("data/a2", "data/a").symlink("data/ln", "../etc/motd")
        .fifo("data/fifo").dir("was-dir").file("was-dir/x", b"x").file("was-file", b"f")
        .dir("d", mode=0o750, uid=3, mtime_ns=MTIME).file("d/low", b"low"),
        LayerSpec().file("etc/motd", b"top\n", mtime_ns=MTIME + 1).file("d/high", b"high")
        .file("was-dir", b"now a file").dir("was-file").file("was-file/y", b"y")],
        where)


def mergefs(opts: str, mnt, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergefs", "-o", opts, str(mnt)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def mount_entry(mnt) -> tuple[str, set[str]]:
    """(fstype, options) of the mount at ``mnt``."""
    for line in open("/proc/self/mounts"):
        _, target, fstype, opts = line.split()[:4]
        if target == str(mnt):
            return fstype, set(opts.split(","))
    return "", set()


@pytest.fixture
def mnts(tmp_path):
    made = []

    def make(name):
        m = tmp_path / name
        m.mkdir()
        made.append(m)
        return m
    yield make
    for m in made:          # a bind of a layer on the same filesystem is no os.path.ismount
        if mount_entry(m)[0]:
            subprocess.run(["umount", str(m)], capture_output=True)


# -- which layers are plain ----------------------------------------------------
def _marker(kind: str, layer) -> None:
    d = layer / "d"
    if kind == "oci whiteout":
        (d / ".wh.gone").write_bytes(b"")
    elif kind == "oci opaque":
        (d / ".wh..wh..opq").write_bytes(b"")
    elif kind == "char 0/0 whiteout":
        os.mknod(d / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    elif kind == "xattr whiteout":
        os.setxattr(d / "low", "trusted.overlay.whiteout", b"")
    else:                                   # an overlay xattr on a directory
        os.setxattr(d, kind, b"y")


MARKERS = ["oci whiteout", "oci opaque", "char 0/0 whiteout", "xattr whiteout",
           "trusted.overlay.opaque", "user.overlay.opaque", "trusted.overlay.redirect",
           "trusted.overlay.mergefs-format", "user.overlay.mergefs-ino"]


@needs("root")
def test_a_layer_without_markers_is_plain(tmp_path):
    for layer in plain_stack(tmp_path):
        assert kernelview.is_plain(layer)


@needs("root")
@pytest.mark.parametrize("kind", MARKERS)
def test_any_whiteout_or_overlay_marker_makes_a_layer_not_plain(tmp_path, kind):
    layer = plain_stack(tmp_path)[0]
    _marker(kind, layer)
    assert not kernelview.is_plain(layer)
    assert not kernelview.is_plain(str(layer).encode())


def test_nokernel_is_a_known_option_of_the_fuse_form():
    assert translate(["-o", "lowerdir=/a,nokernel", "/m"]) == ["mount", "/a", "/m"]


def test_flags_follow_the_fuse_mounts_defaults():
    ro_nosuid_nodev = 1 | 2 | 4
    assert kernelview.mount_flags(()) == ro_nosuid_nodev
    assert kernelview.mount_flags(("suid", "dev")) == 1
    assert kernelview.mount_flags(("noexec", "dev")) == 1 | 2 | 8


# -- the mounts ------------------------------------------------------------------
@needs("root", "fuse", "overlay")
def test_plain_layers_mount_as_kernel_overlayfs_showing_what_fuse_shows(tmp_path, mnts):
    layers = plain_stack(tmp_path / "layers")
    lowerdir = ":".join(str(p) for p in reversed(layers))
    kernel, fuse = mnts("kernel"), mnts("fuse")
    r = mergefs(f"lowerdir={lowerdir},nodev", kernel)
    assert r.returncode == 0, r.stderr
    r = mergefs(f"lowerdir={lowerdir},nodev,nokernel", fuse)
    assert r.returncode == 0, r.stderr
    fstype, opts = mount_entry(kernel)
    assert fstype == "overlay" and {"ro", "nosuid", "nodev"} <= opts
    assert not servers_of(kernel)                       # no server: the kernel serves it
    assert mount_entry(fuse)[0] == "fuse.mergefs"
    assert capture(kernel).diff(capture(fuse)) == []
    with pytest.raises(OSError) as e:
        (kernel / "etc/new").write_bytes(b"x")
    assert e.value.errno == errno.EROFS


@needs("root", "fuse")
def test_a_lone_plain_layer_is_a_read_only_bind(tmp_path, mnts):
    """overlayfs wants two lower layers without an upper; a lone plain layer shows
    as itself. containers/storage's relative ``l/ID`` symlink resolves from the
    working directory, as it does for its kernel mounts."""
    (layer,) = materialise_stack([LayerSpec().file("etc/motd", b"m", uid=5, mtime_ns=MTIME)
                                  .symlink("ln", "etc/motd")], tmp_path / "layers")
    (tmp_path / "l").mkdir()
    os.symlink(layer, tmp_path / "l/L0")
    kernel, fuse = mnts("kernel"), mnts("fuse")
    r = mergefs("lowerdir=l/L0,suid,dev", kernel, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert mergefs(f"lowerdir={layer},suid,dev,nokernel", fuse).returncode == 0
    fstype, opts = mount_entry(kernel)
    assert not fstype.startswith("fuse") and "ro" in opts and not {"nosuid", "nodev"} & opts
    assert capture(kernel).diff(capture(fuse)) == []
    with pytest.raises(OSError) as e:
        (kernel / "new").write_bytes(b"x")
    assert e.value.errno == errno.EROFS


@needs("root", "fuse")
@pytest.mark.parametrize("extra", ["", ",nokernel", ",squash_to_root", ",private"])
def test_what_the_kernel_cannot_show_stays_on_fuse(tmp_path, mnts, extra):
    """A layer with a whiteout (the kernel would show the .wh. file), or an option
    only the FUSE server honours: a mergefs server serves the mount."""
    layers = plain_stack(tmp_path / "layers")
    if not extra:
        _marker("oci whiteout", layers[1])
    mnt = mnts("m")
    r = mergefs(f"lowerdir={layers[1]}:{layers[0]}{extra}", mnt)
    assert r.returncode == 0, r.stderr
    assert mount_entry(mnt)[0] == "fuse.mergefs" and servers_of(mnt)
    assert ".wh.gone" not in os.listdir(mnt / "d")


@needs("root")
def test_a_missing_layer_is_still_the_fuse_forms_clear_error(tmp_path, mnts):
    mnt = mnts("m")
    r = mergefs(f"lowerdir={tmp_path}/nope:{tmp_path}", mnt)
    fuse = mergefs(f"lowerdir={tmp_path}/nope:{tmp_path},nokernel", mnt)
    assert r.returncode == fuse.returncode != 0 and r.stderr == fuse.stderr
    assert r.stderr.count("\n") == 1 and "nope" in r.stderr, r.stderr
    assert not server.is_mounted(str(mnt)) and not mount_entry(mnt)[0]
