"""Release-side review 8: test files and tar members whose names are not UTF-8 are digested,
printed and quarantined instead of failing the job; RUN_DIR/config.yaml keeps no password; the
evaluate CLI logs under eval/ with its split as tags, and a run it cannot log to is a warning;
printed commands quote what they substitute; a champion that cannot take the candidate's --size
fails the champion rule, naming itself.

Fast: tiny exports, fake translators, the sqlite MLflow store."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from launch.release import baselines, evaluate, finish, registry, translate
from launch.release.export import min_input_side
from launch.runstore import rundir
from pipeline.imageio import image_files
from test_translate_review7 import export  # noqa: F401  (the tiny-preset export fixture)

ROOT = Path(__file__).resolve().parents[1]

LATIN1 = b"caf\xe9"  # "café" in latin-1: no UTF-8 text, so Python holds it as a lone surrogate


def save_png(path, seed: int = 0, side: int = 32) -> None:
    """A PNG at `path` (str, or bytes for a name that is not UTF-8)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)).save(buf, "PNG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def split_with_latin1_names(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "testA", tmp_path / "testB"
    for d in (a, b):
        d.mkdir()
        save_png(d / "0.png")
        save_png(os.path.join(bytes(d), LATIN1 + b".png"), seed=1)
    return a, b


# ---------------------------------------------------------------- 1: split_digest of latin-1 names

def test_split_digest_hashes_a_name_that_is_not_utf8(tmp_path):
    a, b = split_with_latin1_names(tmp_path)
    digest = evaluate.split_digest({"a2b": [str(a), str(b)]}, 32, 16)
    assert len(digest) == 16
    # UTF-8 names digest as before the fix: a champion's test_split tag still matches
    (a / os.fsdecode(LATIN1 + b".png")).unlink()
    (b / os.fsdecode(LATIN1 + b".png")).unlink()
    h = hashlib.sha256(b"size=32\tthreshold=16\n")
    for d in (a, b):
        for p in image_files(d):
            h.update(f"a2b\t{p.name}\t".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    assert evaluate.split_digest({"a2b": [str(a), str(b)]}, 32, 16) == h.hexdigest()[:16]


# ---------------------------------------------------------------- 2: printing such names

def test_summary_and_warning_print_a_latin1_path_to_a_strict_utf8_stdout(capsys):
    bad = os.fsdecode(b"/in/" + LATIN1 + b".jpg")
    res = {"translated": 1, "seconds": 1.0, "out": "/out", "tiled": 0, "skipped": [bad],
           "rejected": [{"path": bad, "reason": "damaged"}]}
    line = translate.summary(res, "a2b", "m")
    assert "caf\\xe9.jpg" in line and line.encode("utf-8")
    evaluate.warn_skipped([f"{bad}: damaged"])
    out = capsys.readouterr().out
    assert "caf\\xe9.jpg: damaged" in out and out.encode("utf-8")


def test_translate_folder_with_a_latin1_name_exits_3_with_its_report(export, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    save_png(src / "ok.png")
    save_png(os.path.join(bytes(src), b"good" + LATIN1 + b".png"), seed=1)
    with open(os.path.join(bytes(src), LATIN1 + b".png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\ndamaged")
    env = dict(os.environ, LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    r = subprocess.run([sys.executable, "-m", "launch.release.translate", "--model", str(export), "--direction",
                        "a2b", "--in", str(src), "--out", str(tmp_path / "out"), "--no-progress",
                        "--report", str(tmp_path / "report.json")],
                       capture_output=True, text=True, errors="replace", env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "Translated 2 image(s)" in r.stdout and "caf\\xe9.png" in r.stdout
    assert (tmp_path / "report.json").is_file()
    assert sorted(os.listdir(bytes(tmp_path / "out"))) == [b"good" + LATIN1 + b".png", b"ok.png"]


# ---------------------------------------------------------------- 3: tar member keys that are not UTF-8

def test_a_tar_member_key_that_is_not_utf8_is_quarantined(export, tmp_path, capsys):
    tar_path = tmp_path / "in-000000.tar"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "PNG")
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        for name in ("ok.png", "caf\xe9.png", "zzz.png"):
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            t.addfile(info, io.BytesIO(buf.getvalue()))
    rc = translate.main(["--model", str(export), "--direction", "a2b", "--in", str(tar_path),
                         "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 3, out
    assert "Translated 2 of 3 image(s)" in out and "key is not UTF-8: 1" in out


# ---------------------------------------------------------------- 4: config.yaml without passwords

def test_config_yaml_keeps_no_password_and_the_same_config_hash(tmp_path):
    from launch.config import config_hash, load_config

    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"run_dir={run}", "tracking.uri=https://alice:s3cr3t-pw@mlflow.example.com",
        "data.shards=https://bob:hunter22@files.example.com/out?token=abc123&part=1"])
    rundir.claim_run_dir(run)
    path = rundir.write_config(run, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    text = Path(path).read_text()
    assert "s3cr3t-pw" not in text and "hunter22" not in text and "abc123" not in text
    saved = yaml.safe_load(text)
    assert saved["tracking"]["uri"] == "https://alice@mlflow.example.com"  # as tracking.json holds it
    assert saved["data"]["shards"] == "https://bob@files.example.com/out?part=1"
    # what registration reads of it (run_config_hash) is unchanged: no resume-critical key is a URL
    assert config_hash(load_config(path)) == config_hash(cfg)


def test_config_yaml_without_a_url_is_written_as_given(tmp_path):
    text = "seed: 3\ndata:\n  shards: data/shards  # a comment\n"
    assert Path(rundir.write_config(tmp_path, text)).read_text() == text


# ---------------------------------------------------------------- 5 and 7: what evaluate logs

def sqlite_run(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("unit")).info.run_id
    return uri, client, run


def fake_registered(monkeypatch, uri: str, run: str) -> None:
    info = {"kind": "mlflow", "run_id": run, "tracking_uri": uri, "name": "m", "version": "1",
            "model_uri": "models:/m/1"}
    monkeypatch.setattr(evaluate, "load_model", lambda spec, u=None, device=None: (lambda x, d: x, info))
    monkeypatch.setattr(evaluate, "baseline_stats", lambda a, m, t=None: None)


def eval_args(a: Path, b: Path, *extra) -> list[str]:
    return ["--model", "models:/m@champion", "--test-a", str(a), "--truth-b", str(b), "--c2st-steps", "0", *extra]


def test_evaluate_logs_under_eval_with_its_split_as_tags(tmp_path, monkeypatch, capsys):
    uri, client, run = sqlite_run(tmp_path)
    fake_registered(monkeypatch, uri, run)
    a, b = tmp_path / "A", tmp_path / "B"
    for d in (a, b):
        d.mkdir()
        save_png(d / "0.png")
    assert evaluate.main(eval_args(a, b, "--size", "16", "--threshold", "3")) == 0
    data = client.get_run(run).data
    assert data.metrics["eval/pixel_acc_a2b"] == 1.0
    assert not [k for k in data.metrics if k.startswith("test/")]  # the gate's names are registration's
    assert data.tags["eval/size"] == "16" and data.tags["eval/threshold"] == "3"
    assert data.tags["eval/test_split"] == evaluate.split_digest({"a2b": [str(a), str(b)]}, 16, 3)
    assert data.tags["eval/model_uri"] == "models:/m/1"
    assert "logged to run" in capsys.readouterr().out


def test_a_deleted_run_is_a_warning_and_the_exit_status_is_kept(tmp_path, monkeypatch, capsys):
    uri, client, run = sqlite_run(tmp_path)
    client.set_terminated(run)
    client.delete_run(run)
    fake_registered(monkeypatch, uri, run)
    a, b = tmp_path / "A", tmp_path / "B"
    for d in (a, b):
        d.mkdir()
        save_png(d / "0.png")
    save_png(a / "lonely.png")  # no partner: the evaluation earns exit 3
    assert evaluate.main(eval_args(a, b)) == 3
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: the scores were not logged")]
    assert len(warning) == 1 and "deleted" in warning[0]


# ---------------------------------------------------------------- 6: commands quote what they substitute

def test_pull_lines_quote_a_store_path_with_a_space():
    lines = registry.pull_lines("sqlite:////home/me/runs/maps v2/mlflow/mlflow.db", "unit demo", ["candidate"])
    words = shlex.split(lines[0])
    assert words[:3] == ["MLFLOW_TRACKING_URI=sqlite:////home/me/runs/maps v2/mlflow/mlflow.db", "python", "-c"]
    assert 'load_model("models:/unit demo@candidate")' in words[3]
    compile(words[3], "<pull>", "exec")
    words = shlex.split(lines[1])
    assert words[0].endswith("maps v2/mlflow/mlflow.db") and words[words.index("--model") + 1] == \
        "models:/unit demo@candidate"


def test_retry_command_quotes_paths_with_spaces(tmp_path):
    from launch.config import load_config

    run = tmp_path / "my run"
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run_dir={run}", f"data.test_a={tmp_path / 'test A'}",
                                                       f"data.test_b={tmp_path / 'test B'}"])
    words = shlex.split(finish.retry_command(cfg, run / "export"))
    assert words[words.index("--run-dir") + 1] == str(run)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enable": False})})
    words = shlex.split(finish.retry_command(cfg, run / "export"))
    assert words[words.index("--model") + 1] == str(run / "export")
    assert words[words.index("--test-a") + 1] == str(tmp_path / "test A")
    assert words[words.index("--truth-b") + 1] == str(tmp_path / "test B")


# ---------------------------------------------------------------- 8: a champion above the candidate's --size

def test_a_champion_that_cannot_take_the_size_fails_the_champion_rule_naming_itself(export, tmp_path, monkeypatch):
    need = min_input_side(json.loads((export / "translator.json").read_text()))
    version = SimpleNamespace(tags={})
    client = SimpleNamespace(get_registered_model=lambda name: SimpleNamespace(aliases={"champion": "7"}),
                             get_model_version=lambda name, v: version, tracking_uri="sqlite:///x")
    monkeypatch.setattr(registry, "download_version", lambda c, name, v, dst: export)
    metrics = {f"test/{n}_pixel_acc_a2b": 0.1 for n in baselines.NAMES}
    metrics.update({"test/pixel_acc_a2b": 0.9, "test/best_baseline_pixel_acc_a2b": 0.1})
    a = tmp_path / "A"
    a.mkdir()
    save_png(a / "0.png")
    promoted, reason, before = registry.decide(client, "m", "test/pixel_acc_a2b", metrics, None, 0.0, "digest",
                                               {"a2b": (str(a), str(a))}, need - 1)
    assert not promoted and before == {"version": "7", "metric": None}
    assert reason.startswith("champion rule: champion version 7 cannot be scored at --size")
    assert f"at least {need} pixels per side" in reason
