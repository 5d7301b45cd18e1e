"""Colour statistics of a domain's training images: per-channel histograms and binned colours.

Small enough to keep (a 3x256 histogram and a 32**3 colour-bin table per domain; while counting,
also a 128**3 grid, 16 MB, for the best constant colour) and enough for what reads them: the
trivial baselines every evaluation shows (launch/release/baselines.py: the best constant colour,
per-channel histogram matching) and, for domains drawn in a few flat colours such as maps, the
palette a generator's PaletteHead paints with (`model.palette_b: auto`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BIN = 8              # colour bin width per channel for the most frequent colour and the palette
FINE = 2             # cell width per channel of the grid the best constant colour is searched on
TOLERANCE = 16       # pixel accuracy's tolerance per channel (launch.release.evaluate.THRESHOLD)


@dataclass
class DomainStats:
    """Colour statistics of one domain's training images."""

    hist: np.ndarray         # int64 [3, 256]: per-channel value counts
    bin_counts: np.ndarray   # int64 [(256/BIN)**3]: pixels per colour bin
    bin_sums: np.ndarray     # float64 [(256/BIN)**3, 3]: colour sums per bin (for the bin's mean)
    images: int = 0
    fine: np.ndarray | None = None      # int64 [(256/FINE)**3]: pixels per fine cell (counting only, not saved)
    constant: np.ndarray | None = None  # uint8 [3]: the best constant as saved (statistics read back)
    constant_tolerance: int = TOLERANCE  # the tolerance `constant` was searched at

    @classmethod
    def empty(cls) -> "DomainStats":
        nb = (256 // BIN) ** 3
        return cls(np.zeros((3, 256), np.int64), np.zeros(nb, np.int64), np.zeros((nb, 3), np.float64))

    def add(self, images: np.ndarray) -> "DomainStats":
        """Count uint8 [N, H, W, 3] images in."""
        x = check_images(images).reshape(-1, 3)
        for c in range(3):
            self.hist[c] += np.bincount(x[:, c], minlength=256)
        q = (x // BIN).astype(np.int64)
        k = (q[:, 0] * (256 // BIN) + q[:, 1]) * (256 // BIN) + q[:, 2]
        self.bin_counts += np.bincount(k, minlength=len(self.bin_counts))
        for c in range(3):
            self.bin_sums[:, c] += np.bincount(k, weights=x[:, c], minlength=len(self.bin_counts))
        n = 256 // FINE
        if self.fine is None:
            self.fine = np.zeros(n ** 3, np.int64)
        f = (x // FINE).astype(np.int64)
        self.fine += np.bincount((f[:, 0] * n + f[:, 1]) * n + f[:, 2], minlength=n ** 3)
        self.images += len(images)
        return self

    def _bin_colour(self, k: int) -> np.ndarray:
        return np.round(self.bin_sums[k] / self.bin_counts[k]).astype(np.uint8)

    def mode_colour(self) -> np.ndarray:
        """uint8 [3]: mean colour of the most populated bin."""
        if not self.bin_counts.any():
            raise ValueError("no pixels counted for this domain")
        return self._bin_colour(int(self.bin_counts.argmax()))

    def best_constant(self, tolerance: int = TOLERANCE) -> np.ndarray:
        """uint8 [3]: the constant colour that scores the best pixel accuracy on the counted pixels
        (the most pixels with every channel within `tolerance` of it), searched on a grid of FINE
        values a cell. It can beat the most frequent colour by far: with a map's land (242, 239,
        233) and white roads (255, 255, 255), a colour between them is right on both. The most
        frequent colour where it is as good (a flat image: that colour exactly)."""
        if self.fine is None:
            if self.constant is None:
                raise ValueError("no pixels counted for this domain")
            if tolerance // FINE != self.constant_tolerance // FINE:  # another search's answer
                raise ValueError(f"these baseline statistics hold the best constant colour at tolerance "
                                 f"{self.constant_tolerance} only, not at {tolerance}: estimate them again "
                                 "from the training images (evaluate: --shards OUT)")
            return self.constant
        n, r = 256 // FINE, tolerance // FINE
        held = self.fine.reshape(n, n, n)
        for axis in range(3):  # pixels within r cells along each axis in turn: the box around each cell
            c = np.cumsum(np.pad(held, [(r + 1, r) if a == axis else (0, 0) for a in range(3)]), axis=axis)
            held = np.take(c, range(2 * r + 1, n + 2 * r + 1), axis=axis) - np.take(c, range(n), axis=axis)
        mode = self.mode_colour()
        if held[tuple(mode.astype(int) // FINE)] == held.max():
            return mode
        best = np.argwhere(held == held.max())
        cell = best[np.abs(best * FINE - mode.astype(int)).sum(axis=1).argmin()]  # the nearest to the mode
        return np.minimum(cell * FINE + FINE // 2, 255).astype(np.uint8)

    def palette(self, min_share: float = 0.002, most: int = 32) -> tuple[np.ndarray, float]:
        """The domain's flat colours: the mean colours of the colour bins holding at least
        `min_share` of its pixels (at most `most`, most frequent first), as uint8 [K, 3], and the
        share of all pixels those bins hold (near 1 for a map, small for photographs)."""
        total = int(self.bin_counts.sum())
        if not total:
            raise ValueError("no pixels counted for this domain")
        order = np.argsort(-self.bin_counts, kind="stable")[:most]
        keep = [int(k) for k in order if self.bin_counts[k] >= min_share * total]
        colours = np.stack([self._bin_colour(k) for k in keep]) if keep else np.zeros((0, 3), np.uint8)
        return colours, float(self.bin_counts[keep].sum()) / total

    def cdf(self) -> np.ndarray:
        """float64 [3, 256] per-channel cumulative distribution."""
        c = self.hist.cumsum(axis=1).astype(np.float64)
        return c / np.maximum(c[:, -1:], 1)


def check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {x.dtype} {list(x.shape)}")
    return x


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
