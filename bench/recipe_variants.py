"""Experimental variants for bench/recipe.py that are not (yet) part of model/: each patches a
freshly built UNIT in place. Kept so that docs/quality.md's rows for them can be rerun.

  pixel-dis    a per-pixel discriminator (1x1 convolutions, width 32) added to both multi-scale
               discriminators as an extra "scale" on the full-resolution image: it judges each
               pixel's colour alone (real maps use 8 flat colours; translations paint in-between ones)
  pixel-path   per-pixel colour paths P_ab, P_ba (1x1-convolution MLPs, zero-initialised) from the
               source image added to the translations: x_ab = G_b(z_a) + P_ab(x_a), so a colour
               mapping per pixel (which alone scores ~0.89 a2b on the demo when fitted with pairs)
               bypasses the decoder's blur
  norm-skip    with model.skip=image: the source image reaches the generators' last stage with each
               channel's mean and std removed (its structure without its palette)
  residual-skip  with model.skip=image: the last stage's output is added to the source image, its
               last convolution zero-initialised (every translation starts as the identity)
  palette-prior  with model.palette_b: the palette head's biases start at the log of each colour's
               share of the training maps, so every translation starts as the domain's average use
               of its colours (mostly land) instead of an even mixture
  palette-torch-init  with model.palette_b: the palette head's convolution with PyTorch's default
               init (as the first, bench-only version of the head had) instead of Kaiming's
  palette-st   with model.palette_b: training paints the palette colour nearest to the mixture as
               well (straight-through: the exact colour forward, the mixture's gradient back)
  palette-gumbel  with model.palette_b: training paints a colour sampled from the head's softmax
               (Gumbel, straight-through), so that colours a pixel might take get tried
  palette-gumbel-soft  with model.palette_b: training paints the mixture of a Gumbel-perturbed
               softmax (soft, tau 1), so that colours the head stopped using still get gradient
  cycle-noise  the cycle half of the pass (re-encoding and, with skip=image, the cycle decoder's
               source) sees the translations plus Gaussian noise (std 0.05, 6 levels of 255), so
               a translation cannot hide its source in colour changes too small to see
               (steganography: Chu et al. 2017, "CycleGAN, a master of steganography")
  cycle-noise-hi  the same with std 0.1 (13 levels)
  detach-ba, detach-ab  the cycle half sees the photo translations (x_ba) or the map translations
               (x_ab) detached: model.cycle_detach (both) on one side only
  cycle-chroma-a  back-translation (both sides detached) with the photo translations x_ba read back
               in 4:2:0 chroma (chroma_420), as JPEG stores the real photos: at 32 px that chroma
               blurs every colour edge over 2 px, and a2b learns from (x_ba, x_b) pseudo-pairs
  skip-a-none, skip-a-norm, skip-a-highpass  with model.skip=image: only the map decoder sees the
               source image as it is; the aerial decoder sees nothing (none), the source with each
               channel's mean and std removed (norm) or its detail above a 5x5 box blur (highpass).
               The hypothesis tested (not borne out, docs/quality.md): reconstructing a photo, the aerial
               decoder learns to copy its source's colours, and in b2a that source is a map
  skip-b-none, skip-b-norm, skip-b-highpass  the same for the map decoder (the aerial one keeps
               the full image): reconstructing a map, the map decoder can copy its source through
               the skip and never learn to read a class from the shared latent, which a2b needs
  skip-b-dropout  in training, half of the maps' own reconstructions get a blank source (the
               translations and cycles keep theirs): the map decoder must also read the latent
  latent-match, latent-match-hi  an extra generator loss, 10 (hi: 100) x the squared gaps between
               the per-channel mean and std of the photos' and the maps' latents (mu)
  palette-sharp, palette-sharp-lo, palette-sharp-hi  with model.palette_b: an extra generator
               loss, 100 (lo: 10, hi: 1000) x the mean distance from the map translation's mixture
               to its nearest palette colour (closes the hidden-code channel of the mixture); palette-sharp-late:
               weight 100, 0 until step 300, then rising to 100 at step 600
  tanh-snap    without model.palette_b: the tanh map head in training, the nearest of the maps'
               frequent colours at eval (no softmax whose unused colours stop getting gradient)
  bt-exp-a, bt-exp-a-half  with model.expected=a and back-translation: from step 300, a2b's
               pseudo-pairs take the photo the expected decoder paints from the real map (all of
               the batch; half: its first half, the rest the GAN decoder's photos), not the GAN
               decoder's photo: the expected decoder learns to repaint real photos, so its photos
               are nearer a2b's real inputs (the GAN decoder's are told from them at C2ST 0.99)
  bt-recolour-a, bt-recolour-a-hi  with model.palette_b and back-translation: the photo
               translations a2b's pseudo-pairs read are recoloured per map class (each class of the
               real map x_b, each image, its own random RGB offset, std 0.1, hi: 0.2, of [-1, 1]):
               a2b must read a class from its shape and surroundings, not from the one colour the
               GAN decoder paints it (domain randomisation against the decoder's dialect);
               bt-recolour-a-lo: std 0.05; bt-recolour-a-building: std 0.25, on the demo maps'
               building fill only (a diagnosis: real roofs come in five colours, the GAN decoder
               paints one dark one)
  bt-ce-b, bt-ce-b-hi  with model.palette_b and back-translation: an extra generator loss, 1 (hi:
               10) x the cross-entropy of the map head's logits for x_bab against each real map
               pixel's palette colour: the b cycle's L1 on the mixture cannot tell a building
               (214, 200, 190) from 2/3 land + 1/3 outline (about (214, 208, 201)); a classifier's
               loss can
  self-train, self-train-hi  with model.palette_b: from step 300 an extra generator loss, 30
               (hi: 100) x L1 between the map translation of each real photo and a teacher's map of
               it (the generator's own EMA, decay 0.995, in eval mode: the most probable colours
               over model.tta's views): mean-teacher self-training on the real photos, which a2b
               otherwise learns from only through the GAN decoder's photos (back-translation)
  cycle-hard   with model.palette_b: the cycle half sees the map translation in its nearest
               palette colours (straight-through gradient); the losses on x_ab itself see the mixture
  texture-a    the photo translations the aerial discriminator sees in training are x_ba + T, T a
               texture drawn anew each step (per-pixel Gaussian noise scaled by a learned map of
               x_ba, then a 3x3 convolution: zero mean); reconstructions, the cycle and eval use x_ba
               itself. The aerial decoder can leave the invented texture to T and paint the
               expected photo under a map, which is what pixel accuracy rewards (docs/quality.md, Ceilings)
  texture-a-hi the same with the noise scale starting 14x higher (softplus(0) against softplus(-3))
  dis-a-plain  with model.dis_colour_octaves: the photo discriminator without the colour features
               (the map one keeps them): photos are textured, their exact pixel colours say little
  latent-nce, latent-nce-hi  an extra generator loss, 1 (hi: 10) x a patchwise contrastive
               (InfoNCE) loss between each latent position of a source and the same position of
               its translation re-encoded (mu_a against mu_ab, mu_b against mu_ba; through a small
               projection, temperature 0.07; Park et al. 2020, CUT): a field painted as land
               re-encodes like the land beside it, so the translation must keep them apart
  pack-b, pack  PacGAN (Lin et al. 2018) with 2 images per packet: the map discriminator (pack:
               both) judges two images of the same kind stacked on the channels, so a generator
               that drops a mode (fields painted as land: each patch alone is a realistic land
               patch) is told apart by the missing variety within a packet
  cyc-a-hi     the photos' cycle (a -> b -> a) at 3x the paper's weight, the maps' at 1x: a field
               painted as land in x_ab cannot come back as a field, so only that cycle pays for it
               (model.w_cyc=300, both cycles, collapses: docs/quality.md)
  joint        a third discriminator on (photo, map) pairs stacked on the channels: (x_a, x_ab)
               against (x_ba, x_b), both generators trained to swap its verdicts (joint-distribution
               matching as in ALI / ALICE, Dumoulin et al. 2017, Li et al. 2017). D_a and D_b match
               each domain's marginal only, so a photo generator may paint the maps' buildings in
               any realistic shade and the map generator may paint the photos' fields as land; the
               joint D sees which photo content goes with which map colour in both directions
  exp-cycle, exp-cycle-hi  with model.expected=a: an extra generator loss, 10 (hi: 30) x L1 between
               each real photo and the expected decoder's photo painted from its map translation
               snapped to the palette (straight through), every generator weight frozen for it:
               a cycle that can only be paid through the colours a map shows (from step 300)
  mbstd-b, mbstd  ProGAN's minibatch standard deviation before the last layer of every scale of the
               map discriminator (mbstd: both), groups of 4 images: missing variety becomes visible
  dis-snap-b   the map discriminator judges the map translations snapped to the palette (straight
               through), as eval paints them; the cycle and reconstructions keep the mixture
"""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

