"""Do test-time rules beyond the flips raise a translator's a2b pixel accuracy?

Scores an export's maps (its palette head's colour probabilities averaged over the config's
flips, then each pixel's most probable colour, as evaluation paints them) beside two rules on
top: the probabilities smoothed over each pixel's neighbours (a box or a Gaussian), and the
probabilities averaged over views of the photo shifted by 1-3 px (reflect-padded by 4, so each
view's downsampling falls on another pixel phase), shifted back.

    .venv/bin/python bench/test_time.py runs/demo/export [--test-a data/demo/testA --test-b data/demo/testB]

Needs an export whose map side is a palette head (`model.palette_b`), such as `make demo`'s.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.release.evaluate import load_pairs, pixel_accuracy  # noqa: E402
from launch.release.export import load_translator  # noqa: E402
from model.networks import PaletteHead  # noqa: E402
from model.unit import flip_view, mean_of_views  # noqa: E402
from pipeline.tensors import to_tensor, to_uint8  # noqa: E402

PAD = 4  # context around each shifted view: more than the largest shift
SHIFTS = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (0, 2), (2, 2), (3, 3)]


@torch.no_grad()
def map_probs(gen, x: torch.Tensor) -> tuple[PaletteHead, torch.Tensor]:
    """The palette head of the a2b side and its colour probabilities [B, K, H, W] for photos x,
    averaged over gen's test-time flips as gen.translate averages them."""
    n, kind = gen.tta_views, ("exp" if "b" in gen.expected else "dec")
    views = torch.cat([flip_view(x, k) for k in range(n)])
    part = gen._part(kind, "b")  # the bench reads one layer deeper than translate() returns
    h, last = part[:-1](gen.dec_shared(gen.encode(views, "a"))), part[-1]
    if gen.skip:
        h, last = last.features(h, views), last.out
    if not isinstance(last, PaletteHead):
        raise SystemExit("this export paints maps with a tanh head, not a palette: nothing to smooth")
    return last, mean_of_views(last.logits(h).softmax(1), n)


def smoothed(p: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """p [B, K, H, W] filtered per channel by a separable 1-D kernel, edges replicated."""
    r, k = len(kernel) // 2, p.shape[1]
    p = F.pad(p, (r, r, r, r), mode="replicate")
    p = F.conv2d(p, kernel.view(1, 1, 1, -1).repeat(k, 1, 1, 1), groups=k)
    return F.conv2d(p, kernel.view(1, 1, -1, 1).repeat(k, 1, 1, 1), groups=k)


def gaussian(sigma: float) -> torch.Tensor:
    t = torch.arange(-int(3 * sigma + 0.999), int(3 * sigma + 0.999) + 1, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def shifted_probs(gen, x: torch.Tensor, dx: int, dy: int) -> tuple[PaletteHead, torch.Tensor]:
    """Probabilities for x seen from a window moved (dx, dy) px into its reflect-padded border."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    head, p = map_probs(gen, xp[:, :, PAD - dy:PAD - dy + h + PAD, PAD - dx:PAD - dx + w + PAD])
    return head, p[:, :, dy:dy + h, dx:dx + w]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", help="an export folder (a run's export/)")
    ap.add_argument("--test-a", default="data/demo/testA")
    ap.add_argument("--test-b", default="data/demo/testB")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen, meta = load_translator(args.export)
    _, xa, xb = load_pairs(args.test_a, args.test_b, size=int(meta.get("image_size") or 0) or None)
    x = to_tensor(xa)
    head, p = map_probs(gen, x)

    def acc(probs: torch.Tensor) -> str:
        return f"{pixel_accuracy(to_uint8(head.most_probable(probs)), xb):.4f}"

    rows = [("the export's rule (the most probable colour after the flips)", acc(p))]
    rows += [(f"smoothed over neighbours: box {k}x{k}", acc(smoothed(p, torch.full((k,), 1.0 / k)))) for k in (3, 5)]
    rows += [(f"smoothed over neighbours: Gaussian sigma {s:g}", acc(smoothed(p, gaussian(s)))) for s in (0.5, 1.0)]
    views = [shifted_probs(gen, x, dx, dy)[1] for dx, dy in SHIFTS]
    rows += [(f"one view shifted by ({dx}, {dy}) px", acc(v)) for (dx, dy), v in zip(SHIFTS, views)]
    rows += [(f"the mean of the first {n} shifted views", acc(sum(views[:n]) / n)) for n in (4, len(SHIFTS))]
    print(f"{args.export}: a2b pixel accuracy on {len(xa)} test pairs ({gen.tta_views} flip views each)\n")
    print("| test-time rule | a2b |\n| --- | --- |")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
