"""Training review 8: a resume checks the palettes its weights carry (not the shards), and not
init_from; train.max_steps below the checkpoint's step, and a switch into or out of fp16 behind
train.precision auto, are refused before launch; a warmup as long as the run is refused; an
override into a null section works; another run dir's checkpoint does not reopen its MLflow run;
a resume that gets a new MLflow run logs the run's params; under fp16 overflows both engines'
rates follow the trainer's step."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
import yaml

import launch.config as C
import launch.training.palette as P
import launch.training.trainer as trainer
from launch.runstore import rundir
from launch.training import checkpoint as ck
from launch.training.engines import gan_step, lr_factor
from test_training_review7 import PlainEngine, images, tiny


def config(tmp_path: Path, *overrides: str, model: dict | None = None) -> C.Config:
    base = {"data": {"shards": str(tmp_path / "shards"), "image_size": 32}, "run_dir": str(tmp_path / "run"),
            "model": model or {"preset": "tiny"}}
    return C.load_config(None, list(overrides), base=base)


def checkpoint(cfg: C.Config, step: int = 10, **meta_extra) -> Path:
    """A marked checkpoint of cfg's run (empty engine folders) at `step`."""
    uid = rundir.claim_run_dir(cfg.run_dir)["run_uid"]
    d = ck.step_dir(cfg.run_dir, step)
    (d / "G").mkdir(parents=True)
    (d / "D").mkdir()
    meta = {"step": step, "run_uid": uid, "config": cfg.model_dump(mode="json"),
            "deepspeed": C.ds_resume_record({}), **meta_extra}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / ck.MARKER).write_text(json.dumps({"step": step, "run_uid": uid}))
    return d


@pytest.fixture
def no_shards(monkeypatch):
    """The shards are there (not the point) and measuring them fails the test."""
    monkeypatch.setattr(C, "check_shard_index", lambda cfg: None)

    def measure(*a):
        raise AssertionError("the shards were measured")
    monkeypatch.setattr(P, "measure", measure)


# ---------------------------------------------------------------- 1: palettes on resume

def test_check_takes_a_resumed_runs_palettes_from_its_checkpoint(tmp_path, no_shards):
    cfg = config(tmp_path, model={"preset": "tiny", "palette_a": "auto"})
    checkpoint(cfg, palettes={"palette_a": [[0, 0, 0], [255, 255, 255]], "palette_b": None})
    C.check(cfg)  # before: measured the (changed) shards and refused them


def test_check_takes_a_local_init_from_exports_palettes(tmp_path, no_shards, monkeypatch):
    cfg = config(tmp_path, model={"preset": "tiny", "palette_a": "auto"})
    cfg.init_from = str(tmp_path / "export")
    monkeypatch.setattr(C, "check_init_from", lambda cfg: None)
    seen = []  # (checkpoint, init dir) that check() asks for the colours the weights carry
    monkeypatch.setattr(P, "saved_palettes", lambda c, i: seen.append((c, i)) or ({"palette_a": [[1, 1, 1], [2, 2, 2]]}, "x"))
    C.check(cfg)
    assert seen == [(None, tmp_path / "export")]


# ---------------------------------------------------------------- 8: max_steps below the checkpoint

def test_max_steps_below_the_checkpoints_step_is_refused_before_launch(tmp_path):
    ckpt_dir = checkpoint(config(tmp_path), step=200)
    with pytest.raises(C.ConfigError, match=r"train.max_steps = 150: below step 200 of the checkpoint .*step-00000200"):
        C.resume_point(config(tmp_path, "train.max_steps=150"))
    assert C.resume_point(config(tmp_path, "train.max_steps=200")) == ckpt_dir  # a finished run relaunched


# ---------------------------------------------------------------- 6: warmup as long as the run

@pytest.mark.parametrize("schedule", ["warmup", "warmup_decay"])
def test_a_warmup_as_long_as_the_run_is_refused_naming_both_keys(tmp_path, schedule):
    with pytest.raises(C.ConfigError, match=r"optim.warmup_steps = 1000 with train.max_steps = 1000"):
        config(tmp_path, f"optim.schedule={schedule}", "optim.warmup_steps=1000", "train.max_steps=1000")
    assert config(tmp_path, f"optim.schedule={schedule}", "optim.warmup_steps=999",
                  "train.max_steps=1000").optim.warmup_steps == 999


# ---------------------------------------------------------------- 9: override into a null section

