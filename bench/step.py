"""Time one full UNIT iteration (G step + D step, forward, backward, Adam) and count its work.

CPU (default): the `official` preset at 64x64, width 32, batch 8, 2 threads. Four loops (five on
CPUs with native bf16) on the same weights and data, their iterations interleaved so that load
changes hit them alike:

  reference        written like the official code (trainer.py of mingyuliutw/UNIT): dis_update
                   runs its own encode/decode pass; gen_update calls every encoder and decoder once
                   per domain and backpropagates into the discriminators as well (the official
                   gen_update does not freeze them; their grads are thrown away by the next
                   dis_update's zero_grad); upsample + conv 5x5; the stock layers; torch's Adam.
  ours, before     this project's loop as it was: one generator pass per iteration whose detached
                   fakes feed the D step, both domains batched, the fused sub-pixel upsample conv
  + fused Adam     torch's fused Adam (what launch/config.py asks DeepSpeed for on CPU ranks)
  ours             + the training-time rewrites of model/kernels.py: channels-last activations,
                   closed-form norm and pad backward passes, space-to-depth and patch convolutions
                   for the shapes oneDNN runs slowly (this is what the trainer runs on CPU ranks)
  ours, bf16 autocast  only on CPUs with native bf16 (AMX-BF16 or AVX512-BF16): ours under
                   train.precision: bf16. Other numerics, so printed beside the goal, never as it

First it checks that the losses of ours and of the reference agree from one seed. Then, per loop:
median wall and CPU time, and the median over rounds of (loop / reference in the same round; the
order of the loops rotates from round to round); the FLOPs of one iteration
(torch.utils.flop_counter.FlopCounterMode); achieved FLOP/s against the machine's peak measured
in the same run: the best of a 2048^3 float32 matmul (MKL), the same product as a 1x1
convolution and a large 3x3 channels-last convolution (oneDNN). --profile adds where the time
of one iteration of ours goes (torch.profiler, self CPU time by kind of operation).

    .venv/bin/python bench/step.py [--preset official] [--size 64] [--dim 32] [--batch 8]
                                   [--threads 2] [--repeats 7] [--warmup 2] [--profile] [--steady-heap]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python bench/step.py
                                   # what an AVX2-only CPU runs, timed on an AVX-512 one
    .venv/bin/python bench/step.py --gpu-matrix [--sizes 128 256] [--batch 8] [--dim 64] [--budget-s 200]

--gpu-matrix (bench/gpu.sh) runs ours on one CUDA GPU in fp32 / bf16 (autocast) / fp16 (autocast
and a gradient scaler per optimizer), torch.compile off and on, at each size, and prints one
table: images/s (both domains), ms/iteration, MFU (achieved FLOP/s over the device's dense bf16
peak, from a small table of known devices) and peak memory. Eager cases run first; --budget-s
starts no case after that many seconds (one compiled case took 208 s to compile on an H200's
16-core host) and reports the cases it left out as rows that say so.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import ctypes.util
import multiprocessing as mp
import multiprocessing.connection
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch.config import cpu_bf16_flags  # noqa: E402
from launch.training.engines import compile_networks  # noqa: E402
from model.networks import set_fast_paths, set_fused_upsample  # noqa: E402
from model.unit import UNIT, discriminator_loss, generator_loss, r1_loss  # noqa: E402

GOAL_RATIO = 0.6  # ours / reference, time per iteration (issue 16)
# Dense bf16 tensor-core peaks, TFLOP/s (vendors' datasheets, no sparsity); first match wins.
GPU_PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
             ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
             ("RTX 4090", 165.0), ("RTX 3090", 71.0))


def adam(module, fused=None):
    return torch.optim.Adam(module.parameters(), lr=1e-4, betas=(0.5, 0.999), weight_decay=1e-4, fused=fused)


# ---------------------------------------------------------------- this implementation
def _update(loss, opt, scaler):
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def step_ours(unit, opt_g, opt_d, x_a, x_b, amp=contextlib.nullcontext, scalers=(None, None), step: int = 1):
    """launch/training/engines.py's gan_step without DeepSpeed: the G step (discriminators frozen),
    then the D step on the same iteration's detached translations, with R1 (outside autocast) at
    the 1-based optimizer `step`s the config asks for."""
    cfg = unit.cfg
    unit.dis.requires_grad_(False)
    with amp():
        out = unit.gen(x_a, x_b)
        loss_g, _ = generator_loss(out, x_a, x_b, unit.dis, cfg)
    _update(loss_g, opt_g, scalers[0])
    unit.dis.requires_grad_(True)
    with amp():
        preds = unit.dis(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach())
        loss_d, _ = discriminator_loss(preds, cfg)
    penalty, _ = r1_loss(unit.dis, x_a, x_b, cfg, step)
    if penalty is not None:
        loss_d = loss_d + penalty
    _update(loss_d, opt_d, scalers[1])
    return loss_g.detach(), loss_d.detach()


# ---------------------------------------------------------------- reference (official-style)
def ref_gen_pass(gen, x_a, x_b):
    """Every encoder/decoder call on its own, one domain at a time (official gen_update)."""
    h_a = gen.encode(x_a, "a")
    h_b = gen.encode(x_b, "b")
    z_a = h_a + torch.randn_like(h_a)
    z_b = h_b + torch.randn_like(h_b)
    x_aa = gen.decode(z_a, "a")
    x_bb = gen.decode(z_b, "b")
    x_ba = gen.decode(z_b, "a")
    x_ab = gen.decode(z_a, "b")
    h_ba = gen.encode(x_ba, "a")
    h_ab = gen.encode(x_ab, "b")
    z_ba = h_ba + torch.randn_like(h_ba)
    z_ab = h_ab + torch.randn_like(h_ab)
    x_aba = gen.decode(z_ab, "a")
    x_bab = gen.decode(z_ba, "b")
    return {"x_aa": x_aa, "x_bb": x_bb, "x_ab": x_ab, "x_ba": x_ba, "x_aba": x_aba,
            "x_bab": x_bab, "mu_a": h_a, "mu_b": h_b, "mu_ab": h_ab, "mu_ba": h_ba}


def ref_dis_preds(dis, x_a, x_b, fake_a, fake_b):
    return {"a_real": dis.dis_a(x_a), "a_fake": dis.dis_a(fake_a),
            "b_real": dis.dis_b(x_b), "b_fake": dis.dis_b(fake_b)}


def step_ref(unit, opt_g, opt_d, x_a, x_b):
    cfg, gen, dis = unit.cfg, unit.gen, unit.dis
    # dis_update: its own encode/decode pass, as the official trainer
    opt_d.zero_grad()
    h_a = gen.encode(x_a, "a")
    h_b = gen.encode(x_b, "b")
    x_ba = gen.decode(h_b + torch.randn_like(h_b), "a")
    x_ab = gen.decode(h_a + torch.randn_like(h_a), "b")
    loss_d, _ = discriminator_loss(ref_dis_preds(dis, x_a, x_b, x_ba.detach(), x_ab.detach()), cfg)
    loss_d.backward()
    opt_d.step()
    # gen_update: the discriminators stay trainable, so backward computes their grads too
    opt_g.zero_grad()
    out = ref_gen_pass(gen, x_a, x_b)
    loss_g, _ = generator_loss(out, x_a, x_b, dis, cfg)
    loss_g.backward()
    opt_g.step()
    return loss_g.detach(), loss_d.detach()


def official_layers(unit):
    """A copy computing what the official layers compute: upsample + conv 5x5, stock norms and pads."""
    unit = copy.deepcopy(unit)
    set_fused_upsample(unit, False)
    set_fast_paths(unit, False)
    return unit


plain = official_layers  # bench/quality.py's name for it


def stock_layers(unit):
    """A copy with this project's fused upsample conv but the stock norms, pads and layout."""
    unit = copy.deepcopy(unit)
    set_fast_paths(unit, False)
    return unit


