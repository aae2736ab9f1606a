"""Fixtures for the OCI tests: tar builders (honest and malicious) and umoci helpers."""
from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from ..conftest import needs

needs_umoci = needs("umoci")
needs_skopeo = needs("skopeo")
MTIME = 1_600_000_000


def member(name, kind="file", data=b"", mode=None, linkname="", uid=0, gid=0, mtime=MTIME,
           pax=None, devmajor=0, devminor=0) -> tuple[tarfile.TarInfo, bytes | None]:
    """One tar member described as data; ``kind`` is file dir symlink hardlink fifo char block."""
    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
               "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
               "block": tarfile.BLKTYPE}[kind]
    ti.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    ti.linkname, ti.uid, ti.gid, ti.mtime = linkname, uid, gid, mtime
    ti.devmajor, ti.devminor = devmajor, devminor
    ti.pax_headers = dict(pax or {})
    if kind == "file":
        ti.size = len(data)
        return ti, data
    return ti, None


def tar_bytes(members, compression: str = "none") -> bytes:
    """A tar (pax format) of ``members`` exactly in the given order, names unchecked."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(raw)
    return raw


@pytest.fixture
def write_tar(tmp_path):
    """write_tar(members, compression="none", name="layer.tar") -> Path."""
    def write(members, compression="none", name="layer.tar") -> Path:
        p = tmp_path / name
        p.write_bytes(tar_bytes(members, compression))
        return p
    return write


def run(*cmd, cwd=None) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd} failed: {r.stderr}"
    return r.stdout


def entries_of(root) -> list[str]:
    """Every path below ``root`` (for "nothing left behind")."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)
