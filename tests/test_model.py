"""Tests of model/: shapes, weight sharing, losses, presets, config, translate, EMA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import losses
from model.ema import EMA
from model.networks import LayerNorm, Pad, UpConvBlock, count_params, set_fused_upsample
from model.unit import PRESETS, UNIT, UNITConfig, discriminator_loss, generator_loss

torch.set_num_threads(1)

WEIGHTS = {"w_recon": ("recon_a", "recon_b"), "w_kl": ("kl_a", "kl_b"), "w_gan": ("gan_a", "gan_b"),
           "w_cyc": ("cyc_a", "cyc_b"), "w_cyc_kl": ("cyc_kl_a", "cyc_kl_b")}


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1


def smooth_images(n, size, seed):
    """Low-frequency colour patterns: learnable by a small autoencoder, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def tiny(**kw):
    torch.manual_seed(0)
    return UNIT.from_config({"preset": "tiny", **kw})


def grads(module):
    return {k: (p.grad.clone() if p.grad is not None else None) for k, p in module.named_parameters()}


# ---------------------------------------------------------------- shapes and scales
@pytest.mark.parametrize("size", [32, 64, 128])
def test_output_shapes(size):
    unit = tiny()
    x_a, x_b = images(2, size)
    out = unit.gen(x_a, x_b)
    for k in ("x_aa", "x_bb", "x_ab", "x_ba", "x_aba", "x_bab"):
        assert out[k].shape == (2, 3, size, size), k
        assert out[k].abs().max() <= 1.0  # tanh
    latent = (2, 16 * 4, size // 4, size // 4)
    for k in ("mu_a", "mu_b", "mu_ab", "mu_ba"):
        assert out[k].shape == latent, k
    assert unit.translate(x_a, "a2b").shape == x_a.shape
    preds = unit.dis(x_a, x_b, out["x_ba"], out["x_ab"])
    # tiny: 2 layers of stride 2, 2 scales
    assert [tuple(p.shape) for p in preds["a_fake"]] == [(2, 1, size // 4, size // 4), (2, 1, size // 8, size // 8)]


def test_discriminator_scales_adapt_to_small_images():
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "paper", "dim": 8, "dis_dim": 8})  # 3 scales, 4 layers
    d = unit.dis.dis_a
    assert len(d.nets) == 3
    assert [len(d(torch.zeros(1, 3, s, s))) for s in (16, 32, 64, 128)] == [1, 2, 3, 3]
    x_a, x_b = images(2, 32)
    out = unit.gen(x_a, x_b)
    loss, _ = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="at least 16 px"):
        d(torch.zeros(1, 3, 8, 8))
    # with image_size given, only the scales that size uses are built: no unused parameters
    small = UNIT.from_config({"preset": "paper", "dim": 8, "dis_dim": 8, "image_size": 32})
    assert len(small.dis.dis_a.nets) == 2
    with pytest.raises(ValueError, match="image_size"):
        UNIT.from_config({"preset": "paper", "image_size": 8})


# ---------------------------------------------------------------- weight sharing
def test_sharing_is_one_module_counted_once_and_trained_by_both_domains():
    unit = tiny(n_res=2, n_shared=1)
    gen = unit.gen
    assert gen.encoder("a")[1] is gen.encoder("b")[1] is gen.enc_shared
    assert gen.decoder("a")[0] is gen.decoder("b")[0] is gen.dec_shared
    shared = count_params(gen.enc_shared, gen.dec_shared)
    assert shared == 2 * 2 * (64 * 64 * 9 + 64)  # one res block each side: two 3x3 convs
    total = sum(p.numel() for p in gen.parameters())
    assert total == gen.domain_param_count("a") + gen.domain_param_count("b") - shared
    assert sum(v.numel() for v in gen.state_dict().values()) == total  # no aliased keys

    # the shared module runs in both domains' paths
    calls = []
    gen.enc_shared.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x_a, x_b = images(2, 32)
    gen.encode(x_a, "a"), gen.encode(x_b[:1], "b")
    assert calls == [2, 1]

    # gradients from each domain alone reach the shared layers, and only that domain's own layers
    for d, other in (("a", "b"), ("b", "a")):
        gen.zero_grad(set_to_none=True)
        x = x_a if d == "a" else x_b
        gen.decode(gen.encode(x, d), d).sum().backward()
        g = grads(gen)
        for prefix in ("enc_shared", "dec_shared", f"enc_{d}", f"dec_{d}"):
            assert all(v is not None and v.abs().sum() > 0 for k, v in g.items()
                       if k.startswith(prefix) and "weight" in k), prefix
        assert all(v is None for k, v in g.items() if k.startswith((f"enc_{other}", f"dec_{other}")))


def test_no_sharing_when_n_shared_is_zero():
    unit = tiny(n_shared=0)
    assert count_params(unit.gen.enc_shared, unit.gen.dec_shared) == 0
    gen = unit.gen
    assert sum(p.numel() for p in gen.parameters()) == gen.domain_param_count("a") + gen.domain_param_count("b")


def test_official_preset_parameter_counts():
    cfg = UNITConfig(**PRESETS["official"])
    assert (cfg.dim, cfg.n_res, cfg.n_shared, cfg.dis_scales, cfg.dis_layers) == (64, 4, 0, 3, 4)
    unit = UNIT(cfg)
    assert unit.gen.domain_param_count("a") == 11_140_483
    assert unit.gen.domain_param_count("b") == 11_140_483
    assert count_params(unit.dis.dis_a) == 8_271_171
    assert count_params(unit.dis.dis_b) == 8_271_171
    assert (cfg.w_gan, cfg.w_recon, cfg.w_kl, cfg.w_cyc, cfg.w_cyc_kl) == (1, 10, 0.01, 10, 0.01)
    paper = UNITConfig(**PRESETS["paper"])
    assert (paper.n_shared, paper.w_gan, paper.w_recon, paper.w_kl, paper.w_cyc, paper.w_cyc_kl) == (1, 10, 100, 0.1, 100, 0.1)