# bench/recipe.py puts the project root on sys.path
from model.networks import PaletteHead, nearest_colour, nearest_index
from model.unit import UNITGenerator

WIDTH = 32


def _pixel_mlp(cout: int, zero_out: bool) -> nn.Sequential:
    m = nn.Sequential(nn.Conv2d(3, WIDTH, 1), nn.LeakyReLU(0.2), nn.Conv2d(WIDTH, WIDTH, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(WIDTH, cout, 1))
    if zero_out:
        nn.init.zeros_(m[-1].weight)
        nn.init.zeros_(m[-1].bias)
    return m


def pixel_dis(unit, data=None) -> None:
    for msd in (unit.dis.dis_a, unit.dis.dis_b):
        msd.pixel = _pixel_mlp(1, zero_out=False)
        msd.forward = types.MethodType(lambda self, x, f=msd.forward: f(x) + [self.pixel(x)], msd)


def _forward(g, x_a, x_b):
    """UNITGenerator.forward with the colour paths added to both translations."""
    n = x_a.shape[0]
    mu = g.enc_shared(torch.cat([g.enc_a(x_a), g.enc_b(x_b)]))
    s = g.dec_shared(g.sample(mu, n))
    x_aa, x_ba = g.dec_a(s).split(n)
    x_ab, x_bb = g.dec_b(s).split(n)
    x_ab, x_ba = (x_ab + g.p_ab(x_a)).clamp(-1, 1), (x_ba + g.p_ba(x_b)).clamp(-1, 1)
    mu2 = g.enc_shared(torch.cat([g.enc_a(x_ba), g.enc_b(x_ab)]))
    s_ba, s_ab = g.dec_shared(g.sample(mu2, n)).split(n)
    (mu_a, mu_b), (mu_ba, mu_ab) = mu.split(n), mu2.split(n)
    return {"x_aa": x_aa, "x_bb": x_bb, "x_ab": x_ab, "x_ba": x_ba, "x_aba": g.dec_a(s_ab), "x_bab": g.dec_b(s_ba),
            "mu_a": mu_a, "mu_b": mu_b, "mu_ab": mu_ab, "mu_ba": mu_ba}


def _translate(g, x, direction):
    src, dst = direction[0], direction[-1]
    return (g.decode(g.encode(x, src), dst) + getattr(g, f"p_{src}{dst}")(x)).clamp(-1, 1)


def pixel_path(unit, data=None) -> None:
    g = unit.gen
    g.p_ab, g.p_ba = _pixel_mlp(3, zero_out=True), _pixel_mlp(3, zero_out=True)
    # Bound methods: copy.deepcopy (the EMA shadow) rebinds them to the copy.
    g.forward, g.translate = types.MethodType(_forward, g), types.MethodType(_translate, g)


def _back_norm(g, domain, s, source):
    src = None if source is None else torch.nn.functional.instance_norm(source, eps=1e-3)
    return UNITGenerator._back(g, domain, s, src)


def _back_residual(g, domain, s, source):
    y = UNITGenerator._back(g, domain, s, source)
    return y if source is None else (y + source).clamp(-1, 1)


def _needs_skip(unit, name):
    if not unit.gen.skip:
        raise SystemExit(f"--variant {name} modifies model.skip=image: add it to the overrides")


def norm_skip(unit, data=None) -> None:
    _needs_skip(unit, "norm-skip")
    unit.gen._back = types.MethodType(_back_norm, unit.gen)


def residual_skip(unit, data=None) -> None:
    _needs_skip(unit, "residual-skip")
    for dec in (unit.gen.dec_a, unit.gen.dec_b):  # start from the identity: the head adds a correction
        nn.init.zeros_(dec[-1].out[1].weight)
    unit.gen._back = types.MethodType(_back_residual, unit.gen)


def palette_head(gen):
    """The map generator's PaletteHead, or None when it paints RGB through a tanh."""
    head = gen.head("b")
    return head if isinstance(head, PaletteHead) else None


def _palette_head(unit, name):
    head = palette_head(unit.gen)
    if head is None:
        raise SystemExit(f"--variant {name} needs model.palette_b=auto")
    return head


def palette_prior(unit, data) -> None:
    head = _palette_head(unit, "palette-prior")
    pixels = torch.from_numpy(data["trainB"]).reshape(-1, 3).float() / 127.5 - 1
    nearest = torch.cdist(pixels, head.colours).argmin(1)
    share = torch.bincount(nearest, minlength=len(head.colours)).float() / len(nearest)
    with torch.no_grad():
        head.conv.bias.copy_(share.clamp_min(1e-4).log())


def palette_torch_init(unit, data=None) -> None:
    """The palette head's convolution with PyTorch's default init (uniform, about 2.4x smaller than
    the generators' Kaiming-normal weights, small uniform biases) instead of init_kaiming's."""
    _palette_head(unit, "palette-torch-init").conv.reset_parameters()


def _hard_forward(head, x):
    mix = head.paint(head.logits(x).softmax(1))
    hard = head.nearest(mix)
    if head.training:  # straight through: the exact colour forward, the mixture's gradient back
        hard = mix + (hard - mix).detach()
    return hard.permute(0, 3, 1, 2).contiguous()


def _gumbel_forward(head, x):
    if not head.training:
        return type(head).forward(head, x)
    sample = nn.functional.gumbel_softmax(head.logits(x), tau=1.0, hard=True, dim=1)  # one colour, ST gradient
    return head.paint(sample).permute(0, 3, 1, 2).contiguous()


def _gumbel_soft_forward(head, x):
    if not head.training:
        return type(head).forward(head, x)
    soft = nn.functional.gumbel_softmax(head.logits(x), tau=1.0, hard=False, dim=1)
    return head.paint(soft).permute(0, 3, 1, 2).contiguous()


def palette_gumbel_soft(unit, data=None) -> None:
    """Training paints the mixture of a Gumbel-perturbed softmax (soft, tau 1): colours the head
    has stopped using still get weight, and so gradient, now and then. A softmax's gradient for a
    colour scales with its probability, so a colour dropped early (fields painted as land from the
    first steps) may never come back."""
    head = _palette_head(unit, "palette-gumbel-soft")
    head.forward = types.MethodType(_gumbel_soft_forward, head)


def palette_gumbel(unit, data=None) -> None:
    """Training paints a colour sampled from the head's softmax (Gumbel, straight-through)."""
    head = _palette_head(unit, "palette-gumbel")
    head.forward = types.MethodType(_gumbel_forward, head)


def palette_st(unit, data=None) -> None:
    """Training paints the palette colour nearest to the mixture too (straight-through gradient)."""
    head = _palette_head(unit, "palette-st")
    head.forward = types.MethodType(_hard_forward, head)


def _read_back(unit, corrupt) -> None:
    """The cycle half of the generator's pass re-encodes corrupt(x_ba, "a") and corrupt(x_ab, "b")
    (UNITGenerator.cycle_sources), in place of model.cycle_detach's choice."""
    unit.gen.cycle_sources = lambda x_ba, x_ab: (corrupt(x_ba, "a"), corrupt(x_ab, "b"))


def _noise(std):
    def corrupt(x, domain):
        return (x + std * torch.randn_like(x)).clamp(-1, 1)
    return corrupt


def cycle_noise(unit, data=None, std=0.05) -> None:
    _read_back(unit, _noise(std))


def cycle_detach(domains):
    """model.cycle_detach (back-translation) for the listed domains' translations only (x_ba for
    "a", x_ab for "b")."""
    def apply(unit, data=None) -> None:
        _read_back(unit, lambda x, domain: x.detach() if domain in domains else x)
    return apply


def chroma_420(x):
    """RGB images in [-1, 1] with their chroma halved in resolution as a 4:2:0 JPEG stores it: YCbCr
    (JFIF), Cb and Cr averaged over 2 x 2 blocks and upsampled bilinearly, back to RGB."""
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb, cr = (b - y) / 1.772, (r - y) / 1.402
    c = torch.nn.functional.avg_pool2d(torch.stack([cb, cr], 1), 2)
    cb, cr = torch.nn.functional.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    r, b = y + 1.402 * cr, y + 1.772 * cb
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return torch.stack([r, g, b], 1).clamp(-1, 1)


def cycle_chroma(unit, data=None) -> None:
    """Back-translation (both cycles detached) with the photo translations x_ba read back in 4:2:0
    chroma, as the real photos (JPEG) are: the pseudo-pairs (x_ba, x_b) a2b learns from then show
    the blurred colour edges of its real inputs."""
    _read_back(unit, lambda x, domain: chroma_420(x.detach()) if domain == "a" else x.detach())


def _watch_passes(gen) -> dict:
    """gen.forward wrapped to keep each pass's real maps: {"x_b": the last pass's, "step": passes so far}."""
    seen, forward = {"step": 0}, gen.forward

    def remember(x_a, x_b):
        seen["x_b"] = x_b
        seen["step"] += 1
        return forward(x_a, x_b)
    gen.forward = remember
    return seen


def expected_back_translation(share: float, start: int = 300):
    """Back-translation whose photos for a2b come, for the first `share` of each batch, from the
    expected decoder painting the real map x_b (no noise, no gradient), from step `start + 1`."""
    def apply(unit, data=None) -> None:
        gen = unit.gen
        if "a" not in gen.expected or not gen.skip:
            raise SystemExit("--variant bt-exp-a needs model.expected=a and model.skip=image")
        seen = _watch_passes(gen)

        def corrupt(x, domain):
            x = x.detach()
            if domain != "a" or seen["step"] <= start:
                return x
            k = round(share * len(x))
            x_b = seen["x_b"][:k]
            with torch.no_grad():
                y = gen._back("a", gen.dec_shared(gen.encode(x_b, "b")), x_b, "exp")
            return torch.cat([y.contiguous(), x[k:].contiguous()])
        _read_back(unit, corrupt)
    return apply


def recoloured_back_translation(std: float, only=None):
    """Back-translation whose photos for a2b get a random colour offset per image and map class
    (`only`: that map colour's class alone)."""
    def apply(unit, data=None) -> None:
        gen, head = unit.gen, _palette_head(unit, "bt-recolour-a")
        keep = torch.ones(len(head.colours), 1)
        if only is not None:
            colour = torch.tensor([only], dtype=torch.float32) / 127.5 - 1
            keep = (torch.cdist(colour, head.colours)[0] < 1e-3).float()[:, None]
        seen = _watch_passes(gen)

        def corrupt(x, domain):
            x = x.detach()
            if domain != "a":
                return x
            cls = nearest_index(seen["x_b"].permute(0, 2, 3, 1), head.colours)
            offsets = std * torch.randn(len(x), len(head.colours), x.shape[1]) * keep  # [B, K, C]
            shift = torch.gather(offsets, 1, cls.unsqueeze(-1).expand(-1, -1, x.shape[1]))  # [B, HW, C]
            return (x + shift.transpose(1, 2).reshape(x.shape)).clamp(-1, 1)
        _read_back(unit, corrupt)
    return apply


def cycle_cross_entropy(weight: float):
    """weight x CE(map head logits of x_bab, the palette index of each pixel of x_b)."""
    def apply(unit, data=None) -> None:
        gen, head = unit.gen, _palette_head(unit, "bt-ce-b")
        last = {}
        head.register_forward_pre_hook(lambda module, args: last.update(features=args[0]))

        def extra_loss(out, x_a, x_b):
            logits = head.logits(last["features"])  # the last map painted in the pass: x_bab
            target = nearest_index(x_b.permute(0, 2, 3, 1), head.colours)  # [B, H * W]
            return weight * nn.functional.cross_entropy(logits.flatten(2), target)
        gen.extra_loss = extra_loss
    return apply


def self_training(weight: float, start: int = 300, decay: float = 0.995):
    """A teacher (an EMA of the generator, updated here each step) paints the real photos' maps
    in eval mode; the student's map translation x_ab is pulled to them by L1 from step `start + 1`."""
    def apply(unit, data=None) -> None:
        gen = unit.gen
        _palette_head(unit, "self-train")
        teacher = copy.deepcopy(gen).eval().requires_grad_(False)
        step = [0]

        def extra_loss(out, x_a, x_b):
            step[0] += 1
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), gen.parameters()):
                    t.lerp_(s, 1 - decay)
                for t, s in zip(teacher.buffers(), gen.buffers()):
                    t.copy_(s)
                if step[0] <= start:
                    return out["x_ab"].new_zeros(())
                target = teacher.translate(x_a, "a2b")
            return weight * (out["x_ab"] - target).abs().mean()
        gen.extra_loss = extra_loss
    return apply


