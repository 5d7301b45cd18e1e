"""The trivial translators every model must beat, estimated from training images only.

    identity    the input as output
    constant    every pixel the most frequent colour of the target domain (colours binned
                8 levels per channel; the bin's mean colour, so a flat palette colour is hit exactly)
    histmatch   per-channel histogram matching: source-domain CDF -> target-domain CDF

A translator that loses to one of these has learnt less than a one-line rule, whatever its
absolute score; every evaluation table shows them beside the model. The statistics come from
the training shards (never the paired test truth) and are small: per domain, a 3x256
histogram and one colour. They travel with the export as `baselines.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import write_json as write_json_atomic

BIN = 8              # colour bin width per channel for the most frequent colour
FILE_NAME = "baselines.json"
FORMAT_VERSION = 1
NAMES = ("identity", "constant", "histmatch")


@dataclass
class DomainStats:
    """Colour statistics of one domain's training images."""

    hist: np.ndarray         # int64 [3, 256]: per-channel value counts
    bin_counts: np.ndarray   # int64 [(256/BIN)**3]: pixels per colour bin
    bin_sums: np.ndarray     # float64 [(256/BIN)**3, 3]: colour sums per bin (for the bin's mean)
    images: int = 0

    @classmethod
    def empty(cls) -> "DomainStats":
        nb = (256 // BIN) ** 3
        return cls(np.zeros((3, 256), np.int64), np.zeros(nb, np.int64), np.zeros((nb, 3), np.float64))

    def add(self, images: np.ndarray) -> "DomainStats":
        """Count uint8 [N, H, W, 3] images in."""
        x = _check_images(images).reshape(-1, 3)
        for c in range(3):
            self.hist[c] += np.bincount(x[:, c], minlength=256)
        q = (x // BIN).astype(np.int64)
        k = (q[:, 0] * (256 // BIN) + q[:, 1]) * (256 // BIN) + q[:, 2]
        self.bin_counts += np.bincount(k, minlength=len(self.bin_counts))
        for c in range(3):
            self.bin_sums[:, c] += np.bincount(k, weights=x[:, c], minlength=len(self.bin_counts))
        self.images += len(images)
        return self

    def mode_colour(self) -> np.ndarray:
        """uint8 [3]: mean colour of the most populated bin."""
        if not self.bin_counts.any():
            raise ValueError("baselines: no pixels counted for this domain")
        k = int(self.bin_counts.argmax())
        return np.round(self.bin_sums[k] / self.bin_counts[k]).astype(np.uint8)

    def cdf(self) -> np.ndarray:
        """float64 [3, 256] per-channel cumulative distribution."""
        c = self.hist.cumsum(axis=1).astype(np.float64)
        return c / np.maximum(c[:, -1:], 1)


def _check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {x.dtype} {list(x.shape)}")
    return x


def histmatch_lut(src: DomainStats, dst: DomainStats) -> np.ndarray:
    """uint8 [3, 256]: for each channel, the target value whose CDF first reaches the source CDF."""
    s, d = src.cdf(), dst.cdf()
    return np.stack([np.searchsorted(d[c], s[c] - 1e-12).clip(0, 255) for c in range(3)]).astype(np.uint8)


def apply_lut(images: np.ndarray, lut: np.ndarray) -> np.ndarray:
    x = _check_images(images)
    return np.stack([lut[c][x[..., c]] for c in range(3)], axis=-1)


def translators(stats: dict[str, DomainStats]) -> dict[str, callable]:
    """{name: fn(uint8 images, direction) -> uint8 images} for identity, constant and histmatch."""
    luts = {"a2b": histmatch_lut(stats["a"], stats["b"]), "b2a": histmatch_lut(stats["b"], stats["a"])}
    modes = {d: stats[d].mode_colour() for d in ("a", "b")}

    def identity(x, direction):
        return _check_images(x).copy()

    def constant(x, direction):
        x = _check_images(x)
        return np.broadcast_to(modes[direction[-1]], x.shape).copy()

    def histmatch(x, direction):
        return apply_lut(x, luts[direction])

    return {"identity": identity, "constant": constant, "histmatch": histmatch}


# ---------------------------------------------------------------------------------------------
# From shards, to and from JSON


def stats_from_shards(shards_a, shards_b=None, image_size: int = 64, max_images: int = 1000,
                      seed: int = 0) -> dict[str, DomainStats]:
    """Per-domain statistics of up to `max_images` training images per domain, read from shards the
    way training reads them (shortest side resized to `image_size`, centre crop, no flips)."""
    from pipeline.loader import UnpairedLoader

    shards_b = shards_a if shards_b is None else shards_b
    batch = 50
    loader = UnpairedLoader(shards_a, shards_b, batch_size=batch, image_size=image_size, seed=seed,
                            num_workers=0, augment={"train": False, "flip": False}, rank=0, world_size=1)
    out = {"a": DomainStats.empty(), "b": DomainStats.empty()}
    it = iter(loader)
    for _ in range(max(1, -(-max_images // batch))):
        b = next(it)
        for d in ("a", "b"):
            x = b[d].permute(0, 2, 3, 1).numpy()  # the loader's uint8 NCHW -> NHWC
            out[d].add(x)
    return out


def to_json(stats: dict[str, DomainStats]) -> dict:
    return {"format": FORMAT_VERSION, "bin": BIN,
            "domains": {d: {"images": s.images, "hist": s.hist.tolist(), "mode_colour": s.mode_colour().tolist()}
                        for d, s in stats.items()}}


def from_json(d: dict) -> dict[str, DomainStats]:
    """Statistics back from `to_json` (the mode colour is kept as saved)."""
    if d.get("format") != FORMAT_VERSION:
        raise ValueError(f"baselines: format {d.get('format')!r}, expected {FORMAT_VERSION}")
    out = {}
    for name, v in d["domains"].items():
        s = DomainStats.empty()
        s.hist = np.asarray(v["hist"], np.int64).reshape(3, 256)
        colour = np.asarray(v["mode_colour"], np.float64)
        k = int(((colour // BIN).astype(int) * [(256 // BIN) ** 2, 256 // BIN, 1]).sum())
        s.bin_counts[k], s.bin_sums[k] = 1, colour
        s.images = int(v["images"])
        out[name] = s
    return out


def save(path, stats: dict[str, DomainStats]) -> Path:
    path = Path(path)
    write_json_atomic(path, to_json(stats))
    return path


def load(path) -> dict[str, DomainStats]:
    path = Path(path)
    try:
        return from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a baselines file ({type(e).__name__}: {e})") from None
