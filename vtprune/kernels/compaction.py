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

Arguments, the same on every path (compiled CPU op, CUDA kernel, reference):
- Refused always (VtpruneError naming the argument; metadata only, no host sync): src, idx or
  lengths that are not tensors (lists, numpy arrays) or of the wrong rank ([B, T, ...], [B, K],
  [B]); idx or lengths not int32/int64; batch sizes that disagree; tensors on different devices;
  k_caches / v_caches / k_out / v_out that are not lists or tuples of tensors (a bare tensor would
  be iterated over its batch axis), lists of different lengths, caches that are not 4-d or differ
  from k_caches[0] in shape, dtype or device, outputs that are not [B, H, >= K, Dh] or differ from
  k_out[0] in shape, or are not of the caches' dtype.
- Refused with validate=True (one host sync): lengths outside [0, K], live idx entries outside
  [0, T) or not strictly ascending, and (compact_kv) an output whose memory overlaps a cache or
  another output (the CUDA kernel would race with itself; the check compares memory ranges, so
  two outputs interleaved in one buffer are refused too). validate=False: the caller guarantees
  all of that (the engine does); bad indices then give zero rows or a RuntimeError from the CPU op.
- Empty dimensions are defined: B = 0, K = 0, T = 0 (with lengths 0), empty cache lists
  (nothing to do).
- Any strides work on every path: the compiled ops take strided sources; layouts that
  compact_kv's launch cannot take (a last axis that is not contiguous, or layers with different
  strides) run the reference instead.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import VtpruneError
from . import _checks as check
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
def check_index_args(idx, lengths, B: int | None, device, op: str) -> None:
    """Types, ranks, dtypes, batch size and device of idx and lengths (no host sync); B and device
    None: only that they agree with each other (compact_kv with no layers)."""
    check.tensor(op, "idx", idx, "2-d", "[B, K]", ndim=2)
    check.tensor(op, "lengths", lengths, "1-d", "[B]", ndim=1)
    check.index_dtype(op, "idx", idx)
    check.index_dtype(op, "lengths", lengths)
    if B is None:
        B, device = idx.shape[0], idx.device
    if idx.shape[0] != B or lengths.shape[0] != B:
        raise VtpruneError(f"{op}: idx must be [B, K] and lengths [B] with B = {B} (the data's batch), got "
                           f"{tuple(idx.shape)} and {tuple(lengths.shape)}")
    if idx.device != device or lengths.device != device:
        raise VtpruneError(f"{op}: idx (on {idx.device}) and lengths (on {lengths.device}) must be on the data's "
                           f"device {device}")


def validate_indices(idx: torch.Tensor, lengths: torch.Tensor, T: int, op: str) -> None:
    """Range and order checks with tensor ops (one host sync on a GPU). The compiled CPU op
    checks the same again (RuntimeError) when called directly through torch.ops."""
    if idx.dim() != 2 or lengths.dim() != 1 or idx.shape[0] != lengths.shape[0]:
        raise VtpruneError(f"{op}: idx must be [B, K] and lengths [B], got {tuple(idx.shape)} and "
                           f"{tuple(lengths.shape)}")
    K = idx.shape[1]
    live = torch.arange(K, device=idx.device)[None, :] < lengths[:, None]
    bad_len = (lengths < 0) | (lengths > K)
    bad_range = live & ((idx < 0) | (idx >= T))
    bad_order = live[:, 1:] & (idx[:, 1:] <= idx[:, :-1])
    flags = torch.stack([bad_len.any(), bad_range.any(), bad_order.any()]).tolist()
    if flags[0]:
        b = int(bad_len.nonzero()[0, 0])
        raise VtpruneError(f"{op}: lengths[{b}] = {int(lengths[b])} is outside [0, K = {K}]")
    if flags[1]:
        b, j = bad_range.nonzero()[0].tolist()
        raise VtpruneError(f"{op}: idx[{b}, {j}] = {int(idx[b, j])} is out of range [0, {T})")
    if flags[2]:
        b, j = bad_order.nonzero()[0].tolist()
        raise VtpruneError(f"{op}: idx[{b}] must be strictly ascending, but idx[{b}, {j + 1}] = "
                           f"{int(idx[b, j + 1])} follows {int(idx[b, j])}")


