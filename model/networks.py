"""UNIT building blocks: conv blocks, residual blocks, encoders, generators, discriminators.

Layout of the generator side (one domain, the other is the same with its own weights):

    x -> enc_<d> (conv 7x7, n_down stride-2 convs, private res blocks)
      -> enc_shared (last n_shared res blocks, ONE module used by both domains) -> mu
    z -> dec_shared (first n_shared res blocks, ONE module used by both domains)
      -> dec_<d> (private res blocks, n_down x [nearest upsample + conv 5x5], conv 7x7, tanh)

The shared parts are registered once on `UNITGenerator`, so their parameters exist once in
`parameters()` and in `state_dict()` (safetensors refuses aliased tensors).

Pads, convs, norms, upsampling blocks and discriminators carry a `fast` switch (on by default,
`set_fast_paths`): in float32 CPU training the generator's activations stay channels-last and
the layers use the rewrites of model/kernels.py (the same functions to float32 rounding);
switched off, and in inference, on GPUs or under autocast, they run the stock operations.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import (add_borders, channels_last, instance_norm, layer_norm, patch_conv, phase_conv,
                      reflect_pad, replicate_edges, replicate_pad, use_fast)

ACTIVATIONS = ("relu", "lrelu", "prelu", "selu", "tanh", "none")
PADDINGS = ("reflect", "zero", "replicate")
NORMS = ("in", "ln", "bn", "none")
DIS_NORMS = ("none", "sn")


class LayerNorm(nn.Module):
    """Layer norm over (C, H, W) of each sample with a per-channel affine, as the official UNIT code.

    The official version divides by the unbiased std plus eps (not sqrt(var + eps)); kept so
    the `official` preset behaves like it.
    """

    fast = True

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fast(self.fast, x):
            return layer_norm(x, self.gamma, self.beta, self.eps)
        return self._forward_official(x, self.gamma, self.beta)

    def _forward_official(self, x, gamma, beta):
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(1).view(-1, 1, 1, 1)
        std = flat.std(1).view(-1, 1, 1, 1)
        x = (x - mean) / (std + self.eps)
        return x * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


class InstanceNorm(nn.Module):
    """Instance norm without affine or running stats, as the official code's nn.InstanceNorm2d."""

    fast = True

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x: torch.Tensor, relu: bool = False, save_output: bool = False) -> torch.Tensor:
        """With `relu`, ReLU(norm(x)) (ConvBlock fuses the two in fast training); `save_output`: the
        caller changes the output in no place (kernels.instance_norm)."""
        if use_fast(self.fast, x):
            return instance_norm(x, self.eps, relu, save_output)
        y = F.instance_norm(x, eps=self.eps)
        return F.relu(y, inplace=True) if relu else y


def pad2d(x: torch.Tensor, pad: int, pad_type: str, fast: bool) -> torch.Tensor:
    """F.pad(x, (pad,) * 4) in `pad_type` ("zero", "reflect" or "replicate"); with `fast` in
    channels-last, forward and backward (model/kernels.py). Replicate padding is built from edge
    copies: torch.compile (torch 2.13) fails on F.pad's replicate backward."""
    if fast and pad_type == "reflect":
        return reflect_pad(x, pad)
    if pad_type == "replicate":
        return replicate_pad(x, pad) if fast else replicate_edges(x, pad)
    x = channels_last(x) if fast else x
    return F.pad(x, (pad,) * 4, mode="constant" if pad_type == "zero" else pad_type)


class Pad(nn.Module):
    """Reflect, zero or replicate padding by `pad` pixels on each side. In training (`fast`,
    float32 on the CPU) it also moves the activations to channels-last, forward and backward,
    unless built with channels_last=False (the discriminators: their small strided convolutions
    run faster in NCHW)."""

    fast = True

    def __init__(self, pad_type: str, pad: int, channels_last: bool = True):
        super().__init__()
        if pad_type not in PADDINGS:
            raise KeyError(pad_type)
        self.pad_type, self.pad, self.channels_last = pad_type, pad, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad2d(x, self.pad, self.pad_type, self.channels_last and use_fast(self.fast, x))