def test_an_override_into_a_null_section_sets_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  shards: x\n  image_size: 32\n  augment:\n    # resize: 72\nmodel: {preset: tiny}\n")
    cfg = C.load_config(path, ["data.augment.resize=72"])
    assert cfg.data.augment.resize == 72
    assert C.apply_overrides({"eval": None}, ["eval.c2st_steps=0"]) == {"eval": {"c2st_steps": 0}}
    with pytest.raises(C.ConfigError, match="shards is not a section"):
        C.apply_overrides({"data": {"shards": "x"}}, ["data.shards.a=1"])


# ---------------------------------------------------------------- 4: init_from is not read on resume

def test_init_from_is_not_checked_when_the_run_resumes(tmp_path, no_shards):
    cfg = config(tmp_path, f"init_from={tmp_path / 'gone'}")
    with pytest.raises(C.ConfigError, match="config key init_from"):
        C.check(cfg)  # starting at step 0: it is read, so checked
    checkpoint(cfg)
    C.check(cfg)  # before: refused although a resume never reads it


# ---------------------------------------------------------------- 2, 5: the MLflow run of a resume

def test_another_run_dirs_checkpoint_does_not_give_its_mlflow_run_id():
    meta = {"step": 400, "run_uid": "source", "run_id": "mlflow-of-source"}
    foreign = ck.TrainState(run_uid="new")
    foreign.load_state_dict(meta)
    assert foreign.run_id is None and foreign.step == 400
    own = ck.TrainState(run_uid="source")
    own.load_state_dict(meta)
    assert own.run_id == "mlflow-of-source"


class FakeTracker:
    def __init__(self, returns):
        self.returns, self.calls = returns, []

    def start(self, run_dir, run_id=None):
        self.calls.append(("start", run_id))
        return self.returns

    def log_params(self, p):
        self.calls.append(("log_params", p["config_hash"]))

    def log_datasets(self, **k):
        self.calls.append(("log_datasets",))

    def set_tags(self, t):
        self.calls.append(("set_tags", t))


def tracked(tmp_path, returns, run_id, resumed_run_id=None):
    cfg = config(tmp_path)
    unit = NS(gen=torch.nn.Linear(2, 2), dis=torch.nn.Linear(2, 1))
    return NS(cfg=cfg, tracker=FakeTracker(returns), state=NS(step=400, run_id=run_id), run_dir=Path(cfg.run_dir),
              ranks=NS(device=torch.device("cpu"), world=1), dtype=torch.float32, ds={}, unit=unit, samples=None,
              resumed_run_id=resumed_run_id)


def test_a_resume_that_gets_a_new_mlflow_run_logs_the_runs_params(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "held_out_batch", lambda *a: (torch.zeros(1, 3, 32, 32),) * 2)
    tr = tracked(tmp_path, "NEW", "old", resumed_run_id="source-run")
    trainer.start_tracking(tr)
    names = [c[0] for c in tr.tracker.calls]
    assert tr.state.run_id == "NEW" and "log_params" in names and "log_datasets" in names
    assert ("set_tags", {"resumed_from.run_id": "source-run", "resumed_from.step": "400"}) in tr.tracker.calls
    again = tracked(tmp_path, "old", "old")  # reopened: its params are there already
    trainer.start_tracking(again)
    assert [c[0] for c in again.tracker.calls] == ["start"]
    off = tracked(tmp_path, None, "old")  # tracking off, or the server down: nothing to log into yet
    trainer.start_tracking(off)
    assert [c[0] for c in off.tracker.calls] == ["start"]


# ---------------------------------------------------------------- 3: precision auto on resume

def test_a_switch_into_or_out_of_fp16_behind_auto_is_refused_before_launch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(C, "native_bf16", lambda: False)  # a V100: auto is fp16 here
    checkpoint(config(tmp_path), precision="bf16")  # written by the same config on an H100
    with pytest.raises(C.ConfigError, match=r"checkpoint trained in bf16 \(train.precision 'auto'\), config has "
                                            r"'auto', which is fp16 here"):
        C.resume_point(config(tmp_path))
    monkeypatch.setattr(C, "native_bf16", lambda: True)
    assert C.resume_point(config(tmp_path)) is not None  # bf16 again
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert C.resume_point(config(tmp_path)) is not None  # fp32 from bf16: the same fp32 engines