def _snap_through(head, x):
    """x in its nearest palette colours forward, x's own gradient back (straight through)."""
    return x + (head.snap(x) - x).detach()


def cycle_hard(unit, data=None) -> None:
    head = _palette_head(unit, "cycle-hard")

    def corrupt(x, domain):
        return _snap_through(head, x) if domain == "b" else x
    _read_back(unit, corrupt)


def _source(kind, domain):
    """The skip source of `domain`'s decoder: removed ("none"), its colour statistics removed
    ("norm") or only its detail above a 5x5 box blur ("highpass"). The other decoder keeps the
    full image."""
    def transform(source):
        if kind == "none":
            return torch.zeros_like(source)
        if kind == "norm":
            return nn.functional.instance_norm(source, eps=1e-3)
        return source - nn.functional.avg_pool2d(source, 5, 1, 2, count_include_pad=False)

    def back(g, dst, s, source):
        if source is not None and dst == domain:
            source = transform(source)
        return UNITGenerator._back(g, dst, s, source)
    return back


def skip_source(kind, domain):
    def apply(unit, data=None) -> None:
        _needs_skip(unit, f"skip-{domain}-{kind}")
        unit.gen._back = types.MethodType(_source(kind, domain), unit.gen)
    return apply


def _back_b_dropout(g, dst, s, source):
    # the first map decode of a forward() is [z_a, z_b] with the sources [x_a, x_b]: in training,
    # half of the maps' own reconstructions (its second half) lose their source; the translations
    # and the later cycle decode keep theirs
    if g.training and dst == "b" and source is not None and g.drop_next:
        g.drop_next = False
        n = source.shape[0] // 2
        keep = (torch.rand(n, 1, 1, 1, device=source.device) < 0.5).to(source.dtype)
        source = torch.cat([source[:n], source[n:] * keep])
    return UNITGenerator._back(g, dst, s, source)


