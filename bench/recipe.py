"""Recipe sweep: one UNIT variant at a time, in one process, scored on the paired demo split.

Quick A/B of training recipes (image size, width, learning rates, loss weights, discriminator,
norms, latent noise, batch size) without the launcher: the same model, losses and step order
as the trainer (G step on the frozen discriminators, then a D step on the same iteration's
fakes; Adam with L2 decay; EMA of the generator side), on the demo corpus loaded into memory.
Every `--every` steps it prints a2b / b2a pixel accuracy of the raw and EMA weights and the
reconstruction accuracy of maps (B -> B, the ceiling a blurry autoencoder sets), and at the end
a per-colour diagnosis of the a2b translations (how much of each map colour it gets right, and
what it paints there on average) next to the constant baseline.

    .venv/bin/python bench/recipe.py [--size 64] [--steps 600] [--batch 8] [--lr 2e-4] [--lr-d 2e-4]
        [--schedule constant|warmup_decay [--warmup N]]
        [--beta2 0.999] [--d-steps 1] [--ema 0.995] [--noise 1.0] [--threads 1] [--no-flip] [--variant NAME (bench/recipe_variants.py)]
        [--swd W [--swd-proj 16] [--swd-dirs a2b,b2a]] [--palette-freq W] [--r1 W] [model.key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.release.baselines import DomainStats, translators  # noqa: E402
from launch.release.evaluate import pixel_accuracy, pixel_correct  # noqa: E402
from model.ema import EMA  # noqa: E402
from model.unit import UNIT, discriminator_loss, generator_loss, r1_loss  # noqa: E402
from classes import colour_classes  # noqa: E402
from recipe_variants import VARIANTS, palette_head  # noqa: E402

DEMO_MODEL = {"preset": "paper", "dim": 16, "n_down": 2, "n_res": 2, "dis_dim": 16, "dis_layers": 3,
              "dis_scales": 2}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("demo", "shift"), default="demo",
                    help="demo: aerial photo -> map; shift: bench/quality.py's tone-shifted photographs")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lr-d", type=float, default=None, help="default: --lr")
    ap.add_argument("--schedule", choices=("constant", "warmup_decay"), default="constant",
                    help="both learning rates as optim.schedule sets them in the trainer: warmup_decay rises "
                         "linearly over --warmup steps, then falls linearly to 0 at the last step")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps of --schedule warmup_decay")
    ap.add_argument("--beta2", type=float, default=0.999, help="both Adams' beta2 (beta1 is 0.5; configs/demo.yaml: 0.95)")
    ap.add_argument("--d-steps", type=int, default=1, help="discriminator updates per generator update "
                                                          "(on the same iteration's fakes)")
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--noise", type=float, default=1.0, help="std of the latent noise in training (paper: 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-flip", dest="flip", action="store_false",
                    help="no horizontal flips in training (the photos' shadows fall to the lower right)")
    ap.add_argument("--swd", type=float, default=0.0, help="weight of a sliced Wasserstein-1 term between the pixel colours of each "
                    "translation batch and a real target-domain batch (0: off)")
    ap.add_argument("--swd-proj", type=int, default=16, help="random projection directions of --swd, "
                    "beside the 3 channel axes")
    ap.add_argument("--swd-dirs", default="a2b,b2a", help="the translations --swd applies to")
    ap.add_argument("--palette-freq", type=float, default=0.0, help="with model.palette_b: weight of a term "
                    "matching how often the translations and the real maps use each palette colour (0: off)")
    ap.add_argument("--r1", type=float, default=0.0, help="model.w_r1: weight of an R1 penalty (squared gradient of each "
                    "discriminator's output on real images, Mescheder et al. 2018) in the D step (0: off)")
    ap.add_argument("--avg-from", type=int, default=0, help="also score a uniform average of the generator's "
                    "weights from this step on (Polyak / SWA style; 0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "unit-recipe"))
    ap.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                    help="experimental change from bench/recipe_variants.py (repeatable)")
    ap.add_argument("overrides", nargs="*", help="model.key=value on top of the demo model")
    return ap.parse_args(argv)


def corpus(out: Path, n_train: int, n_test: int, size: int, task: str = "demo") -> dict:
    """The task's four folders as uint8 arrays: the demo corpus (aerial photo -> map) or
    bench/quality.py's shift task (photographs -> a per-channel tone-shifted copy)."""
    from PIL import Image

    from pipeline.demo import write_corpus
    import os
    import shutil
    root = out / f"{task}{size}-{n_train}-{n_test}"
    if not root.is_dir():  # made under a temporary name, so a concurrent sweep never reads half of it
        tmp = out / f".{root.name}.tmp-{os.getpid()}"
        if task == "shift":
            from quality import make_shift_corpus
            make_shift_corpus(tmp, n_train, n_test, size)
        else:
            write_corpus(str(tmp), n_train, n_test, size=size, seed=0, progress=False)
        try:
            tmp.rename(root)
        except OSError:  # another sweep finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    load = lambda d: np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / d).iterdir())])  # noqa: E731
    return {d: load(d) for d in ("trainA", "trainB", "testA", "testB")}


def tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def uint8(y: torch.Tensor) -> np.ndarray:
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def swd(x, y, k):
    """Sliced Wasserstein-1 between the pixel colours of x and y (same count): both sets projected
    on the channel axes and k random unit directions, sorted, compared in order."""
    px, py = x.permute(0, 2, 3, 1).reshape(-1, 3), y.permute(0, 2, 3, 1).reshape(-1, 3)
    d = torch.randn(3, k)
    d = torch.cat([torch.eye(3), d / d.norm(dim=0, keepdim=True)], 1)
    return ((px @ d).sort(0).values - (py @ d).sort(0).values).abs().mean()


def palette_shares(x: torch.Tensor, colours: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """[K]: the share of x's pixels ([B, C, H, W], in [-1, 1]) near each palette colour ([K, C]),
    softly (softmax of minus the squared distance / tau), so that it has a gradient."""
    d = (x.unsqueeze(1) - colours.view(1, *colours.shape, 1, 1)).pow(2).sum(2)  # [B, K, H, W]
    return (-d / tau).softmax(1).mean(dim=(0, 2, 3))


def palette_frequency(fake: torch.Tensor, real: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Total-variation distance between how often the translations and the real images of a flat-
    coloured domain use each palette colour: a translator that paints a map's land in the colour
    of its roads keeps every other loss happy, but not this one."""
    with torch.no_grad():
        want = palette_shares(real, colours)
    return 0.5 * (palette_shares(fake, colours) - want).abs().sum()


def with_noise(gen, std: float):
    """Training latent noise of another std than the paper's 1 (0: a plain autoencoder)."""
    def sample(mu, n=None):
        if not gen.training or std == 0:
            return mu
        chunks = mu.split(n) if n else (mu,)
        return mu + std * torch.cat([torch.randn_like(c) for c in chunks])
    gen.sample = sample


@torch.no_grad()
def uniform_average(avg: dict | None, module, k: int) -> dict:
    """The running mean of module's state over k + 1 updates (floats averaged, the rest copied)."""
    state = module.state_dict()
    if avg is None:
        return {n: v.detach().clone() for n, v in state.items()}
    for n, v in state.items():
        if v.is_floating_point():
            avg[n] += (v.detach() - avg[n]) / (k + 1)
        else:
            avg[n].copy_(v)
    return avg


def flip_average(gen, x: torch.Tensor, direction: str, unflipped: torch.Tensor) -> torch.Tensor:
    """gen's translations of x averaged over the four flips of the input, each flipped back;
    `unflipped` is the translation of x itself, already computed."""
    flipped = [gen.translate(x.flip(dims), direction).flip(dims) for dims in ((-1,), (-2,), (-2, -1))]
    return torch.stack([unflipped, *flipped]).mean(0)


@torch.no_grad()
def scores(gen, data: dict) -> tuple[float, float, float, np.ndarray, np.ndarray]:
    gen.eval()
    x_a, x_b = tensor(data["testA"]), tensor(data["testB"])
    y_ab, y_ba = gen.translate(x_a, "a2b"), gen.translate(x_b, "b2a")
    ab, ba = uint8(y_ab), uint8(y_ba)
    bb = uint8(gen.decode(gen.encode(x_b, "b"), "b", x_b))
    # diagnostic: translations averaged over the four flips of the input, an estimate of how much
    # of the error is texture the translator invents rather than a wrong shade
    flip_ab, flip_ba = flip_average(gen, x_a, "a2b", y_ab), flip_average(gen, x_b, "b2a", y_ba)
    head = palette_head(gen)
    if head is not None:  # the average is put back on the palette
        flip_ab = head.snap(flip_ab)
    print(f"    averaged over 4 flips: a2b {pixel_accuracy(uint8(flip_ab), data['testB']):.3f} "
          f"b2a {pixel_accuracy(uint8(flip_ba), data['testA']):.3f}", flush=True)
    gen.train()
    return (pixel_accuracy(ab, data["testB"]), pixel_accuracy(ba, data["testA"]),
            pixel_accuracy(bb, data["testB"]), ab, ba)


def per_colour(pred: np.ndarray, truth: np.ndarray, maps: np.ndarray, top: int = 8) -> str:
    """Accuracy of pred against truth per class, the classes being the colours of the paired maps."""
    ok = pixel_correct(pred, truth)
    # "flat": the class's pixels all painted its mean painted colour, so that accuracy minus the
    # translator's is what the texture it invents there costs (a sampler pays it; a blur does not)
    lines = ["| map colour | share of pixels | accuracy there | flat at the painted mean | mean colour painted there "
             "| mean true colour there |", "| --- | --- | --- | --- | --- | --- |"]
    for rgb, m, share in colour_classes(maps, top):
        painted, there = pred[m].mean(0).round(), truth[m][None]  # [1, N, 3]: pixel_correct's [..., H, W, 3]
        flat = pixel_correct(np.broadcast_to(painted, there.shape), there).mean()
        lines.append(f"| {rgb} | {share:.3f} | {ok[m].mean():.3f} | "
                     f"{flat:.3f} | {tuple(int(c) for c in painted)} | "
                     f"{tuple(int(c) for c in there[0].mean(0).round())} |")
    return "\n".join(lines)


def model_config(base: dict, overrides, stats: dict[str, DomainStats]) -> dict:
    """`base` plus `model.key=value` overrides (values read as YAML), with model.palette_x=auto
    measured on domain x's training `stats`, as the trainer does (launch/training/palette.py)."""
    model = dict(base)
    for kv in overrides:
        k, _, v = kv.partition("=")
        model[k.removeprefix("model.")] = yaml.safe_load(v)
    for d in ("a", "b"):
        if model.get(f"palette_{d}") == "auto":
            colours, share = stats[d].palette()
            print(f"palette_{d}: {len(colours)} colours holding {share:.1%} of the pixels", flush=True)
            model[f"palette_{d}"] = colours.tolist()
    return model


def lr_factor(args, i: int) -> float:
    """The learning rate's factor after `i` optimizer steps (DeepSpeed's WarmupDecayLR with a
    linear warm-up, as launch/config.py asks for it)."""
    if args.schedule == "constant":
        return 1.0
    warmup = max(1, args.warmup)  # as launch/config.py sets warmup_num_steps: the first step has lr 0
    if i < warmup:
        return i / warmup
    return max(0.0, (args.steps - i) / max(1, args.steps - warmup))


@dataclass
class Sweep:
    """One variant's training state: the model, its optimizers and schedules, the EMA and the
    generator copy the EMA (or a uniform average) is scored in."""
    model: dict
    unit: UNIT
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scheds: list
    ema: EMA
    shadow: torch.nn.Module
    polyak: dict | None = None


def build(args, stats: dict[str, DomainStats], data: dict) -> Sweep:
    model = model_config(DEMO_MODEL, args.overrides, stats)
    if args.r1:
        model["w_r1"] = args.r1
    torch.manual_seed(args.seed)
    unit = UNIT.from_config({**model, "image_size": args.size})
    for name in args.variant:
        VARIANTS[name](unit, data)
    with_noise(unit.gen, args.noise)
    betas = (0.5, args.beta2)
    opt_g = torch.optim.Adam(unit.gen.parameters(), lr=args.lr, betas=betas, weight_decay=1e-4)
    opt_d = torch.optim.Adam(unit.dis.parameters(), lr=args.lr_d or args.lr, betas=betas, weight_decay=1e-4)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: lr_factor(args, i)) for o in (opt_g, opt_d)]
    return Sweep(model, unit, opt_g, opt_d, scheds, EMA(unit.gen, args.ema), copy.deepcopy(unit.gen))


