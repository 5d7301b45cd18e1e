"""Classifier two-sample test (C2ST): can a small CNN tell real target-domain images from translations?

Both sets are shuffled and split in halves; the classifier trains on one half of each and is
scored on the other, balanced. Two sets of the same length are taken as paired (fake[i] is the
translation of the scene real[i] shows, as on a paired test split) and split the same way, so
the classifier is never trained on the counterpart of an image it is scored on. 0.5 means it cannot tell them apart (the translations look like
the domain, as far as this classifier sees), 1.0 means it always can. Unlike a classifier of
real A vs real B (which only says "moved towards B's palette"), this one is trained against the
very images it judges, so a translator that is merely the right colour still fails.

    c2st(real_uint8_nhwc, fake_uint8_nhwc, steps=300) -> accuracy on held-out images
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_STEPS = 200
DEFAULT_SIZE = 32
MIN_IMAGES = 8


class SmallCNN(nn.Module):
    """Four stride-2 convs and a global average pool to one logit; inputs resized to `image_size`."""

    def __init__(self, width: int = 16, image_size: int = DEFAULT_SIZE):
        super().__init__()
        self.image_size = int(image_size)
        w = int(width)
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 4 * w, 3, 2, 1), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(4 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.head(self.body(x).mean(dim=(2, 3))).squeeze(1)


def _tensor(images: np.ndarray) -> torch.Tensor:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"c2st: expected uint8 [N, H, W, 3] images, got {x.dtype} {list(x.shape)}")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _halves(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(idx)
    return x[idx[: n // 2]], x[idx[n // 2:]]


def c2st(real, fake, *, steps: int = DEFAULT_STEPS, image_size: int = DEFAULT_SIZE, batch_size: int = 32,
         lr: float = 1e-3, seed: int = 0) -> float:
    """Held-out accuracy of a classifier trained to tell `real` from `fake` (uint8 [N, H, W, 3] each;
    the same number of each is used; equal lengths are split as pairs). Deterministic for a given seed."""
    real_t, fake_t = _tensor(real), _tensor(fake)
    n = min(len(real_t), len(fake_t))
    if n < MIN_IMAGES:
        raise ValueError(f"c2st: needs at least {MIN_IMAGES} images of each kind, got {len(real_t)} real "
                         f"and {len(fake_t)} translated")
    gen = torch.Generator().manual_seed(seed)
    idx_r = torch.randperm(len(real_t), generator=gen)[:n]
    # paired sets: the same split for both (a scene is wholly on the train or on the test side)
    idx_f = idx_r if len(fake_t) == len(real_t) else torch.randperm(len(fake_t), generator=gen)[:n]
    (r_tr, r_te), (f_tr, f_te) = _halves(real_t, idx_r), _halves(fake_t, idx_f)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        net = SmallCNN(image_size=min(image_size, max(real_t.shape[-1], 8)))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        b = min(batch_size, len(r_tr))
        labels = torch.cat([torch.ones(b), torch.zeros(b)])
        for _ in range(steps):
            ir = torch.randint(len(r_tr), (b,), generator=gen)
            i_f = torch.randint(len(f_tr), (b,), generator=gen)
            x = torch.cat([r_tr[ir], f_tr[i_f]])
            flip = torch.rand(len(x), generator=gen) < 0.5  # flips: judge content, not orientation
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(net(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc_real = float((net(r_te) > 0).float().mean())
            acc_fake = float((net(f_te) <= 0).float().mean())
    return (acc_real + acc_fake) / 2
