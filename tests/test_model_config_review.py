"""Review findings: fp16 dtypes in the model, the fast LayerNorm's backward on constant samples,
config values that used to fail only on the ranks, and resuming under another DeepSpeed JSON."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from launch.config import (ConfigError, deepspeed_config, ds_resume_record, launched_ds_settings, load_config,
                           load_ds_json, resume_point)
from launch.runstore import rundir
from launch.training import checkpoint as ckpt
from model.kernels import layer_norm
from model.networks import LayerNorm
from model.unit import UNIT, generator_loss, make_config, r1_loss

ROOT = Path(__file__).resolve().parent.parent
BASE = {"data": {"shards": "data/shards", "image_size": 32}, "model": {"preset": "tiny"}}
PALETTE = [[0, 0, 0], [255, 255, 255], [200, 30, 30]]


def half_params(module: torch.nn.Module) -> torch.nn.Module:
    """What DeepSpeed 0.19's fp16 mode does to a module: parameters to half, buffers left fp32."""
    for p in module.parameters():
        p.data = p.data.half()
    return module


def unit_fp16(**kw) -> UNIT:
    torch.manual_seed(0)
    return half_params(UNIT(make_config({"preset": "tiny", "image_size": 32, **kw})))


def images_fp16(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).half() for _ in range(2)]


# ---------------------------------------------------------------- 1. fp16: inputs in the weights' dtype

def test_r1_runs_in_the_discriminators_half_dtype_and_reduces_in_fp32():
    unit = unit_fp16(w_r1=1.0, dis_colour_octaves=2)
    x_a, x_b = images_fp16()
    total, terms = r1_loss(unit.dis, x_a, x_b, unit.cfg)  # was: Input type (float) and bias type (c10::Half)
    assert total.dtype == torch.float32 and torch.isfinite(total) and float(total.detach()) > 0
    total.backward()  # the double backward reaches the half weights
    assert all(p.grad is not None and p.grad.dtype == torch.float16 for p in unit.dis.parameters() if p.ndim == 4)
    # the same penalty as in fp32, to half's rounding
    torch.manual_seed(0)
    ref = UNIT(make_config({"preset": "tiny", "image_size": 32, "w_r1": 1.0, "dis_colour_octaves": 2}))
    want, _ = r1_loss(ref.dis, x_a.float(), x_b.float(), ref.cfg)
    assert torch.allclose(total, want, rtol=2e-2), (float(total), float(want))


@pytest.mark.parametrize("skip", ["none", "image"])
def test_palette_generator_paints_in_its_half_dtype_for_the_half_discriminators(skip):
    # PaletteHead's fp32 logits made x_ab fp32: the re-encoding and the discriminators (half) failed
    unit = unit_fp16(palette_b=PALETTE, skip=skip, expected="b", dis_colour_octaves=2)
    x_a, x_b = images_fp16()
    out = unit.gen(x_a, x_b)
    assert {k: v.dtype for k, v in out.items() if k.startswith(("x_", "exp_"))} == \
        dict.fromkeys(("x_aa", "x_bb", "x_ab", "x_ba", "x_aba", "x_bab", "exp_b"), torch.float16)
    unit.dis.requires_grad_(False)
    loss, _ = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # in fp32 the head still paints fp32 (and eval the exact palette colours)
    torch.manual_seed(0)
    ref = UNIT(make_config({"preset": "tiny", "image_size": 32, "palette_b": PALETTE, "skip": skip})).eval()
    y = ref.translate(x_a.float(), "a2b")
    assert y.dtype == torch.float32
    colours = torch.tensor(PALETTE, dtype=torch.float32) / 127.5 - 1
    pixels = y.permute(0, 2, 3, 1).reshape(-1, 1, 3)
    assert (pixels - colours).abs().amax(-1).min(1).values.max() == 0


@pytest.mark.parametrize("precision, on_gpu, bf16_ok, refused", [
    ("fp16", True, False, True), ("auto", True, False, True),   # V100, T4: auto is fp16
    ("auto", True, True, False), ("fp32", True, False, False), ("auto", False, False, False)])
def test_spectral_norm_is_refused_where_precision_resolves_to_fp16(precision, on_gpu, bf16_ok, refused):
    cfg = load_config(None, ["model.dis_norm=sn", f"train.precision={precision}"], base=BASE)
    if not refused:
        deepspeed_config(cfg, None, lr=1e-4, on_gpu=on_gpu, bf16_ok=bf16_ok)
        return
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg, None, lr=1e-4, on_gpu=on_gpu, bf16_ok=bf16_ok)
    assert "model.dis_norm = 'sn'" in str(e.value) and "fp16" in str(e.value)
    # without spectral norm the same precision is fine
    plain = load_config(None, [f"train.precision={precision}"], base=BASE)
    assert deepspeed_config(plain, None, lr=1e-4, on_gpu=on_gpu, bf16_ok=bf16_ok)["fp16"]["enabled"]


