"""How a command-line argument names a layer directory or a store ref.

One rule for every verb, decided by the spelling alone, never by what happens
to exist on the host (like ``docker run -v``: a host path starts with ``/`` or
``.``, anything else is a volume name):

* a **layer directory** is written ``/abs/path``, ``./rel``, ``../rel``, ``.``,
  ``..``, or ``dir:PATH`` (any path, spelled out);
* a **store ref** (a name, an id ``sha256:...`` or a unique id prefix) has no
  ``/``;
* anything else (``base/sub``: a relative path without ``./``, or an image
  reference like ``library/debian``) is a usage error that says how to write it.

``mergefs explain`` takes ``REF PATH...`` or ``-l DIR [-l DIR...] PATH...``:
its paths are paths in the merged view, never layer directories.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UsageError

DIR_PREFIX = "dir:"
_DIR_STARTS = ("/", "./", "../")


@dataclass(frozen=True)
class Arg:
    """A classified argument: ``kind`` is "dir" (``value`` absolute) or "ref"."""
    kind: str
    value: str

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


def looks_like_dir(arg: str) -> bool:
    return arg.startswith(DIR_PREFIX) or arg.startswith(_DIR_STARTS) or arg in (".", "..")


def classify(arg: str, what: str = "LAYER") -> Arg:
    """A layer directory or a store ref, by spelling; UsageError if it could be either."""
    if arg.startswith(DIR_PREFIX):
        path = arg[len(DIR_PREFIX):]
        if not path:
            raise UsageError(f"{what} {arg!r}: give the directory after 'dir:'")
        return Arg("dir", os.path.abspath(path))
    if looks_like_dir(arg):
        return Arg("dir", os.path.abspath(arg))
    if not arg:
        raise UsageError(f"{what}: an empty argument is neither a directory nor a ref")
    if "/" in arg:
        raise UsageError(f"{what} {arg!r} is ambiguous: write ./{arg} (or dir:{arg}) for a "
                         "layer directory; a store ref has no '/'")
    return Arg("ref", arg)


def store_arg(arg: str, what: str = "LAYER") -> str:
    """The string the store functions take: an absolute path for a directory, else the ref."""
    return classify(arg, what).value


def ref_only(arg: str, verb: str) -> str:
    """A store ref for a verb that never imports; a directory is a usage error."""
    a = classify(arg, "REF")
    if a.is_dir:
        raise UsageError(f"{verb} takes a store ref, not the directory {arg!r}: "
                         f"run `mergefs import {arg}` first")
    return a.value


def stack(arg: str, what: str) -> list[Arg]:
    """diff's LOWER/UPPER: one argument, or several joined by ':' (bottom first).

    ``sha256:...`` ids and ``dir:`` prefixes keep their colon.
    """
    parts: list[str] = []
    for tok in arg.split(":"):
        if parts and parts[-1] in ("sha256", "dir"):
            parts[-1] += ":" + tok
        else:
            parts.append(tok)
    return [classify(p, what) for p in parts]
