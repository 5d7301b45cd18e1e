"""Translation quality per CPU minute: our trainer against an official-code-style reference loop.

For each task, a corpus is made, written to shards with `pipeline.shards`, and trained on twice
for the same wall time:

    ours       the real trainer: `deepspeed --num_gpus RANKS launch/train.py --config CONFIG`
               (configs/demo.yaml by default), tracking and registry off
    reference  one process, the official code's recipe: the `official` preset (width 64, 4
               residual blocks, 3-scale discriminator, weights 1/10/0.01/10/0.01, LSGAN), Adam
               lr 1e-4, batch 1, and its iteration (bench/step.py:step_ref: a D update on its own
               encode/decode pass, then a G update)

Both translators are scored on the paired test split beside the trivial baselines (identity,
the best constant target colour, per-channel histogram matching, estimated from the training
shards) with launch.release.evaluate. Tasks:

    demo    the embedded aerial -> map corpus (pipeline/demo.py)
    shift   natural photographs (scikit-image's sample images, random 64 px crops) against a
            colour/tone-shifted copy of other crops: a global shift that histogram matching
            solves almost exactly, so it asks whether the trainer keeps detail sharp

Goals printed beside the figures: ours beats the strongest baseline (by >= 0.10 a2b on demo),
a2b >= 0.60 on shift, and ours >= 2x the reference's a2b accuracy.

    .venv/bin/python bench/quality.py [--tasks demo,shift] [--out $TMPDIR/unit-quality]
        [--config CONFIG] [--size 64] [--ranks 2] [--steps N] [--ref-threads 2] [--ref-seeds 0,1,2]
        [--curve K] [--reuse-ours] [key=value ...]

The reference is one GAN run per seed and moves between seeds as much as ours does: --ref-seeds
trains it once per seed, each for ours' wall time, and the ratio is taken against their mean (and,
stricter, their best). --reuse-ours scores another set of reference seeds against the run of ours
already under --out (the same corpus and settings, on the same machine since its last boot:
ours' seconds are the reference's budget) instead of training ours again. The reference's layer
norms start at the official code's U(0, 1) gammas (before 6 December: ones, as ours).

"Per minute" depends on how many minutes: --curve K also scores both at K-1 earlier points of the
same runs (ours: the EMA generator of a checkpoint every 1/K of its steps; the reference: its
generator when its clock passes the second at which ours wrote that checkpoint), and prints the
ratio at each budget (a2b and b2a, without C2ST), so one run shows where the ratio moves.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import atomic  # noqa: E402  (after the path: bench/ runs as a script)
from ports import free_port  # noqa: E402

GOALS = {"demo": "ours - strongest baseline >= 0.10 (a2b), > 0 (b2a); ours >= 2x reference",
         "shift": "ours a2b >= 0.60; ours >= 2x reference"}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "cat", "colorwheel")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="demo,shift")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "unit-quality"))
    ap.add_argument("--config", default=None, help="our trainer's config (default: configs/demo.yaml for "
                    "demo, configs/photo.yaml for shift)")
    ap.add_argument("--ranks", type=int, default=2, help="CPU ranks of our trainer")
    ap.add_argument("--size", type=int, default=64, help="image side of the corpora and of training")
    ap.add_argument("--steps", type=int, default=None, help="our training steps (default: the config's)")
    ap.add_argument("--ref-threads", type=int, default=2, help="torch threads of the reference loop")
    ap.add_argument("--ref-seeds", default="0", help="comma-separated seeds: one reference run each, "
                    "each for ours' wall time")
    ap.add_argument("--curve", type=int, default=0, metavar="K", help="also score both at every 1/K of "
                    "ours' steps (its checkpoints) and the same seconds of the reference (0: off)")
    ap.add_argument("--reuse-ours", action="store_true", help="take ours from the run already under --out "
                    "(same corpus and settings, this machine since its boot; refused otherwise) instead of training it again")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--c2st-steps", type=int, default=200)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for our trainer")
    return ap.parse_args(argv)


def sh(cmd, log: Path, env=None) -> None:
    cmd = [str(c) for c in cmd]
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    if r.returncode not in (0, 3):  # 3: shards complete with quarantined inputs
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------- corpora


def save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(img).save(path)


def tone_shift(img: np.ndarray) -> np.ndarray:
    """The B domain of the shift task: per-channel gamma, gain and offset (monotone per channel)."""
    x = img.astype(np.float32) / 255.0
    gamma, gain, offset = np.array([0.8, 1.0, 1.25]), np.array([0.95, 1.0, 0.8]), np.array([0.06, 0.02, 0.0])
    return np.clip((x ** gamma * gain + offset) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def photo_crops(n: int, size: int, rng) -> list[np.ndarray]:
    """Random size x size crops of scikit-image's colour sample photographs, rescaled 0.25-0.6x first."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("the shift task needs scikit-image's sample photographs: "
                         ".venv/bin/pip install -e '.[bench]' (or run --tasks demo)") from None
    from PIL import Image
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    out = []
    for _ in range(n):
        img = Image.fromarray(photos[rng.integers(len(photos))][..., :3])
        scale = rng.uniform(0.25, 0.6)
        w, h = max(size, int(img.width * scale)), max(size, int(img.height * scale))
        arr = np.asarray(img.resize((w, h), Image.BICUBIC))
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        out.append(np.ascontiguousarray(arr[y:y + size, x:x + size]))
    return out


