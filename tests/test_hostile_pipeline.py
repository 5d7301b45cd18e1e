"""Hostile and careless inputs to the pipeline (issue 15): shard indexes that try to run
commands or escape their folder, sources regenerated in place, symlink loops, OUT inside a
source, two writers on one OUT, decompression bombs inside shards, FIFOs / devices / huge
files named as inputs, EXIF-rotated JPEGs and 16-bit PNGs. Real shards, read back by stock
webdataset; commands that would hang on a regression run under a timeout."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline import shards
from pipeline.images import check_image
from pipeline.loader import UnpairedLoader, resolve_shards
from pipeline.sources import list_inputs
from test_shards import encode, noise_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
ORIENTATION = 0x0112  # the EXIF tag


def noise(seed: int, w=48, h=40) -> Image.Image:
    return noise_rgb(seed, w, h)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header_only(w: int, h: int) -> bytes:
    """A ~80-byte PNG that declares w x h RGB pixels (a decompression bomb's header)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + png_chunk(b"IEND", b""))


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one): uint16 HxWx3 -> bytes."""
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(h))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def folder(path, images: dict[str, bytes]):
    path.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def make(a, b, out, *extra) -> int:
    return shards.main(["--src-a", str(a), "--src-b", str(b), "--out", str(out), "--no-progress", *extra])


def cli(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "pipeline.shards", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def outputs(out):
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    quarantine = pq.read_table(os.path.join(out, "quarantine.parquet")).to_pylist()
    return manifest, quarantine


def small_out(tmp_path):
    """A real OUT of make shards: 4 images per domain, 2 shards each."""
    a = folder(tmp_path / "A", {f"{i}.jpg": encode(noise(i), "JPEG") for i in range(4)})
    b = folder(tmp_path / "B", {f"{i}.png": encode(noise(10 + i), "PNG") for i in range(4)})
    out = tmp_path / "out"
    assert make(a, b, out, "--max-per-shard", "2") == 0
    return out


# ----------------------------------------------------------------------------- 1. index URLs are data


def test_index_entries_never_run_commands_or_escape_their_folder(tmp_path):
    out = small_out(tmp_path)
    index_file = out / "index.json"
    good = json.loads(index_file.read_text())
    marker = tmp_path / "marker"
    outside = tmp_path / "outside.tar"
    outside.write_bytes((out / "a" / "a-000000.tar").read_bytes())
    os.symlink(outside, out / "a" / "escape.tar")
    hostile = [
        (f"pipe:touch {marker}; cat a/a-000000.tar", "scheme 'pipe'"),
        (f"PIPE:touch {marker}", "scheme 'pipe'"),
        ("/etc/passwd", "absolute path"),
        ("../../../outside.tar", "outside the index's folder"),
        ("a/../../outside.tar", "outside the index's folder"),
        ("a/escape.tar", "outside the index's folder"),  # a symbolic link out of the folder
        ("file:///etc/passwd", "outside the index's folder"),
        ("ftp://example.com/a.tar", "scheme 'ftp'"),
        ("", "non-empty string"),
    ]
    for url, why in hostile:
        entry = {"url": url, "domain": "b", "nsamples": 2, "bytes": 1, "sha256": "0" * 64}
        index_file.write_text(json.dumps(dict(good, shards=good["shards"] + [entry])))
        # The loader refuses while being built, before any worker process exists; an entry of
        # the other domain counts too (one hostile entry: the index is not trusted).
        with pytest.raises(ValueError) as e:
            UnpairedLoader(out, out, batch_size=2, image_size=SIZE, num_workers=2)
        msg = str(e.value)
        assert str(index_file) in msg and json.dumps(url) in msg and why in msg, msg
        with pytest.raises(ValueError, match="refused"):
            resolve_shards(str(index_file), "a")
        problems, _ = shards.verify(str(out))
        assert any(why in p and str(index_file) in p for p in problems), problems
    assert not marker.exists()

    # Entries that stay inside the folder are fine, written in any of the allowed forms.
    entries = [dict(s) for s in good["shards"]]
    entries[0]["url"] = "a/../a/a-000000.tar"
    entries[1]["url"] = f"file://{out}/a/a-000001.tar"
    index_file.write_text(json.dumps(dict(good, shards=entries)))
    urls = [s.url for s in resolve_shards(str(out), "a")]
    assert urls == [os.path.realpath(out / "a" / f"a-00000{i}.tar") for i in range(2)]

    # A pipe: command given directly by the user still runs (and the marker would show it).
    shard_a = out / "a" / "a-000000.tar"
    loader = UnpairedLoader([f"pipe:touch {marker}; cat {shard_a}"], out, batch_size=2, image_size=SIZE,
                            num_workers=2)
    next(iter(loader))
    assert marker.exists()


# ----------------------------------------------------------------------------- 3. stale shards


def test_sources_regenerated_with_same_names_and_sizes_are_rewritten(tmp_path, capsys):
    def images(seed):  # uncompressed PNGs of one size: same byte count, different content
        return {f"{i}.png": encode(noise(seed + i), "PNG", compress_level=0) for i in range(3)}

    a = folder(tmp_path / "A", images(0))
    b = folder(tmp_path / "B", {f"{i}.jpg": encode(noise(50 + i), "JPEG") for i in range(2)})
    out = tmp_path / "out"
    assert make(a, b, out) == 0
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in a.iterdir()}
    new = images(100)
    folder(a, new)
    # One file even gets its old mtime back (as `cp -p` or `rsync -t` would leave it).
    os.utime(a / "0.png", ns=(before["0.png"][1], before["0.png"][1]))
    assert {p.name: p.stat().st_size for p in a.iterdir()} == {k: v[0] for k, v in before.items()}
    capsys.readouterr()

    assert make(a, b, out) == 0
    assert "1 shards already complete" in capsys.readouterr().out  # domain B's; A's was rewritten
    manifest, _ = outputs(out)
    stored = {os.path.basename(m["source"]): m["sha256"] for m in manifest if m["domain"] == "a"}
    assert stored == {name: hashlib.sha256(data).hexdigest() for name, data in new.items()}
    problems, _ = shards.verify(str(out))
    assert problems == []
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / s["url"]) for s in index["shards"] if s["domain"] == "a"]
    read = {json.loads(s["json"])["source"]: s["png"] for s in wds.WebDataset(urls, shardshuffle=False)}
    assert {os.path.basename(k): v for k, v in read.items()} == new

    assert make(a, b, out) == 0  # nothing changed since: everything is skipped
    assert "2 shards already complete" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 5. symlink loops


def test_symlink_loops_end_and_a_file_reached_twice_is_one_input(tmp_path):
    a = folder(tmp_path / "A", {"img0.png": encode(noise(1), "PNG"), "sub/img1.png": encode(noise(2), "PNG")})
    os.symlink("..", a / "sub" / "loop")  # back up to A: a cycle
    os.symlink("img0.png", a / "alias.png")  # the same file under a second name
    os.link(a / "sub" / "img1.png", a / "hard.png")  # and a hard link
    inputs = list(itertools.islice(list_inputs(str(a)), 1000))  # bounded, should a regression loop
    assert len(inputs) == 2, [i.path for i in inputs]
    assert {os.stat(i.path).st_ino for i in inputs} == {os.stat(a / "img0.png").st_ino,
                                                        os.stat(a / "sub" / "img1.png").st_ino}

    b = folder(tmp_path / "B", {"x.png": encode(noise(3), "PNG")})
    out = tmp_path / "out"
    assert make(a, b, out) == 0  # no duplicate was quarantined: each file is one input
    manifest, quarantine = outputs(out)
    assert sum(m["domain"] == "a" for m in manifest) == 2 and quarantine == []


# ----------------------------------------------------------------------------- 6. OUT inside a source


def test_out_inside_a_source_folder_is_not_read_back_and_reruns_settle(tmp_path, capsys):
    a = folder(tmp_path / "A", {f"{i}.jpg": encode(noise(i), "JPEG") for i in range(3)})
    b = folder(tmp_path / "B", {f"{i}.jpg": encode(noise(9 + i), "JPEG") for i in range(2)})
    out = a / "shards"
    results = []
    for _ in range(3):
        rc = make(a, b, out)
        manifest, quarantine = outputs(out)
        results.append((rc, sorted((m["source"], m["sha256"]) for m in manifest), quarantine))
    assert results[0] == results[1] == results[2]
    rc, manifest, quarantine = results[0]
    assert rc == 0 and quarantine == [] and len(manifest) == 5
    assert not any(src.startswith(str(out)) for src, _ in manifest)
    assert "2 shards already complete" in capsys.readouterr().out

    # A source that is OUT, or inside it, is refused with a clear reason.
    rc = make(a, out, out)
    err = capsys.readouterr().err
    assert rc == 1 and "source B" in err and "inside it" in err and str(out) in err


# ----------------------------------------------------------------------------- 7. two writers


HOLD = """
import sys, time
from pipeline import shards
with shards.writer_lock(sys.argv[1], "make shards"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_second_writer_on_one_out_exits_2_naming_the_holder(tmp_path, capsys):
    a = folder(tmp_path / "A", {f"{i}.jpg": encode(noise(i), "JPEG") for i in range(4)})
    b = folder(tmp_path / "B", {f"{i}.jpg": encode(noise(9 + i), "JPEG") for i in range(2)})
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / ".lock")], cwd=ROOT, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in ([], ["--part", "0/2"]):
            rc = make(a, b, out, *args)
            err = capsys.readouterr().err
            assert rc == shards.EXIT_LOCKED == 2, err
            assert f"pid {holder.pid} on host {socket.gethostname()}, started " in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing was written
    finally:
        holder.communicate("", timeout=30)
    assert make(a, b, out) == 0  # the lock goes with its holder

    # Parts of one job share OUT, each owning its part; merge needs OUT to itself.
    parts = tmp_path / "parts"
    with shards.writer_lock(str(parts / "parts" / "1-of-2" / ".lock"), "make shards --part 1/2"):
        assert make(a, b, parts, "--part", "0/2", "--max-per-shard", "1") == 0
        assert make(a, b, parts, "--part", "1/2", "--max-per-shard", "1") == 2
        assert "parts/1-of-2 is being written by another process" in capsys.readouterr().err
    with shards.writer_lock(str(parts / ".lock"), "make shards --part 1/2", shared=True):
        assert make(a, b, parts, "--part", "1/2", "--max-per-shard", "1") == 0
        assert shards.main(["merge", str(parts)]) == 2
    assert shards.main(["merge", str(parts)]) == 0
    assert shards.verify(str(parts))[0] == []


