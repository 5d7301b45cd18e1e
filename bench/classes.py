"""Where a translator's a2b pixel accuracy is lost: its accuracy per map colour (class).

Translates a paired test split's photos with one or more exported translators (a run's
`export/` folder) and prints, per map colour of the truth, the share of pixels it holds and each
translator's accuracy there, with the demo corpus's class names; then, for the first
translator, which classes it paints there (each painted pixel read as the nearest map colour),
each class's share of the truth and of the painted pixels, its outline pixels split into road
casings and building outlines, the mean photo colour its b2a decoders paint on each map class
beside the real photos', its a2b accuracy on real photos beside that on its own photo
translations of the truth maps, and (for a palette translator) its mean colour probabilities on
each map class with the mixture they paint in training.
Reading: a class's share times what it misses is what it costs the overall figure.

    .venv/bin/python bench/classes.py EXPORT [EXPORT ...] --test-a DIR --test-b DIR [--top 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.release.evaluate import load_pairs, pixel_correct  # noqa: E402
from launch.release.export import load_translator, translate_uint8  # noqa: E402
from model.networks import PaletteHead  # noqa: E402
from pipeline.tensors import to_tensor  # noqa: E402
from pipeline.demo import (BUILDING, EDGE, FIELD, LAND, MAJOR_ROAD, MAP_COLOURS, PARK, ROAD,  # noqa: E402
                           WATER)

NAMES = {LAND: "land", FIELD: "fields", PARK: "parks", WATER: "water", BUILDING: "buildings",
         ROAD: "white roads", MAJOR_ROAD: "major roads", EDGE: "outlines"}
CLASS_OF = {rgb: NAMES[k] for k, rgb in MAP_COLOURS.items()}
PALETTE = np.array(list(MAP_COLOURS.values()), np.int32)
PALETTE_NAMES = [NAMES[k] for k in MAP_COLOURS]


def nearest_class(img: np.ndarray) -> np.ndarray:
    """Each pixel of uint8 images [..., 3] as the index (into PALETTE) of its nearest map colour, flat."""
    return np.abs(img.reshape(-1, 1, 3).astype(np.int32) - PALETTE).sum(-1).argmin(-1)


def class_shares(classes: np.ndarray) -> np.ndarray:
    """Each PALETTE class's share of `classes` (nearest_class's flat indices)."""
    return np.bincount(classes, minlength=len(PALETTE)) / classes.size


def colour_classes(maps: np.ndarray, top: int = 8) -> list[tuple[tuple[int, ...], np.ndarray, float]]:
    """The `top` colours of uint8 maps [..., H, W, 3], most pixels first, each as (colour, its
    pixels' mask [..., H, W], its share of the pixels): a flat-coloured map's classes."""
    cols, inv = np.unique(maps.reshape(-1, 3), axis=0, return_inverse=True)
    inv = inv.reshape(maps.shape[:-1])
    cnt = np.bincount(inv.ravel())
    return [(tuple(int(c) for c in cols[k]), inv == k, cnt[k] / inv.size) for k in np.argsort(-cnt)[:top]]


def class_table(preds: dict[str, np.ndarray], truth: np.ndarray, top: int = 8) -> str:
    """One row per truth colour (most pixels first): its share and each translator's accuracy."""
    ok = {name: pixel_correct(p, truth) for name, p in preds.items()}
    lines = ["| map colour | class | share of pixels | " + " | ".join(preds) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in preds) + " |"]
    for rgb, m, share in colour_classes(truth, top):
        lines.append(f"| {rgb} | {CLASS_OF.get(rgb, '?')} | {share:.3f} | "
                     + " | ".join(f"{o[m].mean():.3f}" for o in ok.values()) + " |")
    lines.append("| all | all classes | 1.000 | " + " | ".join(f"**{o.mean():.3f}**" for o in ok.values()) + " |")
    return "\n".join(lines)


