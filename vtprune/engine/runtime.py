"""Where the engine runs: device and dtype resolution, and quiet transformers loading.

`default_device_dtype` fills in what a user left out (cuda when available, bfloat16 there,
float32 on the CPU); `resolve_device` / `resolve_dtype` turn a user's spelling into torch's or
refuse it with a VtpruneError naming it. Every entry point (CLI, trainer, lmms-eval plugin,
recipes) resolves through these, so "the default device" means one thing everywhere.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..errors import VtpruneError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def default_device_dtype(device, dtype):
    """(device, dtype) with None filled in: cuda when available, else cpu; bfloat16 on cuda,
    float32 on cpu. Given values pass through unchanged (resolve_* checks them)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "float32" if str(device).startswith("cpu") else "bfloat16"
    return device, dtype


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise VtpruneError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise VtpruneError(f"unsupported device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VtpruneError(f"device {device!r} requested but CUDA is not available "
                               f"(torch {torch.__version__}, no GPU visible)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VtpruneError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise VtpruneError(f"unsupported device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')")
    return dev


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs a fallback notice per processor load when torchvision is absent."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
