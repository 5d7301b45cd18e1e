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
    else the first batch of `side_stream()` (an un-augmented loader of the training shards).

    The generator's forward takes as many images of a as of b, so both sides get the fewer of n
    and what each folder holds. Test images that cannot be read are skipped and named, as
    evaluation does; folders with nothing usable fall back to the training shards: the grids are
    for looking at, and must not stop a run."""
    if test_a and test_b:
        rejected: list[str] = []
        try:
            _, a = load_folder(test_a, image_size, rejected)
            _, b = load_folder(test_b, image_size, rejected)
            m = min(n, len(a), len(b))
            return to_tensor(a[:m]), to_tensor(b[:m])
        except (OSError, ValueError) as e:  # no usable image, or stems that repeat
            print(f"warning: sample grids: {e}; they show training images instead", flush=True)
        finally:
            for r in rejected:
                print(f"warning: sample grids: skipped {r}", flush=True)
    batch = next(iter(side_stream()))
    return normalize(batch["a"][:n]), normalize(batch["b"][:n])  # float32 [n,3,H,W] in [-1, 1]


@torch.no_grad()
def sample_rows(gen, x_a, x_b) -> list:
    """Per held-out image: input | reconstruction | translation | cycle, for a then b. The
    translation is what the registered translator paints (gen.translate: the expected decoder
    where the model has one); the cycle is that of the GAN translation, the one training sees."""
    was_training = gen.training
    gen.eval()
    try:
        out = gen(x_a, x_b)
        y_ab, y_ba = gen.translate(x_a, "a2b"), gen.translate(x_b, "b2a")
    finally:  # a failed grid must not leave the training generator in eval mode
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
