"""What extraction produces: overlay-format layers, D2/D3/D5/D6/D7 and A1/A2 on import."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings

from mergefs.errors import InvalidLayer
from mergefs.layer import OPAQUE_XATTRS
from mergefs.oci import extract_layer
from mergefs.testing import tree
from mergefs.testing.builders import LayerSpec, materialise
from mergefs.testing.strategies import layer_spec

from ..conftest import needs_root, require
from .conftest import member, tar_bytes

OPAQUE = OPAQUE_XATTRS[0] if os.geteuid() == 0 else OPAQUE_XATTRS[1]


def extract(write_tar, tmp_path, members, compression="none", **kw):
    src = write_tar(members, compression)
    dest = tmp_path / "dest"
    return dest, extract_layer(src, dest, **kw)


def is_whiteout(path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_diff_id_is_sha256_of_uncompressed_tar(write_tar, tmp_path, compression):
    members = [member("d", "dir"), member("d/f", data=b"hello")]
    dest, r = extract(write_tar, tmp_path, members, compression)
    assert r.diff_id == "sha256:" + hashlib.sha256(tar_bytes(members)).hexdigest()
    assert r.compression == compression
    assert (dest / "d" / "f").read_bytes() == b"hello"
    assert (r.files, r.dirs, r.entries) == (1, 1, 2)


def test_diff_id_covers_trailing_padding(tmp_path):
    raw = tar_bytes([member("f", data=b"x")]) + bytes(10240)
    src = tmp_path / "l.tar"
    src.write_bytes(raw)
    r = extract_layer(src, tmp_path / "dest")
    assert r.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_file_object_source(tmp_path):
    src = tmp_path / "l.tar"
    src.write_bytes(tar_bytes([member("f", data=b"x")], "gzip"))
    with open(src, "rb") as f:
        r = extract_layer(f, tmp_path / "dest")
    assert r.files == 1


def test_D1_oci_whiteouts_become_overlay_whiteouts(write_tar, tmp_path):
    dest, r = extract(write_tar, tmp_path, [member("etc", "dir"), member("etc/.wh.passwd"),
                                            member("var/.wh..wh..opq")])
    assert is_whiteout(dest / "etc" / "passwd")
    assert not os.path.lexists(dest / "etc" / ".wh.passwd")
    assert is_opaque(dest / "var") and os.listdir(dest / "var") == []
    assert (r.whiteouts, r.opaque_dirs) == (1, 1)


def test_D1_overlay_members_are_accepted(write_tar, tmp_path):
    dest, r = extract(write_tar, tmp_path, [
        member("gone", "char"), member("o", "dir", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        member("o/kept", data=b"k")])
    assert is_whiteout(dest / "gone")
    assert is_opaque(dest / "o") and os.listdir(dest / "o") == ["kept"]


def test_D2_same_layer_file_beats_its_whiteout(write_tar, tmp_path):
    for order in ([member(".wh.x"), member("x", data=b"new")],
                  [member("x", data=b"new"), member(".wh.x")]):
        dest, r = extract(write_tar, tmp_path, order)
        assert (dest / "x").read_bytes() == b"new"
        assert r.whiteouts == 0
        os.system(f"rm -rf {dest}")


def test_D2_D7_same_layer_dir_beats_its_whiteout_and_is_opaque(write_tar, tmp_path):
    for order in ([member(".wh.d"), member("d", "dir"), member("d/f", data=b"1")],
                  [member("d", "dir"), member("d/f", data=b"1"), member(".wh.d")],
                  [member(".wh.d"), member("d/f", data=b"1")]):
        dest, r = extract(write_tar, tmp_path, order)
        assert os.listdir(dest) == ["d"] and is_opaque(dest / "d")
        assert (dest / "d" / "f").read_bytes() == b"1"
        os.system(f"rm -rf {dest}")


def test_D3_opaque_marker_anywhere_in_the_dir(write_tar, tmp_path):
    dest, _ = extract(write_tar, tmp_path, [member("d", "dir"), member("d/a", data=b"a"),
                                            member("d/.wh..wh..opq")])
    assert is_opaque(dest / "d") and os.listdir(dest / "d") == ["a"]


def test_D6_no_whiteout_inside_an_opaque_dir(write_tar, tmp_path):
    dest, r = extract(write_tar, tmp_path, [member("d/.wh.x"), member("d/sub/.wh.y"),
                                            member("d/.wh..wh..opq"), member(".wh.z")])
    assert is_opaque(dest / "d")
    assert sorted(os.listdir(dest / "d")) == ["sub"] and os.listdir(dest / "d" / "sub") == []
    assert is_whiteout(dest / "z") and r.whiteouts == 1


def test_D5_whiteout_of_missing_path_creates_parents(write_tar, tmp_path):
    dest, _ = extract(write_tar, tmp_path, [member("a/b/.wh.c")])
    assert is_whiteout(dest / "a" / "b" / "c")
    st = os.lstat(dest / "a")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o755, 0, 0)


def test_aufs_bookkeeping_is_skipped(write_tar, tmp_path):
    dest, r = extract(write_tar, tmp_path, [member(".wh..wh.plnk", "dir"),
                                            member(".wh..wh.aufs", data=b"")])
    assert os.listdir(dest) == [] and r.skipped == 2


def test_S1_symlinks_stored_verbatim(write_tar, tmp_path):
    dest, _ = extract(write_tar, tmp_path, [member("abs", "symlink", linkname="/etc/passwd"),
                                            member("up", "symlink", linkname="../../x"),
                                            member("loop", "symlink", linkname="loop")])
    assert os.readlink(dest / "abs") == "/etc/passwd"
    assert os.readlink(dest / "up") == "../../x"
    assert os.readlink(dest / "loop") == "loop"


def test_H1_hardlinks_share_an_inode(write_tar, tmp_path):
    dest, r = extract(write_tar, tmp_path, [member("a", data=b"x"),
                                            member("d/b", "hardlink", linkname="./a")])
    assert os.stat(dest / "a").st_ino == os.stat(dest / "d" / "b").st_ino
    assert r.hardlinks == 1


@needs_root
def test_A1_A2_metadata_order_and_nanoseconds(write_tar, tmp_path):
    ns = "1600000000.123456789"
    cap = bytes.fromhex("0100000200100000000000000000000000000000")   # cap_net_raw+ep (v2)
    dest, r = extract(write_tar, tmp_path, [
        member("d", "dir", mode=0o750, uid=1000, gid=1001, pax={"mtime": ns}),
        member("d/suid", data=b"#!", mode=0o4755, uid=1000, gid=1000,
               pax={"mtime": ns, "SCHILY.xattr.user.k": "v",
                    "SCHILY.xattr.security.capability": cap.decode("latin-1")}),
        member("d/l", "symlink", linkname="suid", uid=5, gid=6, pax={"mtime": ns}),
        member("d/null", "char", devmajor=1, devminor=3, mode=0o666),
        member("d/p", "fifo", mode=0o600)])
    st = os.lstat(dest / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == \
        (0o750, 1000, 1001, 1600000000123456789)
    st = os.lstat(dest / "d" / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o4755, 1000, 1600000000123456789)
    assert os.getxattr(dest / "d" / "suid", "user.k") == b"v"
    assert os.getxattr(dest / "d" / "suid", "security.capability") == cap
    st = os.lstat(dest / "d" / "l")
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (5, 6, 1600000000123456789)
    st = os.lstat(dest / "d" / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(dest / "d" / "p").st_mode)
    assert not r.warnings


def test_A3_refused_xattr_is_a_warning(write_tar, tmp_path):
    dest, r = extract(write_tar, tmp_path, [
        member("f", data=b"x", pax={"SCHILY.xattr.bogus.ns": "v"})])
    assert (dest / "f").read_bytes() == b"x"
    assert any("bogus.ns" in w for w in r.warnings)


def test_long_names_and_gnu_format(tmp_path):
    deep = "/".join(["d" * 60] * 5)
    src_dir = tmp_path / "src"
    os.makedirs(src_dir / deep)
    (src_dir / deep / ("f" * 200)).write_bytes(b"long")
    os.symlink("t" * 150, src_dir / deep / "lnk")
    for fmt in ("gnu", "posix", "oldgnu"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "-C", src_dir, "-cf", out, "."], check=True)
        r = extract_layer(out, tmp_path / fmt)
        assert (tmp_path / fmt / deep / ("f" * 200)).read_bytes() == b"long", fmt
        assert os.readlink(tmp_path / fmt / deep / "lnk") == "t" * 150
        assert r.files == 1


def test_bad_checksum_is_invalid(tmp_path):
    raw = bytearray(tar_bytes([member("f", data=b"x")]))
    raw[10] ^= 1   # inside the first header's name
    src = tmp_path / "l.tar"
    src.write_bytes(bytes(raw))
    with pytest.raises(InvalidLayer, match="checksum"):
        extract_layer(src, tmp_path / "dest")


def _normalise(view: tree.View) -> tree.View:
    """Whiteout modes and times are not content (kernel overlayfs makes them 0000, builders 0600)."""
    entries = {p: (a._replace(mode=stat.S_IFCHR, mtime_ns=0) if a.kind == "char" and a.rdev == 0
                   else a)
               for p, a in view.entries.items()}
    return tree.View(entries, view.groups)


@needs_root
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=layer_spec())
def test_oci_dir_tarred_by_gnu_tar_extracts_to_overlay_format(tmp_path_factory, spec: LayerSpec):
    """The same spec materialised in OCI format, tarred by GNU tar and imported, equals
    it materialised in overlay format (whiteouts, opaque dirs, D2, metadata, hardlinks)."""
    base = tmp_path_factory.mktemp("prop")
    oci_dir = materialise(spec, base / "oci", fmt="oci")
    subprocess.run(["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "-C", oci_dir, "-cf", base / "l.tar", "."], check=True)
    extract_layer(base / "l.tar", base / "imported")
    expected = materialise(spec, base / "overlay", fmt="overlay")
    tree.assert_same(_normalise(tree.capture(base / "imported", private_xattrs=True)),
                     _d6(_normalise(tree.capture(expected, private_xattrs=True))))


def _d6(view: tree.View) -> tree.View:
    """The builders keep whiteouts inside opaque dirs; the importer drops them (D6)."""
    opaque = {p for p, a in view.entries.items() if (OPAQUE, b"y") in a.xattrs}

    def below_opaque(p: bytes) -> bool:
        parts = p.split(b"/")
        return any(b"/".join(parts[:i]) in opaque for i in range(len(parts)))
    entries = {p: a for p, a in view.entries.items()
               if not (a.kind == "char" and a.rdev == 0 and below_opaque(p))}
    return tree.View(entries, view.groups)


def test_not_root_mode_uses_user_xattrs_and_warns(write_tar, tmp_path):
    dest, r = extract(write_tar, tmp_path, [member("o/.wh..wh..opq"), member("f", uid=1000)],
                      is_root=False)
    assert os.getxattr(dest / "o", "user.overlay.opaque") == b"y"
    assert any("owners" in w for w in r.warnings)


NOBODY = """
import json, sys
from mergefs.errors import UnsafeContent
from mergefs.oci import extract_layer
r = extract_layer(sys.argv[1], sys.argv[2])
try:
    extract_layer(sys.argv[3], sys.argv[2] + "-dev")
    dev = "accepted"
