"""Token compaction: gather the kept tokens of every batch row (ragged) from hidden states,
position ids and KV caches.

    gather_tokens(src [B, T, ...], idx [B, K], lengths [B]) -> out [B, K, ...]
        out[b, j] = src[b, idx[b, j]] for j < lengths[b], zero past it
    compact_kv(k_caches, v_caches, idx, lengths, k_out, v_out)
        the same along the token axis of [B, H, T, Dh] caches, for K and V of one or many
        layers in one launch, written into k_out / v_out ([B, H, >= K, Dh], out of place)

idx is int32 or int64 and strictly ascending within each row's first lengths[b] entries (the
kept tokens in their original order). The ops are `torch.ops.vtprune.*` from csrc/ (CUDA kernel
and C++ CPU twin); `*_reference` below are the plain-PyTorch definitions (the test oracle and
the fallback when the extension cannot be built). No autograd: compaction is an inference-time
operation; training masks tokens instead of dropping them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._extension import has_cuda_kernels, load_ops

_HAVE_OPS = load_ops()
_HAVE_CUDA_OPS = has_cuda_kernels()

if _HAVE_OPS:
    @torch.library.register_fake("vtprune::gather_tokens")
    def _gather_tokens_fake(src, idx, lengths):
        return src.new_empty((src.shape[0], idx.shape[1], *src.shape[2:]))

    @torch.library.register_fake("vtprune::compact_kv")
    def _compact_kv_fake(k_caches, v_caches, idx, lengths, k_out, v_out):
        return None


# ----------------------------------------------------------------------------- references
def gather_tokens_reference(src: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    B, T = src.shape[:2]
    K = idx.shape[1]
    live = torch.arange(K, device=src.device)[None, :] < lengths.to(src.device)[:, None]  # [B, K]
    safe = torch.where(live, idx.long(), 0).clamp_(0, max(T - 1, 0))
    if T == 0:
        return src.new_zeros((B, K, *src.shape[2:]))
    expand = safe.view(B, K, *([1] * (src.dim() - 2))).expand(B, K, *src.shape[2:])
    out = torch.gather(src, 1, expand)
    return torch.where(live.view(B, K, *([1] * (src.dim() - 2))), out, torch.zeros((), dtype=src.dtype,
                                                                                      device=src.device))


def compact_kv_reference(k_caches, v_caches, idx, lengths, k_out, v_out) -> None:
    K = idx.shape[1]
    for src, dst in zip(list(k_caches) + list(v_caches), list(k_out) + list(v_out)):
        # [B, H, T, Dh] -> [B, T, H, Dh] view so the token axis is dim 1
        g = gather_tokens_reference(src.transpose(1, 2), idx, lengths)
        dst[:, :, :K].copy_(g.transpose(1, 2))


# ----------------------------------------------------------------------------- validation
def validate_indices(idx: torch.Tensor, lengths: torch.Tensor, T: int, op: str) -> None:
    """Range and order checks with tensor ops (one host sync on a GPU). The compiled CPU op
    checks the same again (RuntimeError) when called directly through torch.ops."""
    if idx.dim() != 2 or lengths.dim() != 1 or idx.shape[0] != lengths.shape[0]:
        raise ValueError(f"{op}: idx must be [B, K] and lengths [B], got {tuple(idx.shape)} and {tuple(lengths.shape)}")
    K = idx.shape[1]
    live = torch.arange(K, device=idx.device)[None, :] < lengths[:, None]
    bad_len = (lengths < 0) | (lengths > K)
    bad_range = live & ((idx < 0) | (idx >= T))
    bad_order = live[:, 1:] & (idx[:, 1:] <= idx[:, :-1])
    flags = torch.stack([bad_len.any(), bad_range.any(), bad_order.any()]).tolist()
    if flags[0]:
        b = int(bad_len.nonzero()[0, 0])
        raise ValueError(f"{op}: lengths[{b}] = {int(lengths[b])} is outside [0, K = {K}]")
    if flags[1]:
        b, j = bad_range.nonzero()[0].tolist()
        raise ValueError(f"{op}: idx[{b}, {j}] = {int(idx[b, j])} is out of range [0, {T})")
    if flags[2]:
        b, j = bad_order.nonzero()[0].tolist()
        raise ValueError(f"{op}: idx[{b}] must be strictly ascending, but idx[{b}, {j + 1}] = "
                         f"{int(idx[b, j + 1])} follows {int(idx[b, j])}")


# ----------------------------------------------------------------------------- public ops
def gather_tokens(src: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """See the module docstring. Bad indices raise ValueError; `validate=False` skips the checks
    (on CUDA they cost one host sync) for callers that built idx themselves, e.g. the engine."""
    if validate:
        validate_indices(idx, lengths, src.shape[1], "gather_tokens")
    if _HAVE_CUDA_OPS if src.is_cuda else _HAVE_OPS:
        return torch.ops.vtprune.gather_tokens(src, idx, lengths)
    return gather_tokens_reference(src, idx, lengths)


def compact_kv(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], idx: torch.Tensor,
               lengths: torch.Tensor, k_out: Sequence[torch.Tensor], v_out: Sequence[torch.Tensor],
               validate: bool = True) -> None:
    """See the module docstring: all layers' K and V in one launch (CUDA)."""
    k_caches, v_caches, k_out, v_out = list(k_caches), list(v_caches), list(k_out), list(v_out)
    if validate and k_caches:
        validate_indices(idx, lengths, k_caches[0].shape[2], "compact_kv")
    if k_caches and (_HAVE_CUDA_OPS if k_caches[0].is_cuda else _HAVE_OPS):
        torch.ops.vtprune.compact_kv(k_caches, v_caches, idx, lengths, k_out, v_out)
        return
    compact_kv_reference(k_caches, v_caches, idx, lengths, k_out, v_out)
