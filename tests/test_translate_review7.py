"""Review 7 of the release side: long output names, PIL's global bomb limit, --out that is a file
or a URL, --report checked before the run, and `export --onnx` refusing bad arguments in one line."""
from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.release.translate import Limits, check_report, translate_folder
from launch.release.translate import main as translate_main
from launch.runstore.artifacts import save_translator
from model.unit import UNIT
from pipeline import atomic
from pipeline.imageio import ImageRejected, image_files, is_image_file, pil_limit_off, read_rgb


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny-preset export (launch.release.export's EXPORT_DIR)."""
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"})
    return save_translator(tmp_path_factory.mktemp("export"), unit.gen, unit.config(), image_size=32,
                           step=1, ema=False)


def identity(x: np.ndarray, direction: str) -> np.ndarray:
    return x


def save_png(path: Path, h: int = 24, w: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)).save(path, format="PNG")
    return path


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def folder_args(export: Path, src: Path, out, *extra) -> list[str]:
    return ["--model", str(export), "--direction", "a2b", "--in", str(src), "--out", str(out), "--no-progress",
            *map(str, extra)]


# ---------------------------------------------------------------- 1: names of 242-255 bytes


def test_a_255_byte_name_is_written_and_leaves_no_temporary(tmp_path):
    name = "写" * 83 + ".png"  # 253 bytes: its temporary with the whole name would be 267
    assert len(os.fsencode(name)) == 253
    atomic.write_bytes(tmp_path / name, b"data")
    assert (tmp_path / name).read_bytes() == b"data"
    assert os.listdir(tmp_path) == [name]


def test_temporaries_of_long_names_fit_and_are_still_recognised(tmp_path):
    name = "写" * 83 + ".png"
    with atomic.replacing(tmp_path / name) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255
        assert atomic.TEMP_NAME.match(tmp.name)  # what cleanup code recognises as a killed write's
    prefix = atomic.temp_prefix(name)
    assert prefix.startswith(".写") and len(os.fsencode(prefix[1:-1])) <= atomic.TEMP_STEM_BYTES
    prefix.encode("utf-8")  # cut at a character: no half of a 3-byte character (a lone surrogate)
    assert atomic.temp_prefix("shard-a-000001.tar") == ".shard-a-000001.tar."  # short names whole (remove_temps)


def test_a_folder_with_80_character_cjk_names_is_translated(tmp_path):
    src = tmp_path / "in"
    names = ["写" * 80 + ".png", "a" * 240 + ".png", "short.png"]
    for i, n in enumerate(names):
        save_png(src / n, seed=i)
    res = translate_folder(identity, "a2b", src, tmp_path / "out", progress=False)
    assert res["translated"] == 3 and res["rejected"] == []
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)


# ---------------------------------------------------------------- 2: PIL's global bomb limit


def bilevel_png(path: Path, w: int, h: int) -> Path:
    """A 1-bit white PNG of w x h written by hand: a few MB for hundreds of millions of pixels."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    raw = (b"\x00" + b"\xff" * ((w + 7) // 8)) * h
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))
    return path


def test_an_image_above_pils_hard_limit_meets_our_cap_not_pils(tmp_path):
    pano = bilevel_png(tmp_path / "pano.png", 13400, 13400)  # 179.6 M pixels > 2 x PIL's 89.5 M
    saved = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert is_image_file(pano)
        with pytest.raises(ImageRejected, match="179560000 pixels is above the limit of 100000000"):
            read_rgb(pano, max_pixels=100_000_000)
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's limit is back for everyone else


@pytest.fixture
def small_pil_limit(monkeypatch):
    """PIL's limit lowered to 500 pixels: a 40 x 40 image (1600) is then above its hard limit (2 x)
    and a 30 x 20 one (600) between its warning and its error, as 180 M+ and 90-179 M pixel images are."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])  # TIFF checks PIL's limit again when it decodes
