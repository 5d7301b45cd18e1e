"""Release-side review fixes: a folder translation writes every image in a format that holds it
exactly and survives one it cannot write; tiled translation keeps a palette domain's colours;
--device reaches a registered model; the pyfunc refuses bad input with a ValueError naming it.

Fast: tiny models, no tracking server (the fresh-venv consumer is tests/test_consumer.py)."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.pyfunc import PythonModelContext
from PIL import Image

from launch.release import evaluate, pyfunc_model, translate
from launch.release import export as release_export
from launch.release.export import translate_tiled, translate_uint8
from launch.release.registry import PYFUNC_FILE, shipped_code, stage_code
from launch.release.translate import Limits, main as translate_main, translate_folder
from launch.runstore.artifacts import save_translator
from model.unit import UNIT

PALETTE = [[20, 40, 200], [240, 240, 240], [30, 160, 60]]


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_export(root: Path, **cfg) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny", **cfg})
    return save_translator(root, unit.gen, unit.config(), image_size=32, step=1, ema=False), unit.gen.eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def palette_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("palette"), palette_b=PALETTE)


def write_xpm(path: Path, h: int, w: int) -> np.ndarray:
    """An XPM (PIL reads it, cannot write it) of four colours in stripes; returns its RGB pixels."""
    colours = {"a": (255, 0, 0), "b": (0, 0, 255), "c": (0, 200, 0), "d": (250, 250, 250)}
    rows = ["".join("abcd"[(x // 3 + y // 5) % 4] for x in range(w)) for y in range(h)]
    lines = [f"{w} {h} 4 1", *(f"{k} c #{r:02X}{g:02X}{b:02X}" for k, (r, g, b) in colours.items()), *rows]
    path.write_text("/* XPM */\nstatic char *img[] = {\n" + ",\n".join(f'"{s}"' for s in lines) + "\n};\n")
    return np.array([[colours[c] for c in row] for row in rows], np.uint8)


def write_ico(path: Path, img: np.ndarray) -> np.ndarray:
    """An icon holding `img` as PNG at its full size (PIL reads any size, writes at most 256x256)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    png = buf.getvalue()
    path.write_bytes(struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png)
    return img


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one level (batching may round a pixel the other way)."""
    return a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1


# ---------------------------------------------------------------- 1: output formats

def test_an_image_pil_cannot_write_is_translated_as_png_and_the_folder_goes_on(export, tmp_path, capsys):
    # Before: a.png written, then KeyError 'XPM' from PIL's save: traceback, no summary, no report.
    d, gen = export
    src, out, report = tmp_path / "in", tmp_path / "out", tmp_path / "report.json"
    src.mkdir()
    for name in ("a", "c", "d"):
        Image.fromarray(noise(32, 32, seed=ord(name))).save(src / f"{name}.png")
    xpm = write_xpm(src / "b.xpm", 32, 32)
    rc = translate_main(["--model", str(d), "--direction", "a2b", "--in", str(src), "--out", str(out),
                         "--report", str(report), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.xpm.png", "c.png", "d.png"]
    assert close(np.asarray(Image.open(out / "b.xpm.png")), translate_uint8(gen, xpm[None], "a2b")[0])
    assert json.loads(report.read_text())["translated"] == 4 and "Translated 4 image(s)" in cap.out


def test_gif_and_ico_come_back_at_full_size_and_colour_beside_a_png_of_the_same_name(export, tmp_path):
    # Before: x.gif written as a GIF (256 colours), a 300x300 .ico came back 256x256.
    d, gen = export
    src = tmp_path / "in"
    src.mkdir()
    imgs = {"x.png": noise(40, 40, 1), "x.gif": noise(40, 40, 2)}
    for name, img in imgs.items():
        Image.fromarray(img).save(src / name)
    imgs["x.gif"] = np.asarray(Image.open(src / "x.gif").convert("RGB"))  # what GIF kept of the input
    imgs["y.ico"] = write_ico(src / "y.ico", noise(300, 300, 3))
    res = translate_folder(gen, "a2b", src, tmp_path / "out", progress=False)
    assert res["translated"] == 3 and not res["rejected"]
    outs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outs == ["x.gif.png", "x.png", "y.ico.png"]
    for name, img in imgs.items():
        dst = tmp_path / "out" / (name if name.endswith(".png") else name + ".png")
        assert close(np.asarray(Image.open(dst)), translate_uint8(gen, img[None], "a2b")[0]), name


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff", ".ppm", ".tga"])
def test_kept_formats_hold_a_translation_exactly_at_full_size(tmp_path, suffix):
    img = noise(300, 300, 4)
    assert translate.output_name(Path(f"sub/x{suffix}"), None) == Path(f"sub/x{suffix}")
    translate.save_image(img, tmp_path / f"x{suffix}")
    assert np.array_equal(np.asarray(Image.open(tmp_path / f"x{suffix}").convert("RGB")), img)


@pytest.mark.parametrize("suffix", [".gif", ".ico", ".xpm", ".psd", ".ras", ".cur", ".pcd", ".fli", ".pbm"])
def test_other_formats_become_png_with_the_suffix_appended(tmp_path, suffix):
    img = noise(300, 300, 5)
    dst = tmp_path / translate.output_name(Path(f"x{suffix}"), None)
    assert dst.name == f"x{suffix}.png"
    translate.save_image(img, dst)
    assert Image.open(dst).format == "PNG" and np.array_equal(np.asarray(Image.open(dst)), img)


def test_a_name_two_inputs_would_share_is_skipped_not_overwritten(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(noise(8, 8, 6)).save(src / "x.gif")
    Image.fromarray(noise(8, 8, 7)).save(src / "x.gif.png")  # its output name is x.gif's
    res = translate_folder(lambda x, d: 255 - x, "a2b", src, tmp_path / "out", progress=False)
    assert res["translated"] == 1
    assert [(Path(r["path"]).name, "already written from" in r["reason"]) for r in res["rejected"]] == \
        [("x.gif.png", True)]
    gif = np.asarray(Image.open(src / "x.gif").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.gif.png")), 255 - gif)


def test_any_failure_writing_one_image_is_counted_and_the_folder_goes_on(tmp_path, monkeypatch, capsys):
    # Before: only OSError was caught: a KeyError (or ValueError) from PIL ended the run.
    src, out, report = tmp_path / "in", tmp_path / "out", tmp_path / "report.json"
    src.mkdir()
    for name in "abcd":
        Image.fromarray(noise(8, 8, ord(name))).save(src / f"{name}.png")
    real = translate.save_image

    def save(arr, path):
        if path.name == "b.png":
            raise KeyError("XPM")
        real(arr, path)
    monkeypatch.setattr(translate, "save_image", save)
    monkeypatch.setattr(translate, "load", lambda a: (lambda x, d: 255 - x, None, {}, Limits()))
    rc = translate_main(["--model", "unused", "--direction", "a2b", "--in", str(src), "--out", str(out),
                         "--report", str(report), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 3
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "d.png"]
    (rej,) = json.loads(report.read_text())["rejected"]
    assert Path(rej["path"]).name == "b.png" and "cannot write" in rej["reason"] and "KeyError" in rej["reason"]
    assert "Translated 3 image(s)" in cap.out and "1 image(s) skipped as unusable" in cap.out


# ---------------------------------------------------------------- 2: tiles and palettes

def off_palette(img: np.ndarray) -> int:
    return int((~(img.reshape(-1, 1, 3) == np.asarray(PALETTE, np.uint8)).all(-1).any(-1)).sum())


def test_tiled_translation_of_a_palette_domain_stays_on_the_palette(palette_export):
    # Before: 0 off-palette pixels whole, thousands tiled (the blended overlaps).
    d, gen = palette_export
    meta = json.loads((d / "translator.json").read_text())
    assert release_export.target_palette(meta, "a2b") == PALETTE
    assert release_export.target_palette(meta, "b2a") is None

    def fn(x, direction):
        return translate_uint8(gen, x, direction)
    img = noise(100, 90, 8)
    assert off_palette(fn(img[None], "a2b")[0]) == 0
    blended = translate_tiled(fn, img, "a2b", tile=32, overlap=16)
    assert off_palette(blended) > 0  # what the palette is there to undo
    tiled = translate_tiled(fn, img, "a2b", tile=32, overlap=16, palette=PALETTE)
    assert off_palette(tiled) == 0
    # Pixels only the first tile covers are that tile's translation unchanged.
    assert np.array_equal(tiled[:16, :16], fn(img[None, :32, :32], "a2b")[0][:16, :16])
    # Snapping moves each blended pixel to its nearest colour (of the unrounded blend: within the
    # rounding's reach, sqrt(3)/2 per side, of the nearest to the rounded one), nothing more.
    dist = np.sqrt(((blended[:, :, None].astype(float) - np.asarray(PALETTE)) ** 2).sum(-1))
    chosen = (tiled[:, :, None] == np.asarray(PALETTE, np.uint8)).all(-1).argmax(-1)
    assert (np.take_along_axis(dist, chosen[..., None], -1)[..., 0] <= dist.min(-1) + 3 ** 0.5).all()


def test_folder_translation_in_tiles_keeps_the_palette(palette_export, tmp_path):
    d, _ = palette_export
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(noise(100, 90, 9)).save(src / "big.png")
    rc = translate_main(["--model", str(d), "--direction", "a2b", "--in", str(src), "--out", str(out),
                         "--tile", "32", "--tile-overlap", "16", "--no-progress"])
    assert rc == 0 and off_palette(np.asarray(Image.open(out / "big.png"))) == 0


# ---------------------------------------------------------------- 3: --device for registered models

def context(export_dir: Path, device: str | None) -> PythonModelContext:
    return PythonModelContext(artifacts={pyfunc_model.ARTIFACT_KEY: str(export_dir)},
                              model_config=None if device is None else {"device": device})


def loaded(export_dir: Path, device: str | None) -> pyfunc_model.TranslatorModel:
    m = pyfunc_model.TranslatorModel()
    m.load_context(context(export_dir, device))
    return m


def test_load_context_takes_the_device_asked_for_even_with_a_gpu(export, monkeypatch):
    # Before: "cuda" whenever torch saw a GPU, whatever was asked (here: a CPU build, so it failed).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert next(loaded(export[0], "cpu").gen.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match=r"device 'cuda:3'.*1 CUDA device"):
        loaded(export[0], "cuda:3")
    with pytest.raises(ValueError, match=r"device 'gpu0'"):
        loaded(export[0], "gpu0")


def test_load_context_auto_is_cuda_only_where_there_is_one(export, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert next(loaded(export[0], None).gen.parameters()).device.type == "cpu"
    assert next(loaded(export[0], "auto").gen.parameters()).device.type == "cpu"


def saved_pyfunc(export_dir: Path, dst: Path, model_config: dict | None) -> Path:
    """The pyfunc model as log_translator writes it (code from file, shipped code, artifacts)."""
    files, _ = shipped_code()
    mlflow.pyfunc.save_model(dst, python_model=str(PYFUNC_FILE), artifacts={pyfunc_model.ARTIFACT_KEY: str(export_dir)},
                             code_paths=stage_code(files, dst.parent / "code"), model_config=model_config)
    return dst


def test_the_device_asked_of_load_model_reaches_load_context(export, tmp_path, monkeypatch):
    path = saved_pyfunc(export[0], tmp_path / "model", {"device": "auto"})
    real, asked = mlflow.pyfunc.load_model, []

    def load(uri, **kw):  # the store's lookup stands in: the model is the one saved above
        asked.append(kw)
        return real(str(path), **kw)
    monkeypatch.setattr(mlflow.pyfunc, "load_model", load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, _ = evaluate.load_model("runs:/0123/model", tracking_uri=str(tmp_path), device="cpu")
    assert asked == [{"model_config": {"device": "cpu"}}]
    assert next(model.unwrap_python_model().gen.parameters()).device.type == "cpu"


def test_a_model_logged_without_a_device_setting_is_still_moved_to_the_device_asked(export, tmp_path, monkeypatch):
    # Versions registered before the device setting existed: MLflow drops the model_config it
    # does not declare, so load_model moves the weights (to "meta" here: a device a CPU build has).
    path = saved_pyfunc(export[0], tmp_path / "model", None)
    real = mlflow.pyfunc.load_model
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri, **kw: real(str(path), **kw))
    model, _ = evaluate.load_model("runs:/0123/model", tracking_uri=str(tmp_path), device="meta")
    assert next(model.unwrap_python_model().gen.parameters()).device.type == "meta"


def test_translate_refuses_a_device_this_machine_does_not_have(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert translate.device_for("cpu") == "cpu" and translate.device_for("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match=r"--device 'cuda:2': .*1 CUDA device"):
        translate.device_for("cuda:2")
    with pytest.raises(ValueError, match=r"--device 'gpu': not a device"):
        translate.device_for("gpu")


# ---------------------------------------------------------------- 4: the pyfunc's input checks

@pytest.fixture(scope="module")
def pyfunc(export):
    return loaded(export[0], "cpu")


@pytest.mark.parametrize("shape, message", [
    ((1, 0, 0, 3), r"0x0"), ((2, 1, 1, 3), r"1x1 .*at least 5x5"), ((1, 4, 4, 3), r"4x4 .*at least 5x5"),
    ((1, 32, 32, 4), r"\[N, H, W, 3\]"),
])
def test_predict_refuses_unusable_shapes_with_a_value_error(pyfunc, shape, message):
    with pytest.raises(ValueError, match=message):
        pyfunc.predict(None, np.zeros(shape, np.uint8))


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True])
def test_predict_refuses_a_batch_size_that_is_not_a_positive_integer(pyfunc, batch_size):
    with pytest.raises(ValueError, match=r"params.batch_size: .*positive integer"):
        pyfunc.predict(None, np.zeros((1, 8, 8, 3), np.uint8), params={"batch_size": batch_size})


@pytest.mark.parametrize("bad, message", [(np.nan, "not finite"), (np.inf, "not finite"), (12.5, "not whole"),
                                          (-1.0, "outside 0..255"), (256.0, "outside 0..255")])
def test_predict_names_the_image_with_bad_pixel_values(pyfunc, bad, message):
    x = np.full((3, 8, 8, 3), 7.0)
    x[2, 3, 4, 1] = bad
    with pytest.raises(ValueError, match=rf"image 2: .*{message}"):
        pyfunc.predict(None, x)


def test_predict_takes_whole_numbers_in_any_numeric_type(pyfunc):
    x = noise(8, 8, 10)[None]
    want = pyfunc.predict(None, x)
    for dtype in (np.int64, np.float64, np.float32):
        assert np.array_equal(pyfunc.predict(None, x.astype(dtype)), want), dtype
    with pytest.raises(ValueError, match="dtype"):
        pyfunc.predict(None, x.astype(str))


def test_predict_tiles_large_images_and_refuses_those_above_the_cap(palette_export, monkeypatch):
    m = loaded(palette_export[0], "cpu")
    monkeypatch.setattr(release_export, "TILE", 32)  # the pyfunc reads export's tile size at each call
    monkeypatch.setattr(release_export, "TILE_OVERLAP", 16)
    img = noise(100, 90, 11)
    y = m.predict(None, img[None], params={"direction": "a2b"})
    assert np.array_equal(y[0], translate_tiled(lambda x, d: translate_uint8(m.gen, x, d), img, "a2b", 32, 16,
                                                palette=PALETTE))
    assert off_palette(y[0]) == 0
    monkeypatch.setattr(pyfunc_model, "MAX_PIXELS", 100 * 90 - 1)
    with pytest.raises(ValueError, match=r"100x90 = 9000 pixels .*limit of 8999"):
        m.predict(None, img[None])
