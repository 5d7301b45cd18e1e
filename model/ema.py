"""Exponential moving average of a module's weights (the generator side, for inference)."""
from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """shadow <- d * shadow + (1 - d) * weight, kept in float32, with d = min(decay, (1 + n) / (10 + n))
    at the n-th update: the warm-up keeps the shadow from lagging the first few hundred steps behind
    the weights (at decay 0.995 a plain average still remembers 5 % of the initial weights after 600
    steps, which short CPU runs used to be scored on).

    Always built (decay 0 makes the shadow a copy of the last weights), so the trainer needs
    no conditionals. Buffers are copied, not averaged.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay!r} must be in [0, 1)")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        decay = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for k, v in module.state_dict().items():
            if k not in self.shadow:
                continue
            if k in params:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - decay)
            else:
                self.shadow[k].copy_(v.detach().float())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module` (cast to its dtypes and device)."""
        state = module.state_dict()
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA: module has no tensors named {missing[:5]}")
        for k, v in self.shadow.items():
            state[k].copy_(v.to(device=state[k].device, dtype=state[k].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, d: dict) -> None:
        unknown = set(d["shadow"]) ^ set(self.shadow)
        if unknown:
            raise KeyError(f"EMA state does not match the module: {sorted(unknown)[:5]}")
        self.decay = float(d["decay"])
        self.num_updates = int(d["num_updates"])
        for k, v in d["shadow"].items():
            self.shadow[k].copy_(v)
