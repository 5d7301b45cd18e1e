"""Quality figures beside their trivial baselines: the baselines themselves (most frequent colour,
histogram matching, identity, baselines.json, statistics from real tar shards), the classifier
two-sample test, FID/KID with a user-provided TorchScript extractor, and evaluate_translator /
the evaluate CLI with baselines, skipped test images and exit status 3."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from launch.release import baselines
from launch.release.baselines import DomainStats, translators
from launch.release.c2st import c2st
from launch.release.evaluate import (EvalOptions, evaluate_direction, evaluate_translator, format_table,
                             pixel_accuracy)
from launch.release.fid import NO_WEIGHTS, fid_kid, load_extractor
from pipeline.demo import LAND, MAP_COLOURS, render_scene

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny CNNs on a shared 2-core machine: one torch thread is ~20x faster than contending for two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stats_of(a_imgs, b_imgs) -> dict:
    return {"a": DomainStats.empty().add(a_imgs), "b": DomainStats.empty().add(b_imgs)}


def palette_images(n, colours, shares, size=8, seed=0) -> np.ndarray:
    """uint8 [n, size, size, 3] made of `colours` in the given pixel shares, shuffled per image."""
    rng = np.random.default_rng(seed)
    counts = np.round(np.asarray(shares) * size * size).astype(int)
    counts[0] += size * size - counts.sum()
    flat = np.repeat(np.asarray(colours, np.uint8), counts, axis=0)
    return np.stack([rng.permutation(flat).reshape(size, size, 3) for _ in range(n)])


# ---------------------------------------------------------------------------------------------
# Baselines


def test_most_frequent_colour_is_exact_for_a_flat_palette():
    land, water, road = (242, 239, 233), (150, 196, 236), (255, 255, 255)
    imgs = palette_images(5, [land, water, road], [0.5, 0.3, 0.2])
    s = DomainStats.empty().add(imgs)
    assert tuple(s.mode_colour()) == land
    assert s.images == 5 and (s.hist.sum(axis=1) == 5 * 64).all()
    assert s.hist[0, 242] == s.hist[1, 239] == 5 * 32   # half the pixels, per channel
    # Colours are binned 8 levels per channel: two shades of one bin (30% + 30%) outweigh a single
    # colour at 40%, and the bin's mean colour is returned.
    shades = palette_images(4, [(100, 100, 100), (102, 103, 100), (40, 200, 40)], [0.3, 0.3, 0.4])
    assert tuple(DomainStats.empty().add(shades).mode_colour()) == (101, 102, 100)
    with pytest.raises(ValueError, match="uint8"):
        DomainStats.empty().add(imgs.astype(np.float32))
    with pytest.raises(ValueError, match="no pixels"):
        DomainStats.empty().mode_colour()


def test_the_constant_is_the_best_constant_not_the_most_frequent_colour(split):
    # a map's land (the most frequent colour) and its white roads lie within 2 x 16 of each other:
    # a colour between them is right on both
    land, road = (242, 239, 233), (255, 255, 255)
    img = np.zeros((1, 40, 40, 3), np.uint8)
    img[:, :22], img[:, 22:] = land, road
    s = DomainStats.empty().add(img)
    assert tuple(s.mode_colour()) == land
    best = s.best_constant()
    assert pixel_accuracy(np.broadcast_to(best, img.shape), img) == 1.0
    assert pixel_accuracy(np.broadcast_to(s.mode_colour(), img.shape), img) == 0.55
    # on the generated maps' test truth it scores at least the most frequent colour's accuracy
    truth, stats = split["yb"], split["stats"]["b"]
    score = lambda c: pixel_accuracy(np.broadcast_to(c, truth.shape), truth)  # noqa: E731
    assert score(stats.best_constant()) >= score(stats.mode_colour())
    assert tuple(baselines.from_json(baselines.to_json({"b": stats}))["b"].best_constant()) == \
        tuple(stats.best_constant())  # travels with the export


def test_constant_and_identity_translators():
    a = palette_images(3, [(10, 20, 30), (200, 10, 10)], [0.7, 0.3], seed=1)
    b = palette_images(3, [(242, 239, 233), (150, 196, 236)], [0.6, 0.4], seed=2)
    t = translators(stats_of(a, b))
    assert set(t) == {"identity", "constant", "histmatch"}
    x = palette_images(2, [(1, 2, 3), (4, 5, 6)], [0.5, 0.5], size=4, seed=3)
    out = t["constant"](x, "a2b")
    assert out.shape == x.shape and out.dtype == np.uint8
    assert (out.reshape(-1, 3) == (242, 239, 233)).all()                       # B's most frequent colour
    assert (t["constant"](x, "b2a").reshape(-1, 3) == (10, 20, 30)).all()     # A's for b2a
    before = x.copy()
    ident = t["identity"](x, "a2b")
    assert np.array_equal(ident, x)
    ident[...] = 99
    assert np.array_equal(x, before)   # a copy: writing to the output leaves the caller's input alone


def test_histmatch_undoes_a_per_channel_monotone_shift():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 200, (6, 16, 16, 3)).astype(np.uint8)   # domain B
    shift = np.array([40, 25, 55])
    source = (target.astype(int) + shift).astype(np.uint8)            # domain A: B shifted per channel
    t = translators(stats_of(source, target))
    assert pixel_accuracy(source, target) < 0.05                      # identity is far off (shift > 16)
    fresh = rng.integers(0, 200, (3, 16, 16, 3)).astype(np.uint8)    # images the statistics never saw
    moved = (fresh.astype(int) + shift).astype(np.uint8)
    assert pixel_accuracy(t["histmatch"](moved, "a2b"), fresh) > 0.99
    assert pixel_accuracy(t["histmatch"](fresh, "b2a"), moved) > 0.99
    # A monotone non-linear per-channel curve (gamma) is undone too, up to merged levels.
    gamma = np.round(255 * (np.arange(256) / 255) ** 0.6).astype(np.uint8)
    curved = gamma[target]
    t2 = translators(stats_of(curved, target))
    assert pixel_accuracy(curved, target) < 0.5
    assert pixel_accuracy(t2["histmatch"](curved, "a2b"), target) > 0.99


def test_baselines_json_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (4, 12, 12, 3)).astype(np.uint8)
    b = palette_images(4, [(242, 239, 233), (160, 146, 136), (246, 190, 96)], [0.5, 0.3, 0.2], size=12)
    stats = stats_of(a, b)
    path = baselines.save(tmp_path / "export" / baselines.FILE_NAME, stats)
    assert not list(path.parent.glob(".*.tmp"))       # written to a temp name and renamed
    raw = json.loads(path.read_text())
    assert raw["format"] == 1 and raw["domains"]["b"]["mode_colour"] == [242, 239, 233]
    again = baselines.load(path)
    for d in ("a", "b"):
        assert np.array_equal(again[d].hist, stats[d].hist) and again[d].images == 4
        assert np.array_equal(again[d].mode_colour(), stats[d].mode_colour())
    x = rng.integers(0, 256, (3, 12, 12, 3)).astype(np.uint8)
    before, after = translators(stats), translators(again)
    for name in before:
        for direction in ("a2b", "b2a"):
            assert np.array_equal(before[name](x, direction), after[name](x, direction)), (name, direction)
    # Refused with the file named: not JSON, another format.
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a baselines file"):
        baselines.load(path)
    path.write_text(json.dumps({**raw, "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        baselines.load(path)


def test_a_saved_constant_answers_only_for_its_own_tolerance():
    """baselines.json keeps the best constant found at tolerance 16, not the grid it was searched on;
    at another tolerance the best constant can be another colour, so statistics read back refuse
    rather than score against the constant for 16."""
    b = np.zeros((4, 8, 8, 3), np.uint8)
    b[:, :4], b[:, 4:] = 200, 220        # within 2 x 16 of each other: one colour hits both at 16
    b[:, :4, :1] = 201                   # and the 200s the more frequent colour
    a = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    fresh = stats_of(a, b)
    again = baselines.from_json(baselines.to_json(fresh))
    constant = lambda stats, tol: translators(stats, tol)["constant"](a[:1], "a2b")[0, 0, 0]  # noqa: E731
    assert tuple(constant(again, 16)) == tuple(constant(fresh, 16))
    assert pixel_accuracy(np.broadcast_to(constant(fresh, 16), b.shape), b, 16) == 1.0
    assert pixel_accuracy(np.broadcast_to(constant(fresh, 4), b.shape), b, 4) == 0.5   # at 4 one side only
    with pytest.raises(ValueError, match="tolerance 16 only, not at 4.*--shards"):
        translators(again, 4)
    with pytest.raises(ValueError, match="tolerance 16 only, not at 17"):   # exactly 16, not 16 // 2
        translators(again, 17)


def png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_stats_from_real_tar_shards_match_the_images(tmp_path):
    """One shard per domain (stock webdataset TarWriter) + index.json: asked for 50 images of a
    domain that holds 25, the statistics count each image exactly once (read without replacement)."""
    import webdataset as wds

    rng = np.random.default_rng(11)
    imgs, entries = {}, []
    for d, hot in (("a", 0), ("b", 2)):   # A reddish, B bluish: a channel or domain mix-up shows
        x = rng.integers(0, 120, (25, 16, 16, 3))
        x[..., hot] = rng.integers(140, 256, (25, 16, 16))
        x[:, :8, :8] = (242, 239, 233) if d == "b" else (90, 60, 30)   # a quarter in one flat colour
        imgs[d] = x.astype(np.uint8)
        (tmp_path / d).mkdir()
        url = f"{d}/{d}-000000.tar"
        with wds.TarWriter(str(tmp_path / url)) as w:
            for i, img in enumerate(imgs[d]):
                w.write({"__key__": f"{d}x{i:04d}", "png": png(img),
                         "json": {"domain": d, "width": 16, "height": 16, "format": "png"}})
        entries.append({"url": url, "domain": d, "nsamples": 25})
    (tmp_path / "index.json").write_text(json.dumps({"version": 1, "shards": entries}))

    got = baselines.stats_from_shards(tmp_path, image_size=16, max_images=50)
    for d in ("a", "b"):
        direct = DomainStats.empty().add(imgs[d])
        assert got[d].images == 25
        assert np.array_equal(got[d].hist, direct.hist), d
        assert np.array_equal(got[d].bin_counts, direct.bin_counts), d
        assert np.array_equal(got[d].mode_colour(), direct.mode_colour()), d
    assert tuple(got["b"].mode_colour()) == (242, 239, 233) and tuple(got["a"].mode_colour()) == (90, 60, 30)
    # per-domain sources (shards_a, shards_b) give the same
    again = baselines.stats_from_shards(tmp_path / "index.json", tmp_path / "index.json", image_size=16, max_images=50)
    assert np.array_equal(again["a"].hist, got["a"].hist) and np.array_equal(again["b"].hist, got["b"].hist)


# ---------------------------------------------------------------------------------------------
# C2ST


@pytest.fixture(scope="module")
def scenes():
    """Two synthetic domains from the demo generator: aerial photos (A) and maps (B), 32 px."""
    pairs = [render_scene(seed, 32) for seed in range(128)]
    aerial = np.stack([p[0] for p in pairs])
    maps = np.stack([p[1] for p in pairs])
    return {"aerial": aerial, "map": maps}


def test_c2st_tells_a_good_translator_from_bad_ones(scenes):
    real = scenes["map"][:64]                      # real target-domain images
    oracle = scenes["map"][64:]                    # true maps of other scenes: indistinguishable
    identity = scenes["aerial"][64:]               # untranslated photos
    constant = np.broadcast_to(np.array(MAP_COLOURS[LAND], np.uint8), oracle.shape).copy()
    steps = 60
    good = c2st(real, oracle, steps=steps)
    assert good < 0.7
    assert c2st(real, identity, steps=steps) > 0.9
    assert c2st(real, constant, steps=steps) > 0.9
    assert c2st(real, oracle, steps=steps) == good                     # deterministic for a seed
    # Equal lengths are split as pairs: the very same images on both sides score exactly 0.5
    # (every held-out real image has its identical twin among the held-out fakes).
    assert c2st(real, real.copy(), steps=10) == 0.5


def test_c2st_refuses_too_few_or_wrong_images(scenes):
    with pytest.raises(ValueError, match="at least 8"):
        c2st(scenes["map"][:4], scenes["map"][4:8], steps=1)
    with pytest.raises(ValueError, match="uint8"):
        c2st(scenes["map"][:8].astype(np.float32), scenes["map"][8:16], steps=1)


# ---------------------------------------------------------------------------------------------
# FID / KID


class PoolFeatures(nn.Module):
    """uint8 NCHW -> per-channel mean and std, and the mean of a fixed random conv's activations."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        y = torch.relu(self.conv(x))
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), y.mean((2, 3))], 1)


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "features.pt"
    torch.jit.save(torch.jit.script(PoolFeatures()), str(path))
    return path


