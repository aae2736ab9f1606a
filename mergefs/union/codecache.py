"""The compiled code of the source texts libraries generate while the server imports.

attrs, which trio uses for ~70 classes, writes each class's ``__init__``,
``__repr__``, ``__eq__``, ``__hash__`` ... as source text and compiles it when
the class is made: the parser and compiler are ~10% of a server's work until
its first answer. The texts are the same at every start (same library
versions), so ``python -m mergefs.union.codecache`` (run by
tools/bootstrap.sh) records what ``compile`` returned for each while importing
what a server imports, and writes it, marshalled as a ``.pyc`` is, beside this
module's byte code. While the server imports (``using``), ``compile`` looks a
call up there first and compiles only what it does not find; so do ``exec``
and ``eval`` of a text (dataclasses and namedtuple generate their methods
so), which compile it as they would (file name ``<string>``, the caller's
future flags, ``eval`` without leading blanks) and run it in the caller's
namespaces when given none.

A hit is the code object ``compile`` would return: the key is the whole
source, the file name, the mode, the effective compiler flags (the caller's
``from __future__`` flags, as ``compile`` merges them) and the optimization
level, and the file is ignored unless it was written by this interpreter's
bytecode version. Calls with other arguments (ASTs, bytes, other flags) go
straight to ``compile``. Each entry is used at most once per process, so two
calls never share one code object; a missing or unreadable file only means
compiling as before.
"""
from __future__ import annotations

import __future__
import builtins
import contextlib
import marshal
import os
import sys
import types
from importlib.util import MAGIC_NUMBER

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__",
                    f"codecache.{sys.implementation.cache_tag}.bin")
# the flags compile() takes from its caller's frame (CPython's PyCF_MASK): every
# __future__ feature's but nested_scopes' (CO_NESTED, a plain code flag now)
FUTURE_FLAGS = 0
for _name in __future__.all_feature_names:
    if _name != "nested_scopes":
        FUTURE_FLAGS |= getattr(__future__, _name).compiler_flag


# attrs salts each class's ``__hash__`` with ``hash()`` of a name it makes for
# the class (so that two classes with equal fields hash apart); a str's hash
# changes with every process (PYTHONHASHSEED), so the text of every class with
# a ``__hash__`` would be new each time and compiled afresh (~9% of a server's
# work until its first answer). Inside ``using``, attrs gets a salt that is the
# same in every process instead (FNV-1a of the name, 64 bits): still one salt
# per class, and what ``hash()`` answers for anything else is unchanged.
ATTRS_HASH_NAME = "<attrs generated hash "


def stable_hash(name: str) -> int:
    """FNV-1a (64 bits) of ``name``'s UTF-8, as a signed hash value (never -1)."""
    h = 0xcbf29ce484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001b3) & 0xffffffffffffffff
    h = h - (1 << 64) if h >= 1 << 63 else h
    return -2 if h == -1 else h


def load(path: str = PATH) -> dict:
    """The recorded table, or an empty one (no file, another interpreter, damage)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:len(MAGIC_NUMBER)] != MAGIC_NUMBER:
            return {}
        table = marshal.loads(data[len(MAGIC_NUMBER):])
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    return table if isinstance(table, dict) else {}


@contextlib.contextmanager
def using(table: dict, record: bool = False, hits: dict | None = None):
    """``compile`` answers from ``table`` inside the block, and so do ``exec``
    and ``eval`` of a source text (dataclasses and namedtuple generate theirs
    so): ``record`` adds what is compiled to the table, ``hits`` collects the
    entries used."""
    real_compile, real_exec, real_eval = builtins.compile, builtins.exec, builtins.eval
    real_hash = builtins.hash
    recorded: dict = {}

    def salt_hash(obj):
        if type(obj) is str and obj.startswith(ATTRS_HASH_NAME) and \
                sys._getframe(1).f_globals.get("__name__") == "attr._make":
            return stable_hash(obj)
        return real_hash(obj)

    def code_for(source: str, filename: str, mode: str, flags: int, optimize: int):
        key = (source, filename, mode, flags, sys.flags.optimize if optimize == -1 else optimize)
        code = table.pop(key, None)
        if code is not None and hits is not None:
            hits[key] = code
        if code is None:
            code = real_compile(source, filename, mode, flags, True, optimize)
            if record:
                recorded[key] = code
        return code

    def cached_compile(source, filename, mode, flags=0, dont_inherit=False, optimize=-1,
                       **kw):
        if kw or type(source) is not str or type(filename) is not str or flags & ~FUTURE_FLAGS:
            return real_compile(source, filename, mode, flags, dont_inherit, optimize, **kw)
        if not dont_inherit:        # what compile() merges from its caller's frame
            flags |= sys._getframe(1).f_code.co_flags & FUTURE_FLAGS
        return code_for(source, filename, mode, flags, optimize)

    def run(real, mode: str, source, globals, locals, kw):
        caller = sys._getframe(2)
        if globals is None:         # the caller's namespaces, as exec/eval take them
            globals = caller.f_globals
            if locals is None:
                locals = caller.f_locals
        if not isinstance(source, types.CodeType):     # compiled as exec/eval compile a text
            flags = caller.f_code.co_flags & FUTURE_FLAGS
            if isinstance(source, (bytes, bytearray)):
                source = real_compile(source.lstrip(b" \t") if mode == "eval" else source,
                                      "<string>", mode, flags, True)
            elif isinstance(source, str):
                source = code_for(source.lstrip(" \t") if mode == "eval" else source,
                                  "<string>", mode, flags, -1)
        return real(source, globals, locals, **kw)

    def cached_exec(source, globals=None, locals=None, /, **kw):
        return run(real_exec, "exec", source, globals, locals, kw)

    def cached_eval(source, globals=None, locals=None, /):
        return run(real_eval, "eval", source, globals, locals, {})

    builtins.compile, builtins.exec, builtins.eval = cached_compile, cached_exec, cached_eval
    builtins.hash = salt_hash
    try:
        yield
    finally:
        builtins.compile, builtins.exec, builtins.eval = real_compile, real_exec, real_eval
        builtins.hash = real_hash
        table.update(recorded)


def write(table: dict, path: str = PATH) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC_NUMBER + marshal.dumps(table))
    os.replace(tmp, path)


def build(path: str = PATH) -> int:
    """Import what a server imports, recording, and write the table; then keep
    only what a second interpreter finds in it (a text that changes per
    process can never hit). Returns the number of entries kept."""
    import subprocess
    table: dict = {}
    with using(table, record=True):
        _import_server()
    write(table, path)
    subprocess.run([sys.executable, "-m", "mergefs.union.codecache", "--prune", path],
                   check=True)
    return len(load(path))


def prune(path: str) -> None:
    hits: dict = {}
    with using(load(path), hits=hits):
        _import_server()
    write(hits, path)


def _import_server() -> None:
    """What ``prefork.import_server`` imports, without its own use of the table."""
    from mergefs.union import prefork
    prefork.defer_unused()
    prefork.import_modules()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--prune"]:
        prune(argv[1])
        return 0
    path = argv[0] if argv else PATH
    print(f"codecache: {build(path)} compiled sources kept for a server's start-up ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
