"""Register a trained translator in the MLflow model registry, gated by its test accuracy.

register_run(run_dir, ...) does, in order:
  1. evaluate RUN_DIR/export on the paired test split when one is given (launch.release.evaluate),
     unless the caller passes that evaluation (the end of training has it already);
  2. log the metrics and the translator as a self-contained pyfunc model from code
     (launch/release/pyfunc_model.py; artifacts: translator.safetensors + translator.json; code:
     SHIPPED_MODULES) to the training run named in RUN_DIR/tracking.json (a new run "-register"
     when there is none, or --tracking-uri names a store without it), with signature, input
     example, requirements (what the shipped code imports, pinned) and tags;
  3. register it under `name` and point the alias `candidate` at the new version;
  4. point `champion` at it only when the gate passes, on the gate metric test/pixel_acc_a2b
     (b2a when only that direction has truth): it must beat the strongest trivial baseline
     (launch.release.baselines, on the same test split; an export without baselines.json gets them
     from the run's training shards, else it is not promoted), reach min_accuracy, and beat the
     current champion (re-measured when the champion was scored on another split: other folders,
     size or threshold). The version tag `gate` says which rule decided.

Every MLflow call names its store through an explicit MlflowClient(tracking_uri=uri, registry_uri=uri);
only the model logging (Model.log, which also registers) goes through launch.runstore.store.fluent_uri.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from launch.release import baselines
from launch.release import evaluate as ev
from launch.runstore.artifacts import EXPORT_FILES
from launch.runstore.records import first_line, metrics_record, send
from launch.runstore.store import fluent_uri, make_client, open_run, run_tracking
from pipeline import imageio
from pipeline.storage import redact

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_ARTIFACT = "translator"
ONNX_ARTIFACT = "onnx"  # translator-a2b.onnx, translator-b2a.onnx, onnx.json (launch/release/onnx_export.py)
ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("launch", "pipeline", "model")
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# The project code the pyfunc model runs, shipped inside it (MLflow code_paths, package paths kept)
# so that it loads where only its own requirements are installed: the export's loader and
# translate_uint8, what they import, and the generator side of model/. Nothing of the trainer,
# the data pipeline or the config, whose imports (deepspeed, webdataset, albumentations,
# pydantic, PIL) a consumer should not need.
SHIPPED_MODULES = ("launch.release.export", "launch.runstore.artifacts", "pipeline.atomic", "pipeline.storage",
                   "pipeline.hashing", "pipeline.tensors", "model.unit", "model.networks", "model.kernels",
                   "model.losses")


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(absolute module name, imported at module level) for each import in `path`, the file of
    `module`; `from a import b` gives both "a" and "a.b" (b may be a module)."""
    tree = ast.parse(path.read_text())
    in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(module.split(".")[:-node.level] + [node.module or ""]) if node.level else node.module
            base = base.strip(".")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out += [(name, id(node) not in in_functions) for name in names]
    return out


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.is_file()), None)


def shipped_code() -> tuple[dict[str, Path], set[str]]:
    """({module: file} the pyfunc model carries (SHIPPED_MODULES and their packages), the third-party
    top-level modules that these and pyfunc_model.py import).

    Raises when a shipped file needs a project module that is not shipped: at module level, or
    anywhere in pyfunc_model.py (the model would fail to load where the project is not installed).
    """
    files = {}
    for mod in SHIPPED_MODULES:
        parts = mod.split(".")
        files.update({".".join(parts[:i]): ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))})
        files[mod] = ROOT.joinpath(*parts).with_suffix(".py")
    third, missing = set(), []
    for mod, path in [*files.items(), ("pyfunc_model", PYFUNC_FILE)]:
        for name, top in _imports(path, mod):
            root = name.split(".")[0]
            if root in PROJECT_PACKAGES:
                if (top or path == PYFUNC_FILE) and name not in files and _module_file(name):
                    missing.append(f"{path.relative_to(ROOT)} imports {name}")
            elif root not in sys.stdlib_module_names:
                third.add(root)
    if missing:
        raise RuntimeError("the pyfunc model would not load without the project; add to SHIPPED_MODULES: "
                           + "; ".join(missing))
    return files, third