def test_fid_kid_with_a_scripted_extractor(extractor_file, scenes):
    feats = load_extractor(extractor_file)
    x = scenes["aerial"][:48]
    shifted = x.copy()
    shifted[..., 0] = np.clip(x[..., 0].astype(int) + 40, 0, 255).astype(np.uint8)   # redder
    same, other = fid_kid(x, x, feats), fid_kid(x, shifted, feats)
    assert set(same) == {"fid", "kid"}
    assert abs(same["fid"]) < 1e-6 and other["fid"] > 0.01
    assert other["kid"] > 0.005 and abs(same["kid"]) < 0.01 * other["kid"]
    # another sample of the same domain is far closer than the colour-shifted set
    fresh = fid_kid(x, scenes["aerial"][48:96], feats)
    assert fresh["fid"] < 0.1 * other["fid"] and fresh["kid"] < 0.1 * other["kid"]


def test_load_extractor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_extractor(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_extractor(text)
    pickled = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, pickled)       # a checkpoint, not a scripted module
    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_extractor(pickled)


def test_format_table_fid_columns_only_with_an_extractor(extractor_file, scenes):
    x, y = scenes["aerial"][:8], scenes["map"][:8]
    ident = lambda imgs, d: imgs  # noqa: E731
    without = format_table({"a2b": evaluate_direction(ident, x, y, "a2b", EvalOptions(c2st_steps=0))})
    header = without.splitlines()[0]
    assert NO_WEIGHTS in without and "FID" not in header and "KID" not in header and "C2ST: off" in without
    opts = EvalOptions(c2st_steps=0, features=load_extractor(extractor_file))
    res = {"a2b": evaluate_direction(ident, x, y, "a2b", opts)}
    with_feats = format_table(res)
    header = with_feats.splitlines()[0]
    assert "FID" in header and "KID" in header and NO_WEIGHTS not in with_feats
    assert {"fid", "kid", "identity_fid", "identity_kid"} <= set(res["a2b"])
    model_row = next(ln for ln in with_feats.splitlines() if ln.split()[:2] == ["a2b", "model"])
    assert f"{res['a2b']['fid']:.2f}" in model_row


