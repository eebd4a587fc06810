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
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
