"""The shard index read directly (pipeline.tarindex) against the same index through tarfile,
on the shards this project and webdataset write, intact, cut and damaged."""

import io
import json
import os
import random
import tarfile
import time

import pytest
import webdataset as wds

from pipeline import tarindex
from pipeline.shardwriter import write_tar
from pipeline.tarindex import index_tar


def by_tarfile(data: bytes) -> tarindex.ShardIndex:
    return tarindex._index_with_tarfile(io.BytesIO(data), len(data))


def direct(data: bytes) -> tarindex.ShardIndex:
    return index_tar(io.BytesIO(data), len(data))


def plain_members(data: bytes):
    """The direct reading alone, or None where it hands the shard to tarfile."""
    try:
        return tarindex._plain_members(io.BytesIO(data), len(data))
    except tarindex._Unusual:
        return None


def samples(n: int, rnd: random.Random, prefix: str = "s"):
    for i in range(n):
        key = f"{prefix}{i:06d}"
        yield key, rnd.randbytes(rnd.randint(1, 3000)), json.dumps({"i": i}).encode()


def ours(tmp_path, n=20, seed=0) -> bytes:
    rnd = random.Random(seed)
    members = []
    for key, img, meta in samples(n, rnd):
        members += [(f"{key}.jpg", img), (f"{key}.json", meta)]
    path = str(tmp_path / f"ours-{seed}.tar")
    write_tar(path, members)
    return open(path, "rb").read()


def webdataset_shard(tmp_path, n=20, seed=1, ext="png") -> bytes:
    rnd = random.Random(seed)
    path = str(tmp_path / f"wds-{seed}.tar")
    with wds.TarWriter(path) as sink:  # pax headers with fractional mtimes
        for key, img, meta in samples(n, rnd, prefix="sub/dir/w"):
            sink.write({"__key__": key, ext: img, "json": meta})
    return open(path, "rb").read()