# ----------------------------------------------------------------------------- 9. bombs inside shards


def test_loader_skips_images_over_the_pixel_cap_before_decoding(tmp_path):
    def shard(path, members):
        path.parent.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(path)) as sink:
            for key, ext, data in members:
                sink.write({"__key__": key, ext: data})

    normal = [(f"n{i}", "jpg", encode(noise(i), "JPEG")) for i in range(6)]
    big = ("big", "png", encode(Image.new("RGB", (2000, 1500)), "PNG"))  # 3 MP, a few KB
    bomb = ("bomb", "png", png_header_only(20000, 20000))  # 400 MP declared in 80 bytes
    shard(tmp_path / "a.tar", normal + [big, bomb])
    shard(tmp_path / "b.tar", normal)
    a, b = [str(tmp_path / "a.tar")], [str(tmp_path / "b.tar")]

    capped = UnpairedLoader(a, b, batch_size=4, image_size=SIZE, num_workers=2, max_pixels=1_000_000)
    it = iter(capped)
    for _ in range(8):
        next(it)
    skipped = capped.stats["skipped"]
    assert skipped["too_many_pixels"] >= 2 and skipped["corrupt_sample"] == 0, skipped

    # Default cap: the bomb is still skipped unread, the 3 MP image is used.
    plain = UnpairedLoader(a, b, batch_size=4, image_size=SIZE, num_workers=0)
    it = iter(plain)
    batches = [next(it) for _ in range(8)]
    skipped = plain.stats["skipped"]
    assert skipped["too_many_pixels"] >= 1 and skipped["corrupt_sample"] == 0, skipped
    assert plain.stats["samples"] == 8 * 8
    assert any((x == 0).all() for batch in batches for x in batch["a"])  # the black 3 MP image


