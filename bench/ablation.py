"""The UNIT paper's ablation on the demo corpus: weight sharing vs cycle consistency vs both.

Trains, with the project's real trainer (`deepspeed --num_gpus 1 launch/train.py --config
configs/ablation.yaml key=value ...`, tracking and registry off), for the same number of steps:

    UNIT                 n_shared=1 (configs/ablation.yaml) + cycle terms
    weight sharing only  w_cyc=0, w_cyc_kl=0
    cycle only           n_shared=0
    shared blocks 2, 3   the sweep over n_shared (0 and 1 reuse the runs above)

each for several seeds, evaluates each export with launch.release.evaluate on the paired test split
(a2b = aerial -> map, the paper's direction) and prints mean ± std pixel accuracy and C2ST
(launch.release.c2st: held-out accuracy of a classifier telling real target images from translations,
0.5 = indistinguishable) next to the paper's table and the trivial baselines every model must
beat: identity, the best constant colour of the target domain, per-channel histogram matching (estimated by
the trainer from the training shards into export/baselines.json). Every finished run leaves
OUT/results/<run>.json; a rerun skips those (same steps), so an interrupted ablation continues
where it stopped.

    .venv/bin/python bench/ablation.py [--out $TMPDIR/unit-ablation] [--steps 200] [--seeds 3]
        [--sweep-seeds 1] [--n-train 1000] [--n-test 100] [--threads 1] [--jobs 1] [--c2st-steps 200]
        [--report-only]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ports import free_port  # noqa: E402  (bench/ is on the path: it runs as a script)

PAPER = {"weight sharing only": (0.569, 0.029), "cycle only": (0.568, 0.010), "UNIT": (0.600, 0.015)}
# name -> model overrides on top of configs/ablation.yaml (which is the UNIT configuration)
CONFIGS = {
    "UNIT": {},
    "weight sharing only": {"w_cyc": 0, "w_cyc_kl": 0},
    "cycle only": {"n_shared": 0},
}
SLUG = {"UNIT": "unit", "weight sharing only": "share", "cycle only": "cycle"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "unit-ablation"),
                    help="corpus, run dirs and cached results (default $TMPDIR/unit-ablation: outside the "
                         "repository, so `make clean` does not wipe finished runs)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "ablation.yaml"))
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per ablation configuration")
    ap.add_argument("--sweep-seeds", type=int, default=1, help="seeds for n_shared=2 and 3 (0 and 1 reuse the ablation)")
    ap.add_argument("--n-train", type=int, default=1000, help="demo train images per domain")
    ap.add_argument("--n-test", type=int, default=100, help="paired demo test scenes")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training rank (shared machines: 1)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs trained at once, each its own one-rank launch (e.g. 2 on 2 cores with --threads 1)")
    ap.add_argument("--c2st-steps", type=int, default=200,
                    help="classifier steps of the two-sample test per translator and direction (0: off)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: print the table of the runs already cached in OUT/results")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. data.batch_size=8)")
    return ap.parse_args(argv)


def sh(cmd, log: Path | None = None, env=None) -> None:
    cmd = [str(c) for c in cmd]
    if log is None:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        out = r.stdout + r.stderr
    else:
        with open(log, "w") as f:
            r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
        out = log.read_text()
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{out[-3000:]}")




def prepare_corpus(out: Path, n_train: int, n_test: int, size: int) -> dict:
    """Demo corpus + shards under OUT/data, made once (a marker records the parameters)."""
    data = out / "data"
    want = {"n_train": n_train, "n_test": n_test, "size": size, "seed": 0}
    marker = data / "corpus.json"
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return paths(data)
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    py = sys.executable
    sh([py, "-m", "pipeline.demo", "--out", data / "demo", "--n-train", n_train, "--n-test", n_test,
        "--size", size, "--seed", 0])
    sh([py, "-m", "pipeline.shards", "--src-a", data / "demo" / "trainA", "--src-b", data / "demo" / "trainB",
        "--out", data / "shards", "--workers", 1, "--max-per-shard", max(16, n_train // 4), "--no-progress"])
    marker.write_text(json.dumps(want))
    return paths(data)


def paths(data: Path) -> dict:
    return {"shards": data / "shards", "test_a": data / "demo" / "testA", "test_b": data / "demo" / "testB"}


def plan(seeds: int, sweep_seeds: int) -> list[dict]:
    """Every run: name, n_shared, model overrides, seed."""
    runs = []
    # seed-major: an interrupted ablation still has every configuration at the seeds it reached
    for s in range(seeds):
        for name, over in CONFIGS.items():
            runs.append({"config": name, "model": over, "seed": s, "id": f"{SLUG[name]}-s{s}"})
    for k in (2, 3):
        for s in range(sweep_seeds):
            runs.append({"config": f"n_shared={k}", "model": {"n_shared": k}, "seed": s, "id": f"shared{k}-s{s}"})
    return runs


def train_and_evaluate(run: dict, out: Path, cfg_path: str, steps: int | None, corpus: dict, threads: int,
                       extra: list[str], c2st_steps: int = 200) -> dict:
    from launch.release.evaluate import EvalOptions, evaluate_export

    run_dir = out / "runs" / run["id"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted before its result: start it again
    run_dir.mkdir(parents=True)
    over = [f"run_dir={run_dir}", f"seed={run['seed']}", f"data.shards={corpus['shards']}",
            "tracking.enable=false", "registry.enable=false", "resume=never", f"train.threads={threads}"]
    if steps is not None:
        over.append(f"train.max_steps={steps}")
    over += [f"model.{k}={v}" for k, v in run["model"].items()] + list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    sh([Path(sys.executable).parent / "deepspeed", "--num_gpus", 1, "--master_port", free_port(),
        "launch/train.py", "--config", cfg_path, *over], log=out / "runs" / f"{run['id']}.log", env=env)
    seconds = time.perf_counter() - t0
    export = run_dir / "export"
    # the trainer wrote export/baselines.json from the training shards; evaluate_export uses it
    res = evaluate_export(export, test_a=corpus["test_a"], truth_b=corpus["test_b"],
                          test_b=corpus["test_b"], truth_a=corpus["test_a"],
                          opts=EvalOptions(c2st_steps=c2st_steps))
    meta = json.loads((export / "translator.json").read_text())
    # keep the export (small) for later scoring; drop the DeepSpeed checkpoints (optimizer state)
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    return {**run, "steps": meta["step"], "seconds": seconds, "evaluation": res, "export": str(export),
            "n_shared": meta["model"]["n_shared"], "w_cyc": meta["model"]["w_cyc"]}


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


BASELINES = {"identity": "identity (input as output)", "constant": "constant (the best constant target colour)",
             "histmatch": "histmatch (per-channel histogram matching)"}


def tables(results: list[dict]) -> str:
    by = {}
    for r in results:
        by.setdefault(r["config"], []).append(r)

    def vals(rs, d, k):  # results cached by an older version may lack C2ST and the baselines
        return [r["evaluation"][d][k] for r in rs if k in r["evaluation"][d]]

    lines = ["Ablation (paired test split, pixel accuracy: every channel within 16 of the truth; C2ST: held-out "
             "accuracy of a classifier telling real target images from the translations, 0.5 = indistinguishable; "
             "mean ± sample std over seeds)", "",
             "| configuration | n_shared | cycle | seeds | a2b pixel acc (ours) | paper (a2b) | b2a pixel acc (ours) "
             "| a2b C2ST | b2a C2ST |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in CONFIGS:
        rs = by.get(name, [])
        if not rs:
            continue
        p = PAPER[name]
        lines.append(f"| {name} | {rs[0]['n_shared']} | {'yes' if rs[0]['w_cyc'] else 'no'} | {len(rs)} | "
                     f"{mean_std(vals(rs, 'a2b', 'pixel_acc'))} | {p[0]:.3f} ± {p[1]:.3f} | "
                     f"{mean_std(vals(rs, 'b2a', 'pixel_acc'))} | {mean_std(vals(rs, 'a2b', 'c2st'))} | "
                     f"{mean_std(vals(rs, 'b2a', 'c2st'))} |")
    # The baselines: one evaluation per run (histograms and colours sampled from the training shards
    # with the run's seed, so constant and histmatch vary a little), mean ± std over all runs.
    for key, label in BASELINES.items():
        a2b = vals(results, "a2b", f"{key}_pixel_acc")
        if not a2b:
            continue
        lines.append(f"| {label} | - | - | {len(a2b)} | {mean_std(a2b)} | - | "
                     f"{mean_std(vals(results, 'b2a', f'{key}_pixel_acc'))} | "
                     f"{mean_std(vals(results, 'a2b', f'{key}_c2st'))} | {mean_std(vals(results, 'b2a', f'{key}_c2st'))} |")
    beat = [r for r in results if r["evaluation"]["a2b"].get("margin") is not None]
    if beat:
        wins = sum(r["evaluation"]["a2b"]["margin"] > 0 for r in beat)
        lines += ["", f"{wins} of {len(beat)} runs beat the strongest baseline on a2b pixel accuracy "
                      f"(margin over it: {mean_std([r['evaluation']['a2b']['margin'] for r in beat])})."]
    lines += ["", "Shared blocks sweep (cycle on; 0 = cycle only, 1 = UNIT)", "",
              "| n_shared | seeds | a2b pixel acc | b2a pixel acc | a2b MAE | a2b C2ST |",
              "| --- | --- | --- | --- | --- | --- |"]
    for k in range(4):
        rs = [r for r in results if r["n_shared"] == k and r["w_cyc"] > 0]
        if rs:
            lines.append(f"| {k} | {len(rs)} | {mean_std(vals(rs, 'a2b', 'pixel_acc'))} | "
                         f"{mean_std(vals(rs, 'b2a', 'pixel_acc'))} | "
                         f"{statistics.mean(vals(rs, 'a2b', 'mae')):.1f} | {mean_std(vals(rs, 'a2b', 'c2st'))} |")
    return "\n".join(lines)


def train_all(todo: list[dict], out: Path, args, steps: int, corpus: dict) -> list[dict]:
    """Train and evaluate every run in todo, args.jobs at a time; each result cached as it finishes."""
    from tqdm import tqdm

    from pipeline.atomic import write_json

    def one(run: dict) -> dict:
        r = train_and_evaluate(run, out, args.config, steps, corpus, args.threads, args.overrides, args.c2st_steps)
        write_json(out / "results" / f"{run['id']}.json", r)
        return r

    done = []
    bar = tqdm(total=len(todo), desc="ablation", unit="run")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, run) for run in todo]
        for fut in concurrent.futures.as_completed(futures):
            try:
                r = fut.result()
            except BaseException:
                # a failed run stops the ablation: the runs not yet started are dropped (the ones
                # running finish and are cached), as the sequential loop stopped at the first failure
                for f in futures:
                    f.cancel()
                raise
            done.append(r)
            bar.update(1)
            ev = r["evaluation"]
            tqdm.write(f"{r['id']}: a2b {ev['a2b']['pixel_acc']:.3f} (strongest baseline "
                       f"{ev['a2b']['best_baseline']} {ev['a2b']['best_baseline_pixel_acc']:.3f}) "
                       f"b2a {ev['b2a']['pixel_acc']:.3f} ({r['seconds']:.0f} s)")
    bar.close()
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.c2st_steps < 0:
        raise SystemExit("--c2st-steps must be >= 0")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    import yaml

    from launch.config import ConfigError, apply_overrides
    out = Path(args.out).resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    # the config every run trains: the file with the key=value overrides on top, as the trainer reads it
    try:
        cfg = apply_overrides(yaml.safe_load(Path(args.config).read_text()), args.overrides)
    except ConfigError as e:
        raise SystemExit(f"{args.config}: {e}") from None
    steps = args.steps or cfg["train"]["max_steps"]
    t_start = time.perf_counter()
    runs = plan(args.seeds, args.sweep_seeds)
    m = cfg["model"]
    per_run = steps / 1.7 + 25  # measured on one free core of the 2-core dev box at this size, plus launch/eval
    print(f"budget: {len(runs)} runs x {steps} steps (batch {cfg['data']['batch_size']}, {args.size}x{args.size}, "
          f"dim {m['dim']}, n_res {m['n_res']}, 1 CPU rank x {args.threads} thread(s)); about {per_run / 60:.1f} min "
          f"a run on one free core (~1.7 steps/s + launch), so about "
          f"{len(runs) * per_run / 60 / args.jobs:.0f} min in all with {args.jobs} at once "
          f"(more on a busy machine). Corpus: {args.n_train} train images per domain, {args.n_test} paired test "
          f"scenes. Output: {out}", flush=True)
    results, todo = [], []
    for run in runs:
        cached = out / "results" / f"{run['id']}.json"
        r = json.loads(cached.read_text()) if cached.is_file() else None
        if r is not None and r.get("steps") == steps and r.get("model") == run["model"]:
            results.append(r)
        elif not args.report_only:
            todo.append(run)
    if todo:
        corpus = prepare_corpus(out, args.n_train, args.n_test, args.size)
        results += train_all(todo, out, args, steps, corpus)
    ran = len(todo)
    if not results:
        print(f"no finished runs in {out / 'results'} for {steps} steps")
        return 1
    table = tables(results)
    (out / "table.md").write_text(table + "\n")
    print()
    print(table)
    secs = [r["seconds"] for r in results]
    print(f"\n{len(results)} runs ({ran} trained now, {len(results) - ran} from {out / 'results'}), {steps} steps "
          f"each; {statistics.mean(secs):.0f} s per run on average (launch + train + export), "
          f"{sum(secs) / 60:.1f} min of training in all; this invocation took "
          f"{(time.perf_counter() - t_start) / 60:.1f} min. Table also in {out / 'table.md'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
