"""Translation quality on a paired test split, always beside the trivial baselines it must beat.

    python -m launch.release.evaluate --model models:/unit-translator@champion | EXPORT_DIR \\
        --test-a DIR --truth-b DIR [--test-b DIR --truth-a DIR] [--size N] [--shards OUT]
        [--c2st-steps 200] [--fid-features FILE] [--tracking-uri URI]

Pixel accuracy (UNIT paper, map experiment): a pixel counts as correct when every one of its
three channels is within 16 of the truth, |pred - truth| <= 16 (the boundary value 16 counts
as correct). MAE is the mean absolute difference over all pixels and channels, on the 0..255
scale. Each is shown for the model and for the baselines of launch/release/baselines.py (identity,
the best constant colour of the target domain, per-channel histogram matching; estimated from
training shards, never from the test truth), and the table says whether the model beats the strongest.
C2ST (launch/release/c2st.py) and FID/KID (launch/release/fid.py, with a feature extractor file) compare the
translations with real target-domain images as distributions.
Test and truth images are paired by file stem (`0001.jpg` pairs with `0001.png`); a file with no
partner is left out and named, as an unusable image is, and the exit status is 3. Images with a side
below the model's minimum (launch.release.export.min_input_side) are skipped and named; a --size
below it is refused before anything is translated.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import imageio
from pipeline.colour_stats import TOLERANCE
from pipeline.imageio import image_files
from pipeline.layout import valid_text
from pipeline.storage import redact, redact_text, redact_uncaught

THRESHOLD = TOLERANCE  # pixel accuracy: every channel within 16 of the truth
GATE_METRIC = "test/pixel_acc_a2b"
EVAL_PREFIX = "eval/"  # what the evaluate CLI logs to a version's run: never the gate's test/ names
MIN_SIDE = 5  # smallest side of the default networks (n_down 2): load_folder's default without a model
UNPAIRED = "no partner"  # the reason given for a test or truth file whose stem the other folder lacks
NAMED = 5  # unpaired files named on stderr per folder, then a count


def pixel_correct(pred, truth, threshold: int = THRESHOLD) -> np.ndarray:
    """Boolean [..., H, W]: every channel within `threshold` (inclusive) of the truth. A threshold
    below 0 is a ValueError: no pixel could count, and a score of 0 would look like a model's."""
    if threshold < 0:
        raise ValueError(f"threshold {threshold}: expected >= 0 (per channel, |pred - truth| <= threshold)")
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


def load_folder(dir, size: int | None = None, rejected: list | None = None,
                min_side: int = MIN_SIDE) -> tuple[list[str], np.ndarray]:
    """pipeline.imageio.load_folder with the network's smallest input side (model_min_side)."""
    return imageio.load_folder(dir, size, rejected, min_side=min_side)


def load_pairs(test_dir, truth_dir, size: int | None = None, rejected: list | None = None,
               min_side: int = MIN_SIDE) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Test and truth images paired by stem: (stems, test [N,H,W,3], truth [N,H,W,3]).

    A usable file whose stem the other folder lacks is left out and appended to `rejected` as
    "PATH: no partner: ..." (without a list: ValueError), as unusable files are. Each file is
    listed once: a folder read for both directions (testA as --test-a and --truth-a) or as test
    and truth adds no second entry for a file `rejected` already names."""
    found = rejected if rejected is not None else []
    unusable: list[str] = []
    s_test, x = load_folder(test_dir, size, unusable, min_side)
    s_truth, y = load_folder(truth_dir, size, unusable, min_side)
    found += [r for r in dict.fromkeys(unusable) if r not in found]
    common = sorted(set(s_test) & set(s_truth))
    if not common:
        raise ValueError(f"{test_dir} and {truth_dir}: no file stems in common, nothing to pair")
    found += unpaired(test_dir, truth_dir, found) + unpaired(truth_dir, test_dir, found)
    if found and rejected is None:
        raise ValueError(f"{found[0]} ({len(found)} file(s) of the test split cannot be scored)")
    it, iy = {s: i for i, s in enumerate(s_test)}, {s: i for i, s in enumerate(s_truth)}
    x, y = x[[it[s] for s in common]], y[[iy[s] for s in common]]
    if x.shape != y.shape:
        raise ValueError(f"{test_dir} {list(x.shape[1:])} and {truth_dir} {list(y.shape[1:])}: "
                         "test and truth images differ in size; pass --size N")
    return common, x, y


def unpaired(folder, other, rejected: list) -> list[str]:
    """"PATH: no partner: ..." for each image in `folder` whose stem no image in `other` has (the
    files already `rejected` as unusable are named once, for that)."""
    stems = {p.stem for p in image_files(other)}
    return [f"{p}: {UNPAIRED}: no image with the stem {p.stem!r} in {other}" for p in image_files(folder)
            if p.stem not in stems and not any(r.startswith(f"{p}: ") for r in rejected)]


def refuse_small_size(size: int | None, min_side: int) -> None:
    """ValueError for a --size below the model's smallest input side (None: native sizes)."""
    if size is not None and size < min_side:
        raise ValueError(f"--size {size}: the model needs at least {min_side} pixels per side")


