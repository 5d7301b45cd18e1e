"""bench/oracle.py: the paired ceilings are fitted on one half and scored on the other."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from oracle import box, oracles  # noqa: E402

PALETTE = np.array([[240, 240, 230], [150, 200, 240], [250, 190, 100]], np.uint8)
PHOTO = np.array([[110, 120, 80], [40, 70, 80], [80, 80, 90]], np.float64)


def scenes(n=40, size=8, noise=4.0, light=20.0, seed=0):
    """Maps of 3 flat colours; photos: one colour per class, a random light offset per scene and
    per-pixel noise, so that the map is a function of the photo, the photo not of the map."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (n, size, size))
    photos = PHOTO[labels] + rng.uniform(-light, light, (n, 1, 1, 1)) + rng.normal(0, noise, (n, size, size, 3))
    return np.clip(np.rint(photos), 0, 255).astype(np.uint8), PALETTE[labels]


def test_box_is_the_neighbourhood_mean():
    x = np.zeros((1, 3, 3, 1))
    x[0, 1, 1, 0] = 9.0
    assert np.allclose(box(x)[0, ..., 0], 1.0)  # every 3x3 window (edges replicated) holds the one 9
    assert np.allclose(box(x, 5)[0, ..., 0], 9.0 / 25)
    assert box(np.full((2, 4, 5, 3), 7.0)).shape == (2, 4, 5, 3)


def test_oracles_reach_the_ceiling_where_it_exists_and_the_sampler_pays_for_invented_light():
    photos, maps = scenes()
    acc = {name: a for name, (_, a) in oracles(photos, maps, levels=8).items()}
    assert acc["a2b pixel lookup"] > 0.95  # classes 40+ levels apart: the colour rule is (nearly) exact
    assert acc["b2a class median"] > 0.6
    # another scene's light (+-20) is a second draw: the sampler misses more pixels than the median
    assert acc["b2a ideal sampler"] < acc["b2a class median"] - 0.2
    # the fine texture alone (noise std 4) costs little: the scene's light is what the sampler pays for
    assert acc["b2a textured mean"] > acc["b2a ideal sampler"] + 0.2


def test_lookup_falls_back_to_the_most_frequent_label_for_unseen_colours():
    photos, maps = scenes(n=4)
    photos[2:] = 255  # the scored half holds a colour the fitted half never showed
    acc = {name: a for name, (_, a) in oracles(photos, maps, levels=8).items()}
    counts = np.unique(maps[:2].reshape(-1, 3), axis=0, return_counts=True)
    mode = counts[0][counts[1].argmax()]
    expect = float((maps[2:] == mode).all(-1).mean())
    assert abs(acc["a2b pixel lookup"] - expect) < 1e-9
