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
from pathlib import Path

import numpy as np

from pipeline.atomic import write_json as write_json_atomic
from pipeline.colour_stats import BIN, DomainStats, check_images, stats_from_shards  # noqa: F401 (re-exported)

FILE_NAME = "baselines.json"
FORMAT_VERSION = 1
NAMES = ("identity", "constant", "histmatch")


def histmatch_lut(src: DomainStats, dst: DomainStats) -> np.ndarray:
    """uint8 [3, 256]: for each channel, the target value whose CDF first reaches the source CDF."""
    s, d = src.cdf(), dst.cdf()
    return np.stack([np.searchsorted(d[c], s[c] - 1e-12).clip(0, 255) for c in range(3)]).astype(np.uint8)


def apply_lut(images: np.ndarray, lut: np.ndarray) -> np.ndarray:
    x = check_images(images)
    return np.stack([lut[c][x[..., c]] for c in range(3)], axis=-1)


def translators(stats: dict[str, DomainStats]) -> dict[str, callable]:
    """{name: fn(uint8 images, direction) -> uint8 images} for identity, constant and histmatch."""
    luts = {"a2b": histmatch_lut(stats["a"], stats["b"]), "b2a": histmatch_lut(stats["b"], stats["a"])}
    modes = {d: stats[d].mode_colour() for d in ("a", "b")}

    def identity(x, direction):
        return check_images(x).copy()

    def constant(x, direction):
        x = check_images(x)
        return np.broadcast_to(modes[direction[-1]], x.shape).copy()

    def histmatch(x, direction):
        return apply_lut(x, luts[direction])

    return {"identity": identity, "constant": constant, "histmatch": histmatch}


# ---------------------------------------------------------------------------------------------
# From shards, to and from JSON


def from_config(cfg) -> dict[str, DomainStats]:
    """The statistics the end of a training run estimates for its config (launch.config.Config): its
    training shards, read at the scale the translator learns, cfg.eval.baseline_images per domain."""
    shards_a, shards_b = cfg.data.sources()
    return stats_from_shards(shards_a, shards_b, image_size=cfg.data.scale(),
                             max_images=cfg.eval.baseline_images, seed=cfg.seed)


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