def check_same_losses(unit, x_a, x_b) -> float:
    """Largest relative difference between ours and the reference's losses from one seed (autograd
    on, so that the training-time layers of ours run)."""
    ref = official_layers(unit)
    torch.manual_seed(123)
    out_o = unit.gen(x_a, x_b)
    torch.manual_seed(123)
    out_r = ref_gen_pass(ref.gen, x_a, x_b)
    g_o, t_o = generator_loss(out_o, x_a, x_b, unit.dis, unit.cfg)
    g_r, t_r = generator_loss(out_r, x_a, x_b, ref.dis, ref.cfg)
    fa, fb = out_o["x_ba"].detach(), out_o["x_ab"].detach()
    d_o, _ = discriminator_loss(unit.dis(x_a, x_b, fa, fb), unit.cfg)
    d_r, _ = discriminator_loss(ref_dis_preds(ref.dis, x_a, x_b, fa, fb), ref.cfg)
    pairs = [(t_o[k], t_r[k]) for k in t_o] + [(g_o, g_r), (d_o, d_r)]
    return max(abs(a.item() - b.item()) / max(1e-8, abs(b.item())) for a, b in pairs)


# ---------------------------------------------------------------- work and peak
def count_flops(fn, unit, *args) -> int:
    """FLOPs of one call of `fn` on a copy of `unit` (its optimizers made fresh)."""
    unit = copy.deepcopy(unit)
    with FlopCounterMode(display=False) as fc:
        fn(unit, adam(unit.gen), adam(unit.dis), *args)
    return fc.get_total_flops()


def cpu_peak(repeats: int = 5) -> tuple[float, str]:
    """Best float32 FLOP/s on this process's threads among three large products: a 2048^3 matmul
    (MKL), the same product as a 1x1 convolution and a 3x3 convolution in channels-last (oneDNN)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    x1, w1 = a.t().reshape(1, n, n, 1), b.t().reshape(n, n, 1, 1)
    x3 = torch.randn(32, 256, 18, 18).contiguous(memory_format=torch.channels_last)
    w3 = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    best = {}
    for name, fn, flops in (("matmul", lambda: a @ b, 2 * n ** 3), ("1x1 conv", lambda: F.conv2d(x1, w1), 2 * n ** 3),
                            ("3x3 conv", lambda: F.conv2d(x3, w3), 2 * 32 * 16 * 16 * 256 * 256 * 9)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = flops / min(times)
    name = max(best, key=best.get)
    return best[name], ", ".join(f"{k} {v / 1e9:.0f}" for k, v in best.items()) + f" GFLOP/s; peak = {name}"


def gpu_peak(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a known device, None for an unknown one."""
    for key, tflops in GPU_PEAKS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


