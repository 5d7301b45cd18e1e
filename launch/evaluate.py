"""Translation quality on a paired test split: the paper's pixel accuracy, MAE, identity baseline.

    python -m launch.evaluate --model models:/unit-translator@champion | EXPORT_DIR \\
        --test-a DIR --truth-b DIR [--test-b DIR --truth-a DIR] [--size N] [--tracking-uri URI]

Pixel accuracy (UNIT paper, map experiment): a pixel counts as correct when every one of its
three channels is within 16 of the truth, |pred - truth| <= 16 (the boundary value 16 counts
as correct). MAE is the mean absolute difference over all pixels and channels, on the 0..255
scale. The identity baseline scores the untranslated input against the same truth.
Test and truth images are paired by file stem (`0001.jpg` pairs with `0001.png`).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

THRESHOLD = 16
GATE_METRIC = "test/pixel_acc_a2b"


def pixel_correct(pred, truth, threshold: int = THRESHOLD) -> np.ndarray:
    """Boolean [..., H, W]: every channel within `threshold` (inclusive) of the truth."""
    p, t = np.asarray(pred), np.asarray(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {list(p.shape)} differs from truth shape {list(t.shape)}")
    if p.ndim < 3 or p.shape[-1] != 3:
        raise ValueError(f"expected [..., H, W, 3] RGB arrays, got shape {list(p.shape)}")
    diff = np.abs(p.astype(np.int16) - t.astype(np.int16))  # int16: uint8 subtraction wraps
    return (diff <= threshold).all(axis=-1)


def pixel_accuracy(pred, truth, threshold: int = THRESHOLD) -> float:
    """Fraction of pixels whose every channel is within `threshold` (|diff| <= threshold)."""
    ok = pixel_correct(pred, truth, threshold)
    return float(ok.mean()) if ok.size else float("nan")


def mae(pred, truth) -> float:
    """Mean absolute error over all pixels and channels, 0..255 scale."""
    p, t = np.asarray(pred), np.asarray(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {list(p.shape)} differs from truth shape {list(t.shape)}")
    return float(np.abs(p.astype(np.float64) - t.astype(np.float64)).mean()) if p.size else float("nan")


# ---------------------------------------------------------------------------------------------
# Test folders


def image_files(dir) -> list[Path]:
    """Image files in `dir` (not recursive), sorted; recognised by PIL, not by extension."""
    from PIL import Image

    root = Path(dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception:
            continue
        out.append(p)
    return out


def read_image(path, size: int | None = None) -> np.ndarray:
    """uint8 HWC RGB; resized to size x size (bicubic) when `size` is given."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


def load_folder(dir, size: int | None = None) -> tuple[list[str], np.ndarray]:
    """(stems, uint8 [N, H, W, 3]) of the images in `dir`; all must share one size unless `size`."""
    files = image_files(dir)
    if not files:
        raise ValueError(f"{dir}: no images found")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise ValueError(f"{dir}: several images share a stem ({dup}); pairing by stem is ambiguous")
    imgs = [read_image(p, size) for p in files]
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise ValueError(f"{dir}: images of different sizes {sorted(shapes)[:3]}; pass --size N to resize")
    return stems, np.stack(imgs)


