"""The end of a training run, on the release side (rank 0, after the trainer has exported):

  1. the trivial baselines, estimated from the training shards, saved beside the export;
  2. one evaluation on the paired test split (when the config names one), beside those baselines;
  3. registration with that evaluation (the champion gate decides the alias), or, with the
     registry off, the evaluation's metrics logged into the run.

It reads what training left in the run directory (the export, tracking.json) and nothing of the
trainer's own objects.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from launch.config import Config
from launch.release import baselines
from launch.release.evaluate import EvalOptions, evaluate_export, flat_metrics, warn_skipped
from pipeline.storage import redact_text


def eval_options(cfg: Config, stats) -> EvalOptions:
    features = None
    if cfg.eval.fid_features:
        from launch.release.fid import load_extractor
        features = load_extractor(cfg.eval.fid_features)
    return EvalOptions(baselines=stats, c2st_steps=cfg.eval.c2st_steps, features=features)


def finish_run(cfg: Config, export_dir: str | Path) -> dict:
    """Returns {"evaluation": ..., "registry": ...} (each when it happened)."""
    run_dir, export_dir, out = Path(cfg.run_dir), Path(export_dir), {}
    res, split = None, cfg.data.test_split()
    what = "estimating the baselines"
    try:
        stats = baselines.from_config(cfg)
        baselines.save(export_dir / baselines.FILE_NAME, stats)
        if split:
            what = "the end-of-run evaluation"
            rejected = []
            res = evaluate_export(export_dir, **split, size=cfg.data.scale(), opts=eval_options(cfg, stats),
                                  rejected=rejected)
            out["evaluation"] = res
            warn_skipped(rejected)
    except Exception as e:  # training and the export are complete: say what to run, exit as done
        print(f"warning: {what} failed ({type(e).__name__}: {redact_text(str(e))}); the export is complete, "
              f"nothing was evaluated or registered; later: {redact_text(retry_command(cfg, export_dir))}",
              flush=True)
        return out
    if not cfg.tracking.enable:
        if cfg.registry.enable:  # registry.enable defaults true: say why nothing was registered
            print(f"note: the translator was not registered: tracking.enable is false (the registry is MLflow's); "
                  f"the export is in {export_dir}; set tracking.enable true to register runs, or registry.enable "
                  "false to drop this note", flush=True)
        return out
    # the config's URI, when it names one: tracking.json keeps it without a password it may carry
    uri = cfg.tracking.uri
    if not cfg.registry.enable:
        if res is not None:
            log_run_metrics(run_dir, flat_metrics(res), uri)
        return out
    from launch.release.registry import register_run
    try:
        out["registry"] = register_run(run_dir, name=cfg.registry.name, **split, min_accuracy=cfg.registry.min_accuracy,
                                       image_size=cfg.data.scale(), tracking_uri=uri, export_dir=export_dir,
                                       evaluation=res)
    except Exception as e:  # the weights are exported; registering again is one command
        print(f"warning: registering the model failed ({type(e).__name__}: {redact_text(str(e))}); retry with "
              f"`python -m launch.release.register --run-dir {shlex.quote(str(run_dir))}`", flush=True)
    return out


def retry_command(cfg: Config, export_dir: Path) -> str:
    """The command that does what finish_run could not: registering evaluates on the config's test
    split and estimates missing baselines itself; else the evaluation (with the shards for the baselines
    when they were not saved)."""
    q = shlex.quote  # every substituted path shell-quoted: the command is pasted as it is
    if cfg.tracking.enable and cfg.registry.enable:
        return f"python -m launch.release.register --run-dir {q(str(cfg.run_dir))}"
    split = cfg.data.test_split()
    flags = ("test_a", "truth_b", "test_b", "truth_a")
    pairs = (" ".join(f"--{k.replace('_', '-')} {q(str(split[k]))}" for k in flags) if split
             else "--test-a DIR --truth-b DIR")
    cmd = f"python -m launch.release.evaluate --model {q(str(export_dir))} {pairs} --size {cfg.data.scale()}"
    if not (export_dir / baselines.FILE_NAME).is_file():
        cmd += f" --shards {q(str(cfg.data.shards)) if cfg.data.shards else 'OUT'}"
    return cmd


def log_run_metrics(run_dir: Path, metrics: dict, tracking_uri: str | None = None) -> None:
    from launch.runstore.tracking import log_run_metrics as log
    try:
        log(run_dir, metrics, tracking_uri=tracking_uri)
    except Exception as e:  # the evaluation is printed and returned; the run only misses its copy
        print(f"warning: logging the evaluation to MLflow failed ({type(e).__name__}: {redact_text(str(e))})",
              flush=True)