def pinned_requirements(modules) -> list[str]:
    """The distributions that provide the top-level `modules`, pinned to the versions installed
    here, public part only (2.13.0+cpu -> 2.13.0: any build of it works)."""
    provided = metadata.packages_distributions()
    out = []
    for mod in modules:
        dists = provided.get(mod, [])
        dist = mod if mod in dists else (dists[0] if len(dists) == 1 else None)  # mlflow: not mlflow-skinny
        if dist is None:
            raise RuntimeError(f"import {mod}: no single installed distribution provides it ({dists})")
        out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
    return sorted(out)


def stage_code(files: dict[str, Path], dst: Path) -> list[str]:
    """Copy `files` under `dst` keeping their package paths; returns the top-level package folders
    (MLflow copies each code path into the model's code/ folder by its name)."""
    for path in files.values():
        out = dst / path.relative_to(ROOT)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out)
    return sorted({str(dst / path.relative_to(ROOT).parts[0]) for path in files.values()})


def log_model(uri: str, run_id: str, **kwargs):
    """mlflow.models.Model.log with the pyfunc flavour (what mlflow.pyfunc.log_model calls) into run
    `run_id` at `uri`; it registers the model too when given registered_model_name. Model.log
    takes the run by id but reads its tracking and registry URIs from MLflow's fluent settings."""
    import mlflow
    from mlflow.models import Model

    # The logged model is filed under the fluent API's experiment: name the run's, or it lands in
    # experiment 0, whose artifact root on a SQLite store is ./mlruns in the working directory.
    # MLFLOW_EXPERIMENT_NAME wins over the id in MLflow: one naming another experiment makes Model.log
    # raise (id and name disagree), one naming no experiment creates it and files the model there.
    experiment = make_client(uri).get_run(run_id).info.experiment_id
    with fluent_uri(uri), own_imports(), env_var("MLFLOW_EXPERIMENT_ID", experiment), \
            env_var("MLFLOW_EXPERIMENT_NAME", None):
        return Model.log(artifact_path=None, flavor=mlflow.pyfunc, run_id=run_id, **kwargs)


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Environment variable `name` set to `value` (None: unset) for the block, then put back."""
    saved = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def own_imports():
    """Keep this process on its own code: logging loads the model once (to check the input
    example), which puts the model's code/ (a temporary copy) on sys.path for good and may import
    the shipped modules from there."""
    path, modules = list(sys.path), set(sys.modules)
    try:
        yield
    finally:
        added = tuple(p for p in sys.path if p not in path)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if added and str(getattr(sys.modules[name], "__file__", None) or "").startswith(added):
                del sys.modules[name]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from launch.release.export import TILE, TILE_OVERLAP

    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    params = ParamSchema([ParamSpec("direction", "string", "a2b"), ParamSpec("batch_size", "long", 16),
                          ParamSpec("tile", "long", TILE), ParamSpec("tile_overlap", "long", TILE_OVERLAP)])
    return ModelSignature(inputs=images, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          params=params)


def input_example(test_dir, size: int | None) -> np.ndarray:
    """The first test image that reads (or a gradient when none does, or there is no test split) as
    a [1, H, W, 3] batch. An unusable file was left out of the evaluation with a warning already
    (evaluate.warn_skipped); it must not fail the registration here."""
    for path in imageio.image_files(test_dir) if test_dir else []:
        try:
            return imageio.read_rgb(path, size=size)[None]
        except (ValueError, OSError):  # ImageRejected / NotAnImage are ValueErrors; a vanished file: OSError
            continue
    s = size or 32
    ramp = np.linspace(0, 255, s, dtype=np.float32)
    img = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (s, 1)), np.tile(ramp[:, None], (1, s))], -1)
    return img.astype(np.uint8)[None]


def run_config_hash(run_dir: Path, run) -> str | None:
    """launch.config.config_hash of the run: the trainer's logged param, else computed from
    RUN_DIR/config.yaml (None when there is none, or it no longer validates)."""
    if run is not None:
        for src in (run.data.params, run.data.tags):
            if src.get("config_hash"):
                return src["config_hash"]
    from launch.config import ConfigError, config_hash, load_config

    try:
        return config_hash(load_config(run_dir / "config.yaml"))
    except ConfigError:
        return None


def gate_metric(metrics: dict) -> str | None:
    for key in (ev.GATE_METRIC, "test/pixel_acc_b2a"):
        if key in metrics:
            return key
    return None


class ChampionUnscorable(ValueError):
    """The champion cannot be measured on the candidate's split (a --size below its smallest side)."""


