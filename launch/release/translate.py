"""Translate a folder of images, or a corpus of WebDataset shards, with a registered or exported translator.

    python -m launch.release.translate --model models:/unit-translator@champion | EXPORT_DIR \\
        --direction a2b --in IN --out OUT [--batch-size N] [--ext jpg|png|webp] [--size N]
        [--tracking-uri URI] [--max-pixels N] [--tile N] [--tile-overlap N] [--window-mb N] [--report FILE]
        [--no-progress]

--in is a folder of images (folder mode), or shards (corpus mode, launch/release/corpus.py): a
`make shards` OUT folder or its index.json (the source domain's shards: a for a2b, b for b2a), a
brace pattern, or one or more tar URLs. Corpus mode runs on any number of ranks
(`torchrun --nproc_per_node N -m launch.release.translate ...`, `deepspeed --num_gpus N --module
launch.release.translate ...`) and resumes after a kill.

Folder mode walks --in recursively and keeps relative paths and file names (a .jpg stays a .jpg,
written at quality 95, unless --ext names another format) where PIL writes the input's format at
full size and exactly (KEPT_SUFFIXES); any other image is written as PNG with .png appended
(a.gif -> a.gif.png). An output name that two inputs would share is skipped and named. Images
are read one at a time and translated in batches of one shape gathered within a window of at
most WINDOW x --batch-size images and at most --window-mb MiB of decoded pixels (default 512; an
image larger than that alone is a window of one): a window holding several shapes is flushed as
partial batches, so memory stays bounded whatever the folder holds, large photos included (about
twice the window while its translations are written, plus the image being decoded). --size N
resizes the shortest side to N and centre-crops N x N first.

Input is untrusted: files that are no image at all are listed and left alone; images that
cannot be used (damaged, above --max-pixels, smaller than the model's minimum side, failing in
the model) are skipped with one line each naming the file and the reason, the others are still
written, and the exit status is 3. EXIF orientation is applied, so outputs are upright. Images
with a side above --tile are translated in overlapping tiles, so memory stays bounded (snapped
back to the palette where the target domain's decoder paints from one).
A --model that does not exist (export dir, registered model, alias, version) or a tracking store
that is unset or unreachable is one line naming what was asked and what exists, exit status 2,
and nothing is created in the working directory.
--out must be a local folder (a file or a URL is refused: URLs are for shards), and --report is
checked before anything is translated (not a folder, not inside --in, not an image name in --out).
Exit status: 0 all images translated, 1 translated but --report could not be written, 2 nothing
done (bad arguments, model), 3 some skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.atomic import replacing, write_json
from pipeline.imageio import DEFAULT_MAX_PIXELS, ImageRejected, is_image_file, read_rgb
from pipeline.storage import redact_uncaught

EXIT_SKIPPED = 3
EXIT_REPORT = 1  # the images are translated but --report could not be written
EXTS = ("jpg", "png", "webp")  # what --ext may name (the formats a shard may hold)
WINDOW = 4  # images held for grouping by shape: WINDOW x --batch-size at most
WINDOW_MB = 512  # and at most this many MiB of decoded pixels (--window-mb): 8000 x 8000 photos are 192 MB each
QUALITY = 95  # JPEG and WebP outputs


@dataclass
class Limits:
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    """Images with more pixels are refused before decoding; None: no cap."""
    min_side: int = 1
    """Images with a shorter side are refused (the model's minimum, launch.release.export.min_input_side)."""
    tile: int = 1024
    """Images with a side above this are translated in tiles of tile x tile; 0: never tile."""
    overlap: int = 64
    """Pixels shared by neighbouring tiles, blended."""
    palette: list | None = None
    """The target domain's colours when its decoder paints from a palette (launch.release.export.
    target_palette): tiled translations are snapped back to them, as blending mixes colours."""


@dataclass
class Outcome:
    translated: int = 0
    tiled: int = 0
    not_images: list = field(default_factory=list)
    rejected: list = field(default_factory=list)   # {"path", "reason"}

    def reject(self, path, reason: str, warn: bool = True) -> None:
        self.rejected.append({"path": str(path), "reason": reason})
        if warn:
            print(f"skipped {path}: {reason}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Translating a window of images (both modes)


def failure(e: BaseException) -> str:
    return f"translation failed ({type(e).__name__}: {str(e)[:200]})"


def windows(items, nbytes, batch_size: int, window_bytes: int | None):
    """Consecutive `items` in lists of at most WINDOW x batch_size and at most `window_bytes` of
    nbytes(item) (None: no byte bound; an item larger than that alone is a window of one), in order;
    the next item is drawn only after the caller is done with a window."""
    window, held = [], 0
    for item in items:
        n = nbytes(item)
        if window and window_bytes is not None and held + n > window_bytes:
            yield window
            window, held = [], 0
        window.append(item)
        held += n
        if len(window) >= WINDOW * batch_size or (window_bytes is not None and held >= window_bytes):
            yield window
            window, held = [], 0
    if window:
        yield window


def translate_window(fn, direction: str, images: list[np.ndarray], batch_size: int,
                     limits: Limits | None = None) -> list:
    """Translate uint8 [H, W, 3] images: same-shaped ones together in batches of at most
    `batch_size`, those with a side above limits.tile in tiles. Returns, in input order, each
    image's translation or, when it failed, the exception. A failing batch is retried image by
    image, so one bad image costs only itself."""
    from launch.release.export import translate_tiled

    limits = limits or Limits()
    out: list = [None] * len(images)
    by_shape = defaultdict(list)
    for i, arr in enumerate(images):
        if limits.tile and max(arr.shape[:2]) > limits.tile:
            try:
                out[i] = translate_tiled(fn, arr, direction, limits.tile, limits.overlap, limits.palette)
            except Exception as e:  # the model's failure on this image only
                out[i] = e
        else:
            by_shape[arr.shape].append(i)
    for idx in by_shape.values():
        for s in range(0, len(idx), batch_size):
            _run_batch(fn, direction, images, idx[s:s + batch_size], out)
    return out


def _run_batch(fn, direction: str, images: list, idx: list[int], out: list) -> None:
    try:
        ys = fn(np.stack([images[i] for i in idx]), direction)
    except Exception as e:
        if len(idx) > 1:
            for i in idx:
                _run_batch(fn, direction, images, [i], out)
        else:
            out[idx[0]] = e
        return
    for i, y in zip(idx, ys):
        out[i] = np.asarray(y, dtype=np.uint8)


def encode_image(arr: np.ndarray, fmt: str) -> bytes:
    """uint8 [H, W, 3] as the bytes of a file in PIL format `fmt` (JPEG and WebP at quality 95)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    kw = {"quality": QUALITY} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Folder mode


def find_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(candidate images, files that are no image) under root; hidden files and folders are left out.
    Reads headers only: damaged images are found (and reported) when they are decoded."""
    images, others = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        (images if is_image_file(p) else others).append(p)
    return images, others


# Input suffixes a translation keeps: PIL writes these formats at any size and exactly (JPEG and
# WebP at quality 95, as --ext does). Not GIF (cut to 256 colours), ICO (to 256 x 256), PBM/PGM
# (PIL would write colour into them), nor what PIL reads but cannot write (PSD, XPM, Sun raster...).
KEPT_SUFFIXES = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".webp": "WEBP",
                 ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".tga": "TGA"}


def output_name(rel: Path, ext: str | None) -> Path:
    """Where the translation of input `rel` goes: with `ext`, its suffix replaced; else `rel` when
    its suffix is kept, else `rel` with .png appended (appended, not replacing the suffix, so that
    x.gif and an x.png beside it keep apart)."""
    if ext:
        return rel.with_suffix(f".{ext}")
    return rel if rel.suffix.lower() in KEPT_SUFFIXES else rel.with_name(rel.name + ".png")


def save_image(arr: np.ndarray, path: Path) -> None:
    """Written atomically, in the format its suffix names (output_name's: else PNG)."""
    with replacing(path, durable=False) as tmp:
        tmp.write_bytes(encode_image(arr, KEPT_SUFFIXES.get(path.suffix.lower(), "PNG")))


def check_folders(in_dir, out_dir) -> None:
    """--out inside --in would be translated again by the next run (and --in inside --out can
    be overwritten): refuse both, on resolved paths (symlinks followed). Refuse an --out that is a
    URL (folder mode writes a local folder; shards go to a URL) or an existing file."""
    if storage.is_url(os.fspath(out_dir)):  # before Path(), which would make s3://b/x the local s3:/b/x
        raise ValueError(f"--out {out_dir}: folder mode writes to a local folder, not a URL (a URL --out "
                         "takes shards: translate a make shards OUT, its index.json or tar URLs)")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"--in {in_dir}: not a directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a folder; name a folder (new or existing)")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src:
        raise ValueError(f"--out {out_dir}: must differ from --in (it would overwrite the inputs)")
    if dst.is_relative_to(src):
        raise ValueError(f"--out {out_dir} is inside --in {in_dir}: a later run would translate its own "
                         "outputs; choose an output folder outside the input folder")
    if src.is_relative_to(dst):
        raise ValueError(f"--in {in_dir} is inside --out {out_dir}: outputs could overwrite inputs; "
                         "choose an output folder that does not contain the input folder")