# ---------------------------------------------------------------------------------------------
# evaluate_translator and the CLI with baselines


def write(dir_: Path, name: str, img) -> None:
    dir_.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(dir_ / name)


@pytest.fixture(scope="module")
def split(tmp_path_factory, scenes):
    """A paired test split (16 unseen scenes, PNG) and baselines estimated from 64 other scenes."""
    root = tmp_path_factory.mktemp("split")
    test_a, truth_b = scenes["aerial"][112:128], scenes["map"][112:128]
    for i in range(16):
        write(root / "testA", f"s{i}.png", test_a[i])
        write(root / "testB", f"s{i}.png", truth_b[i])
    stats = stats_of(scenes["aerial"][:64], scenes["map"][:64])
    return {"root": root, "a": root / "testA", "b": root / "testB", "xa": test_a, "yb": truth_b,
            "stats": stats}


def test_a_constant_model_loses_to_the_baselines_an_oracle_beats_them(split):
    opts = EvalOptions(baselines=split["stats"], c2st_steps=0)
    const_b = split["stats"]["b"].best_constant()
    constant = lambda x, d: np.broadcast_to(const_b, x.shape).copy()  # noqa: E731
    res = evaluate_translator(constant, test_a=split["a"], truth_b=split["b"], opts=opts)["a2b"]
    assert res["n"] == 16 and res["pixel_acc"] == res["constant_pixel_acc"] > 0.3
    assert res["best_baseline"] in ("constant", "histmatch") and res["margin"] <= 0
    for name in ("identity", "constant", "histmatch"):
        assert res["best_baseline_pixel_acc"] >= res[f"{name}_pixel_acc"]
    table = format_table({"a2b": res})
    # equal to the constant it is: a tie, which does not beat it either
    verdict = "ties with" if res["margin"] == 0 else "LOSES TO"
    assert f"model {verdict} the strongest baseline ({res['best_baseline']})" in table
    assert any(ln.split()[:3] == ["a2b", res["best_baseline"], "*"] for ln in table.splitlines())

    truth = {img.tobytes(): t for img, t in zip(split["xa"], split["yb"])}
    oracle = lambda x, d: np.stack([truth[img.tobytes()] for img in x])  # noqa: E731
    res = evaluate_translator(oracle, test_a=split["a"], truth_b=split["b"], opts=opts)["a2b"]
    assert res["pixel_acc"] == 1.0 and res["mae"] == 0.0
    assert res["margin"] == 1.0 - res["best_baseline_pixel_acc"] > 0.1
    assert "model beats the strongest baseline" in format_table({"a2b": res})


