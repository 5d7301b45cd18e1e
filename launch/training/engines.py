"""Two DeepSpeed engines for UNIT and the one GAN step that is exact with them at ZeRO 0, 1 and 2.

Checked facts (shared/notes/deepspeed-gan.md): the discriminator loss is one backward per step;
the generator step freezes the discriminators and calls them as plain modules (`eng_d.module`),
never through the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepResult:
    loss_g: torch.Tensor
    loss_d: torch.Tensor
    terms_g: dict
    terms_d: dict


def build_engines(unit, ds_g: dict, ds_d: dict):
    """One engine owns encoders+generators, the other the discriminators, each with its own Adam."""
    import deepspeed
    eng_g, _, _, _ = deepspeed.initialize(model=unit.gen, model_parameters=unit.gen.parameters(), config=ds_g)
    eng_d, _, _, _ = deepspeed.initialize(model=unit.dis, model_parameters=unit.dis.parameters(), config=ds_d)
    return eng_g, eng_d


def all_finite(values, device) -> bool:
    """True on every rank only when every rank's values are finite, so all ranks skip together."""
    ok = torch.tensor([1.0 if all(bool(torch.isfinite(v).all()) for v in values) else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0.5)


def gan_step(eng_g, eng_d, x_a, x_b, ucfg, device, *, poison: bool = False) -> StepResult | None:
    """One UNIT iteration on one micro-batch; None when a loss was non-finite on any rank (nothing updated
    by that half of the step, and every rank made the same decision)."""
    from model.unit import discriminator_loss, generator_loss

    dis = eng_d.module
    # Generator step: one pass of encoders and generators; discriminators frozen, plain modules.
    out = eng_g(x_a, x_b)
    dis.requires_grad_(False)
    try:
        loss_g, terms_g = generator_loss(out, x_a, x_b, dis, ucfg)
        if poison:  # fault injection for tests
            loss_g = loss_g * float("nan")
        if not all_finite([loss_g], device):
            return None
        eng_g.backward(loss_g)
        eng_g.step()
    finally:
        dis.requires_grad_(True)

    # Discriminator step: the same iteration's translations, detached; one backward of the whole loss.
    preds = eng_d(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach())
    loss_d, terms_d = discriminator_loss(preds, ucfg)
    if not all_finite([loss_d], device):
        return None
    eng_d.backward(loss_d)
    eng_d.step()
    return StepResult(loss_g.detach(), loss_d.detach(), terms_g, terms_d)


def mean_across_ranks(terms: dict, device) -> dict:
    keys = sorted(terms)
    vec = torch.stack([torch.as_tensor(terms[k]).detach().float().reshape(()) for k in keys]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, vec.tolist())}
