"""``mergefs -o ...,service=SOCK TARGET``: containers/storage's mount program handed to
a running service, ``mergefs mount-server`` (a warm server per mount, forked or back: "fork")
or ``mergefs views serve`` (a bind of a view: "views"). No podman here;
tests/podman/test_podman.py runs podman on both.

The service runs on private paths and is stopped by pid; every mount a test
makes is unmounted in teardown.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergefs.testing import mounts
from mergefs.testing.services import MountService, program

from ..conftest import needs

pytestmark = [needs("root")]
KINDS = {"fork", "views"}


def mergefs(*args, cwd=None, program=None) -> subprocess.CompletedProcess:
    cmd = [program] if program else [sys.executable, "-m", "mergefs"]
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def lean(tmp_path_factory) -> str:
    """The mount program ``mergefs views install-program`` writes: mountclient.c
    compiled, python -IS for the rest."""
    where = tmp_path_factory.mktemp("bin")
    r = mergefs("views", "install-program", "--dir", where)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == program(where)
    with open(r.stdout.strip(), "rb") as f:
        assert f.read(4) == b"\x7fELF"              # cc is there: the C program
    return r.stdout.strip()


PT_INTERP = 3       # the segment naming a dynamic executable's loader


def elf_segments(path: str) -> set[int]:
    """The program header types of a 64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        elf = f.read()
    assert elf[:6] == b"\x7fELF\x02\x01"
    phoff = int.from_bytes(elf[32:40], "little")
    size, count = int.from_bytes(elf[54:56], "little"), int.from_bytes(elf[56:58], "little")
    return {int.from_bytes(elf[phoff + i * size:phoff + i * size + 4], "little")
            for i in range(count)}


