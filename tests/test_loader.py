"""UnpairedLoader on small real tar shards written with webdataset.TarWriter in the
contract's format (OUT/a/a-000000.tar ..., OUT/index.json)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.loader import CACHE_SUBDIR, UnpairedLoader, resolve_shards

SIZE = 32  # crop size; stored images are 40x48 so resize and crop really happen
BLUE = {"a": 60, "b": 200}


def make_image(domain: str, code: int) -> bytes:
    """Red channel carries the sample code, green a gradient (crops and flips show), blue the domain."""
    h, w = 40, 48
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 8 * code + 4
    img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 2] = BLUE[domain]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_shard(path: str, domain: str, codes, corrupt=()) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wds.TarWriter(path) as sink:
        for code in codes:
            data = b"\xff\xd8garbage-not-a-jpeg" if code in corrupt else make_image(domain, code)
            meta = {"source": f"gen/{code}", "width": 48, "height": 40,
                    "sha256": hashlib.sha256(data).hexdigest(), "domain": domain, "format": "jpeg"}
            sink.write({"__key__": f"{domain}{code:06d}", "jpg": data, "json": json.dumps(meta).encode()})


def write_out(root, shards_per_domain=4, per_shard=8, corrupt=()) -> str:
    """An OUT directory as `make shards` writes it; codes 0..31 spread over the shards."""
    out = str(root)
    entries = []
    for d in ("a", "b"):
        for s in range(shards_per_domain):
            rel = f"{d}/{d}-{s:06d}.tar"
            codes = range(s * per_shard, (s + 1) * per_shard)
            write_shard(os.path.join(out, rel), d, codes, corrupt if d == "a" else ())
            with open(os.path.join(out, rel), "rb") as f:
                data = f.read()
            entries.append({"url": rel, "domain": d, "nsamples": per_shard, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"version": 1, "shards": entries, "totals": {}}, f)
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return write_out(tmp_path_factory.mktemp("shards"))


def codes(x) -> list[int]:
    """Sample codes of a uint8 batch, read back from the red channel."""
    red = x[:, 0].double().mean(dim=(1, 2)).numpy()
    return [int(round((r - 4) / 8)) for r in red]


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(b1, b2) -> bool:
    return all(x["a"].equal(y["a"]) and x["b"].equal(y["b"]) for x, y in zip(b1, b2, strict=True))


def test_shapes_range_and_domains(out):
    (batch,) = take(UnpairedLoader(out, out, batch_size=4, image_size=SIZE, num_workers=0), 1)
    assert set(batch) == {"a", "b"}
    for d in ("a", "b"):
        x = batch[d]
        assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.uint8  # normalised on the device
        assert x[:, 1].float().std() > 0.2 * 127.5  # the gradient survived: real image content, not a constant
        blue = x[:, 2].float().mean().item()
        assert abs(blue - BLUE[d]) < 6, (d, blue)


def test_colour_jitter_keeps_rgb_order(out):
    loader = UnpairedLoader(out, out, batch_size=4, image_size=SIZE, num_workers=0,
                            augment={"color_jitter": 0.02, "jitter_p": 1.0})
    batches = take(loader, 2)
    plain = take(UnpairedLoader(out, out, batch_size=4, image_size=SIZE, num_workers=0), 2)
    for b, p in zip(batches, plain):
        blue = b["b"][:, 2].float().mean().item()
        assert abs(blue - BLUE["b"]) < 12, blue
        assert not b["a"].equal(p["a"])  # the jitter changed something


def test_a_and_b_independent(out):
    # Both domains have identical shard layouts, so streams seeded alike would match code for code.
    batches = take(UnpairedLoader(out, out, batch_size=4, image_size=SIZE, num_workers=0), 10)
    ca = [c for b in batches for c in codes(b["a"])]
    cb = [c for b in batches for c in codes(b["b"])]
    assert set(ca) <= set(range(32)) and set(cb) <= set(range(32))
    assert sum(x == y for x, y in zip(ca, cb)) < len(ca) // 4


def test_determinism(out):
    kw = dict(batch_size=4, image_size=SIZE, num_workers=2)
    first = take(UnpairedLoader(out, out, seed=3, **kw), 20)
    again = take(UnpairedLoader(out, out, seed=3, **kw), 20)
    other = take(UnpairedLoader(out, out, seed=4, **kw), 20)
    assert same(first, again)
    assert not any(x["a"].equal(y["a"]) for x, y in zip(first, other))


def test_augmentation_varies_and_eval_is_centre_crop(out):
    kw = dict(batch_size=8, image_size=SIZE, num_workers=0)
    train = take(UnpairedLoader(out, out, **kw), 4)
    green = [x[1].float().mean(dim=0) for b in train for x in b["a"]]  # gradient row: flipped or not
    slopes = {bool(g[-1] > g[0]) for g in green}
    assert slopes == {True, False}  # some flipped, some not
    ev = take(UnpairedLoader(out, out, augment={"train": False}, **kw), 2)
    rows = [x[1].float().mean(dim=0) for b in ev for x in b["a"]]
    assert all(r[-1] > r[0] for r in rows)
    assert all(r.sub(rows[0]).abs().max() < 0.05 * 127.5 for r in rows)  # always the same centre crop


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_exact(out, workers):
    kw = dict(batch_size=4, image_size=SIZE, num_workers=workers, seed=1)
    straight = take(UnpairedLoader(out, out, **kw), 17)
    first = UnpairedLoader(out, out, **kw)
    take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = UnpairedLoader(out, out, **kw)
    resumed.load_state_dict(state)
    nxt = take(resumed, 10)
    assert same(nxt, straight[7:])
    assert not same(nxt, straight[:10])
    assert resumed.stats["batches"] == 17 and resumed.stats["samples"] == 17 * 8


def test_resume_other_world_size_does_not_restart(out):
    kw = dict(batch_size=4, image_size=SIZE, seed=1)
    old = UnpairedLoader(out, out, num_workers=2, rank=0, world_size=1, **kw)
    take(old, 9)
    state = old.state_dict()
    top = max(p[0] for v in state["positions"].values() for p in v.values())
    new = UnpairedLoader(out, out, num_workers=0, rank=1, world_size=2, **kw)
    new.load_state_dict(state)
    assert all(p == (top + 1, 0) for p in new._positions[0].values())
    fresh = take(UnpairedLoader(out, out, num_workers=0, rank=1, world_size=2, **kw), 5)
    cont = take(new, 5)
    assert not any(x["a"].equal(y["a"]) for x, y in zip(fresh, cont))


def test_two_ranks_differ(out):
    kw = dict(batch_size=4, image_size=SIZE, num_workers=0, world_size=2)
    r0 = take(UnpairedLoader(out, out, rank=0, **kw), 8)
    r1 = take(UnpairedLoader(out, out, rank=1, **kw), 8)
    c0 = [codes(b["a"]) + codes(b["b"]) for b in r0]
    c1 = [codes(b["a"]) + codes(b["b"]) for b in r1]
    assert sum(x == y for x, y in zip(c0, c1)) == 0


def test_one_shard_per_domain_many_ranks_and_workers(tmp_path):
    out = write_out(tmp_path, shards_per_domain=1, per_shard=5)
    seqs = []
    for rank in range(2):
        loader = UnpairedLoader(out, out, batch_size=4, image_size=SIZE, num_workers=2, rank=rank, world_size=2)
        batches = take(loader, 6)  # 48 samples per domain from a 5-sample shard: no epoch end
        assert len(batches) == 6 and loader.stats["samples"] == 6 * 8
        seqs.append([codes(b["a"]) for b in batches])
    assert seqs[0] != seqs[1]


def test_truncated_shard_and_corrupt_jpeg_are_skipped(tmp_path, caplog):
    out = write_out(tmp_path, shards_per_domain=3, per_shard=8, corrupt={3, 4})  # shard a-000000
    bad = os.path.join(out, "a", "a-000001.tar")
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])
    loader = UnpairedLoader(out, out, batch_size=4, image_size=SIZE, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        batches = take(loader, 30)
    assert all(b["a"].shape == (4, 3, SIZE, SIZE) for b in batches)
    seen = {c for b in batches for c in codes(b["a"])}
    assert not seen & {3, 4}  # the corrupt samples never appear
    assert seen & set(range(8, 12))  # complete samples before the cut are still used
    assert not seen & set(range(13, 16))  # samples past the cut are gone
    st = loader.stats
    assert st["skipped"]["corrupt_sample"] >= 2 and st["skipped"]["truncated_shard"] >= 1
    assert st["samples"] == 30 * 8
    assert any("a-000000.tar" in r.getMessage() and "corrupt_sample" in r.getMessage() for r in caplog.records)
    assert any("a-000001.tar" in r.getMessage() and "truncated_shard" in r.getMessage() for r in caplog.records)
    warned = [r.getMessage() for r in caplog.records if "corrupt_sample" in r.getMessage()]
    assert len(warned) == 1  # once per shard, however often it is drawn


def test_unreadable_url_and_checksum_are_skipped(tmp_path):
    out = write_out(tmp_path, shards_per_domain=2, per_shard=8)
    good = [os.path.join(out, "a", "a-000000.tar")]
    loader = UnpairedLoader(good + ["pipe:false", "file:///nonexistent/x.tar"], out,
                            batch_size=4, image_size=SIZE, num_workers=0)
    take(loader, 10)
    assert loader.stats["skipped"]["unreadable_shard"] >= 2
    # a shard whose bytes changed after indexing is refused with --verify_shards
    with open(os.path.join(out, "a", "a-000001.tar"), "r+b") as f:
        f.seek(2000)
        f.write(b"\0" * 16)
    checked = UnpairedLoader(out, out, batch_size=4, image_size=SIZE, num_workers=0, verify_shards=True)
    seen = {c for b in take(checked, 10) for c in codes(b["a"])}
    assert checked.stats["skipped"]["checksum_mismatch"] >= 1
    assert seen and not seen & set(range(8, 16))


def test_remote_urls_cached_with_size_limit(out, tmp_path):
    local = [os.path.join(out, "a", f"a-{i:06d}.tar") for i in range(4)]
    kw = dict(batch_size=4, image_size=SIZE, num_workers=0, seed=2)
    ref = take(UnpairedLoader(local, out, **kw), 12)
    shard_bytes = os.path.getsize(local[0])
    for urls in ([f"pipe:cat {p}" for p in local], [f"file://{p}" for p in local]):
        cache = tmp_path / urls[0][:4]
        limit = int(2.5 * shard_bytes)
        got = take(UnpairedLoader(urls, out, cache_dir=str(cache), cache_bytes=limit, **kw), 12)
        assert same(got, ref)
        files = list((cache / CACHE_SUBDIR).iterdir())  # copies live in the cache's own subfolder
        assert 1 <= len(files) <= 2 and sum(f.stat().st_size for f in files) <= limit
    # without a cache the bytes are read into memory each time
    assert same(take(UnpairedLoader([f"pipe:cat {p}" for p in local], out, **kw), 12), ref)


def test_shard_specs_and_bad_input(out):
    a = resolve_shards(out, "a")
    assert [os.path.basename(s.url) for s in a] == [f"a-{i:06d}.tar" for i in range(4)]
    assert all(s.sha256 and s.nsamples == 8 for s in a)
    b = resolve_shards(os.path.join(out, "index.json"), "b")
    assert all(os.path.basename(s.url).startswith("b-") for s in b)
    brace = resolve_shards(os.path.join(out, "a", "a-{000000..000003}.tar"), "a")
    assert [s.url for s in brace] == [s.url for s in a]
    with pytest.raises(ValueError, match="nope.tar"):
        resolve_shards(["/nope.tar"], "a")
    with pytest.raises(ValueError, match="unknown keys"):
        UnpairedLoader(out, out, batch_size=2, image_size=SIZE, augment={"flipp": True})


def test_augmenter_matches_albumentations_pipeline_and_reduced_decoding():
    from pipeline.augment import AugmentConfig, Augmenter, build_pipeline, decode_image, to_chw_uint8

    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 240x320
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert decode_image(data, 56).shape == (60, 80, 3)  # 1/4 scale: shortest side still >= 56
    assert decode_image(data, 61).shape == (120, 160, 3)
    png = io.BytesIO()
    Image.fromarray(img).save(png, "PNG")
    assert np.array_equal(decode_image(png.getvalue(), 8)[..., ::-1], img)  # BGR out, lossless
    cfg = AugmentConfig(train=False, resize=72)
    ours = Augmenter(cfg, 64)(data, np.zeros(3), 0)
    ref = build_pipeline(cfg, 64)(image=decode_image(data, 72))["image"]
    assert ours.shape == (64, 64, 3) and np.array_equal(ours, ref)
    for resize, crop, how in ((200, 192, "area"), (400, 384, "linear"), (300, 256, "cubic")):  # down and up
        cfg = AugmentConfig(train=False, resize=resize, interpolation=how)
        ref = build_pipeline(cfg, crop)(image=decode_image(data, resize))["image"]
        assert np.array_equal(Augmenter(cfg, crop)(data, np.zeros(3), 0), ref), (resize, how)
    x = to_chw_uint8([ours], bgr=True)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.uint8 and np.array_equal(x[0, 0], ours[..., 2])  # BGR -> RGB


def test_shard_larger_than_the_cache_is_not_cached(out, tmp_path):
    local = [os.path.join(out, "a", f"a-{i:06d}.tar") for i in range(4)]
    kw = dict(batch_size=4, image_size=SIZE, num_workers=0, seed=2)
    ref = take(UnpairedLoader(local, out, **kw), 6)
    cache = tmp_path / "cache"
    small = UnpairedLoader([f"file://{p}" for p in local], out, cache_dir=str(cache),
                           cache_bytes=os.path.getsize(local[0]) - 1, **kw)
    assert same(take(small, 6), ref)
    assert not list((cache / CACHE_SUBDIR).iterdir())  # read into memory, never stored: the bound holds
    state = small.state_dict()
    assert state["stats"]["retries"] == 0 and small.stats["retries"] == 0
    with pytest.raises(ValueError, match="cache_bytes"):
        UnpairedLoader(local, out, cache_dir=str(cache), cache_bytes=0, **kw)


def test_importing_the_augmentations_asks_no_server_for_albumentations_updates():
    # albumentations looks up its latest version on PyPI at import, from every rank and loader
    # worker; offline nodes (an H200 node here) printed a name-resolution error from each rank
    probe = ("import urllib.request as r\n"
             "calls = []\n"
             "r.build_opener = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError('offline'))\n"
             "import pipeline.augment, os\n"
             "print(len(calls), os.environ['NO_ALBUMENTATIONS_UPDATE'])\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1"], out.stdout
    # a user who wants the check still gets it
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env={**env, "NO_ALBUMENTATIONS_UPDATE": "0"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "0"], out.stdout + out.stderr


def test_workers_start_after_opencv_ran_threads_in_this_process(out, tmp_path):
    """A large resize in the parent starts OpenCV's thread pool; DataLoader workers forked after it
    hung at their first cv2.setNumThreads (a pool that does not survive fork). In a child process,
    with a deadline, so that a hang fails this test instead of the suite."""
    script = tmp_path / "fork.py"
    script.write_text(
        "import sys, cv2, numpy as np\n"
        "from pipeline.loader import UnpairedLoader\n"
        "cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (4000, 4000))  # the pool, started here\n"
        "n = cv2.getNumThreads()\n"
        f"it = iter(UnpairedLoader({str(out)!r}, {str(out)!r}, batch_size=2, image_size={SIZE}, num_workers=2))\n"
        "b = next(it); next(it)\n"
        "assert cv2.getNumThreads() == n  # the caller's setting is back\n"
        "print('ok', tuple(b['a'].shape))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
