"""containerd's filter syntax, the subset ``Snapshotter.walk`` takes.

A filter is a list of selectors joined by ``,`` (all must hold); several
filters given together match when any of them does. A selector is a field
path, then optionally an operator and a value::

    name==default/1/sha256:abc      parent!=base      kind==active
    labels."containerd.io/gc.root"  labels.team==web  name~=^default/

Field path segments are separated by ``.``; a segment may be double-quoted
(then ``.``, ``,`` and ``=`` are literal, ``\\"`` and ``\\\\`` escape). A value
may be double-quoted too. Operators: ``==``, ``!=``, ``~=`` (a Python regular
expression, searched). A path without an operator means "the field exists
and is not empty". Fields: ``name``, ``parent``, ``kind`` (view, active,
committed), ``labels.KEY``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from mergefs.errors import InvalidArgument

OPERATORS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None = None
    value: str | None = None

    def matches(self, field: Callable[[tuple[str, ...]], str | None]) -> bool:
        got = field(self.path)
        if self.op is None:
            return bool(got)
        if self.op == "==":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        return got is not None and re.search(self.value or "", got) is not None


class _Reader:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def peek(self, n: int = 1) -> str:
        return self.text[self.i:self.i + n]

    def done(self) -> bool:
        return self.i >= len(self.text)

    def quoted(self) -> str:
        out, self.i = [], self.i + 1
        while not self.done():
            c = self.text[self.i]
            self.i += 1
            if c == "\\" and not self.done():
                out.append(self.text[self.i])
                self.i += 1
            elif c == '"':
                return "".join(out)
            else:
                out.append(c)
        raise InvalidArgument(f"filter {self.text!r}: unterminated quote")

    def bare(self, stops: str) -> str:
        start = self.i
        while not self.done() and self.text[self.i] not in stops \
                and self.peek(2) not in OPERATORS:
            self.i += 1
        return self.text[start:self.i]


def _selector(r: _Reader, text: str) -> Selector:
    path = []
    while True:
        seg = r.quoted() if r.peek() == '"' else r.bare(".,")
        if not seg:
            raise InvalidArgument(f"filter {text!r}: empty field name")
        path.append(seg)
        if r.peek() != ".":
            break
        r.i += 1
    if r.peek(2) not in OPERATORS:
        return Selector(tuple(path))
    op = r.peek(2)
    r.i += 2
    if r.peek() == '"':
        value = r.quoted()
    else:
        start = r.i
        while not r.done() and r.text[r.i] != ",":
            r.i += 1
        value = r.text[start:r.i]
    if op == "~=":
        try:
            re.compile(value)
        except re.error as e:
            raise InvalidArgument(f"filter {text!r}: bad regular expression: {e}") from None
    return Selector(tuple(path), op, value)


def parse(text: str) -> list[Selector]:
    """One filter: selectors joined by ',' (a conjunction)."""
    r, out = _Reader(text.strip()), []
    while True:
        out.append(_selector(r, text))
        if r.done():
            return out
        if r.peek() != ",":
            raise InvalidArgument(f"filter {text!r}: unexpected {r.peek()!r} at {r.i}")
        r.i += 1


def matcher(filters: Iterable[str]) -> Callable[[Callable], bool]:
    """A predicate over a field getter: true if any filter's selectors all hold."""
    parsed = [parse(f) for f in filters if f.strip()]
    if not parsed:
        return lambda field: True
    return lambda field: any(all(s.matches(field) for s in sel) for sel in parsed)