# ----------------------------------------------------------------------------- 11. FIFOs, devices, huge files


def test_fifo_device_and_oversized_inputs_are_quarantined_not_read(tmp_path):
    imgs = folder(tmp_path / "imgs", {"good.png": encode(noise(1), "PNG"),
                                      "big.bin": os.urandom(3 * 1024 * 1024)})
    os.mkfifo(imgs / "pipe.png")
    (tmp_path / "a.txt").write_text("imgs/good.png\nimgs/pipe.png\n/dev/zero\nimgs/big.bin\n")
    b = folder(tmp_path / "B", {"x.png": encode(noise(2), "PNG")})
    os.mkfifo(b / "fifo in a folder.jpg")  # a folder walk reports it too, rather than skip it silently
    out = tmp_path / "out"
    # A regression blocks on the FIFO or reads /dev/zero forever: the timeout turns that into a failure.
    r = cli("--src-a", str(tmp_path / "a.txt"), "--src-b", str(b), "--out", str(out), "--no-progress",
            "--max-file-mb", "2", timeout=60)
    assert r.returncode == 3, r.stderr
    manifest, quarantine = outputs(out)
    assert sorted(os.path.basename(m["source"]) for m in manifest) == ["good.png", "x.png"]
    reasons = {os.path.basename(q["source"]): q["reason"] for q in quarantine}
    assert reasons == {
        "pipe.png": "not a regular file: a FIFO (named pipe)",
        "zero": "not a regular file: a character device",
        "big.bin": f"too large: {3 * 1024 * 1024} bytes > {2 * 1024 * 1024} bytes (--max-file-mb)",
        "fifo in a folder.jpg": "not a regular file: a FIFO (named pipe)",
    }
    assert "not a regular file: 3" in r.stdout and "too large: 1" in r.stdout  # the summary counts them