def generator_step(args, sw: Sweep, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
    """The G step on the frozen discriminators, with the sweep's extra terms; the pass's outputs."""
    unit = sw.unit
    out = unit.gen(x_a, x_b)
    unit.dis.requires_grad_(False)
    loss_g, _ = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)
    if args.swd:
        pairs = {"a2b": (out["x_ab"], x_b), "b2a": (out["x_ba"], x_a)}
        loss_g = loss_g + args.swd * sum(swd(*pairs[d], args.swd_proj) for d in args.swd_dirs.split(","))
    if hasattr(unit.gen, "extra_loss"):  # a variant's own term (bench/recipe_variants.py)
        loss_g = loss_g + unit.gen.extra_loss(out, x_a, x_b)
    if args.palette_freq:
        pal = torch.tensor(sw.model["palette_b"], dtype=torch.float32) / 127.5 - 1
        loss_g = loss_g + args.palette_freq * palette_frequency(out["x_ab"], x_b, pal)
    sw.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    sw.opt_g.step()
    unit.dis.requires_grad_(True)
    return out


def discriminator_steps(args, sw: Sweep, out: dict, x_a: torch.Tensor, x_b: torch.Tensor, step: int) -> dict:
    """`args.d_steps` D steps on the same iteration's fakes; the last one's terms."""
    unit = sw.unit
    for _ in range(args.d_steps):
        loss_d, terms_d = discriminator_loss(unit.dis(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach()),
                                             unit.cfg)
        penalty, _ = r1_loss(unit.dis, x_a, x_b, unit.cfg, step)
        if penalty is not None:
            loss_d = loss_d + penalty
        if hasattr(unit.dis, "extra_loss"):  # a variant's own discriminator (bench/recipe_variants.py)
            loss_d = loss_d + unit.dis.extra_loss(out, x_a, x_b)
        sw.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        sw.opt_d.step()
    return terms_d


