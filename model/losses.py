"""UNIT loss terms: L1 reconstruction, KL to N(0, I) for a unit-variance posterior, GAN losses.

GAN losses take a list of logit maps (one per discriminator scale) and sum over scales, as the
official code does.

Every reduction runs in float32 whatever the networks ran in (bf16 autocast, fp16 weights): a mean
over a batch of images in half precision loses the small differences the loss is made of, and
fp16 can overflow on the squares. `.float()` is free for float32 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_TYPES = ("lsgan", "nsgan", "hinge")


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error: -log of a Laplacian likelihood up to constants."""
    return (x.float() - y.float()).abs().mean()


def kl(mu: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, I) || N(0, I)) up to the factor 0.5 and the sum: mean(mu^2), as the official code."""
    return mu.float().pow(2).mean()


HUE_AXES = ("both", "rg")


def _opponent(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, H*W]: each pixel's opponent colours (R - G, (R + G) / 2 - B), less the image's mean."""
    r, g, b = x.float().flatten(2).unbind(1)
    o = torch.stack([r - g, (r + g) / 2 - b], 1)
    return o - o.mean(-1, keepdim=True)


def hue_corr(src: torch.Tensor, dst: torch.Tensor, eps: float = 1e-4, axes: str = "both",
             pool: int = 1) -> torch.Tensor:
    """1 - the Pearson correlation, over each image's pixels, between the opponent colours of a
    source and of its translation (RGB, [B, 3, H, W]; per axis, averaged over axes and images):
    0 when the translation's hue changes where and as its source's does, 2 when opposite.

    Why: the unpaired objective leaves free which source colour goes to which target colour, and
    a translator can settle on an order by brightness (a photo's dark parks and water painted in
    a map's dark outline colour); where classes keep their hue across domains (green parks, blue
    water) this prior breaks that tie. Invariant to each image's colour offset and scale.

    axes="rg" keeps only the red-green axis. On the demo corpus the yellow-blue one disagrees
    between the domains where the right colours lie: the photos' dark parks are less yellow than
    their olive land, the maps' light green parks more yellow than the maps' white land; grey
    major roads become orange. Red-green keeps its sign for parks, water and major roads.

    pool > 1 correlates the mean colours of pool x pool blocks instead of pixels.
    """
    if axes not in HUE_AXES:
        raise ValueError(f"hue axes {axes!r} is not one of {HUE_AXES}")
    if pool > 1:
        src, dst = F.avg_pool2d(src.float(), pool), F.avg_pool2d(dst.float(), pool)
    s, d = _opponent(src), _opponent(dst)
    if axes == "rg":
        s, d = s[:, :1], d[:, :1]
    corr = (s * d).sum(-1) / ((s.pow(2).sum(-1) + eps).sqrt() * (d.pow(2).sum(-1) + eps).sqrt())
    return 1 - corr.mean()


def _check(gan_type: str) -> None:
    if gan_type not in GAN_TYPES:
        raise ValueError(f"gan_type {gan_type!r} is not one of {GAN_TYPES}")


def gan_g(fake_logits: list[torch.Tensor], gan_type: str) -> torch.Tensor:
    """Generator's adversarial loss: make D call the fakes real."""
    _check(gan_type)
    total = 0.0
    for d in fake_logits:
        d = d.float()
        if gan_type == "lsgan":
            total = total + (d - 1).pow(2).mean()
        elif gan_type == "nsgan":
            # non-saturating: -log sigmoid(d) == softplus(-d)
            total = total + F.softplus(-d).mean()
        else:
            total = total - d.mean()
    return total


def gan_d(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor], gan_type: str) -> torch.Tensor:
    """Discriminator's loss: real -> 1 (or > 1 for hinge), fake -> 0 (or < -1)."""
    _check(gan_type)
    if len(real_logits) != len(fake_logits):
        raise ValueError(f"{len(real_logits)} real scales vs {len(fake_logits)} fake scales")
    total = 0.0
    for r, f in zip(real_logits, fake_logits):
        r, f = r.float(), f.float()
        if gan_type == "lsgan":
            total = total + (r - 1).pow(2).mean() + f.pow(2).mean()
        elif gan_type == "nsgan":
            # -log sigmoid(r) - log(1 - sigmoid(f))
            total = total + F.softplus(-r).mean() + F.softplus(f).mean()
        else:
            total = total + F.relu(1 - r).mean() + F.relu(1 + f).mean()
    return total
