"""Trees thousands of directories deep: import, digest, farm, diff, export and prune walk
them without recursion and through directory fds (their absolute paths exceed PATH_MAX);
what cannot support them says so in one line, never with a traceback."""
from __future__ import annotations

import os

import pytest

from snapshotter.digest import tree_digest

pytestmark = pytest.mark.timeout(300)

DEPTH = 2000


@pytest.fixture(autouse=True)
def remove_deep_trees(tmp_path):
    """pytest's own clean-up of old temp dirs recurses per level (shutil.rmtree): remove the
    deep trees ourselves, last (after the store's fsck)."""
    yield
    from mergefs import syscalls
    for name in os.listdir(tmp_path):
        syscalls.rmtree(tmp_path / name)


def make_deep(root, depth: int, name: str = "d", leaf: bytes = b"deep\n") -> None:
    """``root/name/name/.../leaf`` (+ a hardlink and a symlink beside it), made through fds."""
    os.mkdir(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        f = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, leaf)
        os.close(f)
        os.link("leaf", "leaf2", src_dir_fd=fd, dst_dir_fd=fd)
        os.symlink("leaf", "link", dir_fd=fd)
    finally:
        os.close(fd)


def bottom(root, depth: int, name: str = "d") -> dict[str, bytes]:
    """What the deepest directory holds: file contents, symlink targets (``->``)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = {}
        for n in os.listdir(fd):
            st = os.stat(n, dir_fd=fd, follow_symlinks=False)
            if os.path.stat.S_ISLNK(st.st_mode):
                out[n] = b"-> " + os.readlink(n, dir_fd=fd).encode()
            elif os.path.stat.S_ISREG(st.st_mode):
                f = os.open(n, os.O_RDONLY, dir_fd=fd)
                out[n] = os.read(f, 100)
                os.close(f)
            else:
                out[n] = b"<%o>" % st.st_mode
        return out
    finally:
        os.close(fd)


def one_line(p, code: int) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code, (p.returncode, p.stderr[:500])
    assert len(lines) == 1 and lines[0].startswith("mergefs: error: "), p.stderr[:500]
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr
    assert len(lines[0]) < 400, lines[0][:500]
    return lines[0]


@pytest.fixture
def deep(tmp_path):
    make_deep(tmp_path / "deep", DEPTH)
    make_deep(tmp_path / "deep2", DEPTH, leaf=b"changed\n")
    return tmp_path / "deep", tmp_path / "deep2"


def test_import_and_prune_of_a_2000_level_tree(cli, root, deep):
    a, _ = deep
    ida = cli.out("import", a)
    assert ida == tree_digest(a).digest          # iterative digest, same definition
    assert bottom(root / "snapshots" / ida.split(":")[1] / "fs", DEPTH) == bottom(a, DEPTH)
    cli.run("du")
    cli.run("release", ida)
    cli.run("prune")
    assert os.listdir(root / "snapshots") == []


def test_merge_diff_export_of_a_2000_level_tree(tmp_path, cli, root, deep):
    a, b = deep
    ida, idb = cli.out("import", a), cli.out("import", b)
    farm = cli.out("merge", ida, idb, "--strategy", "farm")
    diff = cli.out("diff", ida, idb)
    cli.run("diff", "--out", tmp_path / "diff-out", a, b)
    cli.run("merge", "--out", tmp_path / "farm-out", a, b)
    cli.run("export", diff, "-o", tmp_path / "diff-dir", "--format", "dir")
    want = {"leaf": b"changed\n", "leaf2": b"changed\n", "link": b"-> leaf"}
    for tree in (root / "snapshots" / farm.split(":")[1] / "fs", tmp_path / "farm-out"):
        assert bottom(tree, DEPTH) == want
    for tree in (tmp_path / "diff-out", tmp_path / "diff-dir"):
        assert bottom(tree, DEPTH) == want       # F3: the parent chain is recreated
    for i in (ida, idb, farm, diff):
        cli.run("release", i)
    cli.run("prune")
    assert os.listdir(root / "snapshots") == []


def test_commit_of_a_2000_level_upper_over_a_parent(tmp_path, cli, root, deep):
    """commit copies the upper and rewrites it with explicit whiteouts (make_explicit):
    both walk it without recursion."""
    a, upper = deep
    parent = cli.out("import", a)
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:                                     # an opaque dir deep down, a whiteout beside
        for _ in range(DEPTH - 1):
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.setxattr(f"/proc/self/fd/{fd}/d", "trusted.overlay.opaque", b"y")
    finally:
        os.close(fd)
    layer = cli.out("commit", upper, "--parent", parent)
    fs = root / "snapshots" / layer.split(":")[1] / "fs"
    assert "trusted.overlay.opaque" not in os.listxattr(fs)
    assert bottom(fs, DEPTH) == {"leaf": b"changed\n", "leaf2": b"changed\n", "link": b"-> leaf"}


def test_tar_export_deeper_than_the_import_limit_is_one_line(tmp_path, cli, deep):
    layer = cli.out("import", deep[0])
    for fmt in ("tar", "oci"):
        p = cli.run("export", layer, "-o", tmp_path / f"out-{fmt}", "--format", fmt, check=False)
        assert "levels deep" in one_line(p, 1)
        assert not os.path.lexists(tmp_path / f"out-{fmt}")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out-")]


def test_paths_longer_than_path_max_inside_a_layer(tmp_path, cli, root, deep):
    """1500 levels of 'ddd': the relative path is 6000 bytes. Import, digest, du and prune
    walk it by fds; the farm builder and the differ open each directory from the one
    before (``syscalls.DirCursor``), never by its path from the layer root."""
    make_deep(tmp_path / "long", 1500, name="ddd")
    layer = cli.out("import", tmp_path / "long")
    want = bottom(tmp_path / "long", 1500, "ddd")
    assert bottom(root / "snapshots" / layer.split(":")[1] / "fs", 1500, "ddd") == want
    cli.run("du")
    cli.run("merge", "--out", tmp_path / "farm", deep[0], tmp_path / "long")
    assert bottom(tmp_path / "farm", 1500, "ddd") == want
    cli.run("diff", "--out", tmp_path / "diff", deep[0], tmp_path / "long")
    assert bottom(tmp_path / "diff", 1500, "ddd") == want
    assert not [n for n in os.listdir(tmp_path) if ".mergefs-staging-" in n]
    cli.run("release", layer)
    cli.run("prune")
    assert os.listdir(root / "snapshots") == [] and os.listdir(root / "staging") == []


def test_rmtree_never_follows_a_symlink_and_removes_deep_trees(tmp_path):
    from mergefs import syscalls
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    make_deep(tmp_path / "t", DEPTH)
    os.symlink(outside, tmp_path / "t" / "to-outside")
    syscalls.rmtree(tmp_path / "t")
    assert not os.path.lexists(tmp_path / "t") and (outside / "keep").read_text() == "x"
    os.symlink(outside, tmp_path / "link")
    syscalls.rmtree(tmp_path / "link")               # the link goes, not its target
    assert not os.path.lexists(tmp_path / "link") and (outside / "keep").exists()
    syscalls.rmtree(tmp_path / "missing", ignore_errors=True)
    with pytest.raises(FileNotFoundError):
        syscalls.rmtree(tmp_path / "missing")
