"""ONNX export of an exported translator: one graph per direction, checked with onnxruntime.

    python -m launch.release.export --onnx OUT_DIR --model EXPORT_DIR [--size N] [--opset K]
    export_onnx(export_dir, out_dir, size=None, opset=None) -> dict     # the onnx.json written

    OUT_DIR/translator-a2b.onnx, OUT_DIR/translator-b2a.onnx
        input  "image":      float32 [batch, C, height, width], NCHW, values in [-1, 1]
                             (uint8 RGB x -> x / 127.5 - 1, pipeline.imageio.to_tensor's scale)
        output "translated": float32 [batch, C, height, width], values in [-1, 1]
        batch, height and width are dynamic. Height and width must be multiples of 2**n_down
        (onnx.json "size_multiple"; any other side comes out rounded down to a multiple and
        shifted, so pad first, as launch.release.export.translate_uint8 does) and at least
        onnx.json "min_side" (reflection padding and instance norm need a few pixels).
    OUT_DIR/onnx.json   opset, input/output names and shapes, the shapes checked, max_abs_diff
                        per direction, torch/onnx/onnxruntime versions. Written last, and only
                        when every direction is within `tolerance` of the PyTorch translator.

Each graph is checked against `gen.translate(x, direction)` in eval mode, on CPU, at batch 2
at the export size and at a second, non-square size (so dynamic height/width is exercised).

Exporter: the TorchScript-based one (`torch.onnx.export(..., dynamo=False)`). With torch 2.13
both exporters give the same graph numerically, but the dynamo exporter took 12-30 s per
direction for the tiny preset here (the TorchScript one about 1 s), and two exports of the
same direction in one process gave different bytes; the TorchScript one writes the same bytes
each time.
torch marks it deprecated; `exporter="dynamo"` (CLI `--exporter dynamo`) is the way over
when it goes, checked the same way.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from launch.release.export import DIRECTIONS, load_translator, min_input_side, size_multiple
from pipeline.atomic import write_bytes, write_json
from pipeline.hashing import sha256_bytes

FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "image", "translated"
DYNAMIC = {0: "batch", 2: "height", 3: "width"}
DEFAULT_OPSET = 17
# the fused upsampling's kernel is an einsum of the weights (ONNX Einsum: opset 12), and its reflect
# border a repeat_interleave of dynamic size, which the TorchScript exporter lowers from opset 13
MIN_OPSET = 13
# Max abs difference allowed against PyTorch (outputs in [-1, 1]). Measured: ~5e-6 for the tiny
# preset, 4.3e-5 for the paper preset at 256; a wrong graph is off by 1e-2 or more.
TOLERANCE = 1e-3
# The TorchScript exporter's error for an opset above the newest it knows (torch 2.13: 24 and up).
# torch publishes no bound (only the private torch.onnx._constants), so the export tells.
UNSUPPORTED_OPSET = "Unsupported onnx_opset_version"
JSON_NAME = "onnx.json"
EXPORTERS = ("torchscript", "dynamo")
MISSING = ("ONNX export needs the onnx and onnxruntime packages ({}): pip install 'unit-translate[onnx]' "
           "(in a checkout: pip install -e '.[onnx]')")
MISSING_ONNXSCRIPT = "--exporter dynamo needs onnxscript ({}): pip install onnxscript"


class ONNXExportError(RuntimeError):
    """torch.onnx.export failed, or a graph differs from the PyTorch translator beyond the tolerance."""


def onnx_file(direction: str) -> str:
    return f"translator-{direction}.onnx"


def require_onnx(exporter: str = "torchscript"):
    """(onnx, onnxruntime) modules, or ImportError naming the extra to install."""
    names = ("onnx", "onnxruntime") + (("onnxscript",) if exporter == "dynamo" else ())
    mods = []
    for name in names:
        try:
            mods.append(importlib.import_module(name))
        except ImportError as e:
            raise ImportError((MISSING_ONNXSCRIPT if name == "onnxscript" else MISSING).format(e)) from None
    return mods[0], mods[1]


class DirectionModule(torch.nn.Module):
    """One direction of the generator as a module of one input: what gets exported."""

    def __init__(self, gen: torch.nn.Module, direction: str):
        super().__init__()
        self.gen, self.direction = gen, direction

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.gen.translate(image, self.direction)


def check_shapes(meta: dict, size: int | None) -> tuple[int, int, list[tuple[int, int]]]:
    """(export size, smallest valid side, the (height, width) pairs to check) for this model."""
    m = size_multiple(meta)
    min_side = -(-min_input_side(meta) // m) * m
    if size is not None and size <= 0:  # 0 is a wrong size, not "the export's" (None)
        raise ValueError(f"--size {size}: must be a positive multiple of 2**n_down = {m}")
    size = int(size or meta.get("image_size") or meta["model"].get("image_size") or 0)
    if size <= 0:
        raise ValueError("no image size recorded in the export: pass --size N")
    if size % m or size < min_side:
        raise ValueError(f"--size {size}: must be a multiple of 2**n_down = {m} and at least {min_side}")
    other = (size + m, max(min_side, size // 2 // m * m))  # taller and narrower: not square
    return size, min_side, [(size, size), other]


@contextlib.contextmanager
def _quiet_exporter(log: Path):
    """Send file descriptor 1 to `log` and hold torch.onnx's logger at errors: the exporters print
    progress and notes there (the TorchScript one dumps its whole IR graph from C++ when it
    fails); the CLI's output should be its own lines."""
    sys.stdout.flush()
    saved, logger = os.dup(1), logging.getLogger("torch.onnx")
    level = logger.level
    with open(log, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            logger.setLevel(level)


def _export_bytes(module: torch.nn.Module, example: torch.Tensor, opset: int, exporter: str) -> bytes:
    """The ONNX model of `module` (input "image", output "translated", dynamic batch/height/width)."""
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        # The tracer's notes (shape-dependent Python branches, deprecation) are expected; the
        # parity check at two sizes is what guards the graph.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        try:
            with _quiet_exporter(Path(tmp) / "exporter.log"):
                if exporter == "torchscript":
                    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                                      dynamic_axes={INPUT_NAME: DYNAMIC, OUTPUT_NAME: DYNAMIC}, **names)
                else:
                    dims = {i: torch.export.Dim(name) for i, name in DYNAMIC.items()}
                    torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                                      external_data=False, dynamic_shapes={INPUT_NAME: dims}, **names)
        except Exception as e:  # the exporters raise assorted types; one line names what failed
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if UNSUPPORTED_OPSET in first:  # torch.onnx's own bound, which it does not publish
                raise ValueError(f"--opset {opset}: the installed torch {torch.__version__} cannot export it "
                                 f"({first}); choose a lower one (default {DEFAULT_OPSET})") from None
            raise ONNXExportError(f"torch.onnx.export ({exporter}, opset {opset}) failed: {first}") from e
        return path.read_bytes()


