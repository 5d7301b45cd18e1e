"""The training config: YAML + overrides, validation messages, DeepSpeed JSON conflicts, resume rules."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError, apply_overrides, deepspeed_config, load_config, resume_differences

ROOT = Path(__file__).resolve().parent.parent
BASE = {"data": {"shards": "data/shards"}}


def test_shipped_configs_validate():
    for path in (ROOT / "configs").glob("*.yaml"):
        cfg = load_config(path)
        assert cfg.data.image_size >= 16, path


def test_overrides_nest_and_parse_yaml_values():
    raw = apply_overrides({"train": {"max_steps": 5}}, ["train.max_steps=12", "optim.betas=[0.0, 0.9]", "seed=3"])
    assert raw == {"train": {"max_steps": 12}, "optim": {"betas": [0.0, 0.9]}, "seed": 3}
    cfg = load_config(None, ["train.max_steps=12"], base=BASE)
    assert cfg.train.max_steps == 12


@pytest.mark.parametrize("override, named", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("data.batch_size=0", "data.batch_size"),
    ("optim.betas=[0.5, 1.5]", "optim.betas"),
    ("optim.betas=[0.5, 1.0]", "optim.betas"),  # the bound is strict: beta2 1 never forgets
    ("model.dimm=8", "model.dimm"),
    ("model.preset=nope", "model"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], base=BASE)
    assert named in str(e.value)


def test_scale_is_the_resize_before_the_crop():
    # What evaluation, baselines, grids and export use: the side the crops are cut from.
    cfg = load_config(None, ["data.image_size=32"], base=BASE)
    assert (cfg.data.scale(), cfg.model.image_size) == (32, 32)
    cfg = load_config(None, ["data.image_size=32", "data.augment.resize=64"], base=BASE)
    assert (cfg.data.scale(), cfg.model.image_size) == (64, 32)


def test_missing_shards_is_explained():
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(None, [], base={"data": {}})


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"], base=BASE)


def _ds(cfg, ds_json):
    return deepspeed_config(cfg, ds_json, lr=cfg.optim.lr_g, on_gpu=False, bf16_ok=False)


# no betas given: the paper's; given on the command line, as the README's tuning commands do: those
@pytest.mark.parametrize("betas_override, betas", [([], [0.5, 0.999]), (["optim.betas=[0.5,0.97]"], [0.5, 0.97])])
def test_deepspeed_config_takes_optimizer_and_batch_from_yaml(betas_override, betas):
    cfg = load_config(None, ["data.batch_size=6", "optim.lr_g=2e-4", *betas_override], base=BASE)
    ds = _ds(cfg, {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0})
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["optimizer"]["params"]["adam_w_mode"] is False  # "Adam" alone would mean AdamW
    assert ds["optimizer"]["params"]["betas"] == betas
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": False}


@pytest.mark.parametrize("ds_json, named", [
    ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}, "optimizer.params.lr"),
    ({"optimizer": {"type": "SGD", "params": {}}}, "optimizer.type"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"max_grad_norm": 1.0}, "max_grad_norm"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"scheduler": {"type": "WarmupLR", "params": {}}}, "scheduler"),
])
def test_deepspeed_json_conflicts_are_rejected(ds_json, named):
    cfg = load_config(None, [], base=BASE)
    with pytest.raises(ConfigError) as e:
        _ds(cfg, ds_json)
    assert named in str(e.value)


def test_gradient_clipping_is_explicit():
    # DeepSpeed's own default would clip to 1.0: the config must always say what it wants.
    cfg = load_config(None, [], base=BASE)
    assert _ds(cfg, None)["gradient_clipping"] == 0.0
    assert _ds(cfg, {"gradient_clipping": 2.0})["gradient_clipping"] == 2.0
    cfg = load_config(None, ["optim.grad_clip=3.0"], base=BASE)
    assert _ds(cfg, None)["gradient_clipping"] == 3.0
    with pytest.raises(ConfigError, match="gradient_clipping"):
        _ds(cfg, {"gradient_clipping": 5.0})


def test_same_value_in_both_is_accepted():
    cfg = load_config(None, ["data.batch_size=4"], base=BASE)
    ds = _ds(cfg, {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}})
    assert ds["train_micro_batch_size_per_gpu"] == 4


def test_schedule_is_no_deepspeed_scheduler():
    # the engines get optim.schedule as a LambdaLR (tests/test_schedule.py): DeepSpeed's WarmupLR runs
    # its first two steps at warmup_min_lr
    cfg = load_config(None, ["optim.schedule=warmup_decay", "optim.warmup_steps=10", "train.max_steps=50"], base=BASE)
    assert "scheduler" not in _ds(cfg, None)


def test_resume_differences_ignore_what_may_change():
    old = load_config(None, [], base=BASE)
    same = load_config(None, ["train.max_steps=5000", "tracking.enable=false", "data.num_workers=4",
                              "eval.c2st_steps=0", "eval.baseline_images=10"], base=BASE)
    assert resume_differences(old.model_dump(mode="json"), same) == []
    # a checkpoint written before the eval section existed (train.realism, no eval) still resumes
    before = old.model_dump(mode="json")
    before["train"]["realism"] = True
    del before["eval"]
    assert resume_differences(before, same) == []
    changed = load_config(None, ["data.image_size=128", "model.dim=32"], base=BASE)
    diff = resume_differences(old.model_dump(mode="json"), changed)
    assert any(d.startswith("data.image_size") for d in diff)
    assert any(d.startswith("model.dim") for d in diff)


def test_cli_fails_with_key_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {shards: x, image_size: 7}\n")
    r = subprocess.run([sys.executable, "-m", "launch.config", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "data.image_size" in r.stderr


def test_cli_checks_deepspeed_json(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text(f"data: {{shards: {tmp_path}, image_size: 32, batch_size: 4}}\n")
    # check() reads the index before any rank starts: one shard entry per domain
    (tmp_path / "index.json").write_text(json.dumps({"shards": [
        {"url": f"{d}/{d}-000000.tar", "domain": d, "nsamples": 1} for d in ("a", "b")]}))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    r = subprocess.run([sys.executable, "-m", "launch.config", str(good), "--deepspeed_config", str(ds)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "train_micro_batch_size_per_gpu" in r.stderr
    r = subprocess.run([sys.executable, "-m", "launch.config", str(good)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "image_size: 32" in r.stdout
    # a FID feature extractor that is not there is refused before any rank starts
    r = subprocess.run([sys.executable, "-m", "launch.config", str(good), f"eval.fid_features={tmp_path / 'no.pt'}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "eval.fid_features" in r.stderr and "no such file" in r.stderr


def test_cli_refuses_a_master_port_another_process_listens_on(tmp_path):
    """make train passes MASTER_PORT: a second training on a busy port is refused before any rank
    starts, where each rank would fail on its own with EADDRINUSE."""
    import socket

    good = tmp_path / "c.yaml"
    good.write_text(f"data: {{shards: {tmp_path}, image_size: 32, batch_size: 4}}\n")
    (tmp_path / "index.json").write_text(json.dumps({"shards": [
        {"url": f"{d}/{d}-000000.tar", "domain": d, "nsamples": 1} for d in ("a", "b")]}))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "launch.config", str(good), "--master-port", str(port)],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and f"port {port}" in r.stderr and "MASTER_PORT" in r.stderr, r.stderr
    # the same port once it is let go
    r = subprocess.run([sys.executable, "-m", "launch.config", str(good), "--master-port", str(port)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("override, named, allowed", [
    ("train.max_steps=true", "train.max_steps = True", "must be an integer >= 1, not true/false"),
    ("train.ckpt_every=false", "train.ckpt_every = False", "must be an integer >= 1"),
    ("seed=true", "seed = True", "must be an integer >= 0, not true/false"),
    ("optim.lr_g=true", "optim.lr_g = True", "must be a number > 0"),
    ("train.ema_decay=true", "train.ema_decay = True", "must be a number >= 0.0 and < 1.0"),
    ("data.augment.resize=true", "data.augment.resize = True", "must be an integer, not true/false"),
    ("optim.betas=[true, 0.9]", "optim.betas", "not true/false"),
    ("data.augment.flip=1", "data.augment.flip = 1", "must be true or false"),
    ("tracking.enable=0", "tracking.enable = 0", "must be true or false"),
    ("model.dim=true", "model.dim = True", "must be an integer"),
    ("model.fused_upsample=1", "model.fused_upsample = 1", "must be true or false"),
    ("model.dim=0", "dim=0", "must be an integer >= 1"),
])
def test_booleans_are_not_numbers(override, named, allowed):
    # Issue 15, case 16: train.max_steps=true was accepted as 1.
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], base=BASE)
    assert named in str(e.value) and allowed in str(e.value)


def test_integers_still_parse_from_yaml():
    cfg = load_config(None, ["train.max_steps=7", "optim.lr_g=1", "data.augment.flip=false", "model.dim=8"], base=BASE)
    assert cfg.train.max_steps == 7 and cfg.optim.lr_g == 1.0 and cfg.data.augment.flip is False


def test_hue_pool_must_fit_in_a_crop():
    assert load_config(None, ["data.image_size=32", "model.hue_pool=32"], base=BASE).model.hue_pool == 32
    with pytest.raises(ConfigError, match=r"model.hue_pool = 64: .*data.image_size \(32\)"):
        load_config(None, ["data.image_size=32", "model.hue_pool=64"], base=BASE)
    with pytest.raises(ConfigError, match="hue_pool=0"):
        load_config(None, ["model.hue_pool=0"], base=BASE)


def test_eval_section_and_the_retired_realism_key(tmp_path):
    cfg = load_config(None, ["eval.c2st_steps=0", "eval.baseline_images=50"], base=BASE)
    assert cfg.eval.c2st_steps == 0 and cfg.eval.baseline_images == 50 and cfg.eval.fid_features is None
    assert load_config(None, [], base=BASE).eval.c2st_steps == 200
    with pytest.raises(ConfigError, match=r"train.realism was replaced by the eval section"):
        load_config(None, ["train.realism=false"], base=BASE)
    with pytest.raises(ConfigError, match="eval.c2st_steps"):
        load_config(None, ["eval.c2st_steps=-1"], base=BASE)
    with pytest.raises(ConfigError, match="eval.baseline_images"):
        load_config(None, ["eval.baseline_images=0"], base=BASE)