# ---------------------------------------------------------------- CPU comparison
REF, OURS, BF16 = "reference (official-style)", "ours (+ model/kernels.py rewrites)", "ours, bf16 autocast"


# The instruction sets torch (ATen), oneDNN and MKL may use, capped by these variables: with all
# three at AVX2, an AVX-512 machine times what an AVX2-only one runs (README "One UNIT iteration").
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_caps() -> str:
    """The instruction-set caps set in the environment, as 'NAME=value, ...', or ''."""
    return ", ".join(f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k))


def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions (AMX-BF16, AVX512-BF16) as /proc/cpuinfo lists them, or None,
    also when an instruction-set cap is set (capped, bf16 runs emulated, many times slower)."""
    if isa_caps():
        return None
    return ", ".join(cpu_bf16_flags()) or None


def step_bf16(unit, opt_g, opt_d, x_a, x_b):
    """Ours under train.precision: bf16 (autocast; stock layers, fp32 weights and loss reductions)."""
    return step_ours(unit, opt_g, opt_d, x_a, x_b, amp=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


def cpu_loops(base, bf16: bool = False):
    """name -> (step fn, model copy, G optimizer, D optimizer); the reference first, ours last but the
    bf16 row (not a rewrite: other numerics, so never the goal's figure)."""
    units = official_layers(base), stock_layers(base), stock_layers(base), copy.deepcopy(base)
    loops = {REF: (step_ref, units[0], adam(units[0].gen), adam(units[0].dis)),
             "ours, before issue 16": (step_ours, units[1], adam(units[1].gen), adam(units[1].dis)),
             "+ fused Adam": (step_ours, units[2], adam(units[2].gen, True), adam(units[2].dis, True)),
             OURS: (step_ours, units[3], adam(units[3].gen, True), adam(units[3].dis, True))}
    if bf16:
        unit = copy.deepcopy(base)
        loops[BF16] = (step_bf16, unit, adam(unit.gen, True), adam(unit.dis, True))
    return loops


def time_interleaved(loops, x_a, x_b, repeats, warmup):
    """{name: (wall times, CPU times)}; each round runs every loop once, starting one further along."""
    times = {k: ([], []) for k in loops}
    names = list(loops)
    for i in range(warmup + repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn, unit, og, od = loops[name]
            t0, c0 = time.perf_counter(), time.process_time()
            fn(unit, og, od, x_a, x_b)
            if i >= warmup:
                times[name][0].append(time.perf_counter() - t0)
                times[name][1].append(time.process_time() - c0)
    return times


def median_ratios(times, ref):
    """{name: (median wall ratio, median CPU ratio)} over rounds, each round against the reference's."""
    out = {}
    for name, (wall, cpu) in times.items():
        out[name] = tuple(statistics.median(a / b for a, b in zip(mine, theirs))
                          for mine, theirs in ((wall, times[ref][0]), (cpu, times[ref][1])))
    return out


def print_cpu_tables(args, times, ratios, flops, peak, rel, elapsed):
    ref, ours = REF, OURS
    print(f"\nUNIT iteration (G step + D step), preset {args.preset}, {args.size}x{args.size}, dim {args.dim}, "
          f"batch {args.batch}, CPU threads {args.threads}, {args.repeats} rounds after {args.warmup} warm-up, "
          f"load average {_load()}, heap: {args.heap}" + (f", capped: {isa_caps()}" if isa_caps() else ""))
    print("| loop | wall s/iter (median) | CPU s/iter (median) | wall / reference (median of rounds) "
          "| CPU / reference (median of rounds) |")
    print("| --- | --- | --- | --- | --- |")
    for k, (wall, cpu) in times.items():
        print(f"| {k} | {statistics.median(wall):.3f} | {statistics.median(cpu):.3f} | "
              f"{ratios[k][0]:.2f}x | {ratios[k][1]:.2f}x |")
    wall_ours = statistics.median(times[ours][0])
    achieved = flops[ours] / wall_ours
    ok = ratios[ours][0] <= GOAL_RATIO
    print("\n| figure | value | goal |\n| --- | --- | --- |")
    print(f"| ours / reference, wall time per iteration | {ratios[ours][0]:.2f}x | <= {GOAL_RATIO}x "
          f"({'met' if ok else 'MISSED'}) |")
    print(f"| ours / reference, CPU time per iteration | {ratios[ours][1]:.2f}x | <= {GOAL_RATIO}x "
          f"({'met' if ratios[ours][1] <= GOAL_RATIO else 'MISSED'}) |")
    print(f"| losses, ours against the reference (one seed) | {rel:.1e} max relative difference | <= 1e-4 |")
    print(f"| FLOPs per iteration, ours / reference | {flops[ours] / 1e9:.1f} G / {flops[ref] / 1e9:.1f} G "
          f"({flops[ours] / flops[ref]:.2f}x) | - |")
    print(f"| achieved, ours | {achieved / 1e9:.1f} GFLOP/s | - |")
    print(f"| machine peak, {args.threads} thread(s), same run | {peak[0] / 1e9:.0f} GFLOP/s ({peak[1]}) | - |")
    print(f"| MFU, ours (achieved / peak) | {achieved / peak[0]:.2f} | - |")
    if BF16 in times:
        print(f"| ours in bf16 autocast / reference in fp32, wall (other numerics: not the goal's figure) | "
              f"{ratios[BF16][0]:.2f}x ({ratios[BF16][0] / ratios[ours][0]:.2f}x ours in fp32) | - |")
    print(f"\nSummary ({elapsed:.0f} s): ours takes {wall_ours:.3f} s per iteration against "
          f"{statistics.median(times[ref][0]):.3f} s for the official-style loop, {ratios[ours][0]:.2f}x wall "
          f"(goal <= {GOAL_RATIO}x: {'met' if ok else 'missed'}), {ratios[ours][1]:.2f}x CPU time; "
          f"{flops[ours] / 1e9:.0f} GFLOP per iteration at {achieved / 1e9:.0f} GFLOP/s, "
          f"{achieved / peak[0]:.2f} of the peak measured here. Losses agree to {rel:.1e} relative.")
    return ratios[ours][0]


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's largest on 64-bit: 32 MB


def steady_heap() -> str:
    """Make glibc keep and reuse what the process frees (blocks up to 32 MB from the heap, never
    trimmed, grown 1 GB at a time), so no loop pays page faults for memory another one handed back.

    Why: the reference touches ~90 MB of fresh pages an iteration and ours ~8 MB, so with glibc's
    defaults each loop's time depends on what the allocator kept from the loops around it: the same
    two loops measured 0.53x beside other neighbours and 0.62x here (README, "One UNIT iteration").
    """
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        raise SystemExit("--steady-heap needs glibc's mallopt; this C library has none")
    for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 2 ** 31 - 1),
                         (M_TOP_PAD, 1 << 30)):
        if mallopt(param, value) != 1:
            raise SystemExit(f"--steady-heap: glibc refused mallopt({param}, {value})")
    return f"steady (glibc keeps freed memory: blocks up to {MMAP_THRESHOLD_MAX >> 20} MB reused, never trimmed)"


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (OSError, AttributeError):
        return "unknown"