def test_init():
    unit = UNIT.from_config({"preset": "paper", "dim": 16, "dis_dim": 16})
    w = unit.gen.enc_a[0][1].weight  # 7x7 conv, fan_in 3*49
    assert abs(w.std().item() - math.sqrt(2 / (3 * 49))) < 0.02
    w = unit.gen.enc_shared[0].body[0][1].weight
    assert abs(w.std().item() - math.sqrt(2 / (64 * 9))) < 0.003
    for m in unit.dis.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() > 1000:
            assert abs(m.weight.std().item() - 0.02) < 0.002
            assert m.bias.abs().max() == 0


def test_layer_norm_matches_hand_computation():
    ln = LayerNorm(2)
    with torch.no_grad():
        ln.gamma.copy_(torch.tensor([2.0, 1.0]))
        ln.beta.copy_(torch.tensor([0.0, 0.5]))
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 2, 2, 1)
    mean, std = 3.0, math.sqrt(((4 + 1 + 0 + 9) / 3))  # unbiased std over C, H, W
    want = torch.tensor([2 * (1 - mean), 2 * (2 - mean), (3 - mean), (6 - mean)]) / (std + 1e-5)
    want += torch.tensor([0, 0, 0.5, 0.5])
    assert torch.allclose(ln(x).flatten(), want, atol=1e-5)


@pytest.mark.parametrize("pad_type", ["reflect", "zero", "replicate"])
def test_fused_upsample_conv_equals_upsample_then_conv(pad_type):
    torch.manual_seed(0)
    block = UpConvBlock(5, 3, "none", "none", pad_type)
    torch.nn.init.normal_(block.conv.bias)
    for h, w in ((2, 2), (3, 5), (8, 6)):
        x = torch.randn(2, 5, h, w, requires_grad=True)
        res = {}
        for fused in (True, False):
            block.fused = fused
            y = block(x)
            res[fused] = (y, *torch.autograd.grad(y.pow(3).sum(), [x, block.conv.weight, block.conv.bias]))
        # the plain path is the literal definition: nearest upsample, pad 2, conv 5x5 (up to float32
        # rounding: in training it runs channels-last, which oneDNN sums in another order on some
        # CPUs, about 1e-6 here against outputs of about 2; a wrong pad or upsample is off by ~1)
        mode = {"zero": "constant"}.get(pad_type, pad_type)
        want = block.conv(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (2, 2, 2, 2), mode=mode))
        assert torch.allclose(res[False][0], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert res[True][0].shape == (2, 3, 2 * h, 2 * w)
        for a, b in zip(res[True], res[False]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item()), (h, w)


def test_fused_upsample_is_a_switch_with_the_same_weights():
    unit = tiny()
    x_a, x_b = images(2, 32)
    unit.eval()
    y = unit.translate(x_a, "a2b")
    plain = UNIT.from_config({**unit.config(), "fused_upsample": False}).eval()
    plain.load_state_dict(unit.state_dict())
    assert torch.allclose(plain.translate(x_a, "a2b"), y, atol=1e-5)
    set_fused_upsample(unit, False)
    assert all(not m.fused for m in unit.modules() if isinstance(m, UpConvBlock))
    assert torch.allclose(unit.translate(x_a, "a2b"), y, atol=1e-5)


def test_fused_upsample_phases_move_with_the_block_and_stay_out_of_its_state_dict():
    # on a GPU a constant read from host memory would be copied (and waited for) in every forward
    block = UpConvBlock(4, 2, "ln", "relu", "reflect")
    assert set(block.state_dict()) == {"conv.weight", "conv.bias", "norm.gamma", "norm.beta"}
    block = block.to(torch.float64)
    assert block.phase.dtype == torch.float64
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    y = block(x)
    block.fused = False
    assert y.dtype == torch.float64 and torch.allclose(y, block(x), atol=1e-12)


# ---------------------------------------------------------------- losses
def test_loss_primitives_by_hand():
    a = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    assert losses.l1(a, b).item() == pytest.approx((0.5 + 2 + 0 + 1) / 4)
    assert losses.kl(a).item() == pytest.approx((0.25 + 1 + 4 + 0) / 4)
    d = [torch.tensor([0.5, -1.0]), torch.tensor([2.0])]  # two scales, summed
    r = [torch.tensor([1.5, 0.0]), torch.tensor([-0.5])]
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    assert losses.gan_g(d, "lsgan").item() == pytest.approx((0.25 + 4) / 2 + 1)
    assert losses.gan_g(d, "nsgan").item() == pytest.approx((sp(-0.5) + sp(1.0)) / 2 + sp(-2.0))
    assert losses.gan_g(d, "hinge").item() == pytest.approx(-(-0.25) - 2.0)
    # real r, fake d
    assert losses.gan_d(r, d, "lsgan").item() == pytest.approx(
        (0.25 + 1) / 2 + (0.25 + 1) / 2 + 2.25 + 4)
    assert losses.gan_d(r, d, "nsgan").item() == pytest.approx(
        (sp(-1.5) + sp(0.0)) / 2 + (sp(0.5) + sp(-1.0)) / 2 + sp(0.5) + sp(2.0))
    assert losses.gan_d(r, d, "hinge").item() == pytest.approx(
        (0 + 1) / 2 + (1.5 + 0) / 2 + 1.5 + 3.0)
    with pytest.raises(ValueError, match="gan_type"):
        losses.gan_g(d, "wgan")


def test_generator_and_discriminator_loss_terms_by_hand():
    unit = tiny(w_gan=2.0, w_recon=3.0, w_kl=0.5, w_cyc=5.0, w_cyc_kl=0.25)
    x_a, x_b = images(2, 32)
    out = unit.gen(x_a, x_b)
    loss, t = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    want = {
        "recon_a": (out["x_aa"] - x_a).abs().mean(), "recon_b": (out["x_bb"] - x_b).abs().mean(),
        "kl_a": (out["mu_a"] ** 2).mean(), "kl_b": (out["mu_b"] ** 2).mean(),
        "gan_a": sum(((p - 1) ** 2).mean() for p in unit.dis.dis_a(out["x_ba"])),
        "gan_b": sum(((p - 1) ** 2).mean() for p in unit.dis.dis_b(out["x_ab"])),
        "cyc_a": (out["x_aba"] - x_a).abs().mean(), "cyc_b": (out["x_bab"] - x_b).abs().mean(),
        "cyc_kl_a": (out["mu_ab"] ** 2).mean(), "cyc_kl_b": (out["mu_ba"] ** 2).mean(),
    }
    assert set(t) == set(want)
    for k in want:
        assert t[k].item() == pytest.approx(want[k].item(), rel=1e-5), k
        assert not t[k].requires_grad
    w = {"recon": 3.0, "kl": 0.5, "gan": 2.0, "cyc": 5.0, "cyc_kl": 0.25}
    total = sum(w[k.rsplit("_", 1)[0]] * v for k, v in want.items())
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)

    fa, fb = out["x_ba"].detach(), out["x_ab"].detach()
    loss_d, td = discriminator_loss(unit.dis(x_a, x_b, fa, fb), unit.cfg)
    d_a = sum(((r - 1) ** 2).mean() + (f ** 2).mean() for r, f in zip(unit.dis.dis_a(x_a), unit.dis.dis_a(fa)))
    d_b = sum(((r - 1) ** 2).mean() + (f ** 2).mean() for r, f in zip(unit.dis.dis_b(x_b), unit.dis.dis_b(fb)))
    assert td["d_a"].item() == pytest.approx(d_a.item(), rel=1e-5)
    assert td["d_b"].item() == pytest.approx(d_b.item(), rel=1e-5)
    assert loss_d.item() == pytest.approx(2.0 * (d_a + d_b).item(), rel=1e-5)


