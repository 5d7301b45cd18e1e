"""Training throughput on CPU ranks: 1 rank vs 2 ranks, per-rank batch fixed, 1 thread per rank.

    python bench/train.py [--size 64] [--batch 4] [--steps 40] [--repeats 3] [--preset tiny] [--cpu-efficiency]
                          [--zero 1 [0 2]] [--model-from configs/demo.yaml]

Runs the real `deepspeed launch/train.py` on a generated demo corpus, reads the trainer's own
metrics.jsonl (warm-up intervals dropped) and prints images/s per rank, the 2-rank weak-scaling
efficiency (per-rank throughput with 2 ranks / with 1 rank, the same per-rank batch) and the
share of step time spent waiting for data. Runs alternate 1 and 2 ranks so machine noise hits
both alike; the efficiency is the median over repeats of each repeat's own 2-rank / 1-rank ratio.
Goals (issue 16): efficiency >= 0.9, data wait < 2% of step time. On a machine shared with other
jobs the wall-clock efficiency mostly measures them; --cpu-efficiency adds the same ratio in CPU
seconds per image between a short and a long run of each case (start-up cancels out).
--zero 0 1 runs every case at each ZeRO stage (interleaved) and prints seconds per step beside the
images/s; --model-from takes the model section of a config (its palettes measured on the corpus),
e.g. the demo's model at its shape: --model-from configs/demo.yaml --size 32 --batch 8.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GOAL_EFFICIENCY = 0.9   # 2-rank per-rank throughput / 1-rank
GOAL_WAIT = 0.02        # share of step time waiting for the next batch
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, **kw)
    if r.returncode not in (0, 3):
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def one_run(work: Path, ranks: int, args, tag: str, steps: int | None = None, zero: int = 1) -> dict:
    run_dir = work / f"run-{tag}"
    cfg = {"run_dir": str(run_dir), "seed": 0,
           "data": {"shards": str(work / "shards"), "image_size": args.size, "batch_size": args.batch,
                    "num_workers": args.workers},
           "model": args.model,
           "train": {"max_steps": steps or args.steps, "log_every": args.log_every, "sample_every": 10 ** 6,
                     "ckpt_every": 10 ** 6, "threads": args.threads, "precision": args.precision, "zero_stage": zero},
           "tracking": {"enable": False}, "registry": {"enable": False}}
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0, c0 = time.perf_counter(), children_cpu_s()
    sh([DEEPSPEED, "--num_gpus", ranks, "launch/train.py", "--config", path], env=env, timeout=3600)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - c0  # CPU: launcher, ranks and loader workers
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = rows[args.warmup:] or rows  # the first intervals include worker start-up and allocator warm-up
    return {"img_s_rank": statistics.median(r["images_per_s_per_rank"] for r in rows),
            "s_step": statistics.median(2 * args.batch / r["images_per_s_per_rank"] for r in rows),
            "wait": statistics.median(r["data_wait_frac"] for r in rows), "wall": wall, "cpu": cpu,
            "load": os.getloadavg()[0]}  # 1-minute load average at the end: other jobs' share of the CPUs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="per-rank micro-batch (per domain)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="logged intervals dropped at the start")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="loader workers per rank")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                    help="train.precision (bf16 needs a GPU that has it)")
    ap.add_argument("--images", type=int, default=600, help="demo images per domain")
    ap.add_argument("--zero", type=int, nargs="+", default=[1], choices=[0, 1, 2],
                    help="ZeRO stages (train.zero_stage): every case at each, interleaved")
    ap.add_argument("--model-from", default=None,
                    help="a config YAML whose model section is trained (default: --preset's model)")
    ap.add_argument("--cpu-efficiency", action="store_true",
                    help="also run each case with a quarter of the steps: the CPU seconds per image in the "
                         "steps between (start-up cancels out) give an efficiency other jobs hardly move")
    args = ap.parse_args(argv)
    # The model section every run trains, read once.
    args.model = yaml.safe_load(Path(args.model_from).read_text())["model"] if args.model_from else {"preset": args.preset}
    return args


def run_cases(args) -> dict[tuple[int, int], list[dict]]:
    """(ZeRO stage, ranks) -> each run's figures: 1 and 2 ranks at each stage, alternating,
    `args.repeats` times, on one generated corpus."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        sh([PY, "-m", "pipeline.demo", "--out", work / "demo", "--n-train", args.images, "--n-test", 4,
            "--size", args.size])
        sh([PY, "-m", "pipeline.shards", "--src-a", work / "demo" / "trainA", "--src-b", work / "demo" / "trainB",
            "--out", work / "shards", "--workers", 1, "--max-per-shard", 100, "--no-progress"])
        results = {(z, k): [] for z in args.zero for k in (1, 2)}
        for rep in range(args.repeats):
            for zero, ranks in results:
                tag = f"z{zero}-{ranks}r{rep}"
                r = one_run(work, ranks, args, tag, zero=zero)
                if args.cpu_efficiency:
                    short = max(1, args.steps // 4)
                    r["cpu_per_img"] = ((r["cpu"] - one_run(work, ranks, args, tag + "s", short, zero=zero)["cpu"])
                                        / ((args.steps - short) * 2 * args.batch * ranks))
                results[zero, ranks].append(r)
                print(f"repeat {rep + 1}/{args.repeats}, ZeRO {zero}, {ranks} rank(s): {r['img_s_rank']:.1f} img/s "
                      f"per rank, {r['s_step']:.3f} s/step, data wait {100 * r['wait']:.1f}%, {r['wall']:.0f} s wall, "
                      f"load average {r['load']:.1f}", flush=True)
    return results


def print_tables(args, results: dict[tuple[int, int], list[dict]]) -> None:
    load = os.getloadavg()[0]
    model = f"the model of {args.model_from}" if args.model_from else f"preset {args.preset}"
    print()
    print(f"UNIT training throughput, {model}, {args.size}x{args.size}, batch {args.batch} per rank "
          f"per domain, {args.threads} thread(s) per rank, {args.precision}, {args.workers} loader worker(s) per rank, CPU; "
          f"median of {args.repeats}; load average {load:.1f} on {os.cpu_count()} CPUs")
    print("| ZeRO | ranks | images/s per rank | images/s total | s/step | data wait (share of step time) | scaling efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    stages = {zero: {k: results[zero, k] for k in (1, 2)} for zero in args.zero}
    effs, waits = {}, []
    for zero, runs in stages.items():
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("img_s_rank", "s_step", "wait")}
               for k, v in runs.items()}
        effs[zero] = [two["img_s_rank"] / one["img_s_rank"] for one, two in zip(runs[1], runs[2])]
        waits += [m["wait"] for m in med.values()]
        for k in (1, 2):
            e = "1.00" if k == 1 else f"{statistics.median(effs[zero]):.2f}"
            print(f"| {zero} | {k} | {med[k]['img_s_rank']:.1f} | {med[k]['img_s_rank'] * k:.1f} | "
                  f"{med[k]['s_step']:.3f} | {100 * med[k]['wait']:.1f}% | {e} |")
    print("\n| figure | value | goal |\n| --- | --- | --- |")
    for zero, e in effs.items():
        eff = statistics.median(e)
        print(f"| 2-rank weak-scaling efficiency at ZeRO {zero} (median of {args.repeats} paired repeats: "
              f"{', '.join(f'{x:.2f}' for x in e)}) | {eff:.2f} | >= {GOAL_EFFICIENCY} "
              f"({'met' if eff >= GOAL_EFFICIENCY else 'MISSED'}) |")
    wait = max(waits)
    print(f"| data wait, largest of the cases | {100 * wait:.1f}% | < {100 * GOAL_WAIT:.0f}% "
          f"({'met' if wait < GOAL_WAIT else 'MISSED'}) |")
    if args.cpu_efficiency:
        for zero, runs in stages.items():
            cpu_effs = [one["cpu_per_img"] / two["cpu_per_img"] for one, two in zip(runs[1], runs[2])]
            cpu_ms = {k: 1e3 * statistics.median(r["cpu_per_img"] for r in v) for k, v in runs.items()}
            print(f"| ZeRO {zero}: CPU ms per image, 1 rank / 2 ranks (steady state, loader workers included) | "
                  f"{cpu_ms[1]:.1f} / {cpu_ms[2]:.1f} | - |")
            print(f"| ZeRO {zero}: 2-rank efficiency in CPU time (median of paired repeats: "
                  f"{', '.join(f'{e:.2f}' for e in cpu_effs)}) | {statistics.median(cpu_effs):.2f} | "
                  f">= {GOAL_EFFICIENCY} on a machine with a CPU per busy process |")
    print(f"\n2 ranks run {2 * (args.threads + args.workers)} busy processes ({args.threads} torch thread(s) + "
          f"{args.workers} loader worker(s) each) on {os.cpu_count()} CPUs; 1 rank leaves a CPU to spare. Other jobs "
          f"(the load averages above) take their share from the 2-rank runs first, so on a shared machine the "
          f"efficiency measures the machine as much as the trainer.")


def main(argv=None) -> int:
    args = parse_args(argv)
    print_tables(args, run_cases(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