def model_min_side(model) -> int:
    """The smallest image side `model` translates: our pyfunc model's own; for a generator module
    (whose config is not at hand) the strictest of its n_down (reflection padding, instance norm);
    for any other function MIN_SIDE, the default networks'."""
    from launch.release.export import min_input_side

    network = _our_pyfunc(model)
    if network is not None:
        return int(network.min_side)
    multiple = getattr(model, "input_multiple", None)
    if isinstance(multiple, int) and multiple >= 1:
        return min_input_side({"n_down": multiple.bit_length() - 1, "pad_type": "reflect", "norm": "in"})
    return MIN_SIDE


def split_digest(pairs: dict, size: int | None, threshold: int) -> str:
    """Identifies a test split as scored: sha256 over the file names and bytes of its folders, the
    size its images are resized to (None: native) and the pixel accuracy threshold. The same folders
    at another size or threshold give other scores, so they are another split to the champion gate."""
    h = hashlib.sha256(f"size={size}\tthreshold={threshold}\n".encode())
    for direction in sorted(pairs):
        for d in pairs[direction]:
            for p in image_files(d):
                # the name's own bytes: a file name that is not UTF-8 (unzipped from a latin-1 archive)
                # is held as lone surrogates, which str.encode refuses; UTF-8 names hash as before
                h.update(direction.encode() + b"\t" + os.fsencode(p.name) + b"\t")
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Evaluating a translator beside its baselines


@dataclass
class EvalOptions:
    """What an evaluation computes besides pixel accuracy and MAE."""

    baselines: dict | None = None     # launch.release.baselines stats per domain ({"a": ..., "b": ...}); None: identity only
    c2st_steps: int = 200             # classifier steps of the two-sample test; 0 turns it off
    features: object = None           # FID/KID feature extractor (launch.release.fid.load_extractor); None: not computed
    threshold: int = THRESHOLD        # pixel accuracy tolerance per channel


def as_translate_fn(model, batch_size: int = 16):
    """A function (uint8 NHWC, direction) -> uint8 NHWC from a generator module or a pyfunc model,
    in batches of `batch_size`. Our own pyfunc model's network is run directly, as an export's is,
    so both give the same translation; the caller tiles (translate's --tile) or not (evaluation)."""
    network = _our_pyfunc(model)
    gen = network.gen if network is not None else model
    if hasattr(gen, "translate") and hasattr(gen, "parameters"):
        from launch.release.export import translate_uint8

        return lambda imgs, direction: translate_uint8(gen, imgs, direction, batch_size=batch_size)
    if hasattr(model, "predict"):
        wanted = {"batch_size": batch_size, "tile": 0}  # never tiled again: the caller decided
        declared = _declared_params(model)
        extra = {k: v for k, v in wanted.items() if k in declared}
        return lambda imgs, direction: np.asarray(model.predict(imgs, params={"direction": direction, **extra}))
    if callable(model):
        return model
    raise TypeError(f"cannot translate with a {type(model).__name__}")


