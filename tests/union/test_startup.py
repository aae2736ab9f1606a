"""Mount start-up: what the server imports before it can answer, and the paths
the preforked server takes (mergefs.union.prefork)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergefs.testing.builders import LayerSpec, materialise_stack
from mergefs.testing.mounts import servers_of
from mergefs.union import server

from ..conftest import needs

needs_root_fuse = needs("fuse")

# modules that a FUSE server never uses and that cost start-up time: TLS, OpenSSL
# hashes, JSON, argument parsing, the store's database, archives
NOT_EXECUTED = ("ssl", "_ssl", "hmac", "hashlib", "_hashlib", "idna", "json", "argparse",
                "sqlite3", "tarfile", "logging.handlers", "mergefs.cli.cmd_mount",
                "snapshotter", "trio._dtls", "trio._ssl", "trio._file_io", "trio._path",
                "trio._channel", "trio._highlevel_open_tcp_stream")

PROBE = """
import sys
import mergefs.cli
from mergefs.union import prefork
prefork.import_server()
import pyfuse3, trio
print(" ".join(n for n in sys.modules
               if type(sys.modules[n]) is not prefork._Deferred and n in sys.argv[1:]))
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60)


def test_server_import_set_is_trimmed():
    r = _run(PROBE, *NOT_EXECUTED)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []


def test_the_mount_command_builds_its_view_without_the_server_imports(tmp_path):
    """The mount command checks the layers (``build_view``) and mounts before it
    hands the fd to the server it forked early: pyfuse3 and trio are the
    server's (~300 M instructions, 60-70 ms of the command's CPU beside the
    server's own import of them when one module's logger pulled them in)."""
    for d in ("l0/etc", "up", "wk"):
        (tmp_path / d).mkdir(parents=True)
    r = _run("""
import sys
import mergefs.cli, mergefs.cli.cmd_mount
from mergefs.mountspec import MountSpec
from mergefs.union import prefork, server
for spec in (MountSpec((sys.argv[1],)), MountSpec((sys.argv[1],), sys.argv[2], sys.argv[3])):
    server.build_view(spec).close()
    server.kernel_mount_args(spec, 3)
print(" ".join(n for n in ("pyfuse3", "trio", "mergefs.union.ops", "mergefs.union.errors")
               if n in sys.modules))
""", str(tmp_path / "l0"), str(tmp_path / "up"), str(tmp_path / "wk"))
    assert (r.returncode, r.stdout.split()) == (0, []), r.stderr


def test_deferred_modules_work_when_used():
    """A deferred module runs its code on first use and is then the real module."""
    r = _run("""
from mergefs.union import prefork
prefork.import_server()
import ssl, hmac, idna, shutil, tempfile, trio, sys, linecache, logging
assert all(type(sys.modules[n]) is prefork._Deferred for n in prefork.DEFERRED)
try:
    1 / 0
except ZeroDivisionError:
    import traceback
    assert "ZeroDivisionError" in traceback.format_exc()
assert linecache.getline(prefork.__file__, 1).startswith(chr(34) * 3)   # tokenize.open
import locale, token
assert locale.getpreferredencoding(False) and token.NAME >= 0
import trio.testing
ctx = ssl.create_default_context()
assert isinstance(ctx, ssl.SSLContext) and type(sys.modules["ssl"]) is type(sys)
from hmac import compare_digest
assert compare_digest(b"a", b"a") and hmac.new(b"k", b"m", "sha256").hexdigest()
assert idna.encode("b\\u00fccher.de") == b"xn--bcher-kva.de"
assert trio.SSLStream(trio.testing.MemorySendStream(), ctx, server_hostname="x")
d = tempfile.mkdtemp()
assert shutil.copy(sys.executable, d)
shutil.rmtree(d)
assert type(sys.modules["shutil"]) is type(sys.modules["tempfile"]) is type(sys)
assert not any(type(sys.modules[n]) is prefork._Deferred for n in prefork.DEFERRED)
print("ok")
""")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


