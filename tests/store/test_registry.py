"""mergefs push / pull against Debian's docker-registry: two store roots act as two machines.

The registry runs on 127.0.0.1 (a free port) with a private storage dir and is
stopped by pid; its access log counts uploads and blob downloads.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mergefs.testing.registry import RegistryServer, blob_gets, uploads
from snapshotter.digest import tree_digest

from ..conftest import needs, require
from .conftest import Cli

pytestmark = [
    pytest.mark.timeout(180),
    needs("docker-registry", "skopeo"),
]


@pytest.fixture
def registry(tmp_path):
    server = RegistryServer(tmp_path / "registry").start()
    yield server
    server.stop()


@pytest.fixture
def a(tmp_path) -> Cli:
    return Cli(tmp_path / "machine-a")


@pytest.fixture
def b(tmp_path) -> Cli:
    return Cli(tmp_path / "machine-b")


def _app_on(cli: Cli, layers) -> str:
    """Import three layer dirs and merge them (a farm) on one machine; the merge id.

    Through the library (set-up, not under test: saves interpreter start-ups)."""
    from snapshotter import service
    from snapshotter.store import Store
    with Store(cli.root) as store:
        for name, d in zip(("base", "mid", "top"), layers):
            service.import_dir(store, d, name=name)
        return service.merge(store, ["base", "mid", "top"], strategy="farm", name="app").row.id


def _export_digest(cli: Cli, ref: str, where: Path) -> str:
    cli.run("export", ref, "-o", where)
    return tree_digest(where).digest


def test_push_pull_two_machines_same_merge_id_and_tree(a, b, registry, layers, tmp_path):
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    pushed = json.loads(a.run("push", "app", target, "--json").stdout)
    assert pushed["compressed"] == 3
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    assert pulled["image"] == mid                      # the image record is that merge
    assert pulled["layers"] == [x["layer"] for x in pushed["layers"]]
    assert b.out("merge", "--strategy", "farm", *pulled["layers"]) == mid
    assert _export_digest(b, mid, tmp_path / "on-b") == _export_digest(a, mid, tmp_path / "on-a")
    assert "app:v1" in b.out("ls")


def test_pull_unpacking_two_layers_at_once_gives_the_same_merge(a, b, registry, layers, monkeypatch):
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    a.run("push", "app", target)
    monkeypatch.setenv("MERGEFS_PULL_JOBS", "2")
    pulled = json.loads(b.run("pull", target, "--unpack", "--json").stdout)
    assert pulled["image"] == mid and len(pulled["fetched"]) == 3
    assert os.listdir(b.root / "staging") == []


def test_second_push_uploads_no_blob_and_compresses_nothing(a, registry, layers):
    _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    mark = registry.mark()
    first = json.loads(a.run("push", "app", target, "--json").stdout)
    assert len(uploads(registry.since(mark))) == 4     # 3 layers + the config
    mark = registry.mark()
    again = json.loads(a.run("push", "app", f"{registry.address}/mergefs/app:v2",
                             "--json").stdout)
    assert uploads(registry.since(mark)) == []
    assert again["compressed"] == 0
    assert [x["digest"] for x in again["layers"]] == [x["digest"] for x in first["layers"]]


def test_blobs_of_pruned_layers_go_with_them(a, registry, layers):
    """C4: the blob cache holds nothing for layers prune deleted (dropped by the prune)."""
    _app_on(a, layers)
    first = json.loads(a.run("push", "app", f"{registry.address}/mergefs/app:v1",
                             "--json").stdout)
    blobs = a.root / "blobs" / "sha256"
    assert {x["digest"].split(":")[1] for x in first["layers"]} <= set(os.listdir(blobs))
    a.run("release", "app", "base", "mid", "top")
    a.run("prune", "--all")
    assert os.listdir(blobs) == []
    a.run("import", layers[0], "--name", "again")
    second = json.loads(a.run("push", "again", f"{registry.address}/mergefs/again:v1",
                              "--json").stdout)
    assert set(os.listdir(blobs)) == {x["digest"].split(":")[1] for x in second["layers"]}


def test_pull_fetches_only_the_missing_layer(a, b, registry, layers):
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    pushed = json.loads(a.run("push", "app", target, "--json").stdout)
    b.run("import", layers[0])
    b.run("import", layers[1])
    mark = registry.mark()
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    layer_digests = {x["digest"] for x in pushed["layers"]}
    assert blob_gets(registry.since(mark), layer_digests) == [pushed["layers"][2]["digest"]]
    assert pulled["fetched"] == [pushed["layers"][2]["digest"]]
    assert pulled["image"] == mid
    mark = registry.mark()                              # everything present: no layer bytes
    assert json.loads(b.run("pull", target, "--json").stdout)["fetched"] == []
    assert blob_gets(registry.since(mark), layer_digests) == []   # the config only


def _logging_skopeo(where: Path) -> tuple[dict, Path]:
    """The real skopeo behind a wrapper first on PATH that logs each run's verb: the
    environment for a ``mergefs`` process, and the log."""
    log = where / "skopeo.log"
    bindir = where / "bin"
    bindir.mkdir()
    wrapper = bindir / "skopeo"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec /usr/bin/skopeo "$@"\n')
    wrapper.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}, log


def _runs(log: Path) -> list[str]:
    runs = sorted(log.read_text().split()) if log.exists() else []
    log.unlink(missing_ok=True)
    return runs


def test_pull_starts_skopeo_once_and_no_copy_when_all_present(a, b, registry, layers, tmp_path):
    """A lazy pull into an empty store runs one ``skopeo copy`` (started from the command
    line, before argparse) and the two inspects; pulling it again, the store's record of
    the name says every layer is there: no copy is started (and killed) at all. When the
    tag moved meanwhile, a pull that would give the name to another image is refused
    before it fetches anything; under another name it fetches the new layer alone."""
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    pushed = json.loads(a.run("push", "app", target, "--json").stdout)
    env, log = _logging_skopeo(tmp_path)
    assert b.run("pull", target, **env).stdout.strip() == mid
    assert _runs(log) == ["copy", "inspect", "inspect"]
    mark = registry.mark()
    assert json.loads(b.run("pull", target, "--json", **env).stdout)["fetched"] == []
    assert _runs(log) == ["inspect", "inspect"]
    assert blob_gets(registry.since(mark), {x["digest"] for x in pushed["layers"]}) == []
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "new-file").write_text("the tag moved\n")
    a.run("import", tmp_path / "extra", "--name", "extra")   # the tag moves: a fourth layer
    a.run("merge", "--strategy", "union", "--name", "app2", "app", "extra")
    moved = json.loads(a.run("push", "app2", target, "--json").stdout)
    mark = registry.mark()
    p = b.run("pull", target, check=False, **env)      # its name names the old image
    assert p.returncode == 4 and "already names" in p.stderr
    assert _runs(log) == ["inspect", "inspect"]        # refused before any copy
    assert blob_gets(registry.since(mark), {x["digest"] for x in moved["layers"]}) == []
    pulled = json.loads(b.run("pull", target, "--name", "app2", "--json", **env).stdout)
    assert _runs(log) == ["copy", "inspect", "inspect"]
    assert pulled["fetched"] == [moved["layers"][3]["digest"]]
    assert blob_gets(registry.since(mark), {x["digest"] for x in moved["layers"]}) == \
        pulled["fetched"]
    assert pulled["image"] == a.json("inspect", "app2")["id"]


def test_pull_command_line_read_before_argparse():
    """What ``mergefs pull`` reads from argv to start skopeo early; anything else is left
    to argparse (None), which then reads the whole command."""
    from mergefs.cli.cmd_registry import _read_pull_argv
    root, ns = _read_pull_argv(["--root", "/r", "--debug", "pull", "h:1/x:y", "--name=n",
                                "--retries", "0", "--insecure", "--authfile", "/a", "--json"])
    assert root == "/r" and (ns.target, ns.name, ns.retries, ns.insecure, ns.authfile) == \
        ("h:1/x:y", "n", "0", True, "/a")
    assert _read_pull_argv(["pull", "h:1/x:y"])[0] is None
    for argv in (["pull"], ["pull", "a/b:c", "d/e:f"], ["pull", "a/b:c", "--ins"],
                 ["pull", "a/b:c", "-h"], ["pull", "--name", "--json", "a/b:c"],
                 ["pull", "--", "a/b:c"], ["--root", "pull"], ["ls"], ["pull", "a/b:c",
                                                                   "--retries"]):
        assert _read_pull_argv(argv) is None, argv


def test_corrupt_blob_is_refused_and_nothing_stored(a, b, registry, layers):
    _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    pushed = json.loads(a.run("push", "app", target, "--json").stdout)
    path = registry.blob_path(pushed["layers"][0]["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                       # same size, other digest
    path.write_bytes(bytes(data))
    p = b.run("pull", target, "--retries", "0", check=False)
    assert p.returncode == 1
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "mergefs: error: pull of" in err
    assert "digest" in err.lower()
    # nothing of the corrupt blob is stored, and no image; other layers, verified while
    # it was refused (MERGEFS_PULL_JOBS=2), may stay for a retry to reuse
    stored = {x["id"] for x in json.loads(b.run("ls", "--json").stdout)}
    assert stored <= {x["layer"] for x in pushed["layers"][1:]}
    assert not (b.root / "blobs" / "sha256" / pushed["layers"][0]["digest"][7:]).exists()
    assert os.listdir(b.root / "staging") == []


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_registry_stopped_mid_pull_then_retry_resumes(a, b, registry, layers):
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    pushed = json.loads(a.run("push", "app", target, "--json").stdout)
    proc = subprocess.Popen(b.argv("pull", target, "--retries", "1"), env=b.env(
        MERGEFS_TEST_PAUSE_AT="pull:after-layer-1",
        MERGEFS_PULL_JOBS="1"),         # one at a time: the third download has not begun
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _state(proc.pid) != "T":                 # stopped itself after the first layer
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        registry.stop()
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert len(err.strip().splitlines()) == 1 and "mergefs: error: pull of" in err
    assert "connection refused" in err
    assert b.run("inspect", "app:v1", check=False).returncode == 3   # no image record
    registry.start()                                    # same port and storage
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    assert pulled["image"] == mid
    first = pushed["layers"][0]["digest"]
    assert first not in blob_gets(registry.requests())  # finished layers are not fetched again
    assert pushed["layers"][2]["digest"] in pulled["fetched"]


BIG = 96 << 20          # one layer skopeo is still downloading when the registry stops


def _staged_copy(root: Path) -> Path | None:
    """The layout of the one-copy pull in the store's staging (``snapshotter.pullcopy``)."""
    for entry in os.scandir(root / "staging") if (root / "staging").is_dir() else ():
        if (Path(entry.path) / "oci").is_dir():
            return Path(entry.path) / "oci"
    return None


