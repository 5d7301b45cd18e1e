"""uint8 batches, train.precision (auto | fp32 | bf16 | fp16) and train.compile.

The selection is a pure function of (requested, CUDA available, native bf16), so every GPU case is
checked here without a GPU, down to the DeepSpeed dicts both engines get. Steps run in-process on
the test engines of test_trainer_step.py; one subprocess builds the two real DeepSpeed engines with
the bf16 (torch_autocast) config on a CPU rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.config import (ConfigError, cpu_native_bf16, deepspeed_config, load_config, precision_warning,
                           resolve_precision)
from launch.training import trainer as T
from launch.training.engines import compile_networks, step_dtypes
from model import losses
from pipeline.tensors import normalize, to_tensor
from test_trainer_step import make_trainer, steps

ROOT = Path(__file__).resolve().parent.parent
BASE = {"data": {"shards": "data/shards"}}


# ---------------------------------------------------------------- uint8 in, [-1, 1] on the device

@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_normalize_maps_uint8_to_unit_range_in_the_requested_dtype(dtype):
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    y = normalize(x, dtype)
    assert y.dtype == (dtype or torch.float32) and y.shape == x.shape
    assert y.min().item() == -1.0 and y.max().item() == 1.0
    # computed in float32 and cast once: within one rounding of the exact value in that dtype
    assert torch.equal(y, (x.float() / 127.5 - 1).to(dtype or torch.float32))
    exact = x.double() / 127.5 - 1
    assert (y.double() - exact).abs().max() <= torch.finfo(y.dtype).eps


def test_normalize_is_to_tensors_mapping_and_refuses_floats():
    img = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert torch.equal(to_tensor(img), normalize(torch.from_numpy(img).permute(0, 3, 1, 2)))
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 3, 4, 4))


def test_loader_batches_are_uint8_and_the_step_consumes_them(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path / "run")
    batch = next(iter(tr.loader))
    for d in ("a", "b"):
        assert batch[d].dtype == torch.uint8 and batch[d].shape == (2, 3, 32, 32)
        assert 0 <= batch[d].min() and batch[d].max() <= 255 and batch[d].float().std() > 1  # real pixels
        x = normalize(batch[d])
        assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    result = T.train_step(tr, lambda: batch, T.Meter(start_step=0))
    assert result is not None and torch.isfinite(result.loss_g) and torch.isfinite(result.loss_d)
    with pytest.raises(ValueError, match="uint8"):  # the old float batches are refused, not misread
        T.train_step(tr, lambda: {d: normalize(batch[d]) for d in ("a", "b")}, T.Meter(start_step=0))


# ---------------------------------------------------------------- precision selection

@pytest.mark.parametrize("requested, cuda, bf16, expected", [
    ("auto", False, False, "fp32"),     # CPU
    ("auto", True, True, "bf16"),       # A100, H100
    ("auto", True, False, "fp16"),      # V100, T4: bf16 only emulated
    ("fp32", False, False, "fp32"),
    ("fp32", True, True, "fp32"),
    ("bf16", False, False, "bf16"),     # honoured on CPU (AMX machines, tests)
    ("bf16", True, True, "bf16"),
    ("fp16", True, True, "fp16"),
    ("fp16", True, False, "fp16"),
])
def test_precision_selection(requested, cuda, bf16, expected):
    assert resolve_precision(requested, cuda, bf16) == expected


@pytest.mark.parametrize("requested, cuda, bf16, why", [
    ("fp16", False, False, "needs a CUDA GPU"),
    ("bf16", True, False, "this GPU has no native bf16"),
])
def test_precision_refusals_name_the_key(requested, cuda, bf16, why):
    with pytest.raises(ConfigError, match=f"train.precision = '{requested}': {why}"):
        resolve_precision(requested, cuda, bf16)
    cfg = load_config(None, [f"train.precision={requested}"], base=BASE)  # valid YAML; the machine decides
    with pytest.raises(ConfigError, match="train.precision"):
        deepspeed_config(cfg, None, lr=1e-4, on_gpu=cuda, bf16_ok=bf16)


def test_compile_with_bf16_is_refused_on_cpu_ranks_only():
    """torch.compile's CPU code gave non-finite gradients in bf16 (README): refused before any rank
    starts, where the same keys on a GPU, or compile with fp32 on CPU, are accepted."""
    cfg = load_config(None, ["train.compile=true", "train.precision=bf16"], base=BASE)
    with pytest.raises(ConfigError, match="train.compile = true with train.precision = 'bf16' on CPU ranks"):
        deepspeed_config(cfg, None, lr=1e-4, on_gpu=False, bf16_ok=False)
    assert deepspeed_config(cfg, None, lr=1e-4, on_gpu=True, bf16_ok=True)["torch_autocast"]["enabled"]
    for keys in (["train.compile=true", "train.precision=fp32"], ["train.compile=true", "train.precision=auto"],
                 ["train.compile=false", "train.precision=bf16"]):
        ds = deepspeed_config(load_config(None, keys, base=BASE), None, lr=1e-4, on_gpu=False, bf16_ok=False)
        assert ds["torch_autocast"]["enabled"] == keys[1].endswith("bf16"), keys


def _both(cfg, ds_json=None, *, on_gpu, bf16_ok):
    return [deepspeed_config(cfg, ds_json, lr=lr, on_gpu=on_gpu, bf16_ok=bf16_ok)
            for lr in (cfg.optim.lr_g, cfg.optim.lr_d)]


def test_auto_on_a_gpu_without_bf16_gives_both_engines_dynamic_fp16():
    cfg = load_config(None, [], base=BASE)
    for ds in _both(cfg, on_gpu=True, bf16_ok=False):
        assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # 0: dynamic
        assert ds["fp16"]["initial_scale_power"] == 16 and ds["fp16"]["loss_scale_window"] == 1000
        assert ds["bf16"] == {"enabled": False} and ds["torch_autocast"] == {"enabled": False}
    assert step_dtypes("fp16") == (torch.float16, None)
    from deepspeed.runtime.config import DeepSpeedConfig  # DeepSpeed's own reading of the dicts

    for ds in _both(cfg, on_gpu=True, bf16_ok=False):
        parsed = DeepSpeedConfig(ds).float16_config
        assert parsed.enabled and parsed.loss_scale == 0 and parsed.initial_scale_power == 16
    # a DeepSpeed JSON may tune the loss scaler; enabling fp16 against the YAML is a conflict
    ds_g, ds_d = _both(cfg, {"fp16": {"initial_scale_power": 12, "enabled": True}}, on_gpu=True, bf16_ok=False)
    assert ds_g["fp16"]["initial_scale_power"] == ds_d["fp16"]["initial_scale_power"] == 12
    with pytest.raises(ConfigError, match="fp16.enabled"):
        _both(cfg, {"fp16": {"enabled": True}}, on_gpu=True, bf16_ok=True)


def test_bf16_is_torch_autocast_over_fp32_weights_in_both_engines():
    cfg = load_config(None, [], base=BASE)
    for ds in _both(cfg, on_gpu=True, bf16_ok=True):
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert step_dtypes("bf16") == (torch.float32, torch.bfloat16)
    for ds in _both(cfg, on_gpu=False, bf16_ok=False):  # auto on CPU: plain fp32
        assert not ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


# ---------------------------------------------------------------- steps

def spy_reductions(monkeypatch) -> list:
    """(input dtypes, output dtype) of every loss reduction model.unit calls."""
    seen = []
    for name in ("l1", "kl", "gan_g", "gan_d"):
        fn = getattr(losses, name)

        def spy(*args, _fn=fn):
            out = _fn(*args)
            inputs = [a for x in args for a in (x if isinstance(x, list) else [x]) if isinstance(a, torch.Tensor)]
            seen.append(({a.dtype for a in inputs}, out.dtype))
            return out

        monkeypatch.setattr(losses, name, spy)
    return seen


def test_bf16_step_on_cpu_autocasts_the_networks_and_reduces_in_fp32(corpus, tmp_path, monkeypatch):
    tr = make_trainer(corpus, tmp_path / "run", log_every=1, max_steps=2)
    tr.precision = "bf16"
    assert tr.dtype == torch.float32 and tr.autocast == torch.bfloat16
    seen = spy_reductions(monkeypatch)
    steps(tr, 2)
    assert tr.state.step == 2 and tr.state.nonfinite_total == 0
    assert any(torch.bfloat16 in dtypes for dtypes, _ in seen)            # the networks ran in bf16
    assert {out for _, out in seen} == {torch.float32}                    # every reduction in fp32
    assert all(p.dtype == torch.float32 for p in tr.unit.parameters())    # fp32 weights
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["g/total"]) and np.isfinite(r["d/total"]) for r in lines)


def test_fp16_step_feeds_half_inputs_and_reduces_in_fp32(corpus, tmp_path, monkeypatch):
    """The dtype plumbing of fp16 (DeepSpeed's fp16 mode halves the weights; here the test engines'
    modules are halved by hand: DeepSpeed's loss scaling itself needs a GPU)."""
    tr = make_trainer(corpus, tmp_path / "run", log_every=1, max_steps=1)
    tr.precision = "fp16"
    tr.unit.half()
    tr.samples = tuple(x.to(tr.dtype) for x in tr.samples)  # as start_tracking does
    seen = spy_reductions(monkeypatch)
    steps(tr, 1)
    assert tr.state.step == 1 and tr.state.nonfinite_total == 0
    assert {torch.float16} == set().union(*(dtypes for dtypes, _ in seen))  # half inputs and outputs ...
    assert {out for _, out in seen} == {torch.float32}                        # ... reduced in fp32


def test_skipped_steps_are_logged(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path / "run", log_every=1, max_steps=1)
    tr.eng_g.skipped_steps, tr.eng_d.skipped_steps = 3, 1  # what a DeepSpeed fp16 engine counts
    steps(tr, 1)
    (line,) = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert line["skipped_steps_g"] == 3 and line["skipped_steps_d"] == 1


def test_compile_runs_a_step_on_cpu(corpus, tmp_path):
    """The trainer's compile: dynamo captures the networks, AOTAutograd splits forward and backward,
    the engines step the same parameters. The backend here is AOTAutograd with the graphs run as
    they are (torch's documented custom-backend recipe, `aot_eager` plus a count): inductor's C++
    code generation on top of the same capture took 10 minutes for this step on 2 CPU cores."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def run_as_is(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    tr = make_trainer(corpus, tmp_path / "run", compile=True, max_steps=1, sample_every=1000)
    assert tr.cfg.train.compile
    keys = list(tr.unit.state_dict())
    compile_networks(tr.eng_g.module, tr.eng_d.module, backend=aot_autograd(fw_compiler=run_as_is))
    before = {k: v.clone() for k, v in tr.unit.gen.state_dict().items()}
    steps(tr, 1)
    assert tr.state.step == 1 and tr.state.nonfinite_total == 0
    assert len(graphs) >= 3  # the generator and both discriminators ran compiled
    assert list(tr.unit.state_dict()) == keys  # in place: checkpoints and exports see the same names
    assert any(not torch.equal(before[k], v) for k, v in tr.unit.gen.state_dict().items())


# ---------------------------------------------------------------- the real engines

DS_BF16 = """
import json, os, sys, torch, deepspeed
from launch.config import load_config, deepspeed_config
from launch.training.engines import build_engines, gan_step
from model.unit import UNIT
from pipeline.tensors import normalize
cfg = load_config(None, ["train.precision=bf16", "train.zero_stage=1"],
                  base={"data": {"shards": "x", "image_size": 32, "batch_size": 2}, "model": {"preset": "tiny"}})
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
unit = UNIT(cfg.model)
eng_g, eng_d = build_engines(unit, *(deepspeed_config(cfg, None, lr=1e-3, on_gpu=False, bf16_ok=False)
                                     for _ in range(2)))
x = normalize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
r = gan_step(eng_g, eng_d, x, x.flip(0), unit.cfg, torch.device("cpu"), autocast=torch.bfloat16)
print(json.dumps({"loss_g": r.loss_g.item(), "loss_d": r.loss_d.item(), "loss_dtype": str(r.loss_g.dtype),
                  "weights": sorted({str(p.dtype) for p in unit.parameters()}), "skipped": eng_g.skipped_steps}))
"""


def test_bf16_deepspeed_engines_run_a_step_on_a_cpu_rank(tmp_path):
    """DeepSpeed accepts the generated torch_autocast section (ZeRO 1) and steps with fp32 weights."""
    from trainutil import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DS_BF16], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.isfinite(got["loss_g"]) and np.isfinite(got["loss_d"]) and got["loss_dtype"] == "torch.float32"
    assert got["weights"] == ["torch.float32"] and got["skipped"] == 0


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(tmp_path):
    """Honoured (the CPU dry runs use it) but about 18x slower than fp32 there: the run says so."""
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse2 avx2 fma\n")
    assert not cpu_native_bf16(info) and not cpu_native_bf16(tmp_path / "missing")
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_native_bf16(info)
    assert "18x slower than fp32" in precision_warning("bf16", on_gpu=False, cpu_bf16=False)
    for case in (("bf16", False, True), ("bf16", True, False), ("fp32", False, False), ("fp16", True, False)):
        assert precision_warning(*case) is None, case