def test_no_cap_means_no_cap(tmp_path, small_pil_limit, fmt):
    path = tmp_path / "in" / f"x.{fmt.lower()}"
    path.parent.mkdir()
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(path, format=fmt)
    assert read_rgb(path, max_pixels=None).shape == (40, 40, 3)
    assert Image.MAX_IMAGE_PIXELS == 500
    res = translate_folder(identity, "a2b", tmp_path / "in", tmp_path / "out", progress=False,
                           limits=Limits(max_pixels=None))
    assert res["translated"] == 1 and res["rejected"] == []


def test_shard_images_have_no_pil_limit_either(small_pil_limit):
    from launch.release.corpus import decode_rgb

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(buf, format="PNG")
    assert decode_rgb(buf.getvalue(), "k.png", Limits(max_pixels=None)).shape == (40, 40, 3)
    with pytest.raises(ImageRejected, match="above the limit of 1500"):
        decode_rgb(buf.getvalue(), "k.png", Limits(max_pixels=1500))
    assert Image.MAX_IMAGE_PIXELS == 500


def test_finding_images_prints_no_bomb_warning(tmp_path, small_pil_limit):
    save_png(tmp_path / "mid.png", h=20, w=30)  # 600 pixels: PIL would warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert image_files(tmp_path) == [tmp_path / "mid.png"]
        assert read_rgb(tmp_path / "mid.png", max_pixels=None).shape == (20, 30, 3)
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


def test_nested_blocks_restore_pils_limit_only_at_the_end(small_pil_limit):
    with pil_limit_off():
        with pil_limit_off():
            assert Image.MAX_IMAGE_PIXELS is None
        assert Image.MAX_IMAGE_PIXELS is None  # the outer block still reads with no PIL limit
    assert Image.MAX_IMAGE_PIXELS == 500


# ---------------------------------------------------------------- 3, 4: --out a file, --out a URL


def test_an_out_that_is_a_file_is_refused_before_translating(export, tmp_path, capsys):
    save_png(tmp_path / "in" / "x.png")
    (tmp_path / "afile").write_bytes(b"keep")
    assert translate_main(folder_args(export, tmp_path / "in", tmp_path / "afile")) == 2
    assert "--out" in (line := one_line_error(capsys.readouterr().err)) and "not a folder" in line
    assert (tmp_path / "afile").read_bytes() == b"keep"