def _our_pyfunc(model):
    """The python model inside a loaded pyfunc when it is our translator (a `gen` network and its
    `min_side`), else None."""
    try:
        inner = model.unwrap_python_model()
    except Exception:  # not a pyfunc model, or not a python model
        return None
    gen = getattr(inner, "gen", None)
    ok = hasattr(gen, "translate") and hasattr(gen, "parameters") and hasattr(inner, "min_side")
    return inner if ok else None


def _declared_params(model) -> set[str]:
    """Names of the params a pyfunc model's signature declares (MLflow drops the others, warning)."""
    try:
        schema = model.metadata.get_params_schema()
    except Exception:  # no metadata, or a model without a signature
        return set()
    return {p.name for p in schema.params} if schema is not None else set()


def skipped(n: int, opts: EvalOptions) -> list[str]:
    """Why C2ST / FID-KID, although asked for, are not computed on `n` test pairs (too few images)."""
    from launch.release.c2st import MIN_IMAGES

    out = []
    if opts.c2st_steps and n < MIN_IMAGES:
        out.append(f"C2ST skipped: {n} test image(s), it needs at least {MIN_IMAGES}")
    if opts.features is not None and n < 2:
        out.append(f"FID/KID skipped: {n} test image(s), they need at least 2")
    return out


def score(pred, truth, opts: EvalOptions) -> dict:
    """{"pixel_acc", "mae", "c2st"?, "fid"?, "kid"?} of translations `pred` against `truth`.

    C2ST and FID/KID compare distributions, `truth` serving as the real target-domain images (C2ST
    keeps each pair on one side of its train/test split, see launch.release.c2st). They are left out when
    there are too few images for them (see `skipped`).
    """
    out = {"pixel_acc": pixel_accuracy(pred, truth, opts.threshold), "mae": mae(pred, truth)}
    too_few = skipped(min(len(pred), len(truth)), opts)
    if opts.c2st_steps and not any(n.startswith("C2ST") for n in too_few):
        from launch.release.c2st import c2st

        out["c2st"] = c2st(truth, pred, steps=opts.c2st_steps)
    if opts.features is not None and not any(n.startswith("FID") for n in too_few):
        from launch.release.fid import fid_kid

        out.update(fid_kid(truth, pred, opts.features))
    return out


def evaluate_direction(fn, x, y, direction: str, opts: EvalOptions) -> dict:
    """The model's scores and each baseline's (prefixed by its name), the strongest baseline and the margin;
    "notes": what was asked for but not computed, and why."""
    out = {"n": int(len(x)), **score(np.asarray(fn(x, direction)), y, opts)}
    notes = skipped(len(x), opts)
    if notes:
        out["notes"] = notes
    rivals = {"identity": lambda imgs, d: imgs}
    if opts.baselines:
        from launch.release.baselines import translators

        rivals = translators(opts.baselines, opts.threshold)
    for name, rival in rivals.items():
        out.update({f"{name}_{k}": v for k, v in score(rival(x, direction), y, opts).items()})
    best = max(rivals, key=lambda name: out[f"{name}_pixel_acc"])
    out["best_baseline"] = best
    out["best_baseline_pixel_acc"] = out[f"{best}_pixel_acc"]
    out["margin"] = out["pixel_acc"] - out["best_baseline_pixel_acc"]
    return out


