"""The trainer: `build` the parts, `train_step` once, `run` to the end.

    trainer = build(cfg, ds_json)     # ranks, run directory, model, two engines, EMA, loader, tracker
    summary = run(trainer)            # the loop, checkpoints, the final export; every rank
    # one step alone (tests): train_step(trainer, next_batch, meter) -> StepResult | None

One iteration, in the only pattern that is exact at ZeRO 0-2 (shared notes, launch/training/engines.py):
  1. generator loss: one full pass of the generator side through its engine; the discriminators
     are frozen and called as plain modules.
  2. discriminator loss: the same iteration's translations, detached, through D's engine.
  3. both losses finite on every rank, else the whole step is skipped; then engG.backward,
     engG.step, one engD.backward of the whole discriminator loss, engD.step.

Every part is always built (EMA with decay 0 is a copy of the last weights, the watchdog with
timeout 0 does nothing, the tracker on ranks other than 0 is disabled), so the loop has no
conditionals on what is switched on. What a checkpoint holds besides the engines is the
`TrainState` (launch/training/checkpoint.py), each rank's loader position and RNG, and the EMA.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml

from launch.config import (Config, ConfigError, config_hash, cpu_native_bf16, deepspeed_config, native_bf16,
                           ds_resume_record, precision_warning, resolve_precision, resume_point)
from launch.runstore import rundir
from launch.runstore.artifacts import read_discriminator, read_translator, save_translator
from launch.runstore.models import ORIGIN_NAME, fetch_export
from launch.runstore.store import resolve_uri
from launch.runstore.tracking import Tracker
from launch.training import checkpoint as ckpt
from launch.training.engines import (StepResult, build_engines, compile_networks, gan_step, mean_across_ranks,
                                     skipped_steps, step_dtypes, sync_lr)
from launch.training.ops import fix_cuda_arch_list
from launch.training.palette import model_with_palettes, saved_palettes
from launch.training.samples import held_out_batch, sample_rows, save_grid
from launch.training.watchdog import StallWatchdog
from model.ema import EMA
from model.unit import UNIT, UNITGenerator
from pipeline.loader import UnpairedLoader, reshaped_state
from pipeline.atomic import write_text
from pipeline.tensors import normalize


@dataclass
class Ranks:
    """Where this process runs."""
    rank: int
    world: int
    device: torch.device
    device_name: str
    bf16_ok: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device_name == "cuda"


@dataclass
class Meter:
    """Images, data wait and time since the last metric line."""
    start_step: int
    t_start: float = field(default_factory=time.perf_counter)
    t_last: float = 0.0
    wait: float = 0.0
    images: int = 0

    def __post_init__(self):
        self.t_last = self.t_start


@dataclass
class Trainer:
    cfg: Config
    ranks: Ranks
    unit: UNIT
    eng_g: Any
    eng_d: Any
    ema: EMA
    loader: UnpairedLoader
    tracker: Tracker
    state: ckpt.TrainState
    watchdog: StallWatchdog
    ds: dict                                  # the generator engine's DeepSpeed config (logged)
    precision: str = "fp32"                   # resolved train.precision: fp32, bf16 or fp16
    rng_to_restore: dict | None = None        # set after start-up, which draws from the RNG
    resumed_run_id: str | None = None         # the MLflow run of another run dir's checkpoint resumed (a tag)
    samples: tuple | None = None              # held-out (x_a, x_b) for the sample grids (rank 0)
    nan_steps: set = field(default_factory=set)

    @property
    def nonfinite_run(self) -> int:
        """Non-finite steps in a row; kept in the TrainState, so a streak goes on across a resume."""
        return self.state.nonfinite_run

    @nonfinite_run.setter
    def nonfinite_run(self, value: int) -> None:
        self.state.nonfinite_run = value

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def dtype(self) -> torch.dtype:
        """What the inputs are normalised to on the device (the weights' dtype)."""
        return step_dtypes(self.precision)[0]

    @property
    def autocast(self) -> torch.dtype | None:
        return step_dtypes(self.precision)[1]

    def say(self, *args) -> None:
        if self.ranks.is_main:
            print(*args, flush=True)


# ---------------------------------------------------------------- small pieces

def seed_all(seed: int, rank: int) -> None:
    s = (seed * 1_000_003 + rank * 7919) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def fault_nan_steps() -> set[int]:
    """Fault injection for tests: UNIT_FAULT_NAN_STEPS="3,4" makes those steps' losses NaN."""
    raw = os.environ.get("UNIT_FAULT_NAN_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


@contextlib.contextmanager
def ema_weights(ema: EMA, module: torch.nn.Module):
    """The EMA weights in `module` for the duration (with decay 0 they are the current ones)."""
    backup = copy.deepcopy(module.state_dict())
    ema.copy_to(module)
    try:
        yield module
    finally:
        module.load_state_dict(backup)


# ---------------------------------------------------------------- build

def init_ranks(cfg: Config) -> Ranks:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ds_logger.setLevel(logging.WARNING)  # engine set-up prints pages of INFO per engine and rank
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # Under OpenMPI, infra/launch/mpi_rank.sh sets RANK, WORLD_SIZE and LOCAL_RANK beside MASTER_*,
    # so DeepSpeed's MPI discovery (which would pick its own address and port) does not run.
    deepspeed.init_distributed()
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        note = fix_cuda_arch_list()  # before the engines JIT-build DeepSpeed's fused Adam
        if note and dist.get_rank() == 0:
            print(note, flush=True)
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=torch.device(accel.current_device_name()),
                 device_name=accel.device_name(), bf16_ok=accel.device_name() == "cuda" and native_bf16())


INIT_DIR = "init"  # RUN_DIR/init: the translator a run started from (init_from), with origin.json


def claim(cfg: Config, ranks: Ranks) -> tuple[ckpt.TrainState, Path | None]:
    """Every rank decides where to resume from (and whether the run directory may be used) before
    rank 0 claims it: the barrier keeps a slow rank from seeing the marker of this very launch.
    Rank 0 also fetches `init_from` for a run that starts at step 0; a failure there ends every rank."""
    resume_from = resume_point(cfg)
    dist.barrier()
    shared = [None, None]  # the run's identity, written into every checkpoint; rank 0's error
    if ranks.is_main:
        shared[0] = rundir.claim_run_dir(cfg.run_dir)["run_uid"]
        try:  # before anything is written: a second launch must not touch a run that is training
            rundir.hold_run_lock(cfg.run_dir)
        except rundir.RunDirError as e:
            shared[1] = str(e)
    if ranks.is_main and not shared[1]:
        rundir.write_config(cfg.run_dir, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        if cfg.init_from and resume_from is None:
            try:
                fetch_export(cfg.init_from, Path(cfg.run_dir) / INIT_DIR, resolve_uri(cfg.run_dir, cfg.tracking.uri))
            except Exception as e:  # a missing alias, an unreachable registry: one line, every rank stops
                shared[1] = f"config key init_from = {cfg.init_from!r}: {type(e).__name__}: {str(e).splitlines()[0]}"
    dist.broadcast_object_list(shared, src=0)
    if shared[1]:
        raise ConfigError(shared[1])
    return ckpt.TrainState(run_uid=shared[0]), resume_from


def init_weights(cfg: Config, unit: UNIT) -> None:
    """Every rank, before the engines exist: the generator (and the discriminators, when exported and
    of the same shape) from RUN_DIR/init."""
    src = Path(cfg.run_dir) / INIT_DIR
    state, meta = read_translator(src)
    try:
        unit.gen.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"config key init_from = {cfg.init_from!r}: its generator does not fit the model section "
                          f"(it was trained as {meta['model']}): {str(e).splitlines()[0]} ...") from None
    dis = read_discriminator(src)
    if dis is None:
        return
    try:
        unit.dis.load_state_dict(dis)
    except RuntimeError:  # e.g. another image size, so other discriminator scales: start them afresh
        print(f"warning: init_from {cfg.init_from}: its discriminators do not fit (another image size or "
              "discriminator setting); they start from random weights", flush=True)


def make_loader(cfg: Config, ranks: Ranks) -> UnpairedLoader:
    shards_a, shards_b = cfg.data.sources()
    return UnpairedLoader(shards_a, shards_b, batch_size=cfg.data.batch_size, image_size=cfg.data.image_size,
                          seed=cfg.seed, num_workers=cfg.data.num_workers, augment=cfg.data.augment,
                          rank=ranks.rank, world_size=ranks.world, verify_shards=cfg.data.verify_shards,
                          cache_dir=cfg.data.cache_dir, cache_bytes=cfg.data.cache_bytes,
                          pin_memory=ranks.on_gpu)  # pinned: non_blocking copies


def build(cfg: Config, ds_json: dict | None) -> Trainer:
    """Every rank: the parts of a run, restored from the checkpoint `cfg.resume` names (if any)."""
    ranks = init_ranks(cfg)
    state, resume_from = claim(cfg, ranks)
    # Same initial weights on every rank (DeepSpeed broadcasts rank 0's parameters, not buffers),
    # then a noise stream of its own per rank.
    seed_all(cfg.seed, 0)
    # model.image_size follows data.image_size: only the scales it uses; palettes "auto" from the
    # checkpoint or init translator the weights come from, else measured
    init_dir = Path(cfg.run_dir) / INIT_DIR if cfg.init_from and resume_from is None else None
    unit = UNIT(model_with_palettes(cfg, say=print if ranks.is_main else lambda *a: None,
                                    saved=saved_palettes(resume_from, init_dir)))
    if cfg.init_from and resume_from is None:
        init_weights(cfg, unit)
    ds_g, ds_d = (deepspeed_config(cfg, ds_json, lr=lr, on_gpu=ranks.on_gpu, bf16_ok=ranks.bf16_ok)
                  for lr in (cfg.optim.lr_g, cfg.optim.lr_d))
    eng_g, eng_d = build_engines(unit, ds_g, ds_d, (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.max_steps))
    if cfg.train.compile:
        compile_networks(eng_g.module, eng_d.module)
    seed_all(cfg.seed, ranks.rank)
    tr = Trainer(cfg=cfg, ranks=ranks, unit=unit, eng_g=eng_g, eng_d=eng_d, ema=EMA(eng_g.module, cfg.train.ema_decay),
                 loader=make_loader(cfg, ranks), state=state, ds=ds_g,
                 tracker=Tracker(**cfg.tracking.model_dump()) if ranks.is_main else Tracker(enable=False),
                 watchdog=StallWatchdog(cfg.train.stall_timeout_s, ranks.rank),
                 precision=resolve_precision(cfg.train.precision, ranks.on_gpu, ranks.bf16_ok),
                 nan_steps=fault_nan_steps())
    if resume_from is not None:
        restore(tr, resume_from)
    if ranks.is_main:
        start_tracking(tr)
    return tr


def restore(tr: Trainer, path: Path) -> None:
    meta, rank_state, ema_state = ckpt.load(path, tr.eng_g, tr.eng_d, rank=tr.ranks.rank)
    for engine in (tr.eng_g, tr.eng_d):  # the schedule's rate at this step (max_steps may have changed)
        sync_lr(engine)
    tr.state.load_state_dict(meta)
    if not tr.state.is_own(meta):  # another run directory's checkpoint: its MLflow run is its own
        tr.resumed_run_id = meta.get("run_id")
    if tr.ranks.is_main:
        trim_metrics(tr.run_dir / rundir.METRICS_NAME, tr.state.step)
    if rank_state is not None and int(meta.get("world_size", tr.ranks.world)) == tr.ranks.world:
        tr.loader.load_state_dict(rank_state["loader"])
        tr.rng_to_restore = rank_state["rng"]
    else:
        # Another world size: every rank continues past every old rank's position in its new stream
        # (documented in pipeline/loader.py), and its RNG is reseeded from (seed, rank, step).
        states = [json.loads(p.read_text())["loader"] for p in sorted(path.glob("rank-*.json"))]
        tr.loader.load_state_dict(reshaped_state(states))
    # Without a saved EMA (decay 0 in runs of earlier versions) it restarts from the loaded weights.
    tr.ema = EMA(tr.eng_g.module, tr.cfg.train.ema_decay)
    if ema_state is not None:
        tr.ema.load_state_dict(ema_state)
    tr.say(f"resumed from {path} at step {tr.state.step}")


def trim_metrics(path: Path, step: int) -> None:
    """Rank 0 on resume: metrics.jsonl without the lines of steps after `step` (the checkpoint's),
    which the resumed run logs again (one line per logged step). Written atomically; a line that
    is not JSON (cut by the kill) goes too, else the next line would be appended to it."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(logged, int) and logged <= step:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


def start_tracking(tr: Trainer) -> None:
    """Rank 0: open (or reopen) the MLflow run, log what a run starts with, fix the sample images."""
    cfg = tr.cfg
    given = tr.state.run_id
    tr.state.run_id = tr.tracker.start(tr.run_dir, run_id=given)
    # A new MLflow run (step 0, or a resume whose run the tracker could not reopen: tracking.uri
    # changed, the embedded store was removed, another run dir's checkpoint) has none of the run's
    # params and lineage yet; a reopened one has them already.
    if tr.state.step == 0 or (tr.state.run_id is not None and tr.state.run_id != given):
        log_run_start(tr)
    shards_a, shards_b = cfg.data.sources()

    def side_stream():
        return UnpairedLoader(shards_a, shards_b, batch_size=cfg.train.sample_count, image_size=cfg.data.scale(),
                              seed=cfg.seed + 1_000_003, num_workers=0, augment={"train": False}, rank=0, world_size=1)

    x_a, x_b = held_out_batch(cfg.data.test_a, cfg.data.test_b, cfg.data.scale(), cfg.train.sample_count,
                              side_stream)
    tr.samples = (x_a.to(tr.ranks.device, tr.dtype), x_b.to(tr.ranks.device, tr.dtype))


def log_run_start(tr: Trainer) -> None:
    """Rank 0, into a run the tracker just opened: params, config hash, git commit, dataset lineage,
    the init_from origin and (a resume of another run dir's checkpoint) the MLflow run it came from."""
    cfg = tr.cfg
    tr.tracker.log_params({"config": cfg.model_dump(mode="json"), "deepspeed": tr.ds, "world_size": tr.ranks.world,
                           "git_commit": git_commit(), "config_hash": config_hash(cfg),
                           "model_params_gen": sum(p.numel() for p in tr.unit.gen.parameters()),
                           "model_params_dis": sum(p.numel() for p in tr.unit.dis.parameters())})
    spec_a, spec_b = cfg.data.sources()  # the lineage of exactly what the loader reads
    tr.tracker.log_datasets(shards_a=spec_a, shards_b=spec_b)
    origin = rundir.read_json(tr.run_dir / INIT_DIR / ORIGIN_NAME) if cfg.init_from else None
    if origin:
        tr.tracker.set_tags({f"init_from.{k}" if k != "init_from" else k: str(v) for k, v in origin.items()})
    if tr.resumed_run_id:
        tr.tracker.set_tags({"resumed_from.run_id": tr.resumed_run_id, "resumed_from.step": str(tr.state.step)})


# ---------------------------------------------------------------- one step

def train_step(tr: Trainer, next_batch: Callable[[], dict], meter: Meter) -> StepResult | None:
    """One optimizer step of both engines over the accumulated micro-batches; None when a loss was
    non-finite on some rank (then every rank skipped the rest of the step; with accumulation the
    run then stops, count_nonfinite)."""
    result = None
    for _ in range(tr.eng_g.gradient_accumulation_steps()):
        t0 = time.perf_counter()
        batch = next_batch()
        meter.wait += time.perf_counter() - t0
        # uint8 over the bus (pinned on GPUs, so the copy overlaps), [-1, 1] in the step's dtype there
        x_a = normalize(batch["a"].to(tr.ranks.device, non_blocking=True), tr.dtype)
        x_b = normalize(batch["b"].to(tr.ranks.device, non_blocking=True), tr.dtype)
        result = gan_step(tr.eng_g, tr.eng_d, x_a, x_b, tr.unit.cfg, tr.ranks.device, autocast=tr.autocast,
                          poison=tr.state.step + 1 in tr.nan_steps, step=tr.state.step + 1)
        if result is None:
            return None
        meter.images += x_a.shape[0] + x_b.shape[0]
    return result


def count_nonfinite(tr: Trainer) -> None:
    tr.state.nonfinite_total += 1
    tr.state.nonfinite_run += 1
    if tr.eng_g.gradient_accumulation_steps() > 1:
        # The step ended part-way through its micro-batches: the engines keep the gradients of the
        # micro-batches already backpropagated and their micro-step counts, so every later
        # optimizer step would span two trainer steps. DeepSpeed has no public call
        # that drops a partial accumulation (at ZeRO 1/2 zero_grad leaves the optimizer's buffers),
        # so nothing is skipped: stop; every checkpoint was written at an accumulation boundary.
        raise FloatingPointError(f"non-finite loss at step {tr.state.step} with train.grad_accum_steps = "
                                 f"{tr.eng_g.gradient_accumulation_steps()}: a step cannot be skipped part-way "
                                 "through its accumulation, so the run stops at the first one; resume from the "
                                 "last checkpoint (lower optim.lr_g/lr_d or check the data)")
    tr.say(f"step {tr.state.step}: non-finite loss on some rank, step skipped on all ranks "
           f"({tr.state.nonfinite_run} in a row, {tr.state.nonfinite_total} in total)")
    if tr.state.nonfinite_run >= tr.cfg.train.max_nonfinite:
        raise FloatingPointError(f"{tr.state.nonfinite_run} consecutive steps had a NaN/inf loss (last at step "
                                 f"{tr.state.step}); stopping. Lower optim.lr_g/lr_d or check the data.")


def after_step(tr: Trainer, result: StepResult | None, meter: Meter) -> None:
    """Count the step; EMA; the metric line on a good one; sample grid and checkpoint when they are due."""
    tr.state.step += 1
    step, train = tr.state.step, tr.cfg.train
    tr.watchdog.beat(step)
    tr.ema.update(tr.eng_g.module)  # also after a skipped step (no weights moved): its count follows the steps
    if result is None:
        count_nonfinite(tr)  # (stops the run after too many in a row)
    else:
        tr.state.nonfinite_run = 0
        if due(step, train.log_every, train.max_steps):
            log_step(tr, result, meter)
    # Due also after a skipped step, else one non-finite loss at step ckpt_every puts off the next
    # checkpoint by a whole interval. The checkpoint first: a grid that fails (or is slow) then costs
    # no progress. The last step's checkpoint and then its grid are run()'s (finish_checkpoint).
    if step % train.ckpt_every == 0 and step < train.max_steps:
        save_checkpoint(tr)
        tr.watchdog.beat(step)
    if tr.ranks.is_main and step % train.sample_every == 0 and step < train.max_steps:
        write_samples(tr)


def metric_record(tr: Trainer, result: StepResult, meter: Meter) -> dict:
    """One metrics.jsonl line: losses averaged over ranks, learning rates, speed, data wait, loader counts."""
    means = mean_across_ranks({**{f"g/{k}": v for k, v in result.terms_g.items()},
                               **{f"d/{k}": v for k, v in result.terms_d.items()},
                               "g/total": result.loss_g, "d/total": result.loss_d}, tr.ranks.device)
    now = time.perf_counter()
    dt = now - meter.t_last
    record = {"step": tr.state.step, **means, "lr_g": tr.eng_g.get_lr()[0], "lr_d": tr.eng_d.get_lr()[0],
              "images_per_s": meter.images * tr.ranks.world / dt, "images_per_s_per_rank": meter.images / dt,
              "data_wait_s": meter.wait, "data_wait_frac": meter.wait / dt,
              "nonfinite_total": tr.state.nonfinite_total, "elapsed_s": now - meter.t_start,
              # fp16: optimizer steps the loss scaler skipped on a gradient overflow (0 otherwise)
              "skipped_steps_g": skipped_steps(tr.eng_g), "skipped_steps_d": skipped_steps(tr.eng_d)}
    for k, v in tr.loader.stats.items():
        if isinstance(v, (int, float)):
            record[f"loader/{k}"] = v
        elif isinstance(v, dict):
            record.update({f"loader/{k}/{r}": n for r, n in v.items() if isinstance(n, (int, float))})
    meter.t_last, meter.wait, meter.images = now, 0.0, 0
    return record


def log_step(tr: Trainer, result: StepResult, meter: Meter) -> None:
    record = metric_record(tr, result, meter)  # every rank: the means are a collective
    if not tr.ranks.is_main:
        return
    with open(tr.run_dir / rundir.METRICS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")
    tr.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, tr.state.step)
    step, last = tr.state.step, tr.cfg.train.max_steps
    eta = record["elapsed_s"] / max(1, step - meter.start_step) * (last - step)
    tr.say(f"step {step}/{last} | G {record['g/total']:.3f} D {record['d/total']:.3f} | "
           f"recon {record.get('g/recon_a', float('nan')):.3f}/{record.get('g/recon_b', float('nan')):.3f} "
           f"cyc {record.get('g/cyc_a', float('nan')):.3f}/{record.get('g/cyc_b', float('nan')):.3f} | "
           f"{record['images_per_s']:.1f} img/s | data wait {100 * record['data_wait_frac']:.1f}% | "
           f"eta {fmt_eta(eta)}")


def write_samples(tr: Trainer) -> None:
    """Rank 0. A failure (a full disk, a grid the model cannot paint) is a warning: the grid runs no
    collective, draws no random numbers (eval mode), and leaves the weights and train mode as they
    were (ema_weights, sample_rows restore them), so the training goes on exactly as without it."""
    path = tr.run_dir / rundir.SAMPLES_DIR / f"step-{tr.state.step:08d}.png"
    try:
        # Eagerly under train.compile: compiling an eval-mode graph would hold every rank (the
        # others wait in the next step) for minutes, against the stall watchdog's timeout.
        with ema_weights(tr.ema, tr.eng_g.module) as gen, torch.compiler.set_stance("force_eager"):
            save_grid(path, sample_rows(gen, *tr.samples), scale=2 if tr.cfg.data.scale() <= 64 else 1)
    except Exception as e:
        print(f"warning: writing the sample grid for step {tr.state.step} failed ({type(e).__name__}: {e}); "
              "training goes on", flush=True)
        return
    tr.tracker.log_image(path, tr.state.step)


def save_checkpoint(tr: Trainer) -> Path:
    """Every rank (DeepSpeed saves collectively)."""
    cfg, step = tr.cfg, tr.state.step
    if tr.ranks.is_main:  # the tracker's id: with the server down at start the run is created later
        tr.state.run_id = tr.tracker.run_id or tr.state.run_id
    rank_state = {"step": step, "loader": tr.loader.state_dict(), "rng": ckpt.rng_state(), "world_size": tr.ranks.world}
    # the config without URL passwords: meta.json is copied with the run as config.yaml is (resume
    # compares it, and every key that holds a URL may change on resume)
    meta = {**tr.state.state_dict(), "config": rundir.config_without_passwords(cfg.model_dump(mode="json")),
            "config_hash": config_hash(cfg),
            "world_size": tr.ranks.world, "deepspeed": ds_resume_record(tr.ds),  # resume compares these
            # as resolved ("auto" is bf16 on one GPU, fp16 on another): launch.config.checkpoint_precision
            "precision": tr.precision,
            # the palettes a resume builds the model with (launch.training.palette.saved_palettes)
            "palettes": {k: getattr(tr.unit.cfg, k) for k in ("palette_a", "palette_b")}}
    try:
        return ckpt.save(tr.run_dir, step, tr.eng_g, tr.eng_d, rank=tr.ranks.rank, rank_state=rank_state, meta=meta,
                         ema_state=tr.ema.state_dict(), keep=cfg.train.keep_ckpts)
    except ckpt.CheckpointFolderError:
        raise  # the step folder is taken: its message says so, nothing about the disk
    except Exception as e:  # a full disk surfaces from torch.save as a bare RuntimeError
        raise ckpt.CheckpointWriteError(ckpt.write_failure(tr.run_dir, step, e, tr.state.run_uid or None)) from e


# ---------------------------------------------------------------- the run

def export(tr: Trainer) -> Path:
    """Rank 0: the generator side (EMA weights) as safetensors + JSON for release."""
    out = tr.run_dir / rundir.EXPORT_DIR
    save_translator(out, float32_generator(tr), tr.unit.config(), image_size=tr.cfg.data.scale(),
                    step=tr.state.step, ema=tr.cfg.train.ema_decay > 0, domains={"a": "A", "b": "B"},
                    discriminator=tr.eng_d.module)
    return out


def float32_generator(tr: Trainer) -> torch.nn.Module:
    """A float32 CPU generator holding the EMA weights, whatever the training precision: under
    fp16 the engine's module has half weights, the EMA shadow is float32."""
    gen = UNITGenerator(tr.unit.cfg)
    gen.load_state_dict(tr.eng_g.module.state_dict())  # what the EMA does not hold (integer buffers)
    tr.ema.copy_to(gen)
    return gen


def start_stream(tr: Trainer) -> Callable[[], dict]:
    """The batch stream, its first batch already drawn; then the RNG a checkpoint saved."""
    it = iter(tr.loader)
    first = [next(it)]  # the loader starts its workers here, drawing their base seed from the global RNG
    # Set the RNG last: start-up work (worker seeds, the held-out batch) draws from it.
    if tr.rng_to_restore is not None:
        ckpt.set_rng_state(tr.rng_to_restore)
    elif tr.state.step > 0:
        seed_all(tr.cfg.seed + tr.state.step, tr.ranks.rank)  # another world size: a fresh stream per (seed, rank, step)
    return lambda: first.pop() if first else next(it)


def start_metered(tr: Trainer) -> tuple[Callable[[], dict], Meter]:
    """start_stream, and a Meter whose clock started before it: the start-up (workers, first batch)
    counts as data wait within the first metric line's interval, so that line's fraction stays <= 1."""
    meter = Meter(start_step=tr.state.step)
    next_batch = start_stream(tr)
    meter.wait = time.perf_counter() - meter.t_start
    return next_batch, meter


def finish_checkpoint(tr: Trainer, meter: Meter) -> Path:
    """Every rank: the last step's checkpoint, then (rank 0) its grid, in the order after_step keeps
    for every other step. A relaunch of a finished run ran no steps: its checkpoint is found
    complete (ckpt.save) and its grid was written by the launch that ran it."""
    final = save_checkpoint(tr)
    if tr.ranks.is_main and tr.state.step > meter.start_step:
        write_samples(tr)
    return final


# train.compile compiles lazily, in the first step of each launch (about 3.5 min on an H100 for the
# paper's step, longer on CPU ranks), which train.stall_timeout_s was not meant to cover.
COMPILE_ALLOWANCE_S = 1800.0


def compile_allowance_steps(cfg: Config) -> int:
    """How many steps of a launch may compile under train.compile: the first, and with lazy R1 every
    step up to the first that adds the penalty (a graph of its own). Graphs compiled later (another
    shape) are not foreseen and count against the timeout."""
    if not cfg.train.compile:
        return 0
    return cfg.model.r1_every if cfg.model.w_r1 else 1


def run(tr: Trainer) -> dict:
    """Every rank: train to train.max_steps, checkpoint, and (rank 0) export; returns a summary."""
    cfg = tr.cfg
    next_batch, meter = start_metered(tr)
    tr.say(f"training {cfg.train.max_steps - tr.state.step} steps on {tr.ranks.world} rank(s) ({tr.ranks.device_name}, "
           f"{tr.precision}{', compiled' if cfg.train.compile else ''}, ZeRO {tr.ds['zero_optimization']['stage']}), "
           f"batch {cfg.data.batch_size}x{tr.ranks.world}x{tr.eng_g.gradient_accumulation_steps()}, run dir {tr.run_dir}")
    warning = precision_warning(tr.precision, tr.ranks.on_gpu, cpu_native_bf16())
    if warning:
        tr.say(warning)
    # From the first step on (start-up, with its JIT builds and rendezvous, is not watched) to the
    # final checkpoint; the steps that compile get an allowance (compile_allowance_steps).
    tr.watchdog.start(COMPILE_ALLOWANCE_S if cfg.train.compile else 0.0,
                      until_step=tr.state.step + compile_allowance_steps(cfg))
    while tr.state.step < cfg.train.max_steps:
        after_step(tr, train_step(tr, next_batch, meter), meter)
    final = finish_checkpoint(tr, meter)
    tr.watchdog.stop()
    summary = {"rank": tr.ranks.rank, "step": tr.state.step, "steps_run": tr.state.step - meter.start_step,
               "seconds": time.perf_counter() - meter.t_start, "checkpoint": str(final),
               "nonfinite_total": tr.state.nonfinite_total, "run_dir": str(tr.run_dir),
               "init_from": rundir.read_json(tr.run_dir / INIT_DIR / ORIGIN_NAME) if cfg.init_from else None}
    if tr.ranks.is_main:
        summary["export"] = str(export(tr))
        tr.tracker.flush()
        summary["run_id"] = tr.tracker.run_id or tr.state.run_id
        tr.tracker.end()
    dist.barrier()
    return summary


def train(cfg: Config, ds_json: dict | None) -> dict:
    return run(build(cfg, ds_json))
