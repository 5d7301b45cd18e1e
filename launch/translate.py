"""Translate a folder of images with a registered or exported translator.

    python -m launch.translate --model models:/unit-translator@champion | EXPORT_DIR \\
        --direction a2b --in DIR --out DIR [--batch-size N] [--tracking-uri URI]

Walks --in recursively, keeps relative paths and file names (a .jpg stays a .jpg, written at
quality 95), translates images of the same size together, and ends with a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def find_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(images, skipped) under root, recognised by content."""
    from PIL import Image

    images, skipped = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        try:
            with Image.open(p) as im:
                im.verify()
            images.append(p)
        except Exception:
            skipped.append(p)
    return images, skipped


def save_image(arr: np.ndarray, path: Path) -> None:
    """Write under a temporary name in the same folder, then rename (format from the suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        Image.fromarray(arr).save(tmp, format=fmt, **kw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def translate_folder(model, direction: str, in_dir, out_dir, batch_size: int = 16, progress: bool = True) -> dict:
    """Translate every image under in_dir into out_dir; returns counts and time."""
    from tqdm import tqdm

    from launch.evaluate import as_translate_fn, read_image

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"--in {in_dir}: not a directory")
    if out_dir.resolve() == in_dir.resolve():
        raise ValueError(f"--out {out_dir}: must differ from --in (it would overwrite the inputs)")
    fn = as_translate_fn(model)
    images, skipped = find_images(in_dir)
    t0 = time.perf_counter()
    groups = defaultdict(list)  # translate same-sized images together
    done = 0
    bar = tqdm(total=len(images), unit="img", desc=f"translate {direction}", disable=not progress)

    def flush(shape):
        nonlocal done
        paths = groups.pop(shape)
        batch = np.stack([a for _, a in paths])
        out = fn(batch, direction)
        for (p, _), y in zip(paths, out):
            save_image(np.asarray(y, dtype=np.uint8), out_dir / p.relative_to(in_dir))
        done += len(paths)
        bar.update(len(paths))

    for p in images:
        arr = read_image(p)
        groups[arr.shape].append((p, arr))
        if len(groups[arr.shape]) >= batch_size:
            flush(arr.shape)
    for shape in list(groups):
        flush(shape)
    bar.close()
    return {"translated": done, "skipped": [str(p) for p in skipped], "seconds": time.perf_counter() - t0,
            "out": str(out_dir)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.translate", description="Translate a folder of images.")
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or an export dir")
    p.add_argument("--direction", required=True, choices=["a2b", "b2a"])
    p.add_argument("--in", dest="in_dir", required=True)
    p.add_argument("--out", dest="out_dir", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error("--batch-size must be >= 1")
    from launch.evaluate import load_model

    try:
        if not Path(a.in_dir).is_dir():
            raise FileNotFoundError(f"--in {a.in_dir}: not a directory")
        model, info = load_model(a.model, a.tracking_uri)
        res = translate_folder(model, a.direction, a.in_dir, a.out_dir, a.batch_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = res["translated"] / res["seconds"] if res["seconds"] > 0 else 0.0
    print(f"Translated {res['translated']} image(s) {a.direction} with {a.model} in {res['seconds']:.1f} s "
          f"({rate:.1f} img/s) into {res['out']}, file names kept; "
          f"{len(res['skipped'])} file(s) skipped as not images"
          + (f" (first: {res['skipped'][0]})" if res["skipped"] else "") + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