def test_a_url_out_in_folder_mode_is_refused_and_nothing_is_made(export, tmp_path, capsys, monkeypatch):
    save_png(tmp_path / "in" / "x.png")
    monkeypatch.chdir(tmp_path)
    assert translate_main(folder_args(export, "in", "s3://bucket/maps")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "s3://bucket/maps" in line and "not a URL" in line
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no local ./s3:/bucket/maps
    with pytest.raises(ValueError, match="not a URL"):
        translate_folder(identity, "a2b", "in", "s3://bucket/maps", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in"]


# ---------------------------------------------------------------- 5: --report


@pytest.mark.parametrize("where, says", [
    ("in/gray.png", "inside --in"),        # would overwrite an input image with JSON
    ("in/new.json", "inside --in"),        # the next run would read it among the inputs
    ("in", "is a folder"),
    ("out/x.png", "image suffix"),         # an output image's name
    ("out", "--out"),                      # a file there: --out could not be made
])
def test_a_bad_report_path_is_refused_before_anything_is_written(export, tmp_path, capsys, monkeypatch,
                                                                 where, says):
    gray = save_png(tmp_path / "in" / "gray.png")
    before = gray.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert translate_main(folder_args(export, "in", "out", "--report", where)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"--report {where}" in line and says in line
    assert gray.read_bytes() == before and not (tmp_path / "out").exists()
    assert os.listdir(tmp_path / "in") == ["gray.png"]


def test_a_report_inside_out_as_json_is_written(export, tmp_path, capsys):
    save_png(tmp_path / "in" / "gray.png")
    assert translate_main(folder_args(export, tmp_path / "in", tmp_path / "out", "--report",
                                      tmp_path / "out" / "report.json")) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["translated"] == 1 and report["rejected"] == []
    assert sorted(os.listdir(tmp_path / "out")) == ["gray.png", "report.json"]


def test_a_report_that_cannot_be_written_is_one_line_after_the_images(export, tmp_path, capsys):
    save_png(tmp_path / "in" / "gray.png")
    (tmp_path / "afile").write_bytes(b"")
    rc = translate_main(folder_args(export, tmp_path / "in", tmp_path / "out", "--report",
                                    tmp_path / "afile" / "r.json"))
    captured = capsys.readouterr()
    assert rc == 1
    line = one_line_error(captured.err)
    assert "cannot write" in line and "afile" in line and "Traceback" not in captured.err
    assert captured.out.startswith("Translated 1 image(s)")
    assert os.listdir(tmp_path / "out") == ["gray.png"]


def test_check_report_accepts_a_file_outside_both_folders(tmp_path):
    (tmp_path / "in").mkdir()
    check_report(tmp_path / "reports" / "r.json", tmp_path / "in", tmp_path / "out")  # no error
    check_report(None, tmp_path / "in", tmp_path / "out")
    with pytest.raises(ValueError, match="not a URL"):
        check_report("s3://bucket/r.json", tmp_path / "in", tmp_path / "out")


# ---------------------------------------------------------------- 6: export --onnx


@pytest.fixture
def export_main():
    pytest.importorskip("onnx", reason="pip install -e '.[onnx]'")
    pytest.importorskip("onnxruntime", reason="pip install -e '.[onnx]'")
    from launch.release.export import main
    return main


@pytest.mark.parametrize("extra, says", [
    (["--size", "0"], "--size 0: must be a positive"),
    (["--size", "-4"], "--size -4: must be a positive"),
    (["--opset", "99"], "--opset 99: newer than the installed onnx"),
])
def test_export_bad_size_or_opset_is_one_line_exit_2(export, export_main, tmp_path, capfd, extra, says):
    assert export_main(["--onnx", str(tmp_path / "o"), "--model", str(export), *extra]) == 2
    captured = capfd.readouterr()
    assert says in one_line_error(captured.err) and captured.out == ""
    assert not (tmp_path / "o").exists()


def test_export_into_a_file_is_one_line_exit_2(export, export_main, tmp_path, capfd):
    (tmp_path / "afile").write_bytes(b"keep")
    assert export_main(["--onnx", str(tmp_path / "afile"), "--model", str(export)]) == 2
    assert "--onnx" in (line := one_line_error(capfd.readouterr().err)) and "not a folder" in line
    assert (tmp_path / "afile").read_bytes() == b"keep"


def test_export_to_an_unwritable_place_is_one_line_exit_2(export, export_main, tmp_path, capfd):
    (tmp_path / "afile").write_bytes(b"")
    assert export_main(["--onnx", str(tmp_path / "afile" / "sub"), "--model", str(export)]) == 2
    assert "afile" in one_line_error(capfd.readouterr().err)


def test_an_opset_torch_cannot_export_is_exit_2(export, export_main, tmp_path, capfd, monkeypatch):
    # torch.onnx publishes no newest opset: the export's own refusal is what tells (torch 2.13
    # refuses 24 and up, below the 28 that onnx 1.23 knows); simulated so any torch gives it
    def refuse(*args, opset_version=None, **kwargs):
        raise RuntimeError(f"Unsupported onnx_opset_version: {opset_version}\nTorch IR graph at exception: ...")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert export_main(["--onnx", str(tmp_path / "o"), "--model", str(export), "--opset", "18"]) == 2
    line = one_line_error(capfd.readouterr().err)
    assert "--opset 18" in line and "cannot export" in line and "Unsupported onnx_opset_version: 18" in line