def make_activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "lrelu":
        return nn.LeakyReLU(0.2, inplace=True)
    if name == "prelu":
        return nn.PReLU()
    if name == "selu":
        return nn.SELU(inplace=True)
    if name == "tanh":
        return nn.Tanh()
    if name == "none":
        return nn.Identity()
    raise ValueError(f"activation {name!r} is not one of {ACTIVATIONS}")


class BatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d (same state_dict) that also runs with its parameters in a lower precision
    than its running statistics, as DeepSpeed 0.19's fp16 mode leaves it (parameters cast to half,
    buffers kept fp32), a mix torch's batch norm does not take (on CPU: "expected scalar type Half
    but found Float"). There it normalises in the statistics' dtype, so the batch statistics and
    the running averages are fp32 ones, and returns the input's dtype. Otherwise: nn.BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        if self.weight is None or stats is None or self.weight.dtype == stats.dtype:
            return super().forward(x)
        if x.dim() != 4:  # as nn.BatchNorm2d checks
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        dt = stats.dtype
        y = F.batch_norm(x.to(dt), stats, self.running_var, self.weight.to(dt), self.bias.to(dt),
                         self.training, factor, self.eps)
        return y.to(x.dtype)


def make_norm(name: str, channels: int) -> nn.Module:
    if name == "in":
        return InstanceNorm(channels)  # no affine, no running stats (as official)
    if name == "ln":
        return LayerNorm(channels)
    if name == "bn":
        return BatchNorm(channels)  # runs under DeepSpeed's fp16 too
    if name == "none":
        return nn.Identity()
    raise ValueError(f"norm {name!r} is not one of {NORMS}")


def make_pad(name: str, pad: int, channels_last: bool = True) -> nn.Module:
    if name not in PADDINGS:
        raise ValueError(f"pad_type {name!r} is not one of {PADDINGS}")
    return nn.Identity() if pad == 0 else Pad(name, pad, channels_last)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and state_dict). In fast training two shapes oneDNN runs
    slowly take another route to the same function: a stride-1 convolution with fewer than 16
    output channels (the 7x7 conv to RGB) as one stride-2 convolution over its four output phases
    (kernels.phase_conv), and one whose output is at most 2x2 pixels, or 4x4 from at least 256 x 4
    x 4 inputs per position (the deepest discriminator layers), as a matrix product
    (kernels.patch_conv)."""

    fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        if (use_fast(self.fast, x) and k[0] == k[1] > 1 and s[0] == s[1] and self.groups == 1
                and self.dilation == (1, 1) and self.padding == (0, 0) and self.padding_mode == "zeros"):
            out_h, out_w = ((side - k[0]) // s[0] + 1 for side in x.shape[-2:])  # output positions per side
            if min(out_h, out_w) < 1:  # a side shorter than the kernel: the stock error names it
                return super().forward(x)
            out = max(out_h, out_w)
            if out <= 2 or (out <= 4 and self.in_channels * k[0] * k[1] >= 4096):
                return patch_conv(x, self.weight, self.bias, s[0])
            if self.out_channels < 16 and s[0] == 1:
                return phase_conv(x, self.weight, self.bias, 2)
        return super().forward(x)


class ConvBlock(nn.Sequential):
    """pad -> conv (with bias) -> norm -> activation."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, pad: int,
                 norm: str = "none", activ: str = "relu", pad_type: str = "zero",
                 spectral: bool = False, channels_last: bool = True):
        conv = Conv2d(cin, cout, k, stride, 0, bias=True)
        if spectral:
            conv = nn.utils.parametrizations.spectral_norm(conv)
        super().__init__(make_pad(pad_type, pad, channels_last), conv, make_norm(norm, cout), make_activation(activ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad, conv, norm, act = self
        x = conv(pad(x))
        if isinstance(norm, InstanceNorm) and use_fast(norm.fast, x):
            if type(act) is nn.ReLU:
                return norm(x, relu=True)
            if type(act) is nn.Identity:  # a residual block's second conv: its output goes to x + body(x)
                return norm(x, save_output=True)
        return act(norm(x))


class ResBlock(nn.Module):
    """x + [conv3x3-norm-act, conv3x3-norm]."""

    def __init__(self, dim: int, norm: str, activ: str, pad_type: str):
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(dim, dim, 3, 1, 1, norm, activ, pad_type),
            ConvBlock(dim, dim, 3, 1, 1, norm, "none", pad_type),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def res_blocks(n: int, dim: int, norm: str, activ: str, pad_type: str) -> nn.Sequential:
    # An empty Sequential is the identity: n_shared = 0 means no shared layer.
    return nn.Sequential(*[ResBlock(dim, norm, activ, pad_type) for _ in range(n)])


def encoder_front(channels: int, dim: int, n_down: int, n_res: int,
                  norm: str, activ: str, pad_type: str) -> nn.Sequential:
    """Domain-specific part of an encoder; outputs dim * 2**n_down channels."""
    layers = [ConvBlock(channels, dim, 7, 1, 3, norm, activ, pad_type)]
    for _ in range(n_down):
        layers.append(ConvBlock(dim, dim * 2, 4, 2, 1, norm, activ, pad_type))
        dim *= 2
    layers.append(res_blocks(n_res, dim, norm, activ, pad_type))
    return nn.Sequential(*layers)


# Nearest 2x upsampling followed by a 5x5 conv sees, at each output phase (row parity r,
# column parity c), only a 3x3 neighbourhood of the low-res input; row t of _PHASE[r] sums the
# 5x5 kernel rows that land on low-res tap t.
_PHASE = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
                       [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]]], dtype=torch.float32)


