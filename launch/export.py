"""The exported translator: safetensors weights plus a JSON model config.

Layout (docs/contracts.md, "Exported translator"):

    EXPORT_DIR/translator.safetensors   the generator side's weights (EMA ones when EMA is on)
    EXPORT_DIR/translator.json          {"format": 1, "model": unit.config(), "image_size", ...}

Loading needs `model/` only (no DeepSpeed, no MLflow) and unpickles nothing. Images in and
out of every consumer are uint8 HWC RGB; `to_tensor`/`to_uint8` convert to and from the
model's float [-1, 1] NCHW tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_file

WEIGHTS_NAME = "translator.safetensors"
META_NAME = "translator.json"
FORMAT_VERSION = 1
DIRECTIONS = ("a2b", "b2a")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_sha256 = file_sha256


def _tmp_name(dir_: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dir_)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; the export is read by other users and servers
    os.close(fd)
    return Path(tmp)


def save_translator(dir, gen_module: torch.nn.Module, model_config: dict, image_size: int,
                    step: int, ema: bool, domains: dict | None = None) -> Path:
    """Write the translator to `dir` (created if needed); returns the directory.

    Each file is written under a temporary name and renamed into place, weights first and the
    JSON last; the JSON records the weights' sha256, so a crash between the two renames is
    caught at load time instead of pairing new weights with an old config.
    """
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_w = _tmp_name(out, WEIGHTS_NAME)
    try:
        # Copies, not the live tensors: under DeepSpeed ZeRO the parameters are views into one
        # flat buffer, which safetensors refuses to store. The shared layers are registered
        # once (model/unit.py), so no tensor appears under two names.
        state = {k: v.detach().cpu().clone().contiguous() for k, v in gen_module.state_dict().items()}
        save_file(state, str(tmp_w), metadata={"format": "pt"})
        digest = _sha256(tmp_w)
        os.chmod(tmp_w, 0o644)  # mkstemp and safetensors make 0600; servers of other users read it
        os.replace(tmp_w, out / WEIGHTS_NAME)
    finally:
        tmp_w.unlink(missing_ok=True)
    meta = {
        "format": FORMAT_VERSION,
        "model": model_config,
        "image_size": int(image_size),
        "domains": domains or {"a": "domain A", "b": "domain B"},
        "step": int(step),
        "ema": bool(ema),
        "weights_sha256": digest,
    }
    tmp_j = _tmp_name(out, META_NAME)
    try:
        tmp_j.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp_j, out / META_NAME)
    finally:
        tmp_j.unlink(missing_ok=True)
    return out


def read_meta(dir) -> dict:
    """Read and check translator.json in `dir`."""
    path = Path(dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported translator here (missing {META_NAME})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "model" not in meta:
        raise ValueError(f"{path}: expected {{'format': {FORMAT_VERSION}, 'model': {{...}}, ...}}, "
                         f"got format={meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def is_export_dir(path) -> bool:
    return (Path(path) / META_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def load_translator(dir, device="cpu"):
    """Rebuild the generator side from `dir`; returns (gen_module in eval mode, meta dict)."""
    from model.unit import UNITGenerator, make_config  # here so this module loads without model/

    meta = read_meta(dir)
    weights = Path(dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    want = meta.get("weights_sha256")
    if want and _sha256(weights) != want:
        raise ValueError(f"{weights}: sha256 does not match {META_NAME} "
                         "(the export was interrupted between the two files; export again)")
    gen = UNITGenerator(make_config(meta["model"]))
    missing, unexpected = load_model(gen, str(weights), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not fit the model in {META_NAME}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    gen.to(device).eval()
    return gen, meta


def to_tensor(images) -> torch.Tensor:
    """uint8 HWC (or NHWC) RGB -> float32 NCHW in [-1, 1]."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images: expected dtype uint8, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images: expected shape [H,W,3] or [N,H,W,3] (RGB), got {list(arr.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW (or CHW) in [-1, 1] -> uint8 NHWC (or HWC), rounded and clamped."""
    x = x.detach().float().cpu()
    y = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if y.ndim == 4:
        return y.permute(0, 2, 3, 1).numpy()
    if y.ndim == 3:
        return y.permute(1, 2, 0).numpy()
    raise ValueError(f"x: expected a [N,3,H,W] or [3,H,W] tensor, got {list(x.shape)}")


def size_multiple(meta_or_config: dict) -> int:
    """Input sides must be multiples of this (2 ** number of downsampling steps)."""
    cfg = meta_or_config.get("model", meta_or_config)
    return 2 ** int(cfg.get("n_down", 2))


@torch.no_grad()
def translate_uint8(gen: torch.nn.Module, images, direction: str, batch_size: int = 16,
                    multiple: int = 4) -> np.ndarray:
    """Translate uint8 NHWC images with `gen.translate`; returns uint8 NHWC of the same shape.

    Sides that are not multiples of `multiple` are padded (edge replication) and cropped back,
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


def translate_tiled(fn, image: np.ndarray, direction: str, tile: int = 1024, overlap: int = 64) -> np.ndarray:
    """Translate one uint8 [H, W, 3] image in overlapping tiles of at most tile x tile pixels with
    `fn(uint8 NHWC, direction) -> uint8 NHWC`; returns uint8 [H, W, 3].

    Overlaps are blended with linear ramps (weights normalised per pixel). Memory stays bounded
    by one tile in the network plus a band of tile rows of float accumulators, whatever H and W.
    The model's instance norm sees each tile's statistics, not the whole image's, so the result
    is close to, not equal to, a whole-image pass (which at this size would not fit in memory).
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
        out[top:top + done] = np.clip(np.rint(acc[:done] / wsum[:done, :, None]), 0, 255).astype(np.uint8)
        acc, wsum, top = acc[done:], wsum[done:], top + done
    return out
