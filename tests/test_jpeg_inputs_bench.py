"""bench/jpeg_inputs.py: the demo's test photos rendered again from their seeds, and the table."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from jpeg_inputs import jpeg, region_edges, rerender, table  # noqa: E402
from launch.release.evaluate import load_pairs  # noqa: E402
from pipeline.demo import EDGE, LAND, MAP_COLOURS, PARK, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    write_corpus(str(out), n_train=0, n_test=3, size=32, seed=5, progress=False)
    return load_pairs(out / "testA", out / "testB")


def test_rerendered_photos_are_what_the_corpus_stored_before_its_jpeg(split):
    stems, x, y = split
    raw = rerender(stems, y, seed=5)
    assert np.array_equal(jpeg(raw, -1), x)  # the corpus's own encoding, read back
    assert np.array_equal(jpeg(raw, 2), x)  # which is 4:2:0
    assert not np.array_equal(raw, x) and not np.array_equal(jpeg(raw, 0), x)
    with pytest.raises(ValueError, match="differs from the stored truth"):
        rerender(stems, y, seed=6)
    with pytest.raises(ValueError, match="not a demo scene index"):
        rerender(["scene"], y[:1], seed=5)


def test_region_edges_are_park_and_water_pixels_beside_another_colour():
    y = np.empty((1, 4, 4, 3), np.uint8)
    y[:] = MAP_COLOURS[LAND]
    y[0, :3, :3] = MAP_COLOURS[PARK]  # a 3 x 3 park in the corner
    want = np.zeros((1, 4, 4), bool)
    want[0, 2, :3] = want[0, :3, 2] = True  # its 5 pixels beside the land; the image border is no colour
    assert np.array_equal(region_edges(y), want)


def test_table_scores_each_version_overall_and_on_the_edges():
    y = np.empty((1, 4, 4, 3), np.uint8)
    y[:] = MAP_COLOURS[LAND]
    y[0, :3, :3] = MAP_COLOURS[PARK]
    land = np.full_like(y, 0)
    land[:] = MAP_COLOURS[LAND]
    ringed = y.copy()
    ringed[0, 2, :3] = MAP_COLOURS[EDGE]  # 3 of the park's 5 edge pixels painted as outline
    views = {"right": np.zeros_like(y), "all land": np.ones_like(y), "ringed": np.full_like(y, 2)}
    rows = table(lambda x: {0: y, 1: land, 2: ringed}[int(x.max())], views, y).splitlines()
    assert rows[2] == "| right | 1.0000 | 1.000 | 0.000 |"
    assert rows[3] == "| all land | 0.4375 | 0.000 | 0.000 |"  # 7 land pixels of 16; no park edge right
    assert rows[4] == "| ringed | 0.8125 | 0.400 | 0.600 |"
