"""`model.palette_a/b: auto`: the flat colours of a domain, measured on its training shards.

A map, a label image or a flat illustration is drawn in a few colours. A generator that paints
only those (model.networks.PaletteHead) is exactly right wherever it picks the right colour,
where a tanh head settles on blurry in-between shades (docs/quality.md). The
palette is the mean colours of the most populated colour bins of up to eval.baseline_images
training images, cropped as training crops them but resized by nearest neighbour (since review 7:
the training resize, INTER_AREA, blends each edge into in-between colours that filled up to 25 of
the 32 palette places of the demo maps at data.scale 40 and passed MIN_COVERAGE on them; at a
source's own size nothing is resized and the palette is the same as before). A domain whose
frequent colours cover less than MIN_COVERAGE of its pixels (photographs) is refused with the
figures, before any step.

The colours are part of the weights (PaletteHead's `colours` buffer): a run that resumes, or one
that starts from an init_from translator, takes them from there instead of measuring again, since
the shards or eval.baseline_images may have changed between launches (both resumable changes).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from launch.config import Config, ConfigError
from launch.runstore.artifacts import read_meta
from model.unit import UNITConfig
from pipeline.colour_stats import stats_from_shards

MIN_COVERAGE = 0.8   # share of a domain's pixels its palette colours must hold


@functools.lru_cache(maxsize=4)
def measure(shards_a: str, shards_b: str, image_size: int, max_images: int, seed: int) -> dict:
    """{domain: (colours as nested tuples, their share of the pixels, images read)}. Cached: a rank
    validates its config (launch.config.check) and then builds the model from the same shards."""
    stats = stats_from_shards(shards_a, shards_b, image_size=image_size, max_images=max_images, seed=seed,
                              palette=True)  # colours as stored: a blending resize makes in-between ones
    out = {}
    for d, s in stats.items():
        colours, share = s.palette()
        out[d] = (tuple(map(tuple, colours.tolist())), share, s.images)
    return out


def saved_palettes(checkpoint: Path | None, init_dir: Path | None) -> tuple[dict, str]:
    """({"palette_a": ..., "palette_b": ...}, where from) that a run's weights already carry: the
    checkpoint it resumes (its meta.json, since checkpoints record them) or else the init_from
    translator it starts from (translator.json); ({}, "") when neither holds any."""
    if checkpoint is not None:
        meta = json.loads((Path(checkpoint) / "meta.json").read_text())
        return meta.get("palettes") or {}, f"the checkpoint {checkpoint}"
    if init_dir is not None:
        model = read_meta(init_dir)["model"]
        return {k: model.get(k) for k in ("palette_a", "palette_b")}, "the init_from translator"
    return {}, ""


def model_with_palettes(cfg: Config, say=print, saved: tuple[dict, str] = ({}, "")) -> UNITConfig:
    """cfg.model with every palette "auto" replaced by its colours: those the weights carry (`saved`,
    from saved_palettes) or else those measured on that domain's shards (the same on every rank: the
    same images in the same order); cfg.model itself when none is "auto"."""
    auto = [d for d in ("a", "b") if getattr(cfg.model, f"palette_{d}") == "auto"]
    if not auto:
        return cfg.model
    found, where = {}, saved[1]
    for d in [d for d in auto if saved[0].get(f"palette_{d}")]:
        found[f"palette_{d}"] = saved[0][f"palette_{d}"]
        say(f"model.palette_{d}: the {len(found[f'palette_{d}'])} colours of {where}")
    auto = [d for d in auto if f"palette_{d}" not in found]
    if not auto:
        return dataclasses.replace(cfg.model, **found)
    measured = measure(*map(str, cfg.data.sources()), cfg.data.scale(), cfg.eval.baseline_images, cfg.seed)
    for d in auto:
        colours, share, images = measured[d]
        if len(colours) < 2 or share < MIN_COVERAGE:
            raise ConfigError(
                f"config key model.palette_{d} = 'auto': domain {d.upper()} is not drawn in a few flat colours "
                f"(its {len(colours)} most frequent colours cover {share:.0%} of the pixels of {images} "
                f"training images; {MIN_COVERAGE:.0%} needed); leave model.palette_{d} out for photographs")
        found[f"palette_{d}"] = [list(c) for c in colours]
        say(f"model.palette_{d}: {len(colours)} colours holding {share:.1%} of domain {d.upper()}'s pixels "
            f"({images} training images)")
    return dataclasses.replace(cfg.model, **found)
