"""ONNX export (launch/release/onnx_export.py): both directions match the PyTorch translator in
onnxruntime at the export size and at other sizes (batch 2); the CLI writes the graphs and
onnx.json; a bad export dir or missing packages exit 2 with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="pip install -e '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="pip install -e '.[onnx]'")

from launch.release.export import load_translator, main  # noqa: E402
from launch.release.onnx_export import JSON_NAME, ONNXExportError, export_onnx, onnx_file  # noqa: E402
from launch.runstore.artifacts import META_NAME, save_translator  # noqa: E402
from model.unit import UNIT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4  # outputs are in [-1, 1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"})
    return save_translator(tmp_path_factory.mktemp("export"), unit.gen, unit.config(), image_size=32,
                           step=3, ema=True, domains={"a": "maps", "b": "photos"})


@pytest.fixture(scope="module")
def cli_run(export_dir, tmp_path_factory):
    """`python -m launch.release.export --onnx OUT --model EXPORT_DIR`, run once for the module."""
    out = tmp_path_factory.mktemp("onnx") / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "launch.release.export", "--onnx", str(out), "--model",
                           str(export_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return out, proc


def test_cli_writes_both_graphs_and_onnx_json(cli_run):
    out, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [JSON_NAME, "translator-a2b.onnx", "translator-b2a.onnx"]
    info = json.loads((out / JSON_NAME).read_text())
    assert info["opset"] == 17 and info["exporter"] == "torchscript"
    assert info["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}]
    assert info["outputs"] == [{"name": "translated", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}]
    assert info["checked_shapes"] == [[2, 3, 32, 32], [2, 3, 36, 16]]
    assert info["size_multiple"] == 4 and info["min_side"] == 8 and info["export_size"] == 32
    assert set(info["versions"]) == {"torch", "onnx", "onnxruntime"}
    for d in ("a2b", "b2a"):
        assert 0 <= info["max_abs_diff"][d] <= TOL
        assert f"{d}.onnx: max abs diff to PyTorch {info['max_abs_diff'][d]:.2e}" in proc.stdout


@pytest.mark.parametrize("direction", ["a2b", "b2a"])
def test_onnxruntime_matches_pytorch_at_two_sizes(cli_run, export_dir, direction):
    out, _ = cli_run
    gen, _ = load_translator(export_dir)
    model = onnx.load(str(out / onnx_file(direction)))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["direction"] == direction and props["value_range"] == "[-1, 1]"
    assert props["target_domain"] == {"a2b": "photos", "b2a": "maps"}[direction]
    sess = ort.InferenceSession(str(out / onnx_file(direction)), providers=["CPUExecutionProvider"])
    rng = torch.Generator().manual_seed(1)
    for shape in [(2, 3, 32, 32), (2, 3, 24, 48)]:  # the export size, and another (not square)
        x = torch.rand(*shape, generator=rng) * 2 - 1
        with torch.no_grad():
            want = gen.translate(x, direction).numpy()
        got = sess.run(["translated"], {"image": x.numpy()})[0]
        assert got.shape == want.shape == shape
        assert np.abs(got - want).max() <= TOL, shape


def test_function_returns_what_it_writes_and_refuses_a_drifting_graph(export_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / JSON_NAME).write_text("{}")  # a stale report must not survive a failed check
    with pytest.raises(ONNXExportError, match="a2b: ONNX differs from PyTorch by .*, more than 1e-12"):
        export_onnx(export_dir, out, tolerance=1e-12)
    assert not (out / JSON_NAME).exists() and (out / "translator-a2b.onnx").is_file()  # kept to inspect
    assert not (out / "translator-b2a.onnx").exists()  # stopped at the first direction
    info = export_onnx(export_dir, out, size=16, opset=18)
    assert info == json.loads((out / JSON_NAME).read_text())
    assert info["opset"] == 18 and info["checked_shapes"] == [[2, 3, 16, 16], [2, 3, 20, 8]]
    assert max(info["max_abs_diff"].values()) <= TOL
    assert onnx.load(str(out / "translator-b2a.onnx")).opset_import[0].version == 18


@pytest.mark.parametrize("palette, tta", [([], "none"), ([[242, 239, 233], [160, 146, 136], [150, 196, 236]], "none"),
                                          ([[242, 239, 233], [160, 146, 136], [150, 196, 236]], "flips")])
def test_a_skip_image_model_exports_and_matches(tmp_path, palette, tta):
    """skip="image" generators take the source image twice (encoder and last stage): one graph input.
    With a palette the graph picks each pixel's colour (argmax, gather) as the PyTorch model does;
    with tta the graph holds the flipped views and their average too."""
    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny", "skip": "image", "palette_b": palette, "tta": tta})
    export = save_translator(tmp_path / "export", unit.gen, unit.config(), image_size=32, step=1, ema=False,
                             domains={"a": "maps", "b": "photos"})
    info = export_onnx(export, tmp_path / "onnx", size=16)
    assert max(info["max_abs_diff"].values()) <= TOL
    sess = ort.InferenceSession(str(tmp_path / "onnx" / onnx_file("a2b")), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_export_dirs_exit_2_with_one_line(export_dir, tmp_path, capsys):
    assert main(["--onnx", str(tmp_path / "o"), "--model", str(tmp_path / "missing")]) == 2
    assert META_NAME in _one_error_line(capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / META_NAME).write_text("{not json")
    assert main(["--onnx", str(tmp_path / "o"), "--model", str(bad)]) == 2
    assert "not valid JSON" in _one_error_line(capsys)
    assert main(["--onnx", str(tmp_path / "o"), "--model", str(export_dir), "--size", "30"]) == 2
    assert "multiple of 2**n_down = 4" in _one_error_line(capsys)
    # opset 12 has Einsum but the TorchScript exporter lowers the reflect border's repeat_interleave
    # only from 13: refused before exporting, not a failed export
    assert main(["--onnx", str(tmp_path / "o"), "--model", str(export_dir), "--opset", "12"]) == 2
    assert "opset >= 13" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_missing_onnx_packages_exit_2_naming_the_extra(export_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert main(["--onnx", str(tmp_path / "o"), "--model", str(export_dir)]) == 2
    line = _one_error_line(capsys)
    assert "onnxruntime" in line and "[onnx]" in line


def test_unsupported_opset_is_one_line_not_a_graph_dump(export_dir, tmp_path, capfd):
    # an opset no installed package knows is a bad argument (exit 2), refused before any export
    assert main(["--onnx", str(tmp_path / "o"), "--model", str(export_dir), "--opset", "99"]) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1
    assert lines[0].startswith("error: --opset 99: newer than the installed onnx") and "choose a lower one" in lines[0]
    assert not (tmp_path / "o" / "translator-a2b.onnx").exists()
