"""Test-time augmentation (UNITConfig.tta): eval-mode translate() averages the translations of the
input's flips, flipped back (a palette domain's colour probabilities, another domain's images);
training and tta "none" translate the input alone."""
from __future__ import annotations

import pytest
import torch

from model.unit import UNIT, UNITConfig, flip_view, mean_of_views

PALETTE = [[242, 239, 233], [160, 146, 136], [150, 196, 236], [255, 255, 255]]


def tiny(tta: str, **cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    gen = UNIT.from_config({"preset": "tiny", "skip": "image", "palette_b": PALETTE, "tta": tta, **cfg}).gen
    return gen.eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_views_are_flips_and_their_mean_undoes_them(x):
    assert torch.equal(flip_view(x, 1), x.flip(-1)) and torch.equal(flip_view(x, 2), x.flip(-2))
    assert torch.equal(flip_view(flip_view(x, 3), 3), x)
    views = torch.cat([flip_view(x, k) for k in range(4)])
    assert torch.allclose(mean_of_views(views, 4), x)


@torch.no_grad()
def test_hflip_averages_the_image_and_its_mirror(x):
    """b2a paints RGB (tanh head): the mean of the translation and the mirrored translation of the mirror."""
    plain, tta = tiny("none"), tiny("hflip")
    want = (plain.translate(x, "b2a") + plain.translate(x.flip(-1), "b2a").flip(-1)) / 2
    got = tta.translate(x, "b2a")
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, plain.translate(x, "b2a"), atol=1e-3)


@torch.no_grad()
def test_flips_make_the_translation_equivariant_in_both_heads(x):
    """The average over the flip group commutes with every flip; one view does not."""
    for direction in ("a2b", "b2a"):  # a2b: the palette head, b2a: the tanh head
        for tta, holds in (("flips", True), ("none", False)):
            gen = tiny(tta)
            y, y_flipped = gen.translate(x, direction), gen.translate(x.flip(-2), direction).flip(-2)
            same = torch.allclose(y, y_flipped, atol=1e-5)
            assert same == holds, (direction, tta)


@torch.no_grad()
def test_a_palette_domain_gets_the_most_probable_colour_of_the_mean_probabilities(x):
    gen = tiny("flips")
    out = gen.translate(x, "a2b")
    colours = torch.tensor(PALETTE, dtype=torch.float32) / 127.5 - 1
    on_palette = (out.permute(0, 2, 3, 1).reshape(-1, 1, 3) - colours).abs().amax(-1).min(-1).values
    assert on_palette.max() < 1e-6  # every pixel exactly a palette colour, not a blend


def test_training_mode_translates_the_input_alone(x):
    plain, tta = tiny("none").train(), tiny("flips").train()
    with torch.no_grad():
        assert torch.equal(tta.translate(x, "b2a"), plain.translate(x, "b2a"))


def test_an_unknown_tta_is_refused():
    with pytest.raises(ValueError, match="tta='rot90' is not one of"):
        UNITConfig(tta="rot90")


def test_tta_may_change_on_resume_but_a_generator_field_may_not():
    from pathlib import Path

    from launch.config import load_config, resume_differences

    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    saved = load_config(demo).model_dump(mode="json")
    assert saved["model"]["tta"] == "flips"  # make demo's setting
    assert resume_differences(saved, load_config(demo, ["model.tta=none"])) == []
    assert resume_differences(saved, load_config(demo, ["model.dim=8"])) != []


@torch.no_grad()
@pytest.mark.parametrize("tta", ["none", "flips"])
def test_colour_probabilities_are_what_eval_paints_the_most_probable_colour_of(x, tta):
    gen = tiny(tta)
    p = gen.colour_probabilities(x, "a2b")
    assert p.shape == (3, len(PALETTE), 16, 24)
    assert torch.allclose(p.sum(1), torch.ones(3, 16, 24), atol=1e-5) and (p >= 0).all()
    colours = torch.tensor(PALETTE, dtype=torch.float32) / 127.5 - 1
    assert torch.equal(gen.translate(x, "a2b"), colours[p.argmax(1)].permute(0, 3, 1, 2))
    # with flips they are the views' mean, which no single view gives
    one = tiny("none").colour_probabilities(x, "a2b")
    assert torch.allclose(p, one) == (tta == "none")


@torch.no_grad()
def test_colour_probabilities_follow_the_decoder_and_refuse_a_domain_without_a_palette(x):
    gen = tiny("none", expected="b")
    assert not torch.allclose(gen.colour_probabilities(x, "a2b"), gen.colour_probabilities(x, "a2b", decoder="gan"))
    with pytest.raises(ValueError, match="domain a has no palette"):
        gen.colour_probabilities(x, "b2a")
    with pytest.raises(ValueError, match="direction 'a2a'"):
        gen.colour_probabilities(x, "a2a")
