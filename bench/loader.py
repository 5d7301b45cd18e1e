"""Loader throughput per worker against baselines measured in the same run, interleaved, on the
same generated JPEGs, for 64, 128 and 256 px sources cropped to 64 and 128 px:

  floor   the same work in one plain process, nothing else: decode (at reduced size where the
          JPEG allows: OpenCV's IMREAD_REDUCED_*, Pillow's draft mode), resize the shortest side
          to the crop size, random crop and flip, copy into a uint8 [B,3,H,W] batch; the faster
          of OpenCV and Pillow
  loader  UnpairedLoader (num_workers=0: one process = one worker), shards on local disk
  cold    the same, keeping no shard's tar index: each drawn shard's headers are read again, as
          in a corpus with more shards per worker than the loader keeps indexes of (256)
  s3      the same loader streaming the same shards from an S3 server (moto, started here on
          127.0.0.1; no cache: every drawn shard is fetched)
  folder  the official UNIT code's ImageFolder path: files from a folder opened with PIL,
          random flip, resize of the shortest side, random crop, ToTensor, Normalize, collate

Ratios are medians over rounds of per-round ratios (each round times every reader once).

    .venv/bin/python -m bench.loader [--sources 64 128 256] [--crops 64 128] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from pipeline.augment import jpeg_size
from pipeline.layout import DOMAINS
from pipeline import loader as loader_module
from pipeline.loader import UnpairedLoader
from pipeline.shardwriter import write_tar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as bench/loader.py or -m bench.loader
from ports import free_port  # noqa: E402


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
    """Shards (two domains, 4 shards each, index.json; as make shards writes them) and the same
    images as folder files."""
    entries = []
    half = len(images) // 2
    for d, part in zip(DOMAINS, (images[:half], images[half:])):
        os.makedirs(os.path.join(root, d), exist_ok=True)
        os.makedirs(os.path.join(root, "folder", d), exist_ok=True)
        for s, chunk in enumerate(np.array_split(np.arange(len(part)), 4)):
            rel = f"{d}/{d}-{s:06d}.tar"
            members = []  # as make shards writes them (pipeline.shardwriter: ustar headers, fixed metadata)
            for i in chunk:
                meta = {"width": size, "height": size, "domain": d, "format": "jpeg"}
                members += [(f"{d}{i:06d}.jpg", part[i]), (f"{d}{i:06d}.json", json.dumps(meta).encode())]
            write_tar(os.path.join(root, rel), members)
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


_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def floor_image(data: bytes, crop: int, decoder: str, rnd: random.Random) -> np.ndarray:
    """Decode at the smallest size that keeps the shortest side >= crop, resize it to crop, crop, flip."""
    if decoder == "pil":
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (crop, crop))  # libjpeg DCT scaling: 1/2, 1/4, 1/8 while >= the request
        img = np.asarray(im.convert("RGB"))
    else:
        # The frame header's size through the loader's own parser: PIL's Image.open for it cost
        # 16 us an image here, half a 64 px decode, which made the floor slower than its work.
        size = jpeg_size(data)
        side = min(size) if size else 1 << 30
        flag = next((f for k, f in _REDUCED if side // k >= crop), cv2.IMREAD_COLOR)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    h, w = img.shape[:2]
    if min(h, w) != crop:
        f = crop / min(h, w)
        img = cv2.resize(img, (max(crop, round(w * f)), max(crop, round(h * f))), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    y, x = rnd.randint(0, h - crop), rnd.randint(0, w - crop)
    img = img[y:y + crop, x:x + crop]
    if decoder != "pil":  # BGR to RGB as a view: the batch copy does it with the layout, as the loader's does
        img = img[..., ::-1]
    return img[:, ::-1] if rnd.random() < 0.5 else img


def bench_floor(images: list[bytes], crop: int, batch: int, seconds: float, decoder: str) -> float:
    rnd = random.Random(0)
    order = iter(())

    def step():
        nonlocal order
        out = np.empty((2 * batch, 3, crop, crop), np.uint8)
        for k in range(2 * batch):
            i = next(order, None)
            if i is None:
                order = iter(rnd.sample(range(len(images)), len(images)))
                i = next(order)
            out[k] = floor_image(images[i], crop, decoder, rnd).transpose(2, 0, 1)
        return 2 * batch

    return timed(step, seconds)


def bench_loader(root: str, size: int, batch: int, seconds: float, keep_indexes: bool = True) -> float:
    """`root`: the shards' OUT folder or its URL; `keep_indexes=False`: every shard drawn is
    indexed again (the loader's workers run in this process, so the module setting holds)."""
    kept = loader_module.INDEXES_KEPT
    loader_module.INDEXES_KEPT = kept if keep_indexes else 0
    try:
        it = iter(UnpairedLoader(root, root, batch_size=batch, image_size=size, num_workers=0))

        def step():
            next(it)
            return 2 * batch

        return timed(step, seconds)
    finally:
        loader_module.INDEXES_KEPT = kept


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




@contextlib.contextmanager
def s3_server(log_dir: str):
    """moto's S3 server on 127.0.0.1 with one bucket; yields s3://bucket (credentials in os.environ)."""
    import s3fs

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(os.path.join(log_dir, "moto.log"), "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for _ in range(100):
            with contextlib.suppress(Exception):
                fs.mkdir("bench")
                break
            time.sleep(0.2)
        yield fs, "s3://bench"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def measure(images, root, url, crop, args) -> dict[str, list[float]]:
    """Every reader once per round, interleaved; images/s per reader per round."""
    times: dict[str, list[float]] = {k: [] for k in ("pil", "cv2", "loader", "cold", "s3", "folder")}
    for _ in range(args.rounds):
        for dec in ("pil", "cv2"):
            times[dec].append(bench_floor(images, crop, args.batch_size, args.seconds, dec))
        times["loader"].append(bench_loader(root, crop, args.batch_size, args.seconds))
        times["cold"].append(bench_loader(root, crop, args.batch_size, args.seconds, keep_indexes=False))
        if url:
            times["s3"].append(bench_loader(url, crop, args.batch_size, args.seconds))
        times["folder"].append(bench_folder(root, crop, args.batch_size, args.seconds))
    times["floor"] = [max(p, c) for p, c in zip(times["pil"], times["cv2"])]
    return times


def print_table(rows, args, elapsed: float) -> None:
    med = statistics.median
    print(f"\nimages/s per worker (1 process, 1 thread), batch {args.batch_size} per domain, "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'src px':>6} {'crop':>5} {'KiB/img':>8} {'floor PIL':>10} {'floor cv2':>10} {'loader':>8} {'cold':>8} "
          f"{'s3':>8} {'folder':>8} {'loader/floor':>13} {'cold/floor':>11} {'loader/folder':>14} {'s3/loader':>10}")
    for src, crop, kb, t in rows:
        ratio = lambda a, b: med(x / y for x, y in zip(t[a], t[b])) if t[a] else float("nan")  # noqa: E731
        s3 = med(t["s3"]) if t["s3"] else float("nan")
        print(f"{src:>6} {crop:>5} {kb:>8.1f} {med(t['pil']):>10.0f} {med(t['cv2']):>10.0f} {med(t['loader']):>8.0f} "
              f"{med(t['cold']):>8.0f} {s3:>8.0f} {med(t['folder']):>8.0f} {ratio('loader', 'floor'):>13.2f} "
              f"{ratio('cold', 'floor'):>11.2f} {ratio('loader', 'folder'):>14.2f} {ratio('s3', 'loader'):>10.2f}")
    print(f"\ngoals: loader/floor >= 0.85, loader/folder >= 1.5 (issue 16); s3/loader is streaming from the "
          f"local S3 server next to local disk (issue 13). {len(rows)} rows in {elapsed:.0f} s.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=int, nargs="+", default=[64, 128, 256], help="source image sizes (px)")
    p.add_argument("--crops", type=int, nargs="+", default=[64, 128], help="training crop sizes (px)")
    p.add_argument("--images", type=int, default=512, help="generated images per source size (both domains)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing window per measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians reported")
    p.add_argument("--no-s3", action="store_true", help="leave out the S3 streaming column")
    args = p.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp, contextlib.ExitStack() as stack:
        fs, bucket = stack.enter_context(s3_server(tmp)) if not args.no_s3 else (None, None)
        for src in args.sources:
            rng = np.random.default_rng(src)
            images = [scene(rng, src) for _ in range(args.images)]
            root = os.path.join(tmp, str(src))
            write_data(root, images, src)
            url = None
            if fs is not None:
                url = f"{bucket}/{src}"
                fs.put(root + "/", url, recursive=True)
            kb = sum(map(len, images)) / len(images) / 1024
            for crop in args.crops:
                rows.append((src, crop, kb, measure(images, root, url, crop, args)))
    print_table(rows, args, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