TRIO_NAMES = """
import sys, trio
print(" ".join(f"{n}={getattr(trio, n).__module__}.{getattr(getattr(trio, n), '__qualname__', '')}"
               for n in sorted(dir(trio)) if not n.startswith("_")
               and hasattr(getattr(trio, n), "__module__")))
"""


def test_a_fork_of_an_imported_server_does_not_import_again():
    """The mount server's spare is forked from a process that ran import_server: the
    spare's own call does nothing (it read and unmarshalled the compiled-code table
    again, ~2-4.5 ms of each spare's CPU); a fresh process still imports."""
    r = _run("""
import os, sys
from mergefs.union import codecache, prefork
loads = []
real = codecache.load
codecache.load = lambda *a: loads.append(1) or real(*a)
prefork.import_server()
assert loads == [1] and "pyfuse3" in sys.modules
pid = os.fork()
if pid == 0:
    prefork.import_server()
    os._exit(0 if loads == [1] else 3)
assert os.waitpid(pid, 0)[1] == 0
print("ok")
""")
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


def test_a_servers_trio_has_every_name_of_trio():
    """The server's trio (prefork.import_trio) loads its TLS, DTLS, file,
    path, channel and high-level socket parts when first used: every public
    name of a plain ``import trio`` is there, with trio's public module name,
    also through ``from trio import``; a deprecated-name lookup is trio's."""
    plain = _run(TRIO_NAMES)
    lean = _run("from mergefs.union import prefork\nprefork.import_server()\n" + TRIO_NAMES)
    assert plain.returncode == lean.returncode == 0, plain.stderr + lean.stderr
    assert lean.stdout == plain.stdout and len(plain.stdout.split()) > 60
    r = _run("""
import sys
from mergefs.union import prefork
prefork.import_server()
import trio
assert "trio._ssl" not in sys.modules and "trio._dtls" not in sys.modules
from trio import SSLStream, open_memory_channel
send, receive = open_memory_channel(1)
assert "trio._ssl" in sys.modules and "trio._dtls" not in sys.modules
async def main():
    await send.send(1)
    return await receive.receive(), await trio.Path("/").is_dir()
assert trio.run(main) == (1, True)
try:
    trio.no_such_name
except AttributeError as e:
    assert str(e) == "module 'trio' has no attribute 'no_such_name'", e
print("ok")
""")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_another_trio_is_imported_as_usual():
    """A trio whose ``__init__`` does not import a lazy part the expected way is
    imported whole (a later trio version, a patched one)."""
    r = _run("""
import sys
from mergefs.union import prefork
prefork.TRIO_LAZY += ("_no_such_part",)
prefork.import_server()
import trio
assert "trio._dtls" in sys.modules and not hasattr(trio, "_LAZY")
print("ok")
""")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_inode_fh_marker_identity_stands_for_the_digest(tmp_path):
    """The marker's ``file`` line (written by the installer) spares the hash
    while the module file is unchanged; any rewrite falls back to the digest."""
    so = tmp_path / "mod.so"
    so.write_bytes(b"built module")
    marker = tmp_path / server.INODE_FH_MARKER
    digest = server.module_digest(str(so))
    marker.write_text(f"v2\nsha256 {digest}\n")
    assert server.marked_inode_fh(str(so))
    marker.write_text(f"v2\nfile {server.module_identity(str(so))}\nsha256 {'0' * 64}\n")
    assert server.marked_inode_fh(str(so))            # identity matches: digest not recomputed
    so.write_bytes(b"stock module")                   # pip put another build back
    assert not server.marked_inode_fh(str(so))
    marker.write_text(f"v2\nfile 1:2:3:4:5\nsha256 {server.module_digest(str(so))}\n")
    assert server.marked_inode_fh(str(so))            # stale identity: the digest decides
    marker.write_text("v2\n")
    assert not server.marked_inode_fh(str(so))