def _forward_b_dropout(g, x_a, x_b):
    g.drop_next = True
    return UNITGenerator.forward(g, x_a, x_b)


def skip_b_dropout(unit, data=None) -> None:
    _needs_skip(unit, "skip-b-dropout")
    unit.gen.drop_next = False
    unit.gen._back = types.MethodType(_back_b_dropout, unit.gen)
    unit.gen.forward = types.MethodType(_forward_b_dropout, unit.gen)


def _moments(mu):
    """Per latent channel: mean and std over the batch and the positions."""
    flat = mu.float().transpose(0, 1).flatten(1)
    return flat.mean(1), flat.std(1)


def latent_match(weight):
    """An extra generator loss: the per-channel mean and std of the photos' and the maps' latents
    (mu) must agree. UNIT assumes one latent space for both domains; here its marginals are pulled
    together directly, as a check on whether b2a's misplaced shades come from maps encoding to
    latents the aerial decoder never saw."""
    def apply(unit, data=None) -> None:
        def extra_loss(out, *_):
            (m_a, s_a), (m_b, s_b) = _moments(out["mu_a"]), _moments(out["mu_b"])
            return weight * ((m_a - m_b).pow(2).mean() + (s_a - s_b).pow(2).mean())
        unit.gen.extra_loss = extra_loss
    return apply


