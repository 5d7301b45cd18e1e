"""init_from: a new run starts from a registered translator (or an export dir) and says so.

Real parts: a registered model version in a SQLite MLflow store, the real `deepspeed` launcher."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from launch.config import load_config
from launch.release.registry import register_run
from launch.runstore.artifacts import load_safetensors, save_translator
from launch.runstore.models import fetch_export
from launch.runstore.tracking import Tracker
from launch.training import trainer as T
from model.unit import UNIT
from trainutil import ROOT, launch, make_corpus, write_config

pytestmark = pytest.mark.slow
NAME = "unit-init"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Corpus, a SQLite store, and version 1 of NAME: a tiny UNIT at 32 px with its discriminators."""
    root = tmp_path_factory.mktemp("init")
    corpus = make_corpus(root, n_train=16, per_shard=8)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_dir = root / "source-run"
    t = Tracker(uri=uri, system_metrics=False)
    t.start(run_dir)
    assert t.end()
    torch.manual_seed(123)
    unit = UNIT.from_config({"preset": "tiny", "image_size": 32})
    save_translator(run_dir / "export", unit.gen, unit.config(), image_size=32, step=50, ema=False,
                    discriminator=unit.dis)
    res = register_run(run_dir, name=NAME, image_size=32)
    return {"corpus": corpus, "uri": uri, "unit": unit, "version": res["version"], "root": root}


def weights(run_dir, name):
    return load_safetensors(run_dir / "export" / name)[0]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_run_starts_from_the_registered_generator_and_discriminators(registered, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", registered["corpus"], run_dir, max_steps=1, ckpt_every=1000,
                       tracking={"uri": registered["uri"], "experiment": "init", "system_metrics": False})
    # Adam moves each weight by about lr per step: with 1e-9 the one step leaves the start visible.
    r = launch(cfg, f"init_from=models:/{NAME}@candidate", "optim.lr_g=1e-9", "optim.lr_d=1e-9")
    assert f"started from: models:/{NAME}@candidate (version {registered['version']})" in r.stdout
    unit = registered["unit"]
    gen = {k: v for k, v in unit.gen.state_dict().items()}
    dis = {k: v for k, v in unit.dis.state_dict().items()}
    assert max_diff(weights(run_dir, "translator.safetensors"), gen) < 1e-6
    assert max_diff(weights(run_dir, "discriminator.safetensors"), dis) < 1e-6
    origin = json.loads((run_dir / "init" / "origin.json").read_text())
    assert origin["version"] == registered["version"] and origin["discriminator"] is True
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    tags = MlflowClient(tracking_uri=registered["uri"]).get_run(run_id).data.tags
    assert tags["init_from"] == f"models:/{NAME}@candidate" and tags["init_from.version"] == registered["version"]
    assert tags["init_from.weights_sha256"] == origin["weights_sha256"]

    # A run without init_from starts from the seeded random weights, far from these: the
    # comparison above can fail.
    T.seed_all(1, 0)  # write_config's seed; the trainer seeds like this before building the model
    fresh = UNIT.from_config({"preset": "tiny", "image_size": 32})
    assert max_diff(fresh.gen.state_dict(), gen) > 1e-2


def test_export_dir_start_and_clear_refusals(registered, tmp_path):
    export = registered["root"] / "source-run" / "export"
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", registered["corpus"], run_dir, max_steps=1, ckpt_every=1000)
    # What rank 0 and then every rank do at step 0, in process: fetch into RUN_DIR/init, load.
    origin = fetch_export(str(export), run_dir / T.INIT_DIR)
    assert origin["init_from"] == str(export.resolve()) and origin["discriminator"] is True
    config = load_config(cfg, [f"init_from={export}"])
    unit = UNIT(config.model)
    T.init_weights(config, unit)
    assert max_diff(unit.gen.state_dict(), registered["unit"].gen.state_dict()) == 0.0
    assert max_diff(unit.dis.state_dict(), registered["unit"].dis.state_dict()) == 0.0

    # A folder that is no export: refused before any rank starts.
    p = subprocess.run([sys.executable, "-m", "launch.config", str(cfg), f"init_from={tmp_path}",
                        f"run_dir={tmp_path / 'new'}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "config key init_from" in p.stderr and "not an export dir" in p.stderr
    # A generator of another shape: named before any rank starts.
    p = subprocess.run([sys.executable, "-m", "launch.config", str(cfg), f"init_from={export}", "model.dim=8",
                        f"run_dir={tmp_path / 'new'}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "its generator does not fit the model section (model.dim: it has 16" in p.stderr
    # An alias that does not exist: one line from rank 0, both ranks stop, exit 2.
    cfg3 = write_config(tmp_path / "c3.yaml", registered["corpus"], tmp_path / "run3", max_steps=1,
                        tracking={"uri": registered["uri"], "system_metrics": False})
    r = launch(cfg3, f"init_from=models:/{NAME}@nope", ranks=2, check=False, timeout=120)
    assert r.returncode == 2 and "config key init_from = 'models:/unit-init@nope'" in r.stdout
