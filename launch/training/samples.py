"""What a person looks at while a run trains: sample grids of held-out images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import replacing
from pipeline.imageio import load_folder
from pipeline.tensors import normalize, to_tensor, to_uint8


def held_out_batch(test_a: str | None, test_b: str | None, image_size: int, n: int, side_stream):
    """A fixed set of images per domain for the sample grids: the paired test split when given,
    else the first batch of `side_stream()` (an un-augmented loader of the training shards)."""
    if test_a and test_b:
        _, a = load_folder(test_a, image_size)
        _, b = load_folder(test_b, image_size)
        return to_tensor(a[:n]), to_tensor(b[:n])
    batch = next(iter(side_stream()))
    return normalize(batch["a"][:n]), normalize(batch["b"][:n])  # float32 [n,3,H,W] in [-1, 1]


@torch.no_grad()
def sample_rows(gen, x_a, x_b) -> list:
    """Per held-out image: input | reconstruction | translation | cycle, for a then b. The
    translation is what the registered translator paints (gen.translate: the expected decoder
    where the model has one); the cycle is that of the GAN translation, the one training sees."""
    was_training = gen.training
    gen.eval()
    out = gen(x_a, x_b)
    y_ab, y_ba = gen.translate(x_a, "a2b"), gen.translate(x_b, "b2a")
    gen.train(was_training)
    rows = [[x_a[i], out["x_aa"][i], y_ab[i], out["x_aba"][i]] for i in range(x_a.shape[0])]
    rows += [[x_b[i], out["x_bb"][i], y_ba[i], out["x_bab"][i]] for i in range(x_b.shape[0])]
    return rows


def save_grid(path: Path, rows: list, scale: int = 1) -> None:
    """rows: list of lists of [3,H,W] tensors in [-1,1]; written as one PNG (atomically)."""
    from PIL import Image

    row_imgs = []
    for row in rows:
        arrs = [to_uint8(t) for t in row]
        pad = np.full((arrs[0].shape[0], 2, 3), 255, np.uint8)
        row_imgs.append(np.concatenate(sum(([a, pad] for a in arrs), [])[:-1], axis=1))
    hpad = np.full((2, row_imgs[0].shape[1], 3), 255, np.uint8)
    img = Image.fromarray(np.concatenate(sum(([r, hpad] for r in row_imgs), [])[:-1], axis=0))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with replacing(path, durable=False) as tmp:
        img.save(tmp, format="PNG")
