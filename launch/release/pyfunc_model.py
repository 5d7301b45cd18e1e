"""The translator as an MLflow pyfunc "model from code".

MLflow stores this file itself with the model (not a pickle of an object), the artifact files of
the exported translator, and in code/ the few project modules this file imports
(launch.release.registry.SHIPPED_MODULES: the export's loader, translate_uint8 and model/, with
their package paths; MLflow puts code/ on sys.path before loading). Loading runs this file and
`load_context`, which rebuilds the network from translator.json and reads translator.safetensors.
Nothing is unpickled, so it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, and nothing of
the project needs to be installed: the model's requirements.txt (torch, numpy, safetensors,
mlflow, pinned) is all it needs.

Input: a batch of uint8 HWC RGB images, shape [N, H, W, 3]. Output: the same shape, uint8.
Params: `direction` ("a2b" or "b2a", default "a2b"), `batch_size` (a positive integer, default
16), `tile` (images with a side above it are translated in overlapping tile x tile tiles,
launch.release.export.translate_tiled; 0: never; else at least 32; default export.TILE) and
`tile_overlap` (pixels shared by neighbouring tiles, 0..tile/2, default export.TILE_OVERLAP).
Images above MAX_PIXELS or with a side below the model's minimum are refused. Bad input is a
ValueError naming the image and the problem (MLflow's server answers it with a 400).

Through MLflow (`mlflow.pyfunc.load_model(...).predict`, `mlflow models serve`) the logged
signature is enforced before `predict` runs: in-process, anything but a uint8 array is refused
by MLflow itself (an MlflowException about the dtype); over REST, MLflow converts the JSON to
uint8 (values outside 0..255 and NaN: its own 400; fractions truncated, 12.5 arrives as 12), and
params the signature does not declare are dropped with a warning. `as_images`' checks of integer
and float input (whole numbers in 0..255) therefore run only for callers of the model itself
(`load_model(...).unwrap_python_model().predict(None, images)`) and for a version logged without
a signature.
Model config (`mlflow.pyfunc.load_model(uri, model_config={"device": ...})`, for a version logged
with a model_config holding "device"): `device`, auto (cuda when there is one), cpu, cuda, cuda:N.

One code version per process: the shipped packages are top-level `launch`, `pipeline` and `model`,
and Python keeps one module per name. `load_context` refuses (ImportError naming the module and
where it came from) a process where a module of those names is already loaded from anywhere but
this model's code/ with different contents: a consumer's own model.py, or another model version
whose shipped code differs (see check_runtime).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# The input schema comes from the logged signature (uint8 tensors). predict's `np.ndarray` hint is
# one MLflow infers no schema from (so the signature stays the one that validates), and it keeps
# MLflow from printing "Add type hints to the `predict` method" at every save and load.

ARTIFACT_KEY = "translator"   # artifacts={"translator": <dir with translator.json + .safetensors>}
MAX_PIXELS = 64_000_000       # per image, as translate's --max-pixels default (pipeline/ is not shipped)
# The project code this model ships (registry.log_translator's code_paths), beside this file in the
# model's folder. Absent when this file runs as launch.release.pyfunc_model of the repository, or
# from a model saved without code: then the project on sys.path is the runtime, nothing to check.
CODE_DIR = Path(__file__).resolve().parent / "code"
PACKAGES = ("launch", "pipeline", "model")   # the shipped top-level packages


class TranslatorModel(PythonModel):
    def load_context(self, context):
        check_runtime(CODE_DIR)   # before anything of the project is imported
        from launch.release.export import load_translator, min_input_side

        device = pick_device((context.model_config or {}).get("device"))
        self.gen, self.meta = load_translator(context.artifacts[ARTIFACT_KEY], device=device)
        self.min_side = min_input_side(self.meta)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):
        from launch.release.export import DIRECTIONS, target_palette, translate_tiled, translate_uint8

        params = params or {}
        direction = params.get("direction") or "a2b"
        if direction not in DIRECTIONS:
            raise ValueError(f"params.direction: expected one of {DIRECTIONS}, got {direction!r}")
        batch_size = positive_int(params, "batch_size", 16)
        tile, overlap = tile_params(params, self.min_side)
        images = as_images(model_input)
        if len(images) == 0:
            return images
        check_size(images, self.min_side)

        def fn(x, d):
            return translate_uint8(self.gen, x, d, batch_size=batch_size)  # padded to the generator's multiple

        if not tile or max(images.shape[1:3]) <= tile:
            return fn(images, direction)
        # Tiles keep the network's memory bounded, as translate does; the palette snaps the blends.
        palette = target_palette(self.meta, direction)
        return np.stack([translate_tiled(fn, im, direction, tile, overlap, palette) for im in images])


def shipped_modules(code_dir: Path) -> dict[str, Path]:
    """{module name: its file in code_dir} for each module the model ships (packages by __init__.py)."""
    out = {}
    for f in sorted(code_dir.rglob("*.py")):
        parts = f.relative_to(code_dir).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _digest(path) -> bytes | None:
    # hashlib, not pipeline.hashing.sha256_file: check_runtime runs before any project module is
    # imported, since importing `pipeline` here would load the very package it is checking
    try:
        return hashlib.sha256(Path(path).read_bytes()).digest()
    except (OSError, TypeError):
        return None


def _source(name: str) -> tuple[str | None, str]:
    """(the file module `name` comes from in this process, how to say where) without importing it:
    the loaded module's file, else (its parent package being loaded) the file the import would find
    through the parent's __path__; (None, ...) when no parent of it is loaded (then the import looks
    on sys.path, where MLflow put code/ first)."""
    mod = sys.modules.get(name)
    if mod is not None:
        f = getattr(mod, "__file__", None)
        paths = list(getattr(mod, "__path__", []) or [])
        return f, f or (f"namespace package {paths}" if paths else repr(mod))
    parent, _, _ = name.rpartition(".")
    if not parent or parent not in sys.modules:
        return None, ""
    search = list(getattr(sys.modules[parent], "__path__", []) or [])
    spec = importlib.machinery.PathFinder.find_spec(name, search) if search else None
    origin = spec.origin if spec is not None and spec.has_location else None
    return origin, origin or f"nowhere under the loaded {parent} ({search or sys.modules[parent]!r})"


def check_runtime(code_dir: Path) -> None:
    """Refuse to run with project modules that are not this model's shipped ones.

    MLflow puts the model's code/ first on sys.path, but a module already in sys.modules is not
    imported again: a consumer's own `model.py` (or launch/pipeline), or the shipped code of another
    model version loaded earlier in the process, would be what this model runs. Each shipped module
    (and the one the import would find under an already loaded parent package) is accepted when it
    comes from code_dir itself, or from a file with the same contents (sha256): byte-identical code
    runs identically, which covers the same model loaded twice, two versions shipping the same code,
    and the repository's own checkout at the code the model shipped (tests, the translate CLI).

    The one exception to identical contents: the repository itself, recognised by the loaded
    `launch` package holding release/registry.py and release/pyfunc_model.py (files that are never
    shipped, so no model's code/ and no consumer's model.py looks like it) with `pipeline` and
    `model` from the same folder. The project reads exports of its own earlier versions (its
    translate --export does), so its CLI keeps loading an older champion; it runs the repository's
    code, and a warning names the files that differ. Anything else is an ImportError naming the
    module, where it came from and what to do.
    """
    if not code_dir.is_dir():
        return
    code_dir = code_dir.resolve()
    differ = []
    for name, shipped in shipped_modules(code_dir).items():
        where, said = _source(name)
        if where is None and not said:
            continue   # not loaded, nor any parent: imported from code/, first on sys.path
        if where is not None and Path(where).resolve().is_relative_to(code_dir):
            continue
        if where is not None and _digest(where) == _digest(shipped):
            continue
        differ.append((name, said, shipped))
    if not differ:
        return
    if _is_repository():
        warnings.warn("this translator runs the project's code loaded in this process (the repository at "
                      f"{Path(sys.modules['launch'].__file__).parents[1]}), which differs from the code the "
                      f"model ships in {code_dir}: {', '.join(d[0] for d in differ)}", stacklevel=2)
        return
    name, said, shipped = differ[0]
    raise ImportError(
        f"cannot load this translator: module {name!r} in this process comes from {said}, not from the "
        f"model's own code ({shipped}), and differs from it. The model's code "
        f"is the top-level packages {', '.join(PACKAGES)}, one version per process: load the model in a "
        "process with no other top-level modules of those names (rename the application's own), and each "
        "model version whose code differs in its own process (a subprocess, or `mlflow models serve`)"
        + (f"; also differing: {', '.join(d[0] for d in differ[1:])}" if len(differ) > 1 else ""),
        name=name)


def _is_repository() -> bool:
    """Whether the loaded launch, pipeline and model packages are the project's repository (see check_runtime)."""
    files = [getattr(sys.modules.get(p), "__file__", None) for p in PACKAGES]
    if files[0] is None:
        return False
    root = Path(files[0]).resolve().parents[1]
    if not all((root / "launch" / "release" / f).is_file() for f in ("registry.py", "pyfunc_model.py")):
        return False
    return all(f is None or Path(f).resolve() == root / p / "__init__.py" for p, f in zip(PACKAGES, files))