@pytest.mark.parametrize("skip", ["none", "image"])
def test_batched_pass_equals_one_call_per_domain(skip):
    """The batched forward gives what separate per-domain encoder/decoder calls give; with
    skip="image" each decoder sees the image its z was encoded from."""
    unit = tiny(skip=skip)
    gen = unit.gen
    x_a, x_b = images(2, 32)
    torch.manual_seed(5)
    out = gen(x_a, x_b)
    torch.manual_seed(5)
    # randn(shape), as UNITGenerator.sample draws: randn_like would follow the channels-last
    # layout of the training-mode activations and fill the same numbers in another order
    mu_a, mu_b = gen.encode(x_a, "a"), gen.encode(x_b, "b")
    z_a, z_b = mu_a + torch.randn(mu_a.shape), mu_b + torch.randn(mu_b.shape)
    x_ab, x_ba = gen.decode(z_a, "b", x_a), gen.decode(z_b, "a", x_b)
    mu_ba, mu_ab = gen.encode(x_ba, "a"), gen.encode(x_ab, "b")
    z_ba, z_ab = mu_ba + torch.randn(mu_ba.shape), mu_ab + torch.randn(mu_ab.shape)
    want = {"x_aa": gen.decode(z_a, "a", x_a), "x_bb": gen.decode(z_b, "b", x_b), "x_ab": x_ab, "x_ba": x_ba,
            "x_aba": gen.decode(z_ab, "a", x_ab), "x_bab": gen.decode(z_ba, "b", x_ba),
            "mu_a": mu_a, "mu_b": mu_b, "mu_ab": mu_ab, "mu_ba": mu_ba}
    for k, v in want.items():
        assert torch.allclose(out[k], v, atol=1e-5), k


def test_skip_image_decoders_see_the_source_at_full_resolution():
    unit = tiny(skip="image").eval()
    gen = unit.gen
    x_a, _ = images(2, 32)
    with torch.no_grad():
        y = gen.translate(x_a, "a2b")
        assert torch.equal(y, gen.decode(gen.encode(x_a, "a"), "b", x_a))
        # one pixel of the source changes the translation there, past the latent's resolution
        x2 = x_a.clone()
        x2[:, :, 16, 16] = -x2[:, :, 16, 16]
        d = (gen.decode(gen.encode(x_a, "a"), "b", x2) - y).abs().sum(1)
        # the 3x3 + 7x7 head reaches 4 px; farther only the layer norm's image statistics move
        assert d[:, 16, 16].min() > 50 * d[:, :4, :4].max()
    with pytest.raises(ValueError, match="skip='image'"):
        gen.decode(gen.encode(x_a, "a"), "b")
    with pytest.raises(ValueError, match="source image"):
        gen.decode(gen.encode(x_a, "a"), "b", x_a[:, :, :16, :16])
    with pytest.raises(ValueError, match="skip"):
        tiny(skip="unet")
    assert tiny().gen.dec_a[-1][1].in_channels == 16  # skip none: the plain 7x7 conv to RGB
    assert unit.gen.dec_a[-1].mix[1].in_channels == 16 + 3


PALETTE = [[242, 239, 233], [160, 146, 136], [150, 196, 236]]


