"""The training-time rewrites of model/kernels.py (issue 16): the same functions as the stock layers.

What is exact and what is rounding-level:
- switched off (`set_fast_paths(model, False)`), and in inference, the layers run the stock
  operations: bit for bit what nn.ReflectionPad2d / nn.InstanceNorm2d / the official layer norm give;
- the reflect pad's forward is F.pad's, bit for bit; the noise draws do not depend on the layout;
- everything else (channels-last convolutions, closed-form norm backward passes, the phase
  and patch convolutions) agrees to float32 rounding, checked here op by op and on a whole UNIT
  iteration's losses and gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import kernels
from model.networks import ConvBlock, InstanceNorm, LayerNorm, Pad, UpConvBlock, set_fast_paths, set_fused_upsample
from model.unit import UNIT, discriminator_loss, generator_loss

torch.set_num_threads(1)
CL = torch.channels_last


def rand(*shape, seed=0, layout=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).contiguous(memory_format=layout)


def grads_of(fn, *inputs, seed=1):
    """fn(*inputs) and the gradients of <fn(...), G> for a fixed random G, w.r.t. every input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    g = rand(*out.shape, seed=seed)
    return out.detach(), torch.autograd.grad(out, inputs, g)


def close(a, b, rel=1e-5):
    """Equal up to float32 rounding, relative to the larger tensor's scale."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return (a - b).abs().max().item() <= rel * scale


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_pad_forward_is_f_pad_and_backward_matches(mode, p, layout):
    x = rand(2, 5, 9, 11, layout=layout)
    want, want_g = grads_of(lambda t: F.pad(t, (p,) * 4, mode=mode), x)
    got, got_g = grads_of(lambda t: getattr(kernels, f"{mode}_pad")(t, p), x)
    assert torch.equal(got, want)
    assert close(got_g[0], want_g[0], 1e-6)
    assert got.is_contiguous(memory_format=CL) and got_g[0].is_contiguous(memory_format=CL)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_instance_norm_matches_stock(relu, layout):
    x = rand(3, 6, 8, 10, layout=layout) * 3 + 1

    def stock(t):
        y = F.instance_norm(t, eps=1e-5)
        return F.relu(y) if relu else y

    want, (want_g,) = grads_of(stock, x)
    got, (got_g,) = grads_of(lambda t: kernels.instance_norm(t, 1e-5, relu), x)
    assert close(got, want) and close(got_g, want_g)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_layer_norm_matches_the_official_formula(layout):
    ln = LayerNorm(6)
    with torch.no_grad():
        ln.gamma.uniform_(0.5, 1.5)
        ln.beta.uniform_(-0.5, 0.5)
    official = copy.deepcopy(ln)
    official.fast = False
    x = rand(3, 6, 8, 10, layout=layout) * 2 + 0.5
    want, want_g = grads_of(lambda t, g, b: official._forward_official(t, g, b), x, ln.gamma, ln.beta)
    got, got_g = grads_of(lambda t, g, b: kernels.layer_norm(t, g, b, ln.eps), x, ln.gamma, ln.beta)
    assert close(got, want)
    for a, b in zip(got_g, want_g):
        assert close(a, b)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("k,size,cout", [(7, 20, 3), (5, 13, 2), (3, 9, 1), (7, 15, 4)])
def test_phase_conv_matches_conv2d(k, size, cout, layout):
    x, w, b = rand(2, 5, size, size + 2, layout=layout), rand(cout, 5, k, k, seed=2), rand(cout, seed=3)
    want, want_g = grads_of(F.conv2d, x, w, b)
    got, got_g = grads_of(kernels.phase_conv, x, w, b)
    assert got.shape == want.shape and close(got, want)
    for a, b_ in zip(got_g, want_g):
        assert close(a, b_)


@pytest.mark.parametrize("size,stride", [(4, 2), (6, 2), (5, 2), (3, 1), (4, 1), (10, 2)])
def test_patch_conv_matches_conv2d(size, stride):
    x, w, b = rand(3, 8, size, size), rand(16, 8, 4 if stride == 2 else 3, 4 if stride == 2 else 3, seed=2), rand(16, seed=3)
    want, want_g = grads_of(lambda *t: F.conv2d(*t, stride=stride), x, w, b)
    got, got_g = grads_of(lambda *t: kernels.patch_conv(*t, stride), x, w, b)
    assert got.shape == want.shape and close(got, want)
    for a, b_ in zip(got_g, want_g):
        assert close(a, b_)


@pytest.mark.parametrize("cin,cout,k,stride,size,route", [
    (256, 8, 4, 2, 10, "patch_conv"),   # 4x4 outputs from 256 x 4 x 4 per position: a matrix product
    (128, 8, 4, 2, 10, None),           # 4x4 outputs from 128 x 4 x 4: oneDNN is faster, stock
    (16, 8, 4, 2, 6, "patch_conv"),     # 2x2 outputs: a matrix product whatever the depth
    (16, 3, 7, 1, 14, "phase_conv"),    # few output channels at stride 1 (the RGB head)
    (16, 32, 3, 1, 10, None)])
def test_fast_conv_routes_and_matches_conv2d(monkeypatch, cin, cout, k, stride, size, route):
    from model import networks
    taken = []

    def recording(name):  # the kernel itself, noting that the route went through it
        kernel = getattr(networks, name)

        def run(*args):
            taken.append(name)
            return kernel(*args)
        return run

    for name in ("patch_conv", "phase_conv"):
        monkeypatch.setattr(networks, name, recording(name))
    torch.manual_seed(0)
    conv = networks.Conv2d(cin, cout, k, stride)
    x = rand(2, cin, size, size, layout=CL)
    want, want_g = grads_of(lambda t: F.conv2d(t, conv.weight, conv.bias, stride=stride), x)
    got, got_g = grads_of(conv, x)
    assert taken == ([route] if route else [])
    assert got.shape == want.shape and close(got, want) and close(got_g[0], want_g[0])


@pytest.mark.parametrize("pad_type", ["reflect", "zero", "replicate"])
def test_upsampling_block_fast_matches_plain(pad_type):
    torch.manual_seed(0)
    fast = UpConvBlock(6, 4, "ln", "relu", pad_type)
    plain = copy.deepcopy(fast)
    set_fused_upsample(plain, False)
    set_fast_paths(plain, False)
    x = rand(2, 6, 5, 7)
    want, want_g = grads_of(plain, x)
    got, got_g = grads_of(fast, x)
    assert close(got, want) and close(got_g[0], want_g[0])


def test_switched_off_and_in_inference_the_layers_are_the_stock_ones_bit_for_bit():
    x = rand(2, 4, 6, 7)
    pad, norm = Pad("reflect", 2), InstanceNorm(4)
    for m in (pad, norm):
        m.fast = False
    assert torch.equal(pad(x), nn.ReflectionPad2d(2)(x))
    assert torch.equal(norm(x), nn.InstanceNorm2d(4)(x))
    ln = LayerNorm(4)
    with torch.no_grad():  # inference: the official formula even with the switch on
        assert torch.equal(ln(x), ln._forward_official(x, ln.gamma, ln.beta))
        assert torch.equal(Pad("reflect", 2)(x), nn.ReflectionPad2d(2)(x))
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"}).eval()
    stock = copy.deepcopy(unit)
    set_fast_paths(stock, False)
    with torch.no_grad():
        assert torch.equal(unit.translate(x[:, :3].repeat(1, 1, 5, 5)[..., :32, :32], "a2b"),
                           stock.translate(x[:, :3].repeat(1, 1, 5, 5)[..., :32, :32], "a2b"))


def test_noise_draws_do_not_depend_on_the_layout():
    gen = UNIT.from_config({"preset": "tiny"}).gen.train()
    mu = rand(4, 8, 5, 6)
    torch.manual_seed(3)
    a = gen.sample(mu, 2)
    torch.manual_seed(3)
    b = gen.sample(mu.contiguous(memory_format=CL), 2)
    assert torch.equal(a, b)


def one_iteration_grads(unit, x_a, x_b):
    """Losses and gradients of one G step and one D step (as bench/step.py's loop), from seed 7."""
    torch.manual_seed(7)
    unit.dis.requires_grad_(False)
    out = unit.gen(x_a, x_b)
    loss_g, _ = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    g_gen = torch.autograd.grad(loss_g, list(unit.gen.parameters()))
    unit.dis.requires_grad_(True)
    loss_d, _ = discriminator_loss(unit.dis(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach()), unit.cfg)
    g_dis = torch.autograd.grad(loss_d, list(unit.dis.parameters()))
    return (loss_g.item(), loss_d.item()), g_gen + g_dis


def fast_and_stock(**over) -> tuple[UNIT, UNIT]:
    """The narrow official preset with the fast paths, and a copy of it on the stock layers."""
    torch.manual_seed(0)
    fast = UNIT.from_config({"preset": "official", "dim": 8, "dis_dim": 8, **over})
    stock = copy.deepcopy(fast)
    set_fast_paths(stock, False)
    return fast, stock


def kink_signs(unit, x_a, x_b) -> list[torch.Tensor]:
    """Which side of its kink every ReLU / leaky ReLU input (the blocks' outputs keep its sign) and
    every L1 residual of the generator loss lies on, in one forward pass from seed 7."""
    signs = []

    def keep(module, inputs, out):
        if isinstance(module.activ if isinstance(module, UpConvBlock) else module[3], (nn.ReLU, nn.LeakyReLU)):
            signs.append(out.detach() > 0)

    hooks = [m.register_forward_hook(keep) for m in unit.modules() if isinstance(m, (ConvBlock, UpConvBlock))]
    try:
        torch.manual_seed(7)  # with autograd on: the fast paths run only when it is
        out = unit.gen(x_a, x_b)
        unit.dis(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach())
    finally:
        for h in hooks:
            h.remove()
    pairs = (("x_aa", x_a), ("x_bb", x_b), ("x_aba", x_a), ("x_bab", x_b))
    return signs + [out[k].detach() > x for k, x in pairs]


def kink_free_batch(fast: UNIT, stock: UNIT, tries: int = 8):
    """The first of a few random 32 px batches on which both models put every kink input on the same
    side. A gradient is compared to rounding only away from kinks: an input within rounding of a ReLU's
    zero (one in about two million here: a quarter of batches hold one) takes the whole upstream gradient on one side and none on the other,
    and that one element moves every gradient upstream by about 1 % (seen on an AVX2 CPU)."""
    for seed in range(4, 4 + 2 * tries, 2):
        x_a, x_b = rand(2, 3, 32, 32, seed=seed).tanh(), rand(2, 3, 32, 32, seed=seed + 1).tanh()
        sides_fast, sides_stock = kink_signs(fast, x_a, x_b), kink_signs(stock, x_a, x_b)
        assert len(sides_fast) == len(sides_stock)  # the same blocks ran in both
        if all(torch.equal(a, b) for a, b in zip(sides_fast, sides_stock)):
            return x_a, x_b
    raise AssertionError(f"no batch of {tries} put every kink on the same side for both models")


def both_iterations(fast: UNIT, stock: UNIT):
    """One G + D iteration of each on the same 32 px batch: ((losses, grads) fast, (losses, grads) stock),
    the losses checked equal to 1e-5 relative."""
    x_a, x_b = kink_free_batch(fast, stock)
    (lf, gf), (ls, gs) = one_iteration_grads(fast, x_a, x_b), one_iteration_grads(stock, x_a, x_b)
    for a, b in zip(lf, ls):
        assert a == pytest.approx(b, rel=1e-5)
    return (lf, gf), (ls, gs)


def test_a_whole_iteration_fast_matches_stock_layers():
    """The official preset (narrow) at 32 px: losses to 1e-5 relative; every gradient tensor to 1e-4
    of the largest gradient of its network (conv biases before an instance norm have true gradient 0:
    what they get is rounding, so a per-tensor relative test would compare noise), on a batch with no
    kink input within rounding of its kink (kink_free_batch)."""
    fast, stock = fast_and_stock(image_size=32)
    (_, gf), (_, gs) = both_iterations(fast, stock)
    n_gen = len(list(fast.gen.parameters()))
    for part in (slice(0, n_gen), slice(n_gen, None)):
        scale = max(t.abs().max().item() for t in gs[part])
        for a, b in zip(gf[part], gs[part]):
            assert (a - b).abs().max().item() <= 1e-4 * scale


def test_rewrites_leave_parameters_and_state_dict_alone():
    fast, stock = fast_and_stock()
    assert list(fast.state_dict()) == list(stock.state_dict())
    assert all(t.is_contiguous() for t in fast.state_dict().values())  # safetensors needs it


@pytest.mark.parametrize("over", [{"dis_norm": "sn"}, {"pad_type": "zero", "dis_pad": "zero"}, {"pad_type": "replicate"},
                                  {"norm": "bn"}, {"norm": "ln", "up_norm": "in"}, {"activ": "lrelu"},
                                  {"activ": "selu", "up_norm": "in"}, {"n_shared": 2}])
def test_other_layer_choices_train_on_the_fast_path(over):
    """In-place activations after a norm, other pads and norms, spectral norm, shared layers: one
    G + D iteration runs (backward included) with the losses of the stock layers."""
    both_iterations(*fast_and_stock(image_size=32, **over))