class UpConvBlock(nn.Module):
    """Nearest 2x upsample -> pad 2 -> conv 5x5 -> norm -> activation.

    With `fused` (default) the upsample + conv runs as one 3x3 conv with 4x the output
    channels on the low-res input followed by a pixel shuffle: the same function with 36/100
    of the multiply-adds. Zero and replicate padding commute with the upsampling; reflect
    padding does not, so there the outermost output rows and columns get an exact correction
    from one-pixel-wide difference rows. Parameters and state_dict are those of the plain block.
    """

    fast = True

    def __init__(self, cin: int, cout: int, norm: str, activ: str, pad_type: str, fused: bool = True):
        super().__init__()
        make_pad(pad_type, 1)  # validates pad_type
        self.pad_type = pad_type
        self.fused = fused
        self.conv = nn.Conv2d(cin, cout, 5, 1, 0, bias=True)
        self.norm = make_norm(norm, cout)
        self.activ = make_activation(activ)
        # A buffer, so it moves with the module: read from the CPU constant, every forward on a
        # GPU would copy it from pageable host memory, which waits for the whole stream (a sync).
        # Not persistent: checkpoints and exports keep the plain block's state_dict.
        self.register_buffer("phase", _PHASE.clone(), persistent=False)

    def _plain(self, x, fast=False):
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(pad2d(up, 2, self.pad_type, fast))

    def _fused(self, x, fast=False):
        w, b = self.conv.weight, self.conv.bias
        o, i = w.shape[:2]
        a = self.phase.to(w)
        k = torch.einsum("ryk,oikl,cxl->orciyx", a, w, a).reshape(o * 4, i, 3, 3)
        mode = "zero" if self.pad_type == "zero" else "replicate"
        y = F.pixel_shuffle(F.conv2d(pad2d(x, 1, mode, fast), k, b.repeat_interleave(4)), 2)
        if self.pad_type != "reflect":
            return y  # zero and replicate padding commute with nearest upsampling
        # Reflect padding: P = pad2(up(x)) differs from Q = up(replicate-pad1(x)) (what y used)
        # only in padded row 0 (x[1] instead of x[0]) and row 2H+3 (x[H-2] instead of x[H-1]), and
        # the same for columns. conv(P) = conv(Q) + conv(row difference) + conv(column difference);
        # each difference row reaches one output row (0 or 2H-1) through one kernel row (0 or 4).
        def widen(d):  # row differences follow P's columns: upsampled, reflect-padded by 2
            return F.pad(d.repeat_interleave(2, dim=3), (2, 2, 0, 0), mode="reflect")

        def heighten(d):  # column differences follow Q's rows: replicate-padded by 1, upsampled
            return torch.cat([d[:, :, :1], d, d[:, :, -1:]], dim=2).repeat_interleave(2, dim=2)

        top = F.conv2d(widen(x[:, :, 1:2] - x[:, :, :1]), w[:, :, :1])
        bottom = F.conv2d(widen(x[:, :, -2:-1] - x[:, :, -1:]), w[:, :, 4:])
        left = F.conv2d(heighten(x[..., 1:2] - x[..., :1]), w[..., :1])
        right = F.conv2d(heighten(x[..., -2:-1] - x[..., -1:]), w[..., 4:])
        if fast:  # in place, y's gradient passed through whole (no full-size copies)
            return add_borders(y, top, bottom, left, right)
        y = torch.cat([y[:, :, :1] + top, y[:, :, 1:-1], y[:, :, -1:] + bottom], dim=2)
        return torch.cat([y[..., :1] + left, y[..., 1:-1], y[..., -1:] + right], dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = use_fast(self.fast, x)
        fused = self.fused and min(x.shape[-2:]) >= 2  # reflect needs 2 pixels
        return self.activ(self.norm(self._fused(x, fast) if fused else self._plain(x, fast)))


def set_fused_upsample(module: nn.Module, fused: bool) -> None:
    """Switch every UpConvBlock in `module` between the fused and the plain computation."""
    for m in module.modules():
        if isinstance(m, UpConvBlock):
            m.fused = fused


def set_fast_paths(module: nn.Module, fast: bool) -> None:
    """Switch the training-time rewrites (model/kernels.py: channels-last activations, closed-form
    norm and pad backward passes, the phase and patch convolutions) on or off in every
    pad, conv, norm, upsampling block and discriminator of `module`. Off, the layers compute what
    the official ones do, op for op."""
    for m in module.modules():
        if isinstance(m, (Pad, Conv2d, InstanceNorm, LayerNorm, UpConvBlock, MultiScaleDiscriminator)):
            m.fast = fast


def decoder_back(channels: int, dim: int, n_up: int, n_res: int, res_norm: str,
                 up_norm: str, activ: str, pad_type: str, fused_upsample: bool = True,
                 skip: bool = False, palette=None) -> nn.Sequential:
    """Domain-specific part of a generator; `dim` is the latent width (dim * 2**n_down). With
    `skip` its last layer is a SkipHead, called with the source image (UNITGenerator.decode).
    With a `palette` (uint8 colours) the image comes out of a PaletteHead instead of a tanh."""
    layers = [res_blocks(n_res, dim, res_norm, activ, pad_type)]
    for _ in range(n_up):
        # nearest upsample + conv instead of a transposed conv: no checkerboard artefacts
        layers.append(UpConvBlock(dim, dim // 2, up_norm, activ, pad_type, fused_upsample))
        dim //= 2
    if skip:
        layers.append(SkipHead(dim, channels, up_norm, activ, pad_type, palette))
    else:
        layers.append(image_head(dim, channels, pad_type, palette))
    return nn.Sequential(*layers)


def image_head(dim: int, channels: int, pad_type: str, palette=None) -> nn.Module:
    """The generator's last layer: conv 7x7 -> tanh, or a PaletteHead when given a palette."""
    if palette:
        return PaletteHead(dim, palette, pad_type)
    return ConvBlock(dim, channels, 7, 1, 3, "none", "tanh", pad_type)


def nearest_index(x: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """[B, H * W]: for each pixel of channels-last `x` [B, H, W, C], the index of the nearest row of
    `colours` [K, C]. Distances in fp32: under DeepSpeed's fp16 the image is half and the colours, a
    buffer, stay fp32 (cdist takes one dtype)."""
    return torch.cdist(x.flatten(1, 2).float(), colours.float().unsqueeze(0)).argmin(-1)


def nearest_colour(x: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C]: each pixel of channels-last `x` replaced by the nearest row of `colours` [K, C],
    in x's dtype (nearest_index)."""
    return colours[nearest_index(x, colours)].view_as(x).to(x.dtype)


class PaletteHead(nn.Module):
    """Conv 7x7 -> one logit per palette colour -> the image, for domains drawn in a few flat
    colours (maps, label images). Training paints the softmax-weighted mixture of the colours, so
    every loss has a gradient; eval mode paints each pixel's most probable colour, exactly.

    Why: a tanh head regresses each pixel's colour, and under L1 and a patch GAN it settles on
    blurred, slightly-off averages of the palette (a map's land a few levels too dark, roads
    land-coloured), which a pixel-accuracy metric counts as wrong. Choosing among the domain's
    own colours turns that into a classification that can be exactly right.
    """

    def __init__(self, dim: int, palette, pad_type: str):
        super().__init__()
        colours = torch.tensor(palette, dtype=torch.float32)
        if colours.ndim != 2 or colours.shape[0] < 2 or colours.shape[1] < 1:
            raise ValueError(f"palette must hold at least 2 colours of equal length, got {list(colours.shape)}")
        self.pad = make_pad(pad_type, 3)
        self.conv = nn.Conv2d(dim, colours.shape[0], 7, 1, 0, bias=True)
        self.register_buffer("colours", colours / 127.5 - 1)  # [K, C] in [-1, 1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K, H, W]: one logit per palette colour, in fp32."""
        return self.conv(self.pad(x)).float()

    def paint(self, weights: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C]: the palette colours weighted per pixel by `weights` [B, K, H, W]."""
        return torch.einsum("bkhw,kc->bhwc", weights, self.colours.to(weights.dtype))

    def nearest(self, mix: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C]: each pixel of `mix` replaced by the palette colour nearest to it."""
        return nearest_colour(mix, self.colours)

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W]: an image (the layout this head paints in) in its nearest palette colours."""
        return self.nearest(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        if not self.training:
            # the most probable colour (a pixel-accuracy metric's Bayes decision), not the colour
            # nearest to the mixture: where two far colours split the probability (land and a
            # building's outline at its edge) their mixture is nearest a third one. On the demo's
            # map translator the largest logit scored 0.004-0.015 a2b more at every checkpoint of
            # a 2,000-step run (docs/quality.md)
            return self.most_probable(logits)
        return self._as_image(self.paint(logits.softmax(1)))

    def most_probable(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W]: each pixel in the colour of its largest score ([B, K, H, W] logits or probabilities)."""
        return self._as_image(self.colours[scores.argmax(1)])

    def _as_image(self, mix: torch.Tensor) -> torch.Tensor:
        # painted in fp32, returned in the weights' dtype: under DeepSpeed's fp16 the layers that read
        # the image next (the re-encoding, the discriminators) are half and refuse fp32 inputs
        return mix.permute(0, 3, 1, 2).to(self.conv.weight.dtype).contiguous()


class SkipHead(nn.Module):
    """The generator's last stage when it also sees the source image (UNITConfig.skip = "image"):
    concat(upsampled features, source image) -> conv 3x3 -> norm -> activation -> conv 7x7 -> tanh.

    The latent (a quarter of the resolution at n_down 2) carries what the scene is; the source
    image at full resolution carries where its edges are, which a short CPU run cannot learn to
    squeeze through the latent: without it reconstructions and translations stay blurry.
    """

    def __init__(self, dim: int, channels: int, norm: str, activ: str, pad_type: str, palette=None):
        super().__init__()
        self.mix = ConvBlock(dim + channels, dim, 3, 1, 1, norm, activ, pad_type)
        self.out = image_head(dim, channels, pad_type, palette)

    def features(self, h: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """What the image head (self.out) paints from: the features mixed with the source image."""
        if source.shape[-2:] != h.shape[-2:] or source.shape[0] != h.shape[0]:
            raise ValueError(f"source image {tuple(source.shape)} does not match the decoder's "
                             f"output {tuple(h.shape[:1])} x {tuple(h.shape[-2:])}")
        return self.mix(torch.cat([h, source.to(h)], 1))

    def forward(self, h: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(h, source))


class ColourFeatures(nn.Module):
    """x -> [x, sin(2^k pi x), cos(2^k pi x) for k < octaves], per channel (Fourier features of
    each pixel's colour, as in Tancik et al. 2020, applied to the discriminator's input).

    Why: a plain patch discriminator cannot learn in a short run that a colour is a few levels
    off. On the demo maps it stays at chance for 300 steps against maps with their land painted
    white (0.1 away in [-1, 1]) or 10 levels darker, so it never tells a generator that its land
    is the wrong shade. With these features an exact colour is a linear function of the input and
    the same network separates both in under 50 steps (docs/quality.md).
    """

    def __init__(self, octaves: int):
        super().__init__()
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(octaves, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = (x.unsqueeze(1) * self.freqs.view(1, -1, 1, 1, 1).to(x.dtype)).flatten(1, 2)  # [B, K*C, H, W]
        return torch.cat([x, phase.sin(), phase.cos()], 1)


class MultiScaleDiscriminator(nn.Module):
    """Patch discriminators on the image and on 2x, 4x, ... average-pooled copies.

    A scale runs only while its input is at least `min_size` pixels (and at least
    2**n_layers, below which the strided convs would run out of pixels), so small images
    (32x32) use fewer scales instead of crashing. `forward` returns one logit map per scale.
    """

    fast = True

    def __init__(self, channels: int, dim: int, n_layers: int, n_scales: int,
                 activ: str = "lrelu", norm: str = "none", pad_type: str = "reflect",
                 min_size: int = 16, colour_octaves: int = 0):
        super().__init__()
        if norm not in DIS_NORMS:
            raise ValueError(f"dis_norm {norm!r} is not one of {DIS_NORMS}")
        self.colour = ColourFeatures(colour_octaves) if colour_octaves else nn.Identity()
        channels = channels * (1 + 2 * colour_octaves)
        self.min_size = max(int(min_size), 2 ** n_layers)
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.nets = nn.ModuleList()
        for _ in range(n_scales):
            d = dim
            layers = [ConvBlock(channels, d, 4, 2, 1, "none", activ, pad_type, norm == "sn", channels_last=False)]
            for _ in range(n_layers - 1):
                layers.append(ConvBlock(d, d * 2, 4, 2, 1, "none", activ, pad_type, norm == "sn",
                                        channels_last=False))
                d *= 2
            layers.append(nn.Conv2d(d, 1, 1, 1, 0))
            self.nets.append(nn.Sequential(*layers))

    def scales_for(self, size: int) -> int:
        """How many scales an image whose smaller side is `size` uses."""
        n = 0
        while n < len(self.nets) and size >= self.min_size:
            n += 1
            size = (size + 1) // 2
        return n

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if use_fast(self.fast, x):
            x = x.contiguous()  # NCHW: oneDNN runs these small strided convolutions faster in it
        size = min(x.shape[-2:])
        n = self.scales_for(size)
        if n == 0:
            raise ValueError(f"discriminator input is {tuple(x.shape[-2:])} px; it needs at "
                             f"least {self.min_size} px on each side")
        outs = []
        for i in range(n):
            outs.append(self.nets[i](self.colour(x)))
            if i + 1 < n:
                x = self.downsample(x)
        return outs


def init_kaiming(module: nn.Module) -> None:
    """Kaiming-normal (fan_in) conv/linear weights, zero biases: encoders and generators."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_gaussian(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) conv/linear weights, zero biases: discriminators."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            # spectral_norm keeps the raw weight under parametrizations.weight.original
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(w, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_params(*modules: nn.Module) -> int:
    """Parameters of the given modules, each tensor counted once."""
    seen = {}
    for mod in modules:
        for p in mod.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def check_divisible(size: int, n_down: int, what: str = "image size") -> None:
    if size % (2 ** n_down):
        raise ValueError(f"{what} {size} is not divisible by 2**n_down = {2 ** n_down}")


__all__ = [
    "LayerNorm", "InstanceNorm", "Pad", "Conv2d", "ConvBlock", "UpConvBlock", "set_fused_upsample", "set_fast_paths", "ResBlock", "res_blocks", "encoder_front", "decoder_back", "SkipHead",
    "MultiScaleDiscriminator", "init_kaiming", "init_gaussian", "count_params",
    "make_activation", "make_norm", "make_pad", "check_divisible",
]
