"""Would fewer multiplies make the 3x3 convolutions faster? A Winograd F(2x2, 3x3) convolution.

On AVX2-only CPUs the official preset's iteration runs at the machine's peak in both loops of
bench/step.py, so its ratio is the FLOPs' (README "One UNIT iteration"). Winograd's F(2x2, 3x3)
computes each 2x2 output tile of a 3x3 convolution with 16 multiplies per input/output channel
pair instead of 36: the residual blocks' convolutions (about 70 % of the iteration's FLOPs) as
16 batched matrix products over 4x4 input tiles, with additions before and after. This script
times forward + backward (input and weight gradients, bias) of that rewrite, written in PyTorch
ops on channels-last tensors, against oneDNN's direct convolution on the shapes the trainer runs,
interleaved, medians; it first checks the rewrite's gradients in float64 (gradcheck).

    .venv/bin/python bench/winograd.py [--repeats 21] [--threads 2]

Not used by the trainer: at the official preset's shape it was slower (README).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# F(2x2, 3x3) (Lavin and Gray 2016): y = A^T [(G g G^T) * (B^T d B)] A per tile
G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def input_tiles(xp: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B^T d B for every 4x4 tile (stride 2) of the padded NHWC input: [16, N * h/2 * w/2, C]."""
    n, _, _, c = xp.shape
    v = xp.new_empty(4, 4, n, h // 2, w // 2, c)
    rows = (xp[:, 0:h:2] - xp[:, 2:h + 2:2], xp[:, 1:h + 1:2] + xp[:, 2:h + 2:2],
            xp[:, 2:h + 2:2] - xp[:, 1:h + 1:2], xp[:, 1:h + 1:2] - xp[:, 3:h + 3:2])
    for a, r in enumerate(rows):
        c0, c1, c2, c3 = r[:, :, 0:w:2], r[:, :, 1:w + 1:2], r[:, :, 2:w + 2:2], r[:, :, 3:w + 3:2]
        torch.sub(c0, c2, out=v[a, 0])
        torch.add(c1, c2, out=v[a, 1])
        torch.sub(c2, c1, out=v[a, 2])
        torch.sub(c1, c3, out=v[a, 3])
    return v.view(16, -1, c)


def input_tiles_adjoint(dv: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The gradient of input_tiles: overlapping tiles summed back into the padded input."""
    c = dv.shape[-1]
    dv = dv.view(4, 4, n, h // 2, w // 2, c)
    dr = dv.new_zeros(4, n, h // 2, w + 2, c)
    for a in range(4):
        v0, v1, v2, v3 = dv[a]
        dr[a, :, :, 0:w:2] = v0
        dr[a, :, :, 2:w + 2:2] += v1 + v2 - v0
        dr[a, :, :, 1:w + 1:2] = v1 - v2 + v3
        dr[a, :, :, 3:w + 3:2] -= v3
    dx = dv.new_zeros(n, h + 2, w + 2, c)
    r0, r1, r2, r3 = dr
    dx[:, 0:h:2] = r0
    dx[:, 2:h + 2:2] += r1 + r2 - r0
    dx[:, 1:h + 1:2] = r1 - r2 + r3
    dx[:, 3:h + 3:2] -= r3
    return dx


def output_tiles(m: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """A^T m A for every tile, written into the NHWC output [N, h, w, Co]."""
    co = m.shape[-1]
    m = m.view(4, 4, n, h // 2, w // 2, co)
    y = m.new_empty(n, h, w, co)
    for p, s in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):
        y[:, p::2, 0::2] = s[0] + s[1] + s[2]
        y[:, p::2, 1::2] = s[1] - s[2] - s[3]
    return y


def output_tiles_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The gradient of output_tiles: [16, N * h/2 * w/2, Co] from the NHWC output gradient."""
    n, h, w, co = g.shape
    e = []
    for q in (0, 1):
        g0, g1 = g[:, 0::2, q::2], g[:, 1::2, q::2]
        e.append((g0, g0 + g1, g0 - g1, -g1))
    dm = g.new_empty(4, 4, n, h // 2, w // 2, co)
    for a in range(4):
        e0, e1 = e[0][a], e[1][a]
        dm[a, 0] = e0
        torch.add(e0, e1, out=dm[a, 1])
        torch.sub(e0, e1, out=dm[a, 2])
        torch.neg(e1, out=dm[a, 3])
    return dm.view(16, -1, co)


class WinogradConv(torch.autograd.Function):
    """conv2d(x, w, b) for a 3x3 kernel, stride 1, no padding (x already padded), even output size."""

    @staticmethod
    def forward(ctx, x, w, b):
        n, c, hp, wp = x.shape
        h, wd, co = hp - 2, wp - 2, w.shape[0]
        g = torch.tensor(G, dtype=w.dtype)
        v = input_tiles(x.permute(0, 2, 3, 1), h, wd)
        u = torch.einsum("ai,ocij,bj->abco", g, w, g).reshape(16, c, co)
        y = output_tiles(torch.bmm(v, u), n, h, wd) + b
        ctx.save_for_backward(v, u, g)
        ctx.dims = (n, h, wd)
        return y.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, gy):
        v, u, g = ctx.saved_tensors
        n, h, wd = ctx.dims
        gy = gy.permute(0, 2, 3, 1).contiguous()
        dm = output_tiles_adjoint(gy)
        du = torch.bmm(v.transpose(1, 2), dm).view(4, 4, u.shape[1], u.shape[2])
        dw = torch.einsum("ai,abco,bj->ocij", g, du, g)
        dx = input_tiles_adjoint(torch.bmm(dm, u.transpose(1, 2)), n, h, wd)
        return dx.permute(0, 3, 1, 2), dw, gy.sum((0, 1, 2))


def check_gradients() -> bool:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    same = torch.allclose(WinogradConv.apply(x, w, b), F.conv2d(x, w, b))
    grads = torch.autograd.gradcheck(WinogradConv.apply, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    return same and grads


def time_case(n: int, c: int, size: int, repeats: int) -> tuple[float, float, float]:
    x = torch.randn(n, c, size + 2, size + 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(c, c, 3, 3) * 0.03).requires_grad_()
    b = torch.zeros(c, requires_grad=True)
    gy = torch.randn(n, c, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = F.conv2d(x, w, b)
        err = ((WinogradConv.apply(x, w, b) - ref).abs().max() / ref.abs().max()).item()
    times = {"onednn": [], "winograd": []}
    for conv in (F.conv2d, WinogradConv.apply):  # untimed: first calls set up kernels and memory
        conv(x, w, b).backward(gy)
    for _ in range(repeats):
        for name, conv in (("onednn", F.conv2d), ("winograd", WinogradConv.apply)):
            x.grad = w.grad = b.grad = None
            t0 = time.perf_counter()
            conv(x, w, b).backward(gy)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["onednn"]), statistics.median(times["winograd"]), err


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"gradients (float64 gradcheck) and values match conv2d: {check_gradients()}")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, {args.repeats} interleaved repeats, forward + backward\n")
    print("| shape (N, C, H x W) | where | oneDNN ms | Winograd ms | Winograd / oneDNN | max rel. error |")
    print("| --- | --- | --- | --- | --- | --- |")
    cases = (((16, 128, 16), "official preset: residual blocks (both domains' batch)"),
             ((32, 128, 16), "twice the batch"),
             ((16, 64, 8), "make demo: residual blocks"),
             ((16, 64, 32), "a wider map"))
    for (n, c, size), where in cases:
        ref, win, err = time_case(n, c, size, args.repeats)
        print(f"| {n}, {c}, {size} x {size} | {where} | {ref * 1e3:.1f} | {win * 1e3:.1f} | {win / ref:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
