"""Run under `deepspeed --num_gpus 2`: 2 UNIT steps with launch.training.engines.gan_step on each rank's own
data, then rank 0 replays the same 2 steps in one process with plain torch.optim.Adam and writes the
parameter differences after the first and the last step to OUT (a JSON file). Each ZeRO stage in
STAGES (comma-separated) starts over from the same initial weights with two fresh engines, in one
launch; OUT maps stage -> result.

    deepspeed --num_gpus 2 tests/scripts/ds_reference.py STAGES OUT
"""
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch.config import deepspeed_config, load_config  # noqa: E402
from launch.training.engines import build_engines, gan_step  # noqa: E402
from model.unit import UNIT, discriminator_loss, generator_loss  # noqa: E402

STEPS, BATCH, SIZE = 2, 2, 32


def data(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1


def both(gen, dis) -> dict:
    """A copy of the generator's and the discriminators' parameters and buffers, by prefixed name."""
    return {**{f"gen.{k}": v.detach().clone() for k, v in gen.state_dict().items()},
            **{f"dis.{k}": v.detach().clone() for k, v in dis.state_dict().items()}}


def noise_seed(rank):
    return 77 + rank


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    stages, out_path = [int(s) for s in args[0].split(",")], args[1]
    torch.set_num_threads(1)
    deepspeed.init_distributed()
    results = {str(stage): run_stage(stage) for stage in stages}
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()


def run_stage(stage: int) -> dict | None:
    """This stage's comparison on rank 0 (None on the other ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, [f"data.batch_size={BATCH}", "optim.lr_g=1e-3", "optim.lr_d=2e-3"],
                      base={"data": {"shards": "unused"}})
    model_cfg = {"preset": "tiny", "image_size": SIZE}
    torch.manual_seed(0)
    unit = UNIT.from_config(model_cfg)
    init = copy.deepcopy(unit.state_dict())
    ds_json = {"zero_optimization": {"stage": stage}}
    ds_g = deepspeed_config(cfg, ds_json, lr=cfg.optim.lr_g, on_gpu=False, bf16_ok=False)
    ds_d = deepspeed_config(cfg, ds_json, lr=cfg.optim.lr_d, on_gpu=False, bf16_ok=False)
    eng_g, eng_d = build_engines(unit, ds_g, ds_d)
    torch.manual_seed(noise_seed(rank))
    trained = []  # the parameters after the first step and after the last
    for step in range(STEPS):
        x_a, x_b = data(rank, step)
        assert gan_step(eng_g, eng_d, x_a, x_b, unit.cfg, torch.device("cpu")) is not None
        if step in (0, STEPS - 1):
            trained.append(both(eng_g.module, eng_d.module))
    result = None
    if rank == 0:
        expect, gmax = replay(model_cfg, init, world)
        result = compare(init, trained, expect, gmax)
        result["zero_stage"] = [eng_g.zero_optimization_stage(), eng_d.zero_optimization_stage()]
    dist.barrier()
    return result


def replay(model_cfg: dict, init: dict, world: int) -> tuple[list[dict], dict]:
    """The same STEPS in one process with plain Adam over every rank's data: the parameters after the
    first and the last step, and each generator tensor's largest gradient."""
    ref = UNIT.from_config(model_cfg)
    ref.load_state_dict(init)
    opt_g = torch.optim.Adam(ref.gen.parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    opt_d = torch.optim.Adam(ref.dis.parameters(), lr=2e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    rng, gmax, expect = {}, {}, []
    for r in range(world):
        torch.manual_seed(noise_seed(r))
        rng[r] = torch.get_rng_state()
    for step in range(STEPS):
        outs, loss_g = {}, 0.0
        ref.dis.requires_grad_(False)
        for r in range(world):  # DeepSpeed averages gradients: the mean of the ranks' losses
            torch.set_rng_state(rng[r])
            x_a, x_b = data(r, step)
            outs[r] = ref.gen(x_a, x_b)
            rng[r] = torch.get_rng_state()
            loss_g = loss_g + generator_loss(outs[r], x_a, x_b, ref.dis, ref.cfg)[0] / world
        opt_g.zero_grad()
        loss_g.backward()
        for k, p in ref.gen.named_parameters():
            gmax[f"gen.{k}"] = max(gmax.get(f"gen.{k}", 0.0), float(p.grad.abs().max()))
        opt_g.step()
        ref.dis.requires_grad_(True)
        loss_d = 0.0
        for r in range(world):
            x_a, x_b = data(r, step)
            preds = ref.dis(x_a, x_b, outs[r]["x_ba"].detach(), outs[r]["x_ab"].detach())
            loss_d = loss_d + discriminator_loss(preds, ref.cfg)[0] / world
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        if step in (0, STEPS - 1):
            expect.append(both(ref.gen, ref.dis))
    return expect, gmax


def compare(init: dict, trained: list[dict], expect: list[dict], gmax: dict) -> dict:
    """The engines' parameters against the replay's, after the first and the last step."""
    # A conv bias that feeds an instance norm has a true gradient of 0: what it gets is rounding
    # noise, which Adam scales up to +-lr steps whose sign depends on the order of the all-reduce.
    # Those tensors are reported, not compared.
    noise = sorted(k for k, g in gmax.items() if g < 1e-5)
    compared = [k for k in expect[-1] if k not in noise]
    moved = max(float((expect[-1][k].float() - init[k].float()).abs().max()) for k in compared
                if expect[-1][k].is_floating_point())
    first, last = (torch.cat([(e[k].float() - t[k].float()).abs().flatten() for k in compared])
                   for e, t in zip(expect, trained))
    # After one step the two loops agree to rounding (1e-8). From then on the GAN amplifies
    # rounding: on an AVX-512 machine a few elements per tensor were 1e-3 apart after the second
    # step (0.06 %), 2 % of them after the third; on an AVX2 machine none were. So the second
    # step is compared elementwise: stale or leaked gradients between the two engines would
    # move most elements, not a few.
    return {"first_step_max_abs_diff": float(first.max()), "max_abs_diff": float(last.max()),
            "frac_off": float((last > 1e-4).float().mean()), "median_abs_diff": float(last.median()),
            "max_abs_update": moved, "n_compared": len(compared), "zero_grad_tensors": noise}


if __name__ == "__main__":
    main()
