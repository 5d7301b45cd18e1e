"""Train UNIT with two DeepSpeed engines on two shard streams, then release the translator.

    deepspeed [--num_gpus N | --hostfile H ...] launch/train.py --config configs/demo.yaml \
        [--deepspeed_config configs/ds/zero0.json] [--resume auto|never|CKPT] [key=value ...]

The config is validated before torch.distributed starts (a bad value never strands a rank);
every rank trains (launch/training/trainer.py); rank 0 then evaluates the export once beside the
trivial baselines and registers it (launch/release/finish.py).

Exit codes: 0 done (an end-of-run evaluation or registration failure is a warning naming the
command to run later), 2 bad config, 4 too many non-finite losses, 5 a checkpoint could not be
written, 6 a rank stalled (launch/training/watchdog.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.config import Config, ConfigError, check, load_config, load_ds_json  # noqa: E402
from pipeline.storage import redact_uncaught  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train UNIT with DeepSpeed on two shard streams.")
    ap.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                    help="DeepSpeed JSON added to what the YAML generates (overrides the YAML's deepspeed_config)")
    ap.add_argument("--resume", default=None, help="auto (default) | never | a checkpoint directory")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                    help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    return ap.parse_intermixed_args(argv)  # overrides on both sides of the flags


def resolve(args) -> tuple[Config, dict | None]:
    # The flags win over the overrides, and are taken as typed: paths, not YAML (see load_config).
    cfg = load_config(args.config, args.overrides,
                      flags={"resume": args.resume, "deepspeed_config": args.deepspeed_config})
    check(cfg, world=launched_world())
    return cfg, load_ds_json(cfg.deepspeed_config)


def launched_world() -> int | None:
    """The number of ranks, as the launcher (deepspeed, torchrun, infra/launch/mpi_rank.sh) told this
    rank in WORLD_SIZE; None when not launched by one (a DeepSpeed JSON's train_batch_size is then only
    checked to be a multiple of the per-rank batch)."""
    try:
        world = int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    return world if world >= 1 else None


def print_summary(s: dict) -> None:
    from launch.release.evaluate import format_table

    run_dir = s.get("run_dir", ".")
    lines = ["", f"trained {s['steps_run']} steps (now at step {s['step']}) in {s['seconds']:.0f} s; "
             f"{s['nonfinite_total']} step(s) skipped for non-finite losses.",
             *([f"  started from: {s['init_from']['init_from']}"
                + (f" (version {s['init_from']['version']})" if s['init_from'].get('version') else "")]
               if s.get("init_from") else []),
             f"  checkpoint:   {s['checkpoint']}",
             f"  sample grids: {run_dir}/samples/   metrics: {run_dir}/metrics.jsonl",
             f"  translator:   {s['export']}  (safetensors + JSON; launch.release.export.load_translator)"]
    if s.get("evaluation"):
        lines += ["", "paired test split, pixel accuracy (every channel within 16 of the truth), beside the "
                      "trivial baselines (* = strongest):", format_table(s["evaluation"])]
    if s.get("registry"):
        lines += registry_lines(s["registry"])
    if s.get("run_id"):
        lines.append(f"MLflow run: {s['run_id']}")
    print("\n".join(lines), flush=True)


def registry_lines(reg: dict) -> list[str]:
    from launch.release.registry import pull_lines

    uri, name, aliases = reg.get("tracking_uri", ""), reg.get("name"), reg.get("aliases", [])
    return ["", f"registered model {name} version {reg.get('version')} (aliases: {', '.join(aliases)}) in {uri}",
            f"champion gate: {'passed' if reg.get('promoted') else 'not passed'} ({reg.get('reason')})",
            "pull it:", *pull_lines(uri, name, aliases)]


def close_ranks() -> None:
    """Tear the process group down before exiting. Left to the interpreter's shutdown, a gloo group
    whose peer has already exited can abort this rank ("terminate called without an active
    exception", exit -6) instead of letting it return its own exit code: seen in about 1 of 5
    launches that end every rank with the same config error."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def evaluation_threads() -> int:
    """Give rank 0's release step every core this process may run on: the node's other ranks have
    left by then, and the training's per-rank thread count (train.threads) would leave them idle
    (the demo's evaluation, C2ST classifiers mostly: 21 s on one thread, 16 s on two)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    return cores


def main(argv=None) -> int:
    redact_uncaught()  # an error no branch below expects must not print a password either
    args = parse_args(argv)
    try:
        cfg, ds_json = resolve(args)  # before torch.distributed: a bad config never strands a rank
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    from launch.training.checkpoint import CheckpointWriteError
    from launch.training.ops import use_this_environment
    from launch.training.trainer import train

    use_this_environment()  # DeepSpeed's CPU op: the build `make setup` made, however this was launched

    try:
        summary = train(cfg, ds_json)
    except (ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 4
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 5
    finally:
        close_ranks()
    if summary["rank"] == 0:
        from launch.release.finish import finish_run

        evaluation_threads()
        summary.update(finish_run(cfg, summary["export"]))
        print_summary(summary)
    return 0


if __name__ == "__main__":
    from launch.shutdown import end

    end(main())
