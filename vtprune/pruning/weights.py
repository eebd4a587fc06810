"""Saving and loading the two-stage modules (TokenMerger + PrunerHeads) as safetensors."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ..engine.weights import read_tensors
from .modules import PruningModules


def save_pruning_weights(modules: PruningModules, path: str) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in modules.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata={"format": "vtprune-pruning-v1"})


def load_pruning_weights(modules: PruningModules, path: str) -> None:
    """Load the merger / pruner weights; names, shapes and dtypes are checked from the file's header
    before any tensor is read, and a mismatch with the config names the tensor."""
    expected = modules.state_dict()
    loaded = read_tensors(path, "pruning weights", {k: tuple(v.shape) for k, v in expected.items()},
                          hint=" (do the config's merger_type / pruning_layers / pruner_d_internal match the file?)")
    with torch.no_grad():
        modules.load_state_dict(loaded)