def make_shift_corpus(root: Path, n_train: int, n_test: int, size: int = 64, seed: int = 0) -> None:
    """trainA: crops; trainB: tone-shifted other crops (unpaired); testA/testB: paired crops."""
    rng = np.random.default_rng(seed)
    for sub in ("trainA", "trainB", "testA", "testB"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(photo_crops(n_train, size, rng)):
        save_png(root / "trainA" / f"{i:06d}.png", img)
    for i, img in enumerate(photo_crops(n_train, size, rng)):
        save_png(root / "trainB" / f"{i:06d}.png", tone_shift(img))
    for i, img in enumerate(photo_crops(n_test, size, rng)):
        save_png(root / "testA" / f"{i:06d}.png", img)
        save_png(root / "testB" / f"{i:06d}.png", tone_shift(img))


def prepare(task: str, out: Path, n_train: int, n_test: int, size: int) -> dict:
    """Corpus folders and shards for `task` under OUT/<task>, made once per parameter set."""
    root = out / task
    want = {"task": task, "n_train": n_train, "n_test": n_test, "size": size}
    marker = root / "corpus.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == want):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if task == "demo":
            from pipeline.demo import write_corpus
            write_corpus(str(root / "data"), n_train, n_test, size=size, seed=0, progress=False)
        else:
            make_shift_corpus(root / "data", n_train, n_test, size)
        sh([sys.executable, "-m", "pipeline.shards", "--src-a", root / "data" / "trainA", "--src-b",
            root / "data" / "trainB", "--out", root / "shards", "--workers", 2,
            "--max-per-shard", max(16, n_train // 4), "--no-progress"], log=root / "shards.log")
        atomic.write_json(marker, want)
    d = root / "data"
    return {"shards": root / "shards", "test_a": d / "testA", "test_b": d / "testB", "root": root, "task": task}


# ---------------------------------------------------------------- the two trainers


def run_ours(corpus: dict, args, size: int) -> tuple[Path, float, int]:
    """(export dir, training seconds, steps) of the real trainer on `corpus`; with --reuse-ours, of
    the run already there when it was trained with the same settings."""
    run_dir = corpus["root"] / "ours"
    settings = {"config": config_for(args, corpus["task"]), "steps": args.steps, "ranks": args.ranks,
                "overrides": list(args.overrides), **({"curve": args.curve} if args.curve else {}),
                "host": host()}
    marker = run_dir / "bench.json"
    if args.reuse_ours:
        found = json.loads(marker.read_text()) if marker.is_file() else None
        if found != settings:
            raise SystemExit(f"--reuse-ours: no finished run of ours with these settings under {run_dir} "
                             f"(found {found}, want {settings}); run once without --reuse-ours")
        return ours_result(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    over = [f"run_dir={run_dir}", f"data.shards={corpus['shards']}", f"data.test_a={corpus['test_a']}",
            f"data.test_b={corpus['test_b']}", f"data.image_size={size}", f"data.augment.resize={size}",
            "tracking.enable=false", "registry.enable=false", "eval.c2st_steps=0"]
    if args.steps:
        over.append(f"train.max_steps={args.steps}")
    over += curve_overrides(args, settings["config"]) + list(args.overrides)
    log = corpus["root"] / "ours.log"
    sh([Path(sys.executable).parent / "deepspeed", "--num_gpus", args.ranks, "--master_port", free_port(),
        "launch/train.py", "--config", settings["config"], *over], log=log,
       env={**os.environ, "OMP_NUM_THREADS": "1"})
    atomic.write_json(marker, settings)
    return ours_result(run_dir)


def ours_result(run_dir: Path) -> tuple[Path, float, int]:
    lines = metric_rows(run_dir)
    seconds = max(x.get("elapsed_s", 0.0) for x in lines) if lines else float("nan")
    meta = json.loads((run_dir / "export" / "translator.json").read_text())
    return run_dir / "export", seconds, int(meta["step"])


def curve_overrides(args, config: str) -> list[str]:
    """--curve K: a checkpoint every 1/K of ours' steps, all of them kept."""
    if not args.curve:
        return []
    import yaml
    steps = args.steps or yaml.safe_load(Path(config).read_text())["train"]["max_steps"]
    if steps < args.curve:
        raise SystemExit(f"--curve {args.curve}: more points than ours' {steps} steps")
    return [f"train.ckpt_every={steps // args.curve}", f"train.keep_ckpts={args.curve}"]


def ours_points(run_dir: Path, final, before: int) -> list[tuple[int, float, object]]:
    """(step, training seconds, EMA generator) at each checkpoint of ours before step `before` (the
    final one is the export, loaded as `final`), oldest first; the seconds interpolated between the
    trainer's logged (step, elapsed_s) records."""
    from launch.training import checkpoint as ckpt
    logged = sorted((r["step"], r["elapsed_s"]) for r in metric_rows(run_dir) if "elapsed_s" in r and "step" in r)
    points = []
    for path in ckpt.complete_checkpoints(run_dir):
        step = ckpt.step_of(path)
        if step >= before:
            continue
        gen = copy.deepcopy(final)  # the export's model and buffers; the weights from the checkpoint
        gen.load_state_dict({**gen.state_dict(), **ckpt.load_ema(path / "ema.safetensors")["shadow"]})
        seconds = float(np.interp(step, [s for s, _ in logged], [t for _, t in logged]))
        points.append((step, seconds, gen.eval()))
    return points


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def config_for(args, task: str) -> str:
    return args.config or str(ROOT / "configs" / ("photo.yaml" if task == "shift" else "demo.yaml"))




def load_train(folder: Path):
    import torch
    from PIL import Image
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def official_layer_norm_init(unit) -> None:
    """The official code's LayerNorm starts its gamma at uniform_() (U(0, 1)), ours at ones (the
    step bench keeps ours, its losses must equal the trainer's)."""
    import torch

    from model.networks import LayerNorm
    with torch.no_grad():
        for m in unit.modules():
            if isinstance(m, LayerNorm):
                m.gamma.uniform_()


def host() -> dict:
    """The machine a run of ours was timed on: the reference gets ours' seconds only on the same."""
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    boot = Path("/proc/sys/kernel/random/boot_id")  # one per boot: another session's VM differs
    return {"cpu": model, "cores": os.cpu_count(), "node": platform.node(),
            "boot": boot.read_text().strip() if boot.exists() else None}


def run_reference(corpus: dict, seconds: float, size: int, threads: int, seed: int = 0, marks=()):
    """The official-style loop for `seconds` of wall time; returns (generator in eval mode, steps,
    [(steps, generator)] copied when its clock first passes each of `marks` (seconds); copying
    is not charged to its clock)."""
    import torch
    from step import adam, plain, step_ref

    from model.unit import UNIT
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    unit = plain(UNIT.from_config({"preset": "official", "image_size": size}))
    official_layer_norm_init(unit)
    og, od = adam(unit.gen), adam(unit.dis)
    data = corpus["shards"].parent / "data"
    a, b = load_train(data / "trainA"), load_train(data / "trainB")
    rng = np.random.default_rng(seed)
    t0, steps, pending, snaps = time.perf_counter(), 0, sorted(marks), []
    while time.perf_counter() - t0 < seconds:
        x_a, x_b = a[rng.integers(len(a))][None], b[rng.integers(len(b))][None]
        if rng.random() < 0.5:
            x_a = x_a.flip(-1)
        if rng.random() < 0.5:
            x_b = x_b.flip(-1)
        step_ref(unit, og, od, x_a, x_b)
        steps += 1
        while pending and time.perf_counter() - t0 >= pending[0]:
            t_copy = time.perf_counter()
            snaps.append((steps, copy.deepcopy(unit.gen).eval()))
            pending.pop(0)
            t0 += time.perf_counter() - t_copy
    return unit.gen.eval(), steps, snaps


# ---------------------------------------------------------------- evaluation and tables


def evaluate(model, corpus: dict, stats, c2st_steps: int) -> dict:
    from launch.release.evaluate import EvalOptions, evaluate_translator
    return evaluate_translator(model, corpus["test_a"], corpus["test_b"], corpus["test_b"], corpus["test_a"],
                               opts=EvalOptions(baselines=stats, c2st_steps=c2st_steps))


def table(task: str, ours: dict, refs: dict[int, dict], seconds: float, steps: dict) -> str:
    """`ours`: its evaluation; `refs`: seed -> the reference's; `steps`: "ours" and each seed -> steps."""
    lines = [f"### {task}: same wall time ({seconds:.0f} s of training each)", "",
             "| translator | steps | a2b pixel acc | b2a pixel acc | a2b MAE | a2b C2ST | b2a C2ST |",
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def row(name, m, prefix="", n="-"):
        g = lambda d, k: m[d].get(prefix + k, float("nan"))  # noqa: E731
        lines.append(f"| {name} | {n} | {g('a2b', 'pixel_acc'):.3f} | {g('b2a', 'pixel_acc'):.3f} | "
                     f"{g('a2b', 'mae'):.1f} | {g('a2b', 'c2st'):.3f} | {g('b2a', 'c2st'):.3f} |")

    row("ours", ours, n=steps["ours"])
    for seed, m in refs.items():
        row(f"reference (official recipe, seed {seed})", m, n=steps[seed])
    for b in ("identity", "constant", "histmatch"):
        row(f"baseline: {b}", ours, prefix=f"{b}_")
    margin = {d: ours[d]["margin"] for d in ("a2b", "b2a")}
    ref_acc = [m["a2b"]["pixel_acc"] for m in refs.values()]
    mean = sum(ref_acc) / len(ref_acc)
    ratio = ours["a2b"]["pixel_acc"] / max(mean, 1e-9)
    against = (f"{ratio:.2f}x the reference's mean a2b ({mean:.3f} over {len(ref_acc)} seeds), "
               f"{ours['a2b']['pixel_acc'] / max(max(ref_acc), 1e-9):.2f}x its best ({max(ref_acc):.3f})"
               if len(ref_acc) > 1 else f"ours / reference a2b: {ratio:.2f}x")
    lines += ["", f"ours - strongest baseline: a2b {margin['a2b']:+.3f} ({ours['a2b']['best_baseline']}), "
                  f"b2a {margin['b2a']:+.3f} ({ours['b2a']['best_baseline']}); {against}. "
                  f"Goal: {GOALS[task]}."]
    return "\n".join(lines)


def score_task(task: str, args, out: Path, seeds: list[int]) -> str:
    """Train and score ours and the reference seeds on one task; returns its table(s)."""
    from launch.release import baselines
    from launch.release.export import load_translator
    corpus = prepare(task, out, args.n_train, args.n_test, args.size)
    doing = "taking the run of" if args.reuse_ours else "training"
    print(f"[{task}] {doing} ours ({args.ranks} CPU ranks, {config_for(args, task)}) ...", flush=True)
    export, seconds, steps = run_ours(corpus, args, args.size)
    stats = baselines.load(export / baselines.FILE_NAME)
    gen, _ = load_translator(export)
    ours, refs, counts = evaluate(gen, corpus, stats, args.c2st_steps), {}, {"ours": steps}
    points = ours_points(corpus["root"] / "ours", gen, before=steps) if args.curve else []
    print(f"[{task}] ours: {steps} steps in {seconds:.0f} s", flush=True)
    curve = [{"seconds": t, "steps": {"ours": n}, "ours": evaluate(g, corpus, stats, 0), "reference": {}}
             for n, t, g in points]
    for seed in seeds:
        print(f"[{task}] reference (seed {seed}) for the same {seconds:.0f} s ...", flush=True)
        ref_gen, counts[seed], snaps = run_reference(corpus, seconds, args.size, args.ref_threads, seed=seed,
                                                     marks=[c["seconds"] for c in curve])
        refs[seed] = evaluate(ref_gen, corpus, stats, args.c2st_steps)
        for c, (n, g) in zip(curve, snaps):
            c["steps"][seed], c["reference"][seed] = n, evaluate(g, corpus, stats, 0)
    curve.append({"seconds": seconds, "steps": counts, "ours": ours, "reference": refs})
    result = {"ours": ours, "reference": str_keys(refs), "seconds": seconds, "steps": str_keys(counts),
              "curve": [{**c, "reference": str_keys(c["reference"]), "steps": str_keys(c["steps"])} for c in curve]}
    atomic.write_json(corpus["root"] / "result.json", result)
    text = table(task, ours, refs, seconds, counts)
    return text + ("\n\n" + curve_table(task, curve, seeds) if args.curve else "")


def str_keys(d: dict) -> dict:
    """JSON keys: the seeds' ints as strings."""
    return {str(k): v for k, v in d.items()}


def curve_table(task: str, curve: list[dict], seeds: list[int]) -> str:
    """Per budget: ours and the reference seeds, a2b and b2a, and ours over the reference's mean."""
    lines = [f"### {task}: the same runs at every budget (--curve; a2b / b2a pixel accuracy)", "",
             "| training s | ours steps | ours a2b | ours b2a | reference steps | reference a2b "
             f"(seed {', '.join(map(str, seeds))}) | reference b2a (mean) | ours / reference a2b (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in curve:
        got = [s for s in seeds if s in c["reference"]]
        acc = {d: [c["reference"][s][d]["pixel_acc"] for s in got] for d in ("a2b", "b2a")}
        mean = {d: sum(v) / len(v) if v else float("nan") for d, v in acc.items()}
        lines.append(f"| {c['seconds']:.0f} | {c['steps']['ours']} | {c['ours']['a2b']['pixel_acc']:.3f} | "
                     f"{c['ours']['b2a']['pixel_acc']:.3f} | {' / '.join(str(c['steps'][s]) for s in got)} | "
                     f"{' / '.join(f'{a:.3f}' for a in acc['a2b'])} (mean {mean['a2b']:.3f}) | {mean['b2a']:.3f} | "
                     f"{c['ours']['a2b']['pixel_acc'] / max(mean['a2b'], 1e-9):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start, report = time.perf_counter(), []
    try:
        seeds = list(dict.fromkeys(int(x) for x in args.ref_seeds.split(",") if x.strip()))  # each once
    except ValueError:
        raise SystemExit(f"--ref-seeds {args.ref_seeds!r}: expected comma-separated integers") from None
    if not seeds:
        raise SystemExit("--ref-seeds: at least one seed")
    if args.curve == 1 or args.curve < 0:
        raise SystemExit(f"--curve {args.curve}: 0 (off) or at least 2 points")
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        if task not in GOALS:
            raise SystemExit(f"--tasks: unknown task {task!r} (demo, shift)")
        report.append(score_task(task, args, out, seeds))
        print("\n" + report[-1] + "\n", flush=True)
    print("\n\n".join(report))
    print(f"\nbench/quality.py: {(time.perf_counter() - t_start) / 60:.1f} min in all; outputs under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
