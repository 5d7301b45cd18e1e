"""A consumer with MLflow and PyTorch but not this project: the champion registered in a real
`mlflow server` loads and serves from a fresh virtual environment built from the model's own
requirements.txt, run from a folder outside the project with PYTHONPATH unset and pickle loading
disabled, and translates exactly as the project does.

The environment is built once per session by `mlflow models prepare-env` with MLflow's default
env manager (virtualenv: pyenv's Python of the model's python_env.yaml, `python -m venv`, then
pip with this machine's settings, the ones `make setup` uses, on the model's requirements.txt).
`mlflow models serve` without --env-manager then finds that environment and serves from it.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import free_port, stop_group, wait_http
from launch.release.export import load_translator, translate_uint8
from launch.release.registry import download_version
from test_layout import imported
from test_registry import register, tiny, trained_run
from test_tracking import make_shards_meta

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("launch", "pipeline", "model")


def consumer_env(uri: str, env_root: Path, venv: Path | None = None) -> dict:
    """The consumer's environment: no PYTHONPATH, pickle loading off, the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_RUN_ID", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", MLFLOW_ENV_ROOT=str(env_root),
               PIP_COMPILE="0",   # no byte-compiling at install: what is imported compiles on first use
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")   # as project_translation: the same float sums
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def project_translation(export_dir: Path, x: np.ndarray, direction: str) -> np.ndarray:
    """The project's own translation, on one thread like the consumer's processes: float sums split
    over a varying number of threads (MKL's dynamic threading on a busy machine) may round a pixel
    differently, and the comparisons here are exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return translate_uint8(load_translator(export_dir)[0], x, direction)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def champion(mlflow_server, tmp_path_factory):
    """tiny(0) registered as champion on a paired split where it is perfect a2b."""
    if not mlflow_server.running:
        mlflow_server.start()
    root = tmp_path_factory.mktemp("consumer")
    x = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y = translate_uint8(tiny(0).gen.eval(), x, "a2b")
    for d, imgs in (("testA", x), ("testB", y)):
        (root / d).mkdir()
        for i, img in enumerate(imgs):
            Image.fromarray(img).save(root / d / f"{i}.png")
    name = f"consumer-{uuid.uuid4().hex[:8]}"
    run_dir = trained_run(root / "run", 0, mlflow_server.uri, make_shards_meta(root / "shards"))
    res = register(run_dir, name, {"a": root / "testA", "b": root / "testB"}, min_accuracy=0.5)
    assert res["promoted"], res["reason"]
    return {"uri": mlflow_server.uri, "name": name, "model": f"models:/{name}@champion", "root": root,
            "export": run_dir / "export", "x": x}


@pytest.fixture(scope="session")
def consumer_venv(champion):
    """The model's own environment: (venv folder, MLFLOW_ENV_ROOT, built by MLflow), removed afterwards.

    Built by `mlflow models prepare-env` with MLflow's default env manager when pyenv is on PATH
    (it needs pyenv with the model's Python), else by hand: `python -m venv`, then pip on the
    model's requirements.txt."""
    env_root, cwd = champion["root"] / "envs", champion["root"]
    env = consumer_env(champion["uri"], env_root)
    if shutil.which("pyenv"):
        cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "prepare-env", "-m", champion["model"]]
    else:
        from mlflow import MlflowClient

        c = MlflowClient(tracking_uri=champion["uri"], registry_uri=champion["uri"])
        version = c.get_model_version_by_alias(champion["name"], "champion").version
        local = download_version(c, champion["name"], version, cwd / "model")
        venv = env_root / "by-hand"
        cmd = ["bash", "-c", f'"{Path(sys.base_prefix) / "bin" / "python3"}" -m venv "{venv}" && '
                             f'"{venv}/bin/pip" install -q -r "{local / "requirements.txt"}"']
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    venvs = [p.parent.parent for p in env_root.glob("*/bin/python")]
    assert len(venvs) == 1, venvs
    yield venvs[0], env_root, venvs[0].name != "by-hand"
    shutil.rmtree(env_root, ignore_errors=True)   # about 1.5 GB; pytest keeps its last 3 sessions' folders


@pytest.fixture(scope="session")
def in_venv(champion, consumer_venv):
    """What the consumer's Python (the fresh venv, outside the project) gets from
    mlflow.pyfunc.load_model(models:/NAME@champion).predict, in both directions."""
    venv, env_root, _ = consumer_venv
    work = champion["root"] / "elsewhere"
    work.mkdir()
    np.save(work / "x.npy", champion["x"])
    script = """
import importlib.util, json, sys
import numpy as np
found = {p: importlib.util.find_spec(p) is not None for p in sys.argv[1].split(",")}
import mlflow
m = mlflow.pyfunc.load_model(sys.argv[2])
x = np.load("x.npy")
for d in ("a2b", "b2a"):
    np.save(f"{d}.npy", m.predict(x, params={"direction": d}))
json.dump({"before_load": found, "export_file": sys.modules["launch.release.export"].__file__},
          open("report.json", "w"))
"""
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", script, ",".join(PROJECT), champion["model"]],
                          cwd=work, env=consumer_env(champion["uri"], env_root, venv), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((work / "report.json").read_text())
    return {**out, **{d: np.load(work / f"{d}.npy") for d in ("a2b", "b2a")}}