def evaluate_translator(model, test_a=None, truth_b=None, test_b=None, truth_a=None,
                        size: int | None = None, threshold: int = THRESHOLD, opts: EvalOptions | None = None,
                        rejected: list | None = None, min_side: int | None = None) -> dict:
    """Per direction, the model's and every baseline's scores (see evaluate_direction).

    `model`: a generator module (gen.translate), a pyfunc model, or fn(images, direction).
    a2b needs test_a + truth_b, b2a needs test_b + truth_a; a direction without both is skipped.
    Unusable test images (a side below `min_side`, default model_min_side(model), included) and
    files without a partner are skipped and listed in `rejected` when a list is given (else a
    ValueError). A `size` below `min_side` is a ValueError, before anything is read.
    """
    opts = opts or EvalOptions(threshold=threshold)
    min_side = min_side or model_min_side(model)
    refuse_small_size(size, min_side)
    fn = as_translate_fn(model)
    out = {}
    for direction, src, truth in (("a2b", test_a, truth_b), ("b2a", test_b, truth_a)):
        if not (src and truth):
            continue
        _, x, y = load_pairs(src, truth, size, rejected, min_side)
        out[direction] = evaluate_direction(fn, x, y, direction, opts)
    if not out:
        raise ValueError("evaluate: give at least one direction (test_a with truth_b, or test_b with truth_a)")
    return out


def evaluate_export(export_dir, test_a=None, truth_b=None, test_b=None, truth_a=None,
                    size: int | None = None, opts: EvalOptions | None = None, rejected: list | None = None) -> dict:
    """evaluate_translator on an exported translator directory (its baselines.json when there is one);
    unusable and unpaired test files are listed in `rejected` (without a list: ValueError)."""
    from launch.release import baselines
    from launch.release.export import load_translator, min_input_side

    gen, meta = load_translator(export_dir)
    opts = opts or EvalOptions()
    stats = Path(export_dir) / baselines.FILE_NAME
    if opts.baselines is None and stats.is_file():
        opts = dataclasses.replace(opts, baselines=baselines.load(stats))
    return evaluate_translator(gen, test_a, truth_b, test_b, truth_a, size=size or None, opts=opts,
                               rejected=rejected, min_side=min_input_side(meta))


def printable(text: str) -> str:
    """`text` fit for a strict UTF-8 stdout: a file name that is not UTF-8 reaches Python as lone
    surrogates, which printing refuses (after the work is done, losing the exit status and the
    report); its bytes are shown as \\xNN escapes instead. Other text is returned unchanged."""
    try:
        return valid_text(text)  # the escaping make shards gives source names in its manifest
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (not from a file name)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def warn_skipped(rejected: list[str], shown: int = NAMED) -> None:
    """One warning naming the test files left out of the evaluation (unusable, or without a partner)."""
    if rejected:
        more = f" and {len(rejected) - shown} more" if len(rejected) > shown else ""
        print(printable(f"warning: {len(rejected)} test file(s) left out of the evaluation: "
                        + "; ".join(redact_text(r) for r in rejected[:shown]) + more), flush=True)