@pytest.mark.parametrize("skip", ["none", "image"])
def test_palette_head_mixes_in_training_and_paints_the_most_probable_colour_in_eval(skip):
    unit = tiny(skip=skip, palette_b=PALETTE)
    gen = unit.gen
    head = gen.dec_b[-1].out if skip == "image" else gen.dec_b[-1]
    assert head.conv.out_channels == 3 and torch.equal(head.colours, torch.tensor(PALETTE) / 127.5 - 1)
    x_a, x_b = images(2, 32)
    out = gen(x_a, x_b)
    # training: a convex mixture of the palette (inside its per-channel range), not one colour
    lo, hi = head.colours.min(0).values.view(1, 3, 1, 1), head.colours.max(0).values.view(1, 3, 1, 1)
    for k in ("x_ab", "x_bb", "x_bab"):
        assert (out[k] >= lo - 1e-6).all() and (out[k] <= hi + 1e-6).all(), k
    assert not any(((out["x_ab"] - c.view(1, 3, 1, 1)).abs().amax(1) < 1e-6).all() for c in head.colours)
    # every loss reaches the logits through the mixture
    out["x_ab"].mean().backward()
    assert head.conv.weight.grad.abs().sum() > 0
    # eval: each pixel is exactly one palette colour, the one with the largest logit
    gen.eval()
    with torch.no_grad():
        y = gen.translate(x_a, "a2b")
        uint = ((y + 1) * 127.5).round().permute(0, 2, 3, 1).reshape(-1, 3).tolist()
        assert {tuple(c) for c in uint} <= {tuple(c) for c in PALETTE}
        feats = gen.dec_b[:-1](gen.dec_shared(gen.encode(x_a, "a")))
        if skip == "image":
            feats = gen.dec_b[-1].mix(torch.cat([feats, x_a], 1))
        # the most probable colour per pixel (the largest logit), not the one nearest to the
        # training-mode mixture, which here differs from it somewhere
        logits = head.conv(head.pad(feats))
        assert torch.equal(y, head.colours[logits.argmax(1)].permute(0, 3, 1, 2))
        mix = torch.einsum("bkhw,kc->bhwc", logits.softmax(1), head.colours)
        assert not torch.equal(head.snap(mix.permute(0, 3, 1, 2)), y)
        # domain a has no palette: its tanh head paints many colours
        assert torch.unique(gen.translate(x_b, "b2a")).numel() > 100


def test_palette_config_is_checked():
    assert UNITConfig(palette_b=[(1, 2, 3), (4, 5, 6)]).palette_b == [[1, 2, 3], [4, 5, 6]]
    assert UNITConfig(palette_b=None).palette_b == [] and UNITConfig().palette_a == []
    for bad, msg in (([[1, 2, 3]], "2 to 256"), ([[1, 2, 3], [1, 2, 3]], "twice"), ([[1, 2], [3, 4]], "3 integers"),
                     ([[1, 2, 300], [0, 0, 0]], "0..255"), ([[1.5, 2, 3], [0, 0, 0]], "integers"),
                     ("red", "list of colours"), ([[True, 2, 3], [0, 0, 0]], "integers")):
        with pytest.raises(ValueError, match=msg):
            UNITConfig(palette_b=bad)
    assert UNITConfig(palette_b="auto").palette_b == "auto"  # measured by the trainer
    with pytest.raises(ValueError, match="palette_b='auto' must be replaced"):
        UNIT.from_config({"preset": "tiny", "palette_b": "auto"})


def test_expected_config_is_checked():
    assert UNITConfig().expected == "" == UNITConfig(expected=None).expected and UNITConfig(expected="ba").expected == "ba"
    for bad in ("c", "aa", "a,b", 1, ["a"]):
        with pytest.raises(ValueError, match="expected"):
            UNITConfig(expected=bad)


@pytest.mark.parametrize("skip", ["none", "image"])
def test_expected_decoder_learns_from_pseudo_pairs_and_never_changes_the_model(skip):
    unit = tiny(skip=skip, palette_b=PALETTE, expected="a")
    gen = unit.gen
    assert gen.expected == "a" and hasattr(gen, "exp_a") and not hasattr(gen, "exp_b")
    x_a, x_b = images(2, 32)
    out = gen(x_a, x_b)
    # the pseudo-pair by hand: x_ab as eval paints it (exact palette colours), its latent, exp_a
    head = gen.dec_b[-1].out if skip == "image" else gen.dec_b[-1]
    src = head.nearest(out["x_ab"].detach().permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    feats = gen.exp_a[:-1](gen.dec_shared(gen.encode(src, "b")))
    want = gen.exp_a[-1](feats, src) if skip == "image" else gen.exp_a[-1](feats)
    assert torch.allclose(out["exp_a"], want, atol=1e-5)  # (float32 rounding: another memory layout)
    # its loss term is w_recon * L1 to the real photo, and trains the expected decoder only
    unit.dis.requires_grad_(False)
    _, terms = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    assert torch.allclose(terms["exp_a"], (out["exp_a"] - x_a).abs().mean()) and "exp_b" not in terms
    gen.zero_grad()
    (out["exp_a"] - x_a).abs().mean().backward()
    g = {k: p.grad for k, p in gen.named_parameters()}
    assert all(v is not None and v.abs().sum() > 0 for k, v in g.items() if k.startswith("exp_a.") and "norm" not in k)
    assert all(v is None for k, v in g.items() if not k.startswith("exp_a."))
    # translations into a use it; into b they do not
    gen.eval()
    with torch.no_grad():
        ba, ab = gen.translate(x_b, "b2a"), gen.translate(x_a, "a2b")
        s = gen.dec_shared(gen.encode(x_b, "b"))
        exp = gen.exp_a[-1](gen.exp_a[:-1](s), x_b) if skip == "image" else gen.exp_a[-1](gen.exp_a[:-1](s))
        assert torch.equal(ba, exp) and not torch.allclose(ba, gen.decode(gen.encode(x_b, "b"), "a", x_b))
        assert torch.equal(ab, gen.decode(gen.encode(x_a, "a"), "b", x_a))
        # decoder="gan" asks for the GAN decoder (the one D_a trains) where an expected one exists
        assert torch.equal(gen.translate(x_b, "b2a", decoder="gan"), gen.decode(gen.encode(x_b, "b"), "a", x_b))
        assert torch.equal(gen.translate(x_a, "a2b", decoder="gan"), ab)
    with pytest.raises(ValueError, match="decoder 'exp'"):
        gen.translate(x_a, "a2b", decoder="exp")


def test_expected_decoders_leave_the_gan_model_and_its_random_numbers_as_without_them():
    plain, both = tiny(), tiny(expected="ab")
    mine = both.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in plain.state_dict().items())  # same init, D included
    tiny()
    after_plain = torch.randn(4)
    tiny(expected="ab")
    assert torch.equal(torch.randn(4), after_plain)  # the random stream after building: the same
    x_a, x_b = images(2, 32)
    torch.manual_seed(1)
    out = plain.gen(x_a, x_b)
    torch.manual_seed(1)
    out2 = both.gen(x_a, x_b)
    assert all(torch.allclose(out[k], out2[k], atol=1e-6) for k in out)  # the latent noise too


