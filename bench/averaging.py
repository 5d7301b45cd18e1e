"""Is the exported EMA the best average of a run's generator weights? Scores it beside each late
raw checkpoint and beside averages of the raw checkpoints (uniform from a step on, or weighted
by a power of the step), all on the paired test split.

Needs a run with dense checkpoints, e.g. the demo with one every 50 steps:

    make train CONFIG=configs/demo.yaml ARGS="run_dir=runs/dense0 train.ckpt_every=50 train.keep_ckpts=30"
    .venv/bin/python bench/averaging.py --run runs/dense0 [--test-a data/demo/testA --test-b data/demo/testB]

The raw weights are the G engine's module states of each checkpoint (ZeRO 1 and 2 save them
whole), loaded with weights_only=True.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.release.evaluate import load_folder, pixel_accuracy  # noqa: E402
from launch.release.export import load_translator, translate_uint8  # noqa: E402
from launch.training.checkpoint import complete_checkpoints, load_ema, step_of  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run dir with export/ and ckpt/step-*/")
    ap.add_argument("--test-a", default="data/demo/testA")
    ap.add_argument("--test-b", default="data/demo/testB")
    ap.add_argument("--raw", type=int, default=4, help="late raw checkpoints scored one by one")
    ap.add_argument("--ema", type=int, default=0,
                    help="late checkpoints whose EMA is scored one by one: the learning curve of what the "
                         "export would be, had the run stopped there (the EMA's warm-up and a constant lr "
                         "do not depend on train.max_steps)")
    ap.add_argument("--from-steps", type=int, nargs="*", default=[400, 600, 800, 1000],
                    help="uniform averages of the checkpoints from these steps on")
    ap.add_argument("--powers", type=float, nargs="*", default=[1, 2, 4, 9],
                    help="averages weighting each checkpoint by step ** power")
    return ap.parse_args(argv)


def raw_weights(ckpt: Path) -> dict:
    # DeepSpeed's public deepspeed.utils.zero_to_fp32 reads the same weights, but unpickles
    # whole Python objects to do it; this project loads tensors only (weights_only=True below)
    return torch.load(ckpt / "G" / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")["module"]


def ema_weights(ckpt: Path) -> dict:
    return load_ema(ckpt / "ema.safetensors")["shadow"]


def weighted(snaps: dict[int, dict], weights: dict[int, float]) -> dict:
    """sum_s w_s * snaps[s] / sum_s w_s over the float tensors; other tensors from the last snapshot."""
    last = snaps[max(snaps)]
    total = sum(weights.values())
    return {k: (sum(w * snaps[s][k].float() for s, w in weights.items()) / total).to(v.dtype)
            if v.is_floating_point() else v for k, v in last.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    gen, meta = load_translator(run / "export")
    size = int(meta["image_size"]) if "image_size" in meta else None
    _, xa = load_folder(args.test_a, size)
    _, xb = load_folder(args.test_b, size)

    def score(state: dict | None) -> str:
        if state is not None:
            gen.load_state_dict(state)
        a2b = pixel_accuracy(translate_uint8(gen, xa, "a2b"), xb)
        b2a = pixel_accuracy(translate_uint8(gen, xb, "b2a"), xa)
        return f"| {a2b:.4f} | {b2a:.4f} |"

    rows = [f"| the export ({'EMA' if meta.get('ema') else 'raw'} weights) {score(None)}"]
    ckpts = complete_checkpoints(run)
    snaps = {step_of(c): raw_weights(c) for c in ckpts}
    if not snaps:
        raise SystemExit(f"{run / 'ckpt'}: no complete checkpoints")
    steps = sorted(snaps)
    rows += [f"| raw, step {s} {score(snaps[s])}" for s in (steps[-args.raw:] if args.raw else [])]
    ema_ckpts = [c for c in ckpts if (c / "ema.safetensors").is_file()]
    for c in ema_ckpts[-args.ema:] if args.ema else []:
        rows.append(f"| EMA, step {step_of(c)} {score({**snaps[step_of(c)], **ema_weights(c)})}")
    for start in args.from_steps:
        picked = {s: 1.0 for s in steps if s >= start}
        if picked:
            rows.append(f"| uniform from step {start} ({len(picked)} checkpoints) {score(weighted(snaps, picked))}")
    for power in args.powers:
        rows.append(f"| weighted by step^{power:g} {score(weighted(snaps, {s: float(s) ** power for s in steps}))}")
    print(f"{run}: {len(steps)} checkpoints, steps {steps[0]}-{steps[-1]}; paired test pixel accuracy\n")
    print("| generator weights | a2b | b2a |\n| --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
