"""Training review 7: a damaged checkpoint at the step being saved is rewritten; another run's is
refused, not deleted; a write failure names the checkpoint resume=auto would take and gives disk
advice only for a disk error; a resume drops the metric lines logged after its checkpoint; a
non-finite discriminator loss skips both halves of the step (and a normal step's numbers are those
of the old order); the first metric line's data wait is at most its interval; a stray file in a
step folder stops every rank with a message about the folder; the last step's checkpoint comes
before its grid; the non-finite streak goes on across a resume."""
from __future__ import annotations

import copy
import errno
import json
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

import launch.training.trainer as trainer
import model.unit as unit_module
from launch.config import load_config
from launch.runstore.rundir import claim_run_dir
from launch.training import checkpoint as ck
from launch.training.engines import StepResult, gan_step, lr_scheduler
from model.unit import UNIT, make_config


class Engine:
    """DeepSpeed's save_checkpoint layout: a folder per tag holding `history`."""

    def __init__(self, history: str = "new"):
        self.history, self.calls = history, 0

    def save_checkpoint(self, folder, tag, save_latest):
        self.calls += 1
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)
        (Path(folder) / tag / "w.txt").write_text(self.history)


def marked(root: Path, step: int, uid: str, parts=("G", "D")) -> Path:
    """A marked checkpoint of run `uid` holding `parts` (an old payload in each)."""
    d = ck.step_dir(root, step)
    d.mkdir(parents=True)
    for part in parts:
        (d / part).mkdir()
        (d / part / "w.txt").write_text("old")
    for name in ("meta.json", ck.MARKER):
        (d / name).write_text(json.dumps({"step": step, "run_uid": uid}))
    return d


def save(root: Path, step: int, uid: str, rank: int = 0, g: Engine | None = None, d: Engine | None = None) -> Path:
    return ck.save(root, step, g or Engine(), d or Engine(), rank=rank, rank_state={},
                   meta={"run_uid": uid, "step": step}, ema_state=None, keep=3)


# ---------------------------------------------------------------- 1, 2, 7: the step folder save() meets

def test_a_damaged_checkpoint_at_the_step_being_saved_is_rewritten(tmp_path):
    marked(tmp_path, 300, "u1", parts=("D",))  # marked, but its G/ is gone
    g, d = Engine(), Engine()
    out = save(tmp_path, 300, "u1", g=g, d=d)
    assert (g.calls, d.calls) == (1, 1)  # before: returned early, nothing written
    assert ck.checkpoint_problems(out) == []
    assert (out / "D" / "w.txt").read_text() == "new"


def test_an_intact_own_checkpoint_at_the_step_is_kept(tmp_path):
    d = marked(tmp_path, 300, "u1")
    g = Engine()
    assert save(tmp_path, 300, "u1", g=g) == d and g.calls == 0 and (d / "G" / "w.txt").read_text() == "old"


def test_another_runs_checkpoint_at_the_step_is_refused_not_deleted(tmp_path):
    d = marked(tmp_path, 200, "OTHER")
    g = Engine()
    with pytest.raises(ck.CheckpointFolderError, match="holds another run's checkpoint.*move it away"):
        save(tmp_path, 200, "MINE", g=g)
    assert g.calls == 0 and (d / "G" / "w.txt").read_text() == "old"  # before: deleted and overwritten
    assert json.loads((d / ck.MARKER).read_text())["run_uid"] == "OTHER"


def rank0_then_rank1(monkeypatch, root: Path, step: int, uid: str) -> tuple[Exception, Engine, Exception | None]:
    """save() on rank 0, then on rank 1 given what rank 0 shared (the broadcast, without ranks)."""
    shared = []
    monkeypatch.setattr(ck, "_rank0_shares", lambda value: shared.append(value) or value)
    with pytest.raises(ck.CheckpointFolderError) as on0:
        save(root, step, uid)
    monkeypatch.setattr(ck, "_rank0_shares", lambda value: shared[0])
    g1, on1 = Engine(), None
    try:
        save(root, step, uid, rank=1, g=g1)
    except Exception as e:  # noqa: BLE001 - what rank 1 does is the point
        on1 = e
    return on0.value, g1, on1


