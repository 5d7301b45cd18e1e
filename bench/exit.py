"""What a process pays to exit, plain `sys.exit` against `launch.shutdown.end` (the heap frozen so
the interpreter's last garbage collection skips it), in children interleaved round by round.

Each child imports what a training rank imports (torch, DeepSpeed, MLflow, the trainer, the
release code), optionally trains a UNIT generator for a few steps so its heap looks like
a rank's after training, prints the time, and exits one way or the other; the parent takes the
time its wait returns. Prints the median exit time of each way, and the ratio.

    .venv/bin/python bench/exit.py [--rounds 5] [--steps 0|N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
import torch, deepspeed, mlflow
import launch.training.trainer, launch.release.finish
from model.unit import UNIT
steps = {steps}
if steps:
    unit = UNIT.from_config({{"image_size": 32}})
    opt = torch.optim.Adam(unit.parameters(), lr=1e-4)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    for _ in range(steps):
        loss = sum(v.float().mean() for v in unit.gen(x, x).values() if v.requires_grad)
        opt.zero_grad()
        loss.backward()
        opt.step()
print(time.time(), flush=True)
if {frozen}:
    from launch.shutdown import end
    end(0)
sys.exit(0)
"""


def exit_seconds(frozen: bool, steps: int) -> float:
    code = CHILD.format(root=str(ROOT), steps=steps, frozen=frozen)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    out, _ = proc.communicate(timeout=600)
    done = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"the child exited {proc.returncode}: {out[-2000:]}")
    return done - float(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="training steps of a UNIT generator before exiting")
    args = ap.parse_args(argv)
    times = {False: [], True: []}
    for r in range(args.rounds):
        for frozen in ((False, True) if r % 2 == 0 else (True, False)):  # alternate who goes first
            times[frozen].append(exit_seconds(frozen, args.steps))
    plain, frozen = statistics.median(times[False]), statistics.median(times[True])
    print(f"exit time of a child with a rank's imports, {args.steps} training steps, median of {args.rounds} rounds\n")
    print("| exit | median s | all rounds (s) |")
    print("| --- | --- | --- |")
    for name, key in (("sys.exit", False), ("launch.shutdown.end", True)):
        print(f"| {name} | {statistics.median(times[key]):.3f} | {', '.join(f'{t:.2f}' for t in times[key])} |")
    print(f"\nlaunch.shutdown.end exits in {frozen / plain:.2f}x the time of sys.exit ({plain - frozen:.2f} s less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
