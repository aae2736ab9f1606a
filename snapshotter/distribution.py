"""The OCI distribution client: skopeo, run as a subprocess.

mergefs speaks no registry HTTP itself. skopeo (containers/image) does the
protocol: blob existence checks (HEAD) before uploads, chunked uploads, token
and basic auth from the usual files (``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.docker/config.json``, or
``--authfile``), digest checks of every blob it downloads, retries with
exponential backoff (``--retry-times``) and progress bars on a terminal.

What this module adds: parsing ``REGISTRY/REPO[:TAG|@DIGEST]``, the TLS rule
(plain HTTP only with ``insecure`` or for a loopback registry), and one clear
line for every skopeo failure (``RegistryError``).

Light on purpose (no ``dataclasses``: its import costs ~10 ms of CPU): ``mergefs
pull`` starts skopeo from its argv with this module alone (``cmd_registry``).
"""
from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from typing import NamedTuple

from mergefs.errors import MergefsError

SKOPEO = "skopeo"
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class RegistryError(MergefsError):
    """A registry operation failed (unreachable, refused, digest mismatch...)."""


class Target(NamedTuple):
    """``registry/repo:tag`` or ``registry/repo@sha256:...``."""
    registry: str            # host[:port]
    repo: str
    tag: str | None = "latest"
    digest: str | None = None

    def __str__(self) -> str:
        return f"{self.registry}/{self.repo}" + (f"@{self.digest}" if self.digest
                                                 else f":{self.tag}")

    def docker(self) -> str:
        return f"docker://{self}"

    def pinned(self, digest: str) -> "Target":
        return self._replace(digest=digest)

    def default_name(self) -> str:
        """The name a pull records the image under without ``--name``: REPO's last part:TAG."""
        return self.repo.rsplit("/", 1)[-1] + (f":{self.tag}" if self.tag else "")

    @property
    def host(self) -> str:
        h = self.registry
        if h.startswith("["):
            return h[1:h.index("]")]
        return h.rsplit(":", 1)[0] if h.count(":") == 1 else h

    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_target(text: str) -> Target:
    """``REGISTRY/REPO[:TAG|@sha256:HEX]``; the registry part is required (ValueError)."""
    reg, sep, rest = text.partition("/")
    if not sep or not rest or not ("." in reg or ":" in reg or reg == "localhost"):
        raise ValueError(f"{text!r}: expected REGISTRY/REPO:TAG (e.g. 127.0.0.1:5000/app:v1)")
    digest = tag = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise ValueError(f"{text!r}: bad digest {digest!r}")
    else:
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not _TAG.match(tag):
                raise ValueError(f"{text!r}: bad tag {tag!r}")
        else:
            tag = "latest"
    if not _REPO.match(rest):
        raise ValueError(f"{text!r}: bad repository name {rest!r} (lower case, digits, . _ -)")
    return Target(reg, rest, tag, digest)


class Skopeo(NamedTuple):
    """How to talk to registries: TLS, credentials, retries, progress."""
    insecure: bool = False            # allow plain HTTP / unverified TLS for any registry
    authfile: str | None = None
    creds: str | None = None          # USER[:PASSWORD]
    token: str | None = None          # a bearer token
    retries: int = 3                  # skopeo backs off 1 s, 2 s, 4 s...
    progress: bool = False            # skopeo draws its bars on our stderr (a terminal)
    extra_env: dict | None = None     # added to skopeo's environment

    def _remote(self, target: Target, side: str) -> list[str]:
        """Flags for one remote end; ``side`` is "" (inspect), "src-" or "dest-"."""
        plain = self.insecure or target.loopback()
        argv = [f"--{side}tls-verify={'false' if plain else 'true'}"]
        if self.authfile:
            argv.append(f"--{side}authfile={self.authfile}")
        if self.creds:
            argv.append(f"--{side}creds={self.creds}")
        if self.token:
            argv.append(f"--{side}registry-token={self.token}")
        return argv

    def inspect(self, target: Target, config: bool = False) -> subprocess.Popen:
        """Start ``skopeo inspect --raw [--config]``; finish it with ``result``."""
        argv = [SKOPEO, "inspect", "--raw", *(["--config"] if config else []),
                f"--retry-times={self.retries}", *self._remote(target, ""), target.docker()]
        return self._start(argv, capture=True)

    def copy(self, src: str, dst: str, target: Target, push: bool,
             preserve_digests: bool = False) -> subprocess.Popen:
        """Start ``skopeo copy`` between an OCI layout and ``target``."""
        argv = [SKOPEO, "copy", f"--retry-times={self.retries}",
                *self._remote(target, "dest-" if push else "src-"),
                *(["--preserve-digests"] if preserve_digests else []),
                *([] if self.progress else ["--quiet"]), src, dst]
        return self._start(argv, capture=False)

    def _start(self, argv: list[str], capture: bool) -> subprocess.Popen:
        out = subprocess.PIPE if capture else (sys.stderr.fileno() if self.progress
                                               else subprocess.DEVNULL)
        try:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(self.extra_env or {})})
        except FileNotFoundError:
            raise RegistryError("skopeo is not installed (apt-get install skopeo)") from None


def result(proc: subprocess.Popen, what: str) -> bytes:
    """Wait for a skopeo process; its stdout, or RegistryError with skopeo's reason."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RegistryError(f"{what}: {reason(err.decode(errors='replace'))}")
    return out or b""


def reason(stderr: str) -> str:
    """skopeo's fatal message as one line (``level=fatal msg="..."``), else its last line."""
    msgs = re.findall(r'level=fatal msg="((?:[^"\\]|\\.)*)"', stderr)
    text = msgs[-1].replace('\\"', '"') if msgs else (
        [ln for ln in stderr.splitlines() if ln.strip()] or ["skopeo failed"])[-1]
    return " ".join(text.split())


def stop(proc: subprocess.Popen) -> None:
    """End a skopeo we started and no longer need (by its pid)."""
    if proc.returncode is None:
        proc.kill()
        proc.communicate()
