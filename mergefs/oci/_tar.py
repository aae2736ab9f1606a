"""The tar format, read and written here (not by ``tarfile``) for three reasons:
names, link targets and xattr values stay exact bytes; PAX mtimes keep their
nanoseconds (``tarfile`` turns them into floats); and a header costs a few
microseconds, which is what makes importing 100k-file layers close to ``tar -x``.

Read: ustar, POSIX pax (``x`` per entry, ``g`` global), GNU (long names ``L``/
``K``, base-256 numbers, old ``ustar  `` magic), v7. Refused with InvalidLayer:
sparse files, multi-volume members, unknown entry types, bad checksums, data
that ends early, an archive without an end-of-archive block (every writer puts
one; without it the stream was cut, maybe at a member boundary), owners, times
or device numbers the kernel cannot hold. pax ``atime``/``ctime`` are ignored
(an import sets atime = mtime: the same tar, the same tree). Written: ustar headers with pax records where a value does
not fit (long names, nanosecond mtimes, xattrs, large ids or sizes).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from ..errors import InvalidLayer

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

# Entry types (typeflag byte).
REG, AREG, LNK, SYM, CHR, BLK, DIR, FIFO, CONT = b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"
PAX, GLOBAL_PAX, GNU_LONGNAME, GNU_LONGLINK = b"x", b"g", b"L", b"K"
GNU_DUMPDIR, GNU_VOLHDR = b"D", b"V"
GNU_SPARSE, GNU_MULTIVOL = b"S", b"M"
FILE_TYPES = (REG, AREG, CONT)
ALL_TYPES = (REG, AREG, LNK, SYM, CHR, BLK, DIR, FIFO, CONT)
MEMBER_TYPES = frozenset(ALL_TYPES) | {GNU_DUMPDIR, GNU_SPARSE, GNU_MULTIVOL}
ID_LIMIT = 2**32 - 1          # (uid_t)-1 means "unchanged" to chown: not an owner
TIME_LIMIT = 2**63            # nanoseconds that still fit the kernel's timespec
MAJOR_LIMIT, MINOR_LIMIT = 2**12, 2**20   # what the kernel's dev_t holds (new_valid_dev)
# name mode uid gid size mtime chksum type linkname magic version uname gname devmajor devminor prefix
HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
XATTR_PREFIXES = (b"SCHILY.xattr.", b"LIBARCHIVE.xattr.")


@dataclass
class Member:
    """One tar entry after its pax/GNU extension headers were folded in."""
    name: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int | None
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _number(field_: bytes, what: str) -> int:
    """An octal field, or GNU base-256 (high bit set on the first byte)."""
    try:
        return int(field_.rstrip(b"\0 ") or b"0", 8)   # the common case: "0000644\0"
    except ValueError:
        pass
    if field_ and field_[0] & 0x80:
        if field_[0] == 0x80:
            return int.from_bytes(field_[1:], "big")
        return int.from_bytes(field_, "big", signed=True)
    text = field_.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise InvalidLayer(f"tar header: bad {what} field {field_!r}") from None


def _checksum_ok(block: bytes, stored_field: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field read as spaces.

    adler32's low half is (1 + byte sum) mod 65521, computed in C: 25x faster
    than ``sum(block)``, which only runs when that cheap test fails (to accept
    the old signed-char sums some writers produced).
    """
    stored = _number(stored_field, "checksum")
    field_sum = sum(stored_field)
    if (zlib.adler32(block) & 0xFFFF) == (1 + stored + field_sum - 256) % 65521:
        return True
    unsigned = sum(block) - field_sum + 256
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 256
    return stored in (unsigned, signed)


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """pax records ``"%d %s=%s\n"``; keys and values are kept as bytes."""
    out: dict[bytes, bytes] = {}
    pos, n = 0, len(data)
    try:
        while pos < n and data[pos]:          # some writers pad with NULs
            space = data.index(b" ", pos)
            end = pos + int(data[pos:space])
            eq = data.index(b"=", space)
            if eq >= end or end > n or data[end - 1] != 10:
                raise ValueError
            out[data[space + 1:eq]] = data[eq + 1:end - 1]
            pos = end
    except ValueError:
        raise InvalidLayer("tar: malformed pax record") from None
    return out


def pax_time_ns(value: bytes) -> int:
    """A pax time ``SECONDS[.FRACTION]`` as exact integer nanoseconds."""
    whole, _, frac = value.partition(b".")
    try:
        secs = int(whole)
        ns = int(frac[:9].ljust(9, b"0")) if frac else 0
    except ValueError:
        raise InvalidLayer(f"tar: bad pax time {value!r}") from None
    if whole.startswith(b"-"):
        return secs * 1_000_000_000 - ns
    return secs * 1_000_000_000 + ns


