"""Decoding and augmentation of one image: reduced-size JPEG decoding plus an albumentations
pipeline (resize the shortest side, random or centre crop, horizontal flip, colour jitter)."""

from __future__ import annotations

import dataclasses
import io
import math
import random
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
from PIL import Image

_INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


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
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < 1):
            raise ValueError(f"augment.resize: {self.resize!r} is not a positive int or null")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"augment.interpolation: {self.interpolation!r} not in {sorted(_INTERPOLATIONS)}")
        if not 0.0 <= float(self.color_jitter) <= 1.0:
            raise ValueError(f"augment.color_jitter: {self.color_jitter!r} is not in [0, 1]")
        if not 0.0 <= float(self.jitter_p) <= 1.0:
            raise ValueError(f"augment.jitter_p: {self.jitter_p!r} is not in [0, 1]")


def build_pipeline(cfg: AugmentConfig, image_size: int) -> A.Compose:
    """The albumentations pipeline for one image (HWC uint8 RGB in, image_size² out)."""
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


def decode_image(data: bytes, min_side: int) -> np.ndarray:
    """Decode image bytes to HWC uint8 RGB. JPEGs much larger than needed are decoded at a
    reduced scale (PIL draft: 1/2, 1/4, 1/8) whose shortest side stays >= min_side."""
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        w, h = im.size
        if min(w, h) >= 2 * min_side:
            f = min_side / min(w, h)
            im.draft("RGB", (math.ceil(w * f), math.ceil(h * f)))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


class Augmenter:
    """Decode + augment with randomness taken from a per-sample seed, so a sample's result
    does not depend on what was augmented before it (needed for exact resumption)."""

    def __init__(self, cfg: AugmentConfig, image_size: int):
        self.cfg = cfg
        self.image_size = image_size
        self.min_side = cfg.resize or image_size
        self.pipeline = build_pipeline(cfg, image_size)
        # Reseeding existing generators is ~10x cheaper than making new ones per sample.
        self._np = np.random.default_rng(0)
        self._np_state = self._np.bit_generator.state
        self._py = random.Random(0)
        self.pipeline.set_random_state(self._np, self._py)

    def __call__(self, data: bytes, seed: int) -> np.ndarray:
        img = decode_image(data, self.min_side)
        self._py.seed(seed)
        self._np_state["state"]["state"] = seed
        self._np.bit_generator.state = self._np_state
        out = self.pipeline(image=img)["image"]
        if out.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"augmented image has shape {out.shape}")
        return out