def _partial_size(layout: Path) -> int:
    """Bytes of the largest blob skopeo is writing (its ``oci-put-blob*`` temporary file)."""
    sizes = [0]
    for entry in os.scandir(layout):
        if entry.name.startswith("oci-put-blob"):
            try:
                sizes.append(entry.stat().st_size)
            except FileNotFoundError:
                pass
    return max(sizes)


def test_registry_stopped_mid_one_copy_pull_then_retry_resumes(a, b, registry, layers, tmp_path):
    """The lazy pull into an empty store is one ``skopeo copy`` of the whole image: the
    registry dies while a big layer is half downloaded and the small ones have landed ->
    one clear line, the finished layers are kept; a retry fetches only the rest."""
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "data", "wb") as f:             # incompressible: zstd keeps it big
        for _ in range(BIG >> 20):
            f.write(os.urandom(1 << 20))
    from snapshotter import service
    from snapshotter.store import Store
    with Store(a.root) as store:
        for name, d in (("base", layers[0]), ("mid", layers[1]), ("big", big)):
            service.import_dir(store, d, name=name)
        mid = service.merge(store, ["base", "mid", "big"], strategy="union", name="app").row.id
    target = f"{registry.address}/mergefs/app:v1"
    pushed = json.loads(a.run("push", "app", target, "--compression", "zstd", "--json").stdout)
    small = [x["digest"] for x in pushed["layers"][:2]]
    large = pushed["layers"][2]["digest"]
    proc = subprocess.Popen(b.argv("pull", target, "--retries", "0"), env=b.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reg = registry.proc.pid
    try:
        deadline = time.monotonic() + 60
        while True:     # the registry runs 2 ms in 12 (a slow link), looked at while stopped
            os.kill(reg, signal.SIGSTOP)
            layout = _staged_copy(b.root)
            if layout is not None and all((b.root / "blobs" / "sha256" / d[7:]).exists()
                                          for d in small) and _partial_size(layout) > 0:
                break                   # the small layers are stored, the big one half-way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
            os.kill(reg, signal.SIGCONT)
            time.sleep(0.002)
        assert not (layout / "blobs" / "sha256" / large[7:]).exists(), "the big layer landed"
        registry.stop()                                        # SIGKILL: connections reset
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("mergefs: error: pull of"), err
    assert b.run("inspect", "app:v1", check=False).returncode == 3   # no image record
    assert os.listdir(b.root / "staging") == []
    kept = {x["id"] for x in json.loads(b.run("ls", "--json").stdout)}
    assert kept == {x["layer"] for x in pushed["layers"][:2]}   # the finished layers, packed
    registry.start()                                    # same port and storage
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    assert pulled["image"] == mid
    assert pulled["fetched"] == [large]
    assert blob_gets(registry.requests(), {x["digest"] for x in pushed["layers"]}) == [large]


@pytest.mark.slow
def test_zstd_push_pull(a, b, registry, layers):
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:zstd"
    pushed = json.loads(a.run("push", "app", target, "--compression", "zstd", "--json").stdout)
    assert {x["media_type"] for x in pushed["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"}
    assert json.loads(b.run("pull", target, "--json").stdout)["image"] == mid


def test_bad_target_is_a_usage_error(a):
    p = a.run("push", "app", "no-registry-part", check=False)
    assert p.returncode == 2 and "REGISTRY/REPO:TAG" in p.stderr


def test_unreachable_registry_is_one_clear_line(a, layers):
    from mergefs.testing.registry import free_port
    a.run("import", layers[0], "--name", "base")
    p = a.run("push", "base", f"127.0.0.1:{free_port()}/x/y:z", "--retries", "0", check=False)
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "push to 127.0.0.1:" in p.stderr


def test_pull_without_skopeo_is_one_clear_line(b, tmp_path):
    """skopeo is started before argparse runs (cmd_registry.start_early): a missing skopeo
    is still the CLI's one line, not a traceback."""
    empty = tmp_path / "no-skopeo"
    empty.mkdir()
    p = b.run("pull", "127.0.0.1:1/x/y:z", check=False, PATH=str(empty))
    assert p.returncode == 1
    assert p.stderr == "mergefs: error: skopeo is not installed (apt-get install skopeo)\n"


# -- credentials: basic auth, from --authfile / $REGISTRY_AUTH_FILE / ~/.docker/config.json --------
@pytest.fixture
def auth_registry(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + crypt.crypt("s3cret", "$2b$05$abcdefghijklmnopqrstuu") + "\n")
    server = RegistryServer(tmp_path / "registry", htpasswd=str(htpasswd)).start()
    yield server
    server.stop()


def _auth_json(path: Path, registry: str) -> Path:
    import base64
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {registry: {
        "auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    return path


@pytest.mark.slow
def test_basic_auth_credentials_from_the_usual_files(a, b, auth_registry, layers, tmp_path):
    mid = _app_on(a, layers)
    target = f"{auth_registry.address}/mergefs/app:v1"
    home = tmp_path / "home"
    home.mkdir()
    p = a.run("push", "app", target, "--retries", "0", check=False, HOME=str(home),
              XDG_RUNTIME_DIR=str(home))
    assert p.returncode == 1 and "unauthorized" in p.stderr.lower()
    authfile = _auth_json(tmp_path / "auth.json", auth_registry.address)
    a.run("push", "app", target, "--authfile", authfile, HOME=str(home), XDG_RUNTIME_DIR=str(home))
    a.run("push", "app", target + "b", HOME=str(home), XDG_RUNTIME_DIR=str(home),
          REGISTRY_AUTH_FILE=str(authfile))
    _auth_json(home / ".docker" / "config.json", auth_registry.address)
    pulled = json.loads(b.run("pull", target, "--json", HOME=str(home),
                              XDG_RUNTIME_DIR=str(home)).stdout)
    assert pulled["image"] == mid


# -- interop: skopeo and containerd accept what mergefs pushed; mergefs pulls what skopeo pushed ---
def _skopeo(*args) -> str:
    p = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.slow
def test_skopeo_copies_what_mergefs_pushed(a, registry, layers, tmp_path):
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    a.run("push", "app", target, "--compression", "zstd")
    _skopeo("copy", "--src-tls-verify=false", f"docker://{target}", f"oci:{tmp_path / 'copy'}:v1")
    c = Cli(tmp_path / "machine-c")                 # skopeo's copy imports into the same tree
    image = c.run("import", tmp_path / "copy", "--json")
    assert image.returncode == 0
    assert _export_digest(c, "v1", tmp_path / "on-c") == _export_digest(a, mid, tmp_path / "on-a")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_mergefs_pulls_what_skopeo_pushed(a, b, registry, layers, tmp_path, fmt):
    mid = _app_on(a, layers)
    a.run("export", "app", "-o", tmp_path / "layout", "--format", "oci")
    target = f"{registry.address}/skopeo/app:{fmt}"
    _skopeo("copy", "--dest-tls-verify=false", f"--format={fmt}", f"oci:{tmp_path / 'layout'}:app",
            f"docker://{target}")
    pulled = json.loads(b.run("pull", target, "--json").stdout)
    c = Cli(tmp_path / "machine-c")                 # the same image imported from the layout
    c.run("import", tmp_path / "layout", "--name", "img")
    assert pulled["image"] == c.out("inspect", "img", "--json").split('"id": "')[1].split('"')[0]
    assert _export_digest(b, pulled["image"], tmp_path / "on-b") == \
        _export_digest(a, mid, tmp_path / "on-a")


@pytest.fixture
def containerd(tmp_path):
    require("containerd", "ctr")
    base = tmp_path / "containerd"
    base.mkdir()
    sock = base / "containerd.sock"
    cfg = base / "config.toml"
    cfg.write_text(f'version = 2\nroot = "{base / "root"}"\nstate = "{base / "state"}"\n'
                   f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                   f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n')
    with open(base / "log", "wb") as log:
        proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["ctr", "--address", str(sock), "version"],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, \
                (base / "log").read_text()[-2000:]
            time.sleep(0.1)
        yield str(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_ctr_pulls_what_mergefs_pushed(a, registry, layers, containerd, compression):
    _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:{compression}"
    a.run("push", "app", target, "--compression", compression)
    p = subprocess.run(["ctr", "--address", containerd, "-n", "mergefs-test", "images", "pull",
                        "--plain-http", target], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr        # fetched, diffIDs checked, unpacked
    p = subprocess.run(["ctr", "--address", containerd, "-n", "mergefs-test", "images", "check"],
                       capture_output=True, text=True, timeout=60)
    assert target in p.stdout and "complete" in p.stdout, p.stdout


# -- bearer tokens: a token server (RS256 JWTs, x5c) trusted by the registry ----------------
class TokenServer:
    """GET /token with basic auth alice:s3cret -> {"token": JWT granting the asked scope}."""

    def __init__(self, work: Path):
        import base64
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=mergefs-test-token", "-keyout", str(work / "key.pem"),
                        "-out", str(work / "cert.pem")], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(work / "cert.pem"), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests = 0
        self.httpd = None

    def mint(self, scope: str) -> str:
        import base64
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
        now = int(time.time())
        access = []
        for item in scope.split(" ") if scope else []:
            kind, name, actions = item.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        head = b64(json.dumps({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}).encode())
        body = b64(json.dumps({"iss": "mergefs-test-issuer", "sub": "alice",
                               "aud": "mergefs-test", "exp": now + 600, "nbf": now - 60,
                               "iat": now, "jti": os.urandom(8).hex(),
                               "access": access}).encode())
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.work / "key.pem")],
                             input=f"{head}.{body}".encode(), check=True,
                             capture_output=True).stdout
        return f"{head}.{body}.{b64(sig)}"

    def start(self) -> str:
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse
        server = self
        good = "Basic " + base64.b64encode(b"alice:s3cret").decode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if self.headers.get("Authorization") != good:
                    self.send_response(401)
                    self.end_headers()
                    return
                q = parse_qs(urlparse(self.path).query)
                data = json.dumps({"token": server.mint(" ".join(q.get("scope", [])))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def token_registry(tmp_path):
    tokens = TokenServer(tmp_path / "tokens")
    realm = tokens.start()
    server = RegistryServer(tmp_path / "registry", token={
        "realm": realm, "service": "mergefs-test", "issuer": "mergefs-test-issuer",
        "rootcertbundle": str(tmp_path / "tokens" / "cert.pem")})
    try:
        server.start()
        yield server, tokens
    finally:
        server.stop()
        tokens.stop()


@pytest.mark.slow
def test_bearer_tokens(a, b, token_registry, layers, tmp_path):
    registry, tokens = token_registry
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    home = tmp_path / "home"
    home.mkdir()
    env = dict(HOME=str(home), XDG_RUNTIME_DIR=str(home))
    p = a.run("push", "app", target, "--retries", "0", check=False, **env)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    authfile = _auth_json(tmp_path / "auth.json", registry.address)
    a.run("push", "app", target, "--authfile", authfile, **env)    # basic creds -> token flow
    assert tokens.requests >= 2
    assert b.run("pull", target, "--retries", "0", check=False, **env).returncode == 1
    token = tokens.mint("repository:mergefs/app:pull")
    pulled = json.loads(b.run("pull", target, "--registry-token", token, "--json", **env).stdout)
    assert pulled["image"] == mid


@pytest.mark.slow
def test_progress_on_a_terminal_only(a, b, registry, layers):
    _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    assert a.run("push", "app", target).stderr == ""           # not a terminal: quiet
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(b.argv("pull", target), env=b.env(), stdout=subprocess.PIPE,
                                stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:                                     # EIO: the other side closed
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=60)
    finally:
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "3 layers, 0 present, 3 to fetch" in text and "layer 3/3" in text
    assert "Getting image source signatures" in text            # skopeo draws its bars


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:5000/app:v1", ("127.0.0.1:5000", "app", "v1", None)),
    ("localhost/team/app", ("localhost", "team/app", "latest", None)),
    ("[::1]:5000/a/b:c", ("[::1]:5000", "a/b", "c", None)),
    ("reg.example.com/a@sha256:" + "0" * 64, ("reg.example.com", "a", None, "sha256:" + "0" * 64)),
])
def test_parse_target(text, want):
    from snapshotter.distribution import parse_target
    t = parse_target(text)
    assert (t.registry, t.repo, t.tag, t.digest) == want
    assert str(t) == (text if ":" in text.rsplit("/", 1)[-1] or "@" in text else text + ":latest")
    assert t.loopback() == (not want[0].startswith("reg."))


@pytest.mark.parametrize("text", ["app:v1", "docker.io", "reg.io/UPPER:v1", "reg.io/a:b c",
                                  "reg.io/a@sha256:xyz"])
def test_parse_target_refuses(text):
    from snapshotter.distribution import parse_target
    with pytest.raises(ValueError):
        parse_target(text)


@pytest.mark.slow
def test_retries_with_backoff_outlast_a_registry_restart(a, b, registry, layers):
    mid = _app_on(a, layers)
    target = f"{registry.address}/mergefs/app:v1"
    a.run("push", "app", target)
    registry.stop()
    proc = subprocess.Popen(b.argv("pull", target, "--retries", "4"), env=b.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)                     # skopeo backs off 1 s, 2 s, 4 s... meanwhile
        registry.start()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == mid


def _layout_layer_digests(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / mdigest).read_text())
    return [d["digest"] for d in manifest["layers"]]


def test_push_of_an_imported_layout_sends_its_blobs_and_prune_drops_them(a, b, registry,
                                                                          layers, tmp_path):
    """Import keeps each layer's blob: the first push sends the layout's blobs as they are
    (no recompression, like skopeo copy from the layout); the blobs go with their layers."""
    _app_on(a, layers)
    layout = tmp_path / "layout"
    a.run("export", "app", "-o", layout, "--format", "oci")
    want = _layout_layer_digests(layout)
    b.run("import", layout, "--name", "img")
    assert sorted(os.listdir(b.root / "blobs" / "sha256")) == sorted(d[7:] for d in want)
    du = json.loads(b.out("du", "--json"))
    assert du["blob_count"] == 3 and du["blobs"] > 0
    target = f"{registry.address}/mergefs/img:v1"
    mark = registry.mark()
    pushed = json.loads(b.run("push", "img", target, "--json").stdout)
    assert pushed["compressed"] == 0
    assert [x["digest"] for x in pushed["layers"]] == want
    assert len(uploads(registry.since(mark))) == 4     # the 3 layout blobs + a config
    manifest = json.loads(_skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{target}"))
    assert [d["digest"] for d in manifest["layers"]] == want
    for d in want:                                     # the registry holds the layout's bytes
        assert registry.blob_path(d).read_bytes() == \
            (layout / "blobs" / "sha256" / d[7:]).read_bytes()
    assert "blob" not in b.out("fsck")
    b.run("release", "img", *(x["layer"] for x in pushed["layers"]))
    b.run("prune", "--all")
    assert b.json("ls") == []
    assert os.listdir(b.root / "blobs" / "sha256") == []
    assert json.loads(b.out("du", "--json"))["blob_count"] == 0


def test_fsck_checks_kept_blobs_and_repair_forgets_bad_ones(a, b, layers, tmp_path):
    from snapshotter.fsck import fsck
    from snapshotter.store import Store
    _app_on(a, layers)
    layout = tmp_path / "layout"
    a.run("export", "app", "-o", layout, "--format", "oci")
    b.run("import", layout, "--name", "img")
    bdir = b.root / "blobs" / "sha256"
    first = sorted(os.listdir(bdir))[0]
    with open(bdir / first, "r+b") as f:
        f.truncate(10)
    (bdir / ("0" * 64)).write_bytes(b"stray")
    with Store(b.root) as store:
        found = {(f.kind, f.severity) for f in fsck(store, verify_content=False)}
        assert found == {("blob-size", "error"), ("blob-unnamed", "garbage")}
        fsck(store, repair=True, verify_content=False)
        assert fsck(store, verify_content=False) == []
    assert len(os.listdir(bdir)) == 2


def test_push_and_pull_build_only_their_parser_after_global_options():
    """``mergefs --root R pull ...`` (as the bench and scripts spell it) loads the registry
    verbs' module alone, as ``mergefs pull ...`` does."""
    from mergefs.cli import VERB_MODULES, _verb_modules
    for argv in (["pull", "r/x:y"], ["--root", "/r", "pull", "r/x:y"],
                 ["--root=/r", "--debug", "push", "a", "r/x:y"]):
        assert _verb_modules(argv) == ("registry",), argv
    for argv in (["--root", "pull"], ["ls"], ["--version"], []):
        assert _verb_modules(argv) == VERB_MODULES, argv
