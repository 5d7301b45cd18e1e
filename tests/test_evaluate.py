"""Pixel accuracy at the threshold boundary, MAE, test folder pairing, the evaluate CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.release.evaluate import (EvalOptions, evaluate_export, evaluate_translator, load_pairs, mae,
                                     main as evaluate_main, pixel_accuracy, pixel_correct)
from launch.release.export import translate_uint8
from launch.runstore.artifacts import save_translator
from model.unit import UNIT

ROOT = Path(__file__).resolve().parents[1]


def test_pixel_accuracy_exact_counts_at_the_boundary():
    truth = np.full((1, 2, 5, 3), 100, np.uint8)        # 10 pixels
    pred = truth.copy()
    pred[0, 0, 0] = [116, 100, 100]   # +16 in one channel: correct (|diff| <= 16)
    pred[0, 0, 1] = [84, 84, 84]      # -16 in all channels: correct
    pred[0, 0, 2] = [117, 100, 100]   # +17: wrong
    pred[0, 0, 3] = [100, 100, 83]    # -17 in the last channel only: wrong
    pred[0, 0, 4] = [116, 84, 117]    # two channels at the boundary, one past it: wrong
    pred[0, 1, 0] = [255, 100, 100]   # far: wrong
    # pixels (1,1)..(1,4) untouched: correct
    assert pixel_correct(pred, truth).sum() == 6
    assert pixel_accuracy(pred, truth) == 6 / 10
    assert pixel_accuracy(pred, truth, threshold=17) == 9 / 10   # all but the far one
    assert pixel_accuracy(pred, truth, threshold=0) == 4 / 10


def test_pixel_accuracy_does_not_wrap_uint8():
    truth = np.array([[[250, 0, 0]]], np.uint8)
    pred = np.array([[[0, 0, 0]]], np.uint8)    # uint8 subtraction would give 6, i.e. "correct"
    assert pixel_accuracy(pred, truth) == 0.0
    assert pixel_accuracy(truth, pred) == 0.0


def test_mae_and_shape_errors():
    a = np.zeros((1, 1, 2, 3), np.uint8)
    b = np.array([[[[0, 3, 6], [255, 0, 0]]]], np.uint8)
    assert mae(a, b) == pytest.approx((3 + 6 + 255) / 6)
    with pytest.raises(ValueError, match="differs"):
        pixel_accuracy(a, b[:, :, :1])


def write(dir_: Path, name: str, arr: np.ndarray) -> None:
    dir_.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(dir_ / name)


def test_pairs_by_stem(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        write(tmp_path / "x", f"s{i}.png", im)
        write(tmp_path / "y", f"s{i}.bmp", 255 - im)
    write(tmp_path / "x", "only-here.png", imgs[0])
    (tmp_path / "y" / "notes.txt").write_text("not an image")
    rejected = []
    stems, x, y = load_pairs(tmp_path / "x", tmp_path / "y", rejected=rejected)
    assert stems == ["s0", "s1", "s2"]
    assert rejected == [f"{tmp_path / 'x' / 'only-here.png'}: no partner: no image with the stem 'only-here' "
                        f"in {tmp_path / 'y'}"]  # named, not silently dropped
    with pytest.raises(ValueError, match="only-here.png: no partner"):
        load_pairs(tmp_path / "x", tmp_path / "y")
    assert np.array_equal(x, imgs) and np.array_equal(y, 255 - imgs)
    write(tmp_path / "z", "other.png", imgs[0])
    with pytest.raises(ValueError, match="no file stems in common"):
        load_pairs(tmp_path / "x", tmp_path / "z")


def test_evaluate_translator_perfect_and_identity(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        write(tmp_path / "testA", f"{i}.png", im)
        write(tmp_path / "testB", f"{i}.png", 255 - im)
    invert = lambda x, direction: 255 - x  # noqa: E731  the true mapping in both directions
    res = evaluate_translator(invert, tmp_path / "testA", tmp_path / "testB", tmp_path / "testB", tmp_path / "testA")
    for d in ("a2b", "b2a"):
        assert res[d]["pixel_acc"] == 1.0 and res[d]["mae"] == 0.0 and res[d]["n"] == 4
        ident = pixel_accuracy(imgs, 255 - imgs)
        assert res[d]["identity_pixel_acc"] == ident < 1.0
    same = evaluate_translator(lambda x, d: x, test_a=tmp_path / "testA", truth_b=tmp_path / "testB")
    assert list(same) == ["a2b"] and same["a2b"]["pixel_acc"] == same["a2b"]["identity_pixel_acc"]


@pytest.fixture
def exported(tmp_path):
    """A tiny exported translator and a paired test split whose b truth is its own a2b output."""
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"})
    export = save_translator(tmp_path / "export", unit.gen, unit.config(), 32, 3, False)
    rng = np.random.default_rng(2)
    xa = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    yb = translate_uint8(unit.gen.eval(), xa, "a2b")
    for i in range(3):
        write(tmp_path / "testA", f"{i}.png", xa[i])
        write(tmp_path / "testB", f"{i}.png", yb[i])
    return tmp_path, export


def test_evaluate_cli_on_an_export(exported):
    root, export = exported
    args = ["--model", str(export), "--test-a", str(root / "testA"), "--truth-b", str(root / "testB"),
            "--test-b", str(root / "testB"), "--truth-a", str(root / "testA")]
    proc = subprocess.run([sys.executable, "-m", "launch.release.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # rows: direction, translator (the strongest baseline marked " *"), n, pixel acc, MAE
    rows = {(ln.split()[0], ln.split()[1]): [c for c in ln.split()[2:] if c != "*"]
            for ln in proc.stdout.splitlines() if ln.startswith(("a2b", "b2a"))}
    res = evaluate_export(export, root / "testA", root / "testB", root / "testB", root / "testA")
    assert res["a2b"]["pixel_acc"] == 1.0   # the truth is this model's own output
    # no baselines.json with the export: identity is the only baseline, and the output says so
    assert "baselines: identity only" in proc.stdout
    assert set(rows) == {(d, t) for d in ("a2b", "b2a") for t in ("model", "identity")}
    for d in ("a2b", "b2a"):
        for t, prefix in (("model", ""), ("identity", "identity_")):
            n, acc, err = rows[d, t]
            assert int(n) == 3
            assert float(acc) == pytest.approx(res[d][prefix + "pixel_acc"], abs=1e-4)
            assert float(err) == pytest.approx(res[d][prefix + "mae"], abs=0.01)
    assert "model beats the strongest baseline (identity)" in proc.stdout
    # 3 test images are too few for the two-sample test: said, not crashed on
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("direction"))
    assert "C2ST skipped: 3 test image(s)" in proc.stdout and "C2ST" not in header and "MAE" in header


def test_an_export_with_three_downsampling_steps_is_evaluated_at_sides_that_are_not_multiples_of_8(tmp_path):
    """Sides are padded to the export's own multiple (2 ** n_down = 8 here), not to 4: 36 px test
    images come back 36 px, through the CLI and evaluate_export (what the end of training and the
    registry's champion re-measure call)."""
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny", "n_down": 3})
    assert unit.gen.input_multiple == unit.input_multiple == 8
    export = save_translator(tmp_path / "export", unit.gen, unit.config(), image_size=32, step=1, ema=False)
    xa = np.random.default_rng(4).integers(0, 256, (3, 36, 36, 3), dtype=np.uint8)
    yb = translate_uint8(unit.gen.eval(), xa, "a2b")
    assert yb.shape == xa.shape
    for i in range(3):
        write(tmp_path / "testA", f"{i}.png", xa[i])
        write(tmp_path / "testB", f"{i}.png", yb[i])
    res = evaluate_export(export, tmp_path / "testA", tmp_path / "testB", opts=EvalOptions(c2st_steps=0))
    assert res["a2b"]["pixel_acc"] == 1.0
    assert evaluate_main(["--model", str(export), "--test-a", str(tmp_path / "testA"),
                          "--truth-b", str(tmp_path / "testB"), "--c2st-steps", "0", "--no-log"]) == 0


def test_evaluate_cli_bad_input(exported, capsys):
    root, export = exported
    assert evaluate_main(["--model", str(root / "nope"), "--test-a", str(root / "testA"),
                          "--truth-b", str(root / "testB")]) == 2
    assert "not an export directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--model", str(export), "--test-a", str(root / "testA")])  # no --truth-b