def _xattr_name(key: bytes) -> str | None:
    for prefix in XATTR_PREFIXES:
        if key.startswith(prefix):
            name = key[len(prefix):]
            if prefix == b"LIBARCHIVE.xattr.":
                from urllib.parse import unquote_to_bytes
                name = unquote_to_bytes(name)
            if b"\0" in name:
                raise InvalidLayer(f"tar: xattr name {name!r} holds a NUL byte")
            return name.decode("utf-8", "surrogateescape")
    return None


def _xattr_value(key: bytes, value: bytes) -> bytes:
    if key.startswith(b"LIBARCHIVE.xattr."):
        import base64
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    return value


class TarReader:
    """Iterate the members of an uncompressed tar read from ``stream``.

    ``stream`` offers ``take(n) -> bytes``, ``skip(n)`` and ``copy_to(fd, n)``
    (see ``_stream.TarStream``). After a member is yielded the caller either
    consumes its data with ``copy_data`` or leaves it; the reader
    skips what is left before the next header.
    """

    def __init__(self, stream):
        self.stream = stream
        self._left = 0           # data bytes of the current member not consumed
        self._pad = 0
        self._global: dict[bytes, bytes] = {}

    def __iter__(self):
        while True:
            member = self._next()
            if member is None:
                return
            yield member

    def copy_data(self, fd: int) -> None:
        self.stream.copy_to(fd, self._left, self._pad)
        self._left = self._pad = 0

    def _block(self) -> bytes | None:
        """The next header block, checksum verified (None at the end of the archive)."""
        stream = self.stream
        if self._left or self._pad:
            stream.skip(self._left + self._pad)
            self._left = self._pad = 0
        block = stream.take(BLOCK, eof_ok=True)
        if len(block) < BLOCK or block == ZERO_BLOCK:
            if block == ZERO_BLOCK:
                return None       # end of archive (one zero block is enough, as for tar -x)
            # Every tar writer ends with zero blocks; without them the stream was cut
            # (at a member boundary, which neither tar nor a zstd reader notices).
            raise InvalidLayer("tar archive is truncated (no end-of-archive block)"
                               if not block else "tar: archive ends inside a header")
        field_ = block[148:156]
        try:
            stored = int(field_.rstrip(b"\0 "), 8)
        except ValueError:
            stored = -1
        # adler32's low half is (1 + byte sum) mod 65521, computed in C (see _checksum_ok)
        if (zlib.adler32(block) & 0xFFFF) != (stored + sum(field_) - 255) % 65521 \
                and not _checksum_ok(block, field_):
            raise InvalidLayer("tar: header checksum mismatch (corrupt or not a tar)")
        return block

    def _data_of(self, size: int) -> bytes:
        return self.stream.take(size, pad=-size % BLOCK)

    def _next(self) -> Member | None:
        pax = None
        longname = longlink = None
        while True:
            block = self._block()
            if block is None:
                return None
            typ = block[156:157]
            if typ in MEMBER_TYPES:
                break
            size = _number(block[124:136], "size")
            if typ == PAX:
                records = parse_pax(self._data_of(size))
                pax = records if pax is None else {**pax, **records}
            elif typ == GLOBAL_PAX:
                self._global.update(parse_pax(self._data_of(size)))
            elif typ == GNU_LONGNAME:
                longname = _cstr(self._data_of(size))
            elif typ == GNU_LONGLINK:
                longlink = _cstr(self._data_of(size))
            elif typ == GNU_VOLHDR:
                self.stream.skip(size + (-size % BLOCK))
            else:
                break
        if self._global:
            pax = {**self._global, **(pax or {})}
        h = HEADER.unpack(block)
        try:
            member = self._member(h, typ, pax, longname, longlink)
        except InvalidLayer:
            raise                         # already says what is wrong (sparse, out of range)
        except ValueError as e:           # int() of a malformed pax value
            raise InvalidLayer(f"tar: malformed pax value ({e})") from None
        self._left = member.size if typ in FILE_TYPES else _number(h[4], "size")
        self._pad = -self._left % BLOCK
        return member

    def _member(self, h: tuple, typ: bytes, pax: dict | None, longname, longlink) -> Member:
        if longname is not None:
            name = longname
        else:
            name = h[0].partition(b"\0")[0]
            if h[9] == b"ustar\0" and h[15][0]:     # POSIX ustar: a name prefix
                name = h[15].partition(b"\0")[0] + b"/" + name
        if longlink is not None:
            linkname = longlink
        else:
            linkname = h[8].partition(b"\0")[0] if h[8][0] else b""
        if typ not in ALL_TYPES:
            if typ == AREG and name.endswith(b"/") or typ == GNU_DUMPDIR:
                typ = DIR                            # v7 and GNU dump directories
            elif typ in (GNU_SPARSE, GNU_MULTIVOL):
                raise InvalidLayer("tar: sparse and multi-volume entries are not supported")
            else:
                raise InvalidLayer(f"tar: entry {name!r} has unsupported type {typ!r}")
        elif typ == AREG and name.endswith(b"/"):
            typ = DIR
        try:                                         # the common case, without calls
            mode = int(h[1].rstrip(b"\0 ") or b"0", 8)
            uid = int(h[2].rstrip(b"\0 ") or b"0", 8)
            gid = int(h[3].rstrip(b"\0 ") or b"0", 8)
        except ValueError:                           # base-256 and other oddities
            mode, uid, gid = _number(h[1], "mode"), _number(h[2], "uid"), _number(h[3], "gid")
        dev = typ == CHR or typ == BLK
        m = Member(name, typ, mode, uid, gid,
                   _number(h[4], "size") if typ in FILE_TYPES else 0,
                   0 if pax and b"mtime" in pax else _number(h[5], "mtime") * 1_000_000_000,
                   None, linkname,
                   _number(h[13], "devmajor") if dev else 0,
                   _number(h[14], "devminor") if dev else 0)
        if pax:
            _apply_pax(m, pax)
        if not (0 <= m.uid < ID_LIMIT and 0 <= m.gid < ID_LIMIT and 0 <= m.size
                and -TIME_LIMIT < m.mtime_ns < TIME_LIMIT
                and 0 <= m.devmajor < MAJOR_LIMIT and 0 <= m.devminor < MINOR_LIMIT):
            raise InvalidLayer(f"tar: entry {m.name!r} has an out-of-range owner, size, "
                               "time or device number")
        return m


