"""Review 7 of the config and shard CLIs: a comment after a mapping override, --resume (and the
trainer's --deepspeed_config) taken as the path typed rather than as YAML, flags that are not
numbers named as such, and missing inputs no longer counted as hashed on every rerun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config, parse_override
from pipeline.records import inputs_unchanged
from pipeline.shards import main as shards_main
from pipeline.sources import Input
from test_shards_review6 import make_domain, png

ROOT = Path(__file__).resolve().parent.parent
BASE = {"data": {"shards": "data/shards"}}
DEMO = str(ROOT / "configs" / "demo.yaml")


def shard_args(root, *extra, src_a=None) -> list[str]:
    return ["--src-a", src_a or f"{root}/A", "--src-b", f"{root}/B", "--out", f"{root}/out", "--no-progress", *extra]


# ---------------------------------------------------------------- 1: a comment after a mapping override

@pytest.mark.parametrize("override, comment, would_be", [
    ("data=shards: runs/exp #2", "#2", "{'shards': 'runs/exp'}"),
    ("data.augment=resize: 72 #x", "#x", "{'resize': 72}"),
    ("optim.betas=[0.5, # first\n 0.9]", "# first", "[0.5, 0.9]"),  # a comment inside the value
])
def test_a_comment_inside_or_after_a_mapping_override_is_refused(override, comment, would_be):
    with pytest.raises(ConfigError) as e:
        parse_override(override)
    msg = str(e.value)
    assert repr(override) in msg and f"YAML reads {comment!r} as a comment" in msg and would_be in msg
    # the hint quotes the text inside the value, not the whole value (which would make data a string)
    assert "inside the value" in msg
    with pytest.raises(ConfigError):
        load_config(None, [override], base=BASE)


def test_a_mapping_override_with_the_hash_quoted_or_unspaced_keeps_it():
    assert parse_override('data=shards: "runs/exp #2"') == (["data"], {"shards": "runs/exp #2"})
    assert parse_override("data=shards: runs/exp#2") == (["data"], {"shards": "runs/exp#2"})
    assert parse_override("data.augment=resize: 72") == (["data", "augment"], {"resize": 72})
    assert load_config(None, ['data={shards: "runs/exp #2"}']).data.shards == "runs/exp #2"


# ---------------------------------------------------------------- 2: --resume is a path, not YAML

RESUME_PATHS = ["runs/exp #2/ckpt/step-00000200", "[best]/ckpt/step-00000200", "2026-12-07", "on"]


@pytest.mark.parametrize("path", RESUME_PATHS)
def test_the_resume_flag_is_taken_as_the_text_typed(path):
    cfg = load_config(None, [], base=BASE, flags={"resume": path})
    assert cfg.resume == path and isinstance(cfg.resume, str)


def test_the_resume_flag_wins_over_an_override_and_none_is_not_given():
    assert load_config(None, ["resume=never"], base=BASE, flags={"resume": "auto"}).resume == "auto"
    assert load_config(None, ["resume=never"], base=BASE, flags={"resume": None}).resume == "never"


def test_a_blank_resume_flag_is_named_as_the_flag():
    with pytest.raises(ConfigError) as e:
        load_config(None, [], base=BASE, flags={"resume": " "})
    assert str(e.value) == "--resume ' ': must be 'auto', 'never' or a checkpoint directory"


@pytest.mark.parametrize("path", RESUME_PATHS[:3])
def test_the_config_cli_checks_the_resume_path_as_typed(path):
    r = subprocess.run([sys.executable, "-m", "launch.config", DEMO, "--resume", path],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    # it reaches the checkpoint check with the whole path: no override the user never typed
    assert r.returncode == 2 and f"resume = {path!r}: not a checkpoint" in r.stderr, r.stderr
    assert "override" not in r.stderr and "Traceback" not in r.stderr


def _train_config(tmp_path) -> Path:
    (tmp_path / "index.json").write_text(json.dumps({"shards": [
        {"url": f"{d}/{d}-000000.tar", "domain": d, "nsamples": 1} for d in ("a", "b")]}))
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{shards: {tmp_path}, image_size: 32, batch_size: 4}}\n"
                    f"run_dir: {tmp_path / 'run'}\nmodel: {{preset: tiny}}\n")
    return path


def test_the_trainer_takes_resume_and_deepspeed_config_as_typed(tmp_path, monkeypatch):
    import launch.train as train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ds = tmp_path / "[ds] #1.json"  # read as YAML, this was a comment and an unreadable value
    ds.write_text(json.dumps({"gradient_accumulation_steps": 1}))
    config = str(_train_config(tmp_path))
    cfg, ds_json = train.resolve(train.parse_args(["--config", config, "--deepspeed_config", str(ds)]))
    assert cfg.deepspeed_config == str(ds) and ds_json == {"gradient_accumulation_steps": 1}
    for path in RESUME_PATHS[:3]:
        with pytest.raises(ConfigError) as e:
            train.resolve(train.parse_args(["--config", config, "--resume", path]))
        assert f"resume = {path!r}: not a checkpoint" in str(e.value) and "override" not in str(e.value)


# ---------------------------------------------------------------- 3: a flag that is not a number

@pytest.mark.parametrize("flag, value, expected", [
    ("--max-per-shard", "1.5", "must be an integer >= 1, got '1.5'"),
    ("--min-side", "ten", "must be an integer >= 1, got 'ten'"),
    ("--workers", "two", "must be an integer >= 1, got 'two'"),
    ("--shard-size-mb", "big", "must be a number of MB above 0, got 'big'"),
])
def test_a_flag_that_is_not_a_number_says_what_it_must_be(tmp_path, capsys, flag, value, expected):
    make_domain(tmp_path / "A", 1, 0)
    make_domain(tmp_path / "B", 1, 100)
    with pytest.raises(SystemExit) as e:
        shards_main(shard_args(tmp_path, flag, value))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {expected}" in err and "invalid" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 4: missing inputs are not "hashed"

def _broken_link(root) -> str:
    os.symlink(root / "nowhere.png", root / "A" / "broken.png")
    return f"{root}/A"


def _missing_in_list(root) -> str:
    (root / "list.txt").write_text("A/00.png\nA/01.png\nA/missing.png\n")
    return f"{root}/list.txt"


@pytest.mark.parametrize("source", [_broken_link, _missing_in_list], ids=["broken link", "list file path"])
def test_a_missing_input_is_not_counted_as_hashed_on_reruns(tmp_path, capsys, source):
    make_domain(tmp_path / "A", 2, 0)
    make_domain(tmp_path / "B", 2, 100)
    run = shard_args(tmp_path, src_a=source(tmp_path))
    assert shards_main(run) == 3  # the missing input is quarantined
    for _ in range(2):
        capsys.readouterr()
        assert shards_main(run) == 3
        out = capsys.readouterr().out
        assert "validated 0 inputs" in out and "already complete and skipped" in out
        assert "hashed" not in out, out


def test_a_missing_input_decides_without_reading(tmp_path):
    record = {"inputs": [[str(tmp_path / "x.png"), -1, None]], "digests": [None],
              "limits": {"max_file_bytes": 2**20}}
    gone = [Input(str(tmp_path / "x.png"), -1)]
    assert inputs_unchanged(record, gone) == (True, 0)
    # it had content when the shard was made: changed, still without a read
    assert inputs_unchanged(dict(record, digests=["0" * 64]), gone) == (False, 0)
    # an input that is there and has no signature is still read and counted
    (tmp_path / "x.png").write_bytes(png(1))
    there = [Input(str(tmp_path / "x.png"), (tmp_path / "x.png").stat().st_size)]
    assert inputs_unchanged(dict(record, digests=["0" * 64]), there) == (False, 1)
