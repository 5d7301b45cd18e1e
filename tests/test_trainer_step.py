"""The trainer's step logic, without launching ranks: train_step and after_step on a real UNIT,
a real loader over real shards and a real (disabled) tracker; the two DeepSpeed engines are
replaced by `PlainEngine`, the engine surface the step uses over torch's Adam. The DeepSpeed
engines themselves run in the integration tests (test_train.py, test_faults.py)."""
from __future__ import annotations

import json

import pytest
import torch

from launch.config import load_config
from launch.runstore.tracking import Tracker
from launch.training import checkpoint as ckpt
from launch.training import trainer as T
from launch.training.engines import all_finite
from launch.training.watchdog import StallWatchdog
from model.ema import EMA
from model.unit import UNIT
from pipeline.loader import UnpairedLoader
from pipeline.tensors import normalize


class PlainEngine:
    """What gan_step and the trainer call on a DeepSpeed engine, over a plain module."""

    def __init__(self, module, lr: float = 1e-3, accum: int = 1):
        self.module, self.accum, self.micro = module, accum, 0
        self.opt = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999))

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.opt.step()
            self.opt.zero_grad()

    def get_lr(self):
        return [self.opt.param_groups[0]["lr"]]

    def gradient_accumulation_steps(self):
        return self.accum


def make_trainer(corpus, run_dir, accum: int = 1, nan_steps=(), model=None, **train) -> T.Trainer:
    cfg = load_config(None, base={
        "run_dir": str(run_dir), "data": {"shards": str(corpus / "shards"), "image_size": 32, "batch_size": 2,
                                          "num_workers": 0},
        "model": model or {"preset": "tiny"}, "tracking": {"enable": False}, "eval": {"baseline_images": 48},
        "train": {"max_steps": 4, "log_every": 2, "sample_every": 3, "ckpt_every": 1000, "ema_decay": 0.5, **train}})
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unit = UNIT(T.model_with_palettes(cfg))  # as trainer.build: palettes "auto" measured on the shards
    ranks = T.Ranks(rank=0, world=1, device=torch.device("cpu"), device_name="cpu", bf16_ok=False)
    eng_g, eng_d = PlainEngine(unit.gen, accum=accum), PlainEngine(unit.dis, accum=accum)
    tr = T.Trainer(cfg=cfg, ranks=ranks, unit=unit, eng_g=eng_g, eng_d=eng_d, ema=EMA(unit.gen, cfg.train.ema_decay),
                   loader=T.make_loader(cfg, ranks), tracker=Tracker(enable=False), state=ckpt.TrainState(),
                   watchdog=StallWatchdog(0, 0), ds={"zero_optimization": {"stage": 0}}, nan_steps=set(nan_steps))
    side = UnpairedLoader(str(corpus / "shards"), str(corpus / "shards"), batch_size=2, image_size=32, num_workers=0,
                          augment={"train": False}, rank=0, world_size=1)
    batch = next(iter(side))
    tr.samples = (normalize(batch["a"]), normalize(batch["b"]))
    return tr


def steps(tr: T.Trainer, n: int, counted: list | None = None) -> T.Meter:
    it = iter(tr.loader)

    def next_batch():
        if counted is not None:
            counted.append(1)
        return next(it)

    meter = T.Meter(start_step=tr.state.step)
    for _ in range(n):
        T.after_step(tr, T.train_step(tr, next_batch, meter), meter)
    return meter


def test_steps_train_log_and_sample_on_their_cadence(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.unit.gen.state_dict().items()}
    steps(tr, 4)
    assert tr.state.step == 4 and tr.state.nonfinite_total == 0
    after = tr.unit.gen.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)       # the generator learned
    assert tr.ema.num_updates == 4
    assert any(not torch.equal(tr.ema.shadow[k], after[k].float()) for k in tr.ema.shadow)  # decay 0.5: a lag
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]                              # log_every 2, and the last step
    assert all(r["images_per_s"] > 0 and "g/total" in r and "loader/batches" in r for r in lines)
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert grids == ["step-00000003.png"]                                    # sample_every 3; the last step's
    T.write_samples(tr)                                                      # grid is finish_checkpoint's
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())[-1] == "step-00000004.png"


def test_nonfinite_steps_are_counted_and_stop_the_run(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path / "ok", nan_steps={1, 2}, max_nonfinite=3)
    before = {k: v.clone() for k, v in tr.unit.gen.state_dict().items()}
    steps(tr, 2)
    assert tr.state.nonfinite_total == 2 and tr.nonfinite_run == 2
    assert all(torch.equal(before[k], v) for k, v in tr.unit.gen.state_dict().items())  # nothing updated
    steps(tr, 1)
    assert tr.nonfinite_run == 0 and tr.state.nonfinite_total == 2 and tr.state.step == 3

    tr = make_trainer(corpus, tmp_path / "stop", nan_steps={1, 2}, max_nonfinite=2)
    with pytest.raises(FloatingPointError, match="2 consecutive steps"):
        steps(tr, 2)


