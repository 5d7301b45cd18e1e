"""bench/recipe_variants.py: dis-embed-b (the map discriminator judges a translation by its palette
colours' features weighted by their probabilities, in both steps; real maps as before at full size),
cycle-chroma-a (back-translation reading the photo translations in 4:2:0 chroma, as JPEG stores
the real photos), and the back-translation variants bt-ce-b, bt-recolour-a, bt-exp-a, self-train."""
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


def _maps(n: int, seed: int = 2) -> torch.Tensor:
    """n random 32 px maps painted in CFG's palette colours, in [-1, 1]."""
    pal = torch.tensor(CFG["palette_b"], dtype=torch.float32) / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    return pal[torch.randint(0, len(pal), (n, 32, 32), generator=g)].permute(0, 3, 1, 2).contiguous()


def test_bt_ce_b_is_the_cross_entropy_of_the_cycle_maps_logits_against_the_real_maps_colours():
    torch.manual_seed(0)
    unit = UNIT.from_config(CFG)
    x_a, x_b = torch.rand(2, 3, 32, 32) * 2 - 1, _maps(2)
    rv.cycle_cross_entropy(10.0)(unit)
    head, seen = unit.gen.head("b"), []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = unit.gen(x_a, x_b)
    # the variant's loss reads the last map of the pass, x_bab: its logits paint x_bab exactly
    logits = head.logits(seen[-1])
    assert torch.allclose(head.paint(logits.softmax(1)).permute(0, 3, 1, 2), out["x_bab"], atol=1e-6)
    index = torch.cdist(x_b.permute(0, 2, 3, 1).flatten(1, 2), head.colours.unsqueeze(0)).argmin(-1).view(2, 32, 32)
    want = 10.0 * torch.nn.functional.cross_entropy(logits, index)
    assert torch.allclose(unit.gen.extra_loss(out, x_a, x_b), want)
    other = _maps(2, seed=3)  # against other maps the loss differs: it reads x_b's colours
    assert not torch.allclose(unit.gen.extra_loss(out, x_a, other), want)


@pytest.mark.parametrize("only", [None, (160, 146, 136)])
def test_bt_recolour_a_shifts_each_map_class_of_the_photo_translations_by_one_offset(only):
    torch.manual_seed(0)
    unit = UNIT.from_config(CFG)
    x_a, x_b = torch.rand(2, 3, 32, 32) * 2 - 1, _maps(2)
    rv.recoloured_back_translation(0.2, only)(unit)
    out = unit.gen(x_a, x_b)
    x_ba = torch.zeros_like(out["x_ba"])  # mid-grey photos: no offset is clamped away
    c_ba, c_ab = unit.gen.cycle_sources(x_ba, out["x_ab"])
    assert torch.equal(c_ab, out["x_ab"].detach()) and not c_ba.requires_grad
    colours = torch.tensor(CFG["palette_b"], dtype=torch.float32) / 127.5 - 1
    for k, colour in enumerate(colours):
        mask = (x_b - colour[:, None, None]).abs().amax(1) < 1e-4  # [2, 32, 32]
        for i in range(2):
            shift = c_ba[i][:, mask[i]]
            assert mask[i].any() and torch.allclose(shift, shift[:, :1].expand_as(shift))  # one offset a class
            moved = shift.abs().max() > 1e-3
            assert bool(moved) == (only is None or tuple(CFG["palette_b"][k]) == only)


def test_bt_exp_a_reads_back_the_expected_decoders_photos_of_the_real_maps_after_its_start():
    cfg = {**CFG, "expected": "a"}
    torch.manual_seed(0)
    unit = UNIT.from_config(cfg)
    x_a, x_b = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    rv.expected_back_translation(0.5, start=1)(unit)
    gen = unit.gen
    first = gen(x_a, x_b)  # step 1: the GAN decoder's photos, as the config reads back
    c_ba, _ = gen.cycle_sources(first["x_ba"], first["x_ab"])
    assert torch.equal(c_ba, first["x_ba"].detach())
    out = gen(x_a, x_b)  # step 2: the first half of the batch from the expected decoder
    c_ba, _ = gen.cycle_sources(out["x_ba"], out["x_ab"])
    with torch.no_grad():
        painted = gen._back("a", gen.dec_shared(gen.encode(x_b[:2], "b")), x_b[:2], "exp")
    assert torch.allclose(c_ba[:2], painted, atol=1e-6) and torch.equal(c_ba[2:], out["x_ba"][2:].detach())


def test_self_train_pulls_the_map_translations_to_an_ema_teachers_maps_after_its_start():
    torch.manual_seed(0)
    unit = UNIT.from_config({**CFG, "tta": "hflip"})
    x_a, x_b = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    rv.self_training(30.0, start=1, decay=0.5)(unit)
    out = unit.gen(x_a, x_b)
    assert float(unit.gen.extra_loss(out, x_a, x_b)) == 0.0  # step 1: before the start
    with torch.no_grad():
        for p in unit.gen.parameters():
            p.add_(0.01)
    loss = unit.gen.extra_loss(out, x_a, x_b)
    assert loss.requires_grad and float(loss) > 0
    shifted = UNIT.from_config({**CFG, "tta": "hflip"})
    shifted.gen.load_state_dict(unit.gen.state_dict())
    with torch.no_grad():
        for p in shifted.gen.parameters():
            p.sub_(0.005)  # the teacher, half way from the initial weights to the student's (decay 0.5)
    target = shifted.gen.eval().translate(x_a, "a2b")
    assert torch.allclose(loss, 30.0 * (out["x_ab"] - target).abs().mean(), atol=1e-5)
