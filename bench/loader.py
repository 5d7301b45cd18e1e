"""Loader throughput per worker against two baselines measured in the same run, on the same
generated JPEGs at several sizes:

  raw     decode of the stored bytes to an array in a tight loop (the limit per core): the
          faster of PIL (Image.open + convert + asarray) and OpenCV (imdecode), both shown
  loader  UnpairedLoader (num_workers=0: one process = one worker), shards on local disk
  folder  the official UNIT code's ImageFolder path: files from a folder opened with PIL,
          random flip, resize of the shortest side, random crop, ToTensor, Normalize, collate

    .venv/bin/python -m bench.loader [--sizes 64 128 256] [--seconds 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time

import cv2
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from pipeline.layout import DOMAINS
from pipeline.loader import UnpairedLoader


def scene(rng: np.random.Generator, size: int) -> bytes:
    """A smooth colour field with a few shapes and mild noise, as JPEG (photo-like entropy)."""
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(1))
    arr = np.asarray(im).astype(np.int16) + rng.integers(-6, 7, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_data(root: str, images: list[bytes], size: int) -> None:
    """Shards (two domains, 4 shards each, index.json) and the same images as folder files."""
    entries = []
    half = len(images) // 2
    for d, part in zip(DOMAINS, (images[:half], images[half:])):
        os.makedirs(os.path.join(root, d), exist_ok=True)
        os.makedirs(os.path.join(root, "folder", d), exist_ok=True)
        for s, chunk in enumerate(np.array_split(np.arange(len(part)), 4)):
            rel = f"{d}/{d}-{s:06d}.tar"
            with wds.TarWriter(os.path.join(root, rel)) as sink:
                for i in chunk:
                    meta = {"width": size, "height": size, "domain": d, "format": "jpeg"}
                    sink.write({"__key__": f"{d}{i:06d}", "jpg": part[i], "json": json.dumps(meta).encode()})
            entries.append({"url": rel, "domain": d, "nsamples": len(chunk)})
        for i, data in enumerate(part):
            with open(os.path.join(root, "folder", d, f"{i:06d}.jpg"), "wb") as f:
                f.write(data)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"version": 1, "shards": entries, "totals": {}}, f)


def timed(step, seconds: float) -> float:
    """Images per second of `step()` (which returns how many images it made), after a warm-up."""
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += step()
    return n / (time.perf_counter() - t0)


def bench_raw(images: list[bytes], seconds: float, decoder: str) -> float:
    """Decode to an RGB (PIL) or BGR (OpenCV) uint8 array, nothing else."""
    it = iter(range(0))
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION

    def step():
        nonlocal it
        for k in range(64):
            i = next(it, None)
            if i is None:
                it = iter(range(len(images)))
                i = next(it)
            if decoder == "pil":
                np.asarray(Image.open(io.BytesIO(images[i])).convert("RGB"))
            else:
                cv2.imdecode(np.frombuffer(images[i], np.uint8), flags)
        return 64

    return timed(step, seconds)


def bench_loader(root: str, size: int, batch: int, seconds: float) -> float:
    it = iter(UnpairedLoader(root, root, batch_size=batch, image_size=size, num_workers=0))

    def step():
        next(it)
        return 2 * batch

    return timed(step, seconds)


def bench_folder(root: str, size: int, batch: int, seconds: float) -> float:
    """torchvision-free replica of UNIT's ImageFolder + transforms, one domain after the other."""
    files = {d: sorted(os.scandir(os.path.join(root, "folder", d)), key=lambda e: e.name) for d in DOMAINS}
    rnd = random.Random(0)

    def load(path: str) -> torch.Tensor:
        im = Image.open(path).convert("RGB")
        if rnd.random() < 0.5:  # RandomHorizontalFlip
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        w, h = im.size  # Resize(new_size): shortest side
        if min(w, h) != size:
            f = size / min(w, h)
            im = im.resize((round(w * f), round(h * f)), Image.BILINEAR)
        w, h = im.size  # RandomCrop
        x, y = rnd.randint(0, w - size), rnd.randint(0, h - size)
        im = im.crop((x, y, x + size, y + size))
        t = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
        return t.sub_(0.5).div_(0.5)  # Normalize((0.5,)*3, (0.5,)*3)

    def step():
        for d in DOMAINS:
            picks = rnd.sample(files[d], batch)
            torch.stack([load(e.path) for e in picks])  # default collate
        return 2 * batch

    return timed(step, seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--images", type=int, default=1024, help="generated images per size (both domains)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best is kept")
    args = p.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for size in args.sizes:
            rng = np.random.default_rng(size)
            images = [scene(rng, size) for _ in range(args.images)]
            root = os.path.join(tmp, str(size))
            write_data(root, images, size)
            best = {"pil": 0.0, "cv2": 0.0, "loader": 0.0, "folder": 0.0}
            for _ in range(args.rounds):  # interleave so a noisy neighbour hits all three alike
                for dec in ("pil", "cv2"):
                    best[dec] = max(best[dec], bench_raw(images, args.seconds, dec))
                best["loader"] = max(best["loader"], bench_loader(root, size, args.batch_size, args.seconds))
                best["folder"] = max(best["folder"], bench_folder(root, size, args.batch_size, args.seconds))
            kb = sum(map(len, images)) / len(images) / 1024
            best["raw"] = max(best["pil"], best["cv2"])
            rows.append((size, kb, best))
    print(f"\nimages/s per worker (1 process, 1 thread), batch {args.batch_size}, best of {args.rounds}")
    print(f"{'px':>5} {'KiB/img':>8} {'raw PIL':>9} {'raw cv2':>9} {'loader':>9} {'folder':>9} {'loader/raw':>11} {'loader/folder':>14}")
    for size, kb, b in rows:
        print(f"{size:>5} {kb:>8.1f} {b['pil']:>9.0f} {b['cv2']:>9.0f} {b['loader']:>9.0f} {b['folder']:>9.0f} "
              f"{b['loader'] / b['raw']:>11.2f} {b['loader'] / b['folder']:>14.2f}")
    print(f"\nloader/raw uses the faster raw decoder. Measured {len(rows)} sizes x 4 readers on {args.images} generated JPEGs each in "
          f"{time.perf_counter() - t_start:.0f} s; goals: loader/raw >= 0.85, loader/folder >= 1.5.")


if __name__ == "__main__":
    main()
