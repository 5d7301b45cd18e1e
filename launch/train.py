"""UNIT on two shard streams with two DeepSpeed engines.

    deepspeed [--num_gpus N | --hostfile H ...] launch/train.py --config configs/demo.yaml \
        [--deepspeed_config configs/ds/zero1.json] [key=value ...]

One iteration, in the only pattern that is exact at ZeRO 0-2 (see shared notes):
  1. generator step: one full pass of the generator side through its engine; the
     discriminators are frozen and called as plain modules; engG.backward; engG.step.
  2. discriminator step: the same iteration's translations, detached; one engD.backward
     of the whole discriminator loss; engD.step.
Each encoder and generator runs once per iteration.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.config import Config, ConfigError, check, deepspeed_config, load_config, load_ds_json, config_hash, \
    resume_point


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train UNIT with DeepSpeed on two shard streams.")
    ap.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                    help="DeepSpeed JSON: ZeRO stage, accumulation, clipping (overrides the YAML's deepspeed_config)")
    ap.add_argument("--resume", default=None, help="auto (default) | never | a checkpoint directory")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                    help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    return ap.parse_args(argv)


def resolve(args) -> tuple[Config, dict | None]:
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    if args.deepspeed_config is not None:
        overrides.append(f"deepspeed_config={args.deepspeed_config}")
    cfg = load_config(args.config, overrides)
    check(cfg)
    return cfg, load_ds_json(cfg.deepspeed_config)


# ---------------------------------------------------------------- small pieces

def seed_all(seed: int, rank: int) -> None:
    import random

    import numpy as np
    import torch
    s = (seed * 1_000_003 + rank * 7919) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def fault_nan_steps() -> set[int]:
    """Fault injection for tests: UNIT_FAULT_NAN_STEPS="3,4" makes those steps' losses NaN."""
    raw = os.environ.get("UNIT_FAULT_NAN_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


class MetricsLog:
    """metrics.jsonl in the run directory (rank 0): one JSON object per logged step."""

    def __init__(self, path: Path, enable: bool):
        self.path, self.enable = path, enable

    def write(self, record: dict) -> None:
        if self.enable:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_grid(path: Path, rows: list, scale: int = 1) -> None:
    """rows: list of lists of [3,H,W] tensors in [-1,1]; written as one PNG (atomically)."""
    import numpy as np
    from PIL import Image
    row_imgs = []
    for row in rows:
        arrs = [((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
                for t in row]
        pad = np.full((arrs[0].shape[0], 2, 3), 255, np.uint8)
        row_imgs.append(np.concatenate(sum(([a, pad] for a in arrs), [])[:-1], axis=1))
    hpad = np.full((2, row_imgs[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate(sum(([r, hpad] for r in row_imgs), [])[:-1], axis=0)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def sample_rows(gen, x_a, x_b) -> list:
    """Per held-out image: input | reconstruction | translation | cycle, for a then b."""
    import torch
    was_training = gen.training
    gen.eval()
    with torch.no_grad():
        out = gen(x_a, x_b)
    gen.train(was_training)
    rows = []
    for i in range(x_a.shape[0]):
        rows.append([x_a[i], out["x_aa"][i], out["x_ab"][i], out["x_aba"][i]])
    for i in range(x_b.shape[0]):
        rows.append([x_b[i], out["x_bb"][i], out["x_ba"][i], out["x_bab"][i]])
    return rows


def held_out_batch(cfg: Config, shards_a, shards_b):
    """A fixed set of images for the sample grids: the paired test split when given, else a side stream."""
    import torch
    n = cfg.train.sample_count
    if cfg.data.test_a and cfg.data.test_b:
        from launch.evaluate import load_folder
        from launch.export import to_tensor
        _, a = load_folder(cfg.data.test_a, cfg.data.image_size)
        _, b = load_folder(cfg.data.test_b, cfg.data.image_size)
        return to_tensor(a[:n]), to_tensor(b[:n])
    from pipeline.loader import UnpairedLoader
    side = UnpairedLoader(shards_a, shards_b, batch_size=n, image_size=cfg.data.image_size,
                          seed=cfg.seed + 1_000_003, num_workers=0, augment={"train": False}, rank=0, world_size=1)
    batch = next(iter(side))
    if hasattr(side, "close"):
        side.close()
    return batch["a"].to(torch.float32), batch["b"].to(torch.float32)


def shard_sources(cfg: Config):
    if cfg.data.shards_a is not None:
        return cfg.data.shards_a, cfg.data.shards_b
    return cfg.data.shards, cfg.data.shards


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------- the run

def train(cfg: Config, ds_json: dict | None) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from launch import checkpoint as ckpt
    from launch.engines import build_engines, gan_step, mean_across_ranks
    from launch.export import save_translator
    from launch.tracking import Tracker, TrackingConfig
    from launch.watchdog import StallWatchdog
    from model.ema import EMA
    from model.unit import UNIT
    from pipeline.loader import UnpairedLoader

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    import logging
    import warnings
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)  # engine set-up prints pages of INFO per engine and rank
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    if on_gpu:
        accel.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(accel.current_device_name())
    bf16_ok = on_gpu and accel.is_bf16_supported()
    run_dir = Path(cfg.run_dir)
    is_main = rank == 0
    say = (lambda *a, **k: print(*a, **k, flush=True)) if is_main else (lambda *a, **k: None)

    # Every rank decides where to resume from (and whether the run directory may be used) before
    # rank 0 claims it: the barrier keeps a slow rank from seeing the marker of this very launch.
    resume_from = resume_point(cfg)
    dist.barrier()
    uid = [None]
    if is_main:
        uid[0] = ckpt.claim_run_dir(run_dir)["run_uid"]
        import yaml
        ckpt.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    dist.broadcast_object_list(uid, src=0)  # the run's identity, written into every checkpoint
    run_uid = uid[0]

    # Same initial weights on every rank (DeepSpeed broadcasts rank 0's parameters, not buffers),
    # then a noise stream of its own per rank.
    seed_all(cfg.seed, 0)
    # The discriminators build only the scales this image size uses.
    unit = UNIT.from_config({"image_size": cfg.data.image_size, **cfg.model})
    ucfg = unit.cfg
    ds_g = deepspeed_config(cfg, ds_json, lr=cfg.optim.lr_g, on_gpu=on_gpu, bf16_ok=bf16_ok)
    ds_d = deepspeed_config(cfg, ds_json, lr=cfg.optim.lr_d, on_gpu=on_gpu, bf16_ok=bf16_ok)
    eng_g, eng_d = build_engines(unit, ds_g, ds_d)
    seed_all(cfg.seed, rank)
    gen, dis = eng_g.module, eng_d.module
    dtype = torch.bfloat16 if ds_g["bf16"]["enabled"] else torch.float32
    accum = eng_g.gradient_accumulation_steps()
    ema = EMA(gen, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

    shards_a, shards_b = shard_sources(cfg)
    aug = cfg.data.augment.model_dump()
    loader = UnpairedLoader(shards_a, shards_b, batch_size=cfg.data.batch_size, image_size=cfg.data.image_size,
                            seed=cfg.seed, num_workers=cfg.data.num_workers, augment=aug, rank=rank,
                            world_size=world, verify_shards=cfg.data.verify_shards, cache_dir=cfg.data.cache_dir)

    step, run_id, nonfinite_total, rng_to_restore = 0, None, 0, None
    if resume_from is not None:
        meta, rank_state, ema_state = ckpt.load(resume_from, eng_g, eng_d, rank=rank)
        step, run_id = int(meta["step"]), meta.get("run_id")
        nonfinite_total = int(meta.get("nonfinite_total", 0))
        if rank_state is not None and int(meta.get("world_size", world)) == world:
            loader.load_state_dict(rank_state["loader"])
            rng_to_restore = rank_state["rng"]
        else:
            # Another world size: every rank continues at the checkpoint's position in its new stream
            # (documented in pipeline/loader.py), and its RNG is reseeded from (seed, rank, step).
            loader.load_state_dict(json.loads((resume_from / "rank-00000.json").read_text())["loader"])
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        say(f"resumed from {resume_from} at step {step}")

    tracker = Tracker(TrackingConfig(enable=cfg.tracking.enable and is_main, tracking_uri=cfg.tracking.uri,
                                     experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                                     log_system_metrics=cfg.tracking.system_metrics))
    if is_main:
        run_id = tracker.start(run_dir, run_id=run_id)
        if step == 0:
            tracker.log_params({"config": cfg.model_dump(mode="json"), "deepspeed": ds_g, "world_size": world,
                                "git_commit": git_commit(), "config_hash": config_hash(cfg),
                                "model_params_gen": sum(p.numel() for p in gen.parameters()),
                                "model_params_dis": sum(p.numel() for p in dis.parameters())})
            if cfg.data.shards_a is None:
                tracker.log_datasets(cfg.data.shards)
        sample_a, sample_b = held_out_batch(cfg, shards_a, shards_b)
        sample_a, sample_b = sample_a.to(device, dtype), sample_b.to(device, dtype)

    metrics = MetricsLog(run_dir / "metrics.jsonl", is_main)
    nan_steps = fault_nan_steps()
    it = iter(loader)
    t0 = time.perf_counter()
    pending = next(it)  # the loader starts its workers here, drawing their base seed from the global RNG
    first_wait = time.perf_counter() - t0
    # Set the RNG last: start-up work above (worker seeds, the held-out batch) draws from it.
    if rng_to_restore is not None:
        ckpt.set_rng_state(rng_to_restore)
    elif step > 0:
        seed_all(cfg.seed + step, rank)  # resumed at another world size: a fresh stream per (seed, rank, step)
    start_step, nonfinite_run = step, 0
    t_start = time.perf_counter()
    t_last, wait_acc, imgs_acc = t_start, first_wait, 0
    say(f"training {cfg.train.max_steps - step} steps on {world} rank(s) ({accel.device_name()}, "
        f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}, ZeRO {ds_g.get('zero_optimization', {}).get('stage', 0)}), "
        f"batch {cfg.data.batch_size}x{world}x{accum}, run dir {run_dir}")

    def checkpoint_now(at: int) -> Path:
        rank_state = {"step": at, "loader": loader.state_dict(), "rng": ckpt.rng_state(), "world_size": world}
        # The tracker's id, not start()'s: with the server down at start the run is created later.
        meta = {"step": at, "config": cfg.model_dump(mode="json"), "config_hash": config_hash(cfg),
                "run_uid": run_uid,
                "run_id": (tracker.run_id or run_id) if is_main else run_id, "world_size": world, "nonfinite_total": nonfinite_total}
        try:
            return ckpt.save(run_dir, at, eng_g, eng_d, rank=rank, rank_state=rank_state, meta=meta,
                             ema_state=ema.state_dict() if ema is not None else None, keep=cfg.train.keep_ckpts)
        except Exception as e:  # a full disk surfaces from torch.save as a bare RuntimeError
            raise ckpt.CheckpointWriteError(ckpt.write_failure(run_dir, at, e)) from e

    # From the first step on (start-up, with its JIT builds and rendezvous, is not watched) to the
    # final checkpoint; rank 0's evaluation and registration afterwards are not steps.
    watchdog = StallWatchdog(cfg.train.stall_timeout_s, rank)
    watchdog.start()
    while step < cfg.train.max_steps:
        result = None
        for _ in range(accum):
            t0 = time.perf_counter()
            batch, pending = (pending, None) if pending is not None else (next(it), None)
            wait_acc += time.perf_counter() - t0
            x_a = batch["a"].to(device, dtype, non_blocking=True)
            x_b = batch["b"].to(device, dtype, non_blocking=True)
            result = gan_step(eng_g, eng_d, x_a, x_b, ucfg, device, poison=step + 1 in nan_steps)
            if result is None:
                break
            imgs_acc += x_a.shape[0] + x_b.shape[0]
        skipped = result is None
        step += 1
        watchdog.beat(step)
        if skipped:
            nonfinite_total += 1
            nonfinite_run += 1
            say(f"step {step}: non-finite loss on some rank, step skipped on all ranks "
                f"({nonfinite_run} in a row, {nonfinite_total} in total)")
            if nonfinite_run >= cfg.train.max_nonfinite:
                raise FloatingPointError(f"{nonfinite_run} consecutive steps had a NaN/inf loss (last at step "
                                         f"{step}); stopping. Lower optim.lr_g/lr_d or check the data.")
            continue
        nonfinite_run = 0
        if ema is not None:
            ema.update(gen)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            means = mean_across_ranks({**{f"g/{k}": v for k, v in result.terms_g.items()},
                                       **{f"d/{k}": v for k, v in result.terms_d.items()},
                                       "g/total": result.loss_g, "d/total": result.loss_d}, device)
            now = time.perf_counter()
            dt = now - t_last
            record = {"step": step, **means, "lr_g": eng_g.get_lr()[0], "lr_d": eng_d.get_lr()[0],
                      "images_per_s": imgs_acc * world / dt, "images_per_s_per_rank": imgs_acc / dt,
                      "data_wait_s": wait_acc, "data_wait_frac": wait_acc / dt, "nonfinite_total": nonfinite_total,
                      "elapsed_s": now - t_start}
            for k, v in getattr(loader, "stats", {}).items():
                if isinstance(v, (int, float)):
                    record[f"loader/{k}"] = v
                elif isinstance(v, dict):
                    record.update({f"loader/{k}/{r}": n for r, n in v.items() if isinstance(n, (int, float))})
            metrics.write(record)
            if is_main:
                tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step)
                eta = (now - t_start) / max(1, step - start_step) * (cfg.train.max_steps - step)
                say(f"step {step}/{cfg.train.max_steps} | G {means['g/total']:.3f} D {means['d/total']:.3f} | "
                    f"recon {means.get('g/recon_a', float('nan')):.3f}/{means.get('g/recon_b', float('nan')):.3f} "
                    f"cyc {means.get('g/cyc_a', float('nan')):.3f}/{means.get('g/cyc_b', float('nan')):.3f} | "
                    f"{record['images_per_s']:.1f} img/s | data wait {100 * record['data_wait_frac']:.1f}% | "
                    f"eta {fmt_eta(eta)}")
            t_last, wait_acc, imgs_acc = now, 0.0, 0

        if is_main and (step % cfg.train.sample_every == 0 or step == cfg.train.max_steps):
            path = run_dir / "samples" / f"step-{step:08d}.png"
            with ema_weights(ema, gen):
                save_grid(path, sample_rows(gen, sample_a, sample_b), scale=2 if cfg.data.image_size <= 64 else 1)
            tracker.log_image(path, step)
        if step % cfg.train.ckpt_every == 0 and step < cfg.train.max_steps:
            checkpoint_now(step)
            watchdog.beat(step)

    final = checkpoint_now(step)
    watchdog.stop()
    summary = {"step": step, "steps_run": step - start_step, "seconds": time.perf_counter() - t_start,
               "checkpoint": str(final), "nonfinite_total": nonfinite_total,
               "run_id": (tracker.run_id or run_id) if is_main else run_id, "run_dir": str(run_dir)}
    if is_main:
        export_dir = run_dir / "export"
        with ema_weights(ema, gen):
            save_translator(export_dir, gen, unit.config(), image_size=cfg.data.image_size, step=step,
                            ema=ema is not None, domains={"a": "A", "b": "B"})
        summary["export"] = str(export_dir)
        summary.update(finish_run(cfg, run_dir, tracker, export_dir))
        tracker.end()
    if hasattr(loader, "close"):
        loader.close()
    dist.barrier()
    return summary


@contextlib.contextmanager
def ema_weights(ema, module):
    """Temporarily swap the EMA weights into `module` (no-op when EMA is off)."""
    if ema is None:
        yield module
        return
    backup = copy.deepcopy(module.state_dict())
    ema.copy_to(module)
    try:
        yield module
    finally:
        module.load_state_dict(backup)


def eval_options(cfg: Config, stats) -> "EvalOptions":
    from launch.evaluate import EvalOptions
    features = None
    if cfg.eval.fid_features:
        from launch.fid import load_extractor
        features = load_extractor(cfg.eval.fid_features)
    return EvalOptions(baselines=stats, c2st_steps=cfg.eval.c2st_steps, features=features)


def finish_run(cfg: Config, run_dir: Path, tracker, export_dir: Path) -> dict:
    """Rank 0 after training: estimate the baselines from the training shards (saved with the export),
    evaluate once on the paired test split, then register the translator with that evaluation."""
    from launch import baselines
    out: dict = {}
    shards_a, shards_b = shard_sources(cfg)
    stats = baselines.stats_from_shards(shards_a, shards_b, image_size=cfg.data.image_size,
                                        max_images=cfg.eval.baseline_images, seed=cfg.seed)
    baselines.save(export_dir / baselines.FILE_NAME, stats)
    res = None
    if cfg.data.test_a and cfg.data.test_b:
        from launch.evaluate import evaluate_export, flat_metrics
        res = evaluate_export(export_dir, test_a=cfg.data.test_a, truth_b=cfg.data.test_b,
                              test_b=cfg.data.test_b, truth_a=cfg.data.test_a, size=cfg.data.image_size,
                              opts=eval_options(cfg, stats))
        out["evaluation"] = res
        tracker.log_metrics(flat_metrics(res), None)
    if cfg.registry.enable and cfg.tracking.enable:
        tracker.flush()
        from launch.registry import register_run
        try:
            out["registry"] = register_run(run_dir, name=cfg.registry.name, test_a=cfg.data.test_a,
                                           truth_b=cfg.data.test_b, test_b=cfg.data.test_b,
                                           truth_a=cfg.data.test_a, min_accuracy=cfg.registry.min_accuracy,
                                           image_size=cfg.data.image_size, evaluation=res)
        except Exception as e:  # the weights are exported; registering again is one command
            print(f"warning: registering the model failed ({type(e).__name__}: {e}); retry with "
                  f"`python -m launch.register --run-dir {run_dir}`", flush=True)
    return out


def git_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_summary(s: dict) -> None:
    run_dir = s.get("run_dir", ".")
    lines = ["", f"trained {s['steps_run']} steps (now at step {s['step']}) in {s['seconds']:.0f} s; "
             f"{s['nonfinite_total']} step(s) skipped for non-finite losses.",
             f"  checkpoint:   {s['checkpoint']}",
             f"  sample grids: {run_dir}/samples/   metrics: {run_dir}/metrics.jsonl"]
    if "export" in s:
        lines.append(f"  translator:   {s['export']}  (safetensors + JSON; launch.export.load_translator)")
    ev = s.get("evaluation")
    if ev:
        from launch.evaluate import format_table
        lines += ["", "paired test split, pixel accuracy (every channel within 16 of the truth), beside the "
                      "trivial baselines (* = strongest):", format_table(ev)]
    reg = s.get("registry")
    if reg:
        uri = reg.get("tracking_uri", "")
        alias = "champion" if "champion" in reg.get("aliases", []) else "candidate"
        lines += ["", f"registered model {reg.get('name')} version {reg.get('version')} "
                      f"(aliases: {', '.join(reg.get('aliases', []))}) in {uri}",
                  f"champion gate: {'passed' if reg.get('promoted') else 'not passed'} ({reg.get('reason')})",
                  "pull it:",
                  f"  MLFLOW_TRACKING_URI={uri} python -c \"import mlflow; "
                  f"m = mlflow.pyfunc.load_model('models:/{reg.get('name')}@{alias}'); "
                  f"print(m.predict(images_uint8_nhwc, params={{'direction': 'a2b'}}))\"",
                  f"  MLFLOW_TRACKING_URI={uri} python -m launch.translate --model models:/{reg.get('name')}@{alias} "
                  f"--direction a2b --in DIR --out DIR"]
    if s.get("run_id"):
        lines.append(f"MLflow run: {s['run_id']}")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, ds_json = resolve(args)  # before torch.distributed: a bad config never strands a rank
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        summary = train(cfg, ds_json)
    except (ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 4
    except RuntimeError as e:
        from launch.checkpoint import CheckpointWriteError
        if not isinstance(e, CheckpointWriteError):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 5
    if int(os.environ.get("RANK", 0)) == 0:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