def report(args, sw: Sweep, data: dict, step: int, seconds: float, terms_d: dict, chance: float):
    """Scores of the raw, the EMA and (from --avg-from) the uniformly averaged weights; the EMA's."""
    raw = scores(sw.unit.gen, data)
    sw.shadow.load_state_dict(sw.unit.gen.state_dict())
    sw.ema.copy_to(sw.shadow)
    avg = scores(sw.shadow, data)
    print(f"step {step} ({seconds:.0f} s): raw a2b {raw[0]:.3f} b2a {raw[1]:.3f} "
          f"B->B {raw[2]:.3f} | EMA a2b {avg[0]:.3f} b2a {avg[1]:.3f} B->B {avg[2]:.3f} | "
          f"D loss a {float(terms_d['d_a']):.3f} b {float(terms_d['d_b']):.3f} (chance {chance:.1f})", flush=True)
    if args.avg_from and step >= args.avg_from:
        sw.shadow.load_state_dict(sw.polyak)
        uni = scores(sw.shadow, data)
        print(f"    uniform average from step {args.avg_from}: a2b {uni[0]:.3f} b2a {uni[1]:.3f} "
              f"B->B {uni[2]:.3f}", flush=True)
        sw.shadow.load_state_dict(sw.unit.gen.state_dict())
        sw.ema.copy_to(sw.shadow)  # the EMA weights again, for the per-colour diagnosis
    return avg