# Suffixes an output image may have (output_name: a kept suffix, .png appended, or --ext's).
OUTPUT_SUFFIXES = set(KEPT_SUFFIXES) | {f".{e}" for e in EXTS}


def check_report(report, in_dir, out_dir) -> None:
    """Refuse a --report path before anything is translated: an existing folder, a path inside --in
    (it would overwrite an input, or be read as one by the next run), or inside --out with an
    image suffix (an output image could be written there, or the report over it)."""
    if report is None:
        return
    if storage.is_url(os.fspath(report)):
        raise ValueError(f"--report {report}: write the report to a local file, not a URL")
    path = Path(report)
    if path.is_dir():
        raise ValueError(f"--report {report}: is a folder; name a file, e.g. {path / 'report.json'}")
    where = path.resolve()
    if Path(out_dir).resolve().is_relative_to(where):  # a file there would stop --out's folder being made
        raise ValueError(f"--report {report}: --out {out_dir} is (inside) it; name a file beside the outputs")
    if where.is_relative_to(Path(in_dir).resolve()):
        raise ValueError(f"--report {report} is inside --in {in_dir}: it could overwrite an input and the next "
                         "run would read it; write it outside the input folder")
    if where.is_relative_to(Path(out_dir).resolve()) and where.suffix.lower() in OUTPUT_SUFFIXES:
        raise ValueError(f"--report {report} is inside --out {out_dir} with an image suffix: it could overwrite "
                         "or be overwritten by an output image; name it .json")


