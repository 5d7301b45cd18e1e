"""Benchmark `make shards` against `tar cf` of the same files, measured in the same run.

    .venv/bin/python bench/shards.py [--n 1000] [--size 256] [--repeats 3] [--workers 1 2]

Generates a demo corpus (n aerial JPEGs + n map PNGs), warms the page cache, then per
repeat times, interleaved: `tar cf` of the two folders, a plain PIL full-decode loop over
the same files (the validation floor on one core), and the shards CLI (as `make shards`
runs it, a fresh OUT each time) for each worker count. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def files_under(*dirs):
    out = []
    for d in dirs:
        for dirpath, _, names in os.walk(d):
            out += [os.path.join(dirpath, n) for n in sorted(names)]
    return out


def time_tar(corpus: str, dest: str) -> float:
    t0 = time.perf_counter()
    # A real file: GNU tar skips reading the inputs when the archive is /dev/null.
    subprocess.run(["tar", "cf", dest, "-C", corpus, "trainA", "trainB"], check=True)
    dt = time.perf_counter() - t0
    os.remove(dest)
    return dt


def time_decode(paths) -> float:
    from PIL import Image

    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            Image.open(io.BytesIO(f.read())).load()
    return time.perf_counter() - t0


def time_shards(corpus: str, out: str, workers: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.shards", "--src-a", os.path.join(corpus, "trainA"),
                        "--src-b", os.path.join(corpus, "trainB"), "--out", out, "--workers", str(workers),
                        "--max-per-shard", "250", "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"shards CLI failed ({r.returncode}): {r.stderr.strip()}")
    m = re.search(r"validated \d+ inputs in ([\d.]+) s", r.stdout)
    return dt, float(m.group(1)) if m else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="images per domain")
    p.add_argument("--size", type=int, default=256, help="image side (multiple of 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--corpus", help="reuse (or create) the corpus in this folder")
    args = p.parse_args()

    from pipeline.demo import write_corpus

    tmp = tempfile.mkdtemp(prefix="bench-shards-")
    corpus = args.corpus or os.path.join(tmp, "corpus")
    if not os.path.isdir(os.path.join(corpus, "trainB")):
        print(f"generating {2 * args.n} images at {args.size}px in {corpus} ...", flush=True)
        write_corpus(corpus, args.n, 0, size=args.size, seed=0, progress=False)
    paths = files_under(os.path.join(corpus, "trainA"), os.path.join(corpus, "trainB"))
    nbytes = sum(os.path.getsize(q) for q in paths)
    for q in paths:  # warm the page cache: both sides then read from memory
        with open(q, "rb") as f:
            f.read()

    times = {"tar": [], "decode": []} | {w: [] for w in args.workers}
    inner = {w: [] for w in args.workers}
    try:
        for rep in range(args.repeats):
            times["tar"].append(time_tar(corpus, os.path.join(tmp, "corpus.tar")))
            times["decode"].append(time_decode(paths))
            for w in args.workers:
                dt, dt_inner = time_shards(corpus, os.path.join(tmp, "out"), w)
                times[w].append(dt)
                inner[w].append(dt_inner)
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n, mb = len(paths), nbytes / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    tar_mbs = mb / med["tar"]
    dec_mbs = mb / med["decode"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ncorpus: {n} files ({args.n} JPEG aerial + {args.n} PNG map, {args.size}x{args.size}), {mb:.1f} MB; "
          f"page cache warm; {os.cpu_count()} CPUs, load average {load:.1f}; median of {args.repeats}")
    print("| command | workers | seconds | images/s | MB/s | MB/s per worker | x tar per worker "
          "| x decode-only per worker |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| tar cf | 1 | {med['tar']:.3f} | {n / med['tar']:.0f} | {tar_mbs:.1f} | {tar_mbs:.1f} | 1.00 | "
          f"{tar_mbs / dec_mbs:.2f} |")
    print(f"| PIL full decode loop (validation floor) | 1 | {med['decode']:.3f} | {n / med['decode']:.0f} | "
          f"{dec_mbs:.1f} | {dec_mbs:.1f} | {dec_mbs / tar_mbs:.3f} | 1.00 |")
    for w in args.workers:
        mbs = mb / med[w]
        print(f"| pipeline.shards (wall, incl. start-up) | {w} | {med[w]:.3f} | {n / med[w]:.0f} | {mbs:.1f} | "
              f"{mbs / w:.1f} | {mbs / w / tar_mbs:.3f} | {mbs / w / dec_mbs:.2f} |")
        t_in = statistics.median(inner[w])
        mbs = mb / t_in
        print(f"| pipeline.shards (its own timer, after start-up) | {w} | {t_in:.3f} | {n / t_in:.0f} | "
              f"{mbs:.1f} | {mbs / w:.1f} | {mbs / w / tar_mbs:.3f} | {mbs / w / dec_mbs:.2f} |")


if __name__ == "__main__":
    main()
