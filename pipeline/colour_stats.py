"""Colour statistics of a domain's training images: per-channel histograms and binned colours.

Small enough to keep (a 3x256 histogram and a 32**3 colour-bin table per domain; while counting,
also the exact count of every colour, a 256**3 grid of 64 MB, for the best constant colour) and
enough for what reads them: the trivial baselines every evaluation shows
(launch/release/baselines.py: the best constant colour, per-channel histogram matching) and, for
domains drawn in a few flat colours such as maps, the palette a generator's PaletteHead paints
with (`model.palette_b: auto`), counted on its own view of the images, resized by nearest neighbour
(stats_from_shards's `palette`), since the training resize blends edges into colours no map holds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

BIN = 8              # colour bin width per channel for the most frequent colour and the palette
TOLERANCE = 16       # pixel accuracy's tolerance per channel (launch.release.evaluate.THRESHOLD)
STATS_BATCH = 64     # images decoded before they are counted in (stats_from_shards)

log = logging.getLogger(__name__)


@dataclass
class DomainStats:
    """Colour statistics of one domain's training images."""

    hist: np.ndarray         # int64 [3, 256]: per-channel value counts
    bin_counts: np.ndarray   # int64 [(256/BIN)**3]: pixels per colour bin
    bin_sums: np.ndarray     # float64 [(256/BIN)**3, 3]: colour sums per bin (for the bin's mean)
    images: int = 0
    fine: np.ndarray | None = None      # uint32 [256**3]: pixels of each exact colour (counting only, not saved)
    constant: np.ndarray | None = None  # uint8 [3]: the best constant as saved (statistics read back)
    constant_tolerance: int = TOLERANCE  # the tolerance `constant` was searched at
    found: dict = field(default_factory=dict, repr=False, compare=False)  # tolerance -> best constant (a cache)
    # The palette's own colour bins, counted on views not blended by resizing (add's palette_images);
    # None: the same as bin_counts and bin_sums (images added as they are, nothing resized)
    palette_counts: np.ndarray | None = None
    palette_sums: np.ndarray | None = None

    @classmethod
    def empty(cls) -> "DomainStats":
        nb = (256 // BIN) ** 3
        return cls(np.zeros((3, 256), np.int64), np.zeros(nb, np.int64), np.zeros((nb, 3), np.float64))

    def add(self, images: np.ndarray, palette_images: np.ndarray | None = None) -> "DomainStats":
        """Count uint8 [N, H, W, 3] images in. `palette_images`: the same images, same shape, with
        no colour made by resizing (stats_from_shards's nearest-neighbour view), counted for
        palette() only; None: `images` serve both."""
        x = check_images(images)
        view = None if palette_images is None else check_images(palette_images)
        if view is not None and view.shape != x.shape:
            raise ValueError(f"palette_images {list(view.shape)}: expected the shape of the images, {list(x.shape)}")
        if view is not None and self.palette_counts is None:  # images added before without a view count alike
            self.palette_counts, self.palette_sums = self.bin_counts.copy(), self.bin_sums.copy()
        x = x.reshape(-1, 3)
        for c in range(3):
            self.hist[c] += np.bincount(x[:, c], minlength=256)
        _count_bins(x, self.bin_counts, self.bin_sums)
        if self.palette_counts is not None:
            _count_bins(x if view is None else view.reshape(-1, 3), self.palette_counts, self.palette_sums)
        if self.fine is None:
            self.fine = np.zeros(256 ** 3, np.uint32)  # calloc: pages only where colours occur
        if self.fine.dtype == np.uint32 and self.hist[0].sum() >= 2 ** 32:  # one colour could overflow
            self.fine = self.fine.astype(np.int64)
        # unique keys: a fancy-indexed += adds once per index, so duplicates must be merged first
        keys, counts = np.unique((x[:, 0].astype(np.int64) * 256 + x[:, 1]) * 256 + x[:, 2], return_counts=True)
        self.fine[keys] += counts.astype(self.fine.dtype)
        self.images += len(images)
        self.found.clear()
        return self

    def _bin_colour(self, k: int) -> np.ndarray:
        return _bin_mean(self.bin_counts, self.bin_sums, k)

    def mode_colour(self) -> np.ndarray:
        """uint8 [3]: mean colour of the most populated bin."""
        if not self.bin_counts.any():
            raise ValueError("no pixels counted for this domain")
        return self._bin_colour(int(self.bin_counts.argmax()))

    def best_constant(self, tolerance: int = TOLERANCE) -> np.ndarray:
        """uint8 [3]: the constant colour that scores the best pixel accuracy on the counted pixels:
        the most pixels with every channel within `tolerance` of it (inclusive), counted exactly.
        It can beat the most frequent colour by far: with a map's land (242, 239, 233) and white
        roads (255, 255, 255), a colour between them is right on both. The most frequent colour
        where it is as good (a flat image: that colour exactly); else, of the best, one as near
        it as the pixels it hits allow. Statistics read back from baselines.json hold the answer
        at the tolerance it was searched at only: ValueError at any other."""
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, np.integer)) or tolerance < 0:
            raise ValueError(f"tolerance {tolerance!r}: expected an int >= 0 (per channel, inclusive)")
        tolerance = int(tolerance)
        if self.fine is None:
            if self.constant is None:
                raise ValueError("no pixels counted for this domain")
            if tolerance != self.constant_tolerance:  # another search's answer
                raise ValueError(f"these baseline statistics hold the best constant colour at tolerance "
                                 f"{self.constant_tolerance} only, not at {tolerance}: estimate them again "
                                 "from the training images (evaluate: --shards OUT)")
            return self.constant
        if tolerance not in self.found:
            self.found[tolerance] = _best_constant(self.fine.reshape(256, 256, 256), self.hist,
                                                   self.mode_colour(), min(tolerance, 255))
        return self.found[tolerance].copy()

    def palette(self, min_share: float = 0.002, most: int = 32) -> tuple[np.ndarray, float]:
        """The domain's flat colours: the mean colours of the colour bins holding at least
        `min_share` of its pixels (at most `most`, most frequent first), as uint8 [K, 3], and the
        share of all pixels those bins hold (near 1 for a map, small for photographs). Counted on
        the palette's own bins where add() had a view unblended by resizing: a resize that averages
        neighbours makes each edge a run of in-between colours, and at a few pixels per edge those
        fill bins over `min_share`, crowd true colours out of the `most` kept and inflate the share."""
        counts, sums = ((self.bin_counts, self.bin_sums) if self.palette_counts is None
                        else (self.palette_counts, self.palette_sums))
        total = int(counts.sum())
        if not total:
            raise ValueError("no pixels counted for this domain")
        order = np.argsort(-counts, kind="stable")[:most]
        keep = [int(k) for k in order if counts[k] >= min_share * total]
        colours = np.stack([_bin_mean(counts, sums, k) for k in keep]) if keep else np.zeros((0, 3), np.uint8)
        return colours, float(counts[keep].sum()) / total

    def cdf(self) -> np.ndarray:
        """float64 [3, 256] per-channel cumulative distribution."""
        c = self.hist.cumsum(axis=1).astype(np.float64)
        return c / np.maximum(c[:, -1:], 1)


