"""FID and KID (torchmetrics) with a feature extractor the user provides as a file.

Nothing is downloaded. The file is a TorchScript module (`torch.jit.save`) mapping uint8
[N, 3, H, W] images to float [N, D] features, e.g. an Inception-v3 pool3 extractor (the
standard for FID, D = 2048) scripted once where the weights are at hand. TorchScript loads
without unpickling Python objects. Without a file the table says how to set one.

    feats = load_extractor("inception.pt")
    fid_kid(real_uint8_nhwc, fake_uint8_nhwc, feats) -> {"fid": x, "kid": y}
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

NO_WEIGHTS = "FID/KID: no feature extractor (set eval.fid_features or --fid-features to a TorchScript file)"


class _Features(nn.Module):
    """Adapter for torchmetrics: uint8 NCHW in, float [N, D] out, `num_features` known up front."""

    def __init__(self, extractor: nn.Module, num_features: int):
        super().__init__()
        self.extractor, self.num_features = extractor, int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.extractor(x)
        return y.reshape(len(x), -1).float()


def load_extractor(path) -> nn.Module:
    """The TorchScript feature extractor in `path`, in eval mode on the CPU."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fid features {p}: no such file (a TorchScript module saved with torch.jit.save)")
    try:
        return torch.jit.load(str(p), map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"fid features {p}: not a TorchScript module ({str(e).splitlines()[0]})") from None


def _nchw(images) -> torch.Tensor:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"fid: expected uint8 [N, H, W, 3] images, got {x.dtype} {list(x.shape)}")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


@torch.no_grad()
def fid_kid(real, fake, extractor: nn.Module, batch_size: int = 64, kid_subsets: int = 20,
            seed: int = 0) -> dict:
    """{"fid", "kid"} between `real` and `fake` (uint8 [N, H, W, 3]); KID subsets of min(N) images."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    r, f = _nchw(real), _nchw(fake)
    n = min(len(r), len(f))
    if n < 2:
        raise ValueError(f"fid: needs at least 2 images of each kind, got {len(r)} real and {len(f)} translated")
    dim = _Features(extractor, 1)(r[:2]).shape[-1]
    feats = _Features(extractor, dim)
    fid = FrechetInceptionDistance(feature=feats, reset_real_features=True)
    with warnings.catch_warnings():  # "KID keeps all features in memory": a test split's worth, by design
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=feats, subsets=kid_subsets, subset_size=n)
    for imgs, real_flag in ((r, True), (f, False)):
        for i in range(0, len(imgs), batch_size):
            fid.update(imgs[i:i + batch_size], real=real_flag)
            kid.update(imgs[i:i + batch_size], real=real_flag)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from torch's RNG
        torch.manual_seed(seed)
        kid_mean, _ = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean)}