def load_pairs(test_dir, truth_dir, size: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Test and truth images paired by stem: (stems, test [N,H,W,3], truth [N,H,W,3])."""
    s_test, x = load_folder(test_dir, size)
    s_truth, y = load_folder(truth_dir, size)
    common = sorted(set(s_test) & set(s_truth))
    if not common:
        raise ValueError(f"{test_dir} and {truth_dir}: no file stems in common, nothing to pair")
    it, iy = {s: i for i, s in enumerate(s_test)}, {s: i for i, s in enumerate(s_truth)}
    x, y = x[[it[s] for s in common]], y[[iy[s] for s in common]]
    if x.shape != y.shape:
        raise ValueError(f"{test_dir} {list(x.shape[1:])} and {truth_dir} {list(y.shape[1:])}: "
                         "test and truth images differ in size; pass --size N")
    return common, x, y


def split_digest(pairs: dict) -> str:
    """Identifies a test split: sha256 over the file names and bytes of its folders."""
    h = hashlib.sha256()
    for direction in sorted(pairs):
        for d in pairs[direction]:
            for p in image_files(d):
                h.update(f"{direction}\t{p.name}\t".encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Evaluating a translator


def as_translate_fn(model):
    """A function (uint8 NHWC, direction) -> uint8 NHWC from a generator module or a pyfunc model."""
    if hasattr(model, "translate") and hasattr(model, "parameters"):
        from launch.export import translate_uint8

        return lambda imgs, direction: translate_uint8(model, imgs, direction)
    if hasattr(model, "predict"):
        return lambda imgs, direction: np.asarray(model.predict(imgs, params={"direction": direction}))
    if callable(model):
        return model
    raise TypeError(f"cannot translate with a {type(model).__name__}")


def evaluate_translator(model, test_a=None, truth_b=None, test_b=None, truth_a=None,
                        size: int | None = None, threshold: int = THRESHOLD) -> dict:
    """Per direction: {"pixel_acc", "mae", "identity_pixel_acc", "identity_mae", "n"}.

    `model`: a generator module (gen.translate), a pyfunc model, or fn(images, direction).
    a2b needs test_a + truth_b, b2a needs test_b + truth_a; a direction without both is skipped.
    """
    fn = as_translate_fn(model)
    out = {}
    for direction, src, truth in (("a2b", test_a, truth_b), ("b2a", test_b, truth_a)):
        if not (src and truth):
            continue
        _, x, y = load_pairs(src, truth, size)
        pred = fn(x, direction)
        out[direction] = {"pixel_acc": pixel_accuracy(pred, y, threshold), "mae": mae(pred, y),
                          "identity_pixel_acc": pixel_accuracy(x, y, threshold), "identity_mae": mae(x, y),
                          "n": int(len(x))}
    if not out:
        raise ValueError("evaluate: give at least one direction (test_a with truth_b, or test_b with truth_a)")
    return out


def evaluate_export(export_dir, test_a=None, truth_b=None, test_b=None, truth_a=None,
                    size: int | None = None, threshold: int = THRESHOLD) -> dict:
    """evaluate_translator on an exported translator directory."""
    from launch.export import load_translator

    gen, meta = load_translator(export_dir)
    return evaluate_translator(gen, test_a, truth_b, test_b, truth_a, size=size or None, threshold=threshold)


def flat_metrics(res: dict, prefix: str = "test/") -> dict:
    """{"a2b": {"pixel_acc": x}} -> {"test/pixel_acc_a2b": x} (n excluded)."""
    return {f"{prefix}{k}_{d}": v for d, m in res.items() for k, v in m.items() if k != "n"}


def format_table(res: dict) -> str:
    head = f"{'direction':<10}{'n':>6}{'pixel acc':>12}{'identity':>12}{'MAE':>10}{'identity MAE':>15}"
    lines = [head, "-" * len(head)]
    for d, m in res.items():
        lines.append(f"{d:<10}{m['n']:>6}{m['pixel_acc']:>12.4f}{m['identity_pixel_acc']:>12.4f}"
                     f"{m['mae']:>10.2f}{m['identity_mae']:>15.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading a model given as models:/... or an export directory


def load_model(spec: str, tracking_uri: str | None = None):
    """(model usable by evaluate_translator, info) from `models:/name@alias`, `models:/name/3`,
    `runs:/...` or an export directory. info has "kind" and, for registry models, "run_id"."""
    from launch.export import is_export_dir, load_translator

    if "://" not in spec and ":/" not in spec:
        if not is_export_dir(spec):
            raise FileNotFoundError(f"--model {spec}: not an export directory (translator.json + "
                                    "translator.safetensors) and not a models:/ URI")
        gen, meta = load_translator(spec)
        return gen, {"kind": "export", "path": str(spec), "meta": meta}
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    info = {"kind": "mlflow", "uri": spec, "run_id": None}
    if spec.startswith("models:/"):
        info.update(resolve_model_version(spec))
    return mlflow.pyfunc.load_model(spec), info


def resolve_model_version(spec: str) -> dict:
    """{"name", "version", "run_id"} of models:/name@alias or models:/name/version."""
    from mlflow import MlflowClient

    rest = spec[len("models:/"):].strip("/")
    c = MlflowClient()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = c.get_model_version_by_alias(name, alias)
    else:
        name, _, version = rest.partition("/")
        if not version.isdigit():
            raise ValueError(f"{spec}: expected models:/<name>@<alias> or models:/<name>/<version>")
        mv = c.get_model_version(name, version)
    return {"name": mv.name, "version": mv.version, "run_id": mv.run_id}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.evaluate",
                                description="Pixel accuracy (threshold 16) and MAE of a translator on paired test folders.")
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or an export dir")
    p.add_argument("--test-a", help="domain A inputs, translated a2b")
    p.add_argument("--truth-b", help="domain B truth for --test-a (same stems)")
    p.add_argument("--test-b", help="domain B inputs, translated b2a")
    p.add_argument("--truth-a", help="domain A truth for --test-b (same stems)")
    p.add_argument("--size", type=int, default=None, help="resize every image to N x N first")
    p.add_argument("--threshold", type=int, default=THRESHOLD)
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--no-log", action="store_true", help="do not log the metrics to the model's run")
    a = p.parse_args(argv)
    if bool(a.test_a) != bool(a.truth_b) or bool(a.test_b) != bool(a.truth_a):
        p.error("--test-a needs --truth-b and --test-b needs --truth-a")
    if not (a.test_a or a.test_b):
        p.error("give --test-a DIR --truth-b DIR and/or --test-b DIR --truth-a DIR")
    try:
        model, info = load_model(a.model, a.tracking_uri)
        res = evaluate_translator(model, a.test_a, a.truth_b, a.test_b, a.truth_a, size=a.size, threshold=a.threshold)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {a.model}")
    print(format_table(res))
    if info.get("run_id") and not a.no_log:
        from mlflow import MlflowClient

        c = MlflowClient()
        for k, v in flat_metrics(res).items():
            c.log_metric(info["run_id"], k, v)
        print(f"logged to run {info['run_id']} ({info['name']} version {info['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
