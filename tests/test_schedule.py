"""optim.schedule: the learning rate each optimizer step runs at, through real DeepSpeed engines,
and the same rates after a checkpoint is loaded into fresh ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError, deepspeed_config, load_config
from launch.training.engines import lr_factor, lr_scheduler
from trainutil import free_port

ROOT = Path(__file__).resolve().parents[1]
BASE = {"data": {"shards": "x", "image_size": 32, "batch_size": 2}, "model": {"preset": "tiny"}}


def test_warmup_starts_above_zero_and_decay_from_the_full_rate():
    assert [lr_factor("warmup", 3, 6, s) for s in range(1, 7)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert [lr_factor("warmup_decay", 0, 6, s) for s in range(1, 7)] == pytest.approx([1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert [lr_factor("warmup_decay", 2, 6, s) for s in range(1, 7)] == pytest.approx([0.5, 1, 1, 0.75, 0.5, 0.25])
    assert lr_factor("warmup_decay", 2, 6, 7) == 0.0  # past train.max_steps (a run extended on resume)
    assert lr_scheduler("constant", 0, 6) is None


def test_a_deepspeed_json_scheduler_or_adamw_against_the_yaml_is_refused():
    cfg = load_config(None, ["optim.schedule=warmup", "optim.warmup_steps=3"], base=BASE)
    ds = deepspeed_config(cfg, None, lr=1e-4, on_gpu=False, bf16_ok=False)
    assert "scheduler" not in ds  # the engines get the schedule as a LambdaLR, not as DeepSpeed's WarmupLR
    for ds_json, named in (({"scheduler": {"type": "WarmupLR", "params": {}}}, "scheduler: DeepSpeed JSON has 'WarmupLR'"),
                           ({"optimizer": {"type": "AdamW"}}, "optim.adam_w_mode has False"),
                           ({"optimizer": {"type": "Adam", "params": {"amsgrad": True}}},
                            "optimizer.params.amsgrad: not passed on")):
        with pytest.raises(ConfigError, match=named):
            deepspeed_config(cfg, ds_json, lr=1e-4, on_gpu=False, bf16_ok=False)
    adamw = load_config(None, ["optim.adam_w_mode=true"], base=BASE)
    ds = deepspeed_config(adamw, {"optimizer": {"type": "AdamW"}}, lr=1e-4, on_gpu=False, bf16_ok=False)
    assert ds["optimizer"]["params"]["adam_w_mode"] is True


ENGINES = """
import json, os, sys, types, torch, deepspeed
from launch.config import load_config, deepspeed_config
from launch.training.engines import build_engines
schedule, warmup, ckpt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config(None, [f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}", "train.max_steps=6"],
                  base={"data": {"shards": "x", "image_size": 32, "batch_size": 2}, "model": {"preset": "tiny"}})
def engines():
    torch.manual_seed(0)
    unit = types.SimpleNamespace(gen=torch.nn.Linear(2, 1), dis=torch.nn.Linear(2, 1))
    ds = deepspeed_config(cfg, None, lr=1.0, on_gpu=False, bf16_ok=False)
    return build_engines(unit, ds, dict(ds), (schedule, warmup, 6))
def run(eng, steps, used):
    for _ in range(steps):
        used.append(eng.get_lr()[0])  # the rate this step's update uses
        eng.backward(eng(torch.ones(2, 2)).sum())
        eng.step()
used, (eng, _) = [], engines()
run(eng, 3, used)
eng.save_checkpoint(ckpt, tag="G")
run(eng, 3, used)
again, (fresh, _) = [], engines()
fresh.load_checkpoint(ckpt, tag="G")
run(fresh, 3, again)
print(json.dumps({"used": used, "resumed": again}))
"""


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("warmup", 3, [1 / 3, 2 / 3, 1, 1, 1, 1]),
    ("warmup_decay", 0, [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
])
def test_real_engines_step_at_the_schedules_rates_and_resume_on_it(tmp_path, schedule, warmup, expected):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ENGINES, schedule, str(warmup), str(tmp_path / "ckpt")], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["used"] == pytest.approx(expected)
    assert got["resumed"] == pytest.approx(expected[3:])  # the loaded engine continues at step 4's rate


def test_a_checkpoint_of_deepspeeds_warmup_scheduler_still_resumes():
    import torch

    from launch.training.engines import StepFactorLR

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_scheduler("warmup", 4, 10)(opt)
    assert isinstance(sched, StepFactorLR) and opt.param_groups[0]["lr"] == pytest.approx(0.25)
    sched.load_state_dict({"last_batch_iteration": 2})  # what WarmupLR saved after 3 steps
    assert sched.last_epoch == 3
    opt.step()
    sched.step()  # step 5 comes next: past the warmup
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
