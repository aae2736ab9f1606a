"""A private Debian ``docker-registry`` for tests and benchmarks.

Listens on 127.0.0.1 on a free port, stores into a directory of the caller's,
logs every request (the access log) to a file the caller can count, and is
stopped by its pid. ``htpasswd`` turns on basic auth (bcrypt entries).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

BINARY = "/usr/bin/docker-registry"
_ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[0-9.]+" (\d+) (\d+|-)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryServer:
    def __init__(self, workdir: str | os.PathLike, htpasswd: str | None = None,
                 token: dict | None = None):
        self.dir = Path(workdir)
        self.storage = self.dir / "storage"
        self.htpasswd = htpasswd
        self.token = token          # realm, service, issuer, rootcertbundle: bearer tokens
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "registry-0.log"
        self._runs = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> Path:
        auth = (f"auth:\n  htpasswd:\n    realm: mergefs-test\n    path: {self.htpasswd}\n"
                if self.htpasswd else "")
        if self.token:
            auth = "auth:\n  token:\n" + "".join(f"    {k}: {v}\n" for k, v in self.token.items())
        cfg = self.dir / "config.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n{auth}")
        return cfg

    def start(self) -> "RegistryServer":
        """Start (again, on the same port and storage); each run logs to its own file."""
        os.makedirs(self.storage, exist_ok=True)
        self.log = self.dir / f"registry-{self._runs}.log"
        self._runs += 1
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([BINARY, "serve", str(self._config())], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1).close()
                return self
            except urllib.error.HTTPError:        # 401 with auth on: it is up
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request in the current run's access log."""
        return [(m, p, int(s)) for m, p, s, _ in _ACCESS.findall(self.log.read_text())]

    def layer_bytes(self, digests, mark: int = 0) -> int:
        """Bytes of blob bodies sent for ``digests`` (GET .../blobs/<digest>) since ``mark``."""
        sent = 0
        for m, p, s, n in _ACCESS.findall(self.log.read_text())[mark:]:
            if m == "GET" and p.rsplit("/", 1)[-1] in digests and n != "-":
                sent += int(n)
        return sent

    def mark(self) -> int:
        return len(self.requests())

    def since(self, mark: int) -> list[tuple[str, str, int]]:
        return self.requests()[mark:]

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def uploads(requests) -> list[str]:
    """Blob upload sessions started (``POST .../blobs/uploads/``)."""
    return [p for m, p, _ in requests if m == "POST" and "/blobs/uploads/" in p]


def blob_gets(requests, digests=None) -> list[str]:
    """Digests of blobs fetched (GET .../blobs/sha256:...), optionally only those in ``digests``."""
    got = [p.rsplit("/", 1)[1] for m, p, s in requests if m == "GET" and "/blobs/sha256:" in p
           and s == 200]
    return [d for d in got if digests is None or d in digests]