@pytest.mark.slow
def test_champion_loads_in_a_fresh_venv_and_translates_as_the_project_does(champion, consumer_venv, in_venv):
    venv, _, _ = consumer_venv
    site = next((venv / "lib").glob("python*/site-packages"))
    for absent in ("unit_translate*", "deepspeed*", "webdataset*", "albumentations*"):   # only the requirements
        assert not list(site.glob(absent)), absent
    assert not any(in_venv["before_load"].values()), in_venv["before_load"]   # no project to import
    assert "/code/launch/release/export.py" in in_venv["export_file"]           # the shipped copy ran
    assert not Path(in_venv["export_file"]).is_relative_to(ROOT)
    for d in ("a2b", "b2a"):
        assert in_venv[d].dtype == np.uint8 and in_venv[d].shape == champion["x"].shape
        assert np.array_equal(in_venv[d], project_translation(champion["export"], champion["x"], d)), d


@pytest.mark.slow
@pytest.mark.parametrize("env_manager", ["default"])  # MLflow's own: it finds the prepared env
def test_serve_from_the_venv_answers_as_the_model_loaded_in_process(champion, consumer_venv, in_venv, env_manager,
                                                                    mlflow_server, tmp_path):
    """`mlflow models serve` from the venv: --env-manager local, and MLflow's default (virtualenv),
    which finds the environment prepare-env built and serves from it."""
    venv, env_root, by_mlflow = consumer_venv
    if env_manager == "default" and not by_mlflow:
        pytest.skip("pyenv is not on PATH: MLflow's default (virtualenv) env manager cannot build the model's env")
    if not mlflow_server.running:
        mlflow_server.start()
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [str(venv / "bin" / "mlflow"), "models", "serve", "-m", champion["model"], "-h", "127.0.0.1",
           "-p", str(port), "-w", "1"] + (["--env-manager", "local"] if env_manager == "local" else [])
    with open(log, "w") as f:
        serve = subprocess.Popen(cmd, cwd=tmp_path, env=consumer_env(champion["uri"], env_root, venv), stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, serve, log)
        import requests

        for d in ("a2b", "b2a"):
            resp = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                                 json={"inputs": champion["x"].tolist(), "params": {"direction": d}})
            assert resp.status_code == 200, resp.text[:2000]
            assert np.array_equal(np.asarray(resp.json()["predictions"]), in_venv[d]), d
    finally:
        stop_group(serve)
    if env_manager == "default":
        text = log.read_text()
        assert f"Environment {venv} already exists" in text, text[-3000:]   # no second build


@pytest.mark.slow
def test_mlmodel_lists_the_code_and_requirements_are_what_it_imports(champion, tmp_path):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=champion["uri"], registry_uri=champion["uri"])
    version = c.get_model_version_by_alias(champion["name"], "champion").version
    local = download_version(c, champion["name"], version, tmp_path / "dl")
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["code"] == "code" and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["config"] == {"device": "auto"}  # so a consumer's model_config={"device": ...} is kept
    shipped = sorted(str(p.relative_to(local / "code")) for p in (local / "code").rglob("*") if p.is_file())
    assert shipped == sorted([
        "launch/__init__.py", "launch/release/__init__.py", "launch/release/export.py",
        "launch/runstore/__init__.py", "launch/runstore/artifacts.py",
        "pipeline/__init__.py", "pipeline/atomic.py", "pipeline/storage.py", "pipeline/hashing.py",
        "pipeline/tensors.py", "model/__init__.py", "model/unit.py", "model/networks.py", "model/kernels.py",
        "model/losses.py"])
    for rel in shipped:   # each a copy of the project's file
        assert (local / "code" / rel).read_text() == (ROOT / rel).read_text(), rel

    # requirements.txt: exactly the third-party packages the shipped code and the pyfunc file import,
    # pinned to public versions a consumer can install (torch==2.13.0, not 2.13.0+cpu).
    mods = set()
    for path in [local / "pyfunc_model.py", *(local / "code").rglob("*.py")]:
        mods |= {n.split(".")[0] for n in imported(path)}
    third = {m for m in mods if m not in sys.stdlib_module_names and m not in PROJECT}
    assert third == {"fsspec", "mlflow", "numpy", "safetensors", "torch"}  # fsspec: pipeline.storage, for URLs only
    reqs = dict(line.split("==") for line in (local / "requirements.txt").read_text().split())
    assert set(reqs) == third
    from importlib import metadata
    assert all(v == metadata.version(k).split("+")[0] and "+" not in v for k, v in reqs.items()), reqs
    assert yaml.safe_load((local / "python_env.yaml").read_text())["dependencies"] == ["-r requirements.txt"]
    sig = yaml.safe_load((local / "MLmodel").read_text())["signature"]
    assert "direction" in sig["params"] and "uint8" in sig["inputs"]
    assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]


def test_a_module_the_shipped_code_needs_but_does_not_ship_stops_logging(monkeypatch):
    """Caught before anything is logged: such a model would load only where the project is installed."""
    from launch.release import registry

    files, third = registry.shipped_code()
    assert {"launch.release.export", "pipeline.tensors", "model.unit"} <= set(files)
    assert third == {"fsspec", "mlflow", "numpy", "safetensors", "torch"}  # fsspec: pipeline.storage, for URLs only
    fewer = tuple(m for m in registry.SHIPPED_MODULES if m != "pipeline.tensors")
    monkeypatch.setattr(registry, "SHIPPED_MODULES", fewer)
    with pytest.raises(RuntimeError, match="launch/release/export.py imports pipeline.tensors"):
        registry.shipped_code()
