"""make shards: validation, conversion, dedupe, crash-resume, verify, parts + merge, read-back."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline import shards, shardwriter
from pipeline.demo import write_corpus
from pipeline.images import Rejected, check_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "pipeline.shards", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def popen(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "pipeline.shards", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_rgb(seed: int, w=40, h=30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def bomb_png(side=100_000) -> bytes:
    """A ~80-byte PNG that declares side x side RGB pixels."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def read_outputs(out):
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    quarantine = pq.read_table(os.path.join(out, "quarantine.parquet")).to_pylist()
    return index, manifest, quarantine


def as_set(rows, cols):
    return {tuple(r[c] for c in cols) for r in rows}


# ----------------------------------------------------------------------------- images


def test_check_image_rejects_each_bad_kind_with_its_reason():
    jpg = encode(noise_rgb(0), "JPEG")
    cases = {
        b"": "not an image",
        b"just some text, named .jpg": "not an image",
        jpg[: len(jpg) // 2]: "truncated",
        bomb_png(): "larger than --max-pixels",
        encode(Image.new("RGB", (2, 2)), "PNG"): "smaller than --min-side",
    }
    for data, reason in cases.items():
        with pytest.raises(Rejected) as e:
            check_image(data, min_side=16, max_pixels=10_000_000)
        assert e.value.reason.startswith(reason), (reason, e.value.reason)
    assert len(bomb_png()) < 200


def test_check_image_keeps_rgb_originals_and_converts_the_rest():
    rgb = noise_rgb(1)
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        data = encode(rgb, fmt)
        c = check_image(data)
        assert (c.data == data, c.ext, c.converted) == (True, ext, False)

    gray = rgb.convert("L")
    c = check_image(encode(gray, "PNG"))
    out = np.asarray(Image.open(io.BytesIO(c.data)))
    assert c.converted and c.ext == "png" and out.shape == (30, 40, 3)
    assert (out == np.asarray(gray)[..., None]).all()

    rgba = np.dstack([np.asarray(rgb), np.full((30, 40), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # left half transparent -> white
    c = check_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    out = np.asarray(Image.open(io.BytesIO(c.data)))
    assert c.ext == "png" and (out[:, :20] == 255).all() and (out[:, 20:] == np.asarray(rgb)[:, 20:]).all()

    cmyk = rgb.convert("CMYK")
    c = check_image(encode(cmyk, "JPEG", quality=100))
    out = Image.open(io.BytesIO(c.data))
    assert c.ext == "jpg" and out.mode == "RGB" and c.converted
    assert np.abs(np.asarray(out, np.int16) - np.asarray(rgb, np.int16)).mean() < 12

    c = check_image(encode(rgb.convert("P"), "PNG"))
    assert Image.open(io.BytesIO(c.data)).mode == "RGB" and c.ext == "png"
    c = check_image(encode(gray, "JPEG"))
    assert Image.open(io.BytesIO(c.data)).mode == "RGB" and c.ext == "jpg"


# ----------------------------------------------------------------------------- edge cases via the CLI


def test_cli_edge_cases_quarantine_convert_and_dedupe(tmp_path):
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    (a / "sub dir").mkdir(parents=True)
    b.mkdir()
    good = encode(noise_rgb(2), "JPEG")
    jpg = encode(noise_rgb(3), "JPEG")
    files = {
        "photo one.v2.jpg": good,
        "sub dir/dup copy.jpg": good,  # exact duplicate, listed after the original
        "empty.jpg": b"",
        "text.jpg": b"hello, not an image\n",
        "truncated.jpg": jpg[: len(jpg) // 2],
        "bomb.png": bomb_png(),
        "tiny.png": encode(Image.new("RGB", (2, 2), (9, 9, 9)), "PNG"),
        "gray.png": encode(noise_rgb(4).convert("L"), "PNG"),
        "alpha.png": encode(noise_rgb(5).convert("RGBA"), "PNG"),
        "cmyk.jpg": encode(noise_rgb(6).convert("CMYK"), "JPEG"),
        "no extension": encode(noise_rgb(7), "WEBP"),
    }
    for name, data in files.items():
        (a / name).write_bytes(data)
    for i in range(3):
        (b / f"m {i}.png").write_bytes(encode(noise_rgb(10 + i), "PNG"))

    r = cli("--src-a", str(a), "--src-b", str(b), "--out", str(out), "--max-pixels", "10000000", "--no-progress")
    assert r.returncode == 3, r.stderr
    index, manifest, quarantine = read_outputs(str(out))
    reasons = {os.path.relpath(q["source"], a): q["reason"] for q in quarantine}
    good_key = next(m["key"] for m in manifest if m["source"].endswith("photo one.v2.jpg"))
    assert reasons["sub dir/dup copy.jpg"] == f"duplicate of {good_key}"
    expect = {"empty.jpg": "not an image", "text.jpg": "not an image", "truncated.jpg": "truncated",
              "bomb.png": "larger than --max-pixels", "tiny.png": "smaller than --min-side"}
    assert set(reasons) == set(expect) | {"sub dir/dup copy.jpg"}
    for name, prefix in expect.items():
        assert reasons[name].startswith(prefix), (name, reasons[name])

    stored = {os.path.basename(m["source"]): m for m in manifest if m["domain"] == "a"}
    assert set(stored) == {"photo one.v2.jpg", "gray.png", "alpha.png", "cmyk.jpg", "no extension"}
    assert stored["photo one.v2.jpg"]["sha256"] == hashlib.sha256(good).hexdigest()  # original bytes kept
    assert stored["no extension"]["format"] == "webp"
    assert (stored["gray.png"]["format"], stored["cmyk.jpg"]["format"]) == ("png", "jpeg")
    assert all("." not in m["key"] for m in manifest) and len({m["key"] for m in manifest}) == len(manifest)

    # Stock webdataset reads the samples back; members of a sample are adjacent.
    urls = [str(out / s["url"]) for s in index["shards"] if s["domain"] == "a"]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        img_ext = next(k for k in ("jpg", "png", "webp") if k in sample)
        img = Image.open(io.BytesIO(sample[img_ext]))
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        assert hashlib.sha256(sample[img_ext]).hexdigest() == meta["sha256"]
        seen[os.path.basename(meta["source"])] = sample["__key__"]
    assert seen == {k: v["key"] for k, v in stored.items()}
    names = tarfile.open(urls[0]).getnames()
    assert [n.split(".")[0] for n in names[::2]] == [n.split(".")[0] for n in names[1::2]]


def test_list_file_and_parquet_sources(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        (imgs / f"{i}.png").write_bytes(encode(noise_rgb(20 + i), "PNG"))
    (tmp_path / "a.txt").write_text("# domain A\nimgs/0.png\n\nimgs/1.png\nimgs/missing.png\nimgs/0.png\n")
    pq.write_table(pa.table({"path": [str(imgs / "2.png"), str(imgs / "3.png")]}), tmp_path / "b.parquet")
    out = tmp_path / "out"
    rc = shards.main(["--src-a", str(tmp_path / "a.txt"), "--src-b", str(tmp_path / "b.parquet"),
                      "--out", str(out), "--no-progress"])
    assert rc == 3
    _, manifest, quarantine = read_outputs(str(out))
    assert sorted((m["domain"], os.path.basename(m["source"])) for m in manifest) == [
        ("a", "0.png"), ("a", "1.png"), ("b", "2.png"), ("b", "3.png")]
    key0 = next(m["key"] for m in manifest if m["source"] == str(imgs / "0.png"))
    assert sorted((os.path.basename(q["source"]), q["reason"]) for q in quarantine) == [
        ("0.png", f"duplicate of {key0}"), ("missing.png", "unreadable: no such file")]

    pq.write_table(pa.table({"file": ["x"]}), tmp_path / "bad.parquet")
    rc = shards.main(["--src-a", str(tmp_path / "a.txt"), "--src-b", str(tmp_path / "bad.parquet"),
                      "--out", str(tmp_path / "out2"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "no 'path' column" in err and err.count("\n") == 1


def test_fsspec_url_source(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for d in ("a", "b"):
        for i in range(3):
            fs.pipe(f"/shards-test/{d}/img {i}.jpg", encode(noise_rgb(30 + i + (d == "b") * 10), "JPEG"))
    out = tmp_path / "out"
    rc = shards.main(["--src-a", "memory://shards-test/a", "--src-b", "memory://shards-test/b",
                      "--out", str(out), "--no-progress"])
    assert rc == 0
    _, manifest, _ = read_outputs(str(out))
    assert sorted(m["source"] for m in manifest if m["domain"] == "a") == [
        f"memory:///shards-test/a/img {i}.jpg" for i in range(3)]
    fs.rm("/shards-test", recursive=True)


def test_failures_exit_nonzero_with_one_line_reason(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    (good / "x.png").write_bytes(encode(noise_rgb(40), "PNG"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not an image")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")

    def run(a, b, out):
        rc = shards.main(["--src-a", str(a), "--src-b", str(b), "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ")
        return rc, err

    rc, err = run(good, tmp_path / "nowhere", tmp_path / "o1")
    assert rc == 1 and "source B" in err and "no such file" in err
    rc, err = run(good, good, blocker / "out")
    assert rc == 1 and "cannot write to OUT" in err
    rc, err = run(good, bad, tmp_path / "o3")
    assert rc == 1 and "domain B: no valid image among 1 inputs" in err


# ----------------------------------------------------------------------------- a real corpus


N_TRAIN = 1200
SHARD_ARGS = ["--max-per-shard", "100", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Demo corpus (32 px) plus cross-shard duplicates and one bad file in domain A."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(str(root), N_TRAIN, 0, size=32, seed=0, progress=False)
    extra = root / "trainA" / "zz extra"
    extra.mkdir()
    for i in (1, 250, 777):
        shutil.copy(root / "trainA" / f"{i:06d}.jpg", extra / f"copy of {i:06d}.v2.jpg")
    (extra / "notes.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = cli("--src-a", str(corpus / "trainA"), "--src-b", str(corpus / "trainB"), "--out", str(out),
            "--workers", "2", *SHARD_ARGS)
    assert r.returncode == 3, r.stderr
    return out, r


def test_thousands_of_images_two_workers_read_back_with_stock_tools(corpus, reference):
    out, r = reference
    index, manifest, quarantine = read_outputs(str(out))
    assert "stored 2400 of 2404 inputs" in r.stdout and "rejected 4" in r.stdout
    assert index["totals"]["a"]["samples"] == N_TRAIN and index["totals"]["b"]["samples"] == N_TRAIN
    assert index["totals"]["a"]["shards"] == 13 and index["totals"]["b"]["shards"] == 12
    assert len(manifest) == 2 * N_TRAIN and len({m["key"] for m in manifest}) == len(manifest)
    assert len({(m["domain"], m["sha256"]) for m in manifest}) == len(manifest)  # no stored duplicate
    dups = [q for q in quarantine if q["reason"].startswith("duplicate of ")]
    assert len(dups) == 3 and len(quarantine) == 4
    by_source = {m["source"]: m["key"] for m in manifest}
    for q in dups:
        original = str(corpus / "trainA" / os.path.basename(q["source"])[len("copy of "):].replace(".v2", ""))
        assert q["reason"] == f"duplicate of {by_source[original]}"

    for domain in ("a", "b"):
        entries = [s for s in index["shards"] if s["domain"] == domain]
        urls = [str(out / s["url"]) for s in entries]
        n = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False))
        assert n == index["totals"][domain]["samples"] == sum(m["domain"] == domain for m in manifest)
        for s in entries:
            listing = subprocess.run(["tar", "-tf", str(out / s["url"])], capture_output=True, text=True,
                                     check=True).stdout.split()
            assert len(listing) == 2 * s["nsamples"]
            assert s["nsamples"] == sum(m["shard"] == s["url"] for m in manifest)
            assert hashlib.sha256((out / s["url"]).read_bytes()).hexdigest() == s["sha256"]
    assert all(os.path.basename(s["url"]).startswith(s["domain"] + "-") for s in index["shards"])


def test_rerun_is_idempotent(corpus, reference):
    out, _ = reference
    before = {p: os.stat(p).st_mtime_ns for p in map(str, out.glob("*/*.tar"))}
    index_before = (out / "index.json").read_bytes()
    r = cli("--src-a", str(corpus / "trainA"), "--src-b", str(corpus / "trainB"), "--out", str(out),
            "--workers", "2", *SHARD_ARGS)
    assert r.returncode == 3 and "25 shards already complete" in r.stdout
    assert {p: os.stat(p).st_mtime_ns for p in map(str, out.glob("*/*.tar"))} == before
    assert (out / "index.json").read_bytes() == index_before


def test_new_settings_replan_then_verify_catches_one_flipped_byte(corpus, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    # Bigger shards over an existing OUT: every shard is rewritten, the extra old ones removed.
    r = cli("--src-a", str(corpus / "trainA"), "--src-b", str(corpus / "trainB"), "--out", str(out),
            "--max-per-shard", "400", "--no-progress")
    assert r.returncode == 3, r.stderr
    index, manifest, _ = read_outputs(str(out))
    assert [index["totals"][d]["shards"] for d in "ab"] == [4, 3]
    assert sorted(p.name for p in out.glob("a/*")) == [f"a-{i:06d}.tar" for i in range(4)]
    ref_manifest = read_outputs(str(reference[0]))[1]
    assert as_set(manifest, ["key", "sha256", "source"]) == as_set(ref_manifest, ["key", "sha256", "source"])
    r = cli("verify", str(out))
    assert r.returncode == 0 and "0 bad" in r.stdout, r.stderr
    shard = out / "a" / "a-000003.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    r = cli("verify", str(out))
    assert r.returncode == 1
    bad = [line for line in r.stderr.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and bad[0].startswith("BAD a/a-000003.tar: ") and "sha256" in bad[0]


def test_kill_9_mid_run_then_rerun_equals_uninterrupted(corpus, reference, tmp_path):
    out = tmp_path / "out"
    args = ["--src-a", str(corpus / "trainA"), "--src-b", str(corpus / "trainB"), "--out", str(out),
            "--workers", "2", *SHARD_ARGS]
    proc = popen(*args)
    deadline = time.time() + 60
    while len(list(out.glob(".records/a/*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists()
    assert len(list(out.glob(".records/*/*.json"))) < 25

    r = cli(*args)
    assert r.returncode == 3, r.stderr
    assert "shards already complete and skipped" in r.stdout
    ref_index, ref_manifest, ref_quarantine = read_outputs(str(reference[0]))
    index, manifest, quarantine = read_outputs(str(out))
    cols = shards.MANIFEST_COLUMNS
    assert as_set(manifest, cols) == as_set(ref_manifest, cols) and len(manifest) == len(ref_manifest)
    assert as_set(quarantine, shards.QUARANTINE_COLUMNS) == as_set(ref_quarantine, shards.QUARANTINE_COLUMNS)
    assert index == ref_index  # same shards, byte for byte (sha256 per shard)
    assert not list(out.glob("*/.*.tmp*")) and cli("verify", str(out)).returncode == 0


def test_three_parts_as_processes_then_merge_equal_single_run(corpus, reference, tmp_path):
    out = tmp_path / "out"
    procs = [popen("--src-a", str(corpus / "trainA"), "--src-b", str(corpus / "trainB"), "--out", str(out),
                   "--part", f"{i}/3", *SHARD_ARGS) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, 3), err
    assert not (out / "index.json").exists()
    parts = [json.loads((out / "parts" / f"{i}-of-3" / "index.json").read_text()) for i in range(3)]
    assert sorted(s["url"] for p in parts for s in p["shards"]) == sorted(
        s["url"] for s in read_outputs(str(reference[0]))[0]["shards"])

    hidden = out / "parts" / "2-of-3" / "index.json"
    hidden.rename(hidden.with_suffix(".hidden"))
    r = cli("merge", str(out))
    assert r.returncode == 1 and "parts [2] of 3 have not finished" in r.stderr
    hidden.with_suffix(".hidden").rename(hidden)

    r = cli("merge", str(out))
    assert r.returncode == 3, r.stderr
    ref_index, ref_manifest, ref_quarantine = read_outputs(str(reference[0]))
    index, manifest, quarantine = read_outputs(str(out))
    assert as_set(manifest, shards.MANIFEST_COLUMNS) == as_set(ref_manifest, shards.MANIFEST_COLUMNS)
    assert len(manifest) == len(ref_manifest)
    assert as_set(quarantine, shards.QUARANTINE_COLUMNS) == as_set(ref_quarantine, shards.QUARANTINE_COLUMNS)
    assert index == ref_index
    assert cli("verify", str(out)).returncode == 0


def test_tar_writer_is_byte_identical_to_tarfile(tmp_path):
    members = [("k1.jpg", os.urandom(1000)), ("k1.json", b'{"a": 1}'), ("k2.webp", os.urandom(512)),
               ("k2.json", b"")]
    nbytes, sha = shardwriter.write_tar(str(tmp_path / "x.tar"), iter(members))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), shardwriter.TAR_MTIME, 0o444
            tar.addfile(info, io.BytesIO(data))
    ours = (tmp_path / "x.tar").read_bytes()
    assert ours == buf.getvalue() and nbytes == len(ours) and sha == hashlib.sha256(ours).hexdigest()
    assert not list(tmp_path.glob(".*"))  # the temporary name is gone

    def failing():
        yield "k1.jpg", b"x"
        raise RuntimeError("a member could not be read")

    with pytest.raises(RuntimeError):
        shardwriter.write_tar(str(tmp_path / "y.tar"), failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar"]  # no half file, no temporary left


# ----------------------------------------------------------------------------- the command line


def test_cli_subcommands_write_is_the_default(tmp_path, capsys):
    a = tmp_path / "A"
    b = tmp_path / "B"
    for d, seed in ((a, 60), (b, 70)):
        d.mkdir()
        for i in range(2):
            (d / f"{i}.png").write_bytes(encode(noise_rgb(seed + i), "PNG"))
    args = ["--src-a", str(a), "--src-b", str(b), "--no-progress"]
    r_default = cli(*args, "--out", str(tmp_path / "o1"))
    r_write = cli("write", *args, "--out", str(tmp_path / "o2"))
    for r in (r_default, r_write):
        assert r.returncode == 0 and r.stdout.startswith("shards: stored 4 of 4 inputs (a: 2, b: 2)"), r.stderr
    assert (tmp_path / "o1" / "index.json").read_bytes() == (tmp_path / "o2" / "index.json").read_bytes()
    assert shards.main(["verify", str(tmp_path / "o2")]) == 0 and "0 bad" in capsys.readouterr().out

    def exits(*argv) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as e:
            shards.main(list(argv))
        out, err = capsys.readouterr()
        return e.value.code, out, err

    code, top, _ = exits("--help")
    assert code == 0 and all(text in top for text in ("verify", "merge", "write", "--src-a", "--max-file-mb"))
    assert "usage: python -m pipeline.shards [-h] --src-a SRC_A" in exits("write", "--help")[1]
    assert "usage: python -m pipeline.shards verify [-h] out" in exits("verify", "-h")[1]
    for bad in ([], ["--src-a", str(a)], ["write", "--part", "3/2", *args, "--out", "x"], ["verify"],
                ["merge", "x", "y"]):
        code, _, err = exits(*bad)
        assert code == 2 and "error:" in err, (bad, err)
    assert "usage: python -m pipeline.shards [-h] --src-a" in exits()[2]  # as before subcommands
    assert "usage: python -m pipeline.shards [-h] --src-a" in exits(*args, "--out", "x", "--bogus")[2]
    assert "usage: python -m pipeline.shards merge [-h] out" in exits("merge", "x", "y")[2]