def test_all_finite_is_false_when_any_value_is_nan_or_infinite():
    cpu = torch.device("cpu")
    assert all_finite([torch.tensor(1.5), torch.zeros(3)], cpu)
    assert not all_finite([torch.tensor(1.5), torch.tensor([0.0, float("nan")])], cpu)
    assert not all_finite([torch.tensor(-float("inf")), torch.tensor(2.0)], cpu)
    assert all_finite([], cpu)  # nothing to check: every rank goes on


def test_accumulation_draws_one_batch_per_micro_step(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path / "run", accum=2)
    counted: list = []
    meter = T.Meter(start_step=0)
    it = iter(tr.loader)
    result = T.train_step(tr, lambda: (counted.append(1), next(it))[1], meter)
    assert result is not None and len(counted) == 2
    assert meter.images == 2 * 2 * 2    # two micro-batches of 2 images per domain


def test_checkpoints_on_cadence_but_not_at_the_last_step(corpus, tmp_path, monkeypatch):
    tr = make_trainer(corpus, tmp_path / "run", ckpt_every=2, max_steps=4)
    saved = []
    monkeypatch.setattr(T, "save_checkpoint", lambda t: saved.append(t.state.step))
    steps(tr, 4)
    assert saved == [2]   # step 4 is the last: run() writes the final checkpoint itself


def test_train_state_round_trips_through_checkpoint_meta():
    state = ckpt.TrainState(step=7, run_uid="u1", run_id="r9", nonfinite_total=2)
    meta = json.loads(json.dumps({**state.state_dict(), "config": {}}))
    back = ckpt.TrainState(run_uid="u1")
    back.load_state_dict(meta)
    assert back == state


def test_colour_discriminator_and_r1_train_through_the_step(corpus, tmp_path):
    # the recipe options of the palette head: dis_colour_octaves widens D's input, w_r1 adds
    # the penalty to the D step (logged as d/r1_a, d/r1_b)
    tr = make_trainer(corpus, tmp_path / "run", model={"preset": "tiny", "skip": "image", "palette_b": "auto",
                                                       "dis_colour_octaves": 4, "w_r1": 1.0})
    before = {k: v.clone() for k, v in tr.unit.dis.state_dict().items()}
    steps(tr, 2)
    assert any(not torch.equal(before[k], v) for k, v in tr.unit.dis.state_dict().items())
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["d/r1_a"] > 0 and rec["d/r1_b"] > 0


def test_lazy_r1_enters_the_d_step_on_every_kth_optimizer_step(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path / "run", model={"preset": "tiny", "dis_colour_octaves": 4, "w_r1": 1.0,
                                                       "r1_every": 4})
    steps(tr, 4)  # metric lines at steps 2 and 4 (log_every 2)
    rec2, rec4 = (json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert (rec2["step"], rec4["step"]) == (2, 4)
    assert "d/r1_a" not in rec2 and rec4["d/r1_a"] > 0 and rec4["d/r1_b"] > 0


def test_release_step_gets_every_core():
    """After training, rank 0 evaluates with every core the process may use, not train.threads."""
    import os

    from launch.train import evaluation_threads

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cores = evaluation_threads()
        assert cores == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


def nan_on_micro_batches(monkeypatch, calls: set[int], half: str) -> None:
    """gan_step with the generator ("g") or discriminator ("d") loss NaN on those calls (0-based,
    counted over micro-batches), wherever in an accumulation window they fall."""
    import model.unit as unit_module

    real_step, real_d_loss, seen = T.gan_step, unit_module.discriminator_loss, []

    def gan_step(*args, **kw):
        seen.append(1)
        return real_step(*args, **{**kw, "poison": half == "g" and len(seen) - 1 in calls})

    def discriminator_loss(*args, **kw):
        loss, terms = real_d_loss(*args, **kw)
        return (loss * float("nan"), terms) if half == "d" and len(seen) - 1 in calls else (loss, terms)

    monkeypatch.setattr(T, "gan_step", gan_step)
    monkeypatch.setattr(unit_module, "discriminator_loss", discriminator_loss)


@pytest.mark.parametrize("half,call", [("g", 1), ("d", 0)])
def test_nonfinite_inside_an_accumulation_window_stops_the_run(corpus, tmp_path, monkeypatch, half, call):
    # With 2 micro-batches per step, a NaN G loss on the second leaves the first one's gradients and
    # micro-step in both engines; a NaN D loss on the first comes after G's backward and step. A
    # skipped step would shift every later optimizer step across two trainer steps, so the first
    # non-finite loss stops the run, whatever max_nonfinite allows.
    tr = make_trainer(corpus, tmp_path / "run", accum=2, max_nonfinite=5)
    nan_on_micro_batches(monkeypatch, {call}, half)
    with pytest.raises(FloatingPointError, match="grad_accum_steps"):
        steps(tr, 1)
    assert tr.state.step == 1 and tr.state.nonfinite_total == 1
