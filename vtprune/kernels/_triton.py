"""When an op runs its Triton kernel: CUDA tensors (if triton imports), and CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1, set before vtprune.kernels is imported: that is how
CI tests the kernels without a GPU). Everything else runs the op's PyTorch reference."""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # e.g. macOS, or a CPU-only install without triton
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    if not HAVE_TRITON:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