def confusion(pred: np.ndarray, truth: np.ndarray, top: int = 8, shown: int = 3) -> str:
    """Per truth class: its share of the truth's pixels and of the painted ones, and the classes its
    pixels are painted as (nearest map colour), largest first."""
    names = PALETTE_NAMES
    painted, true = nearest_class(pred), nearest_class(truth)
    # the two shares tell a placement error (a class painted as often as it occurs, elsewhere)
    # from a frequency error (a class painted too rarely or too often)
    true_share, painted_share = class_shares(true), class_shares(painted)
    lines = ["| class | share of the truth | share painted | painted as (share of its pixels) |",
             "| --- | --- | --- | --- |"]
    for k in np.argsort(-true_share)[:top]:
        got = np.bincount(painted[true == k], minlength=len(PALETTE)) / max(1, (true == k).sum())
        lines.append(f"| {names[k]} | {true_share[k]:.3f} | {painted_share[k]:.3f} | "
                     + ", ".join(f"{names[j]} {got[j]:.2f}" for j in np.argsort(-got)[:shown]) + " |")
    return "\n".join(lines)


def class_mask(maps: np.ndarray, k: int) -> np.ndarray:
    """[..., H, W] bool: the pixels of uint8 maps [..., H, W, 3] in map colour k (pipeline.demo's ids)."""
    return (maps == np.array(MAP_COLOURS[k], np.uint8)).all(-1)


def beside(mask: np.ndarray) -> np.ndarray:
    """[N, H, W] bool: pixels with a 4-neighbour in `mask` (outside the image counts as outside it)."""
    pad = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    return pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]


def outline_kinds(pred: np.ndarray, truth: np.ndarray, shown: int = 3) -> str:
    """The truth's outline pixels (the map's one dark line colour) split by what lies beside them: road
    casings (beside a white or major road), building outlines (beside a building fill), both, and
    neither (at 32 px mostly buildings too small to have a fill); per kind its share of all pixels,
    the accuracy there and what is painted there (nearest map colour)."""
    def of(k):
        return class_mask(truth, k)
    edge, road, fill = of(EDGE), beside(of(ROAD) | of(MAJOR_ROAD)), beside(of(BUILDING))
    kinds = {"road casings (beside a road)": edge & road & ~fill,
             "building outlines (beside a fill)": edge & fill & ~road,
             "beside a road and a fill": edge & road & fill,
             "beside neither (buildings without a fill)": edge & ~road & ~fill}
    ok = pixel_correct(pred, truth)
    painted = nearest_class(pred).reshape(truth.shape[:-1])
    lines = ["| outline pixels | share of pixels | accuracy there | painted as (share of its pixels) |",
             "| --- | --- | --- | --- |"]
    for name, m in kinds.items():
        if m.any():
            got = np.bincount(painted[m], minlength=len(PALETTE)) / m.sum()
            lines.append(f"| {name} | {m.mean():.3f} | {ok[m].mean():.3f} | "
                         + ", ".join(f"{PALETTE_NAMES[j]} {got[j]:.2f}" for j in np.argsort(-got)[:shown] if got[j])
                         + " |")
    return "\n".join(lines)


def photo_colours(maps: np.ndarray, photos: dict[str, np.ndarray], top: int = 8) -> str:
    """Per map class of `maps` (uint8 [N, H, W, 3], most pixels first): the mean colour of each of
    `photos` (same shape; the real paired photos, and b2a translations of `maps`) on its pixels."""
    true = nearest_class(maps)
    share = class_shares(true)
    flat = {name: p.reshape(-1, 3).astype(np.float64) for name, p in photos.items()}
    lines = ["| map class | " + " | ".join(photos) + " |", "| --- | " + " | ".join("---" for _ in photos) + " |"]
    for k in np.argsort(-share)[:top]:
        if share[k] > 0:
            lines.append(f"| {PALETTE_NAMES[k]} | " + " | ".join(
                "(%d, %d, %d)" % tuple(p[true == k].mean(0).round()) for p in flat.values()) + " |")
    return "\n".join(lines)


