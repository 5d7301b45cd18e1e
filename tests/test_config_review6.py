"""Review 6 of the training config: the scale the generator is fed whole, seeds, override values YAML
cannot read (or would cut at a comment), 1e-2 as a number, resume after harmless changes, a DeepSpeed
JSON's shape and train_batch_size, half a test split, registration skipped without tracking, and
overrides on both sides of the flags."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import (RESUMABLE_CHANGES, ConfigError, check, deepspeed_config, load_config, load_ds_json,
                           main, parse_override, resume_differences)
from pipeline.augment import AugmentConfig

ROOT = Path(__file__).resolve().parent.parent
BASE = {"data": {"shards": "data/shards"}}


def _ds(cfg, ds_json, world=None):
    return deepspeed_config(cfg, ds_json, lr=cfg.optim.lr_g, on_gpu=False, bf16_ok=False, world=world)


# ---------------------------------------------------------------- 1: the scale is a multiple of 2**n_down

def test_paper_config_scale_is_a_multiple_of_the_generator_input():
    from model.unit import UNIT

    cfg = load_config(ROOT / "configs" / "paper.yaml", ["model.dim=8", "model.dis_dim=8"])
    gen = UNIT(cfg.model).gen
    assert cfg.data.scale() == 288 and cfg.data.scale() % gen.input_multiple == 0


@pytest.mark.parametrize("overrides, nearest", [
    (["data.image_size=256", "data.augment.resize=286"], "284 or 288"),
    (["data.image_size=256", "data.augment.resize=257"], "256 or 260"),
    (["data.image_size=64", "model.n_down=3", "data.augment.resize=70"], "64 or 72"),
])
def test_a_scale_the_generator_cannot_take_whole_is_refused(overrides, nearest):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, base=BASE)
    msg = str(e.value)
    assert "data.augment.resize" in msg and "2**model.n_down" in msg and f"nearest valid: {nearest}" in msg
    assert load_config(None, ["data.image_size=256", "data.augment.resize=288"], base=BASE).data.scale() == 288


# ---------------------------------------------------------------- 2: seed

def test_negative_seed_is_refused_before_the_loader_sees_it(tmp_path):
    with pytest.raises(ConfigError, match=r"seed = -1: .*greater than or equal to 0"):
        load_config(None, ["seed=-1"], base=BASE)
    assert load_config(None, ["seed=0"], base=BASE).seed == 0
    # the CLI exits 2 with the key named (it died in the palette measurement's numpy RNG before)
    assert main([str(ROOT / "configs" / "demo.yaml"), "seed=-1", f"run_dir={tmp_path}/r"]) == 2


# ---------------------------------------------------------------- 3: override values and the DeepSpeed JSON

@pytest.mark.parametrize("override", ["tracking.run_name=@alice", "run_dir=`pwd`/runs", "tracking.run_name=[draft",
                                      "run_dir=*scratch"])
def test_override_values_yaml_cannot_read_are_config_errors(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], base=BASE)
    assert repr(override) in str(e.value) and "not valid YAML" in str(e.value) and "quote the value" in str(e.value)


@pytest.mark.parametrize("override, comment", [("run_dir=runs/exp #2", "#2"), ("tracking.run_name=#3", "#3"),
                                               ("optim.betas=[0.5, 0.9] # paper", "# paper")])
def test_override_with_a_yaml_comment_is_refused_not_cut(override, comment):
    with pytest.raises(ConfigError) as e:
        parse_override(override)
    assert repr(override) in str(e.value) and repr(comment) in str(e.value) and "comment" in str(e.value)


def test_quoted_and_hash_inside_values_are_strings():
    assert parse_override('run_dir="runs/exp #2"') == (["run_dir"], "runs/exp #2")
    assert parse_override("run_dir=runs/exp#2") == (["run_dir"], "runs/exp#2")  # no space: not a comment
    assert parse_override('tracking.run_name="@alice"') == (["tracking", "run_name"], "@alice")
    assert parse_override("optim.betas=[0.5, 0.9]  ") == (["optim", "betas"], [0.5, 0.9])
    assert parse_override("tracking.run_name=") == (["tracking", "run_name"], None)


def test_a_string_key_given_a_yaml_non_string_says_how_to_quote():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["resume=no"], base=BASE)
    assert "resume = False" in str(e.value) and "quote it" in str(e.value)


def test_cli_exits_2_on_an_unreadable_override():
    r = subprocess.run([sys.executable, "-m", "launch.config", str(ROOT / "configs" / "demo.yaml"),
                        "tracking.run_name=@alice"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "tracking.run_name=@alice" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("ds_json, named", [
    ([1, 2], "must hold a JSON object"),
    ({"zero_optimization": 1}, "zero_optimization = 1: must be an object"),
    ({"fp16": True}, "fp16 = true: must be an object"),
    ({"optimizer": {"type": "Adam", "params": [1]}}, "optimizer.params = [1]: must be an object"),
    ({"gradient_accumulation_steps": "2"}, 'gradient_accumulation_steps = "2": must be an integer >= 1'),
    ({"zero_optimization": {"stage": "1"}}, 'zero_optimization.stage = "1": must be an integer'),
    ({"gradient_clipping": "x"}, 'gradient_clipping = "x": must be a number >= 0'),
])
def test_deepspeed_json_of_the_wrong_shape_is_a_config_error(tmp_path, ds_json, named):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_json))
    with pytest.raises(ConfigError) as e:
        load_ds_json(str(path))
    assert str(path) in str(e.value) and named in str(e.value)
    with pytest.raises(ConfigError, match="DeepSpeed JSON"):  # handed over directly, as the trainer does
        _ds(load_config(None, [], base=BASE), ds_json)


@pytest.mark.parametrize("override", ["data.augment=64", "data.augment=[64]", "data.augment.interpolation=[area]",
                                      "data.augment.color_jitter=[0.1]", "data.augment.jitter_p=abc"])
def test_augment_values_of_the_wrong_kind_are_config_errors(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], base=BASE)
    assert "data.augment" in str(e.value)


# ---------------------------------------------------------------- 4: 1e-2 is a number

def test_exponent_without_a_point_is_a_number_in_overrides_and_files(tmp_path):
    cfg = load_config(None, ["model.w_kl=1e-2", "model.w_r1=1e-3", "data.augment.color_jitter=1e-1",
                             "data.augment.jitter_p=5E-1", "optim.lr_g=2.0e4"], base=BASE)
    assert (cfg.model.w_kl, cfg.model.w_r1, cfg.optim.lr_g) == (0.01, 0.001, 2e4)
    assert type(cfg.data.augment.color_jitter) is float and cfg.data.augment.color_jitter == 0.1
    assert cfg.data.augment.jitter_p == 0.5
    f = tmp_path / "c.yaml"
    f.write_text("data: {shards: x, augment: {color_jitter: 1e-1}}\nmodel: {w_kl: 1e-2}\n")
    cfg = load_config(f)
    assert cfg.model.w_kl == 0.01 and cfg.data.augment.color_jitter == 0.1
    assert parse_override("tracking.run_name=e5")[1] == "e5" and parse_override("seed=15")[1] == 15


def test_augment_check_stores_the_strengths_as_floats():
    from pipeline.augment import Augmenter

    aug = AugmentConfig.from_any({"color_jitter": "1e-1", "jitter_p": "0.5"})
    assert (aug.color_jitter, aug.jitter_p) == (0.1, 0.5) and type(aug.color_jitter) is float
    Augmenter(aug, 32)  # built in every loader worker: failed on the string
    for bad in ("abc", None, [0.1], True, float("nan"), 1.5):
        with pytest.raises(ValueError, match="augment.color_jitter"):
            AugmentConfig.from_any({"color_jitter": bad})


# ---------------------------------------------------------------- 5: resume after harmless changes

def test_resume_allows_a_longer_stall_timeout_and_more_samples():
    assert "train.stall_timeout_s" in RESUMABLE_CHANGES and "train.sample_count" in RESUMABLE_CHANGES
    saved = load_config(ROOT / "configs" / "demo.yaml").model_dump(mode="json")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.stall_timeout_s=1800", "train.sample_count=8"])
    assert resume_differences(saved, cfg) == []


# ---------------------------------------------------------------- 6: train_batch_size

def test_train_batch_size_that_contradicts_the_yaml_is_refused_naming_both():
    cfg = load_config(ROOT / "configs" / "demo.yaml")  # micro-batch 8
    ds_json = {"train_batch_size": 1024, "gradient_accumulation_steps": 1}
    with pytest.raises(ConfigError) as e:  # on the ranks: the world is known
        _ds(cfg, ds_json, world=1)
    assert "1024" in str(e.value) and "data.batch_size (8)" in str(e.value) and "= 8 on these 1 rank" in str(e.value)
    assert "train_batch_size" not in _ds(cfg, ds_json, world=128)  # what the YAML makes of 128 ranks
    with pytest.raises(ConfigError) as e:  # before launch: no number of ranks gives 1020
        _ds(cfg, {"train_batch_size": 1020, "gradient_accumulation_steps": 1})
    assert "1020" in str(e.value) and "a multiple of 8" in str(e.value)


def test_train_checks_the_global_batch_with_the_launched_world(tmp_path, monkeypatch):
    import launch.train as train

    (tmp_path / "index.json").write_text(json.dumps({"shards": [
        {"url": f"{d}/{d}-000000.tar", "domain": d, "nsamples": 1} for d in ("a", "b")]}))
    (tmp_path / "c.yaml").write_text(f"data: {{shards: {tmp_path}, image_size: 32, batch_size: 4}}\n"
                                     f"run_dir: {tmp_path / 'run'}\nmodel: {{preset: tiny}}\n")
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 8, "gradient_accumulation_steps": 1}))
    args = train.parse_args(["--config", str(tmp_path / "c.yaml"), "--deepspeed_config", str(tmp_path / "ds.json")])
    monkeypatch.setenv("WORLD_SIZE", "2")
    train.resolve(args)  # 4 x 1 x 2 = 8
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="train_batch_size: DeepSpeed JSON has 8"):
        train.resolve(args)
    monkeypatch.delenv("WORLD_SIZE")
    assert train.launched_world() is None


# ---------------------------------------------------------------- 7: half a test split

@pytest.mark.parametrize("given, missing", [("test_a", "test_b"), ("test_b", "test_a")])
def test_half_a_test_split_is_refused(given, missing):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.{given}=some/dir"], base=BASE)
    assert f"data.{given} = 'some/dir' without data.{missing}" in str(e.value)


# ---------------------------------------------------------------- 8: registration skipped without tracking

def test_registration_skipped_without_tracking_says_so(tmp_path, monkeypatch, capsys):
    from launch.release import finish

    monkeypatch.setattr(finish.baselines, "from_config", lambda cfg: {})
    monkeypatch.setattr(finish.baselines, "save", lambda path, stats: None)
    cfg = load_config(None, ["tracking.enable=false", f"run_dir={tmp_path}"], base=BASE)
    assert finish.finish_run(cfg, tmp_path / "export") == {}
    out = capsys.readouterr().out
    assert "not registered" in out and "tracking.enable is false" in out
    cfg = load_config(None, ["tracking.enable=false", "registry.enable=false", f"run_dir={tmp_path}"], base=BASE)
    finish.finish_run(cfg, tmp_path / "export")
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- 9: overrides on both sides of the flags

def test_overrides_on_both_sides_of_the_flags():
    from launch.train import parse_args

    args = parse_args(["--config", "c.yaml", "seed=1", "--deepspeed_config", "x.json", "run_dir=r"])
    assert args.overrides == ["seed=1", "run_dir=r"] and args.deepspeed_config == "x.json"
    # launch.config reaches the config (absent here), not argparse's "unrecognized arguments"
    assert main(["nope.yaml", "seed=1", "--deepspeed_config", "x.json", "seed=2"]) == 2


def test_the_config_check_takes_resume_as_the_trainer_does(capsys):
    from launch.config import main

    demo = str(ROOT / "configs" / "demo.yaml")
    # make train passes ARGS to both: --resume must not fail the check before the trainer sees it
    assert main([demo, "--resume", "never", "data.shards=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and err.startswith("error: config key")