# ---------------------------------------------------------------- 2. fast LayerNorm backward, constant sample

def test_fast_layer_norm_backward_matches_the_stock_one_on_a_constant_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    x[0] = 0.0   # all features equal: std 0
    x[2] = 1.5
    gamma = torch.randn(4, generator=g, dtype=torch.float64)
    beta = torch.randn(4, generator=g, dtype=torch.float64)
    grad_out = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    stock = LayerNorm(4)

    def grads(fn):
        xs, gs, bs = (t.clone().requires_grad_(True) for t in (x, gamma, beta))
        y = fn(xs, gs, bs)
        y.backward(grad_out)
        return y.detach(), xs.grad, gs.grad, bs.grad

    fast = grads(lambda a, b, c: layer_norm(a, b, c, stock.eps))
    want = grads(stock._forward_official)
    assert all(torch.isfinite(t).all() for t in want)
    for got, ref in zip(fast, want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- 3. config values that failed on the ranks

def test_discriminator_deeper_than_the_image_is_refused_by_the_config():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.dis_layers=6"], base=BASE)  # a scale needs 2**6 = 64 px
    msg = str(e.value)
    assert "data.image_size = 32" in msg and "model.dis_layers" in msg and "64 px" in msg
    with pytest.raises(ConfigError, match="model.dis_min_size"):
        load_config(None, ["model.dis_min_size=48"], base=BASE)
    # what validates builds: 2**5 = 32 px is one scale at 32 px
    cfg = load_config(None, ["model.dis_layers=5", "model.dis_scales=3"], base=BASE)
    assert len(UNIT(cfg.model).dis.dis_a.nets) == 1
    with pytest.raises(ValueError, match="dis_layers"):  # the model's own check, shared with the config
        UNIT(make_config({"preset": "tiny", "dis_layers": 6, "image_size": 32}))


def test_channels_other_than_rgb_are_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.channels=1"], base=BASE)
    assert "model.channels = 1" in str(e.value) and "RGB" in str(e.value)
    assert load_config(None, ["model.channels=3"], base=BASE).model.channels == 3


def test_train_batch_size_without_accumulation_is_refused():
    cfg = load_config(None, ["data.batch_size=4"], base=BASE)
    with pytest.raises(ConfigError) as e:  # DeepSpeed's batch assertion failed on the ranks
        deepspeed_config(cfg, {"train_batch_size": 16}, lr=1e-4, on_gpu=False, bf16_ok=False)
    assert "train_batch_size" in str(e.value) and "gradient_accumulation_steps" in str(e.value)
    ds = deepspeed_config(cfg, {"train_batch_size": 16, "gradient_accumulation_steps": 2}, lr=1e-4,
                          on_gpu=False, bf16_ok=False)
    assert "train_batch_size" not in ds and ds["gradient_accumulation_steps"] == 2


def test_warmup_steps_with_a_constant_schedule_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.warmup_steps=100"], base=BASE)
    assert "optim.warmup_steps = 100" in str(e.value) and "optim.schedule" in str(e.value)
    cfg = load_config(None, ["optim.warmup_steps=100", "optim.schedule=warmup"], base=BASE)
    assert cfg.optim.warmup_steps == 100 and deepspeed_config(cfg, None, lr=1e-4, on_gpu=False, bf16_ok=False)


def test_shipped_configs_still_validate_and_build_their_discriminators():
    for path in (ROOT / "configs").glob("*.yaml"):
        cfg = load_config(path)
        model = dataclasses.replace(cfg.model, palette_a=[], palette_b=[])  # "auto" is measured on the data
        assert len(UNIT(model).dis.dis_a.nets) >= 1, path


# ---------------------------------------------------------------- 4. resuming under another DeepSpeed JSON

def write_json(path: Path, **ds) -> str:
    path.write_text(json.dumps(ds))
    return str(path)


def checkpoint(run_dir: Path, *overrides, meta_extra=None) -> Path:
    """A complete checkpoint as save() leaves it (G/ and D/ empty: nothing is unpickled here)."""
    run_uid = rundir.claim_run_dir(run_dir)["run_uid"]
    d = ckpt.step_dir(run_dir, 2)
    (d / "G").mkdir(parents=True)
    (d / "D").mkdir()
    cfg = load_config(None, [f"run_dir={run_dir}", *overrides], base=BASE)
    meta = {"step": 2, "config": cfg.model_dump(mode="json"), "run_uid": run_uid, **(meta_extra or {})}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "rank-00000.json").write_text("{}")
    (d / ckpt.MARKER).write_text(json.dumps({"step": 2, "run_uid": run_uid}))
    return d


def resume(run_dir, *overrides, ds_path=None):
    return resume_point(load_config(None, [f"run_dir={run_dir}", *overrides], base=BASE), ds_path)


