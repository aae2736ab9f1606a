"""Issue 11: bad and unusual inputs to ``import``/``merge``: one line, a documented
exit code, never a traceback or 70 (items 7, 8, 9, 11-15, 17)."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import tarfile

import pytest

from mergefs.testing import mounts
from mergefs.testing.builders import LayerSpec, materialise

from ..oci.conftest import member, tar_bytes

pytestmark = pytest.mark.timeout(120)


def one_line(p, code: int) -> str:
    """The run failed with ``code`` and said so in exactly one line, no traceback."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("mergefs: error: "), p.stderr
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr
    return lines[0]


def snapshots(root) -> list[str]:
    d = root / "snapshots"
    return sorted(os.listdir(d)) if d.exists() else []


# -- 7: OSErrors that carry an fd, not a path ----------------------------------------
@pytest.mark.parametrize("key,value", [("SCHILY.xattr.user.big", "v" * 200_000),
                                       ("SCHILY.xattr.", "x")])
def test_item7_xattr_the_kernel_refuses_is_one_line(tmp_path, cli, root, key, value):
    (tmp_path / "x.tar").write_bytes(tar_bytes([member("f", data=b"x", pax={key: value})]))
    p = cli.run("import", tmp_path / "x.tar", check=False)
    msg = one_line(p, 1)
    assert "'f'" in msg and "xattr" in msg, msg
    assert snapshots(root) == []


# -- 8: nesting ----------------------------------------------------------------------
def test_item8_member_3000_dirs_deep_is_refused_in_one_line(tmp_path, cli, root):
    name = "a/" * 3000 + "f"
    (tmp_path / "deep.tar").write_bytes(tar_bytes([member(name, data=b"x")]))
    msg = one_line(cli.run("import", tmp_path / "deep.tar", check=False), 1)
    assert "deep" in msg, msg
    assert snapshots(root) == []


