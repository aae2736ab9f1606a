"""The server's table of compiled generated sources (mergefs.union.codecache)."""
from __future__ import annotations

import ast
import builtins
import subprocess
import sys

from mergefs.union import codecache

SOURCE = "def f(x: int) -> int:\n    return x + 1\n"


def test_a_hit_is_what_compile_returns_with_the_callers_future_flags():
    table: dict = {}
    with codecache.using(table, record=True):
        recorded = compile(SOURCE, "<gen f>", "exec")   # this module has annotations' flag
    assert recorded == compile(SOURCE, "<gen f>", "exec")
    assert recorded.co_flags & codecache.FUTURE_FLAGS      # the caller's flag was merged
    assert len(table) == 1
    hits: dict = {}
    with codecache.using(table, hits=hits):
        hit = compile(SOURCE, "<gen f>", "exec")
        again = compile(SOURCE, "<gen f>", "exec")          # used once: compiled afresh
        other = compile(SOURCE, "<gen f>", "exec", dont_inherit=True)   # other flags: a miss
    assert hit is recorded and again is not hit and again == hit
    assert other != hit and not other.co_flags & codecache.FUTURE_FLAGS
    assert table == {} and len(hits) == 1
    assert builtins.compile is not None and compile.__module__ == "builtins"


def test_a_nested_callers_code_flags_are_not_taken_for_future_flags():
    def nested():
        return compile(SOURCE, "<gen g>", "exec")
    table: dict = {}
    with codecache.using(table, record=True):
        code = nested()
    assert code == compile(SOURCE, "<gen g>", "exec")
    ((_, _, _, flags, _),) = table
    assert flags == code.co_flags & codecache.FUTURE_FLAGS and not flags & 0x10   # CO_NESTED


def test_exec_and_eval_of_a_text_keep_their_meaning():
    def in_a_function():
        z = 7
        exec("y = z + 1")                        # the caller's namespaces
        return locals()["y"], eval(" z * 2")      # eval drops leading blanks

    table: dict = {}
    ns: dict = {}
    with codecache.using(table, record=True):
        exec("def h(a: no_such_name) -> None: pass\nx = 1", ns)   # this module's future flags
        got = in_a_function(), eval("x + 1", ns), eval(b"  x + 2", ns)
        exec(compile("w = 3", "<c>", "exec"), ns)
    assert got == ((8, 14), 2, 3) and ns["x"] == 1 and ns["w"] == 3
    assert ns["h"].__annotations__ == {"a": "no_such_name", "return": "None"}
    assert ("x + 1", "<string>", "eval") in {k[:3] for k in table}
    hits: dict = {}
    ns2: dict = {}
    with codecache.using(table, hits=hits):
        exec("def h(a: no_such_name) -> None: pass\nx = 1", ns2)
        assert eval("x + 1", ns2) == 2
    assert len(hits) == 2 and ns2["h"].__annotations__ == ns["h"].__annotations__
    assert exec.__module__ == eval.__module__ == "builtins"


def test_other_calls_go_straight_to_compile():
    table: dict = {}
    with codecache.using(table, record=True):
        tree = compile("x + 1", "<e>", "eval", ast.PyCF_ONLY_AST)
        code = compile(b"y = 2", "<b>", "exec")
    assert isinstance(tree, ast.Expression) and code.co_filename == "<b>"
    assert table == {}


def test_a_foreign_or_damaged_file_is_ignored(tmp_path):
    path = tmp_path / "t.bin"
    codecache.write({("a", "<a>", "exec", 0, 0): compile("a = 1", "<a>", "exec")}, str(path))
    assert len(codecache.load(str(path))) == 1
    data = path.read_bytes()
    path.write_bytes(b"\0\0\r\n" + data[4:])                    # another bytecode version
    assert codecache.load(str(path)) == {}
    path.write_bytes(data[:len(data) // 2])                      # truncated
    assert codecache.load(str(path)) == {}
    assert codecache.load(str(tmp_path / "missing")) == {}


def test_the_built_table_is_used_whole_by_a_servers_imports(tmp_path):
    """Built in one interpreter, every entry is hit by a fresh one importing what
    a server imports, and equals what compile returns there."""
    path = str(tmp_path / "cc.bin")
    r = subprocess.run([sys.executable, "-m", "mergefs.union.codecache", path],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", f"""
import sys
from mergefs.union import codecache, prefork
table = codecache.load({path!r})
n = len(table)
for (src, fn, mode, flags, opt), code in table.items():
    assert code == compile(src, fn, mode, flags, True, opt), fn
hits = {{}}
with codecache.using(table, hits=hits):
    prefork.defer_unused()
    prefork.import_modules()
assert "trio" in sys.modules and table == {{}} and len(hits) == n, (table.keys(), n)
print(n)
"""], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 20            # attrs' classes in trio: ~60


def test_attrs_hash_salts_are_stable_so_every_attrs_text_hits(tmp_path):
    """attrs salts a class's ``__hash__`` text with ``hash()`` of a name, which
    changes per process; inside ``using`` it is the same in every process, so a
    fresh interpreter importing what a server imports compiles no attrs text
    (before: 37 classes' methods compiled at every start). The salt still
    tells classes apart; outside ``using`` attrs salts as before."""
    path = str(tmp_path / "cc.bin")
    r = subprocess.run([sys.executable, "-m", "mergefs.union.codecache", path],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", f"""
import builtins, sys
from mergefs.union import codecache, prefork
misses = []
real = builtins.compile
def spy(src, fn, *a, **kw):
    misses.append(fn)
    return real(src, fn, *a, **kw)
builtins.compile = spy
with codecache.using(codecache.load({path!r})):
    prefork.defer_unused()
    prefork.import_modules()
    import attr
    @attr.s(frozen=True)
    class A:
        x = attr.ib()
    @attr.s(frozen=True)
    class B:
        x = attr.ib()
builtins.compile = real
assert [m for m in misses if m.startswith("<attrs generated")] == [
    "<attrs generated methods __main__.A>", "<attrs generated methods __main__.B>"], misses
salt = codecache.stable_hash("<attrs generated hash __main__.A>")
assert salt in A.__hash__.__code__.co_consts
assert hash(A(1)) != hash(B(1)) and hash(A(1)) == hash(A(1)) and A(1) == A(1)
@attr.s(frozen=True)
class C:
    x = attr.ib()
assert codecache.stable_hash("<attrs generated hash __main__.C>") not in C.__hash__.__code__.co_consts
print("ok")
"""], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_stable_hash_is_a_hash_value():
    assert codecache.stable_hash("<attrs generated hash m.C>") == \
        codecache.stable_hash("<attrs generated hash m.C>")
    assert codecache.stable_hash("a") != codecache.stable_hash("b")
    values = [codecache.stable_hash(str(i)) for i in range(1000)]
    assert all(-(1 << 63) <= v < (1 << 63) and v != -1 for v in values)
    assert any(v < 0 for v in values) and any(v > 0 for v in values)
    real = builtins.hash
    with codecache.using({}):      # only attrs' own call is answered differently
        assert builtins.hash is not real
        assert hash("<attrs generated hash m.C>") == real("<attrs generated hash m.C>")
    assert builtins.hash is real
    assert builtins.hash.__module__ == "builtins"
