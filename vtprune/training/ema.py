"""An exponential moving average of the trainable modules' weights (Polyak averaging).

The saved heads (OUT/pruning.safetensors) are the average, the optimizers keep stepping the raw
weights. Why: inference takes a hard top-k of the heads' logits, so the small step-to-step moves
of the raw weights flip the tokens at the keep boundary and inference accuracy jumps between
checkpoints while the (noisy) training loss does not; the average moves smoothly.
decay d averages over about 1 / (1 - d) steps; the first steps use min(d, (1 + t) / (10 + t))
so that the random initial weights are forgotten quickly.
"""
from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                s.copy_(v)
        self.updates += 1

    def state(self) -> dict:
        """The averaged weights, keyed as the module's state_dict (what a checkpoint stores)."""
        return self.shadow

    def load(self, tensors: dict, updates: int) -> None:
        for k, s in self.shadow.items():
            s.copy_(tensors[k])
        self.updates = updates

    def swap_into(self, module: nn.Module):
        """A context manager: `module` holds the averaged weights inside it, its own weights after."""
        return _Swapped(module, self.shadow)


class _Swapped:
    def __init__(self, module, weights):
        self.module, self.weights = module, weights

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.weights)
        return self.module

    def __exit__(self, *exc):
        self.module.load_state_dict(self.saved)
        return False