def test_the_c_program_is_linked_statically_where_it_can_be(lean, tmp_path):
    """No loader and no libc mapped at each exec of the mount program (~0.4-0.5 ms of
    each mount) when this machine's C library links statically."""
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    static = subprocess.run(["cc", "-static", "-o", tmp_path / "probe", probe],
                            capture_output=True).returncode == 0
    assert (PT_INTERP not in elf_segments(lean)) == static
    r = subprocess.run([lean, "-o", "lowerdir=/nonexistent,service=/nonexistent.sock",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "does not answer" in r.stderr     # it runs (its fallback too)


def started(kind: str, tmp_path):
    """A service whose ``targets`` are unmounted when it is stopped."""
    srv = MountService(kind, tmp_path / "service")
    srv.targets = []
    try:
        yield srv
    finally:
        for t in srv.targets:
            mounts.force_unmount(t)
        srv.stop()
        assert not mounts.is_mounted(srv.mnt)


@pytest.fixture(params=["fork", "views"])
def service(request, tmp_path):
    yield from started(request.param, tmp_path)


@pytest.fixture
def layers(tmp_path):
    """Overlay-format layers, top first as lowerdir lists them: a whiteout, an
    opaque directory, a file replacing a directory."""
    base, top = tmp_path / "base", tmp_path / "top"
    for d in ("etc", "data/keep", "data/old"):
        (base / d).mkdir(parents=True)
    (base / "etc/motd").write_text("base\n")
    (base / "gone").write_text("hidden by top\n")
    (base / "data/keep/a").write_text("a\n")
    (base / "data/old/x").write_text("x\n")
    (top / "data/keep").mkdir(parents=True)
    os.setxattr(top / "data/keep", "trusted.overlay.opaque", b"y")
    (top / "data/keep/c").write_text("c\n")
    (top / "data/old").write_text("a file now\n")
    os.mknod(top / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    (top / "etc").mkdir()
    (top / "etc/motd").write_text("top\n")
    return [top, base]


def tree(root: Path) -> dict[str, tuple]:
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            body = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else None
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_size, body)
    return out


def views(service) -> list[dict]:
    from mergefs.union.ctlclient import control_call
    return control_call(service.control, {"op": "list"})["views"]


def writable_opts(tmp_path, layers, name: str) -> str:
    up, wk = tmp_path / f"{name}-up", tmp_path / f"{name}-wk"
    up.mkdir()
    wk.mkdir()
    return f"lowerdir={':'.join(map(str, layers))},upperdir={up},workdir={wk}"


def target(service, tmp_path, name: str) -> Path:
    t = tmp_path / name
    t.mkdir()
    service.targets.append(t)
    return t


@pytest.mark.parametrize("unmount, entry", [(["umount"], "script"),
                                            (["fusermount3", "-u"], "script"),
                                            (["umount"], "lean")])
def test_a_views_mount_shows_what_a_standalone_mount_shows_and_goes_with_its_bind(
        service, layers, tmp_path, unmount, entry, lean):
    mine = target(service, tmp_path, "svc")
    r = mergefs("-o", writable_opts(tmp_path, layers, "a") + f",volatile,service={service.control}",
                mine, program=lean if entry == "lean" else None)
    assert (r.returncode, r.stderr) == (0, "")
    if service.kind == "views":
        [view] = views(service)
        assert view["mounts"] == [str(mine)] and view["writable"]
    else:
        assert len(service.left()) == 1           # its server
    alone = target(service, tmp_path, "alone")
    r = mergefs("-o", writable_opts(tmp_path, layers, "b"), alone)
    assert r.returncode == 0, r.stderr
    try:
        assert tree(mine) == tree(alone)
    finally:
        mergefs("umount", alone)
    assert (mine / "data/old").read_text() == "a file now\n"
    assert not (mine / "gone").exists()
    (mine / "etc/motd").write_text("changed\n")          # lands in the upper only
    assert (tmp_path / "a-up/etc/motd").read_text() == "changed\n"
    assert (layers[0] / "etc/motd").read_text() == "top\n"
    assert subprocess.run([*unmount, str(mine)], capture_output=True).returncode == 0
    assert service.wait_empty() == []
    assert service.errors() == []


def test_mount_flags_follow_the_options(service, layers, tmp_path):
    """nosuid,nodev unless suid/dev, as a FUSE mount of its own; a read-only mount
    (no upper, layers with a whiteout: not the kernel's) is ro."""
    rw, ro = target(service, tmp_path, "rw"), target(service, tmp_path, "ro")
    r = mergefs("-o", writable_opts(tmp_path, layers, "f") + f",suid,dev,service={service.control}",
                rw)
    assert r.returncode == 0, r.stderr
    lowers = ":".join(map(str, layers))
    assert mergefs("-o", f"lowerdir={lowers},service={service.control}", ro).returncode == 0
    opts = {e.target: set(e.options.split(",")) for e in mounts_table()}
    assert not {"nosuid", "nodev", "ro"} & opts[str(rw)]
    assert {"nosuid", "nodev", "ro"} <= opts[str(ro)]
    with pytest.raises(OSError):
        (ro / "new").write_text("x")
    for t in (rw, ro):
        subprocess.run(["umount", str(t)], check=True)
    assert service.wait_empty() == []


def mounts_table():
    from mergefs import mounttable
    return mounttable.read()


def test_relative_layer_paths_are_the_callers(service, layers, tmp_path):
    """containers/storage passes ``l/ID`` paths relative to its working directory."""
    (tmp_path / "l").mkdir()
    os.symlink(layers[0], tmp_path / "l/TOP")
    os.symlink(layers[1], tmp_path / "l/BASE")
    (tmp_path / "up").mkdir()
    (tmp_path / "wk").mkdir()
    t = target(service, tmp_path, "rel")
    r = mergefs("-o", f"lowerdir=l/TOP:l/BASE,upperdir=up,workdir=wk,service={service.control}",
                "rel", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    if service.kind == "views":
        [view] = views(service)
        assert view["lowers"] == [str(layers[1]), str(layers[0])]
        assert view["upper"] == str(tmp_path / "up")
    assert (t / "etc/motd").read_text() == "top\n"
    (t / "made").write_text("m\n")
    assert (tmp_path / "up/made").read_text() == "m\n"
    subprocess.run(["umount", str(t)], check=True)
    assert service.wait_empty() == []


@pytest.mark.parametrize("option, kinds, words", [
    ("bogus", KINDS, "unsupported mount option 'bogus'"),
    ("uidmapping=0:100000:65536", KINDS, "does not shift ids"),
    ("squash_to_root", {"views"}, "not supported by a views service"),
    ("private", {"views"}, "not supported by a views service"),
    ("sync", {"views"}, "cannot be set on a bind of a view"),
])
@pytest.mark.parametrize("entry", ["script", "lean"])
def test_options_are_refused_by_name(service, layers, tmp_path, option, kinds, words, entry,
                                     lean):
    """Refused as for a mount of its own, also by the C mount program (whose
    options the service checks); a views service also refuses what only a
    server of its own can do, which the mount server does."""
    t = target(service, tmp_path, "t")
    r = mergefs("-o", writable_opts(tmp_path, layers, "r") + f",{option},service={service.control}",
                t, program=lean if entry == "lean" else None)
    if service.kind in kinds:
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not mounts.is_mounted(t) and service.left() == []
    else:
        assert r.returncode == 0, r.stderr
        if option == "squash_to_root":
            assert {os.lstat(p).st_uid for p in t.rglob("*")} == {0}
        subprocess.run(["umount", str(t)], check=True)
        assert service.wait_empty() == []


@pytest.mark.parametrize("entry", ["script", "lean"])
def test_a_service_that_does_not_answer_is_an_error(layers, tmp_path, entry, lean):
    t = tmp_path / "t"
    t.mkdir()
    r = mergefs("-o", writable_opts(tmp_path, layers, "n") + f",service={tmp_path}/none.sock", t,
                program=lean if entry == "lean" else None)
    assert r.returncode == 1 and "does not answer" in r.stderr and r.stderr.count("\n") == 1
    assert not mounts.is_mounted(t)


def test_a_failed_mount_leaves_nothing(service, layers, tmp_path):
    r = mergefs("-o", writable_opts(tmp_path, layers, "x") + f",service={service.control}",
                tmp_path / "missing")
    assert r.returncode == 1 and "missing" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert service.wait_empty() == []
    assert mergefs("-o", "lowerdir=/nonexistent,upperdir=/tmp,workdir=/tmp,"
                   f"service={service.control}", tmp_path).returncode != 0
    assert service.wait_empty() == []


def test_the_lean_program_without_views_mounts_on_its_own(layers, tmp_path, lean):
    """Without service= the C program execs the Python one, which loads site and runs
    the whole CLI: a server of its own, as the console script."""
    t = tmp_path / "own"
    t.mkdir()
    r = mergefs("-o", writable_opts(tmp_path, layers, "o"), t, program=lean)
    try:
        assert r.returncode == 0, r.stderr
        assert next(e.fstype for e in mounts_table() if e.target == str(t)) == "fuse.mergefs"
        assert (t / "etc/motd").read_text() == "top\n"
        assert not (t / "gone").exists()
    finally:
        mergefs("umount", t)
        mounts.force_unmount(t)
    r = mergefs("-o", writable_opts(tmp_path, layers, "p") + ",bogus", t, program=lean)
    assert r.returncode == 2 and "unsupported mount option 'bogus'" in r.stderr


def test_a_mount_from_another_mount_namespace_is_refused(service, layers, tmp_path):
    """A service makes (fork) or watches (views) the mount in its own mount namespace:
    a request naming another is refused with one clear error and mounts nothing."""
    from mergefs.errors import MountError
    from mergefs.union.ctlclient import control_call
    t = target(service, tmp_path, "elsewhere")
    req = {"op": "mount", "layers": [f"lowerdir={layers[0]}:{layers[1]}"], "cwd": "/",
           "options": [], "target": str(t), "mntns": "mnt:[1]"}
    with pytest.raises(MountError, match="mount namespace .* start it where the mounts"):
        control_call(service.control, req)
    assert not mounts.is_mounted(t)
    if service.kind == "views":
        assert views(service) == []


@pytest.fixture
def views_service(tmp_path):
    yield from started("views", tmp_path)


def test_containers_one_after_another_see_a_layer_made_again(views_service, tmp_path, lean):
    """Containers of one image in turn (podman run --rm: mount, read, fusermount3 -u)
    through the views service, whose stack cache outlives each view
    (views.IDLE_STACKS); the image's layer then removed and extracted again at
    the same path with other content (an image pulled again): the next
    container shows the new layer, as a mount of its own does."""
    srv = views_service
    layer = tmp_path / "layer"

    def extract(body: str, extra: str | None) -> None:
        shutil.rmtree(layer, ignore_errors=True)
        (layer / "etc/sub").mkdir(parents=True)
        (layer / "etc/motd").write_text(body)
        (layer / "etc/sub/f").write_text(body * 2)
        if extra:
            (layer / "etc" / extra).write_text(extra)

    def container(name: str) -> dict:
        t = target(srv, tmp_path, name)
        r = mergefs("-o", writable_opts(tmp_path, [layer], name) + f",service={srv.control}",
                    t, program=lean)
        assert (r.returncode, r.stderr) == (0, "")
        try:
            return tree(t)
        finally:
            subprocess.run(["fusermount3", "-u", str(t)], check=True)
            deadline = time.monotonic() + 10
            while views(srv) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert views(srv) == []

    extract("one\n", None)
    first = container("c1")
    assert first["etc/motd"][3] == b"one\n" and container("c2") == first
    extract("second version\n", "new")
    alone = tmp_path / "alone"
    alone.mkdir()
    assert mergefs("-o", f"lowerdir={layer},nokernel", alone).returncode == 0
    try:
        expected = tree(alone)
    finally:
        mergefs("umount", alone)
    got = container("c3")
    assert got == expected and got["etc/new"][3] == b"new" and got != first
    assert srv.errors() == []


def test_a_stacks_cache_outlives_its_last_view(tmp_path):
    """The merged listings and lstats of a lower stack stay for its next view when its
    last one goes (a sequence of containers of one image), up to IDLE_STACKS
    stacks, oldest dropped first; a layer made again at its path is another stack."""
    from mergefs.mountspec import MountSpec
    from mergefs.union import views as views_mod
    fs = views_mod.ViewFS(str(tmp_path / "mnt"))
    layers = []
    for i in range(views_mod.IDLE_STACKS + 2):
        (tmp_path / f"l{i}/etc").mkdir(parents=True)
        layers.append(str(tmp_path / f"l{i}"))

    def view(name: str, lower: str):
        fs.add_view(name, MountSpec((lower,)))
        return fs.views[name]

    def close(name: str) -> None:
        fs._close_view(fs.views.pop(name))
    try:
        a = view("a", layers[0])
        a.uv.listing(a.uv.inodes.live(1))
        cache = a.cache
        close("a")
        assert view("b", layers[0]).cache is cache          # kept for the next view
        close("b")
        for i in range(1, views_mod.IDLE_STACKS + 1):       # other stacks come and go
            view(f"o{i}", layers[i])
            close(f"o{i}")
        assert view("c", layers[0]).cache is not cache      # the oldest idle one went
        close("c")
        cache = view("d", layers[0]).cache
        close("d")
        shutil.rmtree(layers[0])
        (tmp_path / "l0/etc").mkdir(parents=True)
        assert view("e", layers[0]).cache is not cache      # made again: another stack
    finally:
        fs.close()


# -- the mount server's spare: the server of the next mount, forked ahead ----------
def listing(service) -> dict:
    from mergefs.union.ctlclient import control_call
    return control_call(service.control, {"op": "list"})


def wait_spare(service, not_pid=None, timeout: float = 10.0) -> int:
    """The spare's pid once there is one (other than ``not_pid``)."""
    deadline = time.monotonic() + timeout
    while (spare := listing(service)["spare"]) in (None, not_pid):
        assert time.monotonic() < deadline, "no spare forked"
        time.sleep(0.02)
    return spare


def wait_spares(service, pids: set[int], timeout: float = 10.0) -> set[int]:
    """The spares once ``pids`` are all among them (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while not pids <= (spares := set(listing(service)["spares"])) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    return spares


def fds_of(pid: int) -> list[str]:
    """What ``pid`` holds open (a pipe or socket by its kind, not its inode)."""
    return sorted(os.readlink(f"/proc/{pid}/fd/{n}").partition(":[")[0]
                  for n in os.listdir(f"/proc/{pid}/fd"))


def spare_fds(pid: int, timeout: float = 5.0) -> list[str]:
    """``fds_of`` a spare once its offer is through: the service lists a spare as
    soon as it has the spare's fds, before the spare closes its socket to the
    service and its own ends of the pipes it sent (mountsvc._offer)."""
    deadline = time.monotonic() + timeout
    while "socket" in (fds := fds_of(pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return fds


def children(pid: int) -> set[int]:
    out = set()
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.add(int(p))
    return out


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] == b"Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def fork_service(tmp_path):
    yield from started("fork", tmp_path)


def test_the_next_mounts_server_is_forked_before_the_request(fork_service, layers, tmp_path,
                                                             lean):
    """Before any request the service has one child, waiting; the mount podman's
    program asks for is served by that very process, shows what a mount of its
    own shows, and a new spare is forked for the mount after it. Once their
    mounts are gone both servers wait as spares (none left as a server)."""
    srv = fork_service
    spare = wait_spare(srv)
    assert children(srv.proc.pid) == {spare} and listing(srv)["servers"] == []
    mine = target(srv, tmp_path, "svc")
    r = mergefs("-o", writable_opts(tmp_path, layers, "a") + f",service={srv.control}", mine,
                program=lean)
    assert (r.returncode, r.stderr) == (0, "")
    assert listing(srv)["servers"] == [spare]          # the spare serves it
    alone = target(srv, tmp_path, "alone")
    assert mergefs("-o", writable_opts(tmp_path, layers, "b"), alone).returncode == 0
    try:
        assert tree(mine) == tree(alone)
    finally:
        mergefs("umount", alone)
    (mine / "etc/motd").write_text("changed\n")
    assert (tmp_path / "a-up/etc/motd").read_text() == "changed\n"
    following = wait_spare(srv, not_pid=spare)
    second = target(srv, tmp_path, "second")
    r = mergefs("-o", f"lowerdir={layers[0]}:{layers[1]},service={srv.control}", second,
                program=lean)
    assert (r.returncode, r.stderr) == (0, "")
    assert listing(srv)["servers"] == sorted([spare, following])
    assert (second / "etc/motd").read_text() == "top\n"
    for t in (mine, second):
        subprocess.run(["umount", str(t)], check=True)
    assert srv.wait_empty() == []
    assert wait_spares(srv, {spare, following}) == {spare, following}
    assert children(srv.proc.pid) == {spare, following}
    assert srv.errors() == []


def test_a_refused_mount_keeps_the_spare(fork_service, layers, tmp_path, lean):
    srv = fork_service
    spare = wait_spare(srv)
    t = target(srv, tmp_path, "t")
    r = mergefs("-o", writable_opts(tmp_path, layers, "r") + f",bogus,service={srv.control}", t,
                program=lean)
    assert r.returncode == 2 and "unsupported mount option 'bogus'" in r.stderr
    r = mergefs("-o", writable_opts(tmp_path, layers, "x") + f",service={srv.control}",
                tmp_path / "missing", program=lean)
    assert r.returncode == 1 and "missing" in r.stderr
    assert not mounts.is_mounted(t)
    assert listing(srv) == {"ok": True, "servers": [], "spare": spare, "spares": [spare]}
    assert children(srv.proc.pid) == {spare}


def test_a_served_mount_logs_to_its_own_file(fork_service, layers, tmp_path, lean):
    """The spare makes its log streams and handler while it waits (server.streams_ahead);
    handed a mount, its lines go to that mount's log file, under its own pid; a clean
    unmount removes that file (server.drop_quiet_log)."""
    from mergefs.union.server import default_log_path
    srv = fork_service
    spare = wait_spare(srv)
    time.sleep(0.5)                                 # its warm-up is over
    t = target(srv, tmp_path, "logged")
    log = Path(default_log_path(str(t)))
    log.unlink(missing_ok=True)
    r = mergefs("-o", writable_opts(tmp_path, layers, "l") + f",service={srv.control}", t,
                program=lean)
    assert (r.returncode, r.stderr) == (0, "")
    assert (t / "etc/motd").read_text() == "top\n"
    lines = log.read_text().splitlines()
    assert f"mergefs[{spare}] INFO serving 2 layers at {t} (writable" in lines[0], lines
    subprocess.run(["umount", str(t)], check=True)
    assert srv.wait_empty() == [] and wait_spares(srv, {spare}) == {spare}
    assert not log.exists()             # nothing but INFO in it: gone with the mount
    assert srv.errors() == []


def test_back_to_back_mounts_are_each_served(fork_service, layers, tmp_path, lean):
    """Mounts asked for faster than a spare is forked (0.1 s after a request): each
    one without a spare forks its server then (not warmed up: it is waited for)
    and each shows the layers, as the one the spare served."""
    srv = fork_service
    spare = wait_spare(srv)
    time.sleep(0.5)
    ts = [target(srv, tmp_path, f"b{i}") for i in range(3)]
    for i, t in enumerate(ts):
        r = mergefs("-o", writable_opts(tmp_path, layers, f"b{i}") + f",service={srv.control}",
                    t, program=lean)
        assert (r.returncode, r.stderr) == (0, "")
    servers = listing(srv)["servers"]
    assert len(servers) == 3 and spare in servers
    assert tree(ts[1]) == tree(ts[0]) and tree(ts[2]) == tree(ts[0])
    for t in ts:
        subprocess.run(["umount", str(t)], check=True)
    assert srv.wait_empty() == []
    assert srv.errors() == []


def test_a_mounted_target_is_refused(fork_service, layers, tmp_path, lean):
    """A target with a mount on it is refused (one read of the mount table when there
    is none: server.start) and the mount there stays served; the spare is kept."""
    srv = fork_service
    wait_spare(srv)
    t = target(srv, tmp_path, "twice")
    r = mergefs("-o", writable_opts(tmp_path, layers, "t1") + f",service={srv.control}", t,
                program=lean)
    assert (r.returncode, r.stderr) == (0, "")
    spare = wait_spare(srv)         # the next one (list requests do not put it off)
    r = mergefs("-o", writable_opts(tmp_path, layers, "t2") + f",service={srv.control}", t,
                program=lean)
    assert r.returncode == 1 and "already a mount point" in r.stderr, r.stderr
    assert (t / "etc/motd").read_text() == "top\n"
    assert listing(srv)["spare"] == spare and len(listing(srv)["servers"]) == 1
    subprocess.run(["umount", str(t)], check=True)
    assert srv.wait_empty() == []


def test_the_rehearsal_between_requests_mounts_nothing(tmp_path, layers, lean):
    """After forking a spare the service rehearses a request (refused: its target is a
    file) in a scratch directory of its own: nothing is mounted or forked for it,
    nothing is logged, and the scratch directory goes with the service."""
    import glob
    before = set(glob.glob("/tmp/mergefs-mount-server-*"))
    srv = MountService("fork", tmp_path / "service")
    try:
        spare = wait_spare(srv)
        deadline = time.monotonic() + 10
        while not (mine := set(glob.glob("/tmp/mergefs-mount-server-*")) - before):
            assert time.monotonic() < deadline, "no rehearsal"
            time.sleep(0.02)
        [scratch] = mine
        assert not [e for e in mounts_table() if e.target.startswith(scratch)]
        assert os.path.isfile(os.path.join(scratch, "target"))
        assert listing(srv) == {"ok": True, "servers": [], "spare": spare, "spares": [spare]}
        assert children(srv.proc.pid) == {spare}
        t = tmp_path / "t"
        t.mkdir()
        r = mergefs("-o", writable_opts(tmp_path, layers, "r") + f",service={srv.control}", t,
                    program=lean)
        assert (r.returncode, r.stderr) == (0, "")
        assert listing(srv)["servers"] == [spare]
        subprocess.run(["umount", str(t)], check=True)
        assert srv.wait_empty() == []
        assert "WARNING" not in srv.log.read_text() and srv.errors() == []
    finally:
        srv.stop()
    assert not os.path.exists(scratch)


def test_a_killed_spare_is_replaced_before_it_is_handed_a_mount(fork_service, layers, tmp_path):
    srv = fork_service
    spare = wait_spare(srv)
    os.kill(spare, signal.SIGKILL)
    assert gone(spare)
    t = target(srv, tmp_path, "t")
    r = mergefs("-o", f"lowerdir={layers[0]}:{layers[1]},service={srv.control}", t)
    assert (r.returncode, r.stderr) == (0, "")
    assert (t / "etc/motd").read_text() == "top\n"
    [server] = listing(srv)["servers"]
    assert server != spare
    subprocess.run(["umount", str(t)], check=True)
    assert srv.wait_empty() == []


def test_a_held_hand_over_goes_out_at_its_release():
    """The mount server holds the hand-over of a mount it made until the caller has
    its reply (``Prefork.later``): nothing reaches the server's pipe before
    ``release``, ``close`` (server.start's) keeps the pipe open meanwhile, and
    the release writes the work and closes it; a server gone by then is
    reported (False: the service unmounts what nobody will serve)."""
    import pickle

    from mergefs.union.prefork import Prefork
    for reader_alive in (True, False):
        r, w = os.pipe()
        pre = Prefork(12345, -1, w, -1)
        pre.later = True
        assert pre.hand_over("spec", "/mnt", "auto", "/log") == 12345
        pre.close()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)                               # held: nothing sent yet
        if not reader_alive:
            os.close(r)
        assert pre.release() is reader_alive
        assert pre.pipe == -1
        if reader_alive:
            assert pickle.loads(os.read(r, 65536)) == ("spec", "/mnt", "auto", "/log", True)
            assert os.read(r, 1) == b""                 # and closed
            os.close(r)


def test_a_mount_is_made_before_its_server_has_it(fork_service, layers, tmp_path, lean):
    """The mount command does not wait for its server (the reply goes out before
    the hand-over): with the spare stopped it returns, the mount made; the
    first request waits until the server runs, then is answered; unmounted
    the way containers/storage does (fusermount3 -u), no server is left but
    the spare it became."""
    srv = fork_service
    spare = wait_spare(srv)
    time.sleep(0.5)                                 # its warm-up is over
    os.kill(spare, signal.SIGSTOP)
    t = target(srv, tmp_path, "held")
    try:
        r = mergefs("-o", writable_opts(tmp_path, layers, "h") + f",service={srv.control}", t,
                    program=lean)
        assert (r.returncode, r.stderr) == (0, "")
        assert mounts.is_mounted(t)
    finally:
        os.kill(spare, signal.SIGCONT)
    assert (t / "etc/motd").read_text() == "top\n"
    assert listing(srv)["servers"] == [spare]
    subprocess.run(["fusermount3", "-u", str(t)], check=True)
    assert srv.wait_empty() == [] and wait_spares(srv, {spare}) == {spare}
    assert srv.errors() == []


def test_a_server_whose_mount_ended_serves_the_next_mount(fork_service, layers, tmp_path,
                                                          lean):
    """Unmounted, a server offers itself to the service again (mountsvc._offer) and
    the next mount is served by that process, not a fork: that mount shows its
    own layers and upper only (nothing of the last one's), logs to its own file,
    and the process holds the same open files after each mount (no fd left of the
    last mount); each quiet log goes with its mount."""
    from mergefs.union.server import default_log_path
    srv = fork_service
    spare = wait_spare(srv)
    time.sleep(0.5)
    first = target(srv, tmp_path, "first")
    r = mergefs("-o", writable_opts(tmp_path, layers, "f") + f",service={srv.control}", first,
                program=lean)
    assert (r.returncode, r.stderr) == (0, "")
    (first / "mine").write_text("first's\n")
    subprocess.run(["umount", str(first)], check=True)
    assert srv.wait_empty() == [] and spare in wait_spares(srv, {spare})
    held = spare_fds(spare)
    second = target(srv, tmp_path, "second")
    log = Path(default_log_path(str(second)))
    log.unlink(missing_ok=True)
    r = mergefs("-o", f"lowerdir={layers[1]},service={srv.control}", second, program=lean)
    assert (r.returncode, r.stderr) == (0, "")
    assert listing(srv)["servers"] == [spare]
    assert sorted(os.listdir(second)) == ["data", "etc", "gone"]     # base only, no "mine"
    assert (second / "etc/motd").read_text() == "base\n"
    assert (tmp_path / "f-up/mine").read_text() == "first's\n"
    os.kill(spare, signal.SIGUSR1)                  # its request counts, this mount's only
    deadline = time.monotonic() + 10
    while "INFO requests" not in log.read_text():
        assert time.monotonic() < deadline, "no requests line"
        time.sleep(0.02)
    from mergefs.union import fastpath
    [counts] = [ln for ln in log.read_text().splitlines() if "INFO requests" in ln]
    if fastpath.compiled("attach") is not None:     # the C fast path serves again
        assert '"fast_' in counts, counts
    assert "no C fast path" not in log.read_text()
    lines = log.read_text().splitlines()
    assert f"mergefs[{spare}] INFO serving 1 layers at {second} (read-only" in lines[0], lines
    subprocess.run(["umount", str(second)], check=True)
    assert srv.wait_empty() == [] and spare in wait_spares(srv, {spare})
    assert spare_fds(spare) == held
    # each mount's log held only INFO lines: gone with its clean unmount (drop_quiet_log)
    assert not log.exists() and not Path(default_log_path(str(first))).exists()
    assert srv.errors() == []


def test_a_server_stopped_by_a_signal_exits(fork_service, layers, tmp_path, lean):
    """SIGTERM stops a server and the process exits: only a server whose mount was
    unmounted waits for the next one."""
    srv = fork_service
    spare = wait_spare(srv)
    t = target(srv, tmp_path, "t")
    r = mergefs("-o", f"lowerdir={layers[0]}:{layers[1]},service={srv.control}", t,
                program=lean)
    assert (r.returncode, r.stderr) == (0, "")
    os.kill(spare, signal.SIGTERM)
    assert gone(spare)
    assert srv.wait_empty() == [] and spare not in listing(srv)["spares"]
    from mergefs.union.server import default_log_path
    # a server stopped before its loop listened for SIGTERM died of it and left its
    # log; one stopped after that exits cleanly and removes it: ours to remove
    Path(default_log_path(str(t))).unlink(missing_ok=True)


def test_servers_back_as_spares_exit_with_the_service(tmp_path, layers, lean):
    srv = MountService("fork", tmp_path / "service")
    try:
        spare = wait_spare(srv)
        t = tmp_path / "t"
        t.mkdir()
        r = mergefs("-o", f"lowerdir={layers[0]}:{layers[1]},service={srv.control}", t,
                    program=lean)
        assert (r.returncode, r.stderr) == (0, "")
        subprocess.run(["umount", str(t)], check=True)
        spares = wait_spares(srv, {spare})
        assert spare in spares
    finally:
        srv.stop()
    assert all(gone(p) for p in spares)


def test_only_a_server_of_the_service_is_taken_back(fork_service):
    """The ``spare`` op (a server's ends as SCM_RIGHTS) from any other process is
    refused: nothing is added, and the ends it sent are closed (its pipe reads EOF)."""
    import socket

    from mergefs.union.mountsvc import SPARE_OP
    srv = fork_service
    before = listing(srv)["spares"]
    r, w = os.pipe()
    reply_r, reply_w = os.pipe()
    fuse = os.open("/dev/fuse", os.O_RDWR)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(srv.control)
            socket.send_fds(s, [SPARE_OP], [fuse, w, reply_r])
            s.settimeout(10)
            assert s.recv(100) == b""           # no reply; closed
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""             # the service's copy is closed too
        assert listing(srv)["spares"] == before
    finally:
        for fd in (r, w, reply_r, reply_w, fuse):
            if fd >= 0:
                os.close(fd)
    assert srv.errors() == []


def test_a_spare_killed_while_it_warms_up_leaves_no_directory(fork_service, layers, tmp_path):
    """A spare warms up in a directory named with the service's pid and its own;
    killed before it is done, it leaves that directory behind, which the service
    removes when it finds the spare dead (before, every spare a test or a signal
    killed early left a /tmp/mergefs-spare-* directory for good)."""
    import tempfile
    srv = fork_service
    spare = wait_spare(srv)
    os.kill(spare, signal.SIGSTOP)
    left = tempfile.mkdtemp(prefix=f"mergefs-spare-{srv.proc.pid}-{spare}-")
    os.makedirs(os.path.join(left, "lower", "d"))      # as its warm-up makes them
    other = tempfile.mkdtemp(prefix=f"mergefs-spare-{srv.proc.pid}-{spare + 1}x-")
    try:
        os.kill(spare, signal.SIGKILL)
        assert gone(spare)
        t = target(srv, tmp_path, "t")
        r = mergefs("-o", f"lowerdir={layers[0]}:{layers[1]},service={srv.control}", t)
        assert (r.returncode, r.stderr) == (0, "")
        assert not os.path.exists(left)
        assert os.path.exists(other)                    # not that spare's
        subprocess.run(["umount", str(t)], check=True)
        assert srv.wait_empty() == []
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_service_leaves_no_spare(tmp_path, sig):
    """However the service ends, its waiting spare ends too (its pipe closes); the
    scratch directory of its rehearsal goes with it, or, killed, with the start of
    the next mount server."""
    import glob
    srv = MountService("fork", tmp_path / "service")
    try:
        spare = wait_spare(srv)
        deadline = time.monotonic() + 10
        while not (scratch := glob.glob(f"/tmp/mergefs-mount-server-{srv.proc.pid}-*")):
            assert time.monotonic() < deadline, "no rehearsal"
            time.sleep(0.02)
        srv.proc.send_signal(sig)
        srv.proc.wait(10)
        assert gone(spare)
    finally:
        srv.stop()
    assert os.path.exists(scratch[0]) == (sig == signal.SIGKILL)
    if sig == signal.SIGKILL:
        following = MountService("fork", tmp_path / "following")
        try:
            wait_spare(following)
            deadline = time.monotonic() + 10
            while os.path.exists(scratch[0]):
                assert time.monotonic() < deadline, "the killed one's scratch stays"
                time.sleep(0.02)
        finally:
            following.stop()


# -- the views service's request loop -------------------------------------------------
def test_views_control_requests_are_answered_while_a_view_is_read(tmp_path, lean):
    """The views service waits for FUSE requests in poll(2) first (one worker task,
    fuseloop), woken by trio's own fds too: while a container reads a view as fast
    as it can, list requests and another view's mount and unmount go through, and
    every read is right."""
    import threading
    from mergefs.union.ctlclient import control_call
    srv = MountService("views", tmp_path / "service")
    low = tmp_path / "low"
    for d in range(5):
        (low / f"d{d}").mkdir(parents=True)
        for f in range(40):
            (low / f"d{d}/f{f}").write_text(f"{d}/{f}\n")
    reader, other = tmp_path / "reader", tmp_path / "other"
    targets, errors, stop = [], [], threading.Event()
    try:
        for t, name in ((reader, "r"), (other, "o")):
            t.mkdir()
            up, wk = tmp_path / f"{name}-up", tmp_path / f"{name}-wk"
            up.mkdir()
            wk.mkdir()
            opts = f"lowerdir={low},upperdir={up},workdir={wk},service={srv.control}"
            if t is reader:
                r = mergefs("-o", opts, t, program=lean)
                assert (r.returncode, r.stderr) == (0, "")
                targets.append(t)
            else:
                other_opts = opts

        def read():
            n = 0
            while not stop.is_set():
                p = reader / f"d{n % 5}/f{n % 40}"
                if p.read_text() != f"{n % 5}/{n % 40}\n":
                    errors.append(str(p))
                n += 1
            errors.append(n)
        th = threading.Thread(target=read)
        th.start()
        try:
            for _ in range(3):
                t0 = time.monotonic()
                assert [str(reader)] in [v["mounts"] for v in
                                         control_call(srv.control, {"op": "list"})["views"]]
                r = mergefs("-o", other_opts, other, program=lean)
                assert (r.returncode, r.stderr) == (0, "")
                assert (other / "d1/f2").read_text() == "1/2\n"
                subprocess.run(["umount", str(other)], check=True)
                assert time.monotonic() - t0 < 10
        finally:
            stop.set()
            th.join(30)
        assert len(errors) == 1 and errors[0] > 100, errors[:5]      # only the count
        subprocess.run(["umount", str(reader)], check=True)
        targets.clear()
        assert srv.wait_empty() == []
        assert srv.errors() == []
        assert "one worker, the next request awaited in poll(2)" in srv.log.read_text()
    finally:
        stop.set()
        for t in targets + [other]:
            mounts.force_unmount(t)
        srv.stop()
        assert not mounts.is_mounted(srv.mnt)


def test_an_auto_view_stays_while_a_mount_inside_it_stays(tmp_path, layers, lean):
    """The service removes a mount request's view once no mount uses it: not while
    a mount inside the view is left after the bind went (a views mount point with
    a space, which mountinfo writes escaped, too)."""
    srv = MountService("views", tmp_path / "a space" / "service")
    t = tmp_path / "t"
    t.mkdir()
    inside = None
    try:
        r = mergefs("-o", writable_opts(tmp_path, layers, "s") + f",service={srv.control}", t,
                    program=lean)
        assert (r.returncode, r.stderr) == (0, "")
        [view] = views(srv)
        other = tmp_path / "other"
        other.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "none", str(other)], check=True)
        subprocess.run(["umount", str(other)], check=True)
        time.sleep(0.5)                       # the service saw the changes: its bind counts
        assert [v["name"] for v in views(srv)] == [view["name"]]
        inside = Path(view["path"]) / "data/keep"
        subprocess.run(["mount", "-t", "tmpfs", "none", str(inside)], check=True)
        subprocess.run(["umount", str(t)], check=True)
        time.sleep(0.5)                       # the service saw both changes
        assert [v["name"] for v in views(srv)] == [view["name"]]
        subprocess.run(["umount", str(inside)], check=True)
        inside = None
        assert srv.wait_empty() == []
        assert srv.errors() == []
    finally:
        for m in (inside, t):
            if m is not None:
                mounts.force_unmount(m)
        srv.stop()
        assert not mounts.is_mounted(srv.mnt)


def test_layer_paths_resolve_as_realpath_does(tmp_path):
    """The mount server resolves lowerdir paths with the kernel (ctlclient.real_path):
    the same answer as os.path.realpath for containers/storage's overlay/l/
    links and for what realpath answers without a file there."""
    from mergefs.union.ctlclient import real_path
    (tmp_path / "store/layer1/diff/sub").mkdir(parents=True)
    (tmp_path / "store/l").mkdir()
    (tmp_path / "store/l/ABC").symlink_to("../layer1/diff")
    (tmp_path / "store/l/chain").symlink_to("ABC/sub")
    (tmp_path / "store/l/dangling").symlink_to("../nowhere")
    (tmp_path / "store/l/loop").symlink_to("loop")
    (tmp_path / "file").write_text("f")
    (tmp_path / "odd\udcff name").mkdir()
    for rel in ("store/l/ABC", "store/l/ABC/", "store/l/ABC/../ABC/sub", "store/l/chain",
                "store/l/dangling", "store/l/loop", "store/l/missing/x", "file",
                "odd\udcff name", "store/l/ABC/sub/../.."):
        p = str(tmp_path / rel)
        assert real_path(p) == os.path.realpath(p), rel