def test_inode_fh_answer_is_kept_for_the_process():
    """pyfuse3_passes_inode reads the marker (and hashes the module where its
    identity is stale) once per process and question: a mount server asks before
    it forks, its servers and each of their later mounts do not ask again;
    MERGEFS_NO_OPEN=0 still turns no-open off."""
    r = _run("""
import os
from mergefs.union import server
first = server.pyfuse3_passes_inode(writes=True), server.pyfuse3_passes_inode()
def asked(*a):
    raise AssertionError("the marker was read again")
server.marked_inode_fh = asked
assert (server.pyfuse3_passes_inode(writes=True), server.pyfuse3_passes_inode()) == first
os.environ["MERGEFS_NO_OPEN"] = "0"
assert server.pyfuse3_passes_inode(writes=True) is False
print("ok")
""")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def _inode_fh_tool():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        import pyfuse3_inode_fh
    finally:
        sys.path.pop(0)
    return pyfuse3_inode_fh


def test_inode_fh_build_reads_no_metadata_at_import():
    """The built pyfuse3 (tools/bootstrap.sh) has its version baked in: importing
    it loads neither importlib.metadata nor the email parser it pulls in."""
    import importlib.metadata
    import pyfuse3
    tool = _inode_fh_tool()
    marker = Path(pyfuse3.__file__).parent / server.INODE_FH_MARKER
    if not marker.exists():
        pytest.skip("stock pyfuse3: tools/bootstrap.sh could not build it (gcc, libfuse3-dev)")
    if not marker.read_text().startswith(tool.PATCH_MARK):   # a venv from before v3
        pytest.skip("an older build of pyfuse3: tools/bootstrap.sh rebuilds it")
    r = _run("import sys, pyfuse3; print(pyfuse3.__version__, *sorted("
             "n for n in sys.modules if n == 'email' or n.startswith('importlib.metadata')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [importlib.metadata.version("pyfuse3")]


def test_version_baking_is_exact():
    """The source patch takes only the lookup it knows and is idempotent."""
    tool = _inode_fh_tool()
    lookup, block = tool.VERSION_LOOKUP
    stock = f"import errno\n{lookup}import typing\n\n{block}\nFlagT = int\n"
    baked = tool.bake_version(stock, "3.5.0")
    assert "importlib" not in baked and "__version__ = '3.5.0'\n" in baked
    assert baked.startswith("import errno\nimport typing\n") and baked.endswith("FlagT = int\n")
    assert tool.bake_version(baked, "3.5.0") == baked
    namespace = {}
    exec(baked, namespace)
    assert namespace["__version__"] == "3.5.0"
    for other in (stock.replace("'unknown'", "None"), stock.replace(lookup, ""), stock + block):
        with pytest.raises(RuntimeError, match="expected way"):
            tool.bake_version(other, "3.5.0")


def _mergefs(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergefs", *args], capture_output=True,
                          text=True, timeout=60, **kw)


def _gone(mnt: Path) -> bool:
    deadline = time.monotonic() + 15
    while servers_of(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not servers_of(mnt)


@pytest.fixture
def mnt(tmp_path):
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    if server.is_mounted(str(m)):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


@needs_root_fuse
@pytest.mark.timeout(120)
def test_options_the_kernel_mount_cannot_take_go_through_libfuse(tmp_path, mnt):
    """``dirsync`` is not one of the options the CLI's own mount(2) takes: the
    preforked server then mounts through libfuse and reports back; the mount
    works, writable, and carries the option."""
    layers = materialise_stack([LayerSpec().file("etc/a", b"a")], tmp_path / "l")
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    r = _mergefs("-o", f"lowerdir={layers[0]},upperdir={up},workdir={wk},dirsync", str(mnt))
    assert r.returncode == 0, r.stderr
    assert (mnt / "etc/a").read_bytes() == b"a"
    (mnt / "etc/b").write_bytes(b"b")
    assert (up / "etc/b").read_bytes() == b"b"
    opts = next(ln.split()[3] for ln in open("/proc/self/mounts") if ln.split()[1] == str(mnt))
    assert "dirsync" in opts.split(",")
    assert subprocess.run(["umount", str(mnt)]).returncode == 0
    assert _gone(mnt)


@needs_root_fuse
@pytest.mark.timeout(120)
def test_eperm_from_mount_in_a_user_namespace_is_a_clear_error(tmp_path, mnt):
    """uid 0 of a user namespace without its own mount namespace: the CLI's
    mount(2) gets EPERM, the preforked server tries libfuse (as fuse-overlayfs
    does), which fails too; one line, exit 1, no server left behind."""
    layers = materialise_stack([LayerSpec().file("a", b"a")], tmp_path / "l")
    r = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-m", "mergefs",
                        "-o", f"lowerdir={layers[0]}", str(mnt)], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path)))
    # the log keeps fusermount3's error (not a quiet one): this test's to remove
    Path(server.default_log_path(str(mnt))).unlink(missing_ok=True)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("mergefs: error: mounting ") and r.stderr.count("\n") == 1
    assert not server.is_mounted(str(mnt))
    assert _gone(mnt)


