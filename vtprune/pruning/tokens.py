"""Token bookkeeping shared by inference (pruning/plan.py, the policies) and training
(training/forward.py): which prompt tokens are the question, packing a row's selected tokens to
the front and back, the kept indices of a keep mask, and the RoPE positions of a merged image run.
"""
from __future__ import annotations

import torch


def question_mask(input_ids: torch.Tensor, image_token: int, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: prompt tokens after the image run (the question), within each row's length."""
    img = input_ids == image_token
    after = (img.long().cumsum(1) > 0) & ~img
    T = input_ids.shape[1]
    return after & (torch.arange(T, device=input_ids.device)[None, :] < lengths[:, None])


def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' selected positions packed to the front: ([B, max count, D], valid [B, max count]);
    padding entries are zeros."""
    B, T = mask.shape
    order = torch.where(mask, torch.arange(T, device=mask.device), T).sort(1).values
    n = int(mask.sum(1).max()) if B else 0
    order = order[:, : max(n, 1)]
    valid = order < T
    packed = x.gather(1, order.clamp(max=T - 1)[..., None].expand(-1, -1, x.shape[-1]))
    return packed * valid[..., None].to(packed.dtype), valid


def unpack(values: torch.Tensor, mask: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of `pack` for per-token scalars: [B, n] -> [B, T] (-inf where mask is False)."""
    B = mask.shape[0]
    order = torch.where(mask, torch.arange(T, device=mask.device), T).sort(1).values[:, : values.shape[1]]
    out = torch.full((B, T + 1), float("-inf"), device=values.device, dtype=values.dtype)
    out.scatter_(1, order, values)
    return out[:, :T]


def keep_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions per row of a [B, T] bool mask, ascending, and their count (padding is 0)."""
    B, T = keep.shape
    idx = torch.where(keep, torch.arange(T, device=keep.device), T).sort(1).values
    counts = keep.sum(1)
    n = int(counts.max())  # one host sync per drop point (prefill only)
    idx = idx[:, :n]
    return torch.where(idx == T, 0, idx), counts


def original_positions(input_ids: torch.Tensor, image_token: int, sources: torch.Tensor, num_visual: int) -> torch.Tensor:
    """Positions [B, T] for rows whose one image run holds M = sources.shape[1] tokens standing
    for full-run indices `sources` (ascending): the image run starts at s, its token j sits at
    s + sources[j], and every token after the run at its index + (num_visual - M)."""
    B, T = input_ids.shape
    dev = input_ids.device
    M = sources.shape[1]
    start = (input_ids == image_token).long().argmax(1)  # each row's first image token
    idx = torch.arange(T, device=dev)[None, :]
    positions = idx + (idx >= (start + M)[:, None]).long() * (num_visual - M)
    cols = start[:, None] + torch.arange(M, device=dev)[None, :]
    return positions.scatter(1, cols, start[:, None] + sources.to(positions.dtype))