def _champion_score(client, name: str, version: str, metric: str, digest: str, pairs: dict,
                    size: int | None, threshold: int) -> float:
    """The champion's `metric` on this test split (`digest`: folders, size and threshold): its tag when
    scored on it, else re-measured at `size` with the candidate's `threshold`."""
    mv = client.get_model_version(name, version)
    if mv.tags.get("test_split") == digest and mv.tags.get(metric):
        return float(mv.tags[metric])
    from launch.release.export import load_translator, min_input_side

    with tempfile.TemporaryDirectory() as tmp:
        local = download_version(client, name, version, tmp)
        found = list(local.rglob("translator.json"))
        if not found:
            raise FileNotFoundError(f"{name} version {version}: no translator.json in its artifacts")
        gen, meta = load_translator(found[0].parent)
    need = min_input_side(meta)
    if size is not None and size < need:  # the candidate's --size fits it, not the champion: say so
        raise ChampionUnscorable(f"champion version {version} cannot be scored at --size {size}: it needs at "
                                 f"least {need} pixels per side")
    direction = metric.rsplit("_", 1)[-1]
    src, truth = pairs[direction]
    kw = {"test_a": src, "truth_b": truth} if direction == "a2b" else {"test_b": src, "truth_a": truth}
    # the same files are left out as for the candidate, which named them
    res = ev.evaluate_translator(gen, size=size, opts=ev.EvalOptions(c2st_steps=0, threshold=threshold),
                                 rejected=[], min_side=min_input_side(meta), **kw)
    return res[direction]["pixel_acc"]


def download_version(client, name: str, version: str, dst) -> Path:
    """A registered version's files, through `client`'s registry (a models:/ URI would resolve
    through MLflow's process-wide registry URI instead)."""
    import mlflow

    source = client.get_model_version_download_uri(name, version)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                    tracking_uri=client.tracking_uri))


def _current_champion(client, name: str) -> str | None:
    """The version the champion alias points at; None when the model has none yet.

    Read from the registered model's aliases, where a missing alias is simply absent: asked by alias,
    MLflow (3.17, SQL store and REST alike) answers a missing one with INVALID_PARAMETER_VALUE, the
    code of any bad argument. The model exists (its candidate was just registered), so every error
    here is a failure: a locked database or an unreachable server read as "no champion" would promote.
    """
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except Exception as e:  # noqa: BLE001 - MlflowException, and the HTTP stack's or database's own errors
        raise RuntimeError(f"champion gate: cannot read the aliases of registered model {name!r} at "
                           f"{redact(client.tracking_uri)} ({type(e).__name__}: {first_line(e)}); its new "
                           "version stays candidate, register again to gate it") from e
    return None if version is None else str(version)