def _dis(cfg, scales: int, channels: int, octaves: int):
    """A discriminator like the model's (cfg), with `scales` scales, on `channels` input channels,
    with `octaves` colour octaves."""
    from model.networks import MultiScaleDiscriminator
    return MultiScaleDiscriminator(channels, cfg.dis_dim, cfg.dis_layers, scales, cfg.dis_activ, cfg.dis_norm,
                                   cfg.dis_pad, cfg.dis_min_size, octaves)


def dis_a_plain(unit, data=None) -> None:
    from model.networks import init_gaussian
    unit.dis.dis_a = _dis(unit.cfg, len(unit.dis.dis_a.nets), unit.cfg.channels, 0)
    init_gaussian(unit.dis.dis_a, 0.02)


class Packed(nn.Module):
    """A MultiScaleDiscriminator over packets of `pack` consecutive images stacked on the channels.
    Each packet's logits are repeated for its images, so callers that split real from fake by
    batch index (UNITDiscriminator.forward) and average the losses see the shapes they expect."""

    def __init__(self, inner: nn.Module, pack: int = 2):
        super().__init__()
        self.pack, self.inner = pack, inner

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n, c, h, w = x.shape
        if n % self.pack:  # (only recipe.py's one-image probe of the scale count) packed with itself
            x = torch.cat([x, x[-1:].expand(self.pack - n % self.pack, -1, -1, -1)])
        preds = self.inner(x.reshape(-1, c * self.pack, h, w))
        return [p.repeat_interleave(self.pack, 0)[:n] for p in preds]


def pack_dis(domains):
    def apply(unit, data=None) -> None:
        from model.networks import init_gaussian
        cfg, scales = unit.cfg, len(unit.dis.dis_a.nets)
        for d in domains:
            packed = Packed(_dis(cfg, scales, 2 * cfg.channels, cfg.dis_colour_octaves), pack=2)
            init_gaussian(packed, 0.02)
            setattr(unit.dis, f"dis_{d}", packed)
    return apply


