"""Two DeepSpeed engines for UNIT and the one GAN step that is exact with them at ZeRO 0, 1 and 2.

Checked facts (shared/notes/deepspeed-gan.md): the discriminator loss is one backward per step;
the generator step freezes the discriminators and calls them as plain modules (`eng_d.module`),
never through the engine.

Precision (train.precision, resolved by launch.config.resolve_precision): fp32; bf16 = fp32 weights
with the forward passes under torch.autocast (DeepSpeed's `torch_autocast` section covers calls
through an engine, `gan_step` the plain-module calls of the discriminators); fp16 = DeepSpeed's
fp16 mode (half weights and inputs, dynamic loss scaling; an overflowed step is skipped by the
engine and counted in its `skipped_steps`). The loss reductions run in fp32 in every mode
(model/losses.py).
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


def step_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the inputs, autocast dtype or None) for a resolved precision: the inputs match the
    weights (half only in DeepSpeed's fp16 mode); bf16 autocasts from fp32 weights and inputs."""
    return {"fp32": (torch.float32, None), "bf16": (torch.float32, torch.bfloat16),
            "fp16": (torch.float16, None)}[precision]


def skipped_steps(engine) -> int:
    """Steps the engine skipped on a gradient overflow (fp16 loss scaling); the same on every rank.
    Engines without loss scaling (plain test engines) skip none."""
    return int(getattr(engine, "skipped_steps", 0))


def compile_networks(gen: torch.nn.Module, dis: torch.nn.Module, **compile_kwargs) -> None:
    """torch.compile in place (nn.Module.compile; `compile_kwargs` go to torch.compile, the default
    backend is inductor): parameters, state_dict names and so checkpoints, EMA and exports are
    unchanged, and DeepSpeed keeps the same module. The discriminators are compiled per domain
    because the generator step calls them one by one as plain modules (`dis.dis_a(x)`), which a
    compiled `dis.forward` would not cover."""
    gen.compile(**compile_kwargs)
    for child in dis.children():
        child.compile(**compile_kwargs)


def lr_factor(schedule: str, warmup: int, total: int, step: int) -> float:
    """Optimizer step `step`'s (1-based) learning rate over optim.lr_g / lr_d. With warmup steps
    it rises linearly to 1 at step `warmup` (step 1 at 1/warmup, never at 0); then "warmup"
    stays at 1 and "warmup_decay" falls linearly to 1/(total - warmup) at step `total`."""
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "warmup_decay":
        return max(0.0, (total - step + 1) / max(1, total - warmup))
    return 1.0


class StepFactorLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that also resumes a checkpoint of the DeepSpeed WarmupLR / WarmupDecayLR that
    optim.schedule was before 7 December: its last_batch_iteration after n steps is n - 1, a
    LambdaLR's last_epoch n (the rates of the two differ only in the warmup's first steps)."""

    def load_state_dict(self, state_dict: dict) -> None:
        if "last_batch_iteration" in state_dict and "last_epoch" not in state_dict:
            state_dict = {"last_epoch": int(state_dict["last_batch_iteration"]) + 1,
                          "lr_lambdas": [None] * len(self.lr_lambdas)}
        super().load_state_dict(state_dict)


def set_step_lr(engine, step: int) -> None:
    """Each optimizer rate at the schedule's for optimizer step `step` (1-based, the trainer's count),
    computed as the LambdaLR computes it after step - 1 steps (base * factor(step - 1)), so where
    the engine stepped its scheduler every step (fp32, bf16) the rates are bitwise those it set.
    Under fp16 DeepSpeed steps the scheduler only on applied steps (not after a loss-scale
    overflow), so G's and D's schedulers fall behind the trainer's step, each by its own overflows;
    this puts both back on the trainer's step. Engines without a LambdaLR ("constant") are left."""
    sched = getattr(engine, "lr_scheduler", None)
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(step - 1)


def sync_lr(engine) -> None:
    """After a resume: each optimizer rate from the schedule at the step the run resumed at. The rate
    the checkpoint restores is the old schedule's, and a LambdaLR does not recompute it on load, so
    with train.max_steps changed on resume (warmup_decay's total) the first step ran at the old rate.
    (gan_step sets the rate again before each step, from the trainer's step: set_step_lr.)"""
    sched = getattr(engine, "lr_scheduler", None)
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        set_step_lr(engine, sched.last_epoch + 1)


