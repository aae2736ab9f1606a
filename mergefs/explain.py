"""Why a path shows the version it shows: per layer, what it holds and what hid it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .layer import DIR, KIND_NAMES
from .resolver import Resolver, join


@dataclass(frozen=True)
class Explanation:
    """What one layer holds at a path and what happened to it."""
    layer: int
    kind: str            # "file", "dir", "whiteout", "opaque dir", ...
    status: str          # "supplies", "merged", "hidden", "absent"
    reason: str


class Mark(NamedTuple):
    """Something a layer holds at a prefix of the path that can hide lower layers."""
    prefix: bytes
    what: str           # "whiteout", "opaque", or a kind name
    kind: int | None


def _marks(resolver: Resolver, idx: int, path: bytes) -> tuple[list[Mark], int | None]:
    """The marks layer ``idx`` holds along ``path``, and its kind at ``path`` (or None)."""
    marks: list[Mark] = []
    cur = b""
    parts = path.split(b"/") if path else []
    ld = resolver.layer_dir(idx, b"")
    if ld.opaque:
        marks.append(Mark(b"", "opaque", DIR))
    if not parts:
        return marks, DIR
    for n, name in enumerate(parts):
        child = join(cur, name)
        entry = ld.entries.get(name)
        if name in ld.whiteouts:     # with an entry too (D2), it still hides lower layers
            marks.append(Mark(child, "whiteout", None))
        if entry is None:
            return marks, None
        last = n == len(parts) - 1
        if entry.kind != DIR:
            marks.append(Mark(child, KIND_NAMES[entry.kind], entry.kind))
            return marks, entry.kind if last else None
        ld = resolver.layer_dir(idx, child)
        if ld.opaque:
            marks.append(Mark(child, "opaque", DIR))
        if last:
            marks.append(Mark(child, "dir", DIR))
            return marks, DIR
        cur = child
    return marks, None


def _hider(mark: Mark, idx: int, path: bytes, kind: int) -> str | None:
    """Why ``mark`` of layer ``idx`` hides a lower ``kind`` at ``path``, or None."""
    p = mark.prefix.decode(errors="backslashreplace") or "/"
    if mark.what == "whiteout":
        return f"deleted by a whiteout of {p} in layer {idx}"
    if mark.prefix != path:
        if mark.what == "opaque":
            return f"hidden by opaque directory {p} in layer {idx}"
        if mark.kind != DIR:
            return f"{p} is a {mark.what} in layer {idx}, replacing the directory"
        return None
    if mark.what == "opaque" and kind == DIR:
        return None   # the opaque dir itself merges with nothing below: handled by "dir"
    if mark.kind != DIR:
        return f"overridden by a {mark.what} in layer {idx}"
    if kind != DIR:
        return f"replaced by a directory in layer {idx} (type change)"
    return None


def explain(resolver: Resolver, path: bytes) -> list[Explanation]:
    n = len(resolver.layers)
    held = [(idx, *_marks(resolver, idx, path)) for idx in range(n - 1, -1, -1)]
    out: list[Explanation] = []
    supplier_kind = None
    for pos, (idx, marks, kind) in enumerate(held):
        if kind is None:
            wh = [m for m in marks if m.what == "whiteout"]
            what = "whiteout" if wh and wh[-1].prefix == path else "nothing"
            out.append(Explanation(idx, what, "absent", ""))
            continue
        reason = None
        for above_idx, above_marks, above_kind in held[:pos]:
            for m in above_marks:
                reason = _hider(m, above_idx, path, kind)
                if reason:
                    break
            if reason is None and above_kind == DIR and kind == DIR and any(
                    m.what == "opaque" and m.prefix == path for m in above_marks):
                reason = f"hidden by opaque directory in layer {above_idx}"
            if reason:
                break
        what = KIND_NAMES[kind]
        if kind == DIR and any(m.what == "opaque" and m.prefix == path for m in marks):
            what = "opaque dir"
        if reason:
            out.append(Explanation(idx, what, "hidden", reason))
        elif supplier_kind is None:
            supplier_kind = kind
            out.append(Explanation(idx, what, "supplies", ""))
        else:
            out.append(Explanation(idx, what, "merged", "directory contents merge (M1)"))
    return out
