"""Register a trained translator in the MLflow model registry, gated by its test accuracy.

register_run(run_dir, ...) does, in order:
  1. evaluate RUN_DIR/export on the paired test split when one is given (launch.evaluate);
  2. log the metrics and the translator as a pyfunc model from code (launch/pyfunc_model.py,
     artifacts: translator.safetensors + translator.json) to the training run named in
     RUN_DIR/tracking.json, with signature, input example, pinned requirements and tags;
  3. register it under `name` and point the alias `candidate` at the new version;
  4. point `champion` at it only when the gate passes, on the gate metric test/pixel_acc_a2b
     (b2a when only that direction has truth): it must beat the strongest trivial baseline
     (launch.baselines, on the same test split), reach min_accuracy, and beat the current
     champion (re-measured when the champion was scored on another split). The version tag
     `gate` says which rule decided.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from launch import baselines
from launch import evaluate as ev
from launch.tracking import Sender, read_tracking_json, resolve_uri

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_ARTIFACT = "translator"
REQUIREMENTS = ("torch", "numpy", "safetensors", "mlflow")


def pinned_requirements() -> list[str]:
    """The packages the pyfunc model imports, pinned to the versions here (public part only)."""
    out = []
    for pkg in REQUIREMENTS:
        version = metadata.version(pkg).split("+")[0]  # 2.13.0+cpu -> 2.13.0: any build of it works
        out.append(f"{pkg}=={version}")
    return out


@contextmanager
def using_uri(uri: str):
    """Point MLflow's fluent API (and registry) at `uri`, then restore exactly what was there.

    mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment, and restoring
    through it would pin the default store; so the module globals and the variables are put
    back by hand.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as reg_utils
    from mlflow.tracking._tracking_service import utils as trk_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = (trk_utils._tracking_uri, reg_utils._registry_uri, {k: os.environ.get(k) for k in names})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        reg_utils._registry_uri = saved[1]
        for k, v in saved[2].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    params = ParamSchema([ParamSpec("direction", "string", "a2b"), ParamSpec("batch_size", "long", 16)])
    return ModelSignature(inputs=images, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          params=params)


def input_example(test_dir, size: int | None) -> np.ndarray:
    """One test image (or a gradient when there is no test split) as a [1, H, W, 3] batch."""
    if test_dir:
        files = ev.image_files(test_dir)
        if files:
            return ev.read_image(files[0], size)[None]
    s = size or 32
    ramp = np.linspace(0, 255, s, dtype=np.float32)
    img = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (s, 1)), np.tile(ramp[:, None], (1, s))], -1)
    return img.astype(np.uint8)[None]


def config_hash(run_dir: Path, run) -> str | None:
    """The trainer's config_hash param when logged, else sha256 of RUN_DIR/config.yaml."""
    if run is not None:
        for src in (run.data.params, run.data.tags):
            if src.get("config_hash"):
                return src["config_hash"]
    cfg = run_dir / "config.yaml"
    return hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else None


def gate_metric(metrics: dict) -> str | None:
    for key in (ev.GATE_METRIC, "test/pixel_acc_b2a"):
        if key in metrics:
            return key
    return None


def _champion_score(client, name: str, version: str, metric: str, digest: str, pairs: dict,
                    size: int | None) -> float:
    """The champion's `metric` on this test split: its tag when scored on it, else re-measured."""
    mv = client.get_model_version(name, version)
    if mv.tags.get("test_split") == digest and mv.tags.get(metric):
        return float(mv.tags[metric])
    import mlflow
    from launch.export import load_translator

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        found = list(local.rglob("translator.json"))
        if not found:
            raise FileNotFoundError(f"{name} version {version}: no translator.json in its artifacts")
        gen, _ = load_translator(found[0].parent)
    direction = metric.rsplit("_", 1)[-1]
    src, truth = pairs[direction]
    kw = {"test_a": src, "truth_b": truth} if direction == "a2b" else {"test_b": src, "truth_a": truth}
    res = ev.evaluate_translator(gen, size=size, opts=ev.EvalOptions(c2st_steps=0), **kw)
    return res[direction]["pixel_acc"]


def _current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(client, name: str, key: str | None, metrics: dict, evaluation: dict | None, min_accuracy: float,
           digest, pairs: dict, size) -> tuple[bool, str, dict | None]:
    """(promoted, reason, champion_before): the champion gate, rules in order, the first that fails decides.

    1. a paired test split exists; 2. the model beats the strongest trivial baseline on the gate
    metric; 3. it reaches min_accuracy; 4. it beats the current champion on the same split.
    """
    if key is None:
        return False, "no paired test split: nothing to gate on", None
    value, direction = metrics[key], key.rsplit("_", 1)[-1]
    best = metrics.get(f"test/best_baseline_pixel_acc_{direction}")
    best_name = (evaluation or {}).get(direction, {}).get("best_baseline", "strongest")
    if best is not None and not value > best:
        return False, f"baseline rule: {key} {value:.4f} does not beat the {best_name} baseline's {best:.4f}", None
    beat = f"beats the {best_name} baseline ({best:.4f})" if best is not None else "no baselines measured"
    if value < min_accuracy:
        return False, f"min_accuracy rule: {key} {value:.4f} < {min_accuracy:.4f} ({beat})", None
    cur = _current_champion(client, name)
    if cur is None:
        return True, f"baseline rule: {key} {value:.4f} {beat}; no champion yet", None
    score = _champion_score(client, name, cur.version, key, digest, pairs, size)
    before = {"version": cur.version, "metric": score}
    # at the precision the champion's tag keeps (6 decimals): the same model registered again ties
    if round(value, 6) > round(score, 6):
        return True, (f"champion rule: {key} {value:.4f} > champion version {cur.version}'s {score:.4f} "
                      f"on the same test split; {beat}"), before
    return False, (f"champion rule: {key} {value:.4f} does not beat champion version {cur.version}'s "
                   f"{score:.4f} on the same test split ({beat})"), before