def pick_device(spec: str | None) -> str:
    """The device model_config names (None or auto: cuda when there is one, else cpu)."""
    import torch

    from launch.release.export import check_device

    if not spec or spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return check_device(spec)
    except ValueError as e:
        raise ValueError(f"model_config {e}") from None


def positive_int(params: dict, name: str, default: int, minimum: int = 1) -> int:
    """params[name] (default when absent): an integer >= minimum, else a ValueError naming it."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"params.{name}: expected {what}, got {value!r}")
    return int(value)


def tile_params(params: dict, min_side: int = 32) -> tuple[int, int]:
    """(tile, tile_overlap) of the request, as translate's --tile and --tile-overlap: tile 0 (never
    tile) or at least max(32, min_side) (each tile goes through the network, so a tile below the
    model's minimum side would fail inside it), the overlap within [0, tile/2]; ValueError naming
    the param otherwise."""
    from launch.release.export import TILE, TILE_OVERLAP

    tile = positive_int(params, "tile", TILE, minimum=0)
    overlap = positive_int(params, "tile_overlap", TILE_OVERLAP, minimum=0)
    least = max(32, min_side)
    if tile and tile < least:
        why = "" if least == 32 else f" (this model's minimum image side is {min_side})"
        raise ValueError(f"params.tile: expected 0 (never tile) or at least {least}{why}, got {tile}")
    if tile and overlap > tile // 2:
        raise ValueError(f"params.tile_overlap: expected 0..{tile // 2} (half the tile), got {overlap}")
    return tile, overlap


def as_images(model_input) -> np.ndarray:
    """The request as uint8 [N, H, W, 3]; ValueError naming the first image whose values are no pixels.
    Through MLflow the signature has made it uint8 already (see the module's docstring): the integer
    and float checks are for callers of the unwrapped model."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor input
        model_input = next(iter(model_input.values()))
    images = np.asarray(model_input)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"input: expected uint8 images [N, H, W, 3], got shape {list(images.shape)}")
    if images.dtype == np.uint8 or len(images) == 0:
        return images.astype(np.uint8, copy=False)
    if images.dtype.kind not in "iuf":
        raise ValueError(f"input: expected pixel values (uint8, or whole numbers in 0..255), got dtype {images.dtype}")
    # JSON requests arrive as integers (or floats): take them when each value is a pixel value, as
    # a cast would silently turn NaN into 0 and 12.5 into 12.
    flat = images.reshape(len(images), -1)
    for problem, bad in (("not finite (NaN or infinity)", lambda v: ~np.isfinite(v)),
                         ("outside 0..255", lambda v: (v < 0) | (v > 255)),
                         ("not whole numbers", lambda v: v != np.round(v))):
        rows = np.flatnonzero(bad(flat).any(1))
        if rows.size:
            raise ValueError(f"input image {rows[0]}: pixel values {problem}")
    return images.astype(np.uint8)


def check_size(images: np.ndarray, min_side: int) -> None:
    """ValueError when the images (one shape per request) are too small for the network or above MAX_PIXELS."""
    n, h, w = images.shape[:3]
    which = "input image 0" if n == 1 else f"input images 0..{n - 1}"
    if min(h, w) < min_side:
        raise ValueError(f"{which}: {h}x{w} is too small: the model needs at least {min_side}x{min_side} pixels")
    if h * w > MAX_PIXELS:
        raise ValueError(f"{which}: {h}x{w} = {h * w} pixels is above the limit of {MAX_PIXELS} per image")


mlflow.models.set_model(TranslatorModel())
