"""What the demo photos' JPEG costs a translator: a2b on the test photos as stored and re-rendered.

The demo corpus stores its photos as JPEG (quality 90, 4:2:0 chroma: Pillow's default), so at
32 px each photo's colour is kept at 16 x 16 and every colour edge (a park's, a lake's) is blurred
over 2 px, while the maps are exact PNGs. This bench renders the paired test scenes again from
their seeds (pipeline.demo.render_scene; the maps must equal the stored truth, or it stops) and
scores an exported translator on three versions of the same photos: as stored, JPEG with full
chroma (4:4:4, the same quality) and not compressed. Beside the overall a2b accuracy it prints the
accuracy on the edge pixels of parks and water (those with a neighbour of another class) and the
share of them painted in the outline colour: a translator that reads a blurred colour edge as a
road casing paints an outline there.

    .venv/bin/python bench/jpeg_inputs.py EXPORT [--test-a data/demo/testA] [--test-b data/demo/testB] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classes import beside, class_mask  # noqa: E402
from launch.release.evaluate import load_pairs, pixel_correct  # noqa: E402
from pipeline.demo import EDGE, PARK, WATER, encode_aerial, render_scene, scene_seed  # noqa: E402


def rerender(stems: list[str], truth: np.ndarray, seed: int) -> np.ndarray:
    """The uncompressed photos [N, H, W, 3] of test scenes `stems` (file names are scene indices) of
    the demo corpus of `seed`. ValueError when a rendered map differs from its truth (another seed,
    size or corpus)."""
    photos = []
    for stem, y in zip(stems, truth):
        if not stem.isdigit():
            raise ValueError(f"test file {stem!r}: not a demo scene index (pipeline.demo names them 000000, ...)")
        photo, map_ = render_scene(scene_seed(seed, "test", int(stem)), y.shape[0])
        if not np.array_equal(map_, y):
            raise ValueError(f"test scene {stem}: its map rendered from seed {seed} differs from the stored "
                             "truth; not the demo corpus of that seed (--seed)")
        photos.append(photo)
    return np.stack(photos)


def jpeg(photos: np.ndarray, subsampling: int) -> np.ndarray:
    """`photos` through the demo's own JPEG encoding (pipeline.demo.encode_aerial) and back;
    subsampling 0: full chroma (4:4:4), -1: Pillow's default, 4:2:0, as the corpus stores them."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(encode_aerial(p, subsampling))).convert("RGB")) for p in photos])


def region_edges(truth: np.ndarray) -> np.ndarray:
    """[N, H, W] bool: park and water pixels with a 4-neighbour of another colour in the truth maps
    (the image's border is no colour)."""
    edges = np.zeros(truth.shape[:3], bool)
    for k in (PARK, WATER):
        m = class_mask(truth, k)
        edges |= m & beside(~m)
    return edges


def table(translate, views: dict[str, np.ndarray], truth: np.ndarray) -> str:
    """One row per version of the photos: a2b accuracy overall and on region_edges, and the share of
    region_edges painted in the outline colour."""
    edges = region_edges(truth)
    lines = ["| test photos | a2b pixel acc | parks and water, edge pixels: right | painted as outline |",
             "| --- | --- | --- | --- |"]
    for name, x in views.items():
        pred = translate(x)
        ok = pixel_correct(pred, truth)
        lines.append(f"| {name} | {ok.mean():.4f} | {ok[edges].mean():.3f} | {class_mask(pred, EDGE)[edges].mean():.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", help="an exported translator (a run's export/ folder)")
    ap.add_argument("--test-a", default="data/demo/testA")
    ap.add_argument("--test-b", default="data/demo/testB")
    ap.add_argument("--seed", type=int, default=0, help="the demo corpus's seed (make demo: 0)")
    a = ap.parse_args(argv)
    from launch.release.export import load_translator, translate_uint8

    gen, _ = load_translator(a.export)
    stems, x, y = load_pairs(a.test_a, a.test_b)
    try:
        raw = rerender(stems, y, a.seed)
    except ValueError as e:
        raise SystemExit(f"{a.test_b}: {e}") from None
    views = {"as stored (JPEG 4:2:0)": x, "JPEG 4:4:4": jpeg(raw, 0), "not compressed": raw}
    print(f"{a.export}: {len(stems)} test scenes, {region_edges(y).mean():.3f} of the pixels park or water edges")
    print(table(lambda imgs: translate_uint8(gen, imgs, "a2b"), views, y))
    return 0


if __name__ == "__main__":
    sys.exit(main())