def flat_metrics(res: dict, prefix: str = "test/") -> dict:
    """{"a2b": {"pixel_acc": x}} -> {"test/pixel_acc_a2b": x} (numbers only, n excluded)."""
    return {f"{prefix}{k}_{d}": v for d, m in res.items() for k, v in m.items()
            if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_table(res: dict) -> str:
    """One row per translator (the model, then each baseline) and direction; the strongest baseline marked."""
    cols = [("pixel_acc", "pixel acc", "{:.4f}"), ("mae", "MAE", "{:.2f}"), ("c2st", "C2ST", "{:.3f}"),
            ("fid", "FID", "{:.2f}"), ("kid", "KID", "{:.4f}")]
    shown = [c for c in cols if any(c[0] in m for m in res.values())]
    head = f"{'direction':<10}{'translator':<14}{'n':>5}" + "".join(f"{label:>11}" for _, label, _ in shown)
    lines = [head, "-" * len(head)]
    for d, m in res.items():
        names = [""] + [k[:-len("_pixel_acc")] + "_" for k in m if k.endswith("_pixel_acc")
                        and k not in ("best_baseline_pixel_acc",)]
        for prefix in names:
            label = prefix.rstrip("_") or "model"
            if label == m.get("best_baseline"):
                label += " *"
            vals = "".join(f"{fmt.format(m[prefix + key]):>11}" if prefix + key in m else f"{'-':>11}"
                           for key, _, fmt in shown)
            lines.append(f"{d:<10}{label:<14}{m['n']:>5}{vals}")
        # a tie is said as one; it still does not beat the baseline (the champion gate's rule too)
        verdict = "beats" if m["margin"] > 0 else "ties with" if m["margin"] == 0 else "LOSES TO"
        tail = " in pixel accuracy" if verdict == "ties with" else f" by {m['margin']:+.4f} pixel accuracy"
        lines.append(f"{'':<10}model {verdict} the strongest baseline ({m['best_baseline']}){tail}")
    notes = list(dict.fromkeys(note for m in res.values() for note in m.get("notes", [])))
    if not any("fid" in m for m in res.values()) and not any(n.startswith("FID") for n in notes):
        from launch.release.fid import NO_WEIGHTS

        lines.append(NO_WEIGHTS)
    if any("c2st" in m for m in res.values()):
        lines.append("C2ST: held-out accuracy of a classifier telling real target images from these "
                     "(0.5 = indistinguishable, 1.0 = always told apart)")
    elif not any(n.startswith("C2ST") for n in notes):
        lines.append("C2ST: off")
    lines += notes
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading a model given as models:/... or an export directory


class ModelNotFound(ValueError):
    """--model names nothing that can be loaded (a missing export dir, registered model, alias or
    version, or no reachable tracking store); the message is one line naming what was asked and
    what exists. The CLIs print it and exit 2."""


def load_model(spec: str, tracking_uri: str | None = None, device: str | None = None):
    """(model usable by evaluate_translator, info) from `models:/name@alias`, `models:/name/3`,
    `runs:/...` or an export directory. info has "kind" and, for registry models, "name",
    "version", "run_id", "tracking_uri" and "model_uri" (models:/name/version, the alias resolved
    once: use it for anything else read of this model); for exports "path" and "meta".
    `device` (cpu, cuda, cuda:N): where the weights go; None: cpu for an export, the registered
    model's own choice (cuda when there is one) for the others.

    The tracking URI is `tracking_uri`, else MLFLOW_TRACKING_URI; with neither, a models:/ or
    runs:/ spec is refused (MLflow would otherwise create ./mlflow.db). A SQLite or file store that
    does not exist is refused too, so nothing is ever created. Every failure is a ModelNotFound."""
    if "://" not in spec and ":/" not in spec:
        return _load_export(spec, device or "cpu")
    uri = _tracking_uri(spec, tracking_uri)  # before importing mlflow: nothing may touch the default store
    import mlflow
    from mlflow.exceptions import MlflowException

    from launch.runstore.store import fluent_uri, make_client

    info = {"kind": "mlflow", "uri": spec, "run_id": None, "tracking_uri": uri}
    if spec.startswith("models:/"):
        info.update(resolve_model_version(spec, make_client(uri)))
        # From here on the version the alias named once: a registration moving the alias meanwhile
        # must not make the weights, the baselines and the run the metrics go to three versions.
        info["model_uri"] = f"models:/{info['name']}/{info['version']}"
    try:
        with fluent_uri(uri):
            # The pyfunc's load_context reads the device from its model_config (MLflow's own way
            # to configure a model at load time); MLflow drops it for a version logged without one.
            kw = {"model_config": {"device": device}} if device else {}
            model = mlflow.pyfunc.load_model(info.get("model_uri", spec), **kw)
    except (MlflowException, OSError) as e:
        raise ModelNotFound(f"--model {spec}: cannot be loaded from {redact(uri)} "
                            f"({type(e).__name__}: {_one_line(e)})") from None
    return _on_device(model, device), info


def _on_device(model, device: str | None):
    """`model` with its weights on `device`: a version logged without the model_config that names
    it loaded onto its own choice (MLflow dropped the setting), so move the network there."""
    import torch

    if not device:
        return model
    try:
        gen = getattr(model.unwrap_python_model(), "gen", None)
    except Exception:  # not a python model: no network of ours to move
        return model
    if isinstance(gen, torch.nn.Module) and next(gen.parameters()).device != torch.device(device):
        gen.to(device)
    return model


def _load_export(spec: str, device: str):
    from launch.release.export import load_translator
    from launch.runstore.artifacts import META_NAME, WEIGHTS_NAME, is_export_dir

    path = Path(spec)
    if not is_export_dir(path):
        what = ("no such directory" if not path.exists() else "not a directory" if not path.is_dir() else
                f"no {' and no '.join(n for n in (META_NAME, WEIGHTS_NAME) if not (path / n).is_file())} in it")
        raise ModelNotFound(f"--model {spec}: not an export directory ({what}) and not a models:/ URI "
                            "(models:/<name>@<alias> or models:/<name>/<version>)")
    try:
        gen, meta = load_translator(path, device=device)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFound(f"--model {spec}: the export cannot be loaded ({_one_line(e)})") from None
    return gen, {"kind": "export", "path": str(spec), "meta": meta}


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An error on one line, its URLs redacted (MLflow's HTTP errors quote the request URL whole)."""
    return redact_text(" ".join(str(e).split()))[:limit]


def _tracking_uri(spec: str, given: str | None) -> str:
    """The tracking URI to ask about `spec`; ModelNotFound when none is set or its store does not exist."""
    import os

    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ModelNotFound(f"--model {spec}: no tracking server to ask: MLFLOW_TRACKING_URI is not set and "
                            "--tracking-uri was not given (set one, or pass an export directory)")
    local = None
    if uri.startswith("sqlite:///"):
        local = uri[len("sqlite:///"):]
    elif uri.startswith("file:"):
        local = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):]
    elif "://" not in uri:
        local = uri
    if local is not None and not os.path.exists(local):
        raise ModelNotFound(f"--model {spec}: tracking URI {uri}: no MLflow store there ({local} does not exist)")
    return uri