def test_a_stray_file_in_a_leftover_step_folder_stops_every_rank(tmp_path, monkeypatch):
    marked(tmp_path, 100, "U")
    d = ck.step_dir(tmp_path, 200)
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    on0, g1, on1 = rank0_then_rank1(monkeypatch, tmp_path, 200, "U")
    assert "notes.txt" in str(on0) and "free space" not in str(on0)
    # before: rank 1 went on to the barrier and DeepSpeed's collective save (a hang)
    assert isinstance(on1, ck.CheckpointFolderError) and str(on1) == str(on0) and g1.calls == 0
    assert (d / "notes.txt").read_text() == "mine"


def test_another_runs_checkpoint_stops_every_rank(tmp_path, monkeypatch):
    marked(tmp_path, 200, "OTHER")
    on0, g1, on1 = rank0_then_rank1(monkeypatch, tmp_path, 200, "MINE")
    assert isinstance(on1, ck.CheckpointFolderError) and "another run's" in str(on1) and g1.calls == 0


def folder_conflict_through_the_trainer(tmp_path, monkeypatch) -> BaseException:
    cfg = load_config(None, base={"data": {"shards": "unused"}, "run_dir": str(tmp_path)})
    tr = NS(cfg=cfg, state=ck.TrainState(step=200, run_uid="U"), ranks=NS(is_main=False, rank=0, world=1), precision="fp32",
            loader=NS(state_dict=lambda: {}), ema=NS(state_dict=lambda: None), ds={"zero_optimization": {"stage": 0}},
            unit=NS(cfg=NS(palette_a=None, palette_b=None)), run_dir=tmp_path, eng_g=Engine(), eng_d=Engine())
    d = ck.step_dir(tmp_path, 200)
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(ck.CheckpointWriteError) as caught:  # what launch/train.py prints as one line
        trainer.save_checkpoint(tr)
    return caught.value


def test_the_trainer_reports_a_taken_folder_without_disk_advice(tmp_path, monkeypatch):
    err = folder_conflict_through_the_trainer(tmp_path, monkeypatch)
    assert isinstance(err, ck.CheckpointFolderError) and "notes.txt" in str(err)
    assert "free space" not in str(err) and "MiB free" not in str(err)  # before: "free space and run again"


# ---------------------------------------------------------------- 3: write_failure's way out

def test_write_failure_names_the_checkpoint_resume_auto_would_take(tmp_path):
    uid = claim_run_dir(tmp_path)["run_uid"]
    marked(tmp_path, 100, uid)
    marked(tmp_path, 200, uid, parts=("D",))  # damaged: resume=auto passes over it
    marked(tmp_path, 300, "OTHER")           # another run's
    for given in (uid, None):  # the trainer passes its run_uid; without it, the run directory's
        msg = ck.write_failure(tmp_path, 400, RuntimeError("unexpected pos 123"), given)
        assert f"{ck.step_dir(tmp_path, 100)} is intact" in msg
        assert "step-00000200" not in msg and "step-00000300" not in msg  # before: step-00000300
    assert ck.plan_resume(tmp_path, "auto") == ck.step_dir(tmp_path, 100)  # the same rule


def test_write_failure_gives_disk_advice_only_for_a_disk_error(tmp_path):
    uid = claim_run_dir(tmp_path)["run_uid"]
    marked(tmp_path, 100, uid)
    full = OSError(errno.ENOSPC, "No space left on device")
    assert "free space and run again" in ck.write_failure(tmp_path, 200, full, uid)
    other = ck.write_failure(tmp_path, 200, RuntimeError("a bug"), uid)  # the probe write succeeds here
    assert "free space and run again" not in other and "run again to resume" in other


# ---------------------------------------------------------------- 4: metrics.jsonl after a resume

def resumable(tmp_path: Path, is_main: bool = True):
    lr = NS(get_lr=lambda: [1e-4])
    return NS(eng_g=NS(module=torch.nn.Linear(2, 2), get_lr=lr.get_lr), eng_d=lr, state=ck.TrainState(),
              ranks=NS(rank=0, world=1, is_main=is_main, device="cpu"), loader=NS(load_state_dict=lambda s: None, stats={}),
              cfg=NS(train=NS(ema_decay=0.0, max_steps=10)), run_dir=tmp_path, say=lambda *a: None,
              rng_to_restore=None, ema=None, tracker=NS(log_metrics=lambda *a: None))


