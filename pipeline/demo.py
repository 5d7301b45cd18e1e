"""Procedural two-domain demo corpus: aerial photos (A, JPEG) and maps (B, PNG).

Mirrors the paper's map experiment. A random scene (land, fields, parks, a lake or a
river, buildings, roads of several widths) is drawn twice: as a map with flat palette
colours and crisp outlines, and as an aerial photo with per-object colour variation,
texture, noise and shadows. The train split is unpaired (A and B scenes come from
disjoint seeds); the test split is paired (one scene, both renderings, same file stem).

    python -m pipeline.demo --out data/demo --n-train 2000 --n-test 200 --size 64 --seed 0
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.atomic import write_bytes

# Label ids of the scene classes (drawn into a label image alongside both renderings).
LAND, FIELD, PARK, WATER, BUILDING, ROAD, MAJOR_ROAD, EDGE = range(8)

# Map palette: flat, mid-range colours (no channel pinned at 0/255 except white roads)
# that a tanh generator can hit exactly, and far apart from each other (>= 16 per channel).
MAP_COLOURS = {
    LAND: (242, 239, 233),
    FIELD: (236, 226, 180),
    PARK: (184, 226, 172),
    WATER: (150, 196, 236),
    BUILDING: (214, 200, 190),
    EDGE: (160, 146, 136),  # building outlines and road casing
    ROAD: (255, 255, 255),
    MAJOR_ROAD: (246, 190, 96),
}

# Aerial base colours: earthy, darker and more saturated than the map palette, so the
# identity translation scores poorly against the map.
AERIAL_LAND = (112, 118, 84)
AERIAL_FIELDS = [(150, 140, 82), (108, 130, 60), (168, 150, 104), (126, 110, 70)]
AERIAL_PARK = (52, 84, 44)
AERIAL_WATER = (38, 66, 78)
AERIAL_ROOFS = [(150, 84, 72), (118, 118, 124), (172, 162, 150), (92, 92, 98), (140, 110, 90)]
AERIAL_ROAD = (96, 96, 100)
AERIAL_MAJOR = (78, 78, 84)
# Per-class noise amplitude (std of per-pixel noise) for the aerial texture.
NOISE_STD = np.array([9, 8, 11, 3, 5, 4, 4, 5], dtype=np.float32)

SPLIT_IDS = {"trainA": 0, "trainB": 1, "test": 2}


def scene_seed(seed: int, split: str, index: int) -> int:
    """Seed of scene `index` of a split; splits never share a seed (disjoint residues)."""
    return ((seed * 3 + SPLIT_IDS[split]) << 32) + index


def _polygon(rng, cx, cy, r, n):
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.6, 1.0, n)
    return [(float(cx + rr * np.cos(a)), float(cy + rr * np.sin(a))) for a, rr in zip(angles, radii)]


def _rect(cx, cy, w, h, angle):
    c, s = np.cos(angle), np.sin(angle)
    pts = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [(float(cx + x * c - y * s), float(cy + x * s + y * c)) for x, y in pts]


def _polyline(rng, size, n):
    """A line that enters at one edge and leaves at another, with a few bends."""
    t = rng.uniform(0, size)
    start, end = [(0.0, t), (t, 0.0)][rng.integers(2)], None
    u = rng.uniform(0, size)
    end = [(float(size), u), (u, float(size))][rng.integers(2)]
    pts = [start]
    for k in range(1, n):
        f = k / n
        jitter = rng.normal(0, size * 0.08, 2)
        pts.append((start[0] + f * (end[0] - start[0]) + jitter[0], start[1] + f * (end[1] - start[1]) + jitter[1]))
    pts.append(end)
    return [(float(x), float(y)) for x, y in pts]


@dataclass
class _Canvas:
    """The three images one scene is drawn into, in lockstep."""

    aerial: ImageDraw.ImageDraw
    map: ImageDraw.ImageDraw
    label: ImageDraw.ImageDraw

    def polygon(self, pts, cls, aerial_fill, outline=False):
        self.aerial.polygon(pts, fill=aerial_fill)
        self.map.polygon(pts, fill=MAP_COLOURS[cls], outline=MAP_COLOURS[EDGE] if outline else None)
        self.label.polygon(pts, fill=cls)

    def ellipse(self, box, cls, aerial_fill):
        self.aerial.ellipse(box, fill=aerial_fill)
        self.map.ellipse(box, fill=MAP_COLOURS[cls])
        self.label.ellipse(box, fill=cls)

    def line(self, pts, cls, aerial_fill, width, casing=0):
        if casing:
            self.map.line(pts, fill=MAP_COLOURS[EDGE], width=width + 2 * casing, joint="curve")
            self.label.line(pts, fill=EDGE, width=width + 2 * casing, joint="curve")
            self.aerial.line(pts, fill=_jitter_colour(AERIAL_LAND, 0.7), width=width + 2 * casing, joint="curve")
        self.aerial.line(pts, fill=aerial_fill, width=width, joint="curve")
        self.map.line(pts, fill=MAP_COLOURS[cls], width=width, joint="curve")
        self.label.line(pts, fill=cls, width=width, joint="curve")


def _jitter_colour(rgb, scale=1.0, rng=None, amount=12):
    if rng is None:
        return tuple(int(c * scale) for c in rgb)
    return tuple(int(np.clip(c * scale + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render_scene(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one random scene as (aerial, map), both uint8 [size, size, 3]."""
    if size < 32 or size > 512 or size % 32:
        raise ValueError(f"size must be a multiple of 32 in [32, 512], got {size}")
    rng = np.random.default_rng(seed)
    s = float(size)
    unit = size / 64.0  # widths are designed at 64 px and scale with the image
    aerial_img = Image.new("RGB", (size, size), _jitter_colour(AERIAL_LAND, rng=rng, amount=10))
    map_img = Image.new("RGB", (size, size), MAP_COLOURS[LAND])
    label_img = Image.new("L", (size, size), LAND)
    cv = _Canvas(ImageDraw.Draw(aerial_img), ImageDraw.Draw(map_img), ImageDraw.Draw(label_img))

    for _ in range(rng.integers(0, 4)):  # fields
        pts = _polygon(rng, rng.uniform(0, s), rng.uniform(0, s), s * rng.uniform(0.2, 0.45), rng.integers(4, 7))
        cv.polygon(pts, FIELD, AERIAL_FIELDS[rng.integers(len(AERIAL_FIELDS))])
    for _ in range(rng.integers(0, 3)):  # parks
        pts = _polygon(rng, rng.uniform(0, s), rng.uniform(0, s), s * rng.uniform(0.12, 0.3), rng.integers(5, 9))
        cv.polygon(pts, PARK, _jitter_colour(AERIAL_PARK, rng=rng, amount=8))
    water = rng.random()
    if water < 0.3:  # lake
        cx, cy, rx, ry = rng.uniform(0, s), rng.uniform(0, s), s * rng.uniform(0.1, 0.3), s * rng.uniform(0.1, 0.3)
        cv.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), WATER, _jitter_colour(AERIAL_WATER, rng=rng, amount=6))
    elif water < 0.6:  # river
        width = max(2, int(unit * rng.uniform(4, 9)))
        cv.line(_polyline(rng, s, 4), WATER, _jitter_colour(AERIAL_WATER, rng=rng, amount=6), width)

    shadow = (max(1, int(round(unit))), max(1, int(round(unit))))
    for _ in range(rng.integers(3, 16)):  # buildings, with a shadow to the lower right
        cx, cy = rng.uniform(0, s), rng.uniform(0, s)
        w, h = s * rng.uniform(0.05, 0.15), s * rng.uniform(0.05, 0.15)
        angle = rng.choice([0.0, rng.uniform(0, np.pi / 2)])
        pts = _rect(cx, cy, w, h, angle)
        cv.aerial.polygon([(x + shadow[0], y + shadow[1]) for x, y in pts], fill=(30, 32, 28))
        roof = _jitter_colour(AERIAL_ROOFS[rng.integers(len(AERIAL_ROOFS))], rng=rng, amount=10)
        cv.polygon(pts, BUILDING, roof, outline=True)

    for _ in range(rng.integers(1, 5)):  # roads: minor (white) and major (orange)
        major = rng.random() < 0.35
        width = max(1, int(unit * (rng.uniform(3, 5) if major else rng.uniform(1.5, 3))))
        cls, colour = (MAJOR_ROAD, AERIAL_MAJOR) if major else (ROAD, AERIAL_ROAD)
        cv.line(_polyline(rng, s, int(rng.integers(2, 5))), cls, _jitter_colour(colour, rng=rng, amount=6), width,
                casing=max(1, int(unit * 0.6)))

    return _texture(np.asarray(aerial_img), np.asarray(label_img), rng), np.asarray(map_img).copy()