def lr_scheduler(schedule: str, warmup: int, total: int):
    """What deepspeed.initialize takes as `lr_scheduler` for optim.schedule: None for "constant",
    else a function that wraps the engine's optimizer in a LambdaLR of lr_factor. DeepSpeed steps
    it after each applied optimizer step (under fp16 not after an overflowed one) and keeps its
    state in the engine's checkpoints; gan_step sets the rate of each step from the trainer's step
    (set_step_lr), so the rates follow the trainer's step whatever overflowed."""
    if schedule == "constant":
        return None

    def make(optimizer):
        # LambdaLR's counter is the number of steps taken: step k + 1 runs at factor(k + 1)
        return StepFactorLR(optimizer, lambda k: lr_factor(schedule, warmup, total, k + 1))
    return make


def build_engines(unit, ds_g: dict, ds_d: dict, schedule: tuple[str, int, int] = ("constant", 0, 0)):
    """One engine owns encoders+generators, the other the discriminators, each with its own Adam;
    `schedule` is (optim.schedule, optim.warmup_steps, train.max_steps) for both."""
    import deepspeed
    eng_g, _, _, _ = deepspeed.initialize(model=unit.gen, model_parameters=unit.gen.parameters(), config=ds_g,
                                          lr_scheduler=lr_scheduler(*schedule))
    eng_d, _, _, _ = deepspeed.initialize(model=unit.dis, model_parameters=unit.dis.parameters(), config=ds_d,
                                          lr_scheduler=lr_scheduler(*schedule))
    return eng_g, eng_d


def all_finite(values, device) -> bool:
    """True on every rank only when every rank's values are finite, so all ranks skip together."""
    # Decided on the device and read once: a bool() per value, or a tensor built from a Python
    # float, would each wait for the GPU's whole queue (one sync per check, not three).
    flags = [torch.isfinite(v).all() for v in values]
    ok = (torch.stack(flags).all() if flags else torch.tensor(True)).to(device, torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0.5)


def gan_step(eng_g, eng_d, x_a, x_b, ucfg, device, *, autocast: torch.dtype | None = None,
             poison: bool = False, step: int = 1) -> StepResult | None:
    """One UNIT iteration on one micro-batch; None when a loss was non-finite on any rank (then neither
    engine backpropagated or stepped, and every rank made the same decision). `autocast`: the dtype
    the forward passes run in (bf16), None for none; backward runs outside it, as torch.autocast asks.
    `step`: the 1-based optimizer step this micro-batch belongs to (lazy R1 decides by it)."""
    from model.unit import generator_loss

    def amp():
        return torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)

    dis = eng_d.module
    # Generator loss: one pass of encoders and generators; discriminators frozen, plain modules.
    dis.requires_grad_(False)
    try:
        with amp():
            out = eng_g(x_a, x_b)
            loss_g, terms_g = generator_loss(out, x_a, x_b, dis, ucfg)
    finally:
        dis.requires_grad_(True)
    if poison:  # fault injection for tests
        loss_g = loss_g * float("nan")
    # The discriminator loss before either engine steps: it sees the detached translations and the
    # discriminators' weights, neither of which the generator step changes, so its value is the one
    # it had after that step. A non-finite loss in either half then skips both halves: a generator
    # step alone would leave the two learning-rate schedules a step apart for the rest of the run.
    loss_d, terms_d = _discriminator_loss(eng_d, x_a, x_b, out, ucfg, step, amp)
    if not all_finite([loss_g, loss_d], device):
        return None
    # Both rates from the trainer's step, not each engine's scheduler count (fp16 overflows: set_step_lr)
    set_step_lr(eng_g, step)
    set_step_lr(eng_d, step)
    # loss_g's graph was recorded with the discriminators frozen, so no gradient reaches them here
    eng_g.backward(loss_g)
    eng_g.step()
    eng_d.backward(loss_d)  # one backward of the whole discriminator loss (shared notes)
    eng_d.step()
    return StepResult(loss_g.detach(), loss_d.detach(), terms_g, terms_d)


def _discriminator_loss(eng_d, x_a, x_b, out: dict, ucfg, step: int, amp) -> tuple[torch.Tensor, dict]:
    """The discriminator step's loss through its engine: the iteration's translations detached,
    plus the R1 penalty on the steps lazy R1 picks."""
    from model.unit import discriminator_loss, r1_loss

    with amp():
        preds = eng_d(x_a, x_b, out["x_ba"].detach(), out["x_ab"].detach())
        loss_d, terms_d = discriminator_loss(preds, ucfg)
    # R1 outside autocast: a double backward through the discriminators in their parameter dtype
    # (half under fp16), the penalty reduced in fp32
    penalty, terms_r1 = r1_loss(eng_d.module, x_a, x_b, ucfg, step)
    if penalty is not None:
        loss_d, terms_d = loss_d + penalty, {**terms_d, **terms_r1}
    return loss_d, terms_d


def mean_across_ranks(terms: dict, device) -> dict:
    keys = sorted(terms)
    vec = torch.stack([torch.as_tensor(terms[k]).detach().float().reshape(()) for k in keys]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, vec.tolist())}
