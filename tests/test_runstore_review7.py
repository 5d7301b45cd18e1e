"""Run store review 7: registering ignores MLFLOW_EXPERIMENT_NAME; a damaged first test image does not
fail registration; --tracking-uri naming another store logs the model to a new run there; two launches
creating the experiment together both start; pipe: commands and secret query parameters stay out of
params, tracking.json and the buffer."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from launch.release.registry import input_example, register_run
from launch.runstore.params import as_params, param_value
from launch.runstore.records import BUFFER_NAME
from launch.runstore.store import TRACKING_JSON, embedded_uri, without_password
from launch.runstore.tracking import Tracker
from test_registry import split, trained_run  # noqa: F401 - split is a fixture
from test_tracking import make_shards_meta

SECRET_SPEC = "pipe:curl -s -u alice:hunter2 -H 'Authorization: Bearer t0ken' https://host/a-000.tar"


# 1. MLFLOW_EXPERIMENT_NAME in the environment

@pytest.mark.parametrize("name", ["other-existing", "brand-new"])
def test_register_ignores_an_experiment_name_in_the_environment(tmp_path, split, monkeypatch, name):  # noqa: F811
    """Before: an existing other experiment made Model.log raise (id and name disagree); a new name was
    created, the model filed there, its artifacts under ./mlruns of the working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir = trained_run(tmp_path / "run", 0, None, make_shards_meta(tmp_path / "shards"))
    uri = embedded_uri(run_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if name == "other-existing":
        client.create_experiment(name)
    before = sorted(e.name for e in client.search_experiments())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    res = register_run(run_dir, name="m", test_a=split["a"], truth_b=split["b"], image_size=32)
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == name  # put back after the block
    assert sorted(e.name for e in client.search_experiments()) == before
    run_exp = client.get_run(res["run_id"]).info.experiment_id
    every = [e.experiment_id for e in client.search_experiments()]
    assert [m.experiment_id for m in client.search_logged_models(experiment_ids=every)] == [run_exp]
    assert not (tmp_path / "mlruns").exists()


# 2. a damaged first test image

def test_input_example_skips_a_damaged_first_image(tmp_path):
    folder = tmp_path / "testA"
    folder.mkdir()
    (folder / "000-damaged.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")  # sorts first
    good = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(good).save(folder / "img1.png")
    assert np.array_equal(input_example(folder, None), good[None])  # before: ImageRejected


def test_input_example_falls_back_to_the_gradient_when_nothing_reads(tmp_path):
    folder = tmp_path / "testA"
    folder.mkdir()
    (folder / "000-damaged.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    ex = input_example(folder, 24)
    assert ex.shape == (1, 24, 24, 3) and ex.dtype == np.uint8
    assert np.array_equal(ex, input_example(None, 24))


def test_register_with_a_damaged_first_test_image(tmp_path, split, monkeypatch, capsys):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    test_a, truth_b = tmp_path / "testA", tmp_path / "testB"
    shutil.copytree(split["a"], test_a)
    shutil.copytree(split["b"], truth_b)
    (test_a / "000-damaged.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    shutil.copy(next(truth_b.glob("*.png")), truth_b / "000-damaged.png")
    run_dir = trained_run(tmp_path / "run", 0, None, make_shards_meta(tmp_path / "shards"))
    res = register_run(run_dir, name="m", test_a=test_a, truth_b=truth_b, image_size=32)
    assert res["version"] == "1" and res["metrics"]["test/pixel_acc_a2b"] == 1.0
    out = capsys.readouterr()
    assert (out.out + out.err).count("000-damaged.png") == 1  # the evaluation's one warning, nothing more


# 3. --tracking-uri naming another store

def test_register_into_another_store_opens_a_run_there(tmp_path, split, monkeypatch, capsys):  # noqa: F811
    """Before: "Run with id=... not found" (the training run is in the run's embedded store)."""
    from launch.release.register import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = trained_run(tmp_path / "run", 0, None, make_shards_meta(tmp_path / "shards"))
    recorded = json.loads((run_dir / TRACKING_JSON).read_text())
    team = f"sqlite:///{tmp_path / 'team.db'}"
    assert main(["--run-dir", str(run_dir), "--tracking-uri", team, "--test-a", str(split["a"]),
                 "--truth-b", str(split["b"]), "--size", "32", "--json"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["run_id"] != recorded["run_id"] and res["tracking_uri"] == team
    assert f"run {recorded['run_id']}" in out.err and "new run" in out.err
    client = MlflowClient(tracking_uri=team, registry_uri=team)
    run = client.get_run(res["run_id"])
    assert run.info.run_name == "run-register" and run.info.status == "FINISHED"
    assert client.get_model_version("unit-translator", res["version"]).run_id == res["run_id"]
    # the run directory still names its training run and store
    assert json.loads((run_dir / TRACKING_JSON).read_text()) == recorded


def test_a_run_lost_from_the_recorded_store_still_fails(tmp_path, split, monkeypatch):  # noqa: F811
    """Only a store named on the command line may lack the run: the recorded one losing it is an error."""
    from mlflow.exceptions import MlflowException

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = trained_run(tmp_path / "run", 0, None, make_shards_meta(tmp_path / "shards"))
    info = json.loads((run_dir / TRACKING_JSON).read_text())
    (run_dir / TRACKING_JSON).write_text(json.dumps({**info, "run_id": "0123456789abcdef0123456789abcdef"}))
    with pytest.raises(MlflowException, match="not found"):
        register_run(run_dir, name="m", test_a=split["a"], truth_b=split["b"], image_size=32)


# 4. two launches creating the experiment together

def test_an_experiment_created_meanwhile_is_taken(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    exp_id = MlflowClient(uri).create_experiment("unit")  # the other launch won the race
    real, calls = MlflowClient.get_experiment_by_name, []

    def late(self, name):  # this launch looked a moment before the other created it
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", late)
    t = Tracker(uri=uri, system_metrics=False)
    run_id = t.start(tmp_path / "run")  # before: MlflowException RESOURCE_ALREADY_EXISTS
    assert t.end()
    assert run_id and MlflowClient(uri).get_run(run_id).info.experiment_id == exp_id and len(calls) == 2


def test_another_create_experiment_error_still_raises(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from launch.runstore.store import experiment_id

    def refused(self, name, artifact_location=None):
        raise MlflowException("no", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(MlflowClient, "create_experiment", refused)
    with pytest.raises(MlflowException, match="no"):
        experiment_id(MlflowClient(f"sqlite:///{tmp_path / 'x.db'}"), tmp_path, "unit")


# 5. pipe: commands as params

def test_pipe_commands_lose_their_arguments_in_params():
    params = as_params({"data": {"shards_a": SECRET_SPEC, "shards_b": [SECRET_SPEC, "/data/b-{000..009}.tar"],
                                 "root": "/data/pipe:x"}})
    assert "hunter2" not in json.dumps(params) and "t0ken" not in json.dumps(params)
    assert params["data.shards_a"] == "pipe:curl ..."
    assert json.loads(params["data.shards_b"]) == ["pipe:curl ...", "/data/b-{000..009}.tar"]
    assert params["data.root"] == "/data/pipe:x"  # only a value that is a pipe: spec
    assert param_value("pipeline") == "pipeline"


# 6. secret query parameters of the tracking URI

@pytest.mark.parametrize("uri, expected", [
    ("postgresql://mlflow@db/runs?password=s3cret", "postgresql://mlflow@db/runs"),
    ("postgresql://mlflow:s3cret@db/runs?sslmode=require&password=s3cret&application_name=unit",
     "postgresql://mlflow@db/runs?sslmode=require&application_name=unit"),
    ("https://mlflow.example.org/?token=s3cret", "https://mlflow.example.org/"),
    ("https://mlflow.example.org/?X-Api-Key=s3cret#top", "https://mlflow.example.org/#top"),
    ("postgresql://db/runs?sslmode=require", "postgresql://db/runs?sslmode=require"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
])
def test_without_password_drops_secret_query_parameters(uri, expected):
    assert without_password(uri) == expected


def test_the_buffers_open_record_keeps_no_token(tmp_path):
    from conftest import free_port

    port = free_port()
    run_dir, dead = tmp_path / "run", f"http://127.0.0.1:{port}/?token=s3cret&x=1"
    t = Tracker(uri=dead, system_metrics=False)
    t.start(run_dir)
    assert t.end(timeout=0) is False
    opening = json.loads((run_dir / BUFFER_NAME).read_text().splitlines()[0])
    assert opening["op"] == "open" and opening["tracking_uri"] == f"http://127.0.0.1:{port}/?x=1"
