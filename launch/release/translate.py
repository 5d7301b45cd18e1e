"""Translate a folder of images with a registered or exported translator.

    python -m launch.release.translate --model models:/unit-translator@champion | EXPORT_DIR \\
        --direction a2b --in DIR --out DIR [--batch-size N] [--tracking-uri URI] \\
        [--max-pixels N] [--tile N] [--tile-overlap N] [--report FILE]

Walks --in recursively, keeps relative paths and file names (a .jpg stays a .jpg, written at
quality 95), translates images of the same size together, and ends with a summary.

Input is untrusted: files that are no image at all are listed and left alone; images that
cannot be used (damaged, above --max-pixels, smaller than the model's minimum side, failing in
the model) are skipped with one line each naming the file and the reason, the others are still
written, and the exit status is 3. EXIF orientation is applied, so outputs are upright. Images
with a side above --tile are translated in overlapping tiles, so memory stays bounded.
Exit status: 0 all images translated, 2 nothing done (bad arguments, model), 3 some skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import replacing, write_json
from pipeline.imageio import DEFAULT_MAX_PIXELS, ImageRejected, is_image_file, read_rgb

EXIT_SKIPPED = 3


@dataclass
class Limits:
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    """Images with more pixels are refused before decoding; None: no cap."""
    min_side: int = 1
    """Images with a shorter side are refused (the model's minimum, launch.release.export.min_input_side)."""
    tile: int = 1024
    """Images with a side above this are translated in tiles of tile x tile; 0: never tile."""
    overlap: int = 64
    """Pixels shared by neighbouring tiles, blended."""


@dataclass
class Outcome:
    translated: int = 0
    tiled: int = 0
    not_images: list = field(default_factory=list)
    rejected: list = field(default_factory=list)   # {"path", "reason"}

    def reject(self, path, reason: str, warn: bool = True) -> None:
        self.rejected.append({"path": str(path), "reason": reason})
        if warn:
            print(f"skipped {path}: {reason}", file=sys.stderr, flush=True)


def find_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(candidate images, files that are no image) under root; hidden files and folders are left out.
    Reads headers only: damaged images are found (and reported) when they are decoded."""
    images, others = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        (images if is_image_file(p) else others).append(p)
    return images, others


def save_image(arr: np.ndarray, path: Path) -> None:
    """Written atomically, in the format its suffix names."""
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    with replacing(path, durable=False) as tmp:
        Image.fromarray(arr).save(tmp, format=fmt, **kw)


def check_folders(in_dir: Path, out_dir: Path) -> None:
    """--out inside --in would be translated again by the next run (and --in inside --out can
    be overwritten): refuse both, on resolved paths (symlinks followed)."""
    if not in_dir.is_dir():
        raise FileNotFoundError(f"--in {in_dir}: not a directory")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src:
        raise ValueError(f"--out {out_dir}: must differ from --in (it would overwrite the inputs)")
    if dst.is_relative_to(src):
        raise ValueError(f"--out {out_dir} is inside --in {in_dir}: a later run would translate its own "
                         "outputs; choose an output folder outside the input folder")
    if src.is_relative_to(dst):
        raise ValueError(f"--in {in_dir} is inside --out {out_dir}: outputs could overwrite inputs; "
                         "choose an output folder that does not contain the input folder")


def _translate_group(fn, direction, items, in_dir, out_dir, res: Outcome) -> int:
    """Translate same-sized images together; when the batch fails, each alone, so that one bad
    image costs only itself. Returns how many were handled."""
    try:
        outs = fn(np.stack([a for _, a in items]), direction)
    except Exception as e:
        if len(items) > 1:
            return sum(_translate_group(fn, direction, [it], in_dir, out_dir, res) for it in items)
        res.reject(items[0][0], f"translation failed ({type(e).__name__}: {str(e)[:200]})")
        return 1
    for (p, _), y in zip(items, outs):
        _write(y, p, in_dir, out_dir, res)
    return len(items)


def _write(y, p: Path, in_dir: Path, out_dir: Path, res: Outcome) -> None:
    try:
        save_image(np.asarray(y, dtype=np.uint8), out_dir / p.relative_to(in_dir))
        res.translated += 1
    except OSError as e:
        res.reject(p, f"cannot write the output ({e.strerror or e})")


def translate_folder(model, direction: str, in_dir, out_dir, batch_size: int = 16, progress: bool = True,
                     limits: Limits | None = None) -> dict:
    """Translate every image under in_dir into out_dir; returns counts, what was skipped and why, time.

    `model`: a generator module, a pyfunc model, or fn(uint8 NHWC, direction) -> uint8 NHWC.
    """
    from tqdm import tqdm

    from launch.release.evaluate import as_translate_fn
    from launch.release.export import translate_tiled

    limits = limits or Limits()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_folders(in_dir, out_dir)
    fn = as_translate_fn(model)
    images, others = find_images(in_dir)
    res = Outcome(not_images=[str(p) for p in others])
    t0 = time.perf_counter()
    groups = defaultdict(list)  # translate same-sized images together
    bar = tqdm(total=len(images), unit="img", desc=f"translate {direction}", disable=not progress)
    for p in images:
        try:
            arr = read_rgb(p, max_pixels=limits.max_pixels, min_side=limits.min_side)
        except ImageRejected as e:  # NotAnImage included: is_image_file said it looked like one
            res.reject(p, e.reason)
            bar.update(1)
            continue
        if limits.tile and max(arr.shape[:2]) > limits.tile:
            try:
                _write(translate_tiled(fn, arr, direction, limits.tile, limits.overlap), p, in_dir, out_dir, res)
                res.tiled += 1
            except Exception as e:
                res.reject(p, f"translation failed ({type(e).__name__}: {str(e)[:200]})")
            bar.update(1)
            continue
        groups[arr.shape].append((p, arr))
        if len(groups[arr.shape]) >= batch_size:
            bar.update(_translate_group(fn, direction, groups.pop(arr.shape), in_dir, out_dir, res))
    for shape in list(groups):
        bar.update(_translate_group(fn, direction, groups.pop(shape), in_dir, out_dir, res))
    bar.close()
    return {"translated": res.translated, "tiled": res.tiled, "skipped": res.not_images,
            "rejected": res.rejected, "seconds": time.perf_counter() - t0, "out": str(out_dir)}


def model_meta(model, info: dict) -> dict | None:
    """translator.json of an export directory or of a registered pyfunc model (None if unknown)."""
    if info.get("meta"):
        return info["meta"]
    try:
        return getattr(model.unwrap_python_model(), "meta", None)
    except Exception:  # not a pyfunc model, or not ours
        return None


def write_report(path: Path, res: dict) -> None:
    write_json(path, {k: res[k] for k in ("translated", "tiled", "rejected", "skipped", "out")})


def summary(res: dict, direction: str, model: str) -> str:
    rate = res["translated"] / res["seconds"] if res["seconds"] > 0 else 0.0
    rej = res["rejected"]
    return (f"Translated {res['translated']} image(s) {direction} with {model} in {res['seconds']:.1f} s "
            f"({rate:.1f} img/s) into {res['out']}, file names kept"
            + (f", {res['tiled']} of them in tiles" if res["tiled"] else "") + "; "
            + f"{len(res['skipped'])} file(s) skipped as not images"
            + (f" (first: {res['skipped'][0]})" if res["skipped"] else "") + "; "
            + f"{len(rej)} image(s) skipped as unusable"
            + (f" (first: {rej[0]['path']}: {rej[0]['reason']})" if rej else "") + ".")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.release.translate", description="Translate a folder of images.")
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or an export dir")
    p.add_argument("--direction", required=True, choices=["a2b", "b2a"])
    p.add_argument("--in", dest="in_dir", required=True)
    p.add_argument("--out", dest="out_dir", required=True, help="must not be inside --in (nor contain it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels, checked before decoding (default {DEFAULT_MAX_PIXELS}); 0: no cap")
    p.add_argument("--tile", type=int, default=1024,
                   help="translate images with a side above N in overlapping N x N tiles (default 1024); 0: never")
    p.add_argument("--tile-overlap", type=int, default=64, help="pixels shared by neighbouring tiles (default 64)")
    p.add_argument("--report", default=None, help="write what was translated and skipped (with reasons) as JSON")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if a.max_pixels < 0:
        p.error("--max-pixels must be >= 0")
    if a.tile and a.tile < 32:
        p.error("--tile must be 0 (never tile) or >= 32")
    if a.tile and not 0 <= a.tile_overlap <= a.tile // 2:
        p.error(f"--tile-overlap must be in [0, --tile/2] = [0, {a.tile // 2}]")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from launch.release.evaluate import load_model
    from launch.release.export import min_input_side, size_multiple, translate_uint8

    try:
        check_folders(Path(a.in_dir), Path(a.out_dir))  # before loading the model: fail fast
        model, info = load_model(a.model, a.tracking_uri)
        meta = model_meta(model, info)
        if info.get("kind") == "export":  # pad to the model's own multiple (as_translate_fn assumes 4)
            gen, multiple = model, size_multiple(meta)
            model = lambda x, d: translate_uint8(gen, x, d, multiple=multiple)  # noqa: E731
        limits = Limits(max_pixels=a.max_pixels or None, min_side=min_input_side(meta) if meta else 1,
                        tile=a.tile, overlap=a.tile_overlap)
        res = translate_folder(model, a.direction, a.in_dir, a.out_dir, a.batch_size, limits=limits)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.report:
        write_report(Path(a.report), res)
    print(summary(res, a.direction, a.model))
    return EXIT_SKIPPED if res["rejected"] else 0


if __name__ == "__main__":
    sys.exit(main())