def decide(client, name: str, key: str | None, metrics: dict, evaluation: dict | None, min_accuracy: float,
           digest, pairs: dict, size, threshold: int = ev.THRESHOLD) -> tuple[bool, str, dict | None]:
    """(promoted, reason, champion_before): the champion gate, rules in order, the first that fails decides.

    1. a paired test split exists; 2. the model was measured beside every trivial baseline and beats
    the strongest on the gate metric; 3. it reaches min_accuracy; 4. it beats the current champion on
    the same split (`digest`: the folders of `pairs`, `size` and the candidate's `threshold`).
    """
    if key is None:
        return False, "no paired test split: nothing to gate on", None
    value, direction = metrics[key], key.rsplit("_", 1)[-1]
    missing = [n for n in baselines.NAMES if f"test/{n}_pixel_acc_{direction}" not in metrics]
    if missing:  # identity alone is no bar: a model collapsed to one colour beats it and loses to constant
        return False, (f"baseline rule: no trivial baselines measured besides identity ({', '.join(missing)} "
                       f"missing: the export has no {baselines.FILE_NAME} and the run's config.yaml names no "
                       "readable training shards); not promoted"), None
    best = metrics[f"test/best_baseline_pixel_acc_{direction}"]
    best_name = (evaluation or {}).get(direction, {}).get("best_baseline", "strongest")
    if not value > best:
        return False, f"baseline rule: {key} {value:.4f} does not beat the {best_name} baseline's {best:.4f}", None
    beat = f"beats the {best_name} baseline ({best:.4f})"
    if value < min_accuracy:
        return False, f"min_accuracy rule: {key} {value:.4f} < {min_accuracy:.4f} ({beat})", None
    cur = _current_champion(client, name)
    if cur is None:
        return True, f"baseline rule: {key} {value:.4f} {beat}; no champion yet", None
    try:
        score = _champion_score(client, name, cur, key, digest, pairs, size, threshold)
    except ChampionUnscorable as e:  # not the candidate's fault: it stays candidate, the reason names the champion
        reason = f"champion rule: {e}, so {key} {value:.4f} cannot be compared with it ({beat})"
        return False, reason, {"version": cur, "metric": None}
    before = {"version": cur, "metric": score}
    # at the precision the champion's tag keeps (6 decimals): the same model registered again ties
    if round(value, 6) > round(score, 6):
        return True, (f"champion rule: {key} {value:.4f} > champion version {cur}'s {score:.4f} "
                      f"on the same test split; {beat}"), before
    return False, (f"champion rule: {key} {value:.4f} does not beat champion version {cur}'s "
                   f"{score:.4f} on the same test split ({beat})"), before


def register_run(run_dir, name: str = "unit-translator", test_a=None, truth_b=None, test_b=None,
                 truth_a=None, min_accuracy: float = 0.0, image_size: int | None = None,
                 tracking_uri: str | None = None, export_dir=None, evaluation: dict | None = None,
                 opts: "ev.EvalOptions | None" = None) -> dict:
    """Evaluate (unless `evaluation` is given), log, register and (when the gate passes) promote
    RUN_DIR's translator.

    `evaluation`: the result of launch.release.evaluate.evaluate_export on the same split, when the
    caller has it already (the end of training), so nothing is evaluated twice; `opts` its options
    (the threshold names the split too).

    Returns {"name", "version", "model_uri", "run_id", "tracking_uri", "aliases", "promoted",
    "reason", "metrics", "gate_metric", "champion_before", "evaluation"}.
    """
    run_dir = Path(run_dir)
    export_dir = Path(export_dir) if export_dir else run_dir / "export"
    size = image_size or None
    pairs = {d: (s, t) for d, s, t in (("a2b", test_a, truth_b), ("b2a", test_b, truth_a)) if s and t}
    opts = opts or ev.EvalOptions()
    if pairs and evaluation is None:
        opts = with_baselines(run_dir, export_dir, opts)
    res, meta = evaluate_once(export_dir, test_a, truth_b, test_b, truth_a, size, evaluation if pairs else None, opts)
    metrics = ev.flat_metrics(res) if res else {}
    digest = ev.split_digest({d: list(v) for d, v in pairs.items()}, size, opts.threshold) if pairs else None

    uri, info = run_tracking(run_dir, tracking_uri)
    client = make_client(uri)
    run_id, run = model_run(client, run_dir, info, tracking_uri)
    own_run = run_id != info.get("run_id")
    tags = version_tags(run_dir, run, meta, metrics, digest)
    rec = metrics_record(metrics, int(meta.get("step") or 0))
    if rec:
        send(client, run_id, rec)
    version = log_translator(uri, run_id, export_dir, meta, name, tags, test_a or test_b, size)
    if own_run:
        client.set_terminated(run_id)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, CANDIDATE, version)

    aliases, key = [CANDIDATE], gate_metric(metrics)
    promoted, reason, champion_before = decide(client, name, key, metrics, res, min_accuracy, digest, pairs, size,
                                               opts.threshold)
    client.set_model_version_tag(name, version, "gate", ("passed: " if promoted else "failed: ") + reason)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}", "run_id": run_id,
            "tracking_uri": redact(uri), "aliases": aliases, "promoted": promoted, "reason": reason,
            "metrics": metrics, "gate_metric": key, "champion_before": champion_before, "evaluation": res}


