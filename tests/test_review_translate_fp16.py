"""Review findings: folder translation's window bounded by bytes as well as by count (large
photos), and batch norm under DeepSpeed's fp16 mode (half parameters, fp32 running statistics)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import launch.release.translate as tr
from launch.config import deepspeed_config, load_config

BASE = {"data": {"shards": "data/shards", "image_size": 32}, "model": {"preset": "tiny"}}


# ---------------------------------------------------------------- 1. the window holds at most N bytes

def test_a_folder_of_large_images_is_translated_in_windows_bounded_by_bytes(tmp_path, monkeypatch):
    # Before: the window was bounded by WINDOW x batch_size images only: all 11 images (10,752
    # bytes decoded) were held at once, whatever their size.
    src = tmp_path / "in"
    src.mkdir()
    sides = [16] * 5 + [32] + [16] * 5   # 768 bytes each, and one of 3,072: above the bound alone
    for i, s in enumerate(sides):
        Image.fromarray(np.full((s, s, 3), 10 * i, np.uint8)).save(src / f"{i:02d}.png")
    limit = 2000  # two 16 x 16 images fit, three do not
    in_flight, peak, windows, written = [0], [0], [], []
    real_read, real_save, real_window = tr.read_rgb, tr.save_image, tr.translate_window

    def read(p, **kw):
        arr = real_read(p, **kw)
        in_flight[0] += arr.nbytes
        peak[0] = max(peak[0], in_flight[0])
        return arr

    def save(arr, path):
        in_flight[0] -= arr.nbytes  # a translation has its source's shape
        written.append(path.name)
        real_save(arr, path)

    def window(fn, direction, images, batch_size, limits=None):
        windows.append([a.nbytes for a in images])
        return real_window(fn, direction, images, batch_size, limits)

    monkeypatch.setattr(tr, "read_rgb", read)
    monkeypatch.setattr(tr, "save_image", save)
    monkeypatch.setattr(tr, "translate_window", window)
    res = tr.translate_folder(lambda x, d: 255 - x, "a2b", src, tmp_path / "out", batch_size=8,
                              progress=False, window_bytes=limit)
    assert res["translated"] == 11 and not res["rejected"]
    assert all(sum(w) <= limit or len(w) == 1 for w in windows), windows
    small = [768, 768]
    assert windows == [small, small, [768], [3072], small, small, [768]]  # the large image alone
    assert peak[0] <= limit + max(s * s * 3 for s in sides)  # held: a window, and the image being decoded
    assert written == [f"{i:02d}.png" for i in range(11)]  # input order kept
    out = np.asarray(Image.open(tmp_path / "out" / "05.png"))
    assert out.shape == (32, 32, 3) and (out == 255 - 50).all()
    assert "Translated 11 image(s) a2b" in tr.summary(res, "a2b", "m")


def test_the_count_bound_still_holds_and_no_byte_bound_is_the_old_window(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(src / f"{i:02d}.png")
    sizes = []
    real_window = tr.translate_window

    def window(fn, direction, images, batch_size, limits=None):
        sizes.append(len(images))
        return real_window(fn, direction, images, batch_size, limits)
    monkeypatch.setattr(tr, "translate_window", window)
    for window_bytes in (None, 1 << 20):  # none, and one the count bound reaches first
        sizes.clear()
        res = tr.translate_folder(lambda x, d: x, "a2b", src, tmp_path / f"out{window_bytes}", batch_size=1,
                                  progress=False, window_bytes=window_bytes)
        assert res["translated"] == 10 and sizes == [tr.WINDOW, tr.WINDOW, 2]


def test_window_mb_on_the_command_line(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a.png")
    seen = []
    real = tr.translate_folder
    monkeypatch.setattr(tr, "load", lambda a: (lambda x, d: 255 - x, None, {}, tr.Limits()))
    monkeypatch.setattr(tr, "translate_folder", lambda *a, **kw: seen.append(kw["window_bytes"]) or real(*a, **kw))
    base = ["--model", "unused", "--direction", "a2b", "--in", str(src), "--no-progress"]
    for extra, want in (([], tr.WINDOW_MB << 20), (["--window-mb", "3"], 3 << 20), (["--window-mb", "0"], None)):
        assert tr.main(base + ["--out", str(tmp_path / f"out{len(seen)}")] + extra) == 0
        assert seen[-1] == want
    assert "Translated 1 image(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tr.parse_args(base + ["--out", str(tmp_path / "x"), "--window-mb", "-1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tr.parse_args(["--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "--window-mb" in helptext and f"default {tr.WINDOW_MB}" in helptext
    assert "--window-mb" in tr.__doc__


# ---------------------------------------------------------------- 2. batch norm under DeepSpeed's fp16

def half_params(module: torch.nn.Module) -> torch.nn.Module:
    """What DeepSpeed 0.19's fp16 mode does to a module (engine._configure_distributed_model):
    parameters to half, buffers left fp32."""
    for p in module.parameters():
        p.data = p.data.half()
    return module


def test_batch_norm_runs_with_half_parameters_and_fp32_statistics():
    # Before: nn.BatchNorm2d under DeepSpeed's cast failed: "expected scalar type Half but found Float".
    from model.networks import BatchNorm, make_norm

    assert isinstance(make_norm("bn", 4), BatchNorm)
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    bn = half_params(BatchNorm(4))
    bn.load_state_dict(ref.state_dict())  # copied into the half weights and fp32 buffers
    assert bn.weight.dtype == torch.float16 and bn.running_mean.dtype == torch.float32
    x = (torch.randn(4, 4, 8, 8) * 3 + 1).half()
    xh = x.clone().requires_grad_(True)
    y = bn(xh)
    want = ref(x.float())
    assert y.dtype == torch.float16 and torch.allclose(y.float(), want, atol=1e-2)
    # the running statistics are fp32 ones, equal to the fp32 module's
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, ref.running_var, rtol=1e-4)
    assert int(bn.num_batches_tracked) == 1
    y.float().square().sum().backward()
    assert xh.grad.dtype == torch.float16 and bn.weight.grad.dtype == bn.bias.grad.dtype == torch.float16
    assert all(torch.isfinite(t).all() for t in (xh.grad, bn.weight.grad, bn.bias.grad))
    bn.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(bn(x).float(), ref(x.float()), atol=1e-2)


def test_batch_norm_in_fp32_is_stock_batch_norm():
    from model.networks import BatchNorm

    torch.manual_seed(0)
    ref, bn = torch.nn.BatchNorm2d(3), BatchNorm(3)
    assert list(bn.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(bn(x), ref(x)) and torch.equal(bn.running_var, ref.running_var)
    bn.eval(), ref.eval()
    assert torch.equal(bn(x), ref(x))


@pytest.mark.parametrize("norms", [{"norm": "bn"}, {"up_norm": "bn"}, {"norm": "bn", "up_norm": "bn"}])
def test_a_batch_norm_generator_trains_a_step_under_the_fp16_cast(norms):
    # Before: RuntimeError: expected scalar type Half but found Float, in the first forward.
    from model.unit import UNIT, generator_loss, make_config

    torch.manual_seed(0)
    unit = half_params(UNIT(make_config({"preset": "tiny", "image_size": 32, **norms})))
    g = torch.Generator().manual_seed(0)
    x_a, x_b = [(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).half() for _ in range(2)]
    out = unit.gen(x_a, x_b)
    assert out["x_ab"].dtype == torch.float16
    unit.dis.requires_grad_(False)
    loss, _ = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    assert torch.isfinite(loss)
    loss.backward()
    bns = [m for m in unit.gen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for m in bns:
        assert m.running_mean.dtype == torch.float32 and torch.isfinite(m.running_var).all()
        assert int(m.num_batches_tracked) >= 1 and bool((m.running_var != 1).any())
        assert m.weight.grad.dtype == torch.float16 and torch.isfinite(m.weight.grad).all()
    unit.gen.eval()
    with torch.no_grad():
        assert unit.gen.translate(x_a, "a2b").dtype == torch.float16


def test_fp16_with_batch_norm_is_not_refused_by_the_config():
    cfg = load_config(None, ["model.norm=bn", "model.up_norm=bn", "train.precision=fp16"], base=BASE)
    assert deepspeed_config(cfg, None, lr=1e-4, on_gpu=True, bf16_ok=False)["fp16"]["enabled"]
