"""Fast-path review 6: the closed-form norms refuse a second derivative instead of giving a wrong
one; replicate padding's backward leaves the incoming gradient alone (a one-row map); a conv on an
input smaller than its kernel raises the stock error; the palette head paints in its weights' dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.kernels import CHANNELS_LAST, instance_norm, layer_norm, replicate_pad
from model.networks import Conv2d, PaletteHead


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_the_fast_norms_refuse_a_second_derivative(norm):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = instance_norm(x, 1e-5, relu=True) if norm == "instance" else layer_norm(x, torch.ones(3), torch.zeros(3), 1e-5)
    (g,) = torch.autograd.grad(y.square().sum(), x)  # a first derivative works
    assert g.shape == x.shape
    y = instance_norm(x, 1e-5) if norm == "instance" else layer_norm(x, torch.ones(3), torch.zeros(3), 1e-5)
    with pytest.raises(RuntimeError, match="no second derivative"):  # before: silently wrong, or a vague error
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 4, 1, 2)])
def test_replicate_padding_leaves_the_incoming_gradient_alone(shape):
    x = torch.randn(shape, requires_grad=True)
    y = replicate_pad(x, 1)
    g = torch.randn(y.shape).contiguous(memory_format=CHANNELS_LAST)
    before = g.clone()
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(g, before)  # before: written into for a one-row map
    (want,) = torch.autograd.grad(F.pad(x, (1, 1, 1, 1), mode="replicate"), x, before)
    assert torch.allclose(dx, want)


@pytest.mark.parametrize("hw", [(3, 3), (3, 6), (2, 5), (6, 3)])  # one side shorter is enough (review 8)
def test_a_conv_on_an_input_smaller_than_its_kernel_raises_the_stock_error(hw):
    conv = Conv2d(64, 8, 4, 2)
    x = torch.randn(1, 64, *hw, requires_grad=True)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input"):
        conv(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_palette_head_trains_in_its_weights_dtype(dtype):
    head = PaletteHead(4, [[0, 0, 0], [255, 255, 255]], "reflect").to(dtype).train()
    out = head(torch.randn(1, 4, 8, 8, dtype=dtype))
    assert out.dtype == dtype and out.shape == (1, 3, 8, 8)
