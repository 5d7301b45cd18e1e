"""Decoding and augmentation of one image: reduced-size JPEG decoding plus an albumentations
pipeline (resize the shortest side, random or centre crop, horizontal flip, colour jitter)."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random
from dataclasses import dataclass

# albumentations asks PyPI for a newer version when imported, from every rank and loader worker;
# training nodes are often offline (an H200 node here printed "urlopen error ... name resolution"
# from each rank). A user who wants the check sets the variable to 0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import albumentations.augmentations.crops.functional as FC  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.images import MAX_PIXELS  # noqa: E402  # default decode cap: what `make shards --max-pixels` accepts

_INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


class TooManyPixels(ValueError):
    """An image whose header promises more pixels than the cap: skipped before decoding."""


@dataclass
class AugmentConfig:
    """What happens to a decoded image before it is batched (the crop size is the loader's
    `image_size`)."""

    resize: int | None = None
    """Shortest side after resizing; None: the crop size (resize only when sizes differ)."""
    train: bool = True
    """True: random crop, flip and jitter; False: centre crop only (evaluation)."""
    flip: bool = True
    """Random horizontal flip with probability 0.5 (train only)."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength (hue gets a quarter of it); 0 turns it off."""
    jitter_p: float = 0.8
    """Probability of applying the colour jitter to an image."""
    interpolation: str = "area"
    """Resize interpolation: area, linear or cubic."""

    @classmethod
    def from_any(cls, value: "AugmentConfig | dict | None") -> "AugmentConfig":
        """Build from a config object, a dict (e.g. the YAML `augment:` section) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            cfg = value
        elif isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"augment: unknown keys {unknown}; allowed: {sorted(known)}")
            cfg = cls(**value)
        else:
            raise TypeError(f"augment: expected AugmentConfig, dict or None, got {type(value).__name__}")
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuses a bad value (ValueError naming the key) and stores the two strengths as floats: a
        number that arrives as text ('1e-1' from a YAML 1.1 reader) would pass a float() test here and
        then fail in every loader worker's ColorJitter."""
        if self.resize is not None and (isinstance(self.resize, bool) or not isinstance(self.resize, int)
                                        or self.resize < 1):
            raise ValueError(f"augment.resize: {self.resize!r} is not a positive int or null")
        for key in ("train", "flip"):  # "false" or 0.0 would be truthy or falsy by accident, not by choice
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"augment.{key}: {getattr(self, key)!r} must be true or false")
        if not isinstance(self.interpolation, str) or self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"augment.interpolation: {self.interpolation!r} not in {sorted(_INTERPOLATIONS)}")
        self.color_jitter = _fraction("color_jitter", self.color_jitter)
        self.jitter_p = _fraction("jitter_p", self.jitter_p)


def _fraction(name: str, value) -> float:
    """augment.<name> as a float in [0, 1], or a ValueError naming it (not a TypeError: config
    validation turns ValueErrors into messages)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise ValueError(f"augment.{name}: {value!r} is not a number in [0, 1]")
    return number


def build_pipeline(cfg: AugmentConfig, image_size: int) -> A.Compose:
    """The albumentations pipeline for one image (HWC uint8 in, image_size² out). The loader's
    `Augmenter` runs the same steps through albumentations' functional ops (faster)."""
    resize = cfg.resize or image_size
    if resize < image_size:
        raise ValueError(f"augment.resize={resize} is smaller than image_size={image_size}")
    steps: list = [A.SmallestMaxSize(max_size=resize, interpolation=_INTERPOLATIONS[cfg.interpolation])]
    if cfg.train:
        steps.append(A.RandomCrop(image_size, image_size))
        if cfg.flip:
            steps.append(A.HorizontalFlip(p=0.5))
        if cfg.color_jitter > 0:
            j = float(cfg.color_jitter)
            steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 4, p=cfg.jitter_p))
    else:
        steps.append(A.CenterCrop(image_size, image_size))
    return A.Compose(steps)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None when `data` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
        elif m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):  # start of frame
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone, no pixel decoded: JPEG, PNG and WebP parsed
    here, other formats by PIL's lazy open. Raises ValueError when there is no known header."""
    size = jpeg_size(data)
    if size is None and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if size is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = _webp_size(data)
    if size is None:
        try:
            with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
                size = im.size
        except Image.DecompressionBombError as e:  # PIL's own cap, far above ours
            raise TooManyPixels(str(e)) from None
        except Exception as e:  # noqa: BLE001 - unidentified or broken header
            raise ValueError(f"no readable image header ({type(e).__name__}: {e})") from None
    return size


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: 24-bit canvas size minus one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25:  # lossless: 14-bit sizes minus one after 0x2f
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30:  # lossy: frame tag, start code, 14-bit sizes
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
_REDUCED_FLAGS = dict(_REDUCED)


