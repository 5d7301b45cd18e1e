"""Registering translators: gate to champion, no pickles, and the three consumers (pyfunc in a
fresh process with pickle loading disabled, the translate CLI, `mlflow models serve`)."""

import functools
import json
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from launch.release import baselines
from launch.release.export import translate_uint8
from launch.runstore.artifacts import save_translator
from launch.release.registry import describe, download_version, pull_lines, register_run
from launch.runstore.store import embedded_uri
from launch.runstore.tracking import Tracker
from model.unit import UNIT
from test_tracking import make_shards_meta


def same_image(a, b) -> bool:
    """Equal up to 1 level: float kernels may round differently with another batch composition."""
    a, b = np.asarray(a).astype(np.int16), np.asarray(b).astype(np.int16)
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 1 and float((a != b).mean()) < 0.01

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int) -> UNIT:
    torch.manual_seed(seed)
    return UNIT.from_config({"preset": "tiny"})


def near(seed: int, noise: float = 0.03) -> UNIT:
    """tiny(seed) with its weights nudged (fixed noise, `noise` x each tensor's mean magnitude): on the
    split below, seed 0 nudged scores about 0.8 a2b, above every trivial baseline but below seed 0."""
    unit = tiny(seed)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in unit.gen.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.abs().mean())
    return unit


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A paired test split whose B truth is model seed 0's own a2b output: that model scores 1.0
    on a2b, a model with another seed scores far less."""
    root = tmp_path_factory.mktemp("split")
    good = tiny(0).gen.eval()
    xa = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    yb = translate_uint8(good, xa, "a2b")
    for d in ("testA", "testB"):
        (root / d).mkdir()
    for i in range(3):
        Image.fromarray(xa[i]).save(root / "testA" / f"img {i}.png")   # a space in the name
        Image.fromarray(yb[i]).save(root / "testB" / f"img {i}.png")
    return {"root": root, "a": root / "testA", "b": root / "testB", "xa": xa, "yb": yb}


@functools.lru_cache(maxsize=1)
def train_stats() -> dict:
    """Baselines estimated, as the trainer does, from "training" images: other noise inputs and seed 0's
    translations of them."""
    from launch.release.baselines import DomainStats

    train_a = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    return {"a": DomainStats.empty().add(train_a),
            "b": DomainStats.empty().add(translate_uint8(tiny(0).gen.eval(), train_a, "a2b"))}


def trained_run(run_dir: Path, seed: int, uri: str | None, shards: Path, unit: UNIT | None = None,
                stats: dict | None = None, with_baselines: bool = True) -> Path:
    """A run directory as the trainer leaves it: tracked run, datasets, config, export with
    baselines.json (`stats`, else train_stats(); none when not `with_baselines`, as when the end of
    training failed); the weights of tiny(seed) unless `unit` is given."""
    t = Tracker(uri=uri, system_metrics=False)
    t.start(run_dir)
    t.log_params({"config_hash": f"cfg{seed}", "seed": seed})
    t.log_datasets(shards=shards)
    t.log_metrics({"g/total": 1.0}, 10)
    assert t.end()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    unit = unit or tiny(seed)
    save_translator(run_dir / "export", unit.gen, unit.config(), image_size=32, step=10, ema=False)
    if with_baselines:
        baselines.save(run_dir / "export" / baselines.FILE_NAME, stats or train_stats())
    return run_dir


def register(run_dir, name, split, min_accuracy):
    return register_run(run_dir, name=name, test_a=split["a"], truth_b=split["b"], test_b=split["b"],
                        truth_a=split["a"], min_accuracy=min_accuracy, image_size=32)


def download(uri: str, name: str, version: str, dst: Path) -> Path:
    return download_version(MlflowClient(tracking_uri=uri, registry_uri=uri), name, version, dst)


def consumer_env(uri: str) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    env.pop("MLFLOW_RUN_ID", None)
    # `mlflow models serve` execs `uvicorn` by name: the virtualenv's bin must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_embedded_sqlite_register_and_load(tmp_path, split, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shards = make_shards_meta(tmp_path / "shards")
    run_dir = trained_run(tmp_path / "run", 0, None, shards)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = register(run_dir, "local-translator", split, min_accuracy=0.9)
    # predict's type hint keeps MLflow's "Add type hints to the `predict` method" out of every run's log
    assert not [w for w in caught if "type hints" in str(w.message)]
    uri = embedded_uri(run_dir)
    assert res["tracking_uri"] == uri and res["promoted"] and res["aliases"] == ["candidate", "champion"]
    assert res["metrics"]["test/pixel_acc_a2b"] == 1.0
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(c.get_model_version_by_alias("local-translator", "champion").version) == res["version"]
    assert c.get_run(res["run_id"]).info.status == "FINISHED"     # left as the trainer closed it
    assert c.get_run(res["run_id"]).data.metrics["test/pixel_acc_a2b"] == 1.0
    # MLflow's process-wide URIs are as they were: registering named its store explicitly.
    import mlflow
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() != uri

    # The evaluate CLI on the registry model logs to the model's run.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from launch.release.evaluate import main as evaluate_main
    assert evaluate_main(["--model", "models:/local-translator@champion", "--test-a", str(split["a"]),
                          "--truth-b", str(split["b"])]) == 0
    hist = c.get_metric_history(res["run_id"], "eval/pixel_acc_a2b")  # not the gate's test/ (review 8)
    assert len(hist) == 1 and hist[0].value == 1.0
    assert len(c.get_metric_history(res["run_id"], "test/pixel_acc_a2b")) == 1  # registration's only

    # The "pull it" command the end of a run prints runs as pasted, from another directory.
    (cmd,) = [line for line in describe(res).splitlines() if "python -c" in line]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "(1, 32, 32, 3)"


def test_pull_lines_name_the_alias_and_never_a_password():
    lines = pull_lines("https://me:hunter2@mlflow.example.org/?token=abc", "m", ["candidate"])
    assert all("MLFLOW_TRACKING_URI=https://mlflow.example.org/ python" in line for line in lines)
    assert all("models:/m@candidate" in line for line in lines) and "hunter2" not in "".join(lines)
    assert "abc" not in "".join(lines)
    assert "models:/m@champion" in pull_lines("sqlite:////x/mlflow.db", "m", ["candidate", "champion"])[0]
    assert "MLFLOW_TRACKING_URI=sqlite:////x/mlflow.db python" in pull_lines("sqlite:////x/mlflow.db", "m", [])[1]


def test_register_reads_the_export_once_and_takes_a_given_evaluation(tmp_path, split, monkeypatch):
    """Tracking was off (no tracking.json): a run is made just for the model and closed. Evaluating
    reads the exported weights once; with the evaluation given they are not evaluated again."""
    import launch.release.export as export
    from launch.release import evaluate as ev

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, unit = tmp_path / "run", tiny(0)
    save_translator(run_dir / "export", unit.gen, unit.config(), image_size=32, step=10, ema=False)
    baselines.save(run_dir / "export" / baselines.FILE_NAME, train_stats())
    reads, read = [], export.read_translator
    monkeypatch.setattr(export, "read_translator",
                        lambda d, *a, **k: reads.append(Path(d).resolve()) or read(d, *a, **k))
    res = register(run_dir, "once", split, min_accuracy=0.0)
    assert reads.count((run_dir / "export").resolve()) == 1
    uri = embedded_uri(run_dir)
    run = MlflowClient(tracking_uri=uri).get_run(res["run_id"])
    assert run.info.run_name == "run-register" and run.info.status == "FINISHED"
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == res["run_id"]

    def no_second_evaluation(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(ev, "evaluate_export", no_second_evaluation)
    reads.clear()
    given = {"a2b": {**res["evaluation"]["a2b"], "pixel_acc": 0.5}, "b2a": res["evaluation"]["b2a"]}
    again = register_run(run_dir, name="once", test_a=split["a"], truth_b=split["b"], test_b=split["b"],
                         truth_a=split["a"], image_size=32, evaluation=given)
    assert again["metrics"]["test/pixel_acc_a2b"] == 0.5 and again["evaluation"] is given
    assert not again["promoted"] and again["reason"].startswith("champion rule")
    assert (run_dir / "export").resolve() not in reads


def test_gate_needs_the_strongest_baseline_then_the_champion(tmp_path, split, monkeypatch):
    """Three registrations in one sqlite store, each export carrying baselines.json (estimated, as the
    trainer does, from "training" images: other noise inputs and seed 0's translations of them)."""
    from mlflow.exceptions import MlflowException

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    store.mkdir()
    uri, name = f"sqlite:///{store / 'mlflow.db'}", "gated-translator"
    shards = make_shards_meta(tmp_path / "shards")
    stats = train_stats()
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # 1. No champion yet and min_accuracy 0, but it does not beat the most-frequent-colour baseline:
    #    it stays a candidate (the old gate promoted any first model).
    r1 = register(trained_run(tmp_path / "bad", 1, uri, shards, stats=stats), name, split, min_accuracy=0.0)
    m = r1["metrics"]
    assert m["test/best_baseline_pixel_acc_a2b"] == m["test/constant_pixel_acc_a2b"] > m["test/pixel_acc_a2b"]
    assert m["test/margin_a2b"] < 0
    assert not r1["promoted"] and r1["aliases"] == ["candidate"] and r1["champion_before"] is None
    gate = c.get_model_version(name, r1["version"]).tags["gate"]
    assert gate.startswith("failed: baseline rule") and "the constant baseline's" in gate
    with pytest.raises(MlflowException):
        c.get_model_version_by_alias(name, "champion")
    assert "LOSES TO the strongest baseline (constant)" in describe(r1)

    # 2. Beats every baseline, no champion yet: champion. Its baselines travel in the model artifact.
    r2 = register(trained_run(tmp_path / "good", 0, uri, shards, stats=stats), name, split, min_accuracy=0.5)
    assert r2["promoted"] and r2["aliases"] == ["candidate", "champion"]
    assert r2["metrics"]["test/pixel_acc_a2b"] == 1.0 > r2["metrics"]["test/best_baseline_pixel_acc_a2b"]
    gate = c.get_model_version(name, r2["version"]).tags["gate"]
    assert gate.startswith("passed: baseline rule") and "no champion yet" in gate
    local = download(uri, name, r2["version"], tmp_path / "dl")
    shipped = next(local.rglob(baselines.FILE_NAME))
    assert np.array_equal(baselines.load(shipped)["b"].hist, stats["b"].hist)

    # 3. Beats the baselines but not the champion on the same split: candidate, champion unchanged.
    r3 = register(trained_run(tmp_path / "close", 2, uri, shards, unit=near(0), stats=stats), name, split,
                  min_accuracy=0.0)
    m = r3["metrics"]
    assert m["test/best_baseline_pixel_acc_a2b"] < m["test/pixel_acc_a2b"] < 1.0
    assert not r3["promoted"] and r3["aliases"] == ["candidate"]
    assert str(r3["champion_before"]["version"]) == r2["version"] and r3["champion_before"]["metric"] == 1.0
    gate = c.get_model_version(name, r3["version"]).tags["gate"]
    assert gate.startswith("failed: champion rule") and "beats the constant baseline" in gate
    assert str(c.get_model_version_by_alias(name, "champion").version) == r2["version"]
    assert str(c.get_model_version_by_alias(name, "candidate").version) == r3["version"]


@pytest.mark.slow
def test_server_gate_artifacts_and_consumers(server_up, tmp_path, split):
    uri, name = server_up.uri, f"unit-{uuid.uuid4().hex[:8]}"
    r2 = check_gate_on_server(uri, name, tmp_path, split)
    check_version_tags_and_artifacts(uri, name, r2, tmp_path)
    check_three_consumers(uri, name, tmp_path, split)


def check_gate_on_server(uri: str, name: str, tmp_path: Path, split: dict) -> dict:
    """Three registrations on the server: candidate only, champion, then worse than the champion
    (through the CLI). Returns the champion's registration."""
    shards = make_shards_meta(tmp_path / "shards")
    # "bad" is tracked through a URI with basic-auth credentials (the server ignores them): never shown
    secret_uri = uri.replace("://", "://me:hunter2@", 1)
    bad = trained_run(tmp_path / "bad", 1, secret_uri, shards, unit=near(0))   # beats identity, not seed 0
    good = trained_run(tmp_path / "good", 0, uri, shards)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # 1. Beats the strongest baseline but is below the threshold: candidate only.
    r1 = register(bad, name, split, min_accuracy=0.99)
    assert r1["version"] == "1" and r1["aliases"] == ["candidate"] and not r1["promoted"]
    assert r1["tracking_uri"] == uri and "hunter2" not in describe(r1)
    best = r1["evaluation"]["a2b"]["best_baseline"]
    assert r1["reason"].startswith("min_accuracy rule") and f"beats the {best} baseline" in r1["reason"]
    assert c.get_model_version(name, "1").tags["gate"].startswith("failed: min_accuracy rule")
    with pytest.raises(Exception):
        c.get_model_version_by_alias(name, "champion")

    # 2. Passes the threshold, no champion yet: champion.
    r2 = register(good, name, split, min_accuracy=0.5)
    assert r2["version"] == "2" and r2["promoted"] and r2["aliases"] == ["candidate", "champion"]

    # 3. Passes the threshold but is worse than the champion on the same split (through the CLI).
    proc = subprocess.run([sys.executable, "-m", "launch.release.register", "--run-dir", str(bad), "--name", name,
                           "--test-a", str(split["a"]), "--truth-b", str(split["b"]), "--min-accuracy", "0",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:1"))  # tracking.json wins
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hunter2" not in proc.stdout + proc.stderr
    r3 = json.loads(proc.stdout)
    assert r3["version"] == "3" and not r3["promoted"] and str(r3["champion_before"]["version"]) == "2"
    assert r3["reason"].startswith("champion rule")
    assert str(c.get_model_version_by_alias(name, "candidate").version) == "3"
    assert str(c.get_model_version_by_alias(name, "champion").version) == "2"
    return r2


def check_version_tags_and_artifacts(uri: str, name: str, r2: dict, tmp_path: Path) -> None:
    """Version 2's tags (lineage, config hash, metrics, source run) and its pickle-free artifacts."""
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = c.get_model_version(name, "2")
    run = c.get_run(r2["run_id"])
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert mv.tags["source_run"] == r2["run_id"] == mv.run_id
    assert mv.tags["dataset.shards-a.digest"] == digests["shards-a"]
    assert mv.tags["dataset.shards-b.digest"] == digests["shards-b"]
    assert mv.tags["config_hash"] == "cfg0" and float(mv.tags["test/pixel_acc_a2b"]) == 1.0
    assert mv.tags["gate"].startswith("passed")

    # The registered artifacts hold no pickle; the model loads from code.
    local = download(uri, name, "2", tmp_path / "dl")
    files = [p for p in local.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle")]
    assert {"translator.safetensors", "translator.json", "pyfunc_model.py"} <= {p.name for p in files}
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor            # no cloudpickled PythonModel file
    reqs = (local / "requirements.txt").read_text().split()
    assert reqs and all("==" in r for r in reqs) and any(r.startswith("torch==") for r in reqs)
    sig = yaml.safe_load((local / "MLmodel").read_text())["signature"]
    assert "direction" in sig["params"] and "uint8" in sig["inputs"]


def check_three_consumers(uri: str, name: str, tmp_path: Path, split: dict) -> None:
    """pyfunc in a fresh process, the translate CLI on a folder and `mlflow models serve` all give
    the champion's (seed 0's) translations."""
    expected = translate_uint8(tiny(0).gen.eval(), split["xa"], "a2b")
    env = consumer_env(uri)
    from conftest import free_port, stop_group, wait_http

    # The three consumers are separate processes that only read the registry: they start together
    # (each spends most of its time importing) and are checked one after the other.
    src = consumer_inputs(tmp_path, split["xa"])
    port = free_port()
    log = tmp_path / "serve.log"
    procs = []

    def start(cmd, **kw):
        procs.append(subprocess.Popen(cmd, cwd=kw.pop("cwd", ROOT), env=env, start_new_session=True, **kw))
        return procs[-1]

    try:
        # Consumer 3: `mlflow models serve`, started first (it takes longest to answer).
        with open(log, "w") as f:
            serve = start([str(Path(sys.executable).with_name("mlflow")), "models", "serve",
                           "-m", f"models:/{name}@champion", "-h", "127.0.0.1", "-p", str(port),
                           "--env-manager", "local", "-w", "1"], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
        # Consumer 1: a fresh process, pickle loading disabled.
        pyfunc = start([sys.executable, "-c", f"""
import numpy as np, mlflow
m = mlflow.pyfunc.load_model("models:/{name}@champion")
y = m.predict(np.load(r"{tmp_path / 'x.npy'}"), params={{"direction": "a2b"}})
np.save(r"{tmp_path / 'y.npy'}", y)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Consumer 2: the translate CLI on a folder (nested, plus a file that is not an image).
        cli = start([sys.executable, "-m", "launch.release.translate", "--model", f"models:/{name}@champion",
                     "--direction", "a2b", "--in", str(src), "--out", str(tmp_path / "out"), "--batch-size", "2"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        _, err = pyfunc.communicate(timeout=120)
        assert pyfunc.returncode == 0, err[-3000:]
        y = np.load(tmp_path / "y.npy")
        assert y.dtype == np.uint8 and same_image(y, expected)

        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 0, err[-3000:]
        assert "Translated 3 image(s)" in out and "1 file(s) skipped" in out
        for i in range(3):
            got = tmp_path / "out" / ("sub" if i == 2 else "") / f"tile {i}.png"
            assert same_image(Image.open(got), expected[i])
        assert not (tmp_path / "out" / "readme.txt").exists()

        wait_http(f"http://127.0.0.1:{port}/ping", 120, serve, log)
        check_served(f"http://127.0.0.1:{port}/invocations", split["xa"], expected)
    finally:
        for proc in procs:
            stop_group(proc)


def consumer_inputs(tmp_path: Path, xa: np.ndarray) -> Path:
    """x.npy for the pyfunc consumer; a folder for the CLI: two images, one in a sub-folder, and a
    file that is not an image. Returns the folder."""
    np.save(tmp_path / "x.npy", xa)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(xa[i]).save((src / "sub" if i == 2 else src) / f"tile {i}.png")
    (src / "readme.txt").write_text("not an image")
    return src


def check_served(url: str, xa: np.ndarray, expected: np.ndarray) -> None:
    """The served model answers both directions as seed 0's generator translates."""
    import requests
    resp = requests.post(url, timeout=60, json={"inputs": xa[:2].tolist(), "params": {"direction": "a2b"}})
    assert resp.status_code == 200, resp.text[:2000]
    pred = np.asarray(resp.json()["predictions"])
    assert pred.shape == (2, 32, 32, 3) and same_image(pred, expected[:2])
    resp = requests.post(url, timeout=60, json={"inputs": xa[:1].tolist(), "params": {"direction": "b2a"}})
    assert resp.status_code == 200
    b2a = translate_uint8(tiny(0).gen.eval(), xa[:1], "b2a")
    assert same_image(resp.json()["predictions"], b2a)
