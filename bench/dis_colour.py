"""Can the map discriminator see a colour that is a few levels off? A table, not a test.

Trains the demo model's map discriminator (D_b: 2 scales, 3 layers, width 16, N(0, 0.02) init,
LSGAN, Adam 2e-4) from scratch to tell real demo maps (32 px) from the same kind of maps
altered in one way a translator's output often is: 10 levels darker, blurred (3x3 binomial),
with the land painted white (the colour of minor roads), or with the buildings' and the major
roads' colours exchanged (what the 64 px translators do: only shape tells those apart). Prints
its LSGAN loss after 25 ... 300 (600, 1000) steps (chance: 1.0 over two scales; 0 is told apart
perfectly), without and with `model.dis_colour_octaves` (Fourier features of each pixel's colour
at its input).

    .venv/bin/python bench/dis_colour.py [--octaves 0,4,6] [--steps 300] [--lr 2e-4] [--size 32]
        [--kinds darker,blurred,white,swap] [--set dis_layers=4 ...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.unit import UNIT  # noqa: E402
from pipeline.demo import BUILDING, LAND as LAND_CLASS, MAJOR_ROAD, MAP_COLOURS  # noqa: E402
from pipeline.tensors import to_tensor  # noqa: E402
from recipe import DEMO_MODEL, corpus, tensor  # noqa: E402


def _colour(cls: int) -> torch.Tensor:
    """A map class's colour as a [1, 3, 1, 1] network input (pipeline.tensors' scale)."""
    return to_tensor(np.array(MAP_COLOURS[cls], np.uint8).reshape(1, 1, 3))


LAND, ROOF, ORANGE = _colour(LAND_CLASS), _colour(BUILDING), _colour(MAJOR_ROAD)
CHECKPOINTS = (25, 50, 100, 200, 300, 600, 1000)
KINDS = {"darker": "10 levels darker", "blurred": "blurred", "white": "land painted white",
         "swap": "buildings and major roads exchanged"}


def altered(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "10 levels darker":
        return x - 10 / 127.5
    if kind == "blurred":
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None]) / 16
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    if kind == "land painted white":
        land = (x - LAND).abs().sum(1, keepdim=True) < 1e-3
        return torch.where(land, torch.ones_like(x), x)
    if kind == "buildings and major roads exchanged":
        roof = (x - ROOF).abs().sum(1, keepdim=True) < 1e-3
        orange = (x - ORANGE).abs().sum(1, keepdim=True) < 1e-3
        return torch.where(roof, ORANGE, torch.where(orange, ROOF, x))
    raise ValueError(kind)


def run(maps: torch.Tensor, kind: str, octaves: int, steps: int, lr: float,
        model: dict | None = None) -> dict[int, float]:
    torch.manual_seed(0)
    size = maps.shape[-1]
    dis = UNIT.from_config({**DEMO_MODEL, **(model or {}), "image_size": size,
                            "dis_colour_octaves": octaves}).dis.dis_b
    opt = torch.optim.Adam(dis.parameters(), lr=lr, betas=(0.5, 0.999))
    rng, seen = np.random.default_rng(0), {}
    for step in range(1, steps + 1):
        real = maps[rng.integers(len(maps), size=8)]
        fake = altered(maps[rng.integers(len(maps), size=8)], kind)
        loss = sum(((p - 1) ** 2).mean() for p in dis(real)) + sum((p ** 2).mean() for p in dis(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CHECKPOINTS:
            seen[step] = float(loss.detach())
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--octaves", default="0,4,6", help="dis_colour_octaves values to compare")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--size", type=int, default=32, help="the demo corpus's image size")
    ap.add_argument("--kinds", default="darker,blurred,white,swap", help=f"alterations, of {sorted(KINDS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                    help="a discriminator setting of the model config, e.g. dis_layers=4 dis_dim=32")
    args = ap.parse_args(argv)
    try:
        model = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    except ValueError:
        ap.error(f"--set takes KEY=INT, got {args.set}")
    unknown = sorted(set(args.kinds.split(",")) - set(KINDS))
    if unknown:
        ap.error(f"--kinds: {unknown} not among {sorted(KINDS)}")
    kinds = [KINDS[k] for k in args.kinds.split(",")]
    torch.set_num_threads(1)
    maps = tensor(corpus(Path(tempfile.gettempdir()) / "unit-recipe", 1000, 100, args.size)["trainB"])
    marks = [s for s in CHECKPOINTS if s <= args.steps]
    print("| fakes | dis_colour_octaves | " + " | ".join(f"D loss at {s}" for s in marks) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in marks) + " |")
    t0 = time.perf_counter()
    for kind in kinds:
        for octaves in (int(o) for o in args.octaves.split(",")):
            seen = run(maps, kind, octaves, args.steps, args.lr, model)
            print(f"| {kind} | {octaves} | " + " | ".join(f"{seen[s]:.3f}" for s in marks) + " |", flush=True)
    print(f"\n(chance 1.0; {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
