"""bench/recipe_variants.py: dis-embed-b (the map discriminator judges a translation by its palette
colours' features weighted by their probabilities, in both steps; real maps as before at full size)
and cycle-chroma-a (back-translation reading the photo translations in 4:2:0 chroma, as JPEG stores
the real photos)."""
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


def _rgb(x: torch.Tensor):
    """([B, H, W] luma, [B, 2, H, W] chroma) of RGB images in [-1, 1] (JFIF YCbCr, unscaled)."""
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return y, torch.stack([(b - y) / 1.772, (r - y) / 1.402], 1)


def test_chroma_420_keeps_the_luma_and_halves_the_chroma_resolution():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 0.5 - 0.25  # no channel near the clamp
    y, c = _rgb(x)
    y2, c2 = _rgb(rv.chroma_420(x))
    assert torch.allclose(y2, y, atol=1e-5)
    assert not torch.allclose(c2, c, atol=1e-2)
    # the chroma left is that of the 2 x 2 block means: an image whose chroma is flat in every block
    # keeps it, up to the bilinear upsampling between blocks, which a flat image does not see
    flat = torch.full((1, 3, 8, 8), 0.1) + torch.tensor([0.2, -0.1, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(rv.chroma_420(flat), flat, atol=1e-5)


def test_chroma_420_brings_a_rendered_photo_nearer_its_jpeg():
    """Against the demo corpus's own JPEG of its photos (pipeline.demo.encode_aerial: 4:2:0)."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.demo import encode_aerial, render_scene, scene_seed

    raw = np.stack([render_scene(scene_seed(0, "test", i), 32)[0] for i in range(6)])
    stored = np.stack([np.asarray(Image.open(io.BytesIO(encode_aerial(a))).convert("RGB"), np.float64) for a in raw])
    t = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1
    c = ((rv.chroma_420(t) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(c - stored).mean() < 0.8 * np.abs(raw - stored).mean()


def test_cycle_chroma_a_reads_back_detached_photo_translations_and_keeps_the_expected_decoder():
    cfg = {**CFG, "expected": "a"}
    torch.manual_seed(0)
    plain, unit = UNIT.from_config(cfg), UNIT.from_config(cfg)
    unit.load_state_dict(plain.state_dict())
    x_a, x_b = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    rv.cycle_chroma(unit)
    torch.manual_seed(1)
    ref = plain.gen(x_a, x_b)
    torch.manual_seed(1)
    out = unit.gen(x_a, x_b)
    assert set(out) == set(ref)  # exp_a, the expected decoder's output, included
    assert torch.equal(out["x_ba"], ref["x_ba"]) and torch.equal(out["exp_a"], ref["exp_a"])
    assert not torch.allclose(out["x_bab"], ref["x_bab"], atol=1e-5)  # read back from other colours
    out["x_bab"].sum().backward()  # back-translation: nothing reaches the decoder that painted x_ba
    assert all(p.grad is None for p in unit.gen.dec_a.parameters())
