"""Training-time rewrites of UNIT's layers: the same functions, computed faster on the CPU.

Profiled on the `official` preset (bench/step.py), ~75% of an iteration is convolution. oneDNN
runs the generator's 3x3 convolutions ~1.3-1.45x faster on channels-last (NHWC) tensors, but only
if every layer around them keeps that layout, in the forward *and* the backward pass: the stock
instance norm and the stock reflection-pad backward convert to NCHW, and each conversion then
costs a copy and a slower convolution. So:

- `channels_last(x)`: x in channels-last, and its gradient converted to channels-last too (a
  no-op when it already is);
- `reflect_pad(x, p)` and `replicate_pad(x, p)`: F.pad's function in channels-last, and a
  backward made of slices that keeps the layout (the stock ones make their gradient contiguous
  NCHW);
- `instance_norm(x, eps, relu)` and `layer_norm(x, gamma, beta, eps)` (the official UNIT layer
  norm: unbiased std, eps added to the std): closed-form backward passes, layout kept, several
  times fewer passes over memory than autograd through the composite ops; the ReLU after an
  instance norm folded in;
- `add_borders`: the fused upsampling conv's border correction in place, without full-size copies;
- `phase_conv` and `patch_conv`: two convolution shapes oneDNN runs slowly (a few output
  channels: the 7x7 conv to RGB; outputs of a few pixels from many input channels: the deepest
  discriminator layers) as one stride-2 convolution over the four output phases and as one
  matrix product.

They agree with the stock operations to float32 rounding (tests/test_step_speed_rewrites.py).
The networks use them only in float32 CPU training (`use_fast`); inference, ONNX export, GPUs
and autocast keep the stock operations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNELS_LAST = torch.channels_last


def use_fast(enabled: bool, x: torch.Tensor) -> bool:
    """The rewrites run only when switched on, in float32 training on the CPU (what they were
    measured on): autograd recording, no autocast, a 4-D float32 CPU tensor."""
    return (enabled and torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and not torch.is_autocast_enabled("cpu"))


def _layout(t: torch.Tensor) -> torch.memory_format:
    return CHANNELS_LAST if t.is_contiguous(memory_format=CHANNELS_LAST) and not t.is_contiguous() \
        else torch.contiguous_format


class _ChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.contiguous(memory_format=CHANNELS_LAST) if not x.is_contiguous(memory_format=CHANNELS_LAST) \
            else x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=CHANNELS_LAST)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return _ChannelsLast.apply(x)


def _flip(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t if t.shape[dim] == 1 else t.flip(dim)


class _ReflectPad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        ctx.p = p
        return F.pad(x.contiguous(memory_format=CHANNELS_LAST), (p, p, p, p), mode="reflect")

    @staticmethod
    def backward(ctx, g):
        # Padded column j < p came from input column p - j, padded column W + p + j from W - 2 - j,
        # and the same for rows: fold the border columns of every row, then the border rows (one
        # full-size copy, the rest on p-wide strips).
        p = ctx.p
        grad = g[:, :, p:-p, p:-p].clone(memory_format=CHANNELS_LAST)  # a copy: folded into in place below
        h, w = grad.shape[-2:]

        def fold_cols(src, dst):  # src: rows of g (full padded width) -> dst: the same rows, input width
            dst[..., 1:p + 1] += _flip(src[..., :p], -1)
            dst[..., w - 1 - p:w - 1] += _flip(src[..., -p:], -1)
            return dst

        fold_cols(g[:, :, p:-p], grad)
        grad[:, :, 1:p + 1] += _flip(fold_cols(g[:, :, :p], g[:, :, :p, p:-p].clone()), 2)
        grad[:, :, h - 1 - p:h - 1] += _flip(fold_cols(g[:, :, -p:], g[:, :, -p:, p:-p].clone()), 2)
        return grad, None


def reflect_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """F.pad(x, (p,) * 4, mode="reflect") in channels-last, its gradient in channels-last too."""
    return _ReflectPad.apply(x, p)


def replicate_edges(x: torch.Tensor, p: int) -> torch.Tensor:
    """F.pad(x, (p,) * 4, mode="replicate") as copies of the edge rows and columns, the layout kept.
    Why not F.pad: torch.compile (torch 2.13) fails on its backward with a stride assertion."""
    x = torch.cat([x[:, :, :1]] * p + [x] + [x[:, :, -1:]] * p, dim=2)
    return torch.cat([x[..., :1]] * p + [x] + [x[..., -1:]] * p, dim=3)


class _ReplicatePad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        ctx.p = p
        return replicate_edges(x.contiguous(memory_format=CHANNELS_LAST), p)

    @staticmethod
    def backward(ctx, g):
        # Every padded pixel copies its nearest edge pixel: the border columns' gradients fold onto
        # the edge columns, the border rows' (corners first folded along the row) onto the edge rows.
        p = ctx.p
        # a copy: contiguous() returns the slice itself when it already is (one row, channels-last),
        # and the folds below would then write into the caller's gradient
        grad = g[:, :, p:-p, p:-p].clone(memory_format=CHANNELS_LAST)
        grad[..., 0] += g[:, :, p:-p, :p].sum(-1)
        grad[..., -1] += g[:, :, p:-p, -p:].sum(-1)
        for edge, strip in ((0, g[:, :, :p].sum(2)), (-1, g[:, :, -p:].sum(2))):
            row = strip[..., p:-p].clone()
            row[..., 0] += strip[..., :p].sum(-1)
            row[..., -1] += strip[..., -p:].sum(-1)
            grad[:, :, edge] += row
        return grad, None


def replicate_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """F.pad(x, (p,) * 4, mode="replicate") in channels-last, its gradient in channels-last too."""
    return _ReplicatePad.apply(x, p)


class _AddBorders(torch.autograd.Function):
    """y with top/bottom added to its first/last rows and left/right to its first/last columns (as
    many as the strips hold), in place; the backward hands y's gradient through without copying it."""

    @staticmethod
    def forward(ctx, y, top, bottom, left, right):
        ctx.mark_dirty(y)
        ctx.rows, ctx.cols = top.shape[-2], left.shape[-1]
        y[:, :, :ctx.rows] += top
        y[:, :, -ctx.rows:] += bottom
        y[..., :ctx.cols] += left
        y[..., -ctx.cols:] += right
        return y

    @staticmethod
    def backward(ctx, g):
        r, c = ctx.rows, ctx.cols
        return g, g[:, :, :r].clone(), g[:, :, -r:].clone(), g[..., :c].clone(), g[..., -c:].clone()


