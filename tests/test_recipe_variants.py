"""bench/recipe_variants.py's dis-embed-b: the map discriminator judges a translation by its palette
colours' features weighted by their probabilities, in both steps; real maps as before at full size."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import recipe_variants as rv  # noqa: E402
from model.unit import UNIT  # noqa: E402

CFG = {"preset": "paper", "dim": 8, "n_res": 1, "image_size": 32, "skip": "image", "cycle_detach": True,
       "palette_b": [[242, 239, 233], [160, 146, 136], [246, 190, 96]], "dis_colour_octaves": 4}


def test_dis_embed_b_judges_the_probabilities_not_their_mixture():
    torch.manual_seed(0)
    unit = UNIT.from_config(CFG)
    x_a, x_b = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    plain = type(unit.dis.dis_b).forward
    torch.manual_seed(1)
    before = unit.gen(x_a, x_b)
    rv.dis_embed_b(unit)
    torch.manual_seed(1)
    out = unit.gen(x_a, x_b)
    assert torch.equal(out["x_ab"], before["x_ab"])  # the generator paints what it painted
    judged = unit.dis.dis_b(out["x_ab"])
    mixture = plain(unit.dis.dis_b, out["x_ab"].detach())
    assert all(not torch.allclose(j, m, atol=1e-4) for j, m in zip(judged, mixture))
    judged[0].mean().backward()
    assert unit.gen.head("b").conv.weight.grad.abs().sum() > 0  # the G step reaches the palette logits
    # the D step's batch (reals, then the detached translation) judges the fakes as the G step did
    d = unit.dis(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach())
    assert torch.allclose(d["b_fake"][0], judged[0].detach(), atol=1e-6)
    # real maps: the full-size scale as the model's; the coarser one pools the features, not the colours
    new, old = unit.dis.dis_b(x_b), plain(unit.dis.dis_b, x_b)
    assert torch.allclose(new[0], old[0], atol=1e-6) and not torch.allclose(new[1], old[1], atol=1e-4)


def test_dis_embed_b_needs_colour_features_and_a_palette():
    with pytest.raises(SystemExit, match="dis_colour_octaves"):
        rv.dis_embed_b(UNIT.from_config({**CFG, "dis_colour_octaves": 0}))
    with pytest.raises(SystemExit, match="palette_b=auto"):
        rv.dis_embed_b(UNIT.from_config({**CFG, "palette_b": []}))


def test_dis_embed_b_late_judges_as_the_model_until_its_start():
    torch.manual_seed(0)
    unit = UNIT.from_config(CFG)
    x_a, x_b = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    plain = type(unit.dis.dis_b).forward
    rv.dis_embed_b(unit, start=1)
    out = unit.gen(x_a, x_b)  # G step 1: before the start
    assert all(torch.equal(j, m) for j, m in zip(unit.dis.dis_b(out["x_ab"]), plain(unit.dis.dis_b, out["x_ab"])))
    out = unit.gen(x_a, x_b)  # G step 2: judged by the probabilities
    assert not torch.allclose(unit.dis.dis_b(out["x_ab"])[0], plain(unit.dis.dis_b, out["x_ab"])[0], atol=1e-4)
