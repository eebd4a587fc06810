"""The discriminator: tells the full model's representations ("real") from the pruned model's
("fake").

Its input is, for each of a few decoder layers (the outputs of the pruning layers and of the last
layer), the mean hidden state over the row's text tokens after the image (question and answer).
Text tokens exist in both sequences, in the same order, whatever happened to the visual tokens,
so the two models' features are directly comparable; what differs is what those tokens could
read from the image. Each layer's feature gets its own LayerNorm (hidden-state scales grow with
depth) and projection; an MLP on the concatenation gives one logit per row (> 0: "real").
"""
from __future__ import annotations

import torch
from torch import nn


class Discriminator(nn.Module):
    def __init__(self, hidden: int, num_features: int, d: int = 256):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(num_features))
        self.proj = nn.ModuleList(nn.Linear(hidden, d) for _ in range(num_features))
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(num_features * d, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, num_features, hidden] -> logits [B] (fp32)."""
        if features.dim() != 3 or features.shape[1] != len(self.proj):
            raise ValueError(f"Discriminator: features must be [B, {len(self.proj)}, hidden], got "
                             f"{tuple(features.shape)}")
        f = features.float()
        h = torch.cat([p(n(f[:, i])) for i, (n, p) in enumerate(zip(self.norms, self.proj))], dim=-1)
        return self.mlp(h).squeeze(-1).float()
