"""Where each sample's image lies in a shard: the tar's headers read, its data seeked over.

The loader indexes every shard it opens (a worker keeps the last few hundred indexes; a corpus
with more shards than that indexes each drawn shard again). Through `tarfile` that cost 41 µs
a sample (an image and its json) on `make shards` output, more than decoding a 64 px JPEG (37
µs), and 71 µs on webdataset's TarWriter shards (pax headers). Shards as those two write them
hold plain members: ustar headers, some after a pax header of times, sizes or a path. Those are
read here directly, 32 KiB at a time, with the header checksum summed in C (6 and 13 µs a
sample). Anything else (GNU long names or sparse files, global pax headers, links, directories,
a bad checksum, binary numbers, a cut) sends the whole shard through `tarfile`, so an unusual
or damaged tar gets exactly tarfile's reading (this Python's); tests/test_tarindex.py checks that both readings
agree on intact, cut and damaged shards.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from dataclasses import dataclass

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

_BLOCK = 512
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
_CHUNK = 32 << 10  # bytes read at once while walking the headers
_PAX_MAX = 64 << 10  # a larger pax header (hostile, or carrying more than names and times): tarfile
_REGULAR = (b"0", b"\0", b"7")  # tarfile's isfile() types, less GNU sparse (read by tarfile)
# pax keys a plain member may carry: times and ids are ignored here, path and size applied.
_PAX_KEYS = {b"path", b"size", b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname"}


@dataclass
class ShardIndex:
    """Where each sample's image lies in a shard: (key, offset, size), in tar order."""

    samples: list[tuple[str, int, int]]
    truncated: bool


class _Unusual(Exception):
    """Not a member the direct reading handles: read the shard with tarfile instead."""


def index_tar(f, size: int) -> ShardIndex:
    """Read the tar headers only (data is seeked over). Samples are grouped by key (the name
    up to the first dot of its basename, as webdataset does); a member running past the end
    of the file, or a broken header, marks the shard truncated and ends the listing."""
    try:
        return _images(_plain_members(f, size), size)
    except _Unusual:
        f.seek(0)
        return _index_with_tarfile(f, size)


def _images(members, size: int) -> ShardIndex:
    """The ShardIndex of (name, data offset, size) regular members, in tar order."""
    images: dict[str, tuple[int, int]] = {}
    truncated = False
    for name, offset, length in members:
        if offset + length > size:
            truncated = True
            break
        d, base = os.path.split(name)
        if "." not in base:
            continue
        key, ext = base.split(".", 1)
        if ext.lower() in IMAGE_EXTS:
            images.setdefault(os.path.join(d, key), (offset, length))
    return ShardIndex([(k, o, s) for k, (o, s) in images.items()], truncated)


