"""Kernels and their op wrappers. Each op lives in one module: Triton/CUDA kernel launcher,
plain-PyTorch reference (the CPU path and the test oracle), autograd Function, public entry.

    gumbel_topk   gumbel_topk.py   Triton        differentiable top-k selection
    soft_merge    soft_merge.py    Triton        softmax merge of N tokens into M centres
    gather_tokens compaction.py    csrc/ (CUDA)  compact hidden states / position ids
    compact_kv    compaction.py    csrc/ (CUDA)  compact KV caches of many layers at once

The compaction names are loaded lazily, so importing the Triton ops never triggers the C++
build. (The Triton ops are imported eagerly: their modules share the functions' names, and the
package attribute must be the function.)
"""
import importlib

from .gumbel_topk import gumbel_topk
from .soft_merge import soft_merge

_WHERE = {"gather_tokens": "compaction", "compact_kv": "compaction"}
__all__ = ["gumbel_topk", "soft_merge", *_WHERE]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'vtprune.kernels' has no attribute {name!r}")
