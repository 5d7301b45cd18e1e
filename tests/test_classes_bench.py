"""bench/classes.py: per-class accuracy and what each class is painted as."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from classes import (GanDecoder, b2a_table, beside, class_table, confusion, outline_kinds, photo_colours,  # noqa: E402
                     probabilities, probability_table, read_back_table)
from model.unit import UNIT  # noqa: E402
from pipeline.demo import BUILDING, EDGE, MAJOR_ROAD, LAND, MAP_COLOURS, ROAD  # noqa: E402


def maps():
    """One 4x4 map: 12 land pixels, 3 major-road pixels, 1 white-road pixel."""
    y = np.empty((1, 4, 4, 3), np.uint8)
    y[:] = MAP_COLOURS[LAND]
    y[0, 0, :3] = MAP_COLOURS[MAJOR_ROAD]
    y[0, 3, 3] = MAP_COLOURS[ROAD]
    return y


def test_class_table_scores_each_truth_colour_for_each_translator():
    y = maps()
    right = y.copy()
    wrong = y.copy()
    wrong[0, 0, :2] = MAP_COLOURS[LAND]  # 2 of the 3 major-road pixels painted land
    rows = class_table({"right": right, "wrong": wrong}, y).splitlines()
    by_class = {r.split(" | ")[1]: r for r in rows[2:]}
    assert list(by_class) == ["land", "major roads", "white roads", "all classes"]  # most pixels first, then all
    assert by_class["land"].endswith("| 0.750 | 1.000 | 1.000 |")
    assert by_class["major roads"].endswith("| 0.188 | 1.000 | 0.333 |")
    assert by_class["all classes"].endswith("| **1.000** | **0.875** |")  # 14 of 16 pixels


def test_confusion_reads_painted_pixels_as_the_nearest_map_colour():
    y = maps()
    pred = y.copy()
    # major roads painted near-land (off by a few levels: still read as land), one of them orange
    pred[0, 0, :2] = np.array(MAP_COLOURS[LAND]) - 5
    rows = {r.split(" | ")[0].strip("| "): r for r in confusion(pred, y).splitlines()[2:]}
    assert "| 0.188 | 0.062 | land 0.67, major roads 0.33" in rows["major roads"]  # 3 true, 1 painted
    assert "| 0.750 | 0.875 | land 1.00" in rows["land"]


def test_photo_colours_averages_each_photo_over_each_map_class():
    y = maps()
    real = np.zeros_like(y)
    real[0, 0, :3] = (78, 78, 84)        # the major roads' pixels: dark grey
    real[0, 0, 0] = (81, 81, 87)
    fake = np.full_like(y, 120)
    fake[0, 0, :3] = (150, 116, 75)     # painted warm
    rows = {r.split(" | ")[0].strip("| "): r for r in photo_colours(y, {"real": real, "fake": fake}).splitlines()[2:]}
    assert rows["major roads"] == "| major roads | (79, 79, 85) | (150, 116, 75) |"
    assert rows["land"] == "| land | (0, 0, 0) | (120, 120, 120) |"  # land includes none of the road pixels
    assert set(rows) == {"land", "major roads", "white roads"}  # classes absent from the maps are left out


def test_b2a_table_shows_the_gan_decoder_beside_the_expected_one():
    torch.manual_seed(0)
    cfg = {"preset": "paper", "dim": 8, "n_res": 1, "image_size": 16, "expected": "a"}
    gen = UNIT.from_config(cfg).gen.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        gan = GanDecoder(gen).translate(x, "b2a")
        assert torch.equal(gan, gen.decode(gen.encode(x, "b"), "a", x))
        assert not torch.allclose(gan, gen.translate(x, "b2a"))  # translate uses the expected decoder
    rng = np.random.default_rng(0)
    photos, y = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8), np.tile(maps(), (2, 4, 4, 1))
    header = b2a_table(gen, photos, y).splitlines()[0]
    assert header == "| map class | real photo | GAN decoder | expected decoder |"
    plain = UNIT.from_config({**cfg, "expected": ""}).gen.eval()
    assert b2a_table(plain, photos, y).splitlines()[0] == "| map class | real photo | GAN decoder |"


def test_probability_table_averages_each_colours_probability_and_the_mixture_per_class():
    y = maps()  # 12 land, 3 major-road, 1 white-road pixels
    colours = np.array([MAP_COLOURS[LAND], MAP_COLOURS[MAJOR_ROAD]], np.float64)
    probs = np.zeros((1, 4, 4, 2))
    probs[..., 0] = 1.0                     # land pixels: all land
    probs[0, 0, :3] = (0.5, 0.5)            # major roads: an even blend
    probs[0, 3, 3] = (0.25, 0.75)           # the white road: mostly orange
    rows = {r.split(" | ")[0].strip("| "): r for r in probability_table(probs, colours, y).splitlines()}
    assert rows["class"] == "| class | land | major roads | mixture |"  # the palette named by nearest map colour
    assert rows["land"] == "| land | 1.000 | 0.000 | (242, 239, 233) |"
    assert rows["major roads"] == "| major roads | 0.500 | 0.500 | (244, 214, 164) |"  # (242+246)/2, (239+190)/2, ...
    assert rows["white roads"] == "| white roads | 0.250 | 0.750 | (245, 202, 130) |"


def test_probabilities_are_the_translators_and_sum_to_one():
    torch.manual_seed(0)
    gen = UNIT.from_config({"preset": "tiny", "palette_b": [MAP_COLOURS[LAND], MAP_COLOURS[ROAD]]}).gen.eval()
    x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    p = probabilities(gen, x, batch_size=2)  # two batches, joined in order
    assert p.shape == (3, 16, 16, 2) and np.allclose(p.sum(-1), 1, atol=1e-5)
    with torch.no_grad():
        want = gen.colour_probabilities(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1, "a2b")
    assert np.allclose(p, want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_beside_marks_the_four_neighbours_only():
    m = np.zeros((1, 3, 3), bool)
    m[0, 1, 1] = True
    want = np.zeros((1, 3, 3), bool)
    want[0, 0, 1] = want[0, 2, 1] = want[0, 1, 0] = want[0, 1, 2] = True
    assert np.array_equal(beside(m), want)


def test_outline_kinds_tells_road_casings_from_building_outlines():
    """One 5 x 6 map: a white road (row 0) with its casing (row 1); a 3 x 3 building (rows 2-4,
    columns 0-2) with one fill pixel; a lone outline pixel (row 4, column 5)."""
    y = np.empty((1, 5, 6, 3), np.uint8)
    y[:] = MAP_COLOURS[LAND]
    y[0, 0, :] = MAP_COLOURS[ROAD]
    y[0, 1, :] = MAP_COLOURS[EDGE]
    y[0, 2:5, 0:3] = MAP_COLOURS[EDGE]
    y[0, 3, 1] = MAP_COLOURS[BUILDING]
    y[0, 4, 5] = MAP_COLOURS[EDGE]
    pred = y.copy()
    pred[0, 2:5, 0:3] = MAP_COLOURS[LAND]  # the building painted as land
    rows = {r.split(" | ")[0].strip("| "): r for r in outline_kinds(pred, y).splitlines()[2:]}
    # the 6 casing pixels touch the road; the ring's top row, below them, touches no road
    assert rows["road casings (beside a road)"] == "| road casings (beside a road) | 0.200 | 1.000 | outlines 1.00 |"
    # the fill's 4-neighbours in the ring: (2, 1), (4, 1), (3, 0), (3, 2), all painted land
    assert rows["building outlines (beside a fill)"] == "| building outlines (beside a fill) | 0.133 | 0.000 | land 1.00 |"
    # the ring's 4 corners and the lone pixel: 1 of 5 right
    assert rows["beside neither (buildings without a fill)"].startswith(
        "| beside neither (buildings without a fill) | 0.167 | 0.200 | land 0.80, outlines 0.20")
    assert "beside a road and a fill" not in rows  # no such pixel: no row


class MarkedDecoders(torch.nn.Module):
    """A translator whose b2a photos are flat marks (-1 from the GAN decoder, 0 from the expected
    one) and whose a2b paints the map `truth` from the GAN decoder's mark, land from the expected
    decoder's, white from anything else (the real photos)."""

    expected = "a"

    def __init__(self, truth: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.truth = torch.from_numpy(truth).permute(0, 3, 1, 2).float() / 127.5 - 1

    def translate(self, x, direction, decoder="auto"):
        if direction == "b2a":
            return torch.full_like(x, -1.0 if decoder == "gan" else 0.0)
        if (x == -1).all():
            return self.truth[:len(x)]
        land = torch.tensor(MAP_COLOURS[LAND]).float().view(1, 3, 1, 1) / 127.5 - 1
        return land.expand_as(x).clone() if (x.abs() < 0.01).all() else torch.ones_like(x)  # 0 after uint8


def test_read_back_table_scores_a2b_on_real_photos_and_on_the_decoders_photos_of_the_truth():
    y = maps()  # 12 land pixels of 16
    rows = read_back_table(MarkedDecoders(y), np.full_like(y, 90), y).splitlines()
    assert rows[0] == "| a2b translates | pixel acc |"
    assert rows[2] == "| the real photos | 0.0625 |"  # all white: right on the one white-road pixel
    assert rows[3] == "| the GAN decoder's photos of the truth maps | 1.0000 |"
    assert rows[4] == "| the expected decoder's photos of the truth maps | 0.7500 |"
    plain = MarkedDecoders(y)
    plain.expected = ""
    assert len(read_back_table(plain, np.full_like(y, 90), y).splitlines()) == 4  # no expected decoder: no row
