"""What each model option costs per step: the demo model (configs/demo.yaml) against copies with one
option changed, iterations interleaved in one process so load changes hit them alike.

One iteration is the trainer's (bench/step.py's step_ours: G step on frozen discriminators, D step on
the same fakes, R1 when due; fused Adam) on a batch of the demo corpus; the order of the variants rotates each round.
Prints ms per iteration (the median over blocks of 4 rounds of their mean: lazy R1 runs in one round
of 4) and its ratio to the demo config's in the same rounds.

    .venv/bin/python bench/options_cost.py [--rounds 36] [--batch 8] [--threads 1]
        [--variant NAME=key:value,key:value ...]   (default: the variants below)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from launch.release.baselines import DomainStats  # noqa: E402
from model.unit import UNIT  # noqa: E402
from recipe import corpus, model_config, tensor  # noqa: E402
from step import adam, step_ours  # noqa: E402

DEFAULT_VARIANTS = ("no back-translation, no hue prior=cycle_detach:false,w_hue:0", "R1 every step=r1_every:1",
                    "no R1=w_r1:0", "no colour octaves=dis_colour_octaves:0", "1 residual block=n_res:1")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, pairs = text.partition("=")
    if not pairs:
        raise SystemExit(f"--variant {text!r}: expected NAME=key:value[,key:value]")
    return name, {k: yaml.safe_load(v) for k, v in (p.split(":", 1) for p in pairs.split(","))}


def build(model: dict, size: int):
    torch.manual_seed(0)
    unit = UNIT.from_config({**model, "image_size": size})
    return unit, adam(unit.gen, fused=True), adam(unit.dis, fused=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--rounds", type=int, default=36)
    ap.add_argument("--warmup", type=int, default=4, help="first rounds left out (a multiple of 4 keeps R1's phase)")
    ap.add_argument("--batch", type=int, default=8, help="images per domain (the demo's per-rank batch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", action="append", default=[], help="NAME=key:value,...: model options changed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(Path(args.config).read_text())
    size = cfg["data"]["image_size"]
    data = corpus(Path("/tmp/unit-recipe"), 1000, 100, size)
    stats = {"a": DomainStats.empty().add(data["trainA"]), "b": DomainStats.empty().add(data["trainB"])}
    variants = {"the config": {}} | dict(parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS))
    runs = {name: build(model_config({**cfg["model"], **extra}, [], stats), size)
            for name, extra in variants.items()}
    a, b = tensor(data["trainA"]), tensor(data["trainB"])
    rng, times = np.random.default_rng(0), {name: [] for name in runs}
    for r in range(args.rounds):
        x_a, x_b = a[rng.integers(len(a), size=args.batch)], b[rng.integers(len(b), size=args.batch)]
        names = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
        for name in names:
            t0 = time.perf_counter()
            step_ours(*runs[name], x_a, x_b, step=r + 1)
            times[name].append(time.perf_counter() - t0)
    def per_iteration(ts: list[float]) -> float:
        # lazy R1 runs in every 4th round: the median of 4-round means counts its share exactly
        kept = ts[args.warmup:]
        blocks = [statistics.mean(kept[i:i + 4]) for i in range(0, len(kept) - 3, 4)]
        return statistics.median(blocks)

    base = per_iteration(times["the config"])
    print(f"\n{args.config}, {size} px, batch {args.batch} per domain, {args.threads} thread(s), "
          f"{args.rounds - args.warmup} interleaved rounds\n")
    print("| variant | ms / iteration | / the config |\n| --- | --- | --- |")
    for name, ts in times.items():
        med = per_iteration(ts)
        print(f"| {name} {variants[name] or ''} | {1000 * med:.1f} | {med / base:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