def add_borders(y, top, bottom, left, right):
    return _AddBorders.apply(y, top, bottom, left, right)


def phase_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, f: int = 2) -> torch.Tensor:
    """conv2d(x, w, b) (stride 1, no padding) as one stride-f convolution whose O*f*f outputs are the
    f x f output phases (phase (r, s): the kernel shifted by (r, s) inside a window of k+f-1
    rounded up to a multiple of f), shuffled back into place. For few output channels (the 7x7 conv
    to RGB, 32 channels in, batch 8-16) oneDNN runs this 1.6-1.75x faster than the stride-1
    convolution, forward and backward, although it does (window/k)^2 ~ 1.3x the multiply-adds, and
    1.15-1.35x faster than on pixel-unshuffled 2x2 blocks (a full copy of the input each way)."""
    o, c, k, _ = w.shape
    win = -(-(k + f - 1) // f) * f
    kernel = torch.stack([F.pad(w, (s, win - k - s, r, win - k - r)) for r in range(f) for s in range(f)], 1)
    out_h, out_w = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    need_h, need_w = (-(-out_h // f) - 1) * f + win, (-(-out_w // f) - 1) * f + win
    if need_h > x.shape[-2] or need_w > x.shape[-1]:  # the extra pixels meet only zero taps
        x = F.pad(x, (0, max(0, need_w - x.shape[-1]), 0, max(0, need_h - x.shape[-2])))
    bias = None if b is None else b.repeat_interleave(f * f)
    kernel = kernel.reshape(o * f * f, c, win, win).contiguous(memory_format=_layout(x))
    return F.pixel_shuffle(F.conv2d(x, kernel, bias, stride=f), f)[..., :out_h, :out_w]


def patch_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int) -> torch.Tensor:
    """conv2d(x, w, b, stride) (no padding) as one matrix product of the output positions' input
    patches with the flattened kernel. For outputs of 1 or 2x2 pixels (the deepest discriminator
    layers: 512 x 256 x 4 x 4 kernels on 1-4 positions) this runs 1.5-3x faster than oneDNN; on 4x4
    outputs only where each product is long (C*k*k >= 4096: 256 x 4 x 4, 1.6x at batch 16), as a
    shorter one (128 x 4 x 4) is 1.1-1.3x slower there."""
    n, (o, _, k, _) = x.shape[0], w.shape
    out_h, out_w = (x.shape[-2] - k) // stride + 1, (x.shape[-1] - k) // stride + 1
    if out_h == out_w == 1:
        patches = x[:, :, :k, :k].reshape(n, 1, -1)
    else:
        patches = torch.stack([x[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
                               for i in range(out_h) for j in range(out_w)], 1).flatten(2)
    y = F.linear(patches, w.flatten(1), b)  # [N, positions, O]
    return y.transpose(1, 2).reshape(n, o, out_h, out_w)


class _InstanceNorm(torch.autograd.Function):
    """(x - mean) / sqrt(var + eps) per sample and channel (biased var), as F.instance_norm; with
    `relu`, followed by a ReLU (one pass fewer each way than a separate ReLU). The backward needs
    the normalised x: kept when it is not the output (relu), or when the caller says nothing
    changes the output in place (`save_output`; if something does, backward raises), else
    recomputed."""

    @staticmethod
    def forward(ctx, x, eps, relu, save_output):
        m = x.mean((2, 3), keepdim=True)
        y = x - m
        r = (y * y).mean((2, 3), keepdim=True).add_(eps).rsqrt_()
        y.mul_(r)
        ctx.relu, ctx.kept = relu, relu or save_output
        ctx.save_for_backward(*((y, r) if ctx.kept else (x, m, r)))
        return y.relu() if relu else y

    @staticmethod
    def backward(ctx, g):
        no_second_derivative("instance_norm")
        if ctx.kept:
            y, r = ctx.saved_tensors
        else:
            x, m, r = ctx.saved_tensors
            y = (x - m).mul_(r)
        g = g.contiguous(memory_format=_layout(y))  # reductions round by layout: one layout, one result
        if ctx.relu:
            g = torch.ops.aten.threshold_backward(g, y, 0.0)  # ReLU's own backward: g where y > 0
        mean_g = g.mean((2, 3), keepdim=True)
        mean_gy = (g * y).mean((2, 3), keepdim=True)
        return (g - mean_g).addcmul_(y, mean_gy, value=-1).mul_(r), None, None, None


def no_second_derivative(name: str) -> None:
    """Refuse a backward that builds a graph (create_graph=True, a gradient penalty through these
    layers): the closed forms use statistics saved without one, so a second derivative would be
    silently wrong. (R1 differentiates through the discriminators, which use the stock layers.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(f"model.kernels.{name}: the CPU training fast path has no second derivative "
                           "(create_graph=True); switch it off for this module with "
                           "model.networks.set_fast_paths(module, False)")


def instance_norm(x: torch.Tensor, eps: float, relu: bool = False, save_output: bool = False) -> torch.Tensor:
    return _InstanceNorm.apply(x, eps, relu, save_output)


class _LayerNorm(torch.autograd.Function):
    """gamma_c * (x - mean) / (std + eps) + beta_c, mean and unbiased std over (C, H, W) per sample."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        n = x[0].numel()
        d = x - x.mean((1, 2, 3), keepdim=True)
        s = torch.linalg.vector_norm(d, dim=(1, 2, 3), keepdim=True).div_((n - 1) ** 0.5)
        r = 1.0 / (s + eps)
        xhat = d.mul_(r)
        ctx.save_for_backward(xhat, r, s, gamma)
        return torch.addcmul(beta.view(1, -1, 1, 1), xhat, gamma.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, g):
        # y = gamma * xhat + beta, xhat = d * r, r = 1 / (s + eps), s = |d| / sqrt(n - 1):
        # dL/dd = r * gamma * g - xhat * sum(gamma * g * xhat) / ((n - 1) s); dL/dx = that minus its mean.
        no_second_derivative("layer_norm")
        xhat, r, s, gamma = ctx.saved_tensors
        g = g.contiguous(memory_format=_layout(xhat))
        n = xhat[0].numel()
        t = (g * xhat).sum((2, 3))  # [B, C]
        # a sample whose features are all equal has s = 0 and xhat = 0: its std term is 0/0, which
        # torch's std backward sets to 0 (the stock layer norm's gradient stays finite)
        k = ((t * gamma).sum(1).view(-1, 1, 1, 1) / ((n - 1) * s)).masked_fill_(s == 0, 0.0)
        dd = (g * gamma.view(1, -1, 1, 1)).mul_(r).addcmul_(xhat, k, value=-1)
        return dd.sub_(dd.mean((1, 2, 3), keepdim=True)), t.sum(0), g.sum((0, 2, 3)), None


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return _LayerNorm.apply(x, gamma, beta, eps)


__all__ = ["use_fast", "channels_last", "reflect_pad", "replicate_pad", "replicate_edges", "add_borders",
           "phase_conv", "patch_conv", "instance_norm", "layer_norm", "CHANNELS_LAST"]