def joint_dis(weight: float = 1.0):
    def apply(unit, data=None) -> None:
        from model.losses import gan_d
        from model.networks import init_gaussian
        from model.unit import r1_penalty
        cfg = unit.cfg
        dis_j = _dis(cfg, len(unit.dis.dis_a.nets), 2 * cfg.channels, cfg.dis_colour_octaves)
        init_gaussian(dis_j, 0.02)
        unit.dis.dis_j = dis_j  # a submodule: the D optimiser owns it, requires_grad_ freezes it

        def sides(out, x_a, x_b, detach):
            x_ab, x_ba = (out["x_ab"].detach(), out["x_ba"].detach()) if detach else (out["x_ab"], out["x_ba"])
            return torch.cat([x_a, x_ab], 1), torch.cat([x_ba, x_b], 1)

        def g_loss(out, x_a, x_b):  # each side must be called the other
            s1, s2 = sides(out, x_a, x_b, False)
            return weight * cfg.w_gan * gan_d(dis_j(s2), dis_j(s1), cfg.gan_type)

        def d_loss(out, x_a, x_b):
            s1, s2 = sides(out, x_a, x_b, True)
            loss = weight * cfg.w_gan * gan_d(dis_j(s1), dis_j(s2), cfg.gan_type)
            return loss + cfg.w_r1 * r1_penalty(dis_j, s1) if cfg.w_r1 else loss
        unit.gen.extra_loss, unit.dis.extra_loss = g_loss, d_loss
    return apply


def cycle_a_extra(extra: float):
    def apply(unit, data=None) -> None:
        from model.losses import l1
        unit.gen.extra_loss = lambda out, x_a, x_b: extra * l1(out["x_aba"], x_a)
    return apply


class Texture(nn.Module):
    """T(x, eps) = conv3x3(softplus(conv3x3(x) + offset) * eps): noise shaped by the image it is
    added to, zero-mean (no bias after the noise)."""

    def __init__(self, channels: int = 3, width: int = 8, offset: float = -3.0):
        super().__init__()
        self.offset = offset
        self.scale = nn.Conv2d(channels, width, 3, 1, 1)
        self.mix = nn.Conv2d(width, channels, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.softplus(self.scale(x) + self.offset)
        return self.mix(s * torch.randn(s.shape))


def texture_a(offset):
    def apply(unit, data=None) -> None:
        unit.gen.texture_a = Texture(offset=offset)
        plain, calls = unit.gen.forward, [0]

        def forward(self, x_a, x_b):
            out = plain(x_a, x_b)
            t = self.texture_a(out["x_ba"])
            calls[0] += 1
            if calls[0] % 300 == 0:  # is the texture path used? (std in 255 levels)
                print(f"    texture-a: std of T {float(t.detach().std()) * 127.5:.1f} levels", flush=True)
            return {**out, "x_ba": out["x_ba"] + t}
        unit.gen.forward = types.MethodType(forward, unit.gen)
    return apply


def _patch_nce(src, trans, proj, tau=0.07):
    """InfoNCE over the positions of each image: position i of `trans` must pick position i of `src`
    out of all of src's positions in the same image."""
    q = nn.functional.normalize(proj(trans.float().flatten(2).transpose(1, 2)), dim=-1)  # [n, hw, c]
    k = nn.functional.normalize(proj(src.float().flatten(2).transpose(1, 2)), dim=-1)
    logits = q @ k.transpose(1, 2) / tau  # [n, hw, hw]
    target = torch.arange(logits.shape[1]).expand(logits.shape[0], -1)
    return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def latent_nce(weight):
    """An extra generator loss: patchwise contrastive loss between the latents of the sources and of
    their translations (both directions), through a 2-layer projection trained with the generators."""
    def apply(unit, data=None) -> None:
        with torch.no_grad():
            width = unit.gen.encode(torch.zeros(1, 3, 32, 32), "a").shape[1]
        unit.gen.nce_proj = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 64))

        def extra_loss(out, *_):
            proj = unit.gen.nce_proj
            return weight * (_patch_nce(out["mu_a"], out["mu_ab"], proj) + _patch_nce(out["mu_b"], out["mu_ba"], proj))
        unit.gen.extra_loss = extra_loss
    return apply


def palette_sharp(weight, start=0, ramp=1):
    """An extra generator loss: weight x the mean distance (L2 over the channels) from each pixel of
    the map translation's training-time mixture to its nearest palette colour. Eval paints the
    nearest colour, so a field painted as land plus a few levels of yellow is land there, while in
    training those few levels can carry the field through the cycle (a hidden code the mixture
    allows). Pushing the mixture onto the palette closes that channel: the cycle then has to be
    paid for with the field's own colour. The weight is 0 for `start` steps, then rises linearly
    over `ramp` steps: from step 0 the easiest way to be sharp is land everywhere."""
    def apply(unit, data=None) -> None:
        head = _palette_head(unit, "palette-sharp")
        step = [0]

        def extra_loss(out, *_):
            step[0] += 1
            w = weight * min(1.0, max(0, step[0] - start) / ramp)
            flat = out["x_ab"].permute(0, 2, 3, 1).flatten(1, 2).float()
            d2 = torch.cdist(flat, head.colours.unsqueeze(0)).pow(2).amin(-1)
            return w * (d2 + 1e-6).sqrt().mean()
        unit.gen.extra_loss = extra_loss
    return apply


