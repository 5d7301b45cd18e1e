"""Ceilings on the demo corpus: what translators fitted *with pairs* score, beside the trivial
baselines, so that an unsupervised translator's figure can be read against both ends.

Every oracle here is fitted on one half of a paired split and scored on the other half:

  a2b pixel lookup    each aerial pixel's colour (binned, --bin levels per channel) -> the map
                      colour most often under it: what a per-pixel colour rule can reach
  a2b 3x3 lookup      the same on the 3x3 mean colour around each pixel
  b2a class mean      each map colour -> the mean aerial colour under it (an L2-optimal painter)
  b2a class median    each map colour -> the per-channel median aerial colour under it
  b2a ideal sampler   the class mean plus the texture (residual from its class mean) of another
                      scene at the same pixels: a translator whose photos are as varied as real
                      ones (light, per-object colour, noise) and otherwise perfect
  b2a textured mean   the class mean plus only the fine part of that residual (less its 5x5
                      mean): real-looking noise, but every scene in the average light and colours

A map is a function of the scene, so a2b can in principle be scored near its lookup ceiling. A
photo is not: its light, object colours and noise are drawn anew per scene, so a translator that
paints realistic photos pays for every invented shade under a 16-level pixel threshold, and the
ideal sampler shows how much.

    .venv/bin/python bench/oracle.py [--size 32] [--n-pairs 2000] [--bin 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.release.baselines import DomainStats, translators  # noqa: E402
from launch.release.evaluate import pixel_accuracy  # noqa: E402
from recipe import corpus  # noqa: E402


def box(x: np.ndarray, k: int = 3) -> np.ndarray:
    """[N, H, W, C] float: the mean over each pixel's k x k neighbourhood (k odd, edges replicated)."""
    r = k // 2
    p = np.pad(x.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    return sum(p[:, i:i + h, j:j + w] for i in range(k) for j in range(k)) / float(k * k)


def lookup(src: np.ndarray, labels: np.ndarray, n_fit: int, levels: int, n_classes: int) -> np.ndarray:
    """Per binned source colour, the label most often under it on the first n_fit images; the
    predicted labels of the rest (bins never seen while fitting get the most frequent label)."""
    nb = 256 // levels
    q = (np.clip(src, 0, 255) // levels).astype(np.int64)
    code = (q[..., 0] * nb + q[..., 1]) * nb + q[..., 2]
    table = np.zeros((nb ** 3, n_classes), np.int64)
    np.add.at(table, (code[:n_fit].ravel(), labels[:n_fit].ravel()), 1)
    fallback = np.bincount(labels[:n_fit].ravel(), minlength=n_classes).argmax()
    best = np.where(table.sum(1) > 0, table.argmax(1), fallback)
    return best[code[n_fit:]]


def oracles(photos: np.ndarray, maps: np.ndarray, levels: int, seed: int = 0) -> dict[str, tuple[str, float]]:
    """{name: (direction, pixel accuracy)} of each oracle, fitted on the first half of the pairs."""
    n = len(photos) // 2
    colours, labels = np.unique(maps.reshape(-1, 3), axis=0, return_inverse=True)
    labels = labels.reshape(maps.shape[:3])
    k = len(colours)
    truth_a, truth_b = photos[n:], maps[n:]
    out = {"a2b pixel lookup": ("a2b", colours[lookup(photos, labels, n, levels, k)]),
           "a2b 3x3 lookup": ("a2b", colours[lookup(box(photos), labels, n, levels, k)])}
    fit = photos[:n].astype(np.float64)
    mean = np.stack([fit[labels[:n] == c].mean(0) for c in range(k)])
    median = np.stack([np.median(fit[labels[:n] == c], 0) for c in range(k)])
    residual = fit - mean[labels[:n]]  # each fitted photo's texture, light and colour jitter
    other = np.random.default_rng(seed).permutation(n)[:len(truth_a)]
    out["b2a class mean"] = ("b2a", mean[labels[n:]])
    out["b2a class median"] = ("b2a", median[labels[n:]])
    out["b2a ideal sampler"] = ("b2a", mean[labels[n:]] + residual[other])
    # only the fine texture (the residual less its 5x5 mean): every scene in the average light
    out["b2a textured mean"] = ("b2a", mean[labels[n:]] + (residual - box(residual, 5))[other])
    truth = {"a2b": truth_b, "b2a": truth_a}
    return {name: (d, pixel_accuracy(np.clip(np.rint(p), 0, 255).astype(np.uint8), truth[d]))
            for name, (d, p) in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-pairs", type=int, default=2000, help="paired scenes; half fit the oracles, half score")
    ap.add_argument("--n-train", type=int, default=1000, help="unpaired images per domain for the baselines")
    ap.add_argument("--bin", type=int, default=8, help="levels per channel of the colour lookups' bins")
    ap.add_argument("--out", default="/tmp/unit-oracle")
    args = ap.parse_args(argv)
    data = corpus(Path(args.out), args.n_train, args.n_pairs, args.size)
    photos, maps = data["testA"], data["testB"]
    n = len(photos) // 2
    stats = {"a": DomainStats.empty().add(data["trainA"]), "b": DomainStats.empty().add(data["trainB"])}
    rows = [(f"baseline: {name}", d, pixel_accuracy(fn(src, d), truth))
            for name, fn in translators(stats).items()
            for d, src, truth in (("a2b", photos[n:], maps[n:]), ("b2a", maps[n:], photos[n:]))]
    rows += [(f"oracle (paired): {name}", d, acc) for name, (d, acc) in oracles(photos, maps, args.bin).items()]
    print(f"demo corpus, {args.size} px: oracles fitted on {n} paired scenes, all scored on the other {len(photos) - n}\n")
    print("| translator | direction | pixel acc |\n| --- | --- | --- |")
    for name, d, acc in rows:
        print(f"| {name} | {d} | {acc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