def test_expected_decoders_round_trip_through_config_and_state():
    unit = tiny(expected="ab")
    twin = UNIT.from_config(unit.config())
    twin.load_state_dict(unit.state_dict())
    x_a, x_b = images(2, 32)
    unit.eval(), twin.eval()
    with torch.no_grad():
        for x, d in ((x_a, "a2b"), (x_b, "b2a")):
            assert torch.equal(unit.translate(x, d), twin.translate(x, d))
    assert {k.split(".")[0] for k in unit.gen.state_dict()} >= {"exp_a", "exp_b"}


@pytest.mark.parametrize("weight", sorted(WEIGHTS))
def test_zero_weight_removes_its_gradient(weight):
    x_a, x_b = images(2, 32)
    unit = tiny()
    full = unit.cfg
    torch.manual_seed(1)
    out = unit.gen(x_a, x_b)
    unit.dis.requires_grad_(False)
    loss, terms = generator_loss(out, x_a, x_b, unit.dis, full)
    # the same term recomputed with its graph, through the hand formula of that term
    t_a, t_b = WEIGHTS[weight]
    recompute = {
        "w_recon": lambda: losses.l1(out["x_aa"], x_a) + losses.l1(out["x_bb"], x_b),
        "w_kl": lambda: losses.kl(out["mu_a"]) + losses.kl(out["mu_b"]),
        "w_gan": lambda: losses.gan_g(unit.dis.dis_a(out["x_ba"]), "lsgan") + losses.gan_g(unit.dis.dis_b(out["x_ab"]), "lsgan"),
        "w_cyc": lambda: losses.l1(out["x_aba"], x_a) + losses.l1(out["x_bab"], x_b),
        "w_cyc_kl": lambda: losses.kl(out["mu_ab"]) + losses.kl(out["mu_ba"]),
    }[weight]()
    assert recompute.item() == pytest.approx((terms[t_a] + terms[t_b]).item(), rel=1e-5)
    (loss - getattr(full, weight) * recompute).backward()
    want = grads(unit.gen)

    unit.gen.zero_grad(set_to_none=True)
    unit.dis.requires_grad_(True)
    zero = UNITConfig(**{**unit.config(), weight: 0.0})
    torch.manual_seed(1)
    out = unit.gen(x_a, x_b)
    loss0, terms0 = generator_loss(out, x_a, x_b, unit.dis, zero)
    assert torch.isfinite(terms0[t_a]) and terms0[t_a].item() == pytest.approx(terms[t_a].item(), rel=1e-5)
    loss0.backward()
    got = grads(unit.gen)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6 * want[k].abs().max().item()), k
    # the discriminator is not even on the graph when the GAN weight is 0
    assert all((p.grad is None) == (weight == "w_gan") for p in unit.dis.parameters())


@pytest.mark.parametrize("gan_type", ["lsgan", "nsgan", "hinge"])
def test_gan_losses_finite_with_finite_grads(gan_type):
    unit = tiny(gan_type=gan_type)
    x_a, x_b = images(2, 32)
    out = unit.gen(x_a, x_b)
    unit.dis.requires_grad_(False)
    loss_g, tg = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    loss_g.backward()
    unit.dis.requires_grad_(True)
    assert torch.isfinite(loss_g) and all(torch.isfinite(v) for v in tg.values())
    gp = [p.grad for p in unit.gen.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gp)
    assert all(p.grad is None for p in unit.dis.parameters())  # frozen D got nothing
    preds = unit.dis(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach())
    loss_d, td = discriminator_loss(preds, unit.cfg)
    loss_d.backward()
    assert torch.isfinite(loss_d) and set(td) == {"d_a", "d_b"}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unit.dis.parameters())
    # (hinge: the last bias's gradient cancels exactly while all logits are inside the margin)
    assert all(p.grad.abs().sum() > 0 for k, p in unit.dis.named_parameters() if k.endswith("weight"))


@pytest.mark.slow
def test_generator_loss_alone_fits_a_fixed_batch():
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"})
    x_a, x_b = smooth_images(2, 32, 1), smooth_images(2, 32, 2)
    unit.dis.requires_grad_(False)
    opt = torch.optim.Adam(unit.gen.parameters(), lr=1e-3, betas=(0.5, 0.999))

    def recon():
        with torch.no_grad():
            out = unit.gen(x_a, x_b)
            return (losses.l1(out["x_aa"], x_a) + losses.l1(out["x_bb"], x_b)).item() / 2

    start = recon()
    # 80 steps: the error falls ~6x by step 50 and ~9x by step 80 (200 steps only went on to ~12x).
    for _ in range(80):
        out = unit.gen(x_a, x_b)
        loss, _ = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    end = recon()
    assert end * 5 <= start, (start, end)


# ---------------------------------------------------------------- config, translate, EMA
def test_from_config_round_trip_and_errors():
    unit = tiny(dim=8, gan_type="hinge", w_cyc=0.0)
    cfg = unit.config()
    assert cfg["preset"] == "tiny" and cfg["dim"] == 8 and cfg["gan_type"] == "hinge" and cfg["w_cyc"] == 0.0
    again = UNIT.from_config(cfg)
    assert again.config() == cfg
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in unit.state_dict().items()}
    again.load_state_dict(unit.state_dict())  # same architecture: strict load works
    assert UNIT.from_config({"preset": "official"}).config()["n_shared"] == 0
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dimm'\]"):
        UNIT.from_config({"preset": "paper", "dimm": 3})
    with pytest.raises(ValueError, match="preset 'huge'"):
        UNIT.from_config({"preset": "huge"})
    with pytest.raises(ValueError, match="gan_type='wgan'"):
        UNIT.from_config({"preset": "tiny", "gan_type": "wgan"})
    with pytest.raises(ValueError, match="n_shared=5"):
        UNIT.from_config({"preset": "tiny", "n_shared": 5})
    with pytest.raises(ValueError, match="w_kl=-1"):
        UNIT.from_config({"preset": "tiny", "w_kl": -1})


