"""S2 for the importer: hostile layer tars give a typed error and leave nothing behind."""
from __future__ import annotations

import errno
import os

import pytest

from mergefs import syscalls
from mergefs.errors import AlreadyExists, InvalidLayer, NotFound, UnsafeContent
from mergefs.oci import extract_layer

from .conftest import entries_of, member, tar_bytes


@pytest.fixture
def outside(tmp_path):
    """A directory a hostile layer would like to write into; must stay empty."""
    d = tmp_path / "outside"
    d.mkdir()
    return d


def refuse(write_tar, tmp_path, members, error, match=None, compression="none"):
    src = write_tar(members, compression)
    dest = tmp_path / "dest"
    with pytest.raises(error, match=match):
        extract_layer(src, dest)
    assert not os.path.lexists(dest), "a failed extraction left its directory behind"
    assert sorted(os.listdir(tmp_path)) == sorted(["layer.tar", "outside"]
                                                  if (tmp_path / "outside").exists()
                                                  else ["layer.tar"])


def test_S2_dotdot_member_refused(write_tar, tmp_path, outside):
    refuse(write_tar, tmp_path, [member("a", "dir"), member("a/../../outside/x", data=b"x")],
           UnsafeContent, "'..'")
    assert entries_of(outside) == []


def test_S2_dotdot_first_component_refused(write_tar, tmp_path, outside):
    refuse(write_tar, tmp_path, [member("../outside/x", data=b"x")], UnsafeContent)


def test_S2_absolute_member_refused(write_tar, tmp_path, outside):
    refuse(write_tar, tmp_path, [member(f"{outside}/x", data=b"x")], UnsafeContent, "absolute")
    assert entries_of(outside) == []


def test_S2_absolute_symlink_then_file_through_it(write_tar, tmp_path, outside):
    refuse(write_tar, tmp_path, [member("evil", "symlink", linkname=str(outside)),
                                 member("evil/x", data=b"pwned")], UnsafeContent, "symlink")
    assert entries_of(outside) == []


def test_S2_relative_symlink_then_dir_through_it(write_tar, tmp_path, outside):
    refuse(write_tar, tmp_path, [member("evil", "symlink", linkname="../outside"),
                                 member("evil/sub", "dir"), member("evil/sub/x", data=b"x")],
           UnsafeContent, "symlink")
    assert entries_of(outside) == []


def test_S2_symlink_deep_in_path(write_tar, tmp_path, outside):
    refuse(write_tar, tmp_path, [member("a", "dir"), member("a/b", "symlink", linkname=str(outside)),
                                 member("a/b/c/d", data=b"x")], UnsafeContent)
    assert entries_of(outside) == []


def test_S2_whiteout_through_symlink_does_nothing(write_tar, tmp_path, outside):
    """The symlink replaces the lower subtree anyway (M2): the whiteout below it is a no-op."""
    (outside / "victim").write_text("keep")
    src = write_tar([member("evil", "symlink", linkname=str(outside)),
                     member("evil/.wh.victim"), member("evil/.wh..wh..opq")])
    r = extract_layer(src, tmp_path / "dest")
    assert entries_of(outside) == ["victim"] and r.skipped == 2
    assert os.listdir(tmp_path / "dest") == ["evil"]


def test_whiteout_below_a_file_of_the_same_layer_does_nothing(write_tar, tmp_path):
    """umoci 0.4 repack writes this when a directory was replaced by a file."""
    src = write_tar([member("d", data=b"now a file"), member("d/.wh.child")])
    r = extract_layer(src, tmp_path / "dest")
    assert (tmp_path / "dest" / "d").read_bytes() == b"now a file" and r.whiteouts == 0


def test_S2_hardlink_out_of_layer_refused(write_tar, tmp_path, outside):
    (outside / "secret").write_text("s")
    refuse(write_tar, tmp_path, [member("x", "hardlink", linkname=str(outside / "secret"))],
           UnsafeContent)
    refuse(write_tar, tmp_path, [member("x", "hardlink", linkname="../outside/secret")],
           UnsafeContent)
    assert (outside / "secret").stat().st_nlink == 1


def test_S2_hardlink_to_member_not_earlier_refused(write_tar, tmp_path):
    refuse(write_tar, tmp_path, [member("x", "hardlink", linkname="y"), member("y", data=b"y")],
           UnsafeContent, "not an earlier")


def test_S2_hardlink_to_directory_refused(write_tar, tmp_path):
    refuse(write_tar, tmp_path, [member("d", "dir"), member("x", "hardlink", linkname="d")],
           UnsafeContent)


def test_S2_hardlink_through_symlinked_parent_refused(write_tar, tmp_path, outside):
    (outside / "secret").write_text("s")
    refuse(write_tar, tmp_path, [member("evil", "symlink", linkname=str(outside)),
                                 member("x", "hardlink", linkname="evil/secret")], UnsafeContent)
    assert (outside / "secret").stat().st_nlink == 1


def test_duplicate_entries_refused(write_tar, tmp_path):
    refuse(write_tar, tmp_path, [member("f", data=b"1"), member("f", data=b"2")],
           InvalidLayer, "duplicate")


def test_duplicate_dirs_refused(write_tar, tmp_path):
    refuse(write_tar, tmp_path, [member("d", "dir"), member("./d/", "dir")], InvalidLayer,
           "duplicate")


