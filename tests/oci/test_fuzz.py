"""S2 under fuzzing: any corruption of a layer tar gives a typed error or a tree, and
never a write outside the destination."""
from __future__ import annotations

import os
import shutil

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mergefs.errors import InvalidLayer, UnsafeContent
from mergefs.oci import extract_layer

from ..conftest import needs_root
from .conftest import entries_of, member, tar_bytes

SEED = tar_bytes([
    member("d", "dir"), member("d/f", data=b"hello" * 50, pax={"SCHILY.xattr.user.a": "b"}),
    member("d/l", "symlink", linkname="/etc"), member("d/h", "hardlink", linkname="d/f"),
    member("d/.wh.x"), member("d/.wh..wh..opq"), member("p", "fifo"),
    member("long/" + "n" * 150, data=b"x"), member("w", "char")])


def _is_header(block: bytes) -> bool:
    try:
        return int(block[148:156].rstrip(b"\0 "), 8) == sum(block[:148]) + 256 + sum(block[156:])
    except ValueError:
        return False


HEADER_BYTES = [i * 512 + j for i in range(len(SEED) // 512)
                if _is_header(SEED[i * 512:(i + 1) * 512]) for j in range(512)]
POSITION = st.one_of(st.sampled_from(HEADER_BYTES), st.integers(0, len(SEED) - 1))


def _fix_checksum(raw: bytearray, at: int) -> None:
    """Re-seal the header block holding byte ``at`` so the mutation reaches the parser."""
    start = at - at % 512
    block = raw[start:start + 512]
    block[148:156] = b" " * 8
    raw[start + 148:start + 156] = b"%06o\0 " % sum(block)


@needs_root
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(POSITION, st.integers(0, 255)),
                      min_size=1, max_size=6),
       reseal=st.booleans(), cut=st.one_of(st.none(), st.integers(0, len(SEED))))
def test_S2_mutated_tars_fail_cleanly(tmp_path_factory, edits, reseal, cut):
    base = tmp_path_factory.mktemp("fuzz")
    (base / "outside").mkdir()
    raw = bytearray(SEED)
    for at, value in edits:
        raw[at] = value
        if reseal:
            _fix_checksum(raw, at)
    if cut is not None:
        raw = raw[:cut]
    (base / "l.tar").write_bytes(bytes(raw))
    try:
        extract_layer(base / "l.tar", base / "dest")
        event("extracted")
    except (InvalidLayer, UnsafeContent) as e:
        event(type(e).__name__)
        assert not (base / "dest").exists()
    except OSError as e:
        event(f"OSError {e.errno}")
        # The filesystem's own refusals (a name too long, an invalid mode) stay
        # OSErrors, as everywhere in mergefs; nothing may be left behind.
        assert not (base / "dest").exists(), e
    assert entries_of(base / "outside") == []
    assert sorted(os.listdir(base)) in (["l.tar", "outside"], ["dest", "l.tar", "outside"])
    shutil.rmtree(base)