def _apply_pax(m: Member, pax: dict[bytes, bytes]) -> None:
    """Fold pax records into ``m``. atime and ctime are ignored: an import sets
    atime to the mtime, so the same tar gives the same tree."""
    for key, value in pax.items():
        if key == b"mtime":
            whole, dot, frac = value.partition(b".")
            if dot and len(frac) == 9 and whole.isdigit() and frac.isdigit():
                m.mtime_ns = int(whole + frac)           # GNU tar's form, in one int()
            else:
                m.mtime_ns = pax_time_ns(value)
        elif key == b"atime" or key == b"ctime":
            continue
        elif key == b"path":
            m.name = value
        elif key == b"linkpath":
            m.linkname = value
        elif key == b"size":
            m.size = int(value)
        elif key == b"uid":
            m.uid = int(value)
        elif key == b"gid":
            m.gid = int(value)
        elif key.startswith(XATTR_PREFIXES):
            m.xattrs[_xattr_name(key)] = _xattr_value(key, value)
        elif key.startswith(b"GNU.sparse."):
            raise InvalidLayer("tar: sparse entries are not supported")


# ---- writing ---------------------------------------------------------------

def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _ustar(name: bytes, typ: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
           linkname: bytes = b"", devmajor: int = 0, devminor: int = 0) -> bytes:
    block = HEADER.pack(name, b"%07o\0" % mode, b"%07o\0" % uid, b"%07o\0" % gid,
                        b"%011o\0" % size, b"%011o\0" % mtime, b" " * 8, typ, linkname,
                        b"ustar\0", b"00", b"", b"", b"%07o\0" % devmajor,
                        b"%07o\0" % devminor, b"")
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def encode_header(m: Member) -> bytes:
    """The header block(s) for ``m``: a pax header first when a value does not fit ustar.

    Deterministic: the same member always gives the same bytes (no user or
    group names, no atime, the pax header's own name is fixed).
    """
    records = []
    if len(m.name) > 100:
        records.append(_pax_record(b"path", m.name))
    if len(m.linkname) > 100:
        records.append(_pax_record(b"linkpath", m.linkname))
    secs, ns = divmod(m.mtime_ns, 10**9)
    if ns or not 0 <= secs < 8**11:
        records.append(_pax_record(b"mtime", b"%d.%09d" % (secs, ns)))
    for key, value in ((b"uid", m.uid), (b"gid", m.gid)):
        if value >= 8**7:
            records.append(_pax_record(key, b"%d" % value))
    if m.size >= 8**11:
        records.append(_pax_record(b"size", b"%d" % m.size))
    for attr in sorted(m.xattrs):
        records.append(_pax_record(b"SCHILY.xattr." + attr.encode("utf-8", "surrogateescape"),
                                   m.xattrs[attr]))
    head = _ustar(m.name[:100], m.type, m.mode & 0o7777, min(m.uid, 8**7 - 1),
                  min(m.gid, 8**7 - 1), m.size if m.size < 8**11 else 0,
                  min(max(secs, 0), 8**11 - 1), m.linkname[:100], m.devmajor, m.devminor)
    if not records:
        return head
    data = b"".join(records)
    pax_head = _ustar(b"././@PaxHeader", PAX, 0o644, 0, 0, len(data), 0)
    return pax_head + data + bytes(-len(data) % BLOCK) + head
