"""Checkpoint bookkeeping without DeepSpeed: markers, pruning, RNG state round trip."""
import random
from pathlib import Path

import numpy as np
import torch

from launch.training import checkpoint as ckpt


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


def _mark(d, run_uid):
    import json
    (d / ckpt.MARKER).write_text(json.dumps({"step": ckpt.step_of(d), "run_uid": run_uid}))
    return d


def test_another_runs_checkpoints_are_neither_newest_nor_pruned(tmp_path):
    # Issue 15, case 4: an old run's higher steps counted as newest, so pruning deleted what the
    # new run had just written and latest_complete returned the old run's checkpoint.
    for s in (10, 20, 30):
        _mark(_make(tmp_path, s, complete=False), "old")
    for s in (1, 2, 3):
        _mark(_make(tmp_path, s, complete=False), "new")
    assert ckpt.latest_complete(tmp_path, "new") == ckpt.step_dir(tmp_path, 3)
    assert ckpt.latest_complete(tmp_path) == ckpt.step_dir(tmp_path, 30)  # without an identity: any
    ckpt.prune(tmp_path, keep=2, run_uid="new")
    left = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert left == ["step-00000002", "step-00000003", "step-00000010", "step-00000020", "step-00000030"]


def test_prune_deletes_only_what_save_writes(tmp_path, capsys):
    for s in (10, 20):
        made = _make(tmp_path, s)
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed writes these at ZeRO >= 1
            (made / script).write_text("# deepspeed\n")
    stray = ckpt.step_dir(tmp_path, 1)
    stray.mkdir(parents=True)
    (stray / "thesis.tex").write_text("\\chapter{}")  # a user's file in a folder named like a leftover
    leftover = _make(tmp_path, 5, complete=False)
    (leftover / "rank-00001.json").write_text("{}")
    (leftover / ".meta.json.k3j9x2_q.tmp").write_text("")  # an atomic write killed mid-way
    dropped = ckpt.prune(tmp_path, keep=1)
    assert sorted(p.name for p in dropped) == ["step-00000005", "step-00000010"]
    assert (stray / "thesis.tex").read_text() == "\\chapter{}"
    assert "not pruning" in capsys.readouterr().err


def test_symlinked_checkpoints_are_not_resumed_or_pruned(tmp_path):
    elsewhere = _make(tmp_path / "elsewhere", 50)
    _make(tmp_path / "run", 10)
    (tmp_path / "run" / "ckpt" / "step-00000050").symlink_to(elsewhere)
    assert ckpt.latest_complete(tmp_path / "run") == ckpt.step_dir(tmp_path / "run", 10)
    ckpt.prune(tmp_path / "run", keep=1)
    assert (elsewhere / ckpt.MARKER).is_file()


class FakeEngine:
    """DeepSpeed's save_checkpoint layout (a folder per tag); `fail` raises as torch.save does on a full disk."""

    def __init__(self, payload: str, fail: bool = False):
        self.payload, self.fail = payload, fail

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        if self.fail:
            raise RuntimeError("unexpected pos 64 vs 0")
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "model.pt").write_text(self.payload)


def test_saving_a_step_that_is_already_complete_keeps_it(tmp_path):
    # A relaunch of a finished run (already at max_steps) saves the step it resumed from again: the
    # complete copy was deleted before the rewrite, so a failed rewrite left no copy of that step.
    kw = dict(rank=0, rank_state={"step": 4}, meta={"step": 4, "run_uid": "u1"}, ema_state=None, keep=1)
    d = ckpt.save(tmp_path, 4, FakeEngine("v1"), FakeEngine("v1"), **kw)
    assert ckpt.latest_complete(tmp_path, "u1") == d
    assert ckpt.save(tmp_path, 4, FakeEngine("v2", fail=True), FakeEngine("v2", fail=True), **kw) == d
    assert ckpt.latest_complete(tmp_path, "u1") == d and (d / "G" / "model.pt").read_text() == "v1"
    # an unmarked folder of that step (a crash mid-save) is still rewritten
    (d / ckpt.MARKER).unlink()
    assert ckpt.save(tmp_path, 4, FakeEngine("v3"), FakeEngine("v3"), **kw) == d
    assert ckpt.latest_complete(tmp_path, "u1") == d and (d / "D" / "model.pt").read_text() == "v3"