def logged_steps(path: Path) -> list:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resume_drops_the_metric_lines_after_its_checkpoint(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    written = ("".join(json.dumps({"step": s, "g/total": 1.0}) + "\n" for s in range(1, 6))
               + '{"step": 6, "g/tot')  # the killed launch's last line, cut mid-way
    metrics.write_text(written)
    monkeypatch.setattr(ck, "load", lambda path, g, d, rank: ({"step": 3}, {"loader": {}, "rng": {}}, None))
    trainer.restore(resumable(tmp_path, is_main=False), tmp_path)
    assert metrics.read_text() == written  # only rank 0 rewrites it
    tr = resumable(tmp_path)
    trainer.restore(tr, tmp_path)
    assert tr.state.step == 3 and logged_steps(metrics) == [1, 2, 3]
    meter = trainer.Meter(start_step=3)
    for step in (4, 5, 6):  # the resumed launch logs those steps again
        tr.state.step = step
        trainer.log_step(tr, StepResult(torch.tensor(1.0), torch.tensor(2.0), {}, {}), meter)
    assert logged_steps(metrics) == [1, 2, 3, 4, 5, 6]  # before: 1 2 3 4 5 4 5 6


# ---------------------------------------------------------------- 5: a non-finite D loss

class PlainEngine:
    """The engine surface gan_step uses, over torch's Adam and a LambdaLR schedule."""

    def __init__(self, module):
        self.module = module
        self.opt = torch.optim.Adam(module.parameters(), 1e-3, betas=(0.5, 0.999))
        self.lr_scheduler = lr_scheduler("warmup", 4, 10)(self.opt)

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()
        self.lr_scheduler.step()


def tiny(**extra) -> UNIT:
    torch.manual_seed(0)
    return UNIT(make_config({"preset": "tiny", "image_size": 32, **extra}))


def images(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def test_a_nonfinite_discriminator_loss_skips_both_halves(monkeypatch):
    unit = tiny()
    eng_g, eng_d = PlainEngine(unit.gen), PlainEngine(unit.dis)
    before = copy.deepcopy(unit.state_dict())
    real = unit_module.discriminator_loss
    monkeypatch.setattr(unit_module, "discriminator_loss",
                        lambda p, c: (lambda loss, terms: (loss * float("nan"), terms))(*real(p, c)))
    assert gan_step(eng_g, eng_d, *images(1), unit.cfg, torch.device("cpu")) is None
    after = unit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # before: the generator had stepped
    assert eng_g.lr_scheduler.last_epoch == eng_d.lr_scheduler.last_epoch == 0  # before: 1 and 0
    assert all(p.grad is None or not p.grad.any() for p in unit.parameters())  # nothing backpropagated
    monkeypatch.setattr(unit_module, "discriminator_loss", real)
    assert gan_step(eng_g, eng_d, *images(1), unit.cfg, torch.device("cpu")) is not None
    assert eng_g.lr_scheduler.last_epoch == eng_d.lr_scheduler.last_epoch == 1


def old_order_step(eng_g, eng_d, x_a, x_b, ucfg, step):
    """The step as it was before: G's forward, backward and step, then D's forward, backward, step."""
    dis = eng_d.module
    dis.requires_grad_(False)
    out = eng_g(x_a, x_b)
    loss_g, _ = unit_module.generator_loss(out, x_a, x_b, dis, ucfg)
    eng_g.backward(loss_g)
    eng_g.step()
    dis.requires_grad_(True)
    preds = eng_d(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach())
    loss_d, _ = unit_module.discriminator_loss(preds, ucfg)
    penalty, _ = unit_module.r1_loss(dis, x_a, x_b, ucfg, step)
    eng_d.backward(loss_d if penalty is None else loss_d + penalty)
    eng_d.step()


@pytest.mark.parametrize("extra", [{}, {"dis_norm": "sn", "w_r1": 1.0, "dis_colour_octaves": 4}])
def test_a_normal_step_moves_the_weights_exactly_as_the_old_order(extra):
    trained = []
    for new in (True, False):
        unit = tiny(**extra)
        eng_g, eng_d = PlainEngine(unit.gen), PlainEngine(unit.dis)
        torch.manual_seed(5)  # the generator's noise
        for step in (1, 2, 3):
            x_a, x_b = images(step)
            if new:
                assert gan_step(eng_g, eng_d, x_a, x_b, unit.cfg, torch.device("cpu"), step=step) is not None
            else:
                old_order_step(eng_g, eng_d, x_a, x_b, unit.cfg, step)
        trained.append(copy.deepcopy(unit.state_dict()))
    new, old = trained
    assert all(torch.equal(new[k], old[k]) for k in old), [k for k in old if not torch.equal(new[k], old[k])]


# ---------------------------------------------------------------- 6: the first metric line's data wait

def test_the_first_metric_lines_data_wait_is_within_its_interval(monkeypatch):
    monkeypatch.setattr(trainer, "start_stream", lambda tr: (time.sleep(0.3), lambda: {})[1])
    tr = NS(state=NS(step=10, nonfinite_total=0), ranks=NS(device="cpu", world=1),
            eng_g=NS(get_lr=lambda: [1e-4]), eng_d=NS(get_lr=lambda: [1e-4]), loader=NS(stats={}))
    _, meter = trainer.start_metered(tr)
    rec = trainer.metric_record(tr, StepResult(torch.tensor(1.0), torch.tensor(1.0), {}, {}), meter)
    assert rec["data_wait_s"] >= 0.3  # the start-up counts as waiting for data ...
    assert rec["data_wait_frac"] <= 1.0  # ... within the line's interval (before: about 3000 %)


# ---------------------------------------------------------------- 8: the last step's checkpoint, then its grid

def test_the_last_steps_checkpoint_comes_before_its_grid(monkeypatch):
    order = []
    monkeypatch.setattr(trainer, "save_checkpoint", lambda tr: order.append(("checkpoint", tr.state.step)))
    monkeypatch.setattr(trainer, "write_samples", lambda tr: order.append(("grid", tr.state.step)))
    monkeypatch.setattr(trainer, "log_step", lambda *a: None)
    tr = NS(state=ck.TrainState(step=98), watchdog=NS(beat=lambda s: None), ema=NS(update=lambda m: None),
            eng_g=NS(module=None), ranks=NS(is_main=True),
            cfg=NS(train=NS(log_every=1000, sample_every=50, ckpt_every=40, max_steps=100)))
    ok = StepResult(torch.tensor(1.0), torch.tensor(1.0), {}, {})
    trainer.after_step(tr, ok, None)  # step 99: nothing due
    trainer.after_step(tr, ok, None)  # step 100 = max_steps: before, its grid was written here
    trainer.finish_checkpoint(tr, trainer.Meter(start_step=90))  # what run() does after the loop
    assert order == [("checkpoint", 100), ("grid", 100)]  # before: grid, then checkpoint
    order.clear()
    trainer.finish_checkpoint(tr, trainer.Meter(start_step=100))  # a relaunch that ran no steps
    assert order == [("checkpoint", 100)]  # (found complete by ckpt.save); its grid exists already


# ---------------------------------------------------------------- 9: the non-finite streak across a resume

def test_the_nonfinite_streak_is_saved_and_goes_on_after_a_resume():
    state = ck.TrainState(step=7, run_uid="u", nonfinite_total=3, nonfinite_run=1)
    meta = json.loads(json.dumps(state.state_dict()))
    assert meta["nonfinite_run"] == 1
    back = ck.TrainState(run_uid="u")
    back.load_state_dict(meta)
    assert back == state
    old = ck.TrainState(nonfinite_run=5)
    old.load_state_dict({"step": 7})  # a checkpoint of an earlier version
    assert old.nonfinite_run == 0
    tr = NS(state=back, eng_g=NS(gradient_accumulation_steps=lambda: 1), say=lambda *a: None,
            cfg=NS(train=NS(max_nonfinite=2)))
    with pytest.raises(FloatingPointError, match="2 consecutive steps"):  # before: 1 in a row, no stop
        trainer.count_nonfinite(tr)


def test_the_trainers_streak_is_the_states():
    tr = trainer.Trainer.__new__(trainer.Trainer)
    tr.state = ck.TrainState()
    tr.nonfinite_run = 4
    assert tr.state.nonfinite_run == 4 and tr.nonfinite_run == 4