def op_kind(name: str) -> str:
    if name == "aten::mkldnn_convolution":
        return "convolution, forward"
    if name == "aten::convolution_backward":
        return "convolution, backward"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matrix products (patch convs, kernel einsums)"
    if "adam" in name.lower():
        return "optimizer"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::pixel_shuffle", "aten::pixel_unshuffle",
                "aten::cat", "aten::stack"):
        return "copies and layout moves"
    return "norms, pads, activations, losses (elementwise and reductions)"


def print_profile(fn, unit, og, od, x_a, x_b, steps: int = 3) -> None:
    """Where one iteration's time goes: self CPU time by kind of operation, then the top operations."""
    from torch.profiler import ProfilerActivity, profile
    fn(unit, og, od, x_a, x_b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn(unit, og, od, x_a, x_b)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kinds = collections.Counter()
    for e in events:
        kinds[op_kind(e.key)] += e.self_cpu_time_total
    print(f"\nWhere one iteration of ours goes (torch.profiler, self time of each operation, {steps} iterations; "
          f"{total / steps / 1e3:.0f} ms per iteration under the profiler)")
    print("| kind | ms per iteration | share |\n| --- | --- | --- |")
    for kind, t in kinds.most_common():
        print(f"| {kind} | {t / steps / 1e3:.0f} | {100 * t / total:.0f}% |")
    print("| top operations | | |")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"| {e.key} (x{e.count // steps}) | {e.self_cpu_time_total / steps / 1e3:.0f} | "
              f"{100 * e.self_cpu_time_total / total:.0f}% |")


def cpu_main(args) -> float:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    base = UNIT.from_config({"preset": args.preset, "dim": args.dim, "image_size": args.size})
    x_a = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    x_b = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    rel = check_same_losses(base, x_a, x_b)
    print(f"same losses check (one seed, ours against the reference): max relative difference {rel:.2e}")
    if rel > 1e-4:
        raise SystemExit("ours and the reference disagree; timings would not be comparable")
    peak = max(cpu_peak(), cpu_peak(), key=lambda p: p[0])
    bf16 = cpu_bf16()
    if isa_caps():
        print(f"instruction sets capped by {isa_caps()}: torch's CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}; no bf16 row")
    else:
        print(f"bf16 row: {'yes, the CPU has ' + bf16 if bf16 else 'no (no AMX-BF16 or AVX512-BF16 on this CPU)'}")
    loops = cpu_loops(base, bf16=bool(bf16))
    times = time_interleaved(loops, x_a, x_b, args.repeats, args.warmup)
    peak = max(peak, cpu_peak(), key=lambda p: p[0])
    ref, ours = REF, OURS
    flops = {k: count_flops(loops[k][0], loops[k][1], x_a, x_b) for k in (ref, ours)}
    ratio = print_cpu_tables(args, times, median_ratios(times, ref), flops, peak, rel, time.perf_counter() - t_start)
    if args.profile:
        print_profile(*loops[ours], x_a, x_b)
    return ratio