@dataclass
class _Folder:
    """One folder run: where outputs go and what happened so far."""

    fn: object
    direction: str
    in_dir: Path
    out_dir: Path
    batch_size: int
    limits: Limits
    ext: str | None
    res: Outcome
    bar: object
    names: dict = field(default_factory=dict)  # output path -> input (--ext, or .png appended: names may collide)

    def target(self, p: Path) -> Path:
        return self.out_dir / output_name(p.relative_to(self.in_dir), self.ext)

    def flush(self, pending: list[tuple[Path, np.ndarray]]) -> None:
        outs = translate_window(self.fn, self.direction, [a for _, a in pending], self.batch_size, self.limits)
        for (p, arr), y in zip(pending, outs):
            if isinstance(y, Exception):
                self.res.reject(p, failure(y))
            else:
                self.write(y, p, tiled=bool(self.limits.tile) and max(arr.shape[:2]) > self.limits.tile)
            self.bar.update(1)
        pending.clear()

    def write(self, y: np.ndarray, p: Path, tiled: bool) -> None:
        dst = self.target(p)
        first = self.names.setdefault(dst, p)
        if first != p:
            self.res.reject(p, f"its output {dst} is already written from {first} "
                               + (f"(same name with --ext {self.ext})" if self.ext else "(same name)"))
            return
        try:
            save_image(y, dst)
            self.res.translated += 1
            self.res.tiled += tiled
        except Exception as e:  # the disk's refusal, or PIL's on this image: it costs only this image
            why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {str(e)[:200]}"
            self.res.reject(p, f"cannot write the output {dst} ({why})")


