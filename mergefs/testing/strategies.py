"""Hypothesis strategies for random layer stacks (small trees, every entry kind)."""
from __future__ import annotations

from hypothesis import strategies as st

from .builders import DEFAULT_MTIME_NS, LayerSpec

NAMES = [b"a", b"b", b"c", b"d\xff"]
TARGETS = [b"a", b"../b", b"/etc", b"c/d", b"."]
MTIMES = [DEFAULT_MTIME_NS, 1_500_000_000_000_000_000, 1_700_000_000_999_999_999]
DATA = [b"", b"x", b"hello", b"y" * 5000]
KINDS = ["file", "file", "dir", "dir", "opaque", "symlink", "whiteout", "hardlink", "fifo",
         "recreated"]


@st.composite
def layer_spec(draw, max_depth: int = 3, kinds=KINDS) -> LayerSpec:
    spec = LayerSpec()
    files: list[bytes] = []
    spec.dir("", mode=draw(st.sampled_from([0o755, 0o700])), mtime_ns=draw(st.sampled_from(MTIMES)))

    def attrs():
        return dict(uid=draw(st.sampled_from([0, 1000])), mtime_ns=draw(st.sampled_from(MTIMES)))

    def xattrs():
        return draw(st.sampled_from([{}, {}, {"user.k": b"v"}, {"user.k": b"w", "user.z": b""}]))

    def fill(prefix: bytes, depth: int) -> None:
        for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3)):
            path = prefix + b"/" + name if prefix else name
            kind = draw(st.sampled_from(kinds))
            if kind == "recreated":      # D2/D7: a whiteout and a new entry of the same name
                spec.whiteout(path)
                kind = draw(st.sampled_from(["file", "dir"]))
            if kind == "hardlink" and not files:
                kind = "file"
            if kind == "file":
                spec.file(path, draw(st.sampled_from(DATA)), mode=draw(st.sampled_from(
                    [0o644, 0o600, 0o4755])), xattrs=xattrs(), **attrs())
                files.append(path)
            elif kind in ("dir", "opaque"):
                spec.dir(path, mode=draw(st.sampled_from([0o755, 0o711])), opaque=kind == "opaque",
                         xattrs=xattrs(), **attrs())
                if depth < max_depth:
                    fill(path, depth + 1)
            elif kind == "symlink":
                spec.symlink(path, draw(st.sampled_from(TARGETS)), **attrs())
            elif kind == "whiteout":
                spec.whiteout(path)
            elif kind == "hardlink":
                spec.hardlink(path, draw(st.sampled_from(files)))
            else:
                spec.fifo(path, **attrs())

    fill(b"", 0)
    return spec


def stacks(min_size: int = 1, max_size: int = 4):
    return st.lists(layer_spec(), min_size=min_size, max_size=max_size)