def test_resume_refuses_a_changed_zero_stage_from_the_deepspeed_json(tmp_path):
    z0, z1, z2 = (write_json(tmp_path / f"z{s}.json", zero_optimization={"stage": s}) for s in (0, 1, 2))
    # a ZeRO-1 run resumed without its JSON (ZeRO 0): optimizer.load_state_dict(None) on the ranks
    run = tmp_path / "run1"
    old = checkpoint(run, f"deepspeed_config={z1}")
    with pytest.raises(ConfigError) as e:
        resume(run)
    assert "zero_optimization.stage" in str(e.value) and "checkpoint has 1, config has 0" in str(e.value)
    # ... and with the --deepspeed_config flag of `python -m launch.config`
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        resume(run, ds_path=z2)
    assert resume(run, f"deepspeed_config={z1}") == old
    # the same settings from another JSON file resume (the YAML keys themselves may not change)
    copy = write_json(tmp_path / "moved.json", zero_optimization={"stage": 1}, gradient_accumulation_steps=1)
    assert resume(run, f"deepspeed_config={copy}") == old
    # a ZeRO-0 run resumed at stage 1 or 2 would start Adam's moments afresh
    run = tmp_path / "run0"
    old = checkpoint(run)
    for path in (z1, z2):
        with pytest.raises(ConfigError, match="checkpoint has 0, config has"):
            resume(run, f"deepspeed_config={path}")
    assert resume(run, f"deepspeed_config={z0}") == old


def test_resume_refuses_changed_accumulation_or_clipping_from_the_deepspeed_json(tmp_path):
    ds = write_json(tmp_path / "ds.json", gradient_accumulation_steps=2, gradient_clipping=1.0)
    run = tmp_path / "run"
    old = checkpoint(run, f"deepspeed_config={ds}")
    with pytest.raises(ConfigError) as e:
        resume(run)
    assert "gradient_accumulation_steps: checkpoint has 2, config has 1" in str(e.value)
    assert "gradient_clipping: checkpoint has 1.0, config has 0.0" in str(e.value)
    same = write_json(tmp_path / "same.json", gradient_accumulation_steps=2, gradient_clipping=1.0,
                      zero_optimization={"stage": 0})
    assert resume(run, f"deepspeed_config={same}") == old
    clip2 = write_json(tmp_path / "clip2.json", gradient_accumulation_steps=2, gradient_clipping=2.0)
    with pytest.raises(ConfigError, match="gradient_clipping: checkpoint has 1.0, config has 2.0"):
        resume(run, f"deepspeed_config={clip2}")


def test_resume_needs_the_checkpoints_deepspeed_json_or_its_settings(tmp_path):
    gone = tmp_path / "gone.json"
    run = tmp_path / "run"
    checkpoint(run, f"deepspeed_config={write_json(gone, zero_optimization={'stage': 1})}")
    gone.unlink()
    with pytest.raises(ConfigError) as e:
        resume(run, f"deepspeed_config={write_json(tmp_path / 'z1.json', zero_optimization={'stage': 1})}")
    assert str(gone) in str(e.value) and "cannot be read" in str(e.value)
    # the resolved DeepSpeed config in meta.json, where a checkpoint has it, wins over the file
    run = tmp_path / "run-meta"
    old = checkpoint(run, f"deepspeed_config={gone}", meta_extra={"deepspeed": {
        "zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}})
    z2 = write_json(tmp_path / "z2.json", zero_optimization={"stage": 2})
    assert resume(run, f"deepspeed_config={z2}") == old
    with pytest.raises(ConfigError, match="checkpoint has 2, config has 0"):
        resume(run)


@pytest.mark.parametrize("overrides, ds", [
    ((), {}),
    (("train.zero_stage=1", "train.grad_accum_steps=2", "optim.grad_clip=0.5"), {}),
    ((), {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 3, "gradient_clipping": 1.5,
          "comet": {"enabled": False, "api_key": "SECRET"}}),
])
def test_the_trainers_deepspeed_record_resumes_as_the_json_it_came_from(tmp_path, overrides, ds):
    """save_checkpoint keeps ds_resume_record(resolved DeepSpeed config) in meta.json: the settings
    read from it are the ones the run launched with, and nothing else of the JSON is kept."""
    path = write_json(tmp_path / "ds.json", **ds) if ds else None
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides, *([f"deepspeed_config={path}"] if path else [])],
                      base=BASE)
    resolved = deepspeed_config(cfg, load_ds_json(path), lr=1e-4, on_gpu=False, bf16_ok=False)
    record = ds_resume_record(resolved)
    assert "SECRET" not in json.dumps(record)
    assert launched_ds_settings({}, record) == launched_ds_settings(cfg.model_dump(mode="json"), load_ds_json(path))
    want = {"zero_optimization.stage": 2, "gradient_accumulation_steps": 3, "gradient_clipping": 1.5} if ds else None
    if overrides:
        want = {"zero_optimization.stage": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}
    if want:
        assert launched_ds_settings({}, record) == want