def dis_snap_b(unit, data=None) -> None:
    """The map translation as the losses on x_ab see it (the map discriminator's, in both steps) is
    the palette colour nearest to the mixture, straight through; reconstructions and the cycle keep
    the mixture. The colour-sharp discriminator punishes every in-between colour, so a pixel moving
    from land to the field colour crosses a band of mixtures it loses on: a class dropped early can
    never come back. Judged snapped, as eval paints it, the discriminator sees classes, not mixtures.
    Apply after variants that replace the generator's forward (cycle-noise): it wraps the current one."""
    head = _palette_head(unit, "dis-snap-b")
    inner = unit.gen.forward

    def forward(x_a, x_b):
        out = inner(x_a, x_b)
        return {**out, "x_ab": _snap_through(head, out["x_ab"])}
    unit.gen.forward = forward


def _recording_forward(head, x):
    """PaletteHead.forward that also keeps, in training, each mixture it paints with its probabilities."""
    logits = head.logits(x)
    if not head.training:
        return head.most_probable(logits)
    probs = logits.softmax(1)
    y = head._as_image(head.paint(probs))  # the class's own training path, probabilities kept
    head.painted.append((y, probs))
    return y


def _embedded_forward(dis, head, x):
    """MultiScaleDiscriminator.forward on each pixel's colour features (ColourFeatures), pooled for
    the coarser scales; rows of `x` that are the map translation just painted (dis.fake, by value)
    get the features of its palette colours weighted by their probabilities instead of the features
    of their mixture. Before the variant's start (dis.fake None) the model's own forward."""
    if dis.fake is None:
        return type(dis).forward(dis, x)
    feats = dis.colour(x)
    y, probs = dis.fake
    n = y.shape[0]
    if n <= x.shape[0] and torch.equal(x[-n:].detach(), y):
        table = dis.colour(head.colours.view(-1, x.shape[1], 1, 1)).flatten(1)  # [K, F]
        p = probs if x.requires_grad else probs.detach()
        feats = torch.cat([feats[:-n], torch.einsum("bkhw,kf->bfhw", p, table)])
    outs = []
    for i in range(dis.scales_for(min(x.shape[-2:]))):
        outs.append(dis.nets[i](feats))
        feats = dis.downsample(feats)
    return outs


def dis_embed_b(unit, data=None, start: int = 0) -> None:
    """From G step `start` + 1 on, the map discriminator sees each translated pixel as its palette colours' Fourier features
    weighted by their probabilities, not as the features of the colours' mixture: a blend of land,
    outline and orange (what make demo's translator paints on buildings, on average within 15 of
    the building colour) can no longer pass for the building colour, which it never paints. Real
    maps are single palette colours, so for them the two are the same. Every scale pools the
    features, reals and fakes alike (the model pools the colours). Needs model.dis_colour_octaves."""
    head = _palette_head(unit, "dis-embed-b")
    dis = unit.dis.dis_b
    if not unit.cfg.dis_colour_octaves:
        raise SystemExit("--variant dis-embed-b needs model.dis_colour_octaves > 0")
    head.painted, dis.fake = [], None
    head.forward = types.MethodType(_recording_forward, head)
    dis.forward = types.MethodType(lambda self, x: _embedded_forward(self, head, x), dis)
    inner, steps = unit.gen.forward, [0]

    def forward(x_a, x_b):
        out = inner(x_a, x_b)
        painted, steps[0] = list(head.painted), steps[0] + 1
        head.painted.clear()
        if steps[0] > start:  # x_ab is the first half of the map head's batch [z_a, z_b]
            ptr = out["x_ab"].data_ptr()
            probs = next(p for y, p in painted if y.data_ptr() == ptr)[:x_a.shape[0]]
            dis.fake = (out["x_ab"].detach(), probs)
        return out
    unit.gen.forward = forward


