"""The exported translator: safetensors + JSON round trip, integrity check, uint8 helpers."""

import json
import stat

import numpy as np
import pytest
import torch

from launch.release.export import load_translator, translate_uint8
from launch.runstore.artifacts import META_NAME, WEIGHTS_NAME, is_export_dir, save_translator
from pipeline.tensors import to_tensor, to_uint8
from model.unit import UNIT


MAP_PALETTE = [[242, 239, 233], [160, 146, 136], [150, 196, 236], [255, 255, 255]]
# the plain tanh head, the skip head, and a skip head painting a palette (PaletteHead)
GENERATORS = {"plain": {"skip": "none"}, "skip": {"skip": "image"},
              "palette": {"skip": "image", "palette_b": MAP_PALETTE}}


def tiny(seed: int, skip: str = "none", **more) -> UNIT:
    torch.manual_seed(seed)
    return UNIT.from_config({"preset": "tiny", "skip": skip, **more})


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_round_trip_same_translations(tmp_path, kind):
    unit = tiny(0, **GENERATORS[kind])
    out = save_translator(tmp_path / "export", unit.gen, unit.config(), image_size=32, step=7, ema=True,
                          domains={"a": "aerial", "b": "map"})
    assert is_export_dir(out)
    assert sorted(p.name for p in out.iterdir()) == [META_NAME, WEIGHTS_NAME]  # no temp files left
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    gen, meta = load_translator(out)
    assert not gen.training
    assert meta["model"] == unit.config() and meta["step"] == 7 and meta["ema"] is True
    assert meta["image_size"] == 32 and meta["domains"] == {"a": "aerial", "b": "map"}
    unit.gen.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for d in ("a2b", "b2a"):
        # float32 tolerance: equal weights, but kernels may take other paths on other buffers
        torch.testing.assert_close(gen.translate(x, d), unit.gen.translate(x, d), rtol=1e-4, atol=1e-4)
    # Every tensor came from the file: another init translates differently.
    other = tiny(1, **GENERATORS[kind]).gen.eval()
    assert not torch.allclose(other.translate(x, "a2b"), gen.translate(x, "a2b"))
    if kind == "palette":  # a2b paints the palette's colours exactly; b2a (no palette) does not
        def colours(d):
            return {tuple(c) for c in to_uint8(gen.translate(x, d)).reshape(-1, 3).tolist()}
        assert colours("a2b") <= {tuple(c) for c in MAP_PALETTE} and len(colours("b2a")) > 8


def test_mismatched_weights_are_refused(tmp_path):
    a, b = tiny(0), tiny(1)
    save_translator(tmp_path / "x", a.gen, a.config(), 32, 1, False)
    save_translator(tmp_path / "y", b.gen, b.config(), 32, 1, False)
    # A crash between the two renames would pair new weights with the old JSON.
    (tmp_path / "x" / WEIGHTS_NAME).write_bytes((tmp_path / "y" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        load_translator(tmp_path / "x")


def test_bad_export_dirs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=META_NAME):
        load_translator(tmp_path)
    (tmp_path / META_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_translator(tmp_path)
    (tmp_path / META_NAME).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format"):
        load_translator(tmp_path)


def test_uint8_tensor_conversions():
    vals = np.arange(256, dtype=np.uint8)
    img = np.stack([vals, vals[::-1], vals], -1).reshape(16, 16, 3)
    x = to_tensor(img)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert np.array_equal(to_uint8(x)[0], img)          # exact round trip for every value
    assert np.array_equal(to_uint8(x[0]), img)          # CHW -> HWC
    clipped = to_uint8(torch.tensor([-3.0, 3.0, 0.0]).view(1, 3, 1, 1))
    assert clipped.tolist() == [[[[0, 255, 128]]]]      # clamped; 127.5 rounds half to even -> 128
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(img.astype(np.float32))
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(np.zeros((4, 4, 4), np.uint8))


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_translate_uint8_pads_odd_sizes(kind):
    gen = tiny(0, **GENERATORS[kind]).gen.eval()
    rng = np.random.default_rng(0)
    aligned = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = translate_uint8(gen, aligned, "a2b", batch_size=2)
    with torch.no_grad():
        ref = to_uint8(gen.translate(to_tensor(aligned), "a2b"))
    # Batching changes nothing beyond float rounding (kernels differ with the batch size).
    assert int(np.abs(out.astype(np.int16) - ref).max()) <= 1 and (out != ref).mean() < 0.01
    odd = rng.integers(0, 256, (1, 30, 33, 3), dtype=np.uint8)
    assert translate_uint8(gen, odd, "b2a").shape == odd.shape
    with pytest.raises(ValueError, match="direction"):
        translate_uint8(gen, aligned, "a2c")