def test_c2st_in_the_evaluation_ranks_the_oracle_below_the_baselines(split):
    truth = {img.tobytes(): t for img, t in zip(split["xa"], split["yb"])}
    oracle = lambda x, d: np.stack([truth[img.tobytes()] for img in x])  # noqa: E731
    res = evaluate_translator(oracle, test_a=split["a"], truth_b=split["b"],
                              opts=EvalOptions(baselines=split["stats"], c2st_steps=30))["a2b"]
    # the oracle's translations are the truth itself, split as pairs: exactly indistinguishable
    assert res["c2st"] == 0.5
    assert res["identity_c2st"] > 0.9 and res["constant_c2st"] > 0.9
    table = format_table({"a2b": res})
    assert "C2ST" in table.splitlines()[0] and "held-out accuracy" in table


def damaged_split(split, tmp_path) -> Path:
    """The split's testA plus a 1x1 image and a damaged PNG."""
    import shutil

    test_a = tmp_path / "testA"
    shutil.copytree(split["a"], test_a)
    write(test_a, "tiny.png", np.zeros((1, 1, 3), np.uint8))
    good = (split["a"] / "s0.png").read_bytes()
    (test_a / "broken.png").write_bytes(good[: len(good) // 2])   # truncated mid-stream
    return test_a


def test_unusable_test_images_are_skipped_and_listed(split, tmp_path):
    test_a = damaged_split(split, tmp_path)
    rejected = []
    res = evaluate_translator(lambda x, d: x, test_a=test_a, truth_b=split["b"],
                              opts=EvalOptions(baselines=split["stats"], c2st_steps=0), rejected=rejected)
    assert res["a2b"]["n"] == 16
    assert len(rejected) == 2
    assert any("tiny.png" in r and "too small" in r for r in rejected)
    assert any("broken.png" in r for r in rejected)
    with pytest.raises(ValueError, match="tiny.png|broken.png"):   # without a list: refused, not dropped
        evaluate_translator(lambda x, d: x, test_a=test_a, truth_b=split["b"], opts=EvalOptions(c2st_steps=0))


def test_cli_with_shipped_baselines_exits_3_naming_skipped_images(split, tmp_path):
    from launch.runstore.artifacts import save_translator
    from model.unit import UNIT

    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"})
    export = save_translator(tmp_path / "export", unit.gen, unit.config(), image_size=32, step=1, ema=False)
    baselines.save(export / baselines.FILE_NAME, split["stats"])
    test_a = damaged_split(split, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "launch.release.evaluate", "--model", str(export), "--test-a", str(test_a),
                           "--truth-b", str(split["b"]), "--c2st-steps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stderr
    assert "tiny.png" in proc.stderr and "broken.png" in proc.stderr and "2 test image(s) skipped" in proc.stderr
    rows = {tuple(ln.split()[:2]) for ln in proc.stdout.splitlines() if ln.startswith("a2b")}
    assert rows == {("a2b", t) for t in ("model", "identity", "constant", "histmatch")}
    assert "identity only" not in proc.stdout          # the export's baselines.json was used
    assert "the strongest baseline (" in proc.stdout
    # The same split without the bad files: exit 0.
    proc = subprocess.run([sys.executable, "-m", "launch.release.evaluate", "--model", str(export), "--test-a", str(split["a"]),
                           "--truth-b", str(split["b"]), "--c2st-steps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
