"""Configs, checkpoints and exports written before the house redesign still load."""
from __future__ import annotations

import json

import torch

from launch.config import load_config, resume_differences
from launch.release.export import load_translator
from launch.runstore.artifacts import save_translator
from model.unit import UNIT

# meta.json["config"] as the trainer of the previous layout saved it: the model section as
# given (no expansion), a DeepSpeed JSON for the ZeRO stage, no train.zero_stage / grad_accum_steps.
OLD_SAVED = {
    "run_dir": "runs/x", "seed": 1, "resume": "auto", "trust_resume_path": False,
    "deepspeed_config": "configs/ds/zero1.json",
    "data": {"shards": "data/shards", "shards_a": None, "shards_b": None, "image_size": 32, "batch_size": 2,
             "num_workers": 1, "augment": {"resize": None, "flip": True, "color_jitter": 0.0, "jitter_p": 0.8,
                                           "interpolation": "area"},
             "verify_shards": False, "cache_dir": None, "test_a": None, "test_b": None},
    "model": {"preset": "tiny"},
    "optim": {"lr_g": 1e-4, "lr_d": 1e-4, "betas": [0.5, 0.999], "eps": 1e-8, "weight_decay": 1e-4,
              "adam_w_mode": False, "grad_clip": None, "schedule": "constant", "warmup_steps": 0},
    "train": {"max_steps": 6, "log_every": 1, "sample_every": 1000, "ckpt_every": 3, "keep_ckpts": 3,
              "max_nonfinite": 5, "stall_timeout_s": 600.0, "ema_decay": 0.0, "precision": "auto", "threads": 1,
              "sample_count": 4},
}


def test_checkpoint_config_of_the_previous_layout_resumes():
    cfg = load_config(None, base={k: v for k, v in OLD_SAVED.items()})
    assert resume_differences(OLD_SAVED, cfg) == []
    # ... and a real change is still caught, against the old shape as well
    changed = load_config(None, base={**OLD_SAVED, "model": {"preset": "tiny", "dim": 8}})
    assert resume_differences(OLD_SAVED, changed) == ["model.dim: checkpoint has 16, config has 8"]


def test_config_of_a_removed_setting_is_compared_key_by_key():
    old = {**OLD_SAVED, "train": {**OLD_SAVED["train"], "realism": True}}  # before the eval section
    cfg = load_config(None, base=OLD_SAVED)
    assert resume_differences(old, cfg) == []


def test_export_of_the_previous_layout_loads(tmp_path):
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"})
    model_config = {**unit.config(), "ema_decay": 0.0}  # UNITConfig had an ema_decay field then
    save_translator(tmp_path, unit.gen, model_config, image_size=32, step=3, ema=False)
    assert json.loads((tmp_path / "translator.json").read_text())["model"]["ema_decay"] == 0.0
    gen, meta = load_translator(tmp_path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(gen.translate(x, "a2b"), unit.gen.eval().translate(x, "a2b"))