def test_duplicate_via_overlay_whiteout_refused(write_tar, tmp_path):
    refuse(write_tar, tmp_path, [member("f", data=b"1"), member("f", "char")], InvalidLayer)


def test_file_where_parent_dir_was_needed_refused(write_tar, tmp_path):
    refuse(write_tar, tmp_path, [member("a/b", data=b"1"), member("a", data=b"2")], InvalidLayer)
    refuse(write_tar, tmp_path, [member("a", data=b"2"), member("a/b", data=b"1")], InvalidLayer)


def test_device_nodes_refused_without_root(write_tar, tmp_path):
    src = write_tar([member("null", "char", devmajor=1, devminor=3)])
    with pytest.raises(UnsafeContent, match="device"):
        extract_layer(src, tmp_path / "dest", is_root=False)
    assert not os.path.lexists(tmp_path / "dest")


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_truncated_stream_is_invalid(write_tar, tmp_path, compression):
    data = tar_bytes([member("d", "dir")] + [member(f"d/f{i}", data=os.urandom(3000))
                                             for i in range(20)], compression)
    src = tmp_path / "layer.tar"
    src.write_bytes(data[:len(data) // 2])
    with pytest.raises(InvalidLayer, match="truncated"):
        extract_layer(src, tmp_path / "dest")
    assert not os.path.lexists(tmp_path / "dest")


def test_corrupt_gzip_is_invalid(tmp_path):
    data = bytearray(tar_bytes([member("f", data=os.urandom(5000))], "gzip"))
    data[len(data) // 2] ^= 0xFF
    src = tmp_path / "layer.tar.gz"
    src.write_bytes(bytes(data))
    with pytest.raises(InvalidLayer):
        extract_layer(src, tmp_path / "dest")
    assert not os.path.lexists(tmp_path / "dest")


def test_not_a_tar_is_invalid(tmp_path):
    src = tmp_path / "junk"
    src.write_bytes(os.urandom(4096))
    with pytest.raises(InvalidLayer):
        extract_layer(src, tmp_path / "dest")
    assert not os.path.lexists(tmp_path / "dest")


def test_xz_is_refused_clearly(tmp_path):
    src = tmp_path / "l.tar.xz"
    src.write_bytes(b"\xfd7zXZ\x00" + bytes(100))
    with pytest.raises(InvalidLayer, match="xz"):
        extract_layer(src, tmp_path / "dest")


def test_destination_must_be_absent(write_tar, tmp_path):
    src = write_tar([member("f", data=b"x")])
    (tmp_path / "dest").mkdir()
    with pytest.raises(AlreadyExists):
        extract_layer(src, tmp_path / "dest")
    assert os.listdir(tmp_path / "dest") == []
    with pytest.raises(NotFound):
        extract_layer(src, tmp_path / "missing" / "dest")


def test_diff_id_mismatch_leaves_nothing(write_tar, tmp_path):
    src = write_tar([member("f", data=b"x")])
    with pytest.raises(InvalidLayer, match="diffID"):
        extract_layer(src, tmp_path / "dest", expected_diff_id="sha256:" + "0" * 64)
    assert not os.path.lexists(tmp_path / "dest")


def test_enospc_midway_leaves_nothing(write_tar, tmp_path, monkeypatch):
    src = write_tar([member(f"f{i}", data=b"x") for i in range(10)])
    real, calls = syscalls.create_excl, []

    def failing(name, dir_fd, mode=0o600):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(name, dir_fd, mode)
    monkeypatch.setattr(syscalls, "create_excl", failing)
    with pytest.raises(OSError) as exc:
        extract_layer(src, tmp_path / "dest")
    assert exc.value.errno == errno.ENOSPC
    assert not os.path.lexists(tmp_path / "dest")


def test_whiteout_names_that_escape_refused(write_tar, tmp_path):
    refuse(write_tar, tmp_path, [member(".wh...")], UnsafeContent)


def test_whiteout_with_children_refused(write_tar, tmp_path):
    refuse(write_tar, tmp_path, [member(".wh.a/b", data=b"x")], InvalidLayer)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_stream_cut_at_a_member_boundary_is_invalid(tmp_path, compression):
    raw = tar_bytes([member("a", data=b"x" * 512), member("b", data=b"y" * 512)])
    cut = raw[:512 + 512]        # header and data of "a": a clean member boundary
    if compression == "gzip":
        import gzip
        cut = gzip.compress(cut)
    elif compression == "zstd":
        import zstandard
        cut = zstandard.ZstdCompressor().compress(cut)
    src = tmp_path / "layer.tar"
    src.write_bytes(cut)
    with pytest.raises(InvalidLayer, match="truncated"):
        extract_layer(src, tmp_path / "dest")
    assert not os.path.lexists(tmp_path / "dest")


def test_zstd_bomb_is_read_in_bounded_pieces(tmp_path):
    """A few KiB of zstd standing for 256 MiB of zeros: read with bounded memory."""
    import resource
    import zstandard
    cobj = zstandard.ZstdCompressor().compressobj()
    data = b"".join(cobj.compress(bytes(1 << 20)) for _ in range(256)) + cobj.flush()
    src = tmp_path / "bomb.tar.zst"
    src.write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = extract_layer(src, tmp_path / "dest")     # zeros: an empty archive, all read and hashed
    assert r.entries == 0 and r.tar_size == 256 << 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000   # KiB