def model_run(client, run_dir: Path, info: dict, tracking_uri: str | None):
    """(run id, run) the model is logged to: the training run tracking.json names, else a new run just
    for the model (tracking was off or never reached the server; or --tracking-uri names another
    store than the one the run was tracked in, which does not have that run)."""
    from mlflow.exceptions import MlflowException

    run_id, record = info.get("run_id"), True
    if run_id:
        try:
            return run_id, client.get_run(run_id)
        except MlflowException as e:
            if not tracking_uri or e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # the recorded store lost the run, or gave no answer: not ours to paper over
            print(f"warning: run {run_id} (RUN_DIR/tracking.json) is not in {redact(tracking_uri)}: the model is "
                  "logged to a new run there", file=sys.stderr, flush=True)
            record = False  # tracking.json keeps naming the training run and its store
    run_id = open_run(client, run_dir, info.get("experiment") or "unit", run_name=f"{run_dir.name}-register",
                      record=record)
    return run_id, client.get_run(run_id)


def with_baselines(run_dir: Path, export_dir: Path, opts: "ev.EvalOptions") -> "ev.EvalOptions":
    """`opts` with the trivial baselines the gate needs (decide, rule 2) when neither they nor the
    export carry them: estimated from the run's training shards as the end of training does (an export
    without baselines.json is one whose finish step failed) and saved beside the export, so that the
    model ships them. Without a config naming readable shards, `opts` as given: no promotion."""
    if opts.baselines is not None or (export_dir / baselines.FILE_NAME).is_file():
        return opts  # evaluate_export reads the export's file
    from launch.config import load_config

    try:
        stats = baselines.from_config(load_config(run_dir / "config.yaml"))
    except Exception as e:  # noqa: BLE001 - a bad or missing config, unreadable shards: rule 2 refuses
        print(f"warning: {export_dir} has no {baselines.FILE_NAME} and the trivial baselines cannot be estimated "
              f"from the training shards of {run_dir / 'config.yaml'} ({type(e).__name__}: {first_line(e)}); "
              "the version is registered as candidate only", file=sys.stderr, flush=True)
        return opts
    try:
        baselines.save(export_dir / baselines.FILE_NAME, stats)
    except OSError as e:  # a read-only export: the gate has them, the model ships without them
        print(f"warning: {export_dir / baselines.FILE_NAME} not saved ({first_line(e)})", file=sys.stderr, flush=True)
    return dataclasses.replace(opts, baselines=stats)


def evaluate_once(export_dir: Path, test_a, truth_b, test_b, truth_a, size, evaluation, opts) -> tuple[dict | None, dict]:
    """(evaluation, the export's translator.json), reading the weights at most once: evaluating
    loads (and checks) them; with an evaluation given they were just evaluated; with no test
    split they are checked before they are logged."""
    from launch.release.export import load_translator
    from launch.runstore.artifacts import read_meta

    if evaluation is None and (test_a and truth_b or test_b and truth_a):
        rejected = []
        evaluation = ev.evaluate_export(export_dir, test_a, truth_b, test_b, truth_a, size=size, opts=opts,
                                        rejected=rejected)
        ev.warn_skipped(rejected)
    elif evaluation is None:
        load_translator(export_dir)  # fails early, naming the file, when the export is bad
    return evaluation, read_meta(export_dir)


def version_tags(run_dir: Path, run, meta: dict, metrics: dict, digest: str | None) -> dict[str, str]:
    """The model version's tags: source run, config hash, dataset digests, export, test metrics."""
    datasets = {f"dataset.{d.dataset.name}.digest": d.dataset.digest for d in run.inputs.dataset_inputs}
    tags = {"source_run": run.info.run_id, "config_hash": run_config_hash(run_dir, run) or "", **datasets,
            "export_step": str(meta.get("step")), "ema": str(meta.get("ema")), "image_size": str(meta.get("image_size"))}
    if digest:
        tags["test_split"] = digest
    tags.update({k: f"{v:.6f}" for k, v in metrics.items()})
    return tags