def test_translate_deterministic_in_eval_and_noise_in_training():
    unit = tiny()
    x_a, x_b = images(2, 32)
    unit.eval()
    y1, y2 = unit.translate(x_a, "a2b"), unit.translate(x_a, "a2b")
    assert torch.equal(y1, y2)
    assert torch.allclose(y1, unit.gen.decode(unit.gen.encode(x_a, "a"), "b"))
    assert not torch.allclose(y1, unit.translate(x_a, "b2a"))
    with torch.no_grad():
        assert torch.equal(unit.gen(x_a, x_b)["x_ab"], unit.gen(x_a, x_b)["x_ab"])
    unit.train()
    torch.manual_seed(3)
    o1 = unit.gen(x_a, x_b)["x_ab"]
    torch.manual_seed(3)
    o2 = unit.gen(x_a, x_b)["x_ab"]
    o3 = unit.gen(x_a, x_b)["x_ab"]
    assert torch.equal(o1, o2) and not torch.allclose(o1, o3)  # seeded noise, z = mu + eps
    with pytest.raises(ValueError, match="direction"):
        unit.translate(x_a, "a2c")


def test_ema_update_copy_and_state():
    src = tiny().gen
    ema = EMA(src, decay=0.75)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    ema.update(src)
    k = "enc_a.0.1.weight"
    # warm-up: the first update uses decay (1 + 0) / (10 + 0) = 0.1, not 0.75
    assert torch.allclose(ema.shadow[k], 0.1 * before[k] + 0.9 * (before[k] + 1.0))
    dst = tiny(n_shared=1).gen
    ema.copy_to(dst)
    assert torch.allclose(dst.state_dict()[k], before[k] + 0.9)
    late = EMA(src, decay=0.75)  # past the warm-up ((1 + 40) / 50 > 0.75) the configured decay holds
    late.num_updates = 40
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    late.update(src)
    assert torch.allclose(late.shadow[k], 0.75 * (before[k] + 1.0) + 0.25 * (before[k] + 2.0))
    other = EMA(tiny().gen, decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.75 and other.num_updates == 1
    assert torch.equal(other.shadow[k], ema.shadow[k])
    with pytest.raises(ValueError, match="decay"):
        EMA(src, 1.0)
    with pytest.raises(KeyError):
        EMA(tiny(n_res=2).gen, 0.5).load_state_dict(ema.state_dict())


def test_colour_features_are_the_input_then_sines_and_cosines_of_its_octaves():
    from model.networks import ColourFeatures
    x = torch.rand(2, 3, 4, 5) * 2 - 1
    f = ColourFeatures(3)(x)
    assert f.shape == (2, 3 * 7, 4, 5)
    assert torch.equal(f[:, :3], x)
    for k in range(3):  # channel order: [x | sin of octave 0 (3 ch), octave 1, ... | cos ...]
        assert torch.allclose(f[:, 3 + 3 * k:6 + 3 * k], torch.sin(x * math.pi * 2 ** k), atol=1e-6)
        assert torch.allclose(f[:, 12 + 3 * k:15 + 3 * k], torch.cos(x * math.pi * 2 ** k), atol=1e-6)


def test_dis_colour_octaves_widen_only_the_discriminators_first_convs():
    plain, coloured = tiny(), tiny(dis_colour_octaves=4)
    firsts = [m for m in coloured.dis.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3 * 9]
    assert len(firsts) == 4  # 2 domains x 2 scales
    assert count_params(coloured.gen) == count_params(plain.gen)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert [p.shape for p in coloured.dis.dis_b(x)] == [p.shape for p in plain.dis.dis_b(x)]
    assert coloured.config()["dis_colour_octaves"] == 4
    with pytest.raises(ValueError, match="dis_colour_octaves"):
        UNITConfig(dis_colour_octaves=-1)


def _flat_maps(n, g, ground):
    """16x16 'maps': a background colour with a box of a second colour at a random place."""
    box = torch.tensor([0.4, 0.8, -0.2]).view(3, 1, 1)
    out = ground.view(1, 3, 1, 1).repeat(n, 1, 16, 16)
    for i in range(n):
        y, x = torch.randint(0, 10, (2,), generator=g).tolist()
        out[i, :, y:y + 6, x:x + 6] = box
    return out


@pytest.mark.parametrize("octaves", [0, 4])
def test_colour_features_let_a_discriminator_see_a_background_a_few_levels_off(octaves):
    # Why dis_colour_octaves exists: real maps have background 0.90, fakes 0.98 (10 levels of 255
    # off, as a translator's land often is); same layouts. The plain patch discriminator cannot
    # tell them apart in 150 steps, the one with colour features can.
    from model.networks import MultiScaleDiscriminator, init_gaussian
    torch.manual_seed(0)
    dis = MultiScaleDiscriminator(3, 8, 2, 1, colour_octaves=octaves)
    init_gaussian(dis, 0.02)
    opt = torch.optim.Adam(dis.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(0)
    real_ground, fake_ground = torch.tensor([0.90, 0.87, 0.83]), torch.tensor([0.98, 0.95, 0.91])
    for _ in range(150):
        real, fake = _flat_maps(8, g, real_ground), _flat_maps(8, g, fake_ground)
        loss = ((dis(real)[0] - 1) ** 2).mean() + (dis(fake)[0] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        real, fake = _flat_maps(64, g, real_ground), _flat_maps(64, g, fake_ground)
        gap = float(dis(real)[0].mean() - dis(fake)[0].mean())  # 1.0: told apart; 0: not at all
    if octaves:
        assert gap > 0.8
    else:
        assert gap < 0.3


def test_r1_penalty_is_half_the_squared_input_gradient_on_real_images():
    from model.unit import r1_loss, r1_penalty
    unit = tiny(w_r1=2.0)
    x_a, x_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    x = x_b.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(sum(p.sum() for p in unit.dis.dis_b(x)), x)
    want = 0.5 * g.pow(2).sum(dim=(1, 2, 3)).mean()
    assert torch.allclose(r1_penalty(unit.dis.dis_b, x_b), want, rtol=1e-5) and float(want) > 0
    total, terms = r1_loss(unit.dis, x_a, x_b, unit.cfg)
    assert torch.allclose(total, 2.0 * (terms["r1_a"] + terms["r1_b"]))
    total.backward()  # a double backward: it reaches the discriminators' weights, not the images
    assert all(p.grad is not None for p in unit.dis.parameters() if p.ndim == 4)
    assert r1_loss(unit.dis, x_a, x_b, tiny().cfg) == (None, {})


def test_lazy_r1_runs_every_kth_step_weighted_by_k():
    from model.unit import r1_loss
    unit, lazy = tiny(w_r1=2.0), tiny(w_r1=2.0, r1_every=4)
    lazy.dis.load_state_dict(unit.dis.state_dict())
    x_a, x_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    every, _ = r1_loss(unit.dis, x_a, x_b, unit.cfg, step=3)
    assert [r1_loss(lazy.dis, x_a, x_b, lazy.cfg, step=s) for s in (1, 2, 3, 5)] == [(None, {})] * 4
    on_4, _ = r1_loss(lazy.dis, x_a, x_b, lazy.cfg, step=4)
    on_8, _ = r1_loss(lazy.dis, x_a, x_b, lazy.cfg, step=8)
    assert torch.allclose(on_4, 4 * every) and torch.allclose(on_8, on_4) and float(every) > 0
    with pytest.raises(ValueError, match="r1_every"):
        tiny(r1_every=0)


# ---------------------------------------------------------------- back-translation and the hue prior
def test_hue_corr_is_zero_for_the_same_hue_changes_and_two_for_opposite_ones():
    x, _ = images(2, 16)
    # each image's own colour offset and scale do not count: only where and how its hue changes
    shifted = x * torch.tensor([0.3, 2.0]).view(2, 1, 1, 1) + torch.tensor([0.5, -0.2]).view(2, 1, 1, 1)
    assert losses.hue_corr(x, x).item() == pytest.approx(0, abs=1e-5)
    assert losses.hue_corr(x, shifted).item() == pytest.approx(0, abs=1e-5)
    assert losses.hue_corr(x, -x).item() == pytest.approx(2, abs=1e-5)
    # a grey translation (no hue at all) and an unrelated one sit in between
    grey = x.mean(1, keepdim=True).expand_as(x)
    assert losses.hue_corr(x, grey).item() == pytest.approx(1, abs=1e-3)
    assert 0.5 < losses.hue_corr(x, images(2, 16, seed=1)[0]).item() < 1.5
    # by hand, one image of two pixels: opponent axes (R - G, (R + G) / 2 - B) less their mean
    a = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).view(1, 3, 1, 2)    # black, red
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).view(1, 3, 1, 2)    # black, green
    # R - G: +1 against -1 (correlation -1); (R + G) / 2 - B: +0.5 against +0.5 (correlation +1)
    assert losses.hue_corr(a, b).item() == pytest.approx(1, abs=1e-3)
    # red-green only: the same pair's R - G is opposite and nothing else counts
    assert losses.hue_corr(a, b, axes="rg").item() == pytest.approx(2, abs=1e-3)
    with pytest.raises(ValueError, match="hue axes"):
        losses.hue_corr(a, b, axes="yb")


def test_hue_axes_rg_ignores_the_yellow_blue_axis():
    x, _ = images(2, 16)
    # swap R and G: R - G flips sign, (R + G) / 2 - B stays; then only the yellow-blue axis agrees
    swapped = x[:, [1, 0, 2]]
    assert losses.hue_corr(x, swapped, axes="rg").item() == pytest.approx(2, abs=1e-4)
    assert losses.hue_corr(x, swapped).item() == pytest.approx(1, abs=1e-4)
    # B alone changed: R - G the same (0 with rg only), the yellow-blue axis disturbed (both > 0)
    blue = torch.cat([x[:, :2], images(2, 16, seed=3)[0][:, 2:]], 1)
    assert losses.hue_corr(x, blue, axes="rg").item() == pytest.approx(0, abs=1e-5)
    assert losses.hue_corr(x, blue).item() > 0.1


def test_hue_pool_correlates_block_means_so_a_lone_speck_counts_less():
    x, _ = images(2, 16)
    y = images(2, 16, seed=2)[0]
    pooled = torch.nn.functional.avg_pool2d(x, 4), torch.nn.functional.avg_pool2d(y, 4)
    assert losses.hue_corr(x, y, pool=4).item() == pytest.approx(losses.hue_corr(*pooled).item(), abs=1e-6)
    assert losses.hue_corr(x, y, pool=1).item() == pytest.approx(losses.hue_corr(x, y).item(), abs=1e-6)
    # a smooth source (red left half, blue right) and a translation that agrees but for one
    # 1-pixel speck of the other half's colour in each 4x4 block: pooled, the blocks' means still
    # change as the source's do (the specks cost nothing); per pixel they do
    src = torch.zeros(1, 3, 16, 16)
    src[:, 0, :, :8] = 1
    src[:, 2, :, 8:] = 1
    dst = src.clone()
    dst[:, :, ::4, ::4] = 1 - dst[:, :, ::4, ::4]
    dst[:, 1] = 0
    assert losses.hue_corr(src, dst, pool=4).item() == pytest.approx(0, abs=1e-4)
    assert losses.hue_corr(src, dst).item() > 0.1
    with pytest.raises(ValueError, match="hue_pool"):
        UNITConfig(hue_pool=0)


def tiny_losses():
    """A tiny model's forward pass and its generator loss at the preset's weights, D frozen."""
    x_a, x_b = images(2, 32)
    unit = tiny()
    unit.dis.requires_grad_(False)
    torch.manual_seed(1)
    out = unit.gen(x_a, x_b)
    base, terms = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    return unit, x_a, x_b, out, base, terms


def test_w_hue_adds_its_terms_only_when_asked_for():
    unit, x_a, x_b, out, base, terms = tiny_losses()
    assert "hue_a" not in terms and "hue_b" not in terms
    hue = UNITConfig(**{**unit.config(), "w_hue": 3.0})
    loss, terms = generator_loss(out, x_a, x_b, unit.dis, hue)
    want = losses.hue_corr(x_b, out["x_ba"]), losses.hue_corr(x_a, out["x_ab"])  # (source, translation)
    assert terms["hue_a"].item() == pytest.approx(want[0].item()) and terms["hue_b"].item() == pytest.approx(want[1].item())
    assert loss.item() == pytest.approx(base.item() + 3.0 * (want[0] + want[1]).item(), rel=1e-5)
    rg = UNITConfig(**{**unit.config(), "w_hue": 3.0, "hue_axes": "rg"})
    _, terms = generator_loss(out, x_a, x_b, unit.dis, rg)
    assert terms["hue_b"].item() == pytest.approx(losses.hue_corr(x_a, out["x_ab"], axes="rg").item())
    assert terms["hue_b"].item() != pytest.approx(want[1].item())
    # hue_into: only the named domain's translations get the prior, and only its term is added
    into_b = UNITConfig(**{**unit.config(), "w_hue": 3.0, "hue_into": "b"})
    loss, terms = generator_loss(out, x_a, x_b, unit.dis, into_b)
    assert "hue_a" not in terms and terms["hue_b"].item() == pytest.approx(want[1].item())
    assert loss.item() == pytest.approx(base.item() + 3.0 * want[1].item(), rel=1e-5)
    pooled = UNITConfig(**{**unit.config(), "w_hue": 3.0, "hue_pool": 2})
    _, terms = generator_loss(out, x_a, x_b, unit.dis, pooled)
    assert terms["hue_a"].item() == pytest.approx(losses.hue_corr(x_b, out["x_ba"], pool=2).item())
    with pytest.raises(ValueError, match="hue_into"):
        UNITConfig(hue_into="ba")
    for bad in (-1, "x", True):
        with pytest.raises(ValueError, match="w_hue"):
            UNITConfig(w_hue=bad)
    with pytest.raises(ValueError, match="hue_axes"):
        UNITConfig(hue_axes="yb")


@pytest.mark.parametrize("skip", ["none", "image"])
def test_cycle_detach_gives_the_translating_generator_no_cycle_gradient(skip):
    """Back-translation: the same pass, but the cycle terms train only the generator that
    translates back (and the shared layers through it); the one whose translation it reads gets
    nothing from them, where without cycle_detach it does."""
    x_a, x_b = images(2, 32)
    got = {}
    for detach in (False, True):
        unit = tiny(skip=skip, cycle_detach=detach)
        torch.manual_seed(1)
        out = unit.gen(x_a, x_b)
        got[detach] = {k: v.detach() for k, v in out.items()}
        losses.l1(out["x_aba"], x_a).backward()  # the photos' cycle: x_a -> G_b -> x_ab -> G_a
        g = grads(unit.gen)
        dec_a = [v for k, v in g.items() if k.startswith("dec_a.")]
        dec_b = [v for k, v in g.items() if k.startswith("dec_b.")]
        assert all(v is not None and v.abs().sum() > 0 for v in dec_a)
        if detach:
            assert all(v is None or v.abs().sum() == 0 for v in dec_b)
        else:
            assert any(v is not None and v.abs().sum() > 0 for v in dec_b)
    for k in got[False]:  # the forward values are the same
        assert torch.equal(got[False][k], got[True][k]), k
    with pytest.raises(ValueError, match="cycle_detach"):
        UNITConfig(cycle_detach="yes")


def test_fused_upsampling_compiles_with_inductor_forward_and_backward():
    """torch.compile's default backend on the stock path a GPU runs (bf16 autocast), forward and
    backward: F.pad's replicate backward fails there with a stride assertion (torch 2.13), so
    replicate padding (the fused block's, and a pad_type: replicate layer's) is built from edge
    copies."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(Pad("replicate", 1), UpConvBlock(8, 4, "ln", "relu", "reflect"))
    x = torch.randn(2, 8, 6, 6)
    grads = []
    for fn in (block, torch.compile(block)):
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16):
            y = fn(xr)
        grads.append((y.float(), *torch.autograd.grad(y.float().pow(2).sum(), [xr, block[1].conv.weight])))
    for eager, compiled in zip(*grads):
        assert torch.allclose(compiled, eager, rtol=0.05, atol=0.05 * eager.abs().max().item())


def test_w_cyc_b_weighs_the_b_cycle_apart_from_the_a_cycle():
    unit, x_a, x_b, out, base, terms = tiny_losses()
    assert unit.cfg.w_cyc_b is None and unit.cfg.w_cyc == 100.0
    heavy = UNITConfig(**{**unit.config(), "w_cyc_b": 300})
    assert heavy.w_cyc_b == 300.0 and isinstance(heavy.w_cyc_b, float)
    loss, terms3 = generator_loss(out, x_a, x_b, unit.dis, heavy)
    assert terms3["cyc_b"].item() == pytest.approx(terms["cyc_b"].item())
    # only the b cycle's weight moved: 100 -> 300
    assert loss.item() == pytest.approx(base.item() + 200.0 * terms["cyc_b"].item(), rel=1e-5)
    off = UNITConfig(**{**unit.config(), "w_cyc_b": 0})
    loss0, _ = generator_loss(out, x_a, x_b, unit.dis, off)
    assert loss0.item() == pytest.approx(base.item() - 100.0 * terms["cyc_b"].item(), rel=1e-5)
    for bad in (-1, "x", True):
        with pytest.raises(ValueError, match="w_cyc_b"):
            UNITConfig(w_cyc_b=bad)