FUSELOOP_PROBE = """
import os, pyfuse3
from mergefs.union import fuseloop
stock = pyfuse3._wait_fuse_readable
fd = os.open("/dev/fuse", os.O_RDWR)
print(fuseloop.install(), pyfuse3._wait_fuse_readable is not stock)
"""


@needs_root_fuse
def test_fuseloop_hooks_the_installed_pyfuse3():
    """The poll-first request wait (mergefs.union.fuseloop) replaces a function of
    pyfuse3's module; a pyfuse3 without it keeps its own wait, correct but ~2x the
    server CPU per request. This fails when the installed pyfuse3 loses the hook."""
    r = subprocess.run([sys.executable, "-c", FUSELOOP_PROBE], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"], r.stdout


@needs_root_fuse
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case, code, words", [
    ("unknown option", 2, "unrecognized arguments"),
    ("missing layer", 1, "does not exist"),
    ("helper form, missing layer", 1, "does not exist"),
])
def test_a_failing_mount_command_leaves_no_server(tmp_path, mnt, case, code, words):
    """The server is forked before the command parses anything: when the command
    then fails (a usage error, a layer that is not there), it exits with one
    line and its code, nothing is mounted, and the forked server exits too
    (once its imports are done) without serving anything."""
    layers = materialise_stack([LayerSpec().file("a", b"a")], tmp_path / "l")
    missing = str(tmp_path / "missing")
    argv = {"unknown option": ["mount", "--no-such-option", str(layers[0]), str(mnt)],
            "missing layer": ["mount", "--log", str(tmp_path / "log"), missing, str(mnt)],
            "helper form, missing layer": ["-o", f"lowerdir={missing},nokernel", str(mnt)]}[case]
    r = subprocess.run([sys.executable, "-c", "import sys; from mergefs.cli import main; "
                        "sys.exit(main())", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == code, r.stderr
    assert words in r.stderr and r.stderr.count("\n") == (1 if code == 1 else 2), r.stderr
    assert not server.is_mounted(str(mnt))
    assert _gone(mnt)


def test_the_servers_imports_run_no_ldconfig():
    """trio's import looks up pthread_setname_np through find_library("pthread"),
    which runs ``ldconfig -p``: on glibc 2.34 or later the server's imports
    answer libc (where the function is) without a process, trio still names
    its worker threads, and find_library is the real one afterwards."""
    import os
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    if name != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 34):
        pytest.skip(f"{name} {version}: find_library asks ldconfig")
    r = _run("""
import sys, threading
spawned = []
sys.addaudithook(lambda event, args: event == "subprocess.Popen" and spawned.append(args))
import ctypes.util
real = ctypes.util.find_library
from mergefs.union import prefork
prefork.import_server()
import trio
assert spawned == [] and ctypes.util.find_library is real, spawned
assert trio._core._thread_cache.set_os_thread_name is not None

async def main():
    return await trio.to_thread.run_sync(lambda: open(
        f"/proc/self/task/{threading.get_native_id()}/comm").read().strip())
print(trio.run(main))
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<lambda>"), r.stdout      # named by trio, not "python"
