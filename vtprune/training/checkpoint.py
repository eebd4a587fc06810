"""Training checkpoints: the trainable modules, the optimizers' state and the step; no pickle.

    OUT/checkpoint/pruning.safetensors        merger + pruner heads (the format LlavaEngine loads)
    OUT/checkpoint/discriminator.safetensors
    OUT/checkpoint/optimizers.safetensors     every optimizer state tensor, keyed <optimizer>.<param>.<name>
    OUT/checkpoint/state.json                 step, the optimizers' param_groups, the run's settings

A checkpoint is written to OUT/checkpoint.tmp and renamed into place, so a run killed while
saving keeps its previous checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..pruning.weights import load_pruning_weights, save_pruning_weights

CHECKPOINT_DIR = "checkpoint"


def _optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{name}.{pid}.{key}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(out_dir: str, step: int, modules, discriminator, optimizers: dict, settings: dict) -> str:
    final = os.path.join(out_dir, CHECKPOINT_DIR)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_pruning_weights(modules, os.path.join(tmp, "pruning.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in discriminator.state_dict().items()},
              os.path.join(tmp, "discriminator.safetensors"))
    tensors, groups = {}, {}
    for name, opt in optimizers.items():
        t, g = _optimizer_tensors(name, opt)
        tensors.update(t)
        groups[name] = g
    save_file(tensors, os.path.join(tmp, "optimizers.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "optimizers": groups, "settings": settings}, f, indent=1)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, CHECKPOINT_DIR, "state.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def load_checkpoint(out_dir: str, modules, discriminator, optimizers: dict) -> int:
    """Restore modules, discriminator and optimizers in place; returns the step to continue from."""
    ckpt = os.path.join(out_dir, CHECKPOINT_DIR)
    state = read_state(out_dir)
    if state is None:
        raise CheckpointError(f"no checkpoint to resume in {out_dir} (expected {ckpt}/state.json)")
    load_pruning_weights(modules, os.path.join(ckpt, "pruning.safetensors"))
    try:
        d_state = load_file(os.path.join(ckpt, "discriminator.safetensors"))
        discriminator.load_state_dict(d_state)
        tensors = load_file(os.path.join(ckpt, "optimizers.safetensors"))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot load checkpoint {ckpt}: {e}") from None
    for name, opt in optimizers.items():
        if name not in state["optimizers"]:
            raise CheckpointError(f"checkpoint {ckpt} has no state for optimizer '{name}'")
        per_param: dict[int, dict] = {}
        prefix = name + "."
        for key, t in tensors.items():
            if key.startswith(prefix):
                pid, field = key[len(prefix):].split(".", 1)
                per_param.setdefault(int(pid), {})[field] = t
        groups = state["optimizers"][name]["param_groups"]
        for g in groups:  # JSON turns tuples (betas) into lists
            g.update({k: tuple(v) for k, v in g.items() if k == "betas"})
        try:
            opt.load_state_dict({"state": per_param, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {ckpt}: optimizer '{name}' does not match this run: {e}") from None
    return int(state["step"])
