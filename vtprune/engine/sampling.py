"""Next-token choice: greedy (temperature 0) or temperature + nucleus (top-p) sampling.

Runs on the device without host synchronisation; a seeded `torch.Generator` makes sampling
reproducible for a given seed, device and batch.
"""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # first maximum on ties, as transformers' greedy search
    # Shifted by the row's maximum first: (logits - max) <= 0, so dividing by a tiny temperature
    # gives 0 at the maximum and at worst -inf elsewhere (exp -> 0), never inf - inf = NaN; at
    # T = 1e-30 the unshifted logits / T overflow float32 and softmax returns NaN. Mathematically
    # the same distribution (softmax is shift-invariant). T >= 1.2e-38 is guaranteed by the
    # callers (arguments.check_temperature), so T is a normal float32 and never rounds to 0.
    logits = logits.float()
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
