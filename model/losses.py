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
