"""Image validation and conversion for `make shards`.

Every input is fully decoded once. Valid 8-bit RGB JPEG/PNG/WebP files without an EXIF
rotation are stored with their original bytes; every other accepted image (grayscale,
palette, alpha, CMYK, 16-bit, BMP, TIFF, EXIF orientation 2-8, ...) is converted once to
upright 8-bit RGB and re-encoded, carrying no orientation tag:

- JPEG sources -> JPEG, quality 95, 4:4:4 chroma (no second round of chroma subsampling);
- everything else -> PNG (lossless, compress_level 3);
- transparent pixels are composited over white before dropping alpha.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"}  # MPO: multi-picture JPEG (phones)
KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
ORIENTATION = 0x0112  # EXIF tag: how the stored pixels must be turned to display upright
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 3
MIN_SIDE = 16  # default of `make shards --min-side`
MAX_PIXELS = 64_000_000  # default of `make shards --max-pixels`, and of the loader's decode cap


class Rejected(Exception):
    """An input that cannot be stored; `reason` starts with its category (text before ':')."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Checked:
    """A validated image ready to store."""

    data: bytes  # the bytes to store (the original when `converted` is False)
    ext: str  # jpg | png | webp
    width: int
    height: int
    converted: bool

    @property
    def format(self) -> str:
        return {"jpg": "jpeg"}.get(self.ext, self.ext)


def reason_category(reason: str) -> str:
    """'truncated', 'not an image', 'duplicate', ... (for summaries)."""
    return "duplicate" if reason.startswith("duplicate of ") else reason.split(":", 1)[0]


def _open(data: bytes, max_pixels: int) -> Image.Image:
    # PIL's own bomb guard (MAX_IMAGE_PIXELS) is global; switch it off while opening and
    # apply --max-pixels ourselves, before any pixel is decoded.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise Rejected("not an image: no known image format in the content") from None
    except Exception as e:  # noqa: BLE001 - any parser error means the header is unreadable
        raise Rejected(f"unreadable: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if im.format not in ACCEPTED_FORMATS:
        raise Rejected(f"not an image: format {im.format} is not accepted (JPEG, PNG, WebP, BMP, TIFF)")
    w, h = im.size
    if w * h > max_pixels:
        raise Rejected(f"larger than --max-pixels (decompression bomb): {w}x{h} > {max_pixels} pixels")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit samples keep their top 8 bits, alpha (or a colour key) is
    composited over white. Shared with every reader of images the model sees (pipeline.imageio,
    the corpus translator), so a file reads the same in training, translation and evaluation."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im)
        # 16-bit data: keep the top 8 bits; 32-bit "I" images are usually 16-bit in disguise.
        shift = 8 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 0
        im = Image.fromarray((arr.astype(np.uint32) >> shift).clip(0, 255).astype(np.uint8), "L")
    elif mode == "F":
        im = Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im.convert("RGBA"), mask=im.getchannel("A"))
        return bg
    if im.mode in ("L", "1", "RGB") and "transparency" in im.info:  # a tRNS colour key
        return to_rgb(im.convert("RGBA"))
    return im.convert("RGB") if im.mode != "RGB" else im


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = upright; unknown values count as 1)."""
    try:
        value = im.getexif().get(ORIENTATION, 1)
        return value if value in _UPRIGHT else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to reject the pixels
        return 1


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC


def _png_bit_depth(data: bytes) -> int:
    """Bits per sample from a PNG's IHDR (PIL decodes 16-bit RGB as mode "RGB" and hides it)."""
    return data[24] if data[12:16] == b"IHDR" and len(data) > 24 else 8


def _keep_original(im: Image.Image, data: bytes) -> bool:
    """Whether the original bytes can be stored: 8-bit RGB JPEG/PNG/WebP, one frame, no
    transparency and no EXIF rotation (anything else is converted)."""
    if im.format not in KEEP_AS_IS or im.mode != "RGB" or getattr(im, "is_animated", False):
        return False
    if "transparency" in im.info or _orientation(im) != 1:
        return False
    # A PNG cut after its pixels but before its IEND chunk decodes whole, yet the file is not a
    # valid PNG (other readers refuse it): store the decoded pixels re-encoded instead.
    return im.format != "PNG" or (_png_bit_depth(data) == 8 and data.endswith(PNG_END))


def check_image(data: bytes, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> Checked:
    """Validate `data` by a full decode; return what to store or raise `Rejected`."""
    if not data:
        raise Rejected("not an image: empty file")
    im = _open(data, max_pixels)
    w, h = im.size
    if min(w, h) < min_side:
        raise Rejected(f"smaller than --min-side {min_side}: {w}x{h}")
    fmt = "JPEG" if im.format == "MPO" else im.format
    keep = _keep_original(im, data)
    if keep and fmt == "JPEG":
        # Still a full decode (entropy decoding, IDCT and upsampling of every block), minus
        # the YCbCr->RGB conversion: the original bytes are stored, not these pixels (~1.4x faster).
        im.draft("YCbCr", im.size)
    try:
        im.load()  # the full decode; truncated data raises here
    except OSError as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg or "premature" in msg.lower():
            raise Rejected(f"truncated: {msg}") from None
        raise Rejected(f"unreadable: {msg}") from None
    except Exception as e:  # noqa: BLE001 - decoder errors of any kind reject the input
        raise Rejected(f"unreadable: {type(e).__name__}: {e}") from None
    if keep and _orientation(im) == 1:  # a PNG's eXIf chunk may follow the pixels: check again
        return Checked(data, KEEP_AS_IS[fmt], w, h, converted=False)
    rgb = to_rgb(im)
    turn = _UPRIGHT.get(_orientation(im))
    if turn is not None:  # stored upright; the re-encoded file carries no EXIF, so no tag
        rgb = rgb.transpose(turn)
    buf = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        ext = "jpg"
    else:
        rgb.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        ext = "png"
    return Checked(buf.getvalue(), ext, rgb.width, rgb.height, converted=True)