except UnsafeContent as e:
    dev = str(e)
print(json.dumps({"whiteouts": r.whiteouts, "warnings": r.warnings, "dev": dev}))
"""


@needs_root
def test_real_unprivileged_import(tmp_path):
    """As uid 65534: whiteouts (mknod 0/0 is allowed since Linux 5.8), user.overlay.opaque,
    owners not kept (a warning), device nodes refused."""
    import json
    import shutil
    import tempfile
    require("setpriv")
    work = tempfile.mkdtemp(prefix="mergefs-nobody-")
    try:
        os.chown(work, 65534, 65534)
        layer, devs = os.path.join(work, "l.tar"), os.path.join(work, "d.tar")
        with open(layer, "wb") as f:
            f.write(tar_bytes([member(".wh.gone"), member("o/.wh..wh..opq"),
                               member("o/f", data=b"x", uid=1000),
                               member("o/suid", data=b"#!", mode=0o4755)]))
        with open(devs, "wb") as f:
            f.write(tar_bytes([member("null", "char", devmajor=1, devminor=3)]))
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-c", NOBODY, layer, os.path.join(work, "x"), devs],
                             capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                                 os.path.dirname(os.path.abspath(__file__)))))
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["whiteouts"] == 1 and "device" in res["dev"]
        assert any("owners" in w for w in res["warnings"])
        assert os.getxattr(os.path.join(work, "x", "o"), "user.overlay.opaque") == b"y"
        # a write without CAP_FSETID clears setuid: the mode is set after the data (A1)
        assert stat.S_IMODE(os.lstat(os.path.join(work, "x", "o", "suid")).st_mode) == 0o4755
        assert not os.path.exists(os.path.join(work, "x-dev"))
    finally:
        shutil.rmtree(work)


def test_multi_member_gzip_and_padding(tmp_path):
    """A gzip stream may be several members (pigz, appends) and end with zero padding."""
    import gzip
    raw = tar_bytes([member("a", data=b"x" * 3000), member("b", data=b"y")])
    data = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + bytes(512)
    src = tmp_path / "l.tar.gz"
    src.write_bytes(data)
    r = extract_layer(src, tmp_path / "dest")
    assert r.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest() and r.files == 2
    src.write_bytes(data[:-512] + b"junk")
    with pytest.raises(InvalidLayer, match="garbage"):
        extract_layer(src, tmp_path / "dest2")


def test_global_pax_header_and_gnu_long_names(tmp_path):
    """A pax global header (git archive writes one) applies to what follows."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "made by git", "mtime": "1500000000.5"}) as t:
        ti = tarfile.TarInfo("f")
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"x"))
    src = tmp_path / "g.tar"
    src.write_bytes(buf.getvalue())
    extract_layer(src, tmp_path / "dest")
    assert os.lstat(tmp_path / "dest" / "f").st_mtime_ns == 1_500_000_000_500_000_000


def test_overlay_xattr_whiteout_member(write_tar, tmp_path):
    """Linux 6.7 "xattr whiteouts" (an empty file with overlay.whiteout) are whiteouts."""
    dest, r = extract(write_tar, tmp_path, [
        member("gone", pax={"SCHILY.xattr.trusted.overlay.whiteout": "y"})])
    assert is_whiteout(dest / "gone") and r.whiteouts == 1 and r.files == 0