# ---------------------------------------------------------------- GPU matrix
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gpu_setup(base, dev, size, batch, precision, channels_last=False):
    """A copy of `base` on `dev`, its autocast and fp16 loss scalers, and one batch per domain
    (weights and inputs channels-last if asked)."""
    unit = copy.deepcopy(base).to(dev)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def amp():
        return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)

    scalers = (torch.amp.GradScaler(dev.type), torch.amp.GradScaler(dev.type)) if precision == "fp16" else (None, None)
    g = torch.Generator(device=dev).manual_seed(0)
    x_a, x_b = (torch.rand(batch, 3, size, size, device=dev, generator=g) * 2 - 1 for _ in range(2))
    if channels_last:
        unit = unit.to(memory_format=torch.channels_last)
        x_a, x_b = (t.contiguous(memory_format=torch.channels_last) for t in (x_a, x_b))
    return unit, amp, scalers, x_a, x_b


COMPILE_MODES = {"off": None, "on": "default", "graphs": "reduce-overhead"}  # --compile -> torch.compile mode
COMPILE_LABELS = {"off": "off", "on": "on", "graphs": "on, CUDA graphs"}


def gpu_prepare(base, dev, size, batch, precision, compiled="off", warmup=3, channels_last=False, backend="inductor"):
    """A case made ready to time: `base` copied to `dev`, compiled as train.compile does
    (compile_networks), and `warmup` iterations run (the compilation, if any). Returns the case's
    state and the warm-up's seconds."""
    unit, amp, scalers, x_a, x_b = gpu_setup(base, dev, size, batch, precision, channels_last)
    mode = COMPILE_MODES[compiled]
    if mode:
        compile_networks(unit.gen, unit.dis, mode=mode, backend=backend)
    og, od = adam(unit.gen, True), adam(unit.dis, True)
    # a CUDA-graphs case marks where each iteration begins, so no replay overwrites outputs still in use
    begin = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else (lambda: None)
    state = (unit, og, od, x_a, x_b, amp, scalers, begin)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(warmup):
        _step(state)
    _sync(dev)
    return state, time.perf_counter() - t0


def _step(state):
    unit, og, od, x_a, x_b, amp, scalers, begin = state
    begin()
    return step_ours(unit, og, od, x_a, x_b, amp, scalers)


def gpu_time(state, dev, iters) -> dict:
    """Median seconds per iteration of a prepared case, whether its losses are finite, peak memory."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        losses = _step(state)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times), "finite": all(bool(torch.isfinite(v)) for v in losses),
            "mem": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None}


def gpu_case(base, dev, size, batch, precision, compiled, iters, warmup, channels_last=False, backend="inductor"):
    """One row of the GPU table, in this process: ms/iter (median), peak memory, warm-up seconds
    (compilation included)."""
    state, warm_s = gpu_prepare(base, dev, size, batch, precision, compiled, warmup, channels_last, backend)
    return {**gpu_time(state, dev, iters), "warm_s": warm_s}


def compiled_worker(conn, base, device, size, batch, precision, compiled, iters, warmup, backend):
    """One compiled case in its own process (--parallel-compile): compile and warm up, say so,
    then wait for the parent's word to time, so that no case is timed while others compile."""
    try:
        dev = torch.device(device)
        state, warm_s = gpu_prepare(base, dev, size, batch, precision, compiled, warmup, backend=backend)
        conn.send({"ready": warm_s})
        conn.recv()
        conn.send({**gpu_time(state, dev, iters), "warm_s": warm_s})
    except Exception as e:  # a compile error or out of memory is the case's row, not the end of the table
        conn.send({"error": _error(e)})


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _receive(conn, proc) -> dict:
    try:
        return conn.recv()
    except EOFError:  # the process died without a word (killed, a crash in native code)
        proc.join(5)
        return {"error": f"its process ended with exit code {proc.exitcode} before it reported"}


def run_side_by_side(jobs: dict, target, deadline: float, at_once: int = 0, timing_s: float = 0) -> dict:
    """target(conn, *args) for the jobs of {job: args}, each in its own process (spawned: CUDA does
    not survive a fork), up to `at_once` (0: all) preparing at a time, started in the jobs' order.
    Each says {"ready": ...} (or its error) by `deadline` (time.monotonic()), else it is stopped,
    or never started, and its result is {"late": True}. Then the ready ones, in the jobs' order,
    are told one at a time to time themselves and report, while the others wait idle; with
    `timing_s`, all of that within so many seconds (a job that hangs is an error, not the end).
    Returns {job: result}."""
    ctx = mp.get_context("spawn")
    procs, waiting, results, ready = {}, {}, {}, set()
    queue = list(jobs)
    try:
        while (queue or waiting) and time.monotonic() < deadline:
            while queue and (not at_once or len(waiting) < at_once):
                job = queue.pop(0)
                conn, child = ctx.Pipe()
                procs[job] = (ctx.Process(target=target, args=(child, *jobs[job]), daemon=True), conn)
                procs[job][0].start()
                waiting[conn] = job
            for conn in mp.connection.wait(list(waiting), timeout=min(60.0, max(0.0, deadline - time.monotonic()))):
                job = waiting.pop(conn)
                msg = _receive(conn, procs[job][0])
                if "ready" in msg:
                    ready.add(job)
                else:
                    results[job] = msg
        results.update({job: {"late": True} for job in [*waiting.values(), *queue]})
        end = time.monotonic() + (timing_s or float("inf"))
        for job in (j for j in jobs if j in ready):
            proc, conn = procs[job]
            if time.monotonic() >= end:
                results[job] = {"error": f"not timed: the {timing_s:.0f} s for timing had run out"}
                continue
            conn.send("go")
            left = end - time.monotonic()
            results[job] = (_receive(conn, proc) if conn.poll(None if left == float("inf") else max(0.0, left))
                            else {"error": f"no result within the {timing_s:.0f} s for timing"})
    finally:
        for proc, _ in procs.values():
            proc.kill()
            proc.join()
    return {job: results[job] for job in jobs}


