"""UNIT (Liu, Breuel, Kautz 2017): two VAE-GANs whose high-level layers are shared.

Usage (see docs/contracts.md, "Model"):

    unit = UNIT.from_config({"preset": "paper", "dim": 32})
    out = unit.gen(x_a, x_b)                                  # every pass once
    loss_g, terms_g = generator_loss(out, x_a, x_b, unit.dis, unit.cfg)   # dis frozen by caller
    preds = unit.dis(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach())
    loss_d, terms_d = discriminator_loss(preds, unit.cfg)
    y = unit.translate(x, "a2b")                              # uses mu, no noise

The discriminator step reuses the fakes of the generator pass of the same iteration; the
official code runs a second encode/decode pass for it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import losses
from .networks import (ACTIVATIONS, DIS_NORMS, NORMS, PADDINGS, MultiScaleDiscriminator,
                       PaletteHead, count_params, decoder_back, encoder_front, init_gaussian, init_kaiming,
                       res_blocks)


SKIPS = ("none", "image")
# Test-time views translate() averages in eval mode (UNITConfig.tta): how many flips of the input.
TTA_VIEWS = {"none": 1, "hflip": 2, "flips": 4}


@dataclass
class UNITConfig:
    preset: str = "paper"      # name of the preset these values started from (informational)
    channels: int = 3          # image channels of both domains
    dim: int = 64              # width of the first encoder conv; doubles at each downsampling
    n_down: int = 2            # stride-2 convs in each encoder (= upsampling steps in each generator)
    n_res: int = 4             # residual blocks per encoder and per generator, shared ones included
    n_shared: int = 1          # of those, how many are one shared module (last of E, first of G); 0 = no sharing
    norm: str = "in"           # norm of encoder convs and residual blocks
    up_norm: str = "ln"        # norm of the generator's upsampling convs
    activ: str = "relu"        # activation of encoders and generators
    pad_type: str = "reflect"  # padding of encoders and generators
    fused_upsample: bool = True  # upsample+conv5x5 as sub-pixel 3x3 convs: same function, fewer FLOPs
    skip: str = "none"         # "image": each generator's last stage also sees the source image (SkipHead)
    palette_a: list | str = dataclasses.field(default_factory=list)  # [[r, g, b], ...]: G_a paints only these (PaletteHead)
    palette_b: list | str = dataclasses.field(default_factory=list)  # the same for G_b; [] a tanh RGB head; "auto" see check_palette
    dis_dim: int = 64          # width of the first discriminator conv
    dis_layers: int = 4        # stride-2 convs per discriminator scale
    dis_scales: int = 3        # most scales per discriminator (fewer on small images)
    dis_min_size: int = 16     # a scale runs only while its input is at least this many pixels
    dis_norm: str = "none"     # discriminator conv normalisation: none or sn (spectral norm)
    dis_colour_octaves: int = 0  # > 0: the discriminators also see sin/cos(2^k pi x), k < this (ColourFeatures)
    dis_activ: str = "lrelu"   # discriminator activation
    dis_pad: str = "reflect"   # discriminator padding
    image_size: int = 0        # if > 0, build only the discriminator scales this size uses (no unused params)
    gan_type: str = "lsgan"    # adversarial loss: lsgan, nsgan or hinge
    w_gan: float = 10.0        # lambda0: adversarial terms (generator and discriminator)
    w_recon: float = 100.0     # lambda2: reconstruction L1
    w_kl: float = 0.1          # lambda1: KL of the encodings of real images
    w_cyc: float = 100.0       # lambda4: cycle reconstruction L1
    w_cyc_b: float | None = None  # the b cycle's own weight (x_bab against x_b; None: w_cyc), see generator_loss
    w_cyc_kl: float = 0.1      # lambda3: KL of the encodings of translated images
    w_r1: float = 0.0          # R1 penalty in the D step (r1_loss); not in the paper or the official code
    r1_every: int = 1          # lazy R1 (StyleGAN2): the penalty in every r1_every-th D step only, weighted by it
    expected: str = ""         # domains ("a", "b", "ab") whose translations an expected decoder paints (UNITGenerator._expected)
    cycle_detach: bool = False  # the cycle half sees the translations detached: back-translation (UNITGenerator.forward)
    w_hue: float = 0.0         # translations keep their source's hue where it changes (losses.hue_corr)
    hue_axes: str = "both"     # the opponent axes w_hue compares: both, or "rg" (red-green) only
    hue_pool: int = 1          # w_hue correlates the mean colours of hue_pool x hue_pool blocks
    hue_into: str = "ab"       # the domains whose translations w_hue shapes ("a": x_ba, "b": x_ab)
    tta: str = "none"          # eval-mode translate() averages over flips of the input: none, hflip, flips (h, v, both)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"UNIT config: {name}={getattr(self, name)!r} {why}")

        for name in ("channels", "dim", "n_res", "dis_dim", "dis_layers", "dis_scales", "r1_every", "hue_pool"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        for name in ("n_down", "n_shared", "dis_min_size", "dis_colour_octaves", "image_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be an integer >= 0")
        if self.n_shared > self.n_res:
            bad("n_shared", f"must be <= n_res ({self.n_res})")
        for name, allowed in (("norm", NORMS), ("up_norm", NORMS), ("activ", ACTIVATIONS),
                              ("pad_type", PADDINGS), ("dis_norm", DIS_NORMS),
                              ("dis_activ", ACTIVATIONS), ("dis_pad", PADDINGS),
                              ("gan_type", losses.GAN_TYPES), ("skip", SKIPS), ("hue_axes", losses.HUE_AXES),
                              ("tta", tuple(TTA_VIEWS))):
            if getattr(self, name) not in allowed:
                bad(name, f"is not one of {allowed}")
        for name in ("w_gan", "w_recon", "w_kl", "w_cyc", "w_cyc_b", "w_cyc_kl", "w_r1", "w_hue"):
            v = getattr(self, name)
            if name == "w_cyc_b" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, "must be a finite number >= 0")  # NaN passes `v < 0`
            setattr(self, name, float(v))
        if self.expected is None:  # `model.expected=` on the command line
            self.expected = ""
        if not isinstance(self.expected, str) or len(set(self.expected)) != len(self.expected) \
                or not set(self.expected) <= {"a", "b"}:
            bad("expected", 'must be "", "a", "b" or "ab"')
        if self.hue_into not in ("a", "b", "ab"):
            bad("hue_into", 'must be "a", "b" or "ab"')
        for name in ("fused_upsample", "cycle_detach"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        for name in ("palette_a", "palette_b"):
            setattr(self, name, check_palette(name, getattr(self, name), self.channels))
        if self.image_size and self.image_size % (2 ** self.n_down):
            bad("image_size", f"must be divisible by 2**n_down = {2 ** self.n_down}")


def check_palette(name: str, palette, channels: int) -> list[list[int]] | str:
    """A palette as a list of distinct colours, each `channels` integers in 0..255 (or empty), or
    "auto": to be measured on the domain's training images by whoever builds the model (the
    trainer does, launch/training/palette.py); a generator cannot be built from "auto"."""
    if palette is None:
        return []
    if palette == "auto":
        return palette
    if isinstance(palette, (str, bytes)) or not hasattr(palette, "__iter__"):
        raise ValueError(f"UNIT config: {name}={palette!r} must be a list of colours [[r, g, b], ...]")
    out = []
    for c in palette:
        c = list(c) if hasattr(c, "__iter__") and not isinstance(c, (str, bytes)) else [c]
        if len(c) != channels or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                         for v in c):
            raise ValueError(f"UNIT config: {name} colour {c!r} is not {channels} integers in 0..255")
        out.append(c)
    if len(out) == 1 or len(out) > 256:
        raise ValueError(f"UNIT config: {name} has {len(out)} colours; give 2 to 256 (or none)")
    if len({tuple(c) for c in out}) != len(out):
        raise ValueError(f"UNIT config: {name} lists a colour twice")
    return out


# The official code's master defaults (configs/*_folder.yaml): no sharing, LSGAN, weights / 10.
_OFFICIAL = dict(preset="official", n_shared=0, gan_type="lsgan",
                 w_gan=1.0, w_recon=10.0, w_kl=0.01, w_cyc=10.0, w_cyc_kl=0.01)
# The paper: one shared residual block in E and G, lambda0..4 = 10, 0.1, 100, 0.1, 100.
# The paper's L_GAN is the log-loss GAN; LSGAN is kept (the default, and what the
# authors' later code uses), nsgan is one override away.
_PAPER = dict(preset="paper", n_shared=1, gan_type="lsgan",
              w_gan=10.0, w_recon=100.0, w_kl=0.1, w_cyc=100.0, w_cyc_kl=0.1)
# Small enough for CPU tests at 32x32.
_TINY = dict(_PAPER, preset="tiny", dim=16, n_down=2, n_res=1, n_shared=1,
             dis_dim=16, dis_layers=2, dis_scales=2, dis_min_size=16)

PRESETS: dict[str, dict] = {"paper": _PAPER, "official": _OFFICIAL, "tiny": _TINY}
RETIRED = ("ema_decay",)  # fields of earlier versions, ignored when read back


def make_config(d: dict | None = None) -> UNITConfig:
    """UNITConfig from {"preset": name, **overrides}; unknown keys fail with their names."""
    d = dict(d or {})
    # Saved by earlier versions (exports, checkpoints); the trainer owns the EMA now (train.ema_decay).
    for key in RETIRED:
        d.pop(key, None)
    name = d.pop("preset", "paper")
    if name not in PRESETS:
        raise ValueError(f"UNIT config: preset {name!r} is not one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(UNITConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"UNIT config: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    return UNITConfig(**{**PRESETS[name], "preset": name, **d})


class UNITGenerator(nn.Module):
    """Encoders and generators of both domains; the shared layers exist once."""

    def __init__(self, cfg: UNITConfig):
        super().__init__()
        latent = cfg.dim * 2 ** cfg.n_down
        own = cfg.n_res - cfg.n_shared
        # image sides must be multiples of this: each down-sampling step halves them
        self.input_multiple = 2 ** cfg.n_down

        def front():
            return encoder_front(cfg.channels, cfg.dim, cfg.n_down, own, cfg.norm, cfg.activ, cfg.pad_type)

        self.skip = cfg.skip == "image"
        self.cycle_detach = cfg.cycle_detach
        self.tta_views = TTA_VIEWS[cfg.tta]

        for name in ("palette_a", "palette_b"):
            if getattr(cfg, name) == "auto":
                raise ValueError(f"UNIT config: {name}='auto' must be replaced by the colours measured on "
                                 "the domain's training images before the model is built")

        def back(palette):
            return decoder_back(cfg.channels, latent, cfg.n_down, own, cfg.norm, cfg.up_norm,
                                cfg.activ, cfg.pad_type, cfg.fused_upsample, self.skip, palette)

        self.enc_a, self.enc_b = front(), front()
        self.enc_shared = res_blocks(cfg.n_shared, latent, cfg.norm, cfg.activ, cfg.pad_type)
        self.dec_shared = res_blocks(cfg.n_shared, latent, cfg.norm, cfg.activ, cfg.pad_type)
        self.dec_a, self.dec_b = back(cfg.palette_a), back(cfg.palette_b)
        init_kaiming(self)
        # Expected decoders (why and how: _expected), built and initialised on a fork of the RNG:
        # the GAN model then starts from, and trains on, the same random numbers as without them
        self.expected = "".join(sorted(cfg.expected))
        with torch.random.fork_rng(devices=[]):
            for d in self.expected:
                setattr(self, f"exp_{d}", back(getattr(cfg, f"palette_{d}")))
                init_kaiming(getattr(self, f"exp_{d}"))

    def encoder(self, domain: str) -> nn.Sequential:
        """E_domain as one module: its own layers, then the shared ones (the same object for a and b)."""
        return nn.Sequential(self._part("enc", domain), self.enc_shared)

    def decoder(self, domain: str) -> nn.Sequential:
        """G_domain as one module: the shared layers (the same object for a and b), then its own."""
        return nn.Sequential(self.dec_shared, self._part("dec", domain))

    def _part(self, kind: str, domain: str) -> nn.Module:
        if domain not in ("a", "b"):
            raise ValueError(f"domain {domain!r} is not 'a' or 'b'")
        return getattr(self, f"{kind}_{domain}")

    def head(self, domain: str) -> nn.Module:
        """The last layer that paints `domain`'s images (a PaletteHead, or the tanh RGB head)."""
        return self._head_of("dec", domain)

    def encode(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        """mu of q(z | x) for an image of `domain`."""
        return self.enc_shared(self._part("enc", domain)(x))

    def decode(self, z: torch.Tensor, domain: str, source: torch.Tensor | None = None) -> torch.Tensor:
        """G_domain(z); a model built with skip="image" also needs the image z was encoded from."""
        return self._back(domain, self.dec_shared(z), source)

    def _back(self, domain: str, s: torch.Tensor, source: torch.Tensor | None, kind: str = "dec") -> torch.Tensor:
        part = self._part(kind, domain)
        if not self.skip:
            return part(s)
        if source is None:
            raise ValueError("this generator was built with skip='image': decode needs the source image")
        return part[-1](part[:-1](s), source)

    def sample(self, mu: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """z = mu + eps, eps ~ N(0, I) in training (torch's global RNG); mu in eval mode.

        With `n`, eps is drawn per chunk of n samples, in order, so a batched pass draws the
        same numbers as one pass per domain.
        """
        if not self.training:
            return mu
        chunks = mu.split(n) if n else (mu,)
        # randn(shape), not randn_like: the same numbers whatever mu's memory layout
        return mu + torch.cat([torch.randn(c.shape, dtype=c.dtype, device=c.device) for c in chunks])

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """One full pass: encode, reconstruct, translate, re-encode the translations, cycle back.

        Batching trick: the shared layers run once on both domains' batch, and G_a / G_b each
        run once on [z_a, z_b], giving the reconstruction and the translation together. Exact
        with per-sample norms (in, ln); with norm="bn" the batch statistics of those layers
        cover both domains' images (and the running statistics used in eval mode too).
        """
        n = x_a.shape[0]
        if x_b.shape[0] != n:
            raise ValueError(f"x_a has batch {n} but x_b has batch {x_b.shape[0]}")
        mu = self.enc_shared(torch.cat([self.enc_a(x_a), self.enc_b(x_b)]))
        s = self.dec_shared(self.sample(mu, n))            # shared G layers once for both uses of z
        src = torch.cat([x_a, x_b]) if self.skip else None  # the image each z came from
        x_aa, x_ba = self._back("a", s, src).split(n)
        x_ab, x_bb = self._back("b", s, src).split(n)
        c_ba, c_ab = self.cycle_sources(x_ba, x_ab)
        # re-encode the translations: x_ba is an "a" image, x_ab a "b" image
        mu2 = self.enc_shared(torch.cat([self.enc_a(c_ba), self.enc_b(c_ab)]))
        s2 = self.dec_shared(self.sample(mu2, n))
        s_ba, s_ab = s2.split(n)
        mu_a, mu_b = mu.split(n)
        mu_ba, mu_ab = mu2.split(n)
        out = {"x_aa": x_aa, "x_bb": x_bb, "x_ab": x_ab, "x_ba": x_ba,
               "x_aba": self._back("a", s_ab, c_ab), "x_bab": self._back("b", s_ba, c_ba),
               "mu_a": mu_a, "mu_b": mu_b, "mu_ab": mu_ab, "mu_ba": mu_ba}
        for d in self.expected:
            out[f"exp_{d}"] = self._expected(d, out)
        return out

    def cycle_sources(self, x_ba: torch.Tensor, x_ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The translations the cycle half of forward() re-encodes and translates back.

        Back-translation (cycle_detach): detached, so that the cycle trains the generator that
        translates back on pseudo-pairs (x_ba, x_b) and (x_ab, x_a) and gives the one that
        translated no gradient; that one cannot bend its translations to be easy to read back."""
        return (x_ba.detach(), x_ab.detach()) if self.cycle_detach else (x_ba, x_ab)

    def _expected(self, domain: str, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The expected decoder of `domain` on a pseudo-pair: it repaints the real image x_d from its
        own translation into the other domain (out["x_ab"] for d = a), as eval would paint that
        translation; generator_loss pulls the result to x_d by L1 (weight w_recon).

        Why: the GAN decoder paints a realistic sample, with texture (noise, shadows, stripes)
        that the source does not determine, so it loses pixels to a flat guess; the L1-optimal
        image under a source is the per-pixel median over the images that source could come from,
        which pixel accuracy rewards (docs/quality.md). Unpaired data has no such
        pairs, but the other direction makes them. Everything upstream is detached: the expected
        decoder learns from the GAN model and never changes it.
        """
        other = "b" if domain == "a" else "a"
        with torch.no_grad():
            src = out[f"x_{domain}{other}"]
            head = self.head(other)
            if isinstance(head, PaletteHead):  # eval paints a palette domain in exact colours
                # (those nearest to the mixture here: the most probable ones, which eval paints,
                # differ from them only where far colours split the probability)
                src = head.snap(src)
            s = self.dec_shared(self.encode(src, other))
        return self._back(domain, s, src, "exp")

    def translate(self, x: torch.Tensor, direction: str, decoder: str = "auto") -> torch.Tensor:
        """a2b: G_b(mu_a(x)); b2a: G_a(mu_b(x)), or the expected decoder of the target domain
        where the model has one (cfg.expected). No noise, so deterministic in eval mode; there, with
        cfg.tta, the mean over flips of the input (_translate_views). `decoder="gan"` uses the GAN
        decoder (the one the discriminator trains) even then."""
        src, dst, kind = self._route(direction, decoder)
        if self.training or self.tta_views == 1:
            return self._back(dst, self.dec_shared(self.encode(x, src)), x, kind)
        return self._translate_views(x, src, dst, kind)

    def _translate_views(self, x: torch.Tensor, src: str, dst: str, kind: str) -> torch.Tensor:
        """Test-time augmentation (cfg.tta): the input and its flips translated as one batch, each
        result flipped back, averaged: a palette domain's colour probabilities (then its most probable
        colour per pixel), another domain's images. Why: the translator's errors differ between the
        views of a scene more than its right answers do, so averaging removes some; on the demo's map
        translator the four flips scored a2b +0.009 and b2a +0.019 (docs/quality.md)."""
        head = self._head_of(kind, dst)
        if isinstance(head, PaletteHead):
            return head.most_probable(self._probabilities(x, src, dst, kind))
        n = self.tta_views
        views = torch.cat([flip_view(x, k) for k in range(n)])
        return mean_of_views(self._back(dst, self.dec_shared(self.encode(views, src)), views, kind), n)

    def colour_probabilities(self, x: torch.Tensor, direction: str, decoder: str = "auto") -> torch.Tensor:
        """[B, K, H, W]: the probability of each of the target palette's K colours per pixel, the
        scores eval mode's translate() paints the most probable colour of (over cfg.tta's views, in
        eval mode). ValueError where the target domain has no palette. Why: what a translator
        leaves out shows here before it shows in the painted colours; a colour whose probability is
        near 0 everywhere is one the generator has stopped painting (bench/classes.py)."""
        src, dst, kind = self._route(direction, decoder)
        if not isinstance(self._head_of(kind, dst), PaletteHead):
            raise ValueError(f"{direction}: domain {dst} has no palette (model.palette_{dst}), so no colour probabilities")
        return self._probabilities(x, src, dst, kind)

    def _route(self, direction: str, decoder: str) -> tuple[str, str, str]:
        """(source domain, target domain, "exp" or "dec"): the decoder `direction` paints with."""
        if direction not in ("a2b", "b2a"):
            raise ValueError(f"direction {direction!r} is not 'a2b' or 'b2a'")
        if decoder not in ("auto", "gan"):
            raise ValueError(f"decoder {decoder!r} is not 'auto' or 'gan'")
        dst = direction[-1]
        return direction[0], dst, "exp" if dst in self.expected and decoder == "auto" else "dec"

    def _head_of(self, kind: str, domain: str) -> nn.Module:
        last = self._part(kind, domain)[-1]
        return last.out if self.skip else last

    def _probabilities(self, x: torch.Tensor, src: str, dst: str, kind: str) -> torch.Tensor:
        n = 1 if self.training else self.tta_views
        views = torch.cat([flip_view(x, k) for k in range(n)])
        h = self._part(kind, dst)[:-1](self.dec_shared(self.encode(views, src)))
        last = self._part(kind, dst)[-1]
        if self.skip:
            h, last = last.features(h, views), last.out
        return mean_of_views(last.logits(h).softmax(1), n)

    def domain_param_count(self, domain: str) -> int:
        """Parameters of E_domain + G_domain (shared ones included), the official VAEGen's count."""
        return count_params(self.encoder(domain), self.decoder(domain))


def flip_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """View k of an NCHW batch: bit 0 flips it left-right, bit 1 upside down (each its own inverse)."""
    dims = [d for bit, d in ((1, -1), (2, -2)) if k & bit]
    return x.flip(dims) if dims else x


def mean_of_views(y: torch.Tensor, n: int) -> torch.Tensor:
    """The mean over the n views of a batch made by concatenating flip_view(x, 0..n-1), flipped back."""
    return sum(flip_view(part, k) for k, part in enumerate(y.chunk(n))) / n


def dis_scales_for(cfg: UNITConfig, size: int) -> int:
    """How many discriminator scales images of `size` px use; ValueError when not even one fits
    (the training config checks this before any rank starts)."""
    probe = MultiScaleDiscriminator(1, 1, cfg.dis_layers, cfg.dis_scales, min_size=cfg.dis_min_size)
    scales = probe.scales_for(size)
    if scales == 0:
        raise ValueError(f"UNIT config: image_size={size} is smaller than one discriminator scale needs: "
                         f"{probe.min_size} px, the larger of dis_min_size={cfg.dis_min_size} and "
                         f"2**dis_layers={2 ** cfg.dis_layers}")
    return scales


class UNITDiscriminator(nn.Module):
    """D_a and D_b, multi-scale patch discriminators."""

    def __init__(self, cfg: UNITConfig):
        super().__init__()
        scales = dis_scales_for(cfg, cfg.image_size) if cfg.image_size else cfg.dis_scales

        def make():
            return MultiScaleDiscriminator(cfg.channels, cfg.dis_dim, cfg.dis_layers, scales,
                                           cfg.dis_activ, cfg.dis_norm, cfg.dis_pad, cfg.dis_min_size,
                                           cfg.dis_colour_octaves)

        self.dis_a, self.dis_b = make(), make()
        init_gaussian(self, 0.02)

    def forward(self, x_a, x_b, fake_a, fake_b) -> dict[str, list[torch.Tensor]]:
        """Logit maps per scale for real and fake images of both domains.

        Real and fake go through each D in one batch (D has no batch-coupled norm).
        """
        out = {}
        for d, dis, real, fake in (("a", self.dis_a, x_a, fake_a), ("b", self.dis_b, x_b, fake_b)):
            n = real.shape[0]
            preds = dis(torch.cat([real, fake]))
            out[f"{d}_real"] = [p[:n] for p in preds]
            out[f"{d}_fake"] = [p[n:] for p in preds]
        return out


def _term(weight: float, fn, *args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(value for logging, weighted value for the loss or None when weight is 0)."""
    if weight == 0:
        with torch.no_grad():  # a zero weight contributes no gradient at all
            return fn(*args).detach(), None
    v = fn(*args)
    return v.detach(), weight * v


def generator_loss(out: dict, x_a: torch.Tensor, x_b: torch.Tensor, dis: UNITDiscriminator,
                   cfg: UNITConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over both domains of L_VAE + L_GAN + L_CC (generator side), and each term unweighted.

    `dis` must be frozen by the caller (requires_grad_(False)) and is called as a plain module.
    Cycle KL is the KL of the re-encoded translation (the paper's L_CC repeats KL(q_i(z|x_i)),
    which is already in L_VAE; like the official code it is not counted twice).
    """
    gt = cfg.gan_type
    hue = functools.partial(losses.hue_corr, axes=cfg.hue_axes, pool=cfg.hue_pool)
    specs = {
        "recon_a": (cfg.w_recon, losses.l1, out["x_aa"], x_a),
        "recon_b": (cfg.w_recon, losses.l1, out["x_bb"], x_b),
        "kl_a": (cfg.w_kl, losses.kl, out["mu_a"]),
        "kl_b": (cfg.w_kl, losses.kl, out["mu_b"]),
        # D_a judges translations into a (x_ba), D_b translations into b (x_ab)
        "gan_a": (cfg.w_gan, lambda x: losses.gan_g(dis.dis_a(x), gt), out["x_ba"]),
        "gan_b": (cfg.w_gan, lambda x: losses.gan_g(dis.dis_b(x), gt), out["x_ab"]),
        "cyc_a": (cfg.w_cyc, losses.l1, out["x_aba"], x_a),
        # With back-translation (cycle_detach) the b cycle trains E_a and G_b on pseudo-pairs
        # (x_ba, x_b): a supervised a2b term, which w_cyc_b can weigh apart from the a cycle.
        "cyc_b": (cfg.w_cyc if cfg.w_cyc_b is None else cfg.w_cyc_b, losses.l1, out["x_bab"], x_b),
        "cyc_kl_a": (cfg.w_cyc_kl, losses.kl, out["mu_ab"]),
        "cyc_kl_b": (cfg.w_cyc_kl, losses.kl, out["mu_ba"]),
        # the expected decoders on their pseudo-pairs (UNITGenerator._expected)
        **{f"exp_{d}": (cfg.w_recon, losses.l1, out[f"exp_{d}"], x) for d, x in (("a", x_a), ("b", x_b))
           if d in cfg.expected},
        # hue_a: the translation into a (x_ba) against its source x_b; only where asked for
        **{f"hue_{d}": (cfg.w_hue, hue, src, out[key]) for d, src, key in (("a", x_b, "x_ba"), ("b", x_a, "x_ab"))
           if cfg.w_hue and d in cfg.hue_into},
    }
    terms, total = {}, None
    for name, (w, fn, *args) in specs.items():
        terms[name], weighted = _term(w, fn, *args)
        if weighted is not None:
            total = weighted if total is None else total + weighted
    if total is None:  # every weight is 0: a loss that still backpropagates (zeros)
        total = 0.0 * out["x_aa"].sum()
    return total, terms


def discriminator_loss(preds: dict, cfg: UNITConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w_gan * (D_a loss + D_b loss), as the official code weights it; terms d_a, d_b unweighted."""
    d_a = losses.gan_d(preds["a_real"], preds["a_fake"], cfg.gan_type)
    d_b = losses.gan_d(preds["b_real"], preds["b_fake"], cfg.gan_type)
    return cfg.w_gan * (d_a + d_b), {"d_a": d_a.detach(), "d_b": d_b.detach()}


def r1_penalty(dis: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): half the mean over images of the squared gradient of the
    discriminator's summed logits (all scales) with respect to real images.

    The images go in in the discriminator's parameter dtype (half under DeepSpeed's fp16, whose
    convolutions refuse fp32 inputs); the sums and the penalty are reduced in fp32."""
    dtype = next(dis.parameters()).dtype
    real = real.detach().to(dtype).requires_grad_(True)
    (grad,) = torch.autograd.grad(sum(p.float().sum() for p in dis(real)), real, create_graph=True)
    return 0.5 * grad.float().pow(2).sum(dim=(1, 2, 3)).mean()


def r1_loss(dis: UNITDiscriminator, x_a: torch.Tensor, x_b: torch.Tensor,
            cfg: UNITConfig, step: int = 1) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """w_r1 * r1_every * (R1 of D_a on x_a + R1 of D_b on x_b), to add to the D step's loss at the
    1-based optimizer `step`; (None, {}) when w_r1 is 0 or `step` is not a multiple of r1_every.
    Why: a discriminator that sees exact colours (dis_colour_octaves) grows steep input gradients
    that swamp the generator's other losses; R1 keeps them flat on real images. Lazily (StyleGAN2,
    Karras et al. 2020) it costs 1/r1_every of its double backward, the same penalty on average."""
    if not cfg.w_r1 or step % cfg.r1_every:
        return None, {}
    r_a, r_b = r1_penalty(dis.dis_a, x_a), r1_penalty(dis.dis_b, x_b)
    return cfg.w_r1 * cfg.r1_every * (r_a + r_b), {"r1_a": r_a.detach(), "r1_b": r_b.detach()}


class UNIT(nn.Module):
    """Holds the generator side (`gen`) and the discriminator side (`dis`) as separate modules,
    so that two optimizers / DeepSpeed engines can own them."""

    def __init__(self, cfg: UNITConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else UNITConfig()
        self.gen = UNITGenerator(self.cfg)
        self.dis = UNITDiscriminator(self.cfg)

    @classmethod
    def from_config(cls, d: dict | None = None) -> "UNIT":
        """UNIT from {"preset": "paper" | "official" | "tiny", **field overrides}."""
        return cls(make_config(d))

    def config(self) -> dict:
        """All fields plus the preset name; `UNIT.from_config(unit.config())` rebuilds the same model."""
        return dataclasses.asdict(self.cfg)

    def translate(self, x: torch.Tensor, direction: str, decoder: str = "auto") -> torch.Tensor:
        return self.gen.translate(x, direction, decoder)

    @property
    def input_multiple(self) -> int:
        return self.gen.input_multiple


__all__ = ["UNIT", "UNITConfig", "UNITGenerator", "UNITDiscriminator", "PRESETS", "make_config",
           "generator_loss", "discriminator_loss", "dis_scales_for"]
