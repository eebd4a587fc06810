"""Training checkpoints: the trainable modules, the optimizers' state and the step; no pickle.

    OUT/checkpoint/pruning.safetensors        merger + pruner heads (the format LlavaEngine loads)
    OUT/checkpoint/discriminator.safetensors
    OUT/checkpoint/optimizers.safetensors     every optimizer state tensor, keyed <optimizer>.<param>.<name>
    OUT/checkpoint/ema.safetensors            the weight average (training/ema.py), when the run keeps one
    OUT/checkpoint/state.json                 step, the optimizers' param_groups, the run's settings

A checkpoint is written to OUT/checkpoint.tmp and renamed into place, so a run killed while
saving keeps its previous checkpoint. Loading checks every file (safetensors headers, state.json's
structure, each tensor's name and shape) before restoring anything.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from ..engine.weights import read_tensors
from ..errors import CheckpointError, VtpruneError
from ..files import read_json
from ..pruning.weights import load_pruning_weights, save_pruning_weights
from ..validate import is_int, show, type_name

CHECKPOINT_DIR = "checkpoint"


def _optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{name}.{pid}.{key}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(out_dir: str, step: int, modules, discriminator, optimizers: dict, settings: dict,
                    ema=None) -> str:
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
    state = {"step": step, "optimizers": groups, "settings": settings}
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state().items()},
                  os.path.join(tmp, "ema.safetensors"))
        state["ema_updates"] = ema.updates
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(out_dir: str) -> dict | None:
    """OUT/checkpoint/state.json, checked (a JSON object with an integer step >= 0, the optimizers'
    param_groups and the run's settings), or None when there is no checkpoint."""
    path = os.path.join(out_dir, CHECKPOINT_DIR, "state.json")
    if not os.path.lexists(path):
        return None
    try:
        state = read_json(path, "training checkpoint")
    except VtpruneError as e:
        raise CheckpointError(str(e)) from None

    def bad(msg):
        raise CheckpointError(f"training checkpoint {path}: {msg} (a corrupt checkpoint: restore it, or start "
                              f"a new run in another --out)")

    if not isinstance(state, dict):
        bad(f"expected a JSON object, got {type_name(state)}")
    if not is_int(state.get("step")) or state["step"] < 0:
        bad(f"'step' must be an integer >= 0, got {show(state.get('step'))}")
    if not isinstance(state.get("settings"), dict):
        bad(f"'settings' must be a JSON object, got {show(state.get('settings'))}")
    opts = state.get("optimizers")
    if not isinstance(opts, dict):
        bad(f"'optimizers' must be a JSON object, got {show(opts)}")
    for name, spec in opts.items():
        groups = spec.get("param_groups") if isinstance(spec, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   for g in groups):
            bad(f"'optimizers.{name}.param_groups' must be a list of parameter groups, got {show(groups)}")
    return state


def load_checkpoint(out_dir: str, modules, discriminator, optimizers: dict, ema=None) -> int:
    """Restore modules, discriminator, optimizers (and the weight average) in place; returns the
    step to continue from. Every tensor's name and shape is checked against this run's modules
    before anything is loaded."""
    ckpt = os.path.join(out_dir, CHECKPOINT_DIR)
    state = read_state(out_dir)
    if state is None:
        raise CheckpointError(f"no checkpoint to resume in {out_dir} (expected {ckpt}/state.json)")
    ema_tensors = None
    if ema is not None:
        if not is_int(state.get("ema_updates")) or state["ema_updates"] < 0:
            raise CheckpointError(f"checkpoint {ckpt}: 'ema_updates' must be an integer >= 0, got "
                                  f"{show(state.get('ema_updates'))} (a checkpoint of a run without ema_decay?)")
        ema_tensors = read_tensors(os.path.join(ckpt, "ema.safetensors"), "checkpoint weight average",
                                   {k: tuple(v.shape) for k, v in ema.state().items()})
    load_pruning_weights(modules, os.path.join(ckpt, "pruning.safetensors"))
    d_state = read_tensors(os.path.join(ckpt, "discriminator.safetensors"), "checkpoint discriminator",
                           {k: tuple(v.shape) for k, v in discriminator.state_dict().items()})
    discriminator.load_state_dict(d_state)
    opt_path = os.path.join(ckpt, "optimizers.safetensors")
    tensors = read_tensors(opt_path, "checkpoint optimizer state")
    restored = []
    for name, opt in optimizers.items():
        if name not in state["optimizers"]:
            raise CheckpointError(f"checkpoint {ckpt} has no state for optimizer '{name}'")
        params = [p for g in opt.param_groups for p in g["params"]]
        per_param: dict[int, dict] = {}
        prefix = name + "."
        for key, t in tensors.items():
            if not key.startswith(prefix):
                continue
            pid, _, field = key[len(prefix):].partition(".")
            if not pid.isdigit() or not field or int(pid) >= len(params):
                raise CheckpointError(f"checkpoint optimizer state {opt_path}: tensor '{key}' names no parameter "
                                      f"of optimizer '{name}' ({len(params)} parameters)")
            # Adam's moments have their parameter's shape (load_state_dict does not check it, and
            # the first step would fail); 'step' is a scalar
            if t.dim() > 0 and tuple(t.shape) != tuple(params[int(pid)].shape):
                raise CheckpointError(f"checkpoint optimizer state {opt_path}: tensor '{key}' has shape "
                                      f"{list(t.shape)}, its parameter {list(params[int(pid)].shape)}")
            per_param.setdefault(int(pid), {})[field] = t
            restored.append(key)
        groups = state["optimizers"][name]["param_groups"]
        for g in groups:  # JSON turns tuples (betas) into lists
            g.update({k: tuple(v) for k, v in g.items() if k == "betas" and isinstance(v, list)})
        try:
            opt.load_state_dict({"state": per_param, "param_groups": groups})
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt}: optimizer '{name}' does not match this run: "
                                  f"{' '.join(str(e).split())}") from None
    extra = sorted(set(tensors) - set(restored))
    if extra:
        raise CheckpointError(f"checkpoint optimizer state {opt_path}: tensor '{extra[0]}' belongs to no "
                              f"optimizer of this run ({', '.join(optimizers)})")
    if ema is not None:
        ema.load(ema_tensors, state["ema_updates"])
    return int(state["step"])
