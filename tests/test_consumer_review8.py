"""Consumer review 8: the registered pyfunc model refuses, with an error saying what to do, a process
whose `model`, `launch` or `pipeline` modules are not its own shipped code (an application's own
model.py; another model version with different code loaded first) instead of failing obscurely or
running the other code; the same code loaded twice, and the repository's own checkout, still load.
params.tile below the model's minimum side is refused naming the param.

Real parts: a translator registered in the embedded sqlite MLflow store, loaded with
mlflow.pyfunc.load_model in subprocesses whose sys.path does not hold the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from launch.release import pyfunc_model
from launch.release.export import min_input_side
from launch.runstore.artifacts import save_translator
from launch.runstore.store import embedded_uri
from test_registry import download, register, split, tiny, trained_run  # noqa: F401  (split: fixture)
from test_tracking import make_shards_meta

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import json, sys, warnings
import numpy as np, mlflow
warnings.simplefilter("always")
caught = []
warnings.showwarning = lambda m, *a, **k: caught.append(str(m))
x = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
out = []
for uri in sys.argv[1:]:
    try:
        y = mlflow.pyfunc.load_model(uri).predict(x)
        out.append({"uri": uri, "y": y.tolist()})
    except Exception as e:
        out.append({"uri": uri, "error": f"{type(e).__name__}: {e}"})
export = sys.modules.get("launch.release.export")
json.dump({"out": out, "warnings": caught, "export_file": getattr(export, "__file__", None)},
          open("report.json", "w"))
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory, split):  # noqa: F811
    """A champion in the embedded sqlite store, its local copy, and a copy whose shipped export.py differs."""
    root = tmp_path_factory.mktemp("consumer8")
    name = f"consumer8-{uuid.uuid4().hex[:8]}"
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        run_dir = trained_run(root / "run", 0, None, make_shards_meta(root / "shards"))
        res = register(run_dir, name, split, min_accuracy=0.5)
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
    assert res["promoted"], res["reason"]
    uri = embedded_uri(run_dir)
    local = download(uri, name, res["version"], root / "local")
    same = root / "same"          # the same code in another folder (a second version of the same code)
    shutil.copytree(local, same)
    other = root / "other"        # a version whose shipped code differs
    shutil.copytree(local, other)
    p = other / "code" / "launch" / "release" / "export.py"
    src = p.read_text()
    assert "        out.append(to_uint8(y))" in src
    p.write_text(src.replace("        out.append(to_uint8(y))", "        out.append(255 - to_uint8(y))  # other code"))
    return {"uri": uri, "model": f"models:/{name}@champion", "local": local, "same": same, "other": other,
            "root": root}


def consume(reg: dict, cwd: Path, *uris, repo: bool = False, pre: str = "") -> dict:
    """Run LOAD (after `pre`) in a fresh process from `cwd`: without the repository on sys.path unless `repo`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_RUN_ID")}
    env.update(MLFLOW_TRACKING_URI=reg["uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", OMP_NUM_THREADS="1")
    if repo:
        env["PYTHONPATH"] = str(ROOT)
    cwd.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", pre + LOAD, *map(str, uris)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((cwd / "report.json").read_text())
    for o in report["out"]:
        if "y" in o:
            o["y"] = np.asarray(o["y"], dtype=np.uint8)
    return report


def test_an_app_with_its_own_model_module_is_told_what_to_do(registered):
    app = registered["root"] / "app"
    app.mkdir()
    (app / "model.py").write_text("def postprocess(x):\n    return x\n")   # the application's own helper
    report = consume(registered, app, registered["model"], pre="import sys; sys.path.insert(0, '.'); import model\n")
    (o,) = report["out"]
    err = o.get("error", "")
    assert err.startswith("ImportError: cannot load this translator: module 'model'"), err
    assert str(app / "model.py") in err and "one version per process" in err and "subprocess" in err


def test_a_second_version_with_other_code_is_refused_and_the_same_code_loads(registered):
    report = consume(registered, registered["root"] / "two", registered["model"], registered["same"],
                     registered["local"], registered["other"])
    first, same, again, other = report["out"]
    assert "y" in first and "y" in same and "y" in again, report["out"]
    assert np.array_equal(first["y"], same["y"]) and np.array_equal(first["y"], again["y"])
    err = other.get("error", "")   # before the fix: loaded, and ran the first model's export.py
    assert err.startswith("ImportError: cannot load this translator: module 'launch.release.export'"), other
    assert "/code/launch/release/export.py" in err and "one version per process" in err
    assert not [w for w in report["warnings"] if "translator" in w], report["warnings"]
    # the other version on its own runs its own code: it is the order that was refused, not the model
    alone = consume(registered, registered["root"] / "alone", registered["other"])["out"][0]
    assert np.array_equal(alone["y"], 255 - first["y"])
    # and first in a process, the champion after it is refused in turn
    swapped = consume(registered, registered["root"] / "swapped", registered["other"], registered["model"])["out"]
    assert np.array_equal(swapped[0]["y"], alone["y"])
    assert swapped[1].get("error", "").startswith("ImportError: cannot load this translator"), swapped[1]


def test_the_repository_checkout_still_loads_the_model(registered):
    """With the project on sys.path and imported first (as the translate CLI does): the same code loads
    silently; a model shipping other code runs the repository's code, with a warning naming the files."""
    pre = "import launch.release.export, model.unit\n"
    report = consume(registered, registered["root"] / "repo", registered["model"], repo=True, pre=pre)
    assert "y" in report["out"][0], report["out"]
    assert report["export_file"] == str(ROOT / "launch" / "release" / "export.py")
    assert not [w for w in report["warnings"] if "differs from the code" in w], report["warnings"]

    report = consume(registered, registered["root"] / "repo2", registered["other"], repo=True, pre=pre)
    assert "y" in report["out"][0], report["out"]
    (w,) = [w for w in report["warnings"] if "differs from the code" in w]
    assert "launch.release.export" in w and str(ROOT) in w


def test_tile_below_the_models_minimum_side_is_refused_naming_the_param(tmp_path):
    unit = tiny(0)
    cfg = {**unit.config(), "n_down": 5}
    from model.unit import UNITGenerator, make_config

    gen = UNITGenerator(make_config(cfg))
    save_translator(tmp_path / "nd5", gen, cfg, 128, 0, False)
    m = pyfunc_model.TranslatorModel()
    m.load_context(SimpleNamespace(artifacts={pyfunc_model.ARTIFACT_KEY: str(tmp_path / "nd5")},
                                   model_config={"device": "cpu"}))
    assert m.min_side == min_input_side(m.meta) > 32
    img = np.random.default_rng(0).integers(0, 256, (1, 80, 80, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=rf"params.tile: expected 0 \(never tile\) or at least {m.min_side}\b"):
        m.predict(None, img, {"tile": 32, "tile_overlap": 8})
    out = m.predict(None, img, {"tile": m.min_side, "tile_overlap": 8})
    assert out.shape == img.shape and out.dtype == np.uint8
    assert pyfunc_model.tile_params({"tile": 32, "tile_overlap": 8}, 16) == (32, 8)
    with pytest.raises(ValueError, match="params.tile: .*at least 32, got 31"):
        pyfunc_model.tile_params({"tile": 31}, 16)
