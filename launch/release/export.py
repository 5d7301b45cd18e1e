"""The exported translator on the release side: rebuilt from its export dir, and run on images.

The export's files (launch/runstore/artifacts.py) are written by training; loading needs
`model/` only (no DeepSpeed, no MLflow) and unpickles nothing. Images in and out of every
consumer are uint8 HWC RGB (pipeline.tensors.to_tensor/to_uint8 convert them).

The registered MLflow model ships this file and what it imports (launch/release/registry.py
collects them), so its imports stay light: torch, numpy, safetensors and the standard library.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from launch.runstore.artifacts import META_NAME, WEIGHTS_NAME, read_translator
from pipeline.tensors import to_tensor, to_uint8

DIRECTIONS = ("a2b", "b2a")


def check_device(spec: str) -> str:
    """`spec` (cpu, cuda, cuda:N) when this machine has that device; ValueError saying why not."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {spec!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return spec


def load_translator(dir, device="cpu"):
    """Rebuild the generator side from an export dir; returns (gen_module in eval mode, meta dict)."""
    from model.unit import UNITGenerator, make_config  # here so this module loads without model/

    state, meta = read_translator(dir, device="cpu")
    gen = UNITGenerator(make_config(meta["model"]))
    want = gen.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    bad_shapes = [k for k in set(want) & set(state) if want[k].shape != state[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(f"{Path(dir) / WEIGHTS_NAME}: weights do not fit the model in {META_NAME}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {sorted(bad_shapes)[:5]}")
    gen.load_state_dict(state)
    gen.to(device).eval()
    return gen, meta


def size_multiple(meta_or_config: dict) -> int:
    """Input sides must be multiples of this (2 ** number of downsampling steps)."""
    cfg = meta_or_config.get("model", meta_or_config)
    return 2 ** int(cfg.get("n_down", 2))


@torch.no_grad()
def translate_uint8(gen: torch.nn.Module, images, direction: str, batch_size: int = 16,
                    multiple: int | None = None) -> np.ndarray:
    """Translate uint8 NHWC images with `gen.translate`; returns uint8 NHWC of the same shape.

    Sides that are not multiples of `multiple` (default: the generator's `input_multiple`,
    2 ** n_down; 4 for a module without one) are padded (edge replication) and cropped back,
    so any image size works.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if len(arr) == 0:
        return np.zeros((0,) + tuple(arr.shape[1:]), np.uint8)
    device = next(gen.parameters()).device
    h, w = arr.shape[1:3]
    multiple = multiple or getattr(gen, "input_multiple", 4)
    ph, pw = (-h) % multiple, (-w) % multiple
    out = []
    for i in range(0, len(arr), batch_size):
        x = to_tensor(arr[i:i + batch_size]).to(device)
        if ph or pw:
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
        y = gen.translate(x, direction)[:, :, :h, :w]
        out.append(to_uint8(y))
    return np.concatenate(out)


def min_input_side(meta_or_config: dict) -> int:
    """Smallest image side `translate_uint8` can translate with this model (sides are padded up to
    a multiple of 2**n_down first).

    Reflection padding needs each padded side larger than the pad (the 7x7 convs pad 3, so at
    least 4 pixels) and, like instance norm, more than one pixel at the bottleneck (a padded
    side of at least 2 * 2**n_down). Zero or replicate padding with layer or no norm has no
    minimum. tests/test_hostile_launch.py checks this against the networks themselves.
    """
    from model.unit import make_config

    cfg = make_config(meta_or_config.get("model", meta_or_config))
    m = 2 ** cfg.n_down
    padded = 1
    if cfg.pad_type == "reflect" or "in" in (cfg.norm, cfg.up_norm):
        padded = 2 * m
    if cfg.pad_type == "reflect":
        padded = max(padded, 4)
    return (-(-padded // m) - 1) * m + 1  # smallest side whose padded size reaches `padded`


def target_palette(meta_or_config: dict, direction: str) -> list | None:
    """The colours [[r, g, b], ...] that `direction`'s decoder paints from (the target domain's
    palette_a / palette_b: a PaletteHead, also in its expected decoder), None when it paints free RGB."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    colours = meta_or_config.get("model", meta_or_config).get(f"palette_{direction[-1]}")
    return [[int(v) for v in c] for c in colours] if isinstance(colours, list) and colours else None


# Images with a side above TILE are translated in TILE x TILE tiles sharing TILE_OVERLAP pixels:
# what the registered model (pyfunc) does, and translate's --tile/--tile-overlap defaults (which
# repeat the numbers there: translate imports nothing of torch before it loads a model).
TILE, TILE_OVERLAP = 1024, 64


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length`, each overlapping the next by at
    least `overlap`, spread evenly so that the last one ends at the border."""
    if length <= tile:
        return [0]
    n = -(-(length - overlap) // (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramp(n: int, overlap: int) -> np.ndarray:
    """Blending weight along one side of a tile: rises over `overlap` pixels at both ends, never 0."""
    i = np.arange(n, dtype=np.float32)
    return np.minimum(np.minimum(i + 1, n - i), overlap + 1) / (overlap + 1)


def translate_tiled(fn, image: np.ndarray, direction: str, tile: int = TILE, overlap: int = TILE_OVERLAP,
                    palette: list | None = None) -> np.ndarray:
    """Translate one uint8 [H, W, 3] image in overlapping tiles of at most tile x tile pixels with
    `fn(uint8 NHWC, direction) -> uint8 NHWC`; returns uint8 [H, W, 3].

    Overlaps are blended with linear ramps (weights normalised per pixel). Memory stays bounded
    by one tile in the network plus a band of tile rows of float accumulators, whatever H and W.
    The model's instance norm sees each tile's statistics, not the whole image's, so the result
    is close to, not equal to, a whole-image pass (which at this size would not fit in memory).
    `palette` (target_palette: the decoder paints only these colours): each blended pixel is
    snapped to its nearest colour, since a blend of two colours is neither (the tiles hold no
    logits to take the most probable colour from, as the PaletteHead does).
    """
    if not 0 <= overlap < tile // 2 + 1:
        raise ValueError(f"overlap {overlap}: must be in [0, tile/2] (tile {tile})")
    h, w = image.shape[:2]
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    weight = _ramp(th, overlap)[:, None] * _ramp(tw, overlap)[None, :]
    out = np.empty_like(image)
    top = 0  # first row not yet written to `out`; the band accumulators start there
    acc = np.zeros((0, w, 3), np.float32)
    wsum = np.zeros((0, w), np.float32)
    for r, y0 in enumerate(ys):
        grow = y0 + th - top - acc.shape[0]
        acc = np.concatenate([acc, np.zeros((grow, w, 3), np.float32)])
        wsum = np.concatenate([wsum, np.zeros((grow, w), np.float32)])
        for x0 in xs:
            y = np.asarray(fn(image[None, y0:y0 + th, x0:x0 + tw], direction))[0]
            acc[y0 - top:y0 - top + th, x0:x0 + tw] += weight[..., None] * y
            wsum[y0 - top:y0 - top + th, x0:x0 + tw] += weight
        # Rows above the next tile row's start get no more contributions: finish them.
        done = (ys[r + 1] if r + 1 < len(ys) else h) - top
        blend = acc[:done] / wsum[:done, :, None]
        out[top:top + done] = (np.clip(np.rint(blend), 0, 255).astype(np.uint8) if palette is None
                               else nearest_colours(blend, palette))
        acc, wsum, top = acc[done:], wsum[done:], top + done
    return out


def nearest_colours(x: np.ndarray, palette: list) -> np.ndarray:
    """uint8 [..., 3]: each pixel of float `x` [..., 3] replaced by the colour of `palette` nearest
    to it (the first on a tie, as model.networks.nearest_colour). One colour at a time, so memory
    is a few copies of `x`, not one per colour."""
    colours = np.asarray(palette, np.float32)
    best = np.full(x.shape[:-1], np.inf, np.float32)
    index = np.zeros(x.shape[:-1], np.intp)
    for k, c in enumerate(colours):
        d = np.square(x - c).sum(-1)
        closer = d < best
        best[closer], index[closer] = d[closer], k
    return colours.astype(np.uint8)[index]


def main(argv=None) -> int:
    """`python -m launch.release.export --onnx OUT_DIR --model EXPORT_DIR [--size N] [--opset K]`
    (launch/release/onnx_export.py)."""
    from launch.release.onnx_export import main as onnx_main  # here: onnx_export imports this module

    return onnx_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
