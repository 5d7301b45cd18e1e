"""Is the a2b network the limit, or the unpaired objective? The demo recipe's own a2b path
(E_a, the shared layers, G_b with its palette head and skip), trained *with pairs* by L1 between
its translation and the true map, the way UNIT's reconstruction term is trained, in the same
steps, batch and learning rate as bench/recipe.py's unpaired run. Scored on the same 100
paired test scenes as bench/recipe.py (the training pairs are other scenes).

If the paired network scores far above the unpaired one (~0.62 at 1,200 steps), the network
and the step budget are not what holds a2b back; the unpaired objective is.

    .venv/bin/python bench/supervised.py [--steps 1200] [--every 300] [--lr 4e-4] [--batch 8]
        [--n-pairs 1000] [model.key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recipe import DEMO_MODEL, corpus, model_config, tensor, uint8  # recipe.py puts the project root on sys.path
from launch.release.baselines import DomainStats, translators
from launch.release.evaluate import pixel_accuracy
from model.ema import EMA
from model.unit import UNIT

RECIPE = {"skip": "image", "palette_b": "auto", "dis_colour_octaves": 4, "w_r1": 1.0}


@torch.no_grad()
def a2b_accuracy(gen, photos: np.ndarray, maps: np.ndarray) -> float:
    gen.eval()
    acc = pixel_accuracy(uint8(gen.translate(tensor(photos), "a2b")), maps)
    gen.train()
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--every", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--n-pairs", type=int, default=1000, help="paired training scenes (not the test ones)")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/unit-recipe")
    ap.add_argument("overrides", nargs="*", help="model.key=value on top of the demo recipe's model")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # test scene i is the same scene in every corpus of this seed: the first n_test pairs are
    # bench/recipe.py's test split, the next n_pairs train here
    data = corpus(Path(args.out), 10, args.n_test + args.n_pairs, args.size)
    test_a, test_b = data["testA"][:args.n_test], data["testB"][:args.n_test]
    train_a, train_b = tensor(data["testA"][args.n_test:]), tensor(data["testB"][args.n_test:])
    stats = {"a": DomainStats.empty().add(data["testA"][args.n_test:]),
             "b": DomainStats.empty().add(data["testB"][args.n_test:])}
    model = model_config({**DEMO_MODEL, **RECIPE}, args.overrides, stats)
    torch.manual_seed(args.seed)
    gen = UNIT.from_config({**model, "image_size": args.size}).gen
    opt = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.5, 0.999), weight_decay=1e-4)
    ema, shadow = EMA(gen, 0.995), copy.deepcopy(gen)
    rng, t0 = np.random.default_rng(args.seed), time.perf_counter()
    print(f"a2b fitted with {len(train_a)} pairs, model {model}, lr {args.lr}, batch {args.batch}", flush=True)
    for step in range(1, args.steps + 1):
        idx = rng.integers(len(train_a), size=args.batch)
        x, y = train_a[idx], train_b[idx]
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        # the latent noise UNIT trains with (gen.sample), as in its reconstruction term
        pred = gen.decode(gen.sample(gen.encode(x, "a")), "b", x)
        loss = (pred - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(gen)
        if step % args.every == 0 or step == args.steps:
            ema.copy_to(shadow)
            print(f"step {step} ({time.perf_counter() - t0:.0f} s): L1 {loss.item():.4f} | a2b raw "
                  f"{a2b_accuracy(gen, test_a, test_b):.3f} EMA {a2b_accuracy(shadow, test_a, test_b):.3f}", flush=True)
    const = translators(stats)["constant"](test_a, "a2b")
    print(f"constant a2b {pixel_accuracy(const, test_b):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
