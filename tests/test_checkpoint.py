"""Checkpoint bookkeeping without DeepSpeed: markers, pruning, RNG state round trip."""
import random

import numpy as np
import torch

from launch import checkpoint as ckpt


def _make(run_dir, step, complete=True):
    d = ckpt.step_dir(run_dir, step)
    (d / "G").mkdir(parents=True)
    (d / "meta.json").write_text("{}")
    if complete:
        (d / ckpt.MARKER).write_text("{}")
    return d


def test_latest_complete_skips_unmarked(tmp_path):
    assert ckpt.latest_complete(tmp_path) is None
    _make(tmp_path, 10)
    _make(tmp_path, 20)
    _make(tmp_path, 30, complete=False)  # crashed mid-write
    assert ckpt.latest_complete(tmp_path) == ckpt.step_dir(tmp_path, 20)


def test_prune_keeps_newest_and_drops_stale_partials(tmp_path):
    for s in (10, 20, 30):
        _make(tmp_path, s)
    _make(tmp_path, 15, complete=False)
    _make(tmp_path, 40, complete=False)  # newer than the newest complete: maybe being written, keep it
    ckpt.prune(tmp_path, keep=2)
    left = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert left == ["step-00000020", "step-00000030", "step-00000040"]


def test_rng_state_round_trips_through_json(tmp_path):
    import json
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_write_json_atomic_leaves_no_temp(tmp_path):
    ckpt.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_ema_state_round_trips_through_safetensors(tmp_path):
    from model.ema import EMA
    module = torch.nn.Linear(3, 2)
    ema = EMA(module, 0.9)
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)
    ckpt.save_ema(tmp_path / "ema.safetensors", ema.state_dict())
    back = EMA(torch.nn.Linear(3, 2), 0.5)
    back.load_state_dict(ckpt.load_ema(tmp_path / "ema.safetensors"))
    assert back.decay == 0.9 and back.num_updates == 1
    assert all(torch.equal(back.shadow[k], ema.shadow[k]) for k in ema.shadow)