def translate_folder(model, direction: str, in_dir, out_dir, batch_size: int = 16, progress: bool = True,
                     limits: Limits | None = None, ext: str | None = None, size: int | None = None,
                     window_bytes: int | None = WINDOW_MB << 20) -> dict:
    """Translate every image under in_dir into out_dir; returns counts, what was skipped and why, time.

    `model`: a generator module, a pyfunc model, or fn(uint8 NHWC, direction) -> uint8 NHWC.
    `ext`: the output format (jpg, png, webp; None: each input's own where it holds the translation,
    else PNG: output_name). `size`: resize the shortest side to `size` and centre-crop first. A
    window of at most WINDOW x batch_size decoded images and at most `window_bytes` of them (None:
    no byte bound; one image larger than that alone is a window of one) is held for batching, then
    translated and written in input order. `limits.palette` is the caller's to set (load does, from
    the model's translator.json).
    """
    from tqdm import tqdm

    from launch.release.evaluate import as_translate_fn

    limits = limits or Limits()
    check_folders(in_dir, out_dir)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    images, others = find_images(in_dir)
    res = Outcome(not_images=[str(p) for p in others])
    t0 = time.perf_counter()
    bar = tqdm(total=len(images), unit="img", desc=f"translate {direction}", disable=not progress)
    run = _Folder(as_translate_fn(model), direction, in_dir, out_dir, batch_size, limits, ext, res, bar)

    def decoded():
        for p in images:
            try:
                yield p, read_rgb(p, max_pixels=limits.max_pixels, size=size, min_side=1 if size else limits.min_side)
            except ImageRejected as e:  # NotAnImage included: is_image_file said it looked like one
                res.reject(p, e.reason)
                bar.update(1)

    for window in windows(decoded(), lambda item: item[1].nbytes, batch_size, window_bytes):
        run.flush(window)
    bar.close()
    return {"translated": res.translated, "tiled": res.tiled, "skipped": res.not_images,
            "rejected": res.rejected, "seconds": time.perf_counter() - t0, "out": str(out_dir)}


def model_meta(model, info: dict) -> dict | None:
    """translator.json of an export directory or of a registered pyfunc model (None if unknown)."""
    if info.get("meta"):
        return info["meta"]
    try:
        return getattr(model.unwrap_python_model(), "meta", None)
    except Exception:  # not a pyfunc model, or not ours
        return None


def write_report(path: Path, res: dict) -> None:
    """The run's counts and skipped files as JSON; ValueError (one line naming it) when it cannot
    be written. check_report refuses the paths known to be wrong before the run."""
    try:
        write_json(path, {k: res[k] for k in ("translated", "tiled", "rejected", "skipped", "out")})
    except OSError as e:
        raise ValueError(f"--report {path}: cannot write it ({e.strerror or type(e).__name__}); "
                         f"the {res['translated']} translation(s) in {res['out']} are written") from None


def summary(res: dict, direction: str, model: str) -> str:
    """One line saying what was translated; paths that are not UTF-8 shown escaped (printable)."""
    from launch.release.evaluate import printable

    rate = res["translated"] / res["seconds"] if res["seconds"] > 0 else 0.0
    rej = res["rejected"]
    return printable(
        f"Translated {res['translated']} image(s) {direction} with {model} in {res['seconds']:.1f} s "
        f"({rate:.1f} img/s) into {res['out']}, file names kept"
        + (f", {res['tiled']} of them in tiles" if res["tiled"] else "") + "; "
        + f"{len(res['skipped'])} file(s) skipped as not images"
        + (f" (first: {res['skipped'][0]})" if res["skipped"] else "") + "; "
        + f"{len(rej)} image(s) skipped as unusable"
        + (f" (first: {rej[0]['path']}: {rej[0]['reason']})" if rej else "") + ".")


