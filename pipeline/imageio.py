"""Reading image files that nobody vetted: a pixel cap checked before decoding, EXIF orientation,
and one clear reason per refused file.

    from pipeline.imageio import ImageRejected, NotAnImage, read_rgb
    try:
        arr = read_rgb(path, max_pixels=64_000_000, min_side=5)   # uint8 [H, W, 3], upright
    except NotAnImage:        # no image format recognised and no image suffix (a README): ignore it
        ...
    except ImageRejected as e:  # an image that cannot be used; str(e) == f"{path}: {e.reason}"
        ...

The cap is checked on the header's width and height, so a 100000 x 100000 PNG of a few KB is
refused without allocating its pixels. Width and height are reported after EXIF orientation
(a portrait photo stored sideways is H x W as a viewer shows it).

`to_tensor`/`to_uint8` (uint8 images <-> the network's [-1, 1] tensors) live in pipeline/tensors.py,
which needs no PIL (the registered model ships it).
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from pipeline.images import MAX_PIXELS as DEFAULT_MAX_PIXELS  # the shards' cap: 8000 x 8000, ~192 MB as RGB


class ImageRejected(ValueError):
    """An image file that cannot be used; `reason` says why, str() is "PATH: reason"."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class NotAnImage(ImageRejected):
    """No image format recognised and the name has no image suffix (e.g. a README next to images)."""


def image_suffixes() -> set[str]:
    from PIL import Image

    return set(Image.registered_extensions())


# PIL's bomb guard is one global (Image.MAX_IMAGE_PIXELS): blocks in several threads switch it off
# together and the last one out puts it back, so no block restores it under another one.
_PIL_LIMIT = {"users": 0, "saved": None}
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def pil_limit_off():
    """PIL's own decompression-bomb guard off for the block (no DecompressionBombWarning, no
    DecompressionBombError at 2 x 89M pixels, at open or at a TIFF's load): the caller's cap
    (check_size on the header, before decoding: --max-pixels, 0 for none) is the one that holds,
    as in make shards (pipeline.images)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        if _PIL_LIMIT["users"] == 0:
            _PIL_LIMIT["saved"] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _PIL_LIMIT["users"] += 1
    try:
        yield
    finally:
        with _PIL_LIMIT_LOCK:
            _PIL_LIMIT["users"] -= 1
            if _PIL_LIMIT["users"] == 0:
                Image.MAX_IMAGE_PIXELS = _PIL_LIMIT["saved"]


def _open(path):
    """PIL image with only the header read; raises NotAnImage / ImageRejected. PIL's bomb guard is
    off while the header is read (pil_limit_off): the callers check their own cap."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with pil_limit_off():
            return Image.open(path)
    except UnidentifiedImageError:
        if path.suffix.lower() in image_suffixes():
            raise ImageRejected(path, f"not a readable image (the name says {path.suffix}, "
                                      "the content is no image format PIL knows, or is damaged)") from None
        raise NotAnImage(path, "not an image") from None
    except OSError as e:  # with an errno: the file system's refusal; without: PIL's, on the content
        raise ImageRejected(path, f"cannot open: {e.strerror}" if e.errno else f"damaged or truncated ({e})") from None


def _oriented_size(im) -> tuple[int, int]:
    """(width, height) as a viewer shows it: EXIF orientations 5-8 swap the two."""
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: exif_transpose will ignore it too
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def check_size(path, width: int, height: int, *, max_pixels: int | None, min_side: int = 1) -> None:
    """Raise ImageRejected when width x height is above the cap or a side below `min_side`."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageRejected(path, f"{width}x{height} = {width * height} pixels is above the limit of "
                                  f"{max_pixels} (raise --max-pixels to allow it)")
    if min(width, height) < min_side:
        raise ImageRejected(path, f"{width}x{height} is too small: the model needs at least "
                                  f"{min_side}x{min_side} pixels")


def upright_rgb(im):
    """A decoded-on-demand PIL image as upright 8-bit RGB: EXIF orientation applied, then
    pipeline.images.to_rgb, make shards' own conversion (16-bit keeps its top 8 bits, transparency
    is composited over white), so a consumer sees the pixels training saw. Decodes the pixels."""
    from PIL import ImageOps

    from pipeline.images import to_rgb

    return to_rgb(ImageOps.exif_transpose(im))


def read_rgb(path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 1,
             size: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] RGB, upright (EXIF orientation applied). With `size`, the shortest side is
    resized to it (bicubic) and the centre cropped to size x size, as the loader does without
    augmentation; the size checks apply to the file's own size, before resizing.

    Raises NotAnImage (no image format, no image suffix), or ImageRejected naming the file and the
    reason: unreadable, damaged or truncated, above `max_pixels` (checked on the header, before
    decoding), or a side below `min_side`. Both are ValueErrors.
    """
    from PIL import Image, ImageOps

    with pil_limit_off():  # the cap below replaces PIL's (a TIFF checks PIL's again when it decodes)
        with _open(path) as src:
            check_size(path, *_oriented_size(src), max_pixels=max_pixels, min_side=min_side)
            try:
                im = upright_rgb(src)  # decodes the pixels
                if size and im.size != (size, size):
                    im = ImageOps.fit(im, (size, size), method=Image.BICUBIC)  # no squashing
                return np.asarray(im, dtype=np.uint8).copy()
            except MemoryError:
                raise ImageRejected(path, "out of memory while decoding") from None
            except Exception as e:  # truncated data, broken chunks, bad EXIF, odd modes: all the file's fault
                raise ImageRejected(path, f"damaged or truncated ({type(e).__name__}: {e})") from None


def is_image_file(path) -> bool:
    """True when the file could be an image: PIL recognises its header, or its suffix is an image
    suffix (then read_rgb says what is wrong with it). Reads only the header."""
    try:
        _open(path).close()
    except NotAnImage:
        return False
    except ImageRejected:
        return True
    return True


def image_files(dir) -> list[Path]:
    """Image files in `dir` (not recursive), sorted; recognised by their header, not their name."""
    root = Path(dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    return [p for p in sorted(root.iterdir())
            if p.is_file() and not p.name.startswith(".") and is_image_file(p)]


def load_folder(dir, size: int | None = None, rejected: list | None = None,
                min_side: int = 1) -> tuple[list[str], np.ndarray]:
    """(stems, uint8 [N, H, W, 3]) of the images in `dir`; all must share one size unless `size`.

    Files that cannot be used (damaged, over the pixel cap, a side under `min_side`) are left out
    and appended to `rejected` as "PATH: reason"; without a list they raise.
    """
    stems, imgs = [], []
    for p in image_files(dir):
        try:
            imgs.append(read_rgb(p, size=size, min_side=min_side if not size else 1))
        except ImageRejected as e:
            if rejected is None:
                raise
            rejected.append(str(e))
            continue
        stems.append(p.stem)
    if not imgs:
        raise ValueError(f"{dir}: no usable images found")
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise ValueError(f"{dir}: several images share a stem ({dup}); pairing by stem is ambiguous")
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise ValueError(f"{dir}: images of different sizes {sorted(shapes)[:3]}; pass --size N to resize")
    return stems, np.stack(imgs)