def _ask(spec: str, client, call, *args):
    """client.call(*args); None when the server says the thing does not exist; ModelNotFound when it
    cannot be asked (unreachable, refused)."""
    from mlflow.exceptions import MlflowException

    try:
        return getattr(client, call)(*args)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or e.get_http_status_code() == 404:
            return None
        why = _one_line(e)
    except Exception as e:  # noqa: BLE001 - connection errors of the HTTP stack, database errors
        why = f"{type(e).__name__}: {_one_line(e)}"
    raise ModelNotFound(f"--model {spec}: cannot ask the tracking server {redact(client.tracking_uri)} ({why})")


def _existing(spec: str, client, name: str, rm) -> str:
    """'its aliases: ...; its versions: ...' of a registered model (for error messages)."""
    aliases = ", ".join(f"{a} (version {v})" for a, v in sorted((rm.aliases or {}).items())) or "none"
    found = _ask(spec, client, "search_model_versions", "name='{}'".format(name.replace("'", "\\'"))) or []
    versions = ", ".join(sorted({str(v.version) for v in found}, key=int)) or "none"
    return f"its aliases: {aliases}; its versions: {versions}"


def quick_http_failures() -> None:
    """For CLIs: an unreachable tracking server fails in seconds, not after MLflow's default minutes
    of retries (the environment's own MLFLOW_HTTP_REQUEST_* settings win)."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def resolve_model_version(spec: str, client) -> dict:
    """{"name", "version", "run_id"} of models:/name@alias or models:/name/version; ModelNotFound
    (one line naming the registered models, or the model's aliases and versions) when it does not exist."""
    rest = spec[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = None
    else:
        name, _, version = rest.partition("/")
        alias = None
    if not name or (alias is None and not version.isdigit()) or (alias is not None and not alias):
        raise ModelNotFound(f"--model {spec}: expected models:/<name>@<alias> or models:/<name>/<version>")
    rm = _ask(spec, client, "get_registered_model", name)
    if rm is None:
        names = [m.name for m in _ask(spec, client, "search_registered_models", None, 50) or []]
        raise ModelNotFound(f"--model {spec}: no registered model {name!r} at {redact(client.tracking_uri)}; "
                            f"registered models there: {', '.join(sorted(names)) or 'none'}")
    if alias is not None:
        version = (rm.aliases or {}).get(alias)
        if version is None:
            raise ModelNotFound(f"--model {spec}: registered model {name!r} has no alias {alias!r}; "
                                + _existing(spec, client, name, rm))
    mv = _ask(spec, client, "get_model_version", name, str(version))
    if mv is None:
        raise ModelNotFound(f"--model {spec}: registered model {name!r} has no version {version}; "
                            + _existing(spec, client, name, rm))
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id}


def baseline_stats(args, model_spec: str, tracking_uri: str | None = None):
    """Baseline statistics for the CLI: --baselines FILE, --shards OUT, or the ones shipped with the
    model (export dir or registered model); None when there are none (identity only)."""
    from launch.release import baselines

    if args.baselines:
        return baselines.load(args.baselines)
    if args.shards:
        return baselines.stats_from_shards(args.shards, image_size=args.size or 64)
    if "://" not in model_spec and ":/" not in model_spec:
        f = Path(model_spec) / baselines.FILE_NAME
        return baselines.load(f) if f.is_file() else None
    import tempfile

    import mlflow

    from launch.runstore.store import fluent_uri

    with tempfile.TemporaryDirectory() as tmp, fluent_uri(tracking_uri or mlflow.get_tracking_uri()):
        local = Path(mlflow.artifacts.download_artifacts(model_spec, dst_path=tmp))
        found = sorted(local.rglob(baselines.FILE_NAME))
        return baselines.load(found[0]) if found else None


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.release.evaluate",
                                description="Pixel accuracy (threshold 16), MAE, C2ST and (with a feature extractor) "
                                            "FID/KID of a translator on paired test folders, beside the trivial "
                                            "baselines (identity, the target domain's best constant colour, "
                                            "histogram matching).")
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or an export dir")
    p.add_argument("--test-a", help="domain A inputs, translated a2b")
    p.add_argument("--truth-b", help="domain B truth for --test-a (same stems)")
    p.add_argument("--test-b", help="domain B inputs, translated b2a")
    p.add_argument("--truth-a", help="domain A truth for --test-b (same stems)")
    p.add_argument("--size", type=int, default=None, help="resize every image to N x N first")
    p.add_argument("--threshold", type=int, default=THRESHOLD)
    p.add_argument("--shards", help="training shards (OUT dir or index.json) to estimate the baselines from "
                                    "(default: the baselines.json shipped with the model)")
    p.add_argument("--baselines", help="a baselines.json written by training (launch.release.baselines)")
    p.add_argument("--c2st-steps", type=int, default=200, help="classifier steps of the two-sample test (0: off)")
    p.add_argument("--fid-features", help="TorchScript feature extractor for FID/KID (uint8 NCHW -> [N, D])")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--no-log", action="store_true", help="do not log the metrics to the model's run")
    a = p.parse_args(argv)
    if bool(a.test_a) != bool(a.truth_b) or bool(a.test_b) != bool(a.truth_a):
        p.error("--test-a needs --truth-b and --test-b needs --truth-a")
    if not (a.test_a or a.test_b):
        p.error("give --test-a DIR --truth-b DIR and/or --test-b DIR --truth-a DIR")
    if a.c2st_steps < 0:
        p.error("--c2st-steps must be >= 0")
    if a.threshold < 0:  # also without baselines.json, where check_tolerance never sees it
        p.error(f"--threshold {a.threshold}: must be >= 0 (per channel, |pred - truth| <= threshold)")
    return a