# ----------------------------------------------------------------------------- 13, 14. orientation, 16 bit


def test_exif_rotation_is_applied_once_and_16_bit_is_stored_as_8_bit(tmp_path):
    rgb = noise(7, w=48, h=32)
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    sideways = encode(rgb, "JPEG", quality=95, exif=exif.tobytes())
    exif[ORIENTATION] = 1
    upright = encode(rgb, "JPEG", quality=95, exif=exif.tobytes())
    deep = np.random.default_rng(3).integers(0, 65536, (20, 24, 3), dtype=np.uint16)

    c = check_image(sideways)
    stored = Image.open(io.BytesIO(c.data))
    assert (c.width, c.height, c.ext, c.converted) == (32, 48, "jpg", True)
    assert stored.size == (32, 48) and stored.getexif().get(ORIENTATION) is None
    want = np.asarray(Image.open(io.BytesIO(sideways)).transpose(Image.Transpose.ROTATE_270), np.int16)
    assert np.abs(np.asarray(stored, np.int16) - want).mean() < 3
    assert check_image(upright).data == upright  # orientation 1: original bytes kept

    c = check_image(png16(deep))
    stored = Image.open(io.BytesIO(c.data))
    assert c.converted and c.ext == "png" and c.data[24] == 8  # IHDR bit depth
    assert np.array_equal(np.asarray(stored), (deep >> 8).astype(np.uint8))

    # Through make shards: the manifest and the sample json carry the upright size.
    a = folder(tmp_path / "A", {"sideways.jpg": sideways, "deep.png": png16(deep), "upright.jpg": upright})
    b = folder(tmp_path / "B", {"x.png": encode(noise(2), "PNG")})
    out = tmp_path / "out"
    assert make(a, b, out) == 0
    manifest, _ = outputs(out)
    sizes = {os.path.basename(m["source"]): (m["width"], m["height"]) for m in manifest}
    assert sizes == {"sideways.jpg": (32, 48), "deep.png": (24, 20), "upright.jpg": (48, 32), "x.png": (48, 40)}
    with tarfile.open(out / "a" / "a-000000.tar") as tar:
        for m in tar:
            data = tar.extractfile(m).read()
            if m.name.endswith((".jpg", ".png")):
                im = Image.open(io.BytesIO(data))
                assert im.getexif().get(ORIENTATION, 1) == 1 and im.mode == "RGB"
                assert data[:8] != b"\x89PNG\r\n\x1a\n" or data[24] == 8

