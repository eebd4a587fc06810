"""Argument checks at the kernels' public boundaries (gumbel_topk, soft_merge, gather_tokens,
compact_kv). Each raises VtpruneError (a ValueError) that names the op, the argument, what was
expected and what came. They look at types, shapes, dtypes and devices only (no host sync), so
they run on every call; checks of values that need a sync stay behind the ops' `validate` flags.
"""
from __future__ import annotations

import numbers

import torch

from ..errors import VtpruneError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# Temperatures: tau and 1 / tau must both be ordinary (normal) fp32 numbers, because the kernels
# compute in fp32 (the reference divides by tau, the kernels multiply by 1 / tau: a tau whose
# reciprocal overflows fp32 (tau < 2.9e-39) would give inf * 0 = NaN there and 0 / tau = 0
# here). The bounds are rounded inwards to 1e-30 .. 1e30: at tau = 1e-30 a logit gap of 1e-28 already
# saturates the sigmoid, so nothing below it is distinguishable from a hard choice anyway.
TAU_MIN, TAU_MAX = 1e-30, 1e30
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below 2**64


def describe(v) -> str:
    """What a bad argument was, for the message: a tensor's dtype, shape and device, else the
    type and (short) value."""
    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).replace('torch.', '')} tensor of shape {list(v.shape)} on {v.device}"
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{type(v).__name__} {r}"


def tensor(op: str, name: str, v, shape: str, dims: str = "", ndim: int | None = None,
           min_ndim: int | None = None) -> torch.Tensor:
    """v must be a torch.Tensor (not a list or a numpy array: those are refused, not converted,
    because a silent copy would hide a wrong device or dtype) with ndim (or >= min_ndim) dims.
    Message: "<op>: <name> must be a <shape> tensor <dims>, got ..."."""
    dims = f" {dims}" if dims else ""
    if not isinstance(v, torch.Tensor):
        raise VtpruneError(f"{op}: {name} must be a {shape} torch.Tensor{dims}, got {describe(v)}")
    if (ndim is not None and v.dim() != ndim) or (min_ndim is not None and v.dim() < min_ndim):
        raise VtpruneError(f"{op}: {name} must be a {shape} tensor{dims}, got {describe(v)}")
    return v


def floating(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise VtpruneError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def index_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise VtpruneError(f"{op}: {name} must be an int32 or int64 tensor, got {t.dtype}")


def same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise VtpruneError(f"{op}: {', '.join(devices)} must be on one device, got {listed}")


def tau(op: str, v) -> float:
    """A real number (not a bool, not a tensor) in [TAU_MIN, TAU_MAX]; NaN and inf are refused."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise VtpruneError(f"{op}: tau must be a number > 0, got {describe(v)}")
    f = float(v)
    if not f > 0:
        raise VtpruneError(f"{op}: tau must be > 0, got {f!r}")
    if not TAU_MIN <= f <= TAU_MAX:  # also NaN and inf
        raise VtpruneError(f"{op}: tau must be > 0 and finite, within [{TAU_MIN:g}, {TAU_MAX:g}] (tau and 1/tau "
                           f"must be normal fp32 numbers), got {f!r}")
    return f


def flag(op: str, name: str, v) -> bool:
    """True or False only: a string such as "no" would otherwise count as True."""
    if not isinstance(v, bool):
        raise VtpruneError(f"{op}: {name} must be True or False, got {describe(v)}")
    return v


def integer(v) -> int | None:
    """A Python or numpy integer (not a bool, not a float, not a tensor) as an int, else None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        return None
    return int(v)


def seed(op: str, v) -> int | None:
    if v is None:
        return None
    s = integer(v)
    if s is None or not 0 <= s < SEED_LIMIT:
        raise VtpruneError(f"{op}: seed must be None or an int in [0, 2**64), got {describe(v)}")
    return s