class MinibatchStd(nn.Module):
    """ProGAN's minibatch standard deviation (Karras et al. 2018): one more channel holding, for each
    group of `group` consecutive images, the std of every feature across the group, averaged to one
    number. UNITDiscriminator.forward batches reals then fakes, so groups that divide the batch
    never mix the two."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.group if n % self.group == 0 else 1  # (recipe.py's one-image probe: a zero channel)
        std = x.reshape(n // g, g, c, h, w).std(1, unbiased=False) if g > 1 else x.new_zeros(n, c, h, w)
        extra = std.mean((1, 2, 3)).repeat_interleave(g).view(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, extra], 1)


def minibatch_std(domains, group=4):
    """Each scale of the listed domains' discriminators gets a MinibatchStd before its last 1x1
    convolution: a translator whose maps lack a class has less variety across a group than real
    maps, which no single patch shows (mode dropping: fields painted as land)."""
    def apply(unit, data=None) -> None:
        from model.networks import init_gaussian
        for d in domains:
            msd = getattr(unit.dis, f"dis_{d}")
            for i, net in enumerate(msd.nets):
                last = net[-1]
                conv = nn.Conv2d(last.in_channels + 1, 1, 1)
                init_gaussian(conv, 0.02)
                msd.nets[i] = nn.Sequential(*net[:-1], MinibatchStd(group), conv)
    return apply


def expected_cycle(weight, start=300, ramp=300):
    """With model.expected=a: an extra generator loss, weight x L1 between each real photo and the
    expected decoder's photo painted from its map translation in exact palette colours (straight
    through: the snapped map forward, the mixture's gradient back), every weight of the generator
    frozen for it, so only the map translation x_ab moves. The GAN cycle can be paid through the
    latent and the mixture; this one only through the colours a map shows: a field painted as land
    comes back as land, and the loss then asks for a colour the expected decoder paints as a field.
    0 for `start` steps (the expected decoder starts random), then rising over `ramp` steps."""
    def apply(unit, data=None) -> None:
        gen, head = unit.gen, _palette_head(unit, "exp-cycle")
        if "a" not in gen.expected:
            raise SystemExit("--variant exp-cycle needs model.expected=a")
        step = [0]

        def extra_loss(out, x_a, x_b):
            step[0] += 1
            w = weight * min(1.0, max(0, step[0] - start) / ramp)
            if w == 0:
                return out["x_ab"].new_zeros(())
            src = _snap_through(head, out["x_ab"])
            params = [p for p in gen.parameters() if p.requires_grad]
            for p in params:
                p.requires_grad_(False)
            try:
                y = gen._back("a", gen.dec_shared(gen.encode(src, "b")), src, "exp")
            finally:
                for p in params:
                    p.requires_grad_(True)
            return w * (y - x_a).abs().mean()
        unit.gen.extra_loss = extra_loss
    return apply


def _snap_forward(last, palette, *args):
    y = type(last).forward(last, *args)  # the class's: a captured bound method would survive deepcopy
    # (the EMA shadow) still bound to the training module
    if last.training:
        return y
    return nearest_colour(y.permute(0, 2, 3, 1), palette).permute(0, 3, 1, 2).contiguous()


def tanh_snap(unit, data) -> None:
    """Without model.palette_b: the map generator keeps its tanh RGB head in training (every
    colour reachable by a gradient that does not vanish with a colour's probability, as a
    softmax's does for colours it has stopped using), and eval paints each pixel the nearest of
    the training maps' frequent colours (measured as palette_b=auto measures them)."""
    if palette_head(unit.gen) is not None:
        raise SystemExit("--variant tanh-snap replaces model.palette_b: drop it from the overrides")
    from launch.release.baselines import DomainStats
    colours, _ = DomainStats.empty().add(data["trainB"]).palette()
    palette = torch.as_tensor(colours, dtype=torch.float32) / 127.5 - 1
    last = unit.gen.dec_b[-1]
    last.forward = types.MethodType(lambda self, *args: _snap_forward(self, palette, *args), last)


VARIANTS = {"skip-b-dropout": skip_b_dropout, "tanh-snap": tanh_snap, "palette-gumbel-soft": palette_gumbel_soft, "palette-sharp": palette_sharp(100.0), "palette-sharp-hi": palette_sharp(1000.0),
            "palette-sharp-lo": palette_sharp(10.0), "palette-sharp-late": palette_sharp(100.0, 300, 300),
            "latent-match": latent_match(10.0), "latent-match-hi": latent_match(100.0),
            "latent-nce": latent_nce(1.0), "latent-nce-hi": latent_nce(10.0),
            "texture-a": texture_a(-3.0), "texture-a-hi": texture_a(0.0), "dis-a-plain": dis_a_plain,
            "pack-b": pack_dis("b"), "pack": pack_dis("ab"), "joint": joint_dis(1.0),
            "cyc-a-hi": cycle_a_extra(200.0),
            "exp-cycle": expected_cycle(10.0), "dis-snap-b": dis_snap_b, "dis-embed-b": dis_embed_b,
            "dis-embed-b-late": lambda u, d=None: dis_embed_b(u, d, start=600),
            "mbstd-b": minibatch_std("b"), "mbstd": minibatch_std("ab"), "exp-cycle-hi": expected_cycle(30.0),
            **{f"skip-{d}-{k}": skip_source(k, d) for d in "ab" for k in ("none", "norm", "highpass")},
            "cycle-noise": cycle_noise, "cycle-noise-hi": lambda u, d=None: cycle_noise(u, d, 0.1),
            "detach-ba": cycle_detach("a"), "cycle-chroma-a": cycle_chroma, "detach-ab": cycle_detach("b"),
            "bt-exp-a": expected_back_translation(1.0), "bt-exp-a-half": expected_back_translation(0.5),
            "bt-recolour-a": recoloured_back_translation(0.1), "bt-recolour-a-hi": recoloured_back_translation(0.2),
            "bt-recolour-a-lo": recoloured_back_translation(0.05),
            "bt-recolour-a-building": recoloured_back_translation(0.25, only=(214, 200, 190)),
            "bt-ce-b": cycle_cross_entropy(1.0), "bt-ce-b-hi": cycle_cross_entropy(10.0),
            "self-train": self_training(30.0), "self-train-hi": self_training(100.0),
            "cycle-hard": cycle_hard, "palette-st": palette_st, "palette-gumbel": palette_gumbel, "palette-prior": palette_prior, "palette-torch-init": palette_torch_init, "pixel-dis": pixel_dis, "pixel-path": pixel_path, "norm-skip": norm_skip,
            "residual-skip": residual_skip}