def _texture(aerial: np.ndarray, label: np.ndarray, rng) -> np.ndarray:
    """Photo-like texture: per-class noise, field stripes, tree canopy, low-frequency light."""
    size = aerial.shape[0]
    img = aerial.astype(np.float32)
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * 0.6
    noise = noise + rng.standard_normal((size, size, 3), dtype=np.float32) * 0.4
    img += noise * NOISE_STD[label][..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = size / rng.uniform(6, 14)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))
    img += ((label == FIELD) * stripes * 10.0)[..., None]
    canopy = rng.standard_normal((size // 4 + 1, size // 4 + 1), dtype=np.float32)
    canopy = np.kron(canopy, np.ones((4, 4), np.float32))[:size, :size]
    img -= ((label == PARK) * np.clip(canopy, 0, None) * 14.0)[..., None]
    light = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    img += ((np.asarray(light, dtype=np.float32) - 127.5) / 127.5 * 12.0)[..., None]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


AERIAL_QUALITY = 90  # JPEG quality of the photos; Pillow's default chroma subsampling (4:2:0)


def encode_aerial(rgb: np.ndarray, subsampling: int = -1) -> bytes:
    """JPEG bytes of a photo (subsampling as Pillow's: -1 its default, 4:2:0; 0 full chroma, 4:4:4)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=AERIAL_QUALITY, subsampling=subsampling)
    return buf.getvalue()


def encode_map(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_corpus(out: str, n_train: int, n_test: int, size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Write trainA/*.jpg, trainB/*.png and the paired testA/*.jpg + testB/*.png under `out`."""
    from tqdm import tqdm

    if n_train < 0 or n_test < 0:
        raise ValueError(f"counts must be >= 0, got n_train={n_train} n_test={n_test}")
    for sub in ("trainA", "trainB", "testA", "testB"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    _remove_extra(out, n_train, n_test)
    jobs = [("trainA", i) for i in range(n_train)] + [("trainB", i) for i in range(n_train)]
    jobs += [("test", i) for i in range(n_test)]
    nbytes = 0
    # Each file is renamed into place but not fsynced: a demo corpus is regenerated, never recovered.
    for split, i in tqdm(jobs, desc="demo corpus", unit="img", disable=not progress, mininterval=0.5):
        aerial, map_ = render_scene(scene_seed(seed, split, i), size)
        name = f"{i:06d}"
        if split in ("trainA", "test"):
            data = encode_aerial(aerial)
            write_bytes(os.path.join(out, "testA" if split == "test" else "trainA", name + ".jpg"), data, durable=False)
            nbytes += len(data)
        if split in ("trainB", "test"):
            data = encode_map(map_)
            write_bytes(os.path.join(out, "testB" if split == "test" else "trainB", name + ".png"), data, durable=False)
            nbytes += len(data)
    return {"trainA": n_train, "trainB": n_train, "testA": n_test, "testB": n_test, "bytes": nbytes}


# the names write_corpus gives its files, per folder: only these are ever removed
_OWN_NAMES = {"trainA": ".jpg", "trainB": ".png", "testA": ".jpg", "testB": ".png"}


def _remove_extra(out: str, n_train: int, n_test: int) -> None:
    """Remove this generator's files numbered at or above the new counts (an earlier, larger run's,
    of maybe another seed), so a seed always gives the same corpus. Files of other names are left."""
    for sub, ext in _OWN_NAMES.items():
        count = n_train if sub.startswith("train") else n_test
        folder = os.path.join(out, sub)
        for name in os.listdir(folder):
            stem = name[:-len(ext)] if name.endswith(ext) else ""
            if len(stem) >= 6 and stem.isascii() and stem.isdigit() and int(stem) >= count:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    os.remove(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (trainA, trainB, testA, testB)")
    p.add_argument("--n-train", type=int, default=2000, help="images per domain in the unpaired train split")
    p.add_argument("--n-test", type=int, default=200, help="scenes in the paired test split")
    p.add_argument("--size", type=int, default=64, help="image side, a multiple of 32 up to 512")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size < 32 or args.size > 512 or args.size % 32:
        p.error(f"--size must be a multiple of 32 in [32, 512], got {args.size}")
    t0 = time.time()
    try:
        info = write_corpus(args.out, args.n_train, args.n_test, args.size, args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dt = time.time() - t0
    n = 2 * args.n_train + 2 * args.n_test
    print(f"Demo corpus: {args.n_train} aerial (trainA, JPEG) + {args.n_train} map (trainB, PNG) unpaired train "
          f"images and {args.n_test} paired test scenes (testA/testB) at {args.size}x{args.size}, seed {args.seed}; "
          f"{n} files, {info['bytes'] / 1e6:.1f} MB in {dt:.1f} s ({n / max(dt, 1e-9):.0f} images/s) under {args.out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
