"""Palettes for flat-coloured domains: measured on real shards (`model.palette_b: auto`), refused
for photographs before any rank starts, trained and exported as a generator that paints only them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from launch.config import ConfigError, check, load_config
from launch.release.export import load_translator, translate_uint8
from launch.training import trainer as T
from launch.training.palette import model_with_palettes
from pipeline.colour_stats import DomainStats
from pipeline.demo import MAP_COLOURS

from test_trainer_step import make_trainer, steps


def test_palette_is_the_frequent_flat_colours_and_their_share():
    rng = np.random.default_rng(0)
    x = np.zeros((4, 20, 20, 3), np.uint8)
    x[:, :10] = (242, 239, 233)          # 50 %
    x[:, 10:16] = (150, 196, 236)        # 30 %
    x[:, 16:19] = (160, 146, 136)        # 15 %
    x[:, 19] = rng.integers(0, 256, (4, 20, 3))  # 5 % noise: one pixel per bin at most, under min_share
    colours, share = DomainStats.empty().add(x).palette(min_share=0.01)
    assert colours.tolist() == [[242, 239, 233], [150, 196, 236], [160, 146, 136]]
    assert share == pytest.approx(0.95, abs=0.01)
    photo = rng.integers(0, 256, (4, 20, 20, 3)).astype(np.uint8)
    colours, share = DomainStats.empty().add(photo).palette(min_share=0.01)
    assert len(colours) == 0 and share == 0.0
    with pytest.raises(ValueError, match="no pixels"):
        DomainStats.empty().palette()


def config(corpus, tmp_path, **model):
    return load_config(None, base={
        "run_dir": str(tmp_path / "run"), "data": {"shards": str(corpus / "shards"), "image_size": 32, "batch_size": 2,
                                                   "num_workers": 0},
        "model": {"preset": "tiny", **model}, "tracking": {"enable": False}, "eval": {"baseline_images": 48}})


def test_auto_palette_of_the_demo_maps_is_their_colours(corpus, tmp_path):
    cfg = config(corpus, tmp_path, skip="image", palette_b="auto")
    said = []
    model = model_with_palettes(cfg, say=said.append)
    assert sorted(map(tuple, model.palette_b)) == sorted(MAP_COLOURS.values())
    assert model.palette_a == [] and cfg.model.palette_b == "auto"   # the config keeps saying "auto"
    assert len(said) == 1 and "8 colours holding 100.0% of domain B's pixels" in said[0]
    plain = config(corpus, tmp_path)
    assert model_with_palettes(plain) is plain.model


def test_auto_palette_of_photographs_fails_before_launch(corpus, tmp_path):
    cfg = config(corpus, tmp_path, palette_a="auto")
    with pytest.raises(ConfigError, match=r"model.palette_a = 'auto': domain A is not drawn in a few flat colours"):
        check(cfg)


def test_a_palette_generator_trains_and_exports_painting_only_its_colours(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path / "run", model={"preset": "tiny", "skip": "image", "palette_b": "auto"})
    steps(tr, 2)
    assert tr.state.step == 2
    gen, meta = load_translator(T.export(tr))
    assert sorted(map(tuple, meta["model"]["palette_b"])) == sorted(MAP_COLOURS.values())
    x = (np.random.default_rng(1).random((2, 32, 32, 3)) * 255).astype(np.uint8)
    got = {tuple(c) for c in translate_uint8(gen, x, "a2b").reshape(-1, 3).tolist()}
    assert got <= set(MAP_COLOURS.values())
    assert len({tuple(c) for c in translate_uint8(gen, x, "b2a").reshape(-1, 3).tolist()}) > 20


def test_a_rank_measures_the_palette_once(corpus, tmp_path, monkeypatch):
    """launch/train.py validates the config (check) and then builds the model in the same process:
    the shards are read for the palette once."""
    import launch.training.palette as P

    calls = []
    real = P.stats_from_shards
    monkeypatch.setattr(P, "stats_from_shards", lambda *a, **k: calls.append(1) or real(*a, **k))
    P.measure.cache_clear()
    cfg = config(corpus, tmp_path, palette_b="auto")
    first = model_with_palettes(cfg, say=lambda *a: None)
    assert model_with_palettes(cfg, say=lambda *a: None) == first and len(calls) == 1
    assert sorted(map(tuple, first.palette_b)) == sorted(MAP_COLOURS.values())


def test_a_resumed_or_initialised_run_takes_the_colours_its_weights_carry(corpus, tmp_path, monkeypatch):
    """The colours are weights: a resume takes them from its checkpoint's meta.json, a start from
    init_from from the translator's JSON, whatever a new measurement would give (the shards and
    eval.baseline_images may change between launches); nothing is measured then."""
    import json

    import launch.training.palette as P
    from launch.config import check_same_generator
    from launch.runstore.artifacts import save_translator
    from model.unit import UNIT

    calls = []
    monkeypatch.setattr(P, "stats_from_shards", lambda *a, **k: calls.append(1))  # measuring would fail the test
    P.measure.cache_clear()
    cfg = config(corpus, tmp_path, skip="image", palette_b="auto")
    three = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    ckpt_dir = tmp_path / "step-00000002"
    ckpt_dir.mkdir()
    (ckpt_dir / "meta.json").write_text(json.dumps({"step": 2, "palettes": {"palette_a": [], "palette_b": three}}))
    said = []
    model = model_with_palettes(cfg, say=said.append, saved=P.saved_palettes(ckpt_dir, None))
    assert model.palette_b == three and model.palette_a == [] and not calls
    assert said == [f"model.palette_b: the 3 colours of the checkpoint {ckpt_dir}"]
    unit = UNIT(model)
    save_translator(tmp_path / "init", unit.gen, unit.config(), image_size=32, step=2, ema=False)
    model = model_with_palettes(cfg, say=lambda *a: None, saved=P.saved_palettes(None, tmp_path / "init"))
    assert model.palette_b == three and not calls
    # Before launch: "auto" fits an init translator with any palette, not one without
    check_same_generator(unit.config(), cfg.model)
    plain = UNIT.from_config({"preset": "tiny", "skip": "image"})
    with pytest.raises(ValueError, match=r"model.palette_b: it has \[\], the config 'auto'"):
        check_same_generator(plain.config(), cfg.model)