# ---------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.release.translate",
                                description="Translate a folder of images, or WebDataset shards (a make shards OUT, "
                                            "its index.json, a brace pattern or tar URLs) into shards.")
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or an export dir")
    p.add_argument("--direction", required=True, choices=["a2b", "b2a"])
    p.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="IN",
                   help="a folder of images, or shards: a make shards OUT, an index.json, a brace pattern, tar URLs")
    p.add_argument("--out", dest="out_dir", required=True, help="must not be inside --in (nor contain it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ext", choices=EXTS, default=None,
                   help="output format (default: shards: the target domain's format in the input's manifest, "
                        "else each source image's own)")
    p.add_argument("--size", type=int, default=None,
                   help="resize the shortest side to N and centre-crop N x N before translating")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels, checked before decoding (default {DEFAULT_MAX_PIXELS}); 0: no cap")
    p.add_argument("--tile", type=int, default=Limits.tile,
                   help=f"translate images with a side above N in overlapping N x N tiles (default {Limits.tile}); 0: never")
    p.add_argument("--tile-overlap", type=int, default=Limits.overlap,
                   help=f"pixels shared by neighbouring tiles (default {Limits.overlap})")
    p.add_argument("--window-mb", type=int, default=WINDOW_MB,
                   help="folder mode: MiB of decoded images held at once for batching by shape, besides at most "
                        f"{WINDOW} x --batch-size images (default {WINDOW_MB}; an image larger than that is "
                        "translated alone; memory peaks at about twice this while a window's translations are "
                        "written); 0: no byte bound")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU, else cpu), cpu, cuda:N")
    p.add_argument("--report", default=None, help="folder mode: write what was translated and skipped as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    a = p.parse_args(argv)
    _check_args(p, a)
    return a


def _check_args(p: argparse.ArgumentParser, a) -> None:
    if a.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if a.max_pixels < 0:
        p.error("--max-pixels must be >= 0")
    if a.size is not None and a.size < 1:
        p.error("--size must be >= 1")
    if a.window_mb < 0:
        p.error("--window-mb must be >= 0")
    if a.tile and a.tile < 32:
        p.error("--tile must be 0 (never tile) or >= 32")
    if a.tile and not 0 <= a.tile_overlap <= a.tile // 2:
        p.error(f"--tile-overlap must be in [0, --tile/2] = [0, {a.tile // 2}]")


def device_for(spec: str) -> str:
    """The device to translate on; on CPU, ranks started side by side share the cores (unless
    OMP_NUM_THREADS says otherwise) instead of each taking all of them."""
    import torch

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if local_ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if spec != "auto":
        from launch.release.export import check_device

        try:
            return check_device(spec)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    if not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    torch.cuda.set_device(local)  # a pyfunc model loads onto "cuda": this rank's GPU
    return f"cuda:{local}"


def load(a):
    """(translate fn, meta, info, limits) for the arguments; ModelNotFound/ValueError when unusable."""
    from launch.release.evaluate import as_translate_fn, load_model
    from launch.release.export import min_input_side, target_palette

    model, info = load_model(a.model, a.tracking_uri, device=device_for(a.device))
    meta = model_meta(model, info)
    # The network itself (an export's, or the one inside our registered model) in batches of
    # --batch-size: tiling is translate_window's (--tile, --tile-overlap), so an export and its
    # registered version translate alike.
    fn = as_translate_fn(model, batch_size=a.batch_size)
    min_side = min_input_side(meta) if meta else 1
    if a.size is not None and a.size < min_side:
        raise ValueError(f"--size {a.size}: the model needs at least {min_side} pixels per side")
    limits = Limits(max_pixels=a.max_pixels or None, min_side=min_side, tile=a.tile, overlap=a.tile_overlap,
                    palette=target_palette(meta, a.direction) if meta else None)
    return fn, meta, info, limits


def main(argv=None) -> int:
    redact_uncaught()  # an error no branch below expects must not print a password either
    a = parse_args(argv)
    from launch.release import corpus
    from launch.release.evaluate import quick_http_failures

    quick_http_failures()
    try:
        if corpus.is_corpus(a.inputs):
            return corpus.main(a)
        if len(a.inputs) != 1:
            raise ValueError(f"--in: one folder, or shards (an OUT folder, an index.json, tar URLs); got {a.inputs}")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError("folder mode runs on one rank; write shards (make shards) to translate on several")
        check_folders(a.inputs[0], a.out_dir)  # before loading the model: fail fast
        check_report(a.report, a.inputs[0], a.out_dir)
        fn, _, _, limits = load(a)
        res = translate_folder(fn, a.direction, a.inputs[0], a.out_dir, a.batch_size, progress=not a.no_progress,
                               limits=limits, ext=a.ext, size=a.size, window_bytes=(a.window_mb << 20) or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(res, a.direction, a.model))
    if a.report:
        try:
            write_report(Path(a.report), res)
        except ValueError as e:  # the translations are written; only the report is missing
            print(f"error: {e}", file=sys.stderr)
            return EXIT_REPORT
    return EXIT_SKIPPED if res["rejected"] else 0


if __name__ == "__main__":
    from launch.shutdown import end

    end(main())
