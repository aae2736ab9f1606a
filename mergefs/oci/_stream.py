"""Layer tar byte streams: compression found by magic bytes, the diffID computed
while reading.

``open_tar_stream(source)`` turns a path or a binary file object holding a
plain, gzip or zstd tar into a ``TarStream``: the uncompressed bytes, hashed
as they pass, so the OCI diffID (sha256 of the uncompressed tar) costs no
second read. Corrupt or truncated compressed data raises InvalidLayer.
"""
from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
import zlib
from typing import BinaryIO, Callable

from ..errors import InvalidLayer

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_UNSUPPORTED = {b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2"}


def sniff_compression(head: bytes) -> str:
    """'gzip', 'zstd' or 'none' from the first bytes; InvalidLayer for the others."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    for magic, name in _UNSUPPORTED.items():
        if head.startswith(magic):
            raise InvalidLayer(f"{name}-compressed layers are not supported (gzip, zstd or plain tar)")
    return "none"


class _Prefixed(io.RawIOBase):
    """``head`` then the rest of ``raw``: lets us sniff magic bytes of a pipe."""

    def __init__(self, head: bytes, raw: BinaryIO):
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out = self.head if n < 0 else self.head[:n]
            self.head = self.head[len(out):]
            return out
        return self.raw.read(n)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class _ZstdFrames:
    """zstd frames one after another (a concatenation is one valid stream).

    ``stream_reader`` bounds what one read returns (a few bytes of zstd can
    stand for gigabytes; ``decompressobj`` has no output limit). It does not
    notice a stream cut at a frame boundary; the tar reader does, since a
    layer must end with an end-of-archive block.
    """

    def __init__(self, raw: BinaryIO):
        import zstandard
        self._error = zstandard.ZstdError
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=CHUNK, read_across_frames=True)

    def read(self, n: int) -> bytes:
        try:
            return self._reader.read(n)
        except self._error as e:
            raise InvalidLayer(f"zstd stream is corrupt: {e}") from None


class _GzipMembers:
    """gzip (members one after another) through one ``zlib.decompressobj`` call per
    MiB of output, with bounded output per call.

    Why not ``gzip.GzipFile``: its reader loops in Python over 128 KiB pieces,
    taking the GIL back after each; on the prefetch thread beside a busy main
    thread every re-take can wait a whole switch interval. zlib checks each
    member's CRC and length; a stream that ends inside a member is truncated.
    """

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.d = zlib.decompressobj(31)
        self.feed = b""
        self.done = False

    def read(self, n: int) -> bytes:
        while not self.done:
            if self.d.eof and not self._next_member():
                break
            data = self.d.unconsumed_tail or self.feed or self.raw.read(4 * CHUNK)
            self.feed = b""
            if not data:
                raise InvalidLayer("gzip stream is truncated")
            try:
                out = self.d.decompress(data, n)
            except zlib.error as e:
                raise InvalidLayer(f"gzip stream is corrupt: {e}") from None
            if out:
                return out
        return b""

    def _next_member(self) -> bool:
        """After a member: another one follows (True), or the end (zero padding allowed)."""
        rest = self.d.unused_data or self.raw.read(CHUNK)
        while rest and not rest.strip(b"\0"):
            rest = self.raw.read(CHUNK)           # trailing zeros, as gzip(1) accepts
        if not rest:
            self.done = True
            return False
        if not rest.startswith(GZIP_MAGIC):
            raise InvalidLayer("gzip stream is corrupt: trailing garbage after a member")
        self.d = zlib.decompressobj(31)
        self.feed = rest
        return True


class _Prefetch:
    """Reads, decompresses and hashes on a second thread, one chunk ahead.

    zlib, zstd, hashlib and read() release the GIL, so on a machine with two
    cores decompression and the diffID cost (almost) no wall time beside the
    tar parsing and file creation of the main thread -- as ``tar -xz`` runs
    gzip in its own process. The importer's only thread; errors it meets
    (truncated gzip, a blob digest mismatch) are raised by ``get()`` in the
    main thread, and ``close()`` always stops and joins it.
    """

    def __init__(self, read: Callable[[int], bytes], raw: BinaryIO):
        self._read, self._raw = read, raw
        self.sha = hashlib.sha256()
        self.size = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="mergefs-import-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._read(CHUNK)
                if not chunk:
                    break
                self.sha.update(chunk)
                self.size += len(chunk)
                self._put(chunk)
            while not self._stop.is_set() and self._raw.read(CHUNK):
                pass          # bytes after a compressed stream: read so a blob digest is checked
            self._put(None)
        except BaseException as e:     # handed to the main thread, raised there
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def get(self) -> bytes:
        """The next chunk; b"" at the end."""
        if self._done:
            return b""
        item = self._queue.get()
        if item is None or isinstance(item, BaseException):
            self._done = True
            self._thread.join()
            if item is not None:
                raise item
            return b""
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class TarStream:
    """Uncompressed tar bytes with the running sha256 of everything read (the diffID).

    ``close()`` when done (it stops the hashing thread)."""

    def __init__(self, read: Callable[[int], bytes], compression: str, raw: BinaryIO):
        self.compression = compression
        self._source = _Prefetch(read, raw)
        self._buf = b""
        self._pos = 0

    def _fill(self) -> bool:
        chunk = self._source.get()
        if not chunk:
            return False
        self._buf = self._buf[self._pos:] + chunk if self._pos < len(self._buf) else chunk
        self._pos = 0
        return True

    def take(self, n: int, eof_ok: bool = False, pad: int = 0) -> bytes:
        """Exactly ``n`` bytes (fewer only at the end when ``eof_ok``), then skip ``pad``."""
        pos = self._pos
        end = pos + n
        if end + pad <= len(self._buf):              # the common case: all buffered
            self._pos = end + pad
            return self._buf[pos:end]
        while len(self._buf) - self._pos < n:
            if not self._fill():
                if eof_ok:
                    out = self._buf[self._pos:]
                    self._buf, self._pos = b"", 0
                    return out
                raise InvalidLayer("tar archive is truncated (data ends inside an entry)")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        if pad:
            self.skip(pad)
        return out

    def skip(self, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if avail == 0 and not self._fill():
                raise InvalidLayer("tar archive is truncated (data ends inside an entry)")
            step = min(n, len(self._buf) - self._pos)
            self._pos += step
            n -= step

    def copy_to(self, fd: int, n: int, pad: int = 0) -> None:
        """Write the next ``n`` bytes to ``fd``, then skip ``pad`` bytes."""
        end = self._pos + n + pad
        if end <= len(self._buf):                 # the common case: all buffered
            data = self._buf[self._pos:self._pos + n]
            self._pos = end
            while data:
                data = data[os.write(fd, data):]
            return
        while n:
            if self._pos == len(self._buf) and not self._fill():
                raise InvalidLayer("tar archive is truncated (data ends inside an entry)")
            view = memoryview(self._buf)[self._pos:self._pos + n]
            written = os.write(fd, view)
            self._pos += written
            n -= written
        if pad:
            self.skip(pad)

    def drain(self) -> None:
        """Read (and hash) the rest: the diffID covers the whole stream, padding included."""
        self._buf, self._pos = b"", 0
        while self._source.get():
            pass

    def close(self) -> None:
        self._source.close()

    @property
    def size(self) -> int:
        """Uncompressed bytes read (all of them once ``drain()`` returned)."""
        return self._source.size

    @property
    def diff_id(self) -> str:
        """``sha256:<hex>`` of the whole uncompressed stream; valid after ``drain()``."""
        return "sha256:" + self._source.sha.hexdigest()


def open_tar_stream(raw: BinaryIO) -> TarStream:
    """Wrap an open binary file (positioned at the tar's first byte)."""
    head = raw.read(8)
    compression = sniff_compression(head)
    raw = _Prefixed(head, raw)
    if compression == "gzip":
        read = _GzipMembers(raw).read
    elif compression == "zstd":
        read = _ZstdFrames(raw).read
    else:
        read = raw.read
    return TarStream(read, compression, raw)