class GanDecoder(torch.nn.Module):
    """A translator's GAN decoders, where `translate` would use an expected decoder (cfg.expected)."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def translate(self, x, direction):
        return self.gen.translate(x, direction, decoder="gan")


def decoder_photos(gen, y: np.ndarray) -> dict[str, np.ndarray]:
    """The photos `gen`'s decoders paint from the maps `y`: the GAN decoder's (the one training
    pits against D_a, and back-translation's pseudo-photos) and, where the model has one, the
    expected decoder's, which b2a translations come from."""
    photos = {"GAN decoder": translate_uint8(GanDecoder(gen), y, "b2a")}
    if "a" in getattr(gen, "expected", ""):
        photos["expected decoder"] = translate_uint8(gen, y, "b2a")
    return photos


def b2a_table(gen, x: np.ndarray, y: np.ndarray, top: int = 8, painted: dict | None = None) -> str:
    """What the photo decoders paint for each map class of the paired maps `y` (decoder_photos, or
    `painted` when already made), beside the real photos `x`."""
    return photo_colours(y, {"real photo": x, **(painted or decoder_photos(gen, y))}, top)


@torch.no_grad()
def probabilities(gen, x: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """[N, H, W, K]: the a2b colour probabilities of uint8 photos `x` [N, H, W, 3] (as the
    translator's eval mode sees them, over its test-time views); sides a multiple of 2 ** n_down."""
    return torch.cat([gen.colour_probabilities(to_tensor(x[i:i + batch_size]), "a2b")
                      for i in range(0, len(x), batch_size)]).permute(0, 2, 3, 1).numpy()


def probability_table(probs: np.ndarray, colours, truth: np.ndarray, top: int = 8) -> str:
    """Per truth class (most pixels first): the mean probability of each palette colour of
    `colours` ([K] RGB, the translator's palette, named by their nearest map colour) on its pixels,
    and the mean of the mixture those probabilities paint (what the discriminator sees in training,
    without the latent noise). A colour near 0 in every row is one the translator stopped painting.
    The mixture is a mean over the class's pixels: near a colour on average, it may be near it at
    few of them."""
    true = nearest_class(truth)
    share = class_shares(true)
    colours = np.asarray(colours, np.float64)
    named = [PALETTE_NAMES[nearest_class(c.round().astype(np.uint8))[0]] for c in colours]
    flat = probs.reshape(-1, probs.shape[-1]).astype(np.float64)
    lines = ["| class | " + " | ".join(named) + " | mixture |", "| --- | " + " | ".join("---" for _ in named) + " | --- |"]
    for k in np.argsort(-share)[:top]:
        if share[k] > 0:
            mean = flat[true == k].mean(0)
            lines.append(f"| {PALETTE_NAMES[k]} | " + " | ".join(f"{v:.3f}" for v in mean)
                         + " | (%d, %d, %d) |" % tuple((mean @ colours).round()))
    return "\n".join(lines)


def read_back_table(gen, x: np.ndarray, y: np.ndarray, painted: dict | None = None) -> str:
    """a2b's accuracy on the real photos `x` beside its accuracy on the photos its own decoders paint
    from the truth maps `y` (decoder_photos, or `painted` when already made; the GAN decoder's are
    what back-translation trains a2b on): a gap says a2b reads its decoders' photos, not real ones."""
    photos = {"the real photos": x, **{f"the {name}'s photos of the truth maps": p
                                       for name, p in (painted or decoder_photos(gen, y)).items()}}
    lines = ["| a2b translates | pixel acc |", "| --- | --- |"]
    for name, p in photos.items():
        lines.append(f"| {name} | {pixel_correct(translate_uint8(gen, p, 'a2b'), y).mean():.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("exports", nargs="+", help="exported translators (a run's export/ folder)")
    ap.add_argument("--test-a", required=True, help="the paired split's photos (testA)")
    ap.add_argument("--test-b", required=True, help="the paired split's maps (testB), the truth")
    ap.add_argument("--top", type=int, default=8, help="classes shown, most pixels first")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _, x, y = load_pairs(args.test_a, args.test_b)
    gens = {Path(path).resolve().parent.name: load_translator(path)[0] for path in args.exports}
    preds = {name: translate_uint8(gen, x, "a2b") for name, gen in gens.items()}
    print(class_table(preds, y, args.top))
    first = next(iter(preds))
    print(f"\nwhat {first} paints there:\n")
    print(confusion(preds[first], y, args.top))
    print(f"\n{first}'s outlines, by what lies beside them:\n")
    print(outline_kinds(preds[first], y))
    print(f"\nthe mean photo colour {first} paints b2a on each map class (with back-translation, a2b "
          "trains on these photos paired with the maps they came from):\n")
    painted = decoder_photos(gens[first], y)  # both tables read the same translations
    print(b2a_table(gens[first], x, y, args.top, painted))
    print(f"\n{first}'s a2b on real photos and on its own photo translations of the same maps:\n")
    print(read_back_table(gens[first], x, y, painted))
    head = gens[first].head("b")
    if isinstance(head, PaletteHead):  # its probabilities show what it stopped painting
        print(f"\nthe mean a2b colour probabilities of {first} on each map class, and the mixture they paint:\n")
        print(probability_table(probabilities(gens[first], x), (head.colours.numpy() + 1) * 127.5, y, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