def _tensor_list(op: str, name: str, v) -> list:
    if not isinstance(v, (list, tuple)):
        raise VtpruneError(f"{op}: {name} must be a list or tuple of tensors (one per layer), got {check.describe(v)}")
    for i, t in enumerate(v):
        check.tensor(op, f"{name}[{i}]", t, "4-d", "[B, H, T, Dh]" if name.endswith("caches") else "[B, H, >= K, Dh]",
                     ndim=4)
    return list(v)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the bytes t can touch (its extent, not its exact elements)."""
    start = t.data_ptr()
    return start, start + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _check_no_overlap(op: str, sources: dict, outputs: dict) -> None:
    """No output's memory range meets a source's or another output's (sources may share)."""
    spans = sorted((*_span(t), name, name in outputs) for name, t in {**sources, **outputs}.items() if t.numel())
    last_src = last_out = None  # the earlier source / output reaching furthest
    for start, end, name, is_out in spans:
        for other in (last_src, last_out) if is_out else (last_out,):
            if other is not None and start < other[0]:
                raise VtpruneError(f"{op}: {name if is_out else other[1]} overlaps {other[1] if is_out else name} in "
                                   f"memory; outputs must be separate from the caches and from each other")
        if is_out and (last_out is None or end > last_out[0]):
            last_out = (end, name)
        if not is_out and (last_src is None or end > last_src[0]):
            last_src = (end, name)


# ----------------------------------------------------------------------------- public ops
def gather_tokens(src: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """See the module docstring. Bad indices raise VtpruneError; `validate=False` skips the value
    checks (on CUDA they cost one host sync) for callers that built idx themselves, e.g. the engine."""
    op = "gather_tokens"
    check.tensor(op, "src", src, "[B, T] or [B, T, ...]", min_ndim=2)
    check_index_args(idx, lengths, src.shape[0], src.device, op)
    if check.flag(op, "validate", validate):
        validate_indices(idx, lengths, src.shape[1], op)
    if _HAVE_CUDA_OPS if src.is_cuda else _HAVE_OPS:
        return torch.ops.vtprune.gather_tokens(src, idx, lengths)
    return gather_tokens_reference(src, idx, lengths)


def compact_kv(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], idx: torch.Tensor,
               lengths: torch.Tensor, k_out: Sequence[torch.Tensor], v_out: Sequence[torch.Tensor],
               validate: bool = True) -> None:
    """See the module docstring: all layers' K and V in one launch (CUDA)."""
    op = "compact_kv"
    lists = {n: _tensor_list(op, n, v) for n, v in
             (("k_caches", k_caches), ("v_caches", v_caches), ("k_out", k_out), ("v_out", v_out))}
    if len({len(v) for v in lists.values()}) != 1:
        raise VtpruneError(f"{op}: k_caches, v_caches, k_out and v_out must have the same length (one entry per "
                           f"layer), got {', '.join(str(len(v)) for v in lists.values())}")
    validate = check.flag(op, "validate", validate)
    k_caches, v_caches, k_out, v_out = lists.values()
    if not k_caches:  # no layers: nothing to do
        check_index_args(idx, lengths, None, None, op)
        return
    ref = k_caches[0]
    B, H, T, Dh = ref.shape
    check_index_args(idx, lengths, B, ref.device, op)
    K = idx.shape[1]
    for name in ("k_caches", "v_caches"):
        for i, t in enumerate(lists[name]):
            if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise VtpruneError(f"{op}: {name}[{i}] must match k_caches[0] ({check.describe(ref)}), got "
                                   f"{check.describe(t)}")
    oref = k_out[0]
    if not (oref.shape[0] == B and oref.shape[1] == H and oref.shape[2] >= K and oref.shape[3] == Dh):
        raise VtpruneError(f"{op}: k_out[0] must be [B, H, >= K, Dh] = [{B}, {H}, >= {K}, {Dh}], got "
                           f"{list(oref.shape)}")
    for name in ("k_out", "v_out"):
        for i, t in enumerate(lists[name]):
            if t.shape != oref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise VtpruneError(f"{op}: {name}[{i}] must be {str(ref.dtype).replace('torch.', '')} (the caches' "
                                   f"dtype) of k_out[0]'s shape {list(oref.shape)} on {ref.device}, got "
                                   f"{check.describe(t)}")
    if validate:
        validate_indices(idx, lengths, T, op)
        _check_no_overlap(op, {f"{n}[{i}]": t for n in ("k_caches", "v_caches") for i, t in enumerate(lists[n])},
                          {f"{n}[{i}]": t for n in ("k_out", "v_out") for i, t in enumerate(lists[n])})
    # the launch takes one stride set for all sources and one for all outputs, last axis contiguous
    one_layout = (all(t.stride() == ref.stride() for t in k_caches + v_caches)
                  and all(t.stride() == oref.stride() for t in k_out + v_out)
                  and ref.stride(3) == 1 and oref.stride(3) == 1)
    if one_layout and (_HAVE_CUDA_OPS if ref.is_cuda else _HAVE_OPS):
        torch.ops.vtprune.compact_kv(k_caches, v_caches, idx, lengths, k_out, v_out)
        return
    compact_kv_reference(k_caches, v_caches, idx, lengths, k_out, v_out)