def log_translator(uri: str, run_id: str, export_dir: Path, meta: dict, name: str, tags: dict, test_dir,
                   size: int | None) -> str:
    """Log the export into the run as a pyfunc model from code (launch/release/pyfunc_model.py with
    translator.safetensors, translator.json and baselines.json as artifacts, the project code it
    runs in code/, the packages that code imports as requirements) and register it under `name`;
    returns the new version."""
    files, imported = shipped_code()
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = stage_artifacts(export_dir, Path(tmp), tags)
        info = log_model(
            uri, run_id, name=MODEL_ARTIFACT, python_model=str(PYFUNC_FILE), artifacts=artifacts,
            code_paths=stage_code(files, Path(tmp) / "code"), signature=signature(),
            input_example=(input_example(test_dir, size or meta.get("image_size")), {"direction": "a2b"}),
            pip_requirements=pinned_requirements(imported), registered_model_name=name, tags=tags,
            # logged so that a consumer's load_model(..., model_config={"device": ...}) is honoured:
            # MLflow passes on only the keys a model was logged with
            model_config={"device": "auto"},
            metadata={"translator": {k: meta[k] for k in ("image_size", "domains", "step", "ema") if k in meta}})
    return str(info.registered_model_version)


def stage_artifacts(export_dir: Path, tmp: Path, tags: dict) -> dict:
    """The model's artifacts in `tmp`: the export's files (translator, discriminators when exported,
    baselines) and, when the [onnx] extra is installed, both directions as ONNX graphs (tag `onnx`
    says which, or why not)."""
    art = tmp / MODEL_ARTIFACT
    art.mkdir()
    for f in (*EXPORT_FILES, baselines.FILE_NAME):
        if (export_dir / f).is_file():
            shutil.copy2(export_dir / f, art / f)
    artifacts = {MODEL_ARTIFACT: str(art)}
    from launch.release.onnx_export import export_onnx

    try:
        report = export_onnx(art, tmp / ONNX_ARTIFACT)  # from the staged copy: the very files logged
    except (ImportError, ValueError, RuntimeError) as e:  # no [onnx] extra, or a graph that fails its check
        tags["onnx"] = f"not exported ({str(e).splitlines()[0][:200]})"
        return artifacts
    tags["onnx"] = ", ".join(f"{d}: max abs diff {v:.2g}" for d, v in report["max_abs_diff"].items())
    artifacts[ONNX_ARTIFACT] = str(tmp / ONNX_ARTIFACT)
    return artifacts


def describe(res: dict) -> str:
    """A paragraph saying what register_run did and how to pull the model."""
    lines = [f"registered {res['name']} version {res['version']} (run {res['run_id']}) at {res['tracking_uri']}",
             f"aliases: {', '.join(res['aliases'])}; champion gate: {'passed' if res['promoted'] else 'not passed'} "
             f"({res['reason']})"]
    if res.get("evaluation"):
        lines.append(ev.format_table(res["evaluation"]))
    return "\n".join([*lines, "pull it:", *pull_lines(res["tracking_uri"], res["name"], res["aliases"])])


def pull_lines(tracking_uri: str, name: str, aliases: list[str]) -> list[str]:
    """Two commands to paste as they are: the pyfunc model translating a blank 32x32 image (it
    prints the output's shape), and the translate CLI on a folder. The URI is shown without
    user:password@ (credentials stay in the consumer's environment: MLFLOW_TRACKING_USERNAME/PASSWORD
    or MLFLOW_TRACKING_TOKEN)."""
    uri, alias = redact(tracking_uri), CHAMPION if CHAMPION in aliases else CANDIDATE
    model = f"models:/{name}@{alias}"
    # every substituted value shell-quoted (a store under "maps v2/" must not split the line), the
    # model URI a Python string literal (json's escapes are Python's) inside the quoted -c program
    code = (f"import mlflow, numpy as np; m = mlflow.pyfunc.load_model({json.dumps(model)}); "
            'print(m.predict(np.zeros((1, 32, 32, 3), np.uint8), params={"direction": "a2b"}).shape)')
    env = f"MLFLOW_TRACKING_URI={shlex.quote(uri)}"
    return [f"  {env} python -c {shlex.quote(code)}",
            f"  {env} python -m launch.release.translate --model {shlex.quote(model)} "
            "--direction a2b --in DIR --out DIR"]


def dumps(res: dict) -> str:
    return json.dumps(res, indent=2, default=str)
