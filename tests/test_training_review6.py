"""Training review 6: the nearest palette colour in fp16 (colours an fp32 buffer); an explicit
resume path under another name (a link) is checked for newer checkpoints; resume=auto passes over
a marked checkpoint that lacks G/ or D/; a checkpoint due on a skipped step is written; a resumed
schedule runs at the new schedule's rate from its first step."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

import launch.training.trainer as trainer
from launch.runstore.rundir import claim_run_dir
from launch.training import checkpoint as ck
from launch.training.engines import lr_factor, lr_scheduler, sync_lr
from model.networks import nearest_colour


def test_nearest_colour_of_a_half_image_with_fp32_colours():
    colours = torch.tensor([[1.0, 0.9, 0.8], [-0.5, 0.2, 0.9]])  # a buffer DeepSpeed's fp16 leaves fp32
    x = torch.tensor([[[[0.9, 0.9, 0.7], [-0.4, 0.1, 1.0]]]])
    half = nearest_colour(x.half(), colours)
    assert half.dtype == torch.float16
    assert torch.equal(half.float(), nearest_colour(x, colours).half().float())


class Engine:
    def __init__(self, history: str):
        self.history = history

    def save_checkpoint(self, folder, tag, save_latest):
        (Path(folder) / tag).mkdir()
        (Path(folder) / tag / "w.txt").write_text(self.history)


def run_with_checkpoints(tmp_path: Path, steps=(100, 200)) -> tuple[Path, str]:
    root = tmp_path / "run"
    uid = claim_run_dir(root)["run_uid"]
    for s in steps:
        ck.save(root, s, Engine("1"), Engine("1"), rank=0, rank_state={}, meta={"run_uid": uid, "step": s},
                ema_state=None, keep=3)
    return root, uid


def test_an_older_checkpoint_under_another_name_is_refused_like_its_own_name(tmp_path):
    root, _ = run_with_checkpoints(tmp_path)
    os.symlink("step-00000100", root / "ckpt" / "best")
    for name in ("step-00000100", "best"):  # before: "best" was accepted, and the run lost its checkpoints
        with pytest.raises(ck.RunDirError, match="newer complete checkpoints"):
            ck.plan_resume(root, str(root / "ckpt" / name))
    assert ck.plan_resume(root, str(root / "ckpt" / "step-00000200")).name == "step-00000200"


def test_auto_passes_over_a_marked_checkpoint_without_its_engines(tmp_path, capsys):
    root, _ = run_with_checkpoints(tmp_path)
    (root / "ckpt" / "step-00000200" / "D" / "w.txt").unlink()
    (root / "ckpt" / "step-00000200" / "D").rmdir()
    assert ck.plan_resume(root, "auto").name == "step-00000100"  # before: step 200, failing after the engines
    err = capsys.readouterr().err
    assert "passes over" in err and "step-00000200" in err and "no D/" in err
    (root / "ckpt" / "step-00000100" / "G" / "w.txt").unlink()
    (root / "ckpt" / "step-00000100" / "G").rmdir()
    with pytest.raises(ck.RunDirError, match="none of the run's marked checkpoints is complete"):
        ck.plan_resume(root, "auto")


def test_a_checkpoint_due_on_a_skipped_step_is_written(monkeypatch):
    saved = []
    monkeypatch.setattr(trainer, "save_checkpoint", lambda tr: saved.append(tr.state.step))
    monkeypatch.setattr(trainer, "write_samples", lambda tr: None)
    monkeypatch.setattr(trainer, "log_step", lambda *a: None)
    monkeypatch.setattr(trainer, "count_nonfinite", lambda tr: None)
    tr = NS(state=NS(step=199), nonfinite_run=0, watchdog=NS(beat=lambda s: None), ema=NS(update=lambda m: None),
            eng_g=NS(module=None), ranks=NS(is_main=True),
            cfg=NS(train=NS(log_every=10, ckpt_every=200, sample_every=200, max_steps=1000)))
    trainer.after_step(tr, None, None)  # step 200: a non-finite loss, the step skipped
    assert saved == [200]  # before: none until step 400


def test_a_resumed_schedule_runs_at_the_new_total_from_its_first_step():
    param = torch.nn.Parameter(torch.zeros(1))
    old_opt = torch.optim.Adam([param], lr=1.0)
    old = lr_scheduler("warmup_decay", 0, 10)(old_opt)
    for _ in range(10):
        old_opt.step()
        old.step()
    saved_lr = old_opt.param_groups[0]["lr"]  # what the checkpoint's optimizer state restores
    opt = torch.optim.Adam([param], lr=1.0)
    sched = lr_scheduler("warmup_decay", 0, 20)(opt)  # train.max_steps raised to 20 on resume
    sched.load_state_dict(old.state_dict())
    opt.param_groups[0]["lr"] = saved_lr
    sync_lr(NS(lr_scheduler=sched))
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor("warmup_decay", 0, 20, 11))  # 0.5, not 0
    sync_lr(NS(lr_scheduler=None))  # the constant schedule: nothing to do