def gpu_main(args) -> int:
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"bench/step.py --gpu-matrix: no CUDA device visible to torch {torch.__version__}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} (a dry run of the GPU table)"
    peak = gpu_peak(name) if dev.type == "cuda" else None
    torch.manual_seed(0)
    bases, flops = {}, {}
    for size in args.sizes:
        bases[size] = UNIT.from_config({"preset": args.preset, "dim": args.dim, "image_size": size,
                                        **({"dis_dim": args.dis_dim} if args.dis_dim else {})})
        x = [torch.rand(args.batch, 3, size, size, device=dev) * 2 - 1 for _ in range(2)]
        flops[size] = count_flops(step_ours, copy.deepcopy(bases[size]).to(dev), *x)
    cases = [(size, precision, compiled) for compiled in args.compile
             for size in args.sizes for precision in args.precisions]
    # Every eager case first, then the compiled ones: the eager rows take seconds, a compiled row
    # its compilation (208 s for one on an H200's host), so a --budget-s cut leaves the cheap rows.
    t_start = time.perf_counter()
    results = {case: run_here(args, dev, bases, case, t_start) for case in cases if case[2] == "off"}
    if args.profile:
        profile_both_upsamplings(args, dev, bases, flops)
    if args.layouts:
        gpu_layouts(args, dev, bases)
    if args.batch_sweep:
        gpu_batch_sweep(args, dev, bases)
    compiled = [case for case in cases if case[2] != "off"]
    if args.parallel_compile and compiled:
        results.update(run_compiled_side_by_side(args, bases, compiled, t_start))
    else:
        results.update({case: run_here(args, dev, bases, case, t_start) for case in compiled})
    rows = [(*case, flops[case[0]], results[case]) for case in cases]
    print_gpu_table(args, name, peak, rows)
    skipped = sum("skipped" in r for *_, r in rows)
    if skipped:
        print(f"{skipped} of {len(rows)} cases not run: over --budget-s {args.budget_s:.0f}")
    # a case cut by the budget is reported, not failed; one that ran must have finite losses
    return 0 if all("skipped" in r or ("s" in r and r["finite"]) for *_, r in rows) else 1


def _case_line(case, r) -> str:
    size, precision, compiled = case
    return (f"  {size} px {precision} compile={COMPILE_LABELS[compiled]}: "
            + (f"{r['s'] * 1e3:.1f} ms/iter" if "s" in r else r.get("error") or r["skipped"]))


def over_budget(args, t_start) -> dict | None:
    """The row of a case not started because --budget-s has passed since `t_start`, else None."""
    spent = time.perf_counter() - t_start
    if args.budget_s and spent > args.budget_s:
        return {"skipped": f"not run: {spent:.0f} s spent, over --budget-s {args.budget_s:.0f}"}
    return None


def run_here(args, dev, bases, case, t_start) -> dict:
    """One case in this process, unless --budget-s has passed since `t_start`."""
    size, precision, compiled = case
    r = over_budget(args, t_start)
    if r is None:
        try:
            r = gpu_case(bases[size], dev, size, args.batch, precision, compiled, args.repeats, args.warmup,
                         backend=args.compile_backend)
        except Exception as e:  # one failing case (a compile error, out of memory) is a row, not the end
            r = {"error": _error(e)}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(_case_line(case, r), flush=True)
    return r


