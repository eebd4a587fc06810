"""Temperature annealing for the Gumbel-Top-K selection and the soft merge.

tau goes from `temperature` (1.0: soft, exploring) to `temperature_min` (0.1: nearly hard) over
the first `temperature_anneal_rate` (0.5) of the training steps, then holds. The decay is
geometric (log-linear): each step multiplies tau by the same factor, so the time spent between
1.0 and 0.3 equals the time between 0.3 and 0.1.
"""
from __future__ import annotations

import math


def temperature_at(step: int, total_steps: int, temperature: float = 1.0, temperature_min: float = 0.1,
                   anneal_rate: float = 0.5) -> float:
    """tau at `step` (0-based) of `total_steps`."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 < temperature_min <= temperature:
        raise ValueError(f"need 0 < temperature_min <= temperature, got {temperature_min}, {temperature}")
    anneal_steps = max(1, round(anneal_rate * total_steps))
    frac = min(max(step, 0) / anneal_steps, 1.0)
    return math.exp((1 - frac) * math.log(temperature) + frac * math.log(temperature_min))


LR_SCHEDULES = ("constant", "cosine")


def lr_factor_at(step: int, total_steps: int, schedule: str = "constant") -> float:
    """The factor on every optimizer's configured lr at `step` (0-based) of `total_steps`.

    "cosine" goes from 1 at step 0 to 0 at the last step (half a cosine). Why: with Adam a
    constant lr moves every weight by about lr per step however small its gradient, so the heads
    keep drifting once the loss is flat, and hard top-k at inference flips the tokens at the
    boundary; the shipped constant-lr heads' val accuracy moved 97 -> 80 -> 94 -> 86% over 600
    steps with a flat loss (benchmarks/results/synthvqa_heads_201_selection_*)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        frac = min(max(step, 0) / max(1, total_steps - 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
