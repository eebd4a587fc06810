"""Saving and loading the two-stage modules (TokenMerger + PrunerHeads) as safetensors."""
from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .modules import PruningModules


def save_pruning_weights(modules: PruningModules, path: str) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in modules.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata={"format": "vtprune-pruning-v1"})


def load_pruning_weights(modules: PruningModules, path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"pruning weights not found: {path}")
    expected = modules.state_dict()
    loaded = {}
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read pruning weights {path}: {e}") from None
    with f:
        for key in f.keys():
            if key not in expected:
                raise CheckpointError(f"pruning weights {path}: unexpected tensor '{key}' (does the config's "
                                      f"merger_type / pruning_layers / pruner_d_internal match the file?)")
            t = f.get_tensor(key)
            if tuple(t.shape) != tuple(expected[key].shape):
                raise CheckpointError(f"pruning weights {path}: tensor '{key}' has shape {list(t.shape)}, "
                                      f"expected {list(expected[key].shape)} for this config")
            loaded[key] = t
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise CheckpointError(f"pruning weights {path}: missing tensor '{missing[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    with torch.no_grad():
        modules.load_state_dict(loaded)