def _count_bins(x: np.ndarray, counts: np.ndarray, sums: np.ndarray) -> None:
    """Count pixels x (uint8 [M, 3]) into colour bins: `counts` [(256/BIN)**3] and `sums` [.., 3]."""
    q = (x // BIN).astype(np.int64)
    k = (q[:, 0] * (256 // BIN) + q[:, 1]) * (256 // BIN) + q[:, 2]
    counts += np.bincount(k, minlength=len(counts))
    for c in range(3):
        sums[:, c] += np.bincount(k, weights=x[:, c], minlength=len(counts))


def _bin_mean(counts: np.ndarray, sums: np.ndarray, k: int) -> np.ndarray:
    return np.round(sums[k] / counts[k]).astype(np.uint8)


def check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {x.dtype} {list(x.shape)}")
    return x


# ---------------------------------------------------------------------------------------------
# The best constant colour, exactly


def _best_constant(grid: np.ndarray, hist: np.ndarray, mode: np.ndarray, t: int) -> np.ndarray:
    """The colour hitting the most pixels of `grid` (exact counts [256, 256, 256]) within `t`.

    Some best colour has, in every channel, the value t below the largest value among the pixels
    it hits (or 0): moving a best colour there keeps every pixel it hits. So only the lattice of
    (present value - t) per channel is searched, with exact box sums, instead of all 256**3."""
    counts, lattice = _box_counts(grid, [np.flatnonzero(hist[c]) for c in range(3)], t)
    top = counts.max()
    if grid[_box(mode, t)].sum(dtype=np.int64) >= top:  # the documented preference: the mode where it is as good
        return mode.copy()
    best = np.argwhere(counts == top)
    colours = np.stack([lattice[c][best[:, c]] for c in range(3)], axis=1)
    colour = colours[np.abs(colours - mode.astype(np.int64)).sum(axis=1).argmin()]
    return _towards(grid, colour, mode, t)


def _box_counts(grid: np.ndarray, present: list[np.ndarray], t: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pixels within t of each lattice colour, the lattice's values per channel): box sums by a
    cumulative sum along each channel over the values present, read at each lattice value's reach."""
    total = int(grid.sum(dtype=np.int64))
    h = grid[np.ix_(*present)].astype(np.int32 if total < 2 ** 31 else np.int64)
    lattice = []
    for axis, v in enumerate(present):
        cand = np.unique(np.clip(v - t, 0, 255))
        last = np.searchsorted(v, cand + t, side="right") - 1  # the last present value within reach (>= 0)
        before = np.searchsorted(v, cand - t, side="left") - 1  # the last one below reach (-1: none)
        np.cumsum(h, axis=axis, out=h)
        box = np.take(h, last, axis=axis)
        below = np.take(h, np.maximum(before, 0), axis=axis)
        np.moveaxis(below, axis, 0)[before < 0] = 0
        box -= below
        h = box
        lattice.append(cand)
    return h, lattice


def _box(colour: np.ndarray, t: int) -> tuple[slice, ...]:
    return tuple(slice(max(int(a) - t, 0), int(a) + t + 1) for a in colour)


def _towards(grid: np.ndarray, colour: np.ndarray, mode: np.ndarray, t: int) -> np.ndarray:
    """`colour` moved as near `mode` as it goes while still hitting every pixel it hits (so it
    scores at least as well): per channel, within t of both the lowest and highest value hit."""
    box = _box(colour, t)
    held = grid[box] > 0
    lo, hi = np.empty(3, np.int64), np.empty(3, np.int64)
    for axis in range(3):
        occupied = np.flatnonzero(held.any(axis=tuple(a for a in range(3) if a != axis))) + box[axis].start
        lo[axis], hi[axis] = occupied[0], occupied[-1]
    return np.clip(mode.astype(np.int64), np.maximum(hi - t, 0), np.minimum(lo + t, 255)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# From shards


def stats_from_shards(shards_a, shards_b=None, image_size: int = 64, max_images: int = 1000,
                      seed: int = 0, palette: bool = False) -> dict[str, DomainStats]:
    """Per-domain statistics of up to `max_images` training images per domain, each image at most
    once, spread as evenly over the domain's shards as their sizes allow (even_quotas), read as
    training reads them but without randomness (shortest side resized to `image_size`, centre
    crop, no flips). Shards as the loader takes them (pipeline.loader.resolve_shards); shards
    named by a pattern or list, with no index.json to give their sizes, are opened once more to
    count their images (a remote one is fetched twice). Unreadable shards and images are skipped,
    counted in a warning; ValueError when a domain has none. Until review 6 they came from the
    training loader's stream: whole shards drawn with replacement, so 1000 images could all be
    one shard's, or the same images twice. `palette`: also count each image's palette view
    (StatsViews), what DomainStats.palette() then reads; off for the baselines, which never read
    it, since it can decode a large JPEG a second time at full size."""
    from pipeline.loader import resolve_shards

    if isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer)) or max_images < 1:
        raise ValueError(f"max_images {max_images!r}: expected an int >= 1")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size {image_size!r}: expected an int >= 1")
    shards_b = shards_a if shards_b is None else shards_b
    listed = {"a": resolve_shards(shards_a, "a"), "b": resolve_shards(shards_b, "b")}  # both checked first
    views = StatsViews(int(image_size), bool(palette))
    return {d: _domain_stats(shards, d, views, int(max_images), seed) for d, shards in listed.items()}


def even_quotas(counts, total: int, rng: np.random.Generator) -> list[int]:
    """How many images to take from each shard: min(its count, L) for the largest level L the
    total allows, and what remains one each to shards with images to spare, chosen by `rng`.
    The quotas sum to min(total, sum(counts)): every shard weighs alike, however many it holds."""
    counts = np.asarray(counts, np.int64)
    total = min(int(total), int(counts.sum()))
    lo, hi = 0, int(counts.max(initial=0))
    while lo < hi:  # the largest L with sum(min(counts, L)) <= total
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(counts, mid).sum() <= total else (lo, mid - 1)
    quotas = np.minimum(counts, lo)
    spare = np.flatnonzero(counts > lo)
    quotas[rng.choice(spare, total - int(quotas.sum()), replace=False)] += 1
    return quotas.tolist()


def _domain_stats(shards, domain: str, views: "StatsViews", max_images: int, seed) -> DomainStats:
    """One domain's statistics (stats_from_shards): shards read in their listed order, each one's
    quota drawn without replacement; a shard that gives less passes the rest on to the next."""
    from pipeline.layout import DOMAINS
    from pipeline.loader import Counters, ShardError, ShardReader, decode_sample, read_at
    from pipeline.storage import redact

    rng = np.random.default_rng([int(seed), DOMAINS.index(domain) + 1])
    reader, counters = ShardReader(verify=False, cache=None), Counters()
    counts = [s.nsamples if s.nsamples is not None else _count(reader, s, counters) for s in shards]
    out, batch, owed = DomainStats.empty(), [], 0
    for shard, quota, count in zip(shards, even_quotas(counts, max_images, rng), counts):
        want = min(quota + owed, count)
        if not want:
            continue
        try:
            f, index = reader.open(shard, counters)
        except ShardError as e:
            counters.skip(e.reason, shard.url, str(e))
            owed = quota + owed
            continue
        with f:
            if index.truncated:
                counters.skip("truncated_shard", shard.url, "truncated tar; using the complete samples")
            got, read = 0, read_at(f)
            for i in rng.permutation(len(index.samples)).tolist():
                if got == want:
                    break
                # no randomness: train=False (the crop draws are unused, the seed only feeds the jitter)
                pair = decode_sample(read, index.samples[i], shard.url, views, (0.5, 0.5, 1.0), 0, counters)
                if pair is not None:
                    batch.append(pair)
                    got += 1
                if len(batch) == STATS_BATCH:
                    batch = _count_in(out, batch)
        owed = quota + owed - got
    if batch:
        _count_in(out, batch)
    if counters.skipped:
        log.warning("colour statistics of domain %r: skipped %s", domain, dict(counters.skipped))
    if not out.images:
        raise ValueError(f"domain {domain!r}: no readable image in {len(shards)} shards "
                         f"(first: {redact(shards[0].url)}); see the warnings")
    return out


class StatsViews:
    """decode_sample's augmenter for the statistics, without randomness (train=False): an image as
    (its training view: shortest side resized by the training interpolation, centre crop, for the
    histograms and baselines; its palette view or None: the same geometry by nearest neighbour
    from every stored pixel, for the palette), both RGB. Where no resize happens (a source at the
    training size) the two are the same pixels, so the palette is what it was before review 7."""

    def __init__(self, image_size: int, palette: bool):
        from pipeline.augment import AugmentConfig, Augmenter

        self.augmenter = Augmenter(AugmentConfig(train=False, flip=False), image_size)  # the loader's resize and crop
        self.palette = palette

    def __call__(self, data: bytes, u, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        import cv2

        from pipeline.augment import TooManyPixels, decode_image, jpeg_size

        a = self.augmenter
        img = decode_image(data, a.resize, a.max_pixels)
        seen = a.geometry(img, u, a.interpolation)  # what Augmenter.__call__ returns at train=False
        if not self.palette:
            return _rgb(seen, a.bgr), None
        size = jpeg_size(data)
        if size is not None and img.shape[:2] != size[::-1]:  # decoded at 1/2..1/8: DCT scaling averages too
            try:
                img = decode_image(data, 1 << 30, a.max_pixels)  # a min_side no scaling reaches: every pixel
            except TooManyPixels:
                pass  # over the decode cap at full size: the reduced decode, blended edges and all
        return _rgb(seen, a.bgr), _rgb(a.geometry(img, u, cv2.INTER_NEAREST), a.bgr)


def _rgb(img: np.ndarray, bgr: bool) -> np.ndarray:
    return np.ascontiguousarray(img[..., ::-1] if bgr else img)


def _count_in(out: DomainStats, batch: list) -> list:
    """Count a batch of StatsViews pairs into `out`; the empty list that follows."""
    views = [p for _, p in batch]
    out.add(np.stack([img for img, _ in batch]), None if views[0] is None else np.stack(views))
    return []


def _count(reader, shard, counters) -> int:
    """The images in a shard whose index.json entry does not say (0 when unreadable)."""
    from pipeline.loader import ShardError

    try:
        f, index = reader.open(shard, counters)
    except ShardError as e:
        counters.skip(e.reason, shard.url, str(e))
        return 0
    f.close()
    return len(index.samples)