def _index_with_tarfile(f, size: int) -> ShardIndex:
    members = []
    truncated = False
    end = 0  # where the last member's data (padded to a block) ends
    try:
        with tarfile.open(fileobj=_Bounded(f, size), mode="r:") as tar:
            for m in tar:
                if m.size < 0:  # tarfile would step back to this header again, forever
                    truncated = True
                    break
                end = m.offset_data + -(-m.size // _BLOCK) * _BLOCK
                if m.isfile():
                    members.append((m.name, m.offset_data, m.size))
                    if m.offset_data + m.size > size:
                        break
    except Exception:  # noqa: BLE001 - TarError, or a number tarfile cannot take: a broken shard
        truncated = True
    # tarfile ends quietly at a header cut short or at the end of the file; a whole archive ends
    # with two zero blocks after its last member, so less room than that is a shard cut short
    truncated = truncated or (end > 0 and size - end < 2 * _BLOCK)
    index = _images(members, size)
    index.truncated = index.truncated or truncated
    return index


class _Bounded:
    """A file as tarfile reads it, no read past `size`: a header claiming gigabytes (a pax
    header's size) allocates what the file holds, not what the header says."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()


def _plain_members(f, size: int) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular member up to the end-of-archive block, read
    as tarfile would; raises _Unusual wherever the reading could differ from tarfile's."""
    read = _Window(f).read
    members = []
    pos = 0
    while True:
        if pos + _BLOCK > size:
            raise _Unusual  # no end-of-archive block, or a cut: tarfile decides what that means
        header = read(pos, _BLOCK)
        if not any(header):
            if pos + 2 * _BLOCK > size:
                raise _Unusual  # one end block, then the file ends: cut short (tarfile's reading says so)
            return members  # end of archive, as tarfile stops there
        kind, name, length = _header(header)
        pos += _BLOCK
        if kind == b"x":  # a pax header: its records apply to the next member
            if length > _PAX_MAX or pos + _padded(length) + _BLOCK > size:
                raise _Unusual
            overrides = _pax_records(read(pos, _padded(length)))  # records in the padding count too
            pos += _padded(length)
            kind, name, length = _header(read(pos, _BLOCK))
            if kind == b"x":
                raise _Unusual
            pos += _BLOCK
            if b"path" in overrides:
                name = _pax_text(overrides[b"path"]).rstrip("/")
            if b"size" in overrides:
                length = _number(overrides[b"size"])
        if kind not in _REGULAR:
            raise _Unusual  # directories, links, devices, GNU extensions, global pax headers
        members.append((name, pos, length))
        pos += _padded(length)


class _Window:
    """Reads at given offsets through a window of _CHUNK bytes: with small members many
    headers lie in one window, one system call for all of them."""

    def __init__(self, f):
        self.f, self.start, self.buf = f, 0, b""

    def read(self, pos: int, n: int) -> bytes:
        if not (self.start <= pos and pos + n <= self.start + len(self.buf)):
            self.f.seek(pos)
            self.start, self.buf = pos, self.f.read(max(n, _CHUNK))
        at = pos - self.start
        data = self.buf[at:at + n]
        if len(data) != n:
            raise _Unusual  # the file is shorter than its size said
        return data


def _header(block: bytes) -> tuple[bytes, str, int]:
    """(type, name, size) of one ustar/v7 header with a valid checksum."""
    if _octal(block[148:156]) != _checksum(block):
        raise _Unusual  # a bad checksum, or tarfile's signed variant: tarfile decides
    numbers = block[100:124] + block[136:148] + block[329:345]  # mode, ids, mtime, device numbers
    if numbers.translate(None, b"01234567\0"):  # not only octal digits and NULs: parse each as tarfile does
        for start, end in _NUMBER_FIELDS:
            _octal(block[start:end])
    name = _text(block[0:100].split(b"\0", 1)[0])
    prefix = _text(block[345:500].split(b"\0", 1)[0])
    if block[156:157] == b"\0" and name.endswith("/"):
        raise _Unusual  # a v7 directory: tarfile reads it
    if prefix:
        name = prefix + "/" + name
    return block[156:157], name, _octal(block[124:136])


def _checksum(block: bytes) -> int:
    """The sum of a header's bytes with its checksum field read as spaces (tar's unsigned sum)."""
    # Adler-32's first half is 1 + that sum modulo 65521, in C: exact while the sum cannot
    # reach 65521, as with under 256 non-zero bytes (a header is mostly NULs); else sum().
    if (_BLOCK - block.count(0) + 8) * 255 < 65521:
        a = zlib.adler32(block[156:], zlib.adler32(b"        ", zlib.adler32(block[:148])))
        return (a & 0xFFFF) - 1
    return sum(block[:148]) + sum(block[156:]) + 8 * 32


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise _Unusual  # base-256: tarfile reads it
    try:
        n = int(field.split(b"\0", 1)[0].strip().decode("ascii") or "0", 8)
    except ValueError:
        raise _Unusual from None
    if n < 0:
        raise _Unusual  # a negative size ("-1000"): tarfile's reading stops there
    return n


def _number(value: bytes) -> int:
    if not value.isdigit() or len(value) > 20:
        raise _Unusual
    return int(value)


def _text(raw: bytes) -> str:
    return raw.decode(tarfile.ENCODING, "surrogateescape")


def _pax_text(raw: bytes) -> str:
    try:  # as tarfile decodes a pax path: UTF-8, else its own encoding
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _text(raw)


def _padded(length: int) -> int:
    return -(-length // _BLOCK) * _BLOCK


def _pax_records(buf: bytes) -> dict[bytes, bytes]:
    """The records of a pax extended header ("<length> <key>=<value>\\n" each), when every key
    is one a plain member may carry."""
    records = {}
    pos = 0
    while pos < len(buf) and buf[pos] != 0:
        space = buf.find(b" ", pos, pos + 21)
        if space < 0 or not buf[pos:space].isdigit():
            raise _Unusual
        end = pos + int(buf[pos:space])
        record = buf[space + 1:end]
        if end <= space or end > len(buf) or not record.endswith(b"\n") or b"=" not in record:
            raise _Unusual
        key, value = record[:-1].split(b"=", 1)
        if key not in _PAX_KEYS:
            raise _Unusual  # hdrcharset, GNU sparse maps, vendor keys: tarfile reads them
        records[key] = value
        pos = end
    return records