def _finish_model(onnx, data: bytes, props: dict[str, str]) -> tuple[bytes, dict]:
    """Add metadata props, check the model; returns (bytes, its input/output description)."""
    model = onnx.load_from_string(data)
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)

    def spec(values):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return model.SerializeToString(), {"inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}


@torch.no_grad()
def max_abs_diffs(ort, gen, direction: str, data: bytes, shapes: list[tuple[int, ...]]) -> dict[str, float]:
    """Max abs difference between onnxruntime (CPU) on `data` and `gen.translate`, per NCHW shape."""
    rng = torch.Generator().manual_seed(0)
    inputs = [torch.rand(*shape, generator=rng) * 2 - 1 for shape in shapes]
    wants = [gen.translate(x, direction).numpy() for x in inputs]  # before onnxruntime's threads exist
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting after runs
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    out = {}
    for shape, x, want in zip(shapes, inputs, wants):
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != want.shape:
            raise ONNXExportError(f"{direction}: onnxruntime gave shape {got.shape} for {tuple(shape)}, "
                                  f"PyTorch {want.shape}")
        out["x".join(map(str, shape))] = float(np.abs(got - want).max())
    return out


def _check_opset(opset: int | None, exporter: str) -> int:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {EXPORTERS}")
    least = 18 if exporter == "dynamo" else MIN_OPSET  # the dynamo exporter starts at opset 18
    opset = max(DEFAULT_OPSET, least) if opset is None else int(opset)
    if opset < least:
        raise ValueError(f"--opset {opset}: the {exporter} export of this model needs opset >= {least}")
    return opset


def export_onnx(export_dir, out_dir, size: int | None = None, opset: int | None = None,
                tolerance: float = TOLERANCE, exporter: str = "torchscript") -> dict:
    """Write OUT_DIR/translator-{a2b,b2a}.onnx and OUT_DIR/onnx.json; returns onnx.json's content.

    Raises ImportError (onnx/onnxruntime missing), FileNotFoundError/ValueError (bad export dir, --onnx,
    size or opset), ONNXExportError (the exporter failed, or a graph is beyond `tolerance`: its
    .onnx file stays for inspection, onnx.json is not written).
    """
    opset = _check_opset(opset, exporter)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--onnx {out_dir}: exists and is not a folder; name a folder (new or existing)")
    onnx, ort = require_onnx(exporter)
    if opset > onnx.defs.onnx_opset_version():  # the installed onnx package's newest opset (public)
        raise ValueError(f"--opset {opset}: newer than the installed onnx {onnx.__version__} knows "
                         f"({onnx.defs.onnx_opset_version()}); choose a lower one (default {DEFAULT_OPSET})")
    gen, meta = load_translator(export_dir, device="cpu")
    size, min_side, sides = check_shapes(meta, size)
    channels = int(meta["model"].get("channels", 3))
    shapes = [(2, channels, h, w) for h, w in sides]
    (out / JSON_NAME).unlink(missing_ok=True)  # present = these files passed the check
    props = {"source_weights_sha256": str(meta.get("weights_sha256", "")), "value_range": "[-1, 1]",
             "size_multiple": str(size_multiple(meta)), "min_side": str(min_side)}
    diffs, by_shape, hashes, io_spec = {}, {}, {}, {}
    for direction in DIRECTIONS:
        domains = meta.get("domains") or {}
        names = {"direction": direction, "source_domain": str(domains.get(direction[0], direction[0])),
                 "target_domain": str(domains.get(direction[-1], direction[-1]))}
        raw = _export_bytes(DirectionModule(gen, direction).eval(), torch.zeros(shapes[0]), opset, exporter)
        data, io_spec = _finish_model(onnx, raw, {**props, **names})
        write_bytes(out / onnx_file(direction), data)
        by_shape[direction] = max_abs_diffs(ort, gen, direction, data, shapes)
        diffs[direction], hashes[direction] = max(by_shape[direction].values()), sha256_bytes(data)
        if not diffs[direction] <= tolerance:  # stop here: the other direction is built the same way
            raise ONNXExportError(f"{direction}: ONNX differs from PyTorch by {diffs[direction]:.3g}, "
                                  f"more than {tolerance:g} ({out / onnx_file(direction)})")
    info = {
        "format": FORMAT_VERSION, "exporter": exporter, "opset": opset, **io_spec,
        "files": {d: onnx_file(d) for d in DIRECTIONS}, "sha256": hashes,
        "layout": "NCHW", "value_range": [-1.0, 1.0], "size_multiple": size_multiple(meta),
        "min_side": min_side, "export_size": size, "checked_shapes": [list(s) for s in shapes],
        "max_abs_diff": diffs, "max_abs_diff_by_shape": by_shape, "tolerance": tolerance,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "source": {k: meta.get(k) for k in ("weights_sha256", "step", "ema", "domains", "image_size")},
    }
    write_json(out / JSON_NAME, info, indent=2)
    return info


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.release.export",
                                description="Export both directions of a translator to ONNX and check "
                                            "them against PyTorch with onnxruntime (CPU).")
    p.add_argument("--onnx", required=True, metavar="OUT_DIR",
                   help="write translator-a2b.onnx, translator-b2a.onnx and onnx.json here")
    p.add_argument("--model", required=True, metavar="EXPORT_DIR",
                   help="an exported translator (translator.safetensors + translator.json)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the example input and of the first check (default: the export's image_size)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest max abs difference to PyTorch accepted (default {TOLERANCE:g})")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx.export path (default torchscript: fast and byte-reproducible)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit 0 when both directions are exported and within tolerance; 1 when export or check fails;
    2 for a bad export dir, --onnx folder (a file, not writable), size or opset (below MIN_OPSET or
    above what the installed onnx or torch.onnx exports), or missing onnx packages (one line on stderr)."""
    a = parse_args(argv)
    try:
        info = export_onnx(a.model, a.onnx, a.size, a.opset, a.tolerance, a.exporter)
    except ONNXExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ImportError, OSError, ValueError) as e:  # OSError: --onnx cannot be made or written
        print(f"error: {e}", file=sys.stderr)
        return 2
    shapes = ", ".join("x".join(map(str, s)) for s in info["checked_shapes"])
    for d in DIRECTIONS:
        print(f"{Path(a.onnx) / info['files'][d]}: max abs diff to PyTorch {info['max_abs_diff'][d]:.2e} "
              f"(onnxruntime {info['versions']['onnxruntime']}, opset {info['opset']}, shapes {shapes})")
    print(f"{Path(a.onnx) / JSON_NAME}: input {INPUT_NAME!r} float32 [batch, {info['inputs'][0]['shape'][1]}, "
          f"height, width] in [-1, 1]; sides multiples of {info['size_multiple']}, at least {info['min_side']}")
    return 0


if __name__ == "__main__":
    from launch.shutdown import end

    end(main())