def report_end(args, sw: Sweep, data: dict, stats: dict[str, DomainStats], avg) -> None:
    """The trivial baselines, and on the demo task the EMA's a2b / b2a per map colour."""
    trivial = translators(stats)
    const, hist = (trivial[name](data["testA"], "a2b") for name in ("constant", "histmatch"))
    print(f"\nbaselines: constant a2b {pixel_accuracy(const, data['testB']):.3f}, histogram matching a2b "
          f"{pixel_accuracy(hist, data['testB']):.3f}")
    if args.task != "demo":
        return
    print("EMA a2b per map colour:")
    print(per_colour(avg[3], data["testB"], data["testB"]))
    head = palette_head(sw.shadow)
    if head is not None:  # what training sees: a fields pixel painted as land plus a few levels of
        # yellow is land at eval, but can still carry the field through the cycle
        with torch.no_grad():
            sw.shadow.eval()
            head.train()
            mix = uint8(sw.shadow.translate(tensor(data["testA"]), "a2b"))
            head.eval()
        print("EMA a2b per map colour, the training-time mixture (before the nearest palette colour):")
        print(per_colour(mix, data["testB"], data["testB"]))
    print("EMA b2a per map colour:")
    print(per_colour(avg[4], data["testA"], data["testB"]))


def train(args, data: dict) -> None:
    stats = {"a": DomainStats.empty().add(data["trainA"]), "b": DomainStats.empty().add(data["trainB"])}
    sw = build(args, stats, data)
    a, b = tensor(data["trainA"]), tensor(data["trainB"])
    rng, t0 = np.random.default_rng(args.seed), time.perf_counter()
    # D loss of a discriminator that cannot tell: per scale 0.25 + 0.25 (LSGAN at 0.5), 2 ln 2 (NSGAN), 2 (hinge)
    per_scale = {"lsgan": 0.5, "nsgan": 2 * float(np.log(2)), "hinge": 2.0}[sw.unit.cfg.gan_type]
    chance = per_scale * len(sw.unit.dis.dis_a(a[:1]))
    print(f"model {sw.model}, lr {args.lr}/{args.lr_d or args.lr}, batch {args.batch}, EMA {args.ema}, "
          f"latent noise {args.noise}, {args.size}px, schedule {args.schedule} (warm-up {args.warmup})", flush=True)
    for step in range(1, args.steps + 1):
        x_a, x_b = a[rng.integers(len(a), size=args.batch)], b[rng.integers(len(b), size=args.batch)]
        # (the draws happen with --no-flip too: the same batches as the flipped run)
        x_a, x_b = (x.flip(-1) if rng.random() < 0.5 and args.flip else x for x in (x_a, x_b))
        out = generator_step(args, sw, x_a, x_b)
        terms_d = discriminator_steps(args, sw, out, x_a, x_b, step)
        for sched in sw.scheds:
            sched.step()
        sw.ema.update(sw.unit.gen)
        if args.avg_from and step >= args.avg_from:
            sw.polyak = uniform_average(sw.polyak if step > args.avg_from else None, sw.unit.gen, step - args.avg_from)
        if step % args.every == 0 or step == args.steps:
            avg = report(args, sw, data, step, time.perf_counter() - t0, terms_d, chance)
    report_end(args, sw, data, stats, avg)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args, corpus(Path(args.out), args.n_train, args.n_test, args.size, args.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
