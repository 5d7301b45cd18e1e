"""The procedural demo corpus: layout, determinism, pairing, palette, speed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.demo import MAP_COLOURS, render_scene, scene_seed, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digest_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_render_scene_shapes_palette_and_domain_gap():
    palette = np.array(list(MAP_COLOURS.values()))
    accs = []
    for seed in range(20):
        aerial, map_ = render_scene(seed, 64)
        assert aerial.shape == map_.shape == (64, 64, 3) and aerial.dtype == map_.dtype == np.uint8
        # Every map pixel is one of the flat palette colours (what a translator must hit).
        flat = map_.reshape(-1, 1, 3)
        assert (flat == palette[None]).all(-1).any(-1).all()
        assert len(np.unique(flat.reshape(-1, 3), axis=0)) >= 3
        accs.append((np.abs(aerial.astype(int) - map_.astype(int)) <= 16).all(-1).mean())
    assert np.mean(accs) < 0.1  # the identity translation is a poor baseline
    a1, m1 = render_scene(3, 128)
    a2, m2 = render_scene(3, 128)
    assert (a1 == a2).all() and (m1 == m2).all()
    assert not (render_scene(4, 128)[1] == m1).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        render_scene(0, 48)


def test_splits_use_disjoint_seeds():
    n = 5000
    a = {scene_seed(0, "trainA", i) for i in range(n)}
    b = {scene_seed(0, "trainB", i) for i in range(n)}
    t = {scene_seed(0, "test", i) for i in range(n)}
    assert not (a & b) and not (a & t) and not (b & t)
    assert not a & {scene_seed(1, "trainA", i) for i in range(n)}


def test_cli_layout_pairs_and_same_seed_same_bytes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    outs = []
    for name, seed in (("one", 0), ("two", 0), ("three", 1)):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "pipeline.demo", "--out", str(out), "--n-train", "12",
                            "--n-test", "4", "--size", "32", "--seed", str(seed)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        outs.append(digest_tree(out))
    assert outs[0] == outs[1]
    assert outs[0] != outs[2] and set(outs[0]) == set(outs[2])
    files = outs[0]
    assert sum(k.startswith("trainA/") and k.endswith(".jpg") for k in files) == 12
    assert sum(k.startswith("trainB/") and k.endswith(".png") for k in files) == 12
    test_a = sorted(os.path.splitext(os.path.basename(k))[0] for k in files if k.startswith("testA/"))
    test_b = sorted(os.path.splitext(os.path.basename(k))[0] for k in files if k.startswith("testB/"))
    assert test_a == test_b and len(test_a) == 4

    # Paired test split: testB is exactly the map of the scene whose aerial is testA.
    aerial, map_ = render_scene(scene_seed(0, "test", 2), 32)
    assert (np.asarray(Image.open(tmp_path / "one" / "testB" / "000002.png")) == map_).all()
    jpg = np.asarray(Image.open(tmp_path / "one" / "testA" / "000002.jpg"), np.int16)
    assert jpg.shape == (32, 32, 3) and np.abs(jpg - aerial).mean() < 8
    # Train A and B are different scenes (unpaired).
    tr_b = np.asarray(Image.open(tmp_path / "one" / "trainB" / "000002.png"))
    assert not (tr_b == render_scene(scene_seed(0, "trainA", 2), 32)[1]).all()

    r = subprocess.run([sys.executable, "-m", "pipeline.demo", "--out", str(tmp_path / "x"), "--size", "40"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "multiple of 32" in r.stderr


def test_thousands_per_minute_on_one_core(tmp_path):
    t0 = time.perf_counter()
    write_corpus(str(tmp_path), 100, 0, size=64, progress=False)
    rate = 200 / (time.perf_counter() - t0) * 60
    assert rate > 2000, f"{rate:.0f} images/minute"