def register_run(run_dir, name: str = "unit-translator", test_a=None, truth_b=None, test_b=None,
                 truth_a=None, min_accuracy: float = 0.0, image_size: int | None = None,
                 tracking_uri: str | None = None, export_dir=None, evaluation: dict | None = None,
                 opts: "ev.EvalOptions | None" = None) -> dict:
    """Evaluate, log, register and (when the gate passes) promote RUN_DIR's translator.

    `evaluation`: the result of launch.evaluate.evaluate_export on the same split, when the caller
    has it already (the end of training), so nothing is evaluated twice.

    Returns {"name", "version", "model_uri", "run_id", "tracking_uri", "aliases", "promoted",
    "reason", "metrics", "gate_metric", "champion_before"}.
    """
    import mlflow
    from mlflow import MlflowClient

    from launch.export import META_NAME, WEIGHTS_NAME, load_translator

    run_dir = Path(run_dir)
    export_dir = Path(export_dir) if export_dir else run_dir / "export"
    gen, meta = load_translator(export_dir)  # fails early, naming the file, when the export is bad
    size = image_size or None
    pairs = {d: (s, t) for d, s, t in (("a2b", test_a, truth_b), ("b2a", test_b, truth_a)) if s and t}
    metrics, digest, res = {}, None, None
    if pairs:
        res = evaluation or ev.evaluate_export(export_dir, test_a, truth_b, test_b, truth_a, size=size, opts=opts)
        metrics = ev.flat_metrics(res)
        digest = ev.split_digest({d: list(v) for d, v in pairs.items()})

    info = read_tracking_json(run_dir)
    uri = tracking_uri or info.get("tracking_uri") or resolve_uri(run_dir, None)
    run_id = info.get("run_id")
    if not run_id:  # tracking was off or never reached the server: a run just for the model
        run_id = Sender(uri, info.get("experiment") or "unit", run_dir, f"{run_dir.name}-register").open_run(None)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with using_uri(uri):
        run = client.get_run(run_id)
        datasets = {f"dataset.{d.dataset.name}.digest": d.dataset.digest for d in run.inputs.dataset_inputs}
        tags = {"source_run": run_id, "config_hash": config_hash(run_dir, run) or "", **datasets,
                "export_step": str(meta.get("step")), "ema": str(meta.get("ema")),
                "image_size": str(meta.get("image_size"))}
        if digest:
            tags["test_split"] = digest
        tags.update({k: f"{v:.6f}" for k, v in metrics.items()})
        for k, v in metrics.items():
            client.log_metric(run_id, k, v, step=int(meta.get("step") or 0))

        with tempfile.TemporaryDirectory() as tmp:
            art = Path(tmp) / MODEL_ARTIFACT
            art.mkdir()
            for f in (WEIGHTS_NAME, META_NAME, baselines.FILE_NAME):
                if f != baselines.FILE_NAME or (export_dir / f).is_file():
                    shutil.copy2(export_dir / f, art / f)
            model_code = Path(__file__).with_name("pyfunc_model.py")
            prev_status = run.info.status
            mlflow.start_run(run_id=run_id)
            try:
                model_info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT, python_model=str(model_code), artifacts={MODEL_ARTIFACT: str(art)},
                    signature=signature(),
                    input_example=(input_example(test_a or test_b, size or meta.get("image_size")), {"direction": "a2b"}),
                    pip_requirements=pinned_requirements(), registered_model_name=name, tags=tags,
                    metadata={"translator": {k: meta[k] for k in ("image_size", "domains", "step", "ema") if k in meta}})
            finally:
                mlflow.end_run(status=prev_status)  # leave the training run as it was
        version = str(model_info.registered_model_version)
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        client.set_registered_model_alias(name, CANDIDATE, version)

        aliases = [CANDIDATE]
        key = gate_metric(metrics)
        promoted, reason, champion_before = decide(client, name, key, metrics, res, min_accuracy, digest,
                                                   pairs, size)
        client.set_model_version_tag(name, version, "gate", ("passed: " if promoted else "failed: ") + reason)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
            aliases.append(CHAMPION)
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}", "run_id": run_id,
            "tracking_uri": uri, "aliases": aliases, "promoted": promoted, "reason": reason,
            "metrics": metrics, "gate_metric": key, "champion_before": champion_before, "evaluation": res}


def describe(res: dict) -> str:
    """A paragraph saying what register_run did and how to pull the model."""
    lines = [f"registered {res['name']} version {res['version']} (run {res['run_id']}) at {res['tracking_uri']}",
             f"aliases: {', '.join(res['aliases'])}; champion gate: {'passed' if res['promoted'] else 'not passed'} "
             f"({res['reason']})"]
    if res.get("evaluation"):
        lines.append(ev.format_table(res["evaluation"]))
    alias = CHAMPION if res["promoted"] else CANDIDATE
    lines.append(f"pull it: MLFLOW_TRACKING_URI={res['tracking_uri']} python -c \"import mlflow; "
                 f"m = mlflow.pyfunc.load_model('models:/{res['name']}@{alias}'); "
                 f"print(m.predict(images_uint8_nhwc, params={{'direction': 'a2b'}}).shape)\"")
    lines.append(f"or: MLFLOW_TRACKING_URI={res['tracking_uri']} python -m launch.translate "
                 f"--model models:/{res['name']}@{alias} --direction a2b --in DIR --out DIR")
    return "\n".join(lines)


def dumps(res: dict) -> str:
    return json.dumps(res, indent=2, default=str)