def run_compiled_side_by_side(args, bases, cases, t_start) -> dict:
    """--parallel-compile: the compiled cases compile side by side, --compile-procs at a time, each
    in its own process (much of a compilation is one core's Python), the first precision named
    first, until --budget-s has passed since `t_start`; then the ready ones are timed one after
    another, each alone."""
    skipped = over_budget(args, t_start)
    if skipped:
        for case in cases:
            print(_case_line(case, skipped), flush=True)
        return dict.fromkeys(cases, skipped)
    spent = time.perf_counter() - t_start
    at_once = min(len(cases), args.compile_procs or len(cases))
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the eager cases' cached blocks, for the compiling processes
    # Inductor's kernel-compiling workers: a share of the cores per case, not all of them each
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(2, 2 * (os.cpu_count() or 2) // at_once)))
    deadline = time.monotonic() + (args.budget_s - spent if args.budget_s else float("inf"))
    order = sorted(cases, key=lambda c: (args.precisions.index(c[1]), args.compile.index(c[2]), c[0]))
    print(f"  compiling {len(cases)} case{'s' if len(cases) > 1 else ''} side by side, {at_once} at a time, "
          "one process each", flush=True)
    jobs = {case: (bases[case[0]], args.device, case[0], args.batch, case[1], case[2], args.repeats, args.warmup,
                   args.compile_backend) for case in order}
    results = run_side_by_side(jobs, compiled_worker, deadline, at_once, args.timing_s)
    for case, r in results.items():
        if r.get("late"):
            results[case] = {"skipped": f"not run: not compiled {time.perf_counter() - t_start:.0f} s in, "
                                        f"over --budget-s {args.budget_s:.0f}"}
        print(_case_line(case, results[case]), flush=True)
    return results


def profile_both_upsamplings(args, dev, bases, flops):
    size = args.sizes[0]
    gpu_profile(bases[size], dev, size, args.batch, "bf16", flops[size], label=", fused upsampling")
    # the plain upsampling block: no border fix, so fewer operations, for 2.8x its convolution's multiply-adds
    plain = plain_upsampling(bases[size])
    x = [torch.rand(args.batch, 3, size, size, device=dev) * 2 - 1 for _ in range(2)]
    gpu_profile(plain, dev, size, args.batch, "bf16", count_flops(step_ours, copy.deepcopy(plain).to(dev), *x),
                label=", plain upsampling", top=0)


def gpu_batch_sweep(args, dev, bases):
    """Eager bf16 at the first size with larger batches: a launch-bound step costs about the same
    per iteration whatever the batch, so images/s should grow with it until the GPU is busy."""
    size = args.sizes[0]
    print(f"\nEager bf16 at {size} px by batch per domain (median of {args.repeats} after {args.warmup} warm-up)\n"
          "| batch per domain | images/s (2 domains) | ms/iter | peak memory GiB |\n| --- | --- | --- | --- |")
    for batch in sorted({args.batch, *args.batch_sweep}):
        try:
            r = gpu_case(bases[size], dev, size, batch, "bf16", "off", args.repeats, args.warmup)
        except Exception as e:  # out of memory at the largest batch is a row
            print(f"| {batch} | failed: {_error(e)} | | |", flush=True)
            continue
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        mem = "n/a" if r["mem"] is None else f"{r['mem'] / 2 ** 30:.2f}"
        print(f"| {batch} | {2 * batch / r['s']:.0f} | {r['s'] * 1e3:.1f} | {mem} |", flush=True)


def gpu_profile(base, dev, size, batch, precision, flops, steps=3, label="", top=10):
    """Is the eager step bound by the GPU or by the CPU that launches its kernels? torch.profiler
    over `steps` iterations (one in a CPU dry run, which checks the code): operations dispatched,
    kernel launches, CPU and device time per iteration, the `top` operations; `flops` (one
    iteration's, counted by the caller) printed beside them."""
    from torch.profiler import ProfilerActivity, profile
    unit, amp, scalers, x_a, x_b = gpu_setup(base, dev, size, batch, precision)
    og, od = adam(unit.gen, True), adam(unit.dis, True)
    steps = steps if dev.type == "cuda" else 1
    for _ in range(2 if dev.type == "cuda" else 1):
        step_ours(unit, og, od, x_a, x_b, amp, scalers)
    _sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step_ours(unit, og, od, x_a, x_b, amp, scalers)
        _sync(dev)
    events = prof.key_averages()

    def dev_time(e):
        return e.self_device_time_total  # 0 for operations that run no kernel (and on CPU)

    launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel"))
    # every aten operation the profiler saw, nested ones included: on a GPU each costs the
    # launching CPU its dispatch, so this counts what a launch-bound step pays for on any device
    dispatched = sum(e.count for e in events if e.key.startswith("aten::"))
    cpu_ms = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    dev_ms = sum(dev_time(e) for e in events) / steps / 1e3
    over = f"{steps} iteration{'s' if steps > 1 else ''}"
    print(f"\nWhere one eager iteration goes ({size} px, {precision}{label}; torch.profiler over {over}): "
          f"{dispatched / steps:.0f} aten operations, {flops / 1e9:.0f} GFLOP, "
          f"{launches / steps:.0f} kernel launches, {cpu_ms:.0f} ms of CPU time and {dev_ms:.0f} ms of "
          f"{dev.type} kernel time per iteration ("
          + ("a CPU dry run: no device time" if dev.type == "cpu" else
             "bound by the CPU that launches the kernels" if cpu_ms > dev_ms else "bound by the device") + ")")
    if not top:
        return
    print("| operation | calls per iteration | device ms per iteration | CPU ms per iteration |\n| --- | --- | --- | --- |")
    for e in sorted(events, key=lambda e: -(dev_time(e) or e.self_cpu_time_total))[:top]:
        print(f"| {e.key[:70]} | {e.count / steps:.0f} | {dev_time(e) / steps / 1e3:.1f} | "
              f"{e.self_cpu_time_total / steps / 1e3:.1f} |")


def plain_upsampling(base):
    """A copy of `base` whose upsampling blocks run nearest upsample, pad and 5x5 conv as written
    (model.fused_upsample: false), the same weights."""
    unit = copy.deepcopy(base)
    set_fused_upsample(unit, False)
    return unit


def gpu_layouts(args, dev, bases):
    """Eager bf16 and fp32 with channels-last weights and inputs, with cudnn.benchmark, and with
    the plain upsampling block (fewer, larger operations), each against the default case in the
    same loop, at the first size (the most launch-bound): does any of them cut the step?"""
    print(f"\nEager layouts (median of {args.repeats} after {args.warmup} warm-up)\n"
          "| px | precision | channels-last | cudnn.benchmark | upsampling | ms/iter |\n"
          "| --- | --- | --- | --- | --- | --- |")
    variants = [(cl, bench, True) for cl in (False, True) for bench in (False, True)] + [(False, False, False)]
    before = torch.backends.cudnn.benchmark
    try:
        size = args.sizes[0]
        base = bases[size]
        plain = plain_upsampling(base)
        for precision in ("bf16", "fp32"):
            for cl, bench, fused in variants:
                torch.backends.cudnn.benchmark = bench
                r = gpu_case(base if fused else plain, dev, size, args.batch, precision, "off",
                             args.repeats, args.warmup, cl)
                print(f"| {size} | {precision} | {'yes' if cl else 'no'} | {'on' if bench else 'off'} "
                      f"| {'fused' if fused else 'plain'} | {r['s'] * 1e3:.1f} |", flush=True)
    finally:
        torch.backends.cudnn.benchmark = before


def print_gpu_table(args, name, peak, rows):
    dis = f", discriminator width {args.dis_dim}" if args.dis_dim else ""
    print(f"\nUNIT iteration on {name}, preset {args.preset}, dim {args.dim}{dis}, batch {args.batch} per domain; "
          f"median of {args.repeats} after {args.warmup} warm-up (compile time included there); "
          f"fp32 convs may use TF32 (cudnn default); "
          + (f"MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else
             "MFU: unknown device, no peak in bench/step.py's GPU_PEAKS table"))
    print("| px | precision | compile | images/s (2 domains) | ms/iter | TFLOP/s | MFU | peak memory GiB "
          "| warm-up s | losses finite |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, precision, compiled, flops, r in rows:
        head = f"| {size} | {precision} | {COMPILE_LABELS[compiled]} "
        if "error" in r or "skipped" in r:
            print(head + f"| {'failed: ' + r['error'] if 'error' in r else r['skipped']} | | | | | | |")
            continue
        tflops = flops / r["s"] / 1e12
        mfu = f"{tflops * 1e12 / peak:.3f}" if peak else "n/a (unknown device)"
        mem = "n/a" if r["mem"] is None else f"{r['mem'] / 2 ** 30:.2f}"
        print(head + f"| {2 * args.batch / r['s']:.0f} | {r['s'] * 1e3:.1f} | {tflops:.1f} | {mfu} | "
              f"{mem} | {r['warm_s']:.0f} | {'yes' if r['finite'] else 'NO'} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="official")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=None, help="generator width (default: 32 on CPU, the preset's on GPU)")
    ap.add_argument("--dis-dim", type=int, default=None,
                    help="--gpu-matrix: the discriminators' width (default: the preset's; narrow for CPU dry runs)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7 on CPU, 20 on GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2 on CPU, 3 on GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also: where one iteration of ours spends its time "
                    "(with --gpu-matrix: kernel launches, CPU and device time of an eager bf16 iteration)")
    ap.add_argument("--layouts", action="store_true", help="--gpu-matrix: also eager bf16/fp32 with channels-last, "
                    "cudnn.benchmark and the plain upsampling block")
    ap.add_argument("--gpu-matrix", action="store_true", help="the fp32/bf16/fp16 x compile table on a CUDA GPU")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sizes of --gpu-matrix")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", nargs="+", choices=list(COMPILE_MODES), default=["off", "on"],
                    help="torch.compile settings of --gpu-matrix (graphs: mode reduce-overhead, CUDA graphs)")
    ap.add_argument("--parallel-compile", action="store_true", help="--gpu-matrix: compile the compiled cases "
                    "side by side, one process each, then time them one at a time")
    ap.add_argument("--compile-procs", type=int, default=0, help="--parallel-compile: at most this many "
                    "compiling at once (0: all)")
    ap.add_argument("--timing-s", type=float, default=0, help="--parallel-compile: time the compiled cases "
                    "within this many seconds once compiled (0: no limit); one that takes longer is a failed row")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (eager: a quick dry run)")
    ap.add_argument("--batch-sweep", type=int, nargs="*", default=[], metavar="B",
                    help="--gpu-matrix: also eager bf16 at the first size with these batches per domain")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="--gpu-matrix: start no case after this many seconds (0: no limit); eager cases run "
                    "first; with --parallel-compile, a compiled case not ready by then is stopped")
    ap.add_argument("--device", default="cuda", help="--gpu-matrix's device (cpu: a dry run of the code)")
    ap.add_argument("--steady-heap", action="store_true", help="CPU: glibc keeps and reuses freed memory, so "
                    "no loop's time depends on what the allocator kept from the others (see steady_heap)")
    args = ap.parse_args(argv)
    args.heap = steady_heap() if args.steady_heap else "glibc's defaults"
    gpu = args.gpu_matrix
    args.repeats = args.repeats or (20 if gpu else 7)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    if args.dim is None:
        args.dim = UNIT.from_config({"preset": args.preset}).cfg.dim if gpu else 32
    if gpu:
        return gpu_main(args)
    cpu_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
