"""Images in and out of the network: uint8 HWC RGB <-> float32 NCHW tensors in [-1, 1].

    x = to_tensor(images)      # uint8 [H,W,3] or [N,H,W,3] -> float32 [N,3,H,W], x/127.5 - 1
    images = to_uint8(y)       # float [N,3,H,W] or [3,H,W] -> uint8 NHWC or HWC, rounded, clamped
    x = normalize(batch["a"].to(device, non_blocking=True), dtype)   # a loader batch (uint8 NCHW)

numpy and torch only (torch imported when called): the registered model ships this file, and
pipeline/imageio.py (which needs PIL) re-exports both for the callers that read images first.
"""
from __future__ import annotations

import numpy as np


def to_tensor(images):
    """uint8 HWC (or NHWC) RGB -> float32 NCHW torch tensor in [-1, 1]."""
    import torch

    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images: expected dtype uint8, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images: expected shape [H,W,3] or [N,H,W,3] (RGB), got {list(arr.shape)}")
    return normalize(torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2))


def normalize(x, dtype=None):
    """uint8 torch tensor (any shape, any device) -> float in [-1, 1] (x/127.5 - 1) in `dtype`
    (default float32). The one place pixels become network inputs: the loader's uint8 batches
    after their copy to the device, and `to_tensor`.

    Computed in float32 and cast once, so every dtype gets the correctly rounded value of the
    same number (bf16/fp16 arithmetic on the way would round twice)."""
    import torch

    if x.dtype != torch.uint8:
        raise ValueError(f"normalize: expected a uint8 tensor, got {x.dtype}")
    y = x.to(torch.float32).div_(127.5).sub_(1.0)
    return y if dtype is None or dtype == torch.float32 else y.to(dtype)


def to_uint8(x) -> np.ndarray:
    """float NCHW (or CHW) torch tensor in [-1, 1] -> uint8 NHWC (or HWC), rounded and clamped."""
    import torch

    x = x.detach().float().cpu()
    y = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if y.ndim == 4:
        return y.permute(0, 2, 3, 1).numpy()
    if y.ndim == 3:
        return y.permute(1, 2, 0).numpy()
    raise ValueError(f"x: expected a [N,3,H,W] or [3,H,W] tensor, got {list(x.shape)}")