def main(argv=None) -> int:
    redact_uncaught()  # an error no branch below expects must not print a password either
    a = arguments(argv)
    rejected: list[str] = []
    quick_http_failures()
    try:
        model, info = load_model(a.model, a.tracking_uri)
        from launch.release.export import min_input_side

        min_side = min_input_side(info["meta"]) if info.get("meta") else model_min_side(model)
        refuse_small_size(a.size, min_side)  # before the baselines and the test split are read
        features = None
        if a.fid_features:
            from launch.release.fid import load_extractor
            features = load_extractor(a.fid_features)
        stats = baseline_stats(a, info.get("model_uri", a.model), info.get("tracking_uri"))
        if stats:  # a constant saved for another threshold fails here, before any translating
            from launch.release.baselines import check_tolerance
            check_tolerance(stats, a.threshold)
        opts = EvalOptions(baselines=stats, c2st_steps=a.c2st_steps, features=features, threshold=a.threshold)
        res = evaluate_translator(model, a.test_a, a.truth_b, a.test_b, a.truth_a, size=a.size, opts=opts,
                                  rejected=rejected, min_side=min_side)
    except (FileNotFoundError, ValueError) as e:
        print_skipped(rejected)  # why a folder holds no usable image, say
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_skipped(rejected)
    print(printable(f"model: {a.model}"))
    if opts.baselines is None:
        print("baselines: identity only (no baselines.json with the model; pass --shards OUT or --baselines FILE)")
    print(format_table(res))
    if info.get("run_id") and not a.no_log:
        log_evaluation(info, res, a)
    if rejected:
        lone = sum(is_unpaired(r) for r in rejected)
        print("; ".join(part for part in (
            f"{len(rejected) - lone} test image(s) skipped as unusable" if len(rejected) > lone else "",
            f"{lone} test or truth image(s) left out for want of a partner of the same stem" if lone else "")
            if part) + " (listed above)", file=sys.stderr)
        return 3
    return 0


