"""The trivial translators every model must beat, estimated from training images only.

    identity    the input as output
    constant    every pixel the best constant colour of the target domain: the one that scores
                the best pixel accuracy on its training images, hits counted exactly at the
                evaluation's tolerance (DomainStats.best_constant; the most frequent colour, the
                bin's mean, where that is as good, so a flat palette colour is hit exactly). Until
                6 December this was the most frequent colour (colour bins 8 values wide), which a
                colour between a map's land and its white roads beats
    histmatch   per-channel histogram matching: source-domain CDF -> target-domain CDF

A translator that loses to one of these has learnt less than a one-line rule, whatever its
absolute score; every evaluation table shows them beside the model. The statistics come from
the training shards (never the paired test truth) and are small: per domain, a 3x256
histogram and two colours. They travel with the export as `baselines.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.atomic import write_json as write_json_atomic
from pipeline.colour_stats import BIN, TOLERANCE, DomainStats, check_images, stats_from_shards  # noqa: F401 (re-exported)

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


def check_tolerance(stats: dict[str, DomainStats], tolerance: int) -> None:
    """ValueError now, before any translating, where the best constant at `tolerance` cannot be
    had: statistics read back from baselines.json hold it at exactly the tolerance it was searched
    at (17 is not 16), and a tolerance must be an int >= 0. Freshly counted statistics are searched
    here at exactly `tolerance` (DomainStats.best_constant keeps the answer for `translators`)."""
    for s in stats.values():
        s.best_constant(tolerance)


def translators(stats: dict[str, DomainStats], tolerance: int = TOLERANCE) -> dict[str, callable]:
    """{name: fn(uint8 images, direction) -> uint8 images} for identity, constant and histmatch;
    the constant is the best for pixel accuracy at `tolerance`."""
    luts = {"a2b": histmatch_lut(stats["a"], stats["b"]), "b2a": histmatch_lut(stats["b"], stats["a"])}
    modes = {d: stats[d].best_constant(tolerance) for d in ("a", "b")}

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
            "domains": {d: {"images": s.images, "hist": s.hist.tolist(), "mode_colour": s.mode_colour().tolist(),
                            "constant_colour": s.best_constant().tolist(), "constant_tolerance": TOLERANCE}
                        for d, s in stats.items()}}


def from_json(d: dict, need: tuple[str, ...] = ()) -> dict[str, DomainStats]:
    """Statistics back from `to_json` (the mode colour and the best constant as saved; a file from
    before the best constant gives the mode colour, the constant it was scored with). Without the
    counting grid the constant is known only at the tolerance it was searched at: `translators`
    at another tolerance raises ValueError rather than score against a constant chosen for 16.
    Every field is checked here (ValueError naming it), so a damaged file fails before any image is
    translated rather than halfway (a histogram of 3 values, a domain missing); `need`: the domains
    that must be there (a baselines.json for translating both ways holds a and b)."""
    if not isinstance(d, dict):
        raise ValueError(f"baselines: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT_VERSION:
        raise ValueError(f"baselines: format {d.get('format')!r}, expected {FORMAT_VERSION}")
    domains = d.get("domains")
    if not isinstance(domains, dict) or not domains:
        raise ValueError("baselines: \"domains\" must be an object with domains a and b")
    wrong, missing = sorted(set(domains) - {"a", "b"}), [n for n in need if n not in domains]
    if wrong or missing:
        raise ValueError(f"baselines: domains {sorted(domains)}, expected a and b"
                         + (f" (missing {', '.join(missing)})" if missing else ""))
    return {name: _domain_from_json(name, v) for name, v in domains.items()}


def _domain_from_json(name: str, v) -> DomainStats:
    """One domain's statistics from its checked JSON entry."""
    if not isinstance(v, dict):
        raise ValueError(f"baselines: domain {name}: expected an object, got {type(v).__name__}")
    s = DomainStats.empty()
    s.hist = _hist(name, v.get("hist"))
    colour = _colour(name, "mode_colour", v.get("mode_colour")).astype(np.float64)
    k = int(((colour // BIN).astype(int) * [(256 // BIN) ** 2, 256 // BIN, 1]).sum())
    s.bin_counts[k], s.bin_sums[k] = 1, colour
    saved = v.get("constant_colour")  # files before the best constant: the mode colour
    s.constant = s.mode_colour() if saved is None else _colour(name, "constant_colour", saved)
    s.constant_tolerance = _count(name, "constant_tolerance", v.get("constant_tolerance", TOLERANCE))  # before: 16
    s.images = _count(name, "images", v.get("images"))
    return s


def _hist(name: str, value) -> np.ndarray:
    """int64 [3, 256] from a saved histogram: 768 counts >= 0, every channel counting the same pixels."""
    try:
        h = np.asarray(value)
    except ValueError:  # ragged lists
        h = np.asarray(None)
    if h.dtype.kind not in "iu" or h.size != 3 * 256:
        what = f"{h.size} value(s) of type {h.dtype}" if h.dtype != object else repr(value)[:60]
        raise ValueError(f"baselines: domain {name}: hist must be 3 x 256 integer counts, got {what}")
    h = h.astype(np.int64).reshape(3, 256)
    totals = h.sum(axis=1)
    if (h < 0).any() or totals[0] <= 0 or (totals != totals[0]).any():
        raise ValueError(f"baselines: domain {name}: hist must hold counts >= 0 of the same pixels in each "
                         f"channel, got channel totals {totals.tolist()}")
    return h


def _colour(name: str, key: str, value) -> np.ndarray:
    """uint8 [3] from a saved colour: three ints 0..255."""
    ok = (isinstance(value, list) and len(value) == 3
          and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value))
    if not ok:
        raise ValueError(f"baselines: domain {name}: {key} must be 3 integers 0..255, got {value!r:.60}")
    return np.asarray(value, np.uint8)


def _count(name: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"baselines: domain {name}: {key} must be an integer >= 0, got {value!r:.60}")
    return value


def save(path, stats: dict[str, DomainStats]) -> Path:
    path = Path(path)
    write_json_atomic(path, to_json(stats))
    return path


def load(path) -> dict[str, DomainStats]:
    """Statistics from a baselines.json holding both domains; ValueError naming `path` for anything
    else (a folder, unreadable, not JSON, a field missing or malformed), so the CLIs print one line."""
    path = Path(path)
    try:
        return from_json(json.loads(path.read_text()), need=("a", "b"))
    except OSError as e:
        raise ValueError(f"{path}: not a baselines file ({e.strerror or type(e).__name__})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise ValueError(f"{path}: not a baselines file ({type(e).__name__}: {e})") from None