def test_an_explicit_fp16_checkpoint_resumed_in_fp32_is_refused_and_unknown_auto_passes(tmp_path):
    checkpoint(config(tmp_path, "train.precision=fp16"))  # no record: its explicit word counts
    with pytest.raises(C.ConfigError, match=r"checkpoint trained in fp16 \(train.precision 'fp16'\)"):
        C.resume_point(config(tmp_path, "train.precision=fp32"))
    assert C.checkpoint_precision({"config": {"train": {"precision": "auto"}}}) is None


def test_a_checkpoint_records_the_resolved_precision(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(ck, "save", lambda *a, meta, **k: saved.update(meta))
    cfg = config(tmp_path)
    tr = NS(cfg=cfg, state=ck.TrainState(step=3, run_uid="u"), ranks=NS(is_main=False, rank=0, world=1),
            loader=NS(state_dict=lambda: {}), ds={}, unit=NS(cfg=tiny().cfg), ema=NS(state_dict=lambda: None),
            run_dir=Path(cfg.run_dir), precision="fp16", tracker=None, eng_g=None, eng_d=None)
    trainer.save_checkpoint(tr)
    assert saved["precision"] == "fp16"


def test_a_checkpoint_keeps_no_url_password(tmp_path, monkeypatch):
    """meta.json is copied with the run as config.yaml is: the tracking URI's password is cut there too."""
    saved = {}
    monkeypatch.setattr(ck, "save", lambda *a, meta, **k: saved.update(meta))
    cfg = config(tmp_path, "tracking.uri=https://alice:s3cr3t-pw@mlflow.example.com")
    tr = NS(cfg=cfg, state=ck.TrainState(step=3, run_uid="u"), ranks=NS(is_main=False, rank=0, world=1),
            loader=NS(state_dict=lambda: {}), ds={}, unit=NS(cfg=tiny().cfg), ema=NS(state_dict=lambda: None),
            run_dir=Path(cfg.run_dir), precision="fp32", tracker=None, eng_g=None, eng_d=None)
    trainer.save_checkpoint(tr)
    assert "s3cr3t-pw" not in json.dumps(saved)
    assert saved["config"]["tracking"]["uri"].startswith("https://alice")  # the user and host stay
    assert saved["config_hash"] == C.config_hash(cfg)


# ---------------------------------------------------------------- 7: fp16 overflows and the schedule

class OverflowEngine(PlainEngine):
    """PlainEngine as DeepSpeed's fp16 engine behaves on an overflow: no update, no scheduler step."""

    def __init__(self, module, overflow_steps):
        super().__init__(module)
        self.overflow_steps, self.taken, self.rates = overflow_steps, 0, []

    def step(self):
        self.taken += 1
        self.rates.append(self.opt.param_groups[0]["lr"])
        if self.taken in self.overflow_steps:
            self.opt.zero_grad()
            return
        super().step()


def test_both_engines_rates_follow_the_trainers_step_whatever_overflowed():
    unit = tiny()
    eng_g, eng_d = OverflowEngine(unit.gen, {2}), OverflowEngine(unit.dis, {1, 3})
    for step in range(1, 7):
        assert gan_step(eng_g, eng_d, *images(step), unit.cfg, torch.device("cpu"), step=step) is not None
    expected = [1e-3 * lr_factor("warmup", 4, 10, s) for s in range(1, 7)]
    assert eng_g.rates == pytest.approx(expected) and eng_d.rates == pytest.approx(expected)  # before: each lagged


# ---------------------------------------------------------------- the config check's flags (docs review 8)

@pytest.mark.parametrize("flag", ["--deepspeed_config", "--deepspeed-config"])
def test_the_config_check_takes_and_prints_the_deepspeed_json_as_the_trainer_does(tmp_path, monkeypatch, capsys, flag):
    """make train passes ARGS to `python -m launch.config` and to launch/train.py: both spellings the
    trainer takes must pass the check, and the printed config is the run's (the JSON in it)."""
    monkeypatch.setattr(C, "check_shard_index", lambda cfg: None)
    yml = tmp_path / "c.yaml"
    yml.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{shards: {tmp_path / 'shards'}, image_size: 32}}\n"
                   "model: {preset: tiny}\n")
    ds = str(Path(C.__file__).resolve().parents[1] / "configs" / "ds" / "zero0.json")
    assert C.main([str(yml), "train.zero_stage=0", flag, ds, "seed=1"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["deepspeed_config"] == ds and out["seed"] == 1