def log_evaluation(info: dict, res: dict, a: argparse.Namespace) -> None:
    """Log the scores to the registered version's run under EVAL_PREFIX, with the split they were
    measured on as run tags (eval/test_split: its digest; eval/size, eval/threshold, eval/model_uri). Not under
    the gate's test/ names: registration logs those for its own split at the export's step, and
    any folders, size or threshold may be evaluated here. A failure (a deleted run, a read-only
    token) is one warning: the evaluation above stands and keeps its exit status."""
    import time

    from mlflow.entities import Metric, RunTag

    from launch.runstore.store import make_client

    pairs = {d: [s, t] for d, s, t in (("a2b", a.test_a, a.truth_b), ("b2a", a.test_b, a.truth_a)) if s and t}
    now = int(time.time() * 1000)
    try:
        tags = {"eval/test_split": split_digest(pairs, a.size, a.threshold), "eval/size": str(a.size or "native"),
                "eval/threshold": str(a.threshold), "eval/model_uri": info.get("model_uri", a.model)}
        metrics = [Metric(k, v, now, 0) for k, v in flat_metrics(res, EVAL_PREFIX).items()]
        make_client(info["tracking_uri"]).log_batch(info["run_id"], metrics=metrics,
                                                    tags=[RunTag(k, v) for k, v in tags.items()])
    except Exception as e:  # noqa: BLE001 - MlflowException, the HTTP stack's, an unreadable test file
        print(f"warning: the scores were not logged to run {info['run_id']} ({type(e).__name__}: "
              f"{_one_line(e)}); the evaluation above stands", file=sys.stderr)
        return
    print(f"logged to run {info['run_id']} ({info['name']} version {info['version']}) as {EVAL_PREFIX}*")


def is_unpaired(entry: str) -> bool:
    """Whether a `rejected` entry is load_pairs' "PATH: no partner: ..."."""
    return f": {UNPAIRED}: " in entry


def print_skipped(rejected: list[str]) -> None:
    """Every unusable image on stderr; of the files without a partner, the first NAMED per folder
    and a count of the rest (a split named another way, testA/1_A.jpg against testB/1_B.jpg,
    would otherwise list every file twice)."""
    shown: dict = {}
    for r in rejected:
        if not is_unpaired(r):
            print(f"skipped {r}", file=sys.stderr)
            continue
        folder = str(Path(r.split(f": {UNPAIRED}: ", 1)[0]).parent)
        shown[folder] = shown.get(folder, 0) + 1
        if shown[folder] <= NAMED:
            print(f"skipped {r}", file=sys.stderr)
    for folder, n in shown.items():
        if n > NAMED:
            print(f"skipped {n - NAMED} more image(s) of {folder} with no partner of the same stem", file=sys.stderr)


if __name__ == "__main__":
    from launch.shutdown import end

    end(main())