def tarfile_shard(fmt, names, sizes=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i % 256]) * (sizes[i] if sizes else 100 + i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_the_shards_make_shards_and_webdataset_write_are_read_directly_and_alike(tmp_path):
    for data in (ours(tmp_path), webdataset_shard(tmp_path)):
        assert plain_members(data) is not None  # the fast path, not the fallback
        got = direct(data)
        assert got == by_tarfile(data)
        assert len(got.samples) == 20 and not got.truncated
        key, offset, size = got.samples[3]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the offsets point at the image bytes
            member = next(m for m in tar if m.name.startswith(key + ".") and not m.name.endswith(".json"))
            assert data[offset:offset + size] == tar.extractfile(member).read()


@pytest.mark.parametrize("fmt,names,fast", [
    (tarfile.USTAR_FORMAT, ["a/" * 60 + "x.jpg", "k.JPEG", "k.json", "noext", "dup.jpg", "dup.png"], True),  # ustar prefix
    (tarfile.PAX_FORMAT, ["p/" * 80 + "long.jpg", "ünï.webp", "q.jpg"], True),  # pax path records
    (tarfile.GNU_FORMAT, ["g/" * 80 + "long.jpg", "h.jpg"], False),  # GNU long names: tarfile reads it
])
def test_other_writers_give_what_tarfile_gives(fmt, names, fast):
    data = tarfile_shard(fmt, names)
    assert (plain_members(data) is not None) == fast
    assert direct(data) == by_tarfile(data)
    assert len(direct(data).samples) >= 2


def test_directories_links_and_global_headers_go_through_tarfile():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        f = tarfile.TarInfo("dir/a.jpg")
        f.size = 3
        tar.addfile(f, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("dir/b.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "dir/a.jpg"
        tar.addfile(link)
    data = buf.getvalue()
    assert plain_members(data) is None
    assert direct(data) == by_tarfile(data)
    assert [k for k, _, _ in direct(data).samples] == ["dir/a"]


def test_every_cut_of_a_shard_reads_as_tarfile_reads_it(tmp_path):
    for data in (ours(tmp_path, n=6), webdataset_shard(tmp_path, n=6)):
        cuts = sorted(set(range(0, len(data), 512)) | set(random.Random(2).sample(range(len(data)), 60)))
        for cut in cuts:
            part = data[:cut]
            assert direct(part) == by_tarfile(part), cut
        for k, (key, offset, size) in enumerate(direct(data).samples):  # a cut inside an image
            got = direct(data[:offset + size // 2])
            assert got.truncated and [s[0] for s in got.samples] == [s[0] for s in direct(data).samples[:k]]


def test_damaged_headers_read_as_tarfile_reads_them(tmp_path):
    data = ours(tmp_path, n=8)
    rnd = random.Random(3)
    headers = [o - 512 for _, o, _ in direct(data).samples]
    for h in headers:
        for field in (0, 124, 148, 156, 345):  # name, size, checksum, type, prefix
            bad = bytearray(data)
            bad[h + field + rnd.randrange(8)] ^= 1 << rnd.randrange(8)
            bad = bytes(bad)
            assert direct(bad) == by_tarfile(bad), (h, field)
    assert by_tarfile(b"\0" * 10) == direct(b"\0" * 10)
    assert direct(b"") == by_tarfile(b"")
    assert direct(b"not a tar" * 200) == by_tarfile(b"not a tar" * 200)
    assert direct(b"not a tar" * 200).truncated


def test_pax_size_and_odd_records(tmp_path):
    # a pax "size" record overrides the header's (members over 8 GiB carry one); vendor keys
    # and a hdrcharset send the shard through tarfile
    plain = tarfile_shard(tarfile.USTAR_FORMAT, ["a.jpg", "b.jpg"], sizes=[700, 10])
    for records in ({"size": "700"}, {"size": "700", "SCHILY.xattr.x": "1"}, {"hdrcharset": "BINARY"}):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("a.jpg")
            info.size = 700
            info.pax_headers = records
            tar.addfile(info, io.BytesIO(b"x" * 700))
            info = tarfile.TarInfo("b.jpg")
            info.size = 10
            tar.addfile(info, io.BytesIO(b"y" * 10))
        data = buf.getvalue()
        assert direct(data) == by_tarfile(data)
        assert [s for _, _, s in direct(data).samples] == [700, 10]
    assert direct(plain) == by_tarfile(plain)


def test_the_direct_reading_is_faster_than_tarfile(tmp_path):
    data = ours(tmp_path, n=400, seed=5)
    path = tmp_path / "big.tar"
    path.write_bytes(data)

    def best(fn):
        times = []
        for _ in range(5):
            with open(path, "rb") as f:
                t0 = time.perf_counter()
                fn(f, len(data))
                times.append(time.perf_counter() - t0)
        return min(times)

    assert best(index_tar) < 0.6 * best(tarindex._index_with_tarfile)


def test_the_checksum_is_tars_unsigned_sum_for_any_header():
    rnd = random.Random(4)
    for nonzero in (0, 1, 100, 255, 256, 257, 300, 512):  # both sides of the Adler-32 shortcut's bound
        for _ in range(20):
            block = bytearray(512)
            for i in rnd.sample(range(512), nonzero):
                block[i] = rnd.choice((1, 128, 255, rnd.randrange(1, 256)))
            block = bytes(block)
            assert tarindex._checksum(block) == sum(block[:148]) + 32 * 8 + sum(block[156:])


# ---------------------------------------------------------------- hostile headers (a review's cases)

def header(name: bytes, size: int, kind=b"0", size_field=None, **fields) -> bytes:
    """A ustar header with a valid checksum; `fields`: raw bytes for mode, mtime."""
    b = bytearray(512)
    b[0:len(name)] = name
    b[100:108] = fields.get("mode", b"0000644\0")
    b[108:124] = b"0000000\0" * 2
    b[124:136] = size_field if size_field is not None else b"%011o\0" % size
    b[136:148] = fields.get("mtime", b"00000000000\0")
    b[156:157] = kind
    b[257:265] = b"ustar\x0000"
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def member(name: bytes, data: bytes = b"\xff\xd8jpeg\xff\xd9", **kw) -> bytes:
    return header(name, len(data), **kw) + data + b"\0" * (-len(data) % 512)


def pax(records: bytes, padding: bytes = b"", size_field=None) -> bytes:
    block = records + padding
    return header(b"PaxHeader/x", len(records), kind=b"x", size_field=size_field) + block + b"\0" * (-len(block) % 512)


END = b"\0" * 1024


@pytest.mark.parametrize("data", [
    member(b"a.jpg") + member(b"b.jpg", mtime=b"zzzzzzzzzzz\0") + member(b"c.jpg") + END,  # tarfile stops at b
    member(b"a.jpg", mode=b"9999999\0") + member(b"b.jpg") + END,  # a broken first header: truncated
    member(b"a.jpg", mtime=b"   1234567 \0") + END,  # spaces in a number: parsed as tarfile does
    pax(b"15 path=p1.jpg\n", padding=b"15 path=p2.jpg\n") + member(b"x.bin") + END,  # a record in the padding
    pax(b"40 path=q.jpg\n") + member(b"x.bin") + END,  # a record longer than its header
    pax(b"%d size=%s\n" % (5011, b"9" * 5000)) + member(b"r.jpg") + END,  # a number Python will not parse
    member(b"a.jpg") + header(b"n.jpg", 0, size_field=b"-0000001000\0") + END,  # a size that steps back
], ids=["bad-mtime", "bad-first-mode", "spaced-mtime", "pax-padding", "pax-long-record", "pax-huge-size",
        "negative-size"])
def test_hostile_headers_read_as_tarfile_reads_them_and_end(data):
    t0 = time.perf_counter()
    got = direct(data)
    assert got == by_tarfile(data)
    assert time.perf_counter() - t0 < 5


def test_what_the_hostile_headers_give():
    assert direct(member(b"a.jpg") + member(b"b.jpg", mtime=b"zzzzzzzzzzz\0") + END).samples == [("a", 512, 8)]
    assert direct(member(b"a.jpg", mode=b"9999999\0") + END) == tarindex.ShardIndex([], True)
    assert [k for k, _, _ in direct(pax(b"15 path=p1.jpg\n", padding=b"15 path=p2.jpg\n") + member(b"x.bin") + END)
            .samples] == ["p2"]  # the later record wins, as in tarfile
    looped = direct(member(b"a.jpg") + header(b"n.jpg", 0, size_field=b"-0000001000\0") + END)
    assert looped.truncated and [k for k, _, _ in looped.samples] == ["a"]


def test_a_header_claiming_gigabytes_allocates_what_the_file_holds():
    import tracemalloc

    data = pax(b"", size_field=b"77777777777\0") + member(b"a.jpg") + END  # an 8 GiB pax header
    tracemalloc.start()
    got = direct(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == by_tarfile(data) and got.samples == []
    assert peak < 1 << 20