def decode_image(data: bytes, min_side: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to HWC uint8 **BGR** (OpenCV order; callers reorder channels when
    they copy into the batch, which costs nothing extra). JPEGs much larger than needed are
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, as PIL's draft mode) keeping the
    shortest side >= min_side. An image that would decode to more than `max_pixels` pixels
    (judged from its header, so a decompression bomb costs no memory) raises TooManyPixels.
    Anything OpenCV cannot decode, or a JPEG without its end marker (OpenCV would grey-fill
    a truncated one), goes through PIL, which raises on corrupt data."""
    jpeg = jpeg_size(data)
    w, h = jpeg or header_size(data)
    scale = 1
    if jpeg is not None:
        scale = next((k for k, _ in _REDUCED if -(-min(w, h) // k) >= min_side), 1)
    decoded = -(-w // scale) * -(-h // scale)
    if decoded > max_pixels:
        raise TooManyPixels(f"{w}x{h} decodes to {decoded} pixels > the loader's max_pixels {max_pixels}")
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # pixels as stored, like PIL
    if jpeg is not None:
        if not data[-64:].rstrip(b"\0").endswith(b"\xff\xd9"):
            return _decode_pil(data, min_side)
        flags = _REDUCED_FLAGS.get(scale, cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        return _decode_pil(data, min_side)
    return img


def _decode_pil(data: bytes, min_side: int) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        w, h = im.size
        if min(w, h) >= 2 * min_side:
            f = min_side / min(w, h)
            im.draft("RGB", (math.ceil(w * f), math.ceil(h * f)))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im)[..., ::-1])


def to_chw_uint8(images: list[np.ndarray], bgr: bool) -> np.ndarray:
    """HWC uint8 images -> uint8 [B,3,H,W] RGB: one transposing copy per image into the batch.

    The batch stays uint8 (a quarter of float32's bytes through the worker queue and the
    host-to-device copy); the trainer scales it to [-1, 1] on the device
    (pipeline.tensors.normalize), where that costs nothing next to the step."""
    h, w = images[0].shape[:2]
    out = np.empty((len(images), 3, h, w), np.uint8)
    for i, img in enumerate(images):
        out[i] = img[..., ::-1].transpose(2, 0, 1) if bgr else img.transpose(2, 0, 1)
    return out


class Augmenter:
    """Decode + augment one image (HWC uint8 out, channel order in `.bgr`).

    Same steps as `build_pipeline`, but the geometry calls the operations directly (OpenCV's
    resize, albumentations' get_crop_coords/crop) and flips by a view: the Compose machinery costs
    about as much as decoding a 64 px JPEG. Random parameters come from the caller per sample
    (`u`: crop position y, x and flip draw in [0, 1); `seed`: for the colour jitter), so an
    image's result does not depend on what came before it (needed for exact resumption)."""

    def __init__(self, cfg: AugmentConfig, image_size: int, max_pixels: int = MAX_PIXELS):
        self.cfg = cfg
        self.size = image_size
        self.max_pixels = max_pixels
        self.resize = cfg.resize or image_size
        if self.resize < image_size:
            raise ValueError(f"augment.resize={self.resize} is smaller than image_size={image_size}")
        self.interpolation = _INTERPOLATIONS[cfg.interpolation]
        self.jitter = cfg.train and cfg.color_jitter > 0
        self.bgr = not self.jitter  # channel order of what __call__ returns
        if self.jitter:
            j = float(cfg.color_jitter)
            self.colour = A.Compose([A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 4, p=cfg.jitter_p)])
            # Reseeding existing generators is ~10x cheaper than making new ones per sample.
            self._np = np.random.default_rng(0)
            self._np_state = self._np.bit_generator.state
            self._py = random.Random(0)
            self.colour.set_random_state(self._np, self._py)

    def __call__(self, data: bytes, u: np.ndarray, seed: int) -> np.ndarray:
        img = self.geometry(decode_image(data, self.resize, self.max_pixels), u, self.interpolation)
        if self.jitter:  # colour maths needs RGB; geometry does not care
            img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2RGB)
            self._py.seed(seed)
            self._np_state["state"]["state"] = seed
            self._np.bit_generator.state = self._np_state
            img = self.colour(image=img)["image"]
        return img

    def geometry(self, img: np.ndarray, u, interpolation: int) -> np.ndarray:
        """A decoded image resized (shortest side to `resize`, by the cv2 `interpolation`), cropped
        and flipped as the config says. Apart from __call__'s, the palette's statistics call it with
        cv2.INTER_NEAREST (pipeline.colour_stats.StatsViews): a resize that blends neighbours makes
        colours no image holds."""
        h, w = img.shape[:2]
        if min(h, w) != self.resize:  # SmallestMaxSize
            f = self.resize / min(h, w)
            size = (max(1, round(w * f)), max(1, round(h * f)))
            if size[0] * size[1] > self.max_pixels:  # a thin strip (200000x2) grows by f in both sides
                raise TooManyPixels(f"{w}x{h} resized to a shortest side of {self.resize} is {size[0]}x{size[1]}, "
                                    f"{size[0] * size[1]} pixels > the loader's max_pixels {self.max_pixels}")
            # cv2.resize as albumentations' resize calls it for 3 channels, without its wrappers
            # (5 us an image: 8 % of a 64 px source's work at a 128 crop)
            img = cv2.resize(img, size, interpolation=interpolation)
        if img.shape[0] < self.size or img.shape[1] < self.size:
            raise ValueError(f"image {img.shape[1]}x{img.shape[0]} is smaller than the crop {self.size}")
        crop = (self.size, self.size)
        if img.shape[:2] != crop:  # a source at the training size has nothing to crop
            coords = (FC.get_crop_coords(img.shape[:2], crop, float(u[0]), float(u[1])) if self.cfg.train
                      else FC.get_center_crop_coords(img.shape[:2], crop))
            img = FC.crop(img, *coords)
        if self.cfg.train and self.cfg.flip and u[2] < 0.5:
            img = img[:, ::-1]  # a view: the batch copy that follows does the work
        return img