@pytest.mark.parametrize("kind", ["oci", "docker-tar"])
def test_item8_json_nesting_bomb_is_refused_in_one_line(tmp_path, cli, root, kind):
    bomb = b"[" * 200_000 + b"]" * 200_000
    src = tmp_path / "img"
    src.mkdir()
    if kind == "oci":
        (src / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (src / "index.json").write_bytes(bomb)
    else:
        (src / "manifest.json").write_bytes(bomb)
    if kind == "docker-tar":
        with tarfile.open(tmp_path / "img.tar", "w") as t:
            t.add(src / "manifest.json", "manifest.json")
        src = tmp_path / "img.tar"
    msg = one_line(cli.run("import", src, check=False), 1)
    assert "nest" in msg, msg
    assert snapshots(root) == []


# -- 9: a LIBARCHIVE.xattr name that is not UTF-8 -------------------------------------
def test_item9_non_utf8_xattr_name_is_kept(tmp_path, cli, root):
    value = base64.b64encode(b"val").decode()
    (tmp_path / "x.tar").write_bytes(tar_bytes([member(
        "f", data=b"x", pax={"LIBARCHIVE.xattr.user.%FFname": value})]))
    layer = cli.out("import", tmp_path / "x.tar")
    cli.run("export", layer, "-o", tmp_path / "out")
    assert os.getxattr(tmp_path / "out/f", b"user.\xffname") == b"val"
    # and back out to OCI: the same name and value
    cli.run("export", layer, "-o", tmp_path / "out.tar", "--format", "tar")
    with tarfile.open(tmp_path / "out.tar", encoding="utf-8", errors="surrogateescape") as t:
        pax = t.getmember("f").pax_headers
    assert any(k.startswith("SCHILY.xattr.user.") for k in pax), pax


# -- 15: messages ------------------------------------------------------------------
def _raw_member(name: bytes, typ: bytes, uid_field: bytes = b"0000000\0") -> bytes:
    from mergefs.oci import _tar
    head = _tar._ustar(name, typ, 0o644, 0, 0, 0, 0)
    head = head[:108] + uid_field + head[116:]
    head = head[:148] + b" " * 8 + head[156:]
    return head[:148] + b"%06o\0 " % sum(head) + head[156:] + bytes(1024)


@pytest.mark.parametrize("raw,word", [
    (_raw_member(b"sparse", b"S"), "sparse"),
    (_raw_member(b"big-uid", b"0", b"\xff" * 8), "out-of-range"),
])
def test_item15_no_pax_header_no_pax_message(tmp_path, cli, raw, word):
    (tmp_path / "x.tar").write_bytes(raw)
    msg = one_line(cli.run("import", tmp_path / "x.tar", check=False), 1)
    assert word in msg and "pax" not in msg, msg


def test_item15_root_that_is_a_file(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    from tests.store.conftest import Cli
    p = Cli(tmp_path / "file").run("ls", check=False)
    msg = one_line(p, 1)
    assert "not a directory" in msg and "File exists" not in msg, msg


# -- 11: pipes -------------------------------------------------------------------------
@pytest.fixture
def layer_tar(tmp_path):
    p = tmp_path / "l.tar"
    p.write_bytes(tar_bytes([member("d", "dir"), member("d/f", data=b"piped\n")]))
    return p


def test_item11_import_from_stdin_dash_and_dev_stdin(tmp_path, cli, layer_tar):
    want = cli.out("import", layer_tar)
    for src in ("-", "/dev/stdin"):
        with open(layer_tar, "rb") as f:
            cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
            p = subprocess.run(cli.argv("import", src), stdin=cat.stdout, capture_output=True,
                               text=True, env=cli.env(), timeout=60)
            cat.wait()
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == want


def test_item11_import_process_substitution_and_image_through_pipe(tmp_path, cli, layer_tar):
    want = cli.out("import", layer_tar)
    argv = " ".join(f"'{a}'" for a in cli.argv("import"))
    p = subprocess.run(["bash", "-c", f"{argv} <(cat '{layer_tar}')"], capture_output=True,
                       text=True, env=cli.env(), timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == want, p.stderr
    # an image archive must be read with seeks: spooled, not opened twice
    cli.run("export", want, "-o", tmp_path / "lay", "--format", "oci")
    with tarfile.open(tmp_path / "lay.tar", "w") as t:
        t.add(tmp_path / "lay", ".")
    p = subprocess.run(["bash", "-c", f"cat '{tmp_path}/lay.tar' | {argv} - --json"],
                       capture_output=True, text=True, env=cli.env(), timeout=60)
    assert p.returncode == 0, p.stderr
    image = json.loads(p.stdout)["image"]
    assert image is not None
    cli.run("export", image["id"], "-o", tmp_path / "out")
    assert (tmp_path / "out/d/f").read_bytes() == b"piped\n"


# -- 12: docker-archive found by its manifest ---------------------------------------------
def test_item12_docker_archive_with_plain_layer_names(tmp_path, cli, layer_tar):
    import hashlib
    data = layer_tar.read_bytes()
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["plain:t"],
                            "Layers": ["layers/one.tar"]}]).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, blob in (("layers/one.tar", data), ("config.json", config),
                           ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            t.addfile(ti, io.BytesIO(blob))
    (tmp_path / "img.tar").write_bytes(buf.getvalue())
    out = cli.json("import", tmp_path / "img.tar")
    assert out["image"] is not None and "plain:t" in out["image"]["names"], out
    cli.run("export", "plain:t", "-o", tmp_path / "out")
    assert (tmp_path / "out/d/f").read_bytes() == b"piped\n"
    assert not (tmp_path / "out/manifest.json").exists()


# -- 13: merge --out inside an input ---------------------------------------------------
def test_item13_merge_out_inside_an_input_is_refused(tmp_path, cli):
    a = materialise(LayerSpec().file("x/f", b"1"), tmp_path / "a")
    b = materialise(LayerSpec().file("y/g", b"2"), tmp_path / "b")
    for out in (a / "x/out", b / "out", a):
        p = cli.run("merge", a, b, "--out", out, check=False)
        msg = one_line(p, 1)
        assert "inside" in msg and len(msg) < 300, msg
    assert sorted(os.listdir(a)) == ["x"] and sorted(os.listdir(a / "x")) == ["f"]
    assert sorted(os.listdir(b)) == ["y"]


def test_diff_out_inside_an_input_is_refused_before_writing(tmp_path, cli):
    """diff --out inside LOWER or UPPER (also through a symlink or a bind mount of it,
    also as one layer of a DIR:DIR stack) would read its own output: one line, exit 1."""
    a = materialise(LayerSpec().file("x/f", b"1"), tmp_path / "a")
    b = materialise(LayerSpec().file("y/g", b"2"), tmp_path / "b")
    c = materialise(LayerSpec().file("z/h", b"3"), tmp_path / "c")
    os.symlink(b, tmp_path / "link-b")
    outs = [a / "x/out", b / "out", b, tmp_path / "link-b/y/out", c / "deeper/out"]
    for out in outs:
        p = cli.run("diff", f"{a}:{c}", b, "--out", out, check=False)
        msg = one_line(p, 1)
        assert "inside" in msg and len(msg) < 300, msg
    assert sorted(os.listdir(a)) == ["x"] and sorted(os.listdir(a / "x")) == ["f"]
    assert sorted(os.listdir(b)) == ["y"] and sorted(os.listdir(b / "y")) == ["g"]
    assert sorted(os.listdir(c)) == ["z"]


def test_diff_out_inside_a_bind_mount_of_an_input_is_refused(tmp_path, cli):
    a = materialise(LayerSpec().file("x/f", b"1"), tmp_path / "a")
    b = materialise(LayerSpec().file("y/g", b"2"), tmp_path / "b")
    (tmp_path / "bind").mkdir()
    subprocess.run(["mount", "--bind", b, tmp_path / "bind"], check=True)
    try:
        p = cli.run("diff", a, b, "--out", tmp_path / "bind/y/out", check=False)
    finally:
        mounts.force_unmount(tmp_path / "bind")
    assert "inside" in one_line(p, 1)
    assert sorted(os.listdir(b / "y")) == ["g"]


# -- 14 and 17: several images; a tag that is already a name ------------------------------
def _layout_with_two_images(tmp_path, cli) -> tuple[str, str]:
    one = materialise(LayerSpec().file("f", b"one\n"), tmp_path / "one")
    two = materialise(LayerSpec().file("f", b"two\n"), tmp_path / "two")
    ids = []
    for tag, src in (("t1", one), ("t2", two)):
        ids.append(cli.out("import", src, "--name", tag))
        cli.run("export", tag, "-o", tmp_path / f"lay-{tag}", "--format", "oci")
    both = tmp_path / "both"
    subprocess.run(["cp", "-a", tmp_path / "lay-t1", both], check=True)
    subprocess.run(f"cp -an '{tmp_path}/lay-t2/blobs/sha256/.' '{both}/blobs/sha256/'",
                   shell=True, check=True)
    index = json.loads((both / "index.json").read_text())
    index["manifests"] += json.loads((tmp_path / "lay-t2/index.json").read_text())["manifests"]
    (both / "index.json").write_text(json.dumps(index))
    return str(both), ids


def test_item14_import_picks_one_image_of_several(tmp_path, cli, root):
    both, _ = _layout_with_two_images(tmp_path, cli)
    other = cli.__class__(tmp_path / "store2")
    msg = one_line(other.run("import", both, check=False), 1)
    assert "--image" in msg, msg
    for tag, content in (("t2", b"two\n"), ("t1", b"one\n")):
        other.run("import", both, "--image", tag)
        other.run("export", tag, "-o", tmp_path / f"out-{tag}")
        assert (tmp_path / f"out-{tag}/f").read_bytes() == content
    msg = one_line(other.run("import", both, "--image", "nope", check=False), 3)
    assert "nope" in msg


def test_item17_a_tag_that_is_a_name_moves_to_the_new_image(tmp_path, cli):
    _layout_with_two_images(tmp_path, cli)
    # lay-t1 and a retagged copy of lay-t2 both say "t"
    other = cli.__class__(tmp_path / "store2")
    for n in ("t1", "t2"):
        index = json.loads((tmp_path / f"lay-{n}/index.json").read_text())
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "t"
        (tmp_path / f"lay-{n}/index.json").write_text(json.dumps(index))
    first = other.out("import", tmp_path / "lay-t1")
    p = other.run("import", tmp_path / "lay-t2")
    assert "'t'" in p.stderr and "moved" in p.stderr, p.stderr
    other.run("export", "t", "-o", tmp_path / "out")
    assert (tmp_path / "out/f").read_bytes() == b"two\n"
    other.run("inspect", first)            # the old image is still there, only untagged
    # an explicit --name that is taken stays an error
    msg = one_line(other.run("import", tmp_path / "lay-t1", "--name", "t", check=False), 4)
    assert "'t'" in msg
