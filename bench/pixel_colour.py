"""Is a pixel's colour enough to translate the demo corpus, with and without pairs?

Per-pixel translators (no spatial context) on the demo corpus, a2b pixel accuracy on the paired
test split, beside the trivial baselines of launch/release/baselines.py:

  unpaired   a small MLP on each pixel's colour (3 -> 64 -> 64 -> 3) trained only to make the
             colours of its translations match the map domain's training colours (sliced
             Wasserstein-1, bench/recipe.py's `swd`): what a colour-distribution term can teach
  paired     the same MLP fitted with L1 to the test pairs themselves: an upper bound for any
             per-pixel rule (it is scored on what it was fitted to)

    .venv/bin/python bench/pixel_colour.py [--size 32] [--n-train 1000] [--steps 1500]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recipe import corpus, swd, tensor, uint8  # recipe.py puts the project root on sys.path
from launch.release.baselines import DomainStats, translators
from launch.release.evaluate import pixel_accuracy


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N*H*W, 3, 1, 1] in [-1, 1]: each pixel a 1x1 image."""
    return tensor(images.reshape(-1, 1, 1, 3))


def mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 1),
                               torch.nn.ReLU(), torch.nn.Conv2d(64, 3, 1))


@torch.no_grad()
def translate(f, images: np.ndarray) -> np.ndarray:
    return uint8(f(pixels(images))).reshape(images.shape)


def fit(src: torch.Tensor, loss_fn, steps: int, batch: int, every: int, score) -> list[tuple[int, float]]:
    """Adam on a fresh MLP; loss_fn(f, source rows) per step; score(f) every `every` steps."""
    torch.manual_seed(0)
    f = mlp()
    opt = torch.optim.Adam(f.parameters(), lr=1e-3)
    seen = []
    for step in range(1, steps + 1):
        idx = torch.randint(len(src), (batch,))
        loss = loss_fn(f, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            seen.append((step, score(f)))
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8192, help="pixels per step")
    ap.add_argument("--proj", type=int, default=32, help="random directions of the sliced Wasserstein term")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "unit-recipe"),
                    help="where the corpus is made once (shared with bench/recipe.py)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    data = corpus(Path(args.out), args.n_train, args.n_test, args.size)
    test_a, test_b = data["testA"], data["testB"]
    stats = {"a": DomainStats.empty().add(data["trainA"]), "b": DomainStats.empty().add(data["trainB"])}
    rows = [(f"baseline: {name}", pixel_accuracy(fn(test_a, "a2b"), test_b), "-")
            for name, fn in translators(stats).items()]
    pa, pb, ta, tb = pixels(data["trainA"]), pixels(data["trainB"]), pixels(test_a), pixels(test_b)

    def score(f):
        return pixel_accuracy(translate(f, test_a), test_b)

    def unpaired(f, idx):
        return swd(f(pa[idx]), pb[torch.randint(len(pb), (len(idx),))], args.proj)

    def paired(f, idx):
        return (f(ta[idx]) - tb[idx]).abs().mean()

    every = max(1, args.steps // 3)
    for name, src, loss_fn in (("per-pixel MLP, unpaired (colour distributions matched)", pa, unpaired),
                               ("per-pixel MLP, fitted to the test pairs (upper bound)", ta, paired)):
        seen = fit(src, loss_fn, args.steps, args.batch, every, score)
        rows.append((name, seen[-1][1], ", ".join(f"{s}: {a:.3f}" for s, a in seen)))
    print(f"\nPer-pixel colour translators, demo corpus at {args.size} px ({args.n_train} unpaired training "
          f"images per domain, {args.n_test} test pairs), a2b pixel accuracy (every channel within 16)")
    print("| translator | a2b pixel accuracy | by step |\n| --- | --- | --- |")
    for name, acc, by_step in rows:
        print(f"| {name} | {acc:.3f} | {by_step} |")
    best = max(acc for name, acc, _ in rows if name.startswith("baseline"))
    print(f"\nSummary ({time.perf_counter() - t0:.0f} s): the strongest trivial baseline scores {best:.3f}; "
          f"colour alone, unpaired, scores {rows[-2][1]:.3f}; colour alone with pairs {rows[-1][1]:.3f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
