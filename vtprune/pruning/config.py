"""PruningConfig: every key of configs/vision_token_pruning.yaml, typed and validated.

Checks that need the model (visual token count, decoder depth) run in `check_against_model`,
when the engine attaches the config; everything else when the file is read. Errors name the key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..errors import VtpruneError

POLICIES = ("two_stage", "fastv", "pdrop", "visionzip", "random")


def _default_optimizers():
    return {"token_merger": {"lr": 2e-5}, "layer_pruners": {"lr": 2e-5}, "discriminator": {"lr": 5e-4}}


@dataclass
class PruningConfig:
    # which policy prunes (the learned two-stage method, or a baseline at a token budget)
    policy: str = "two_stage"
    budget: int | None = None              # baselines: average visual tokens per decoder layer
    # Token merger (before the decoder)
    merger_type: str = "simple"            # or "question_aware"
    merge_ratio: float = 0.5               # fraction of visual tokens kept by the merge
    target_merge_tokens: int = 288         # merged token count (must agree with merge_ratio)
    proportional_attention: bool = True    # decoder attention adds log(size) to a merged token's logits
    merge_locality: float = 0.0            # > 0: initial weight of the merge's spatial term (TokenMerger)
    # Layer pruners (inside the decoder)
    pruning_layers: list = field(default_factory=lambda: [10, 20, 31])
    layer_keep_tokens: list = field(default_factory=lambda: [200, 150, 100])  # visual tokens kept at each
    keep_mode: str = "topk"                # "topk" (layer_keep_tokens) or "threshold" (per-sample, ragged)
    keep_threshold: float = 0.5            # keep probability needed in threshold mode
    pruner_d_internal: int = 512
    pruner_num_heads: int = 4
    # Temperature annealing (training; inference uses temperature_min for the merge)
    temperature: float = 1.0
    temperature_min: float = 0.1
    temperature_anneal_rate: float = 0.5
    # training: where the keep masks' straight-through gradient comes from. "logit": the loss's
    # derivative w.r.t. each kept token's additive attention bias, which also says "take attention
    # off big (sink-like) merged tokens": heads drift towards dropping the largest clusters.
    # "value": the derivative w.r.t. a scale on each kept token's value vector (its content),
    # leaving the softmax's redistribution out. SynthVQA, a head at layer 2 of 6 (merge 288,
    # locality on), val accuracy every 150 steps: logit 94.4, 89.7, 89.3, 90.6; value 92.7, 92.3,
    # 94.9, 94.9. On a layers-4/5 schedule they were alike (best 95.3 / 94.9). Dev box, 2026-11-27.
    mask_gradient: str = "logit"
    # > 0: the merger's and heads' selection logits are standardized per row and multiplied by
    # this (modules.standardize_logits says why); 0: raw logits, as the first heads were trained
    selection_logit_scale: float = 0.0
    # Loss weights (training)
    adv_loss_weight: float = 1.0
    task_loss_weight: float = 25.0
    task_loss_average: str = "token"       # answer tokens weighted per "token" or per "example"
    merge_sparsity_weight: float = 1e-4
    optimizers: dict = field(default_factory=_default_optimizers)
    # safetensors file with the merger / pruner weights (relative to the YAML file); None: random
    weights: str | None = None

    @classmethod
    def from_yaml(cls, path) -> "PruningConfig":
        import yaml

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise VtpruneError(f"pruning config not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise VtpruneError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise VtpruneError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
        cfg = cls.from_dict(data, where=path)
        if cfg.weights and not os.path.isabs(cfg.weights):
            cfg.weights = os.path.join(os.path.dirname(os.path.abspath(path)), cfg.weights)
        return cfg

    @classmethod
    def from_dict(cls, data: dict, where: str = "pruning config") -> "PruningConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VtpruneError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        data = dict(data)
        for f in dataclasses.fields(cls):  # PyYAML reads 1e-4 (no '.') as a string
            if f.name in data and f.type == "float" and isinstance(data[f.name], str):
                try:
                    data[f.name] = float(data[f.name])
                except ValueError:
                    raise VtpruneError(f"{where}: '{f.name}' must be a number, got {data[f.name]!r}") from None
        if isinstance(data.get("optimizers"), dict):
            for spec in data["optimizers"].values():
                if isinstance(spec, dict) and isinstance(spec.get("lr"), str):
                    try:
                        spec["lr"] = float(spec["lr"])
                    except ValueError:
                        pass  # reported by check()
        cfg = cls(**data)
        cfg.check()
        return cfg

    @classmethod
    def load(cls, spec) -> "PruningConfig":
        """A PruningConfig, a dict, or a YAML path."""
        if isinstance(spec, cls):
            spec.check()
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, (str, os.PathLike)):
            return cls.from_yaml(spec)
        raise VtpruneError(f"pruning: expected a PruningConfig, dict or YAML path, got {type(spec).__name__}")

    @classmethod
    def scaled_for(cls, num_visual_tokens: int, num_layers: int, **overrides) -> "PruningConfig":
        """The design's defaults moved to another model size: pruning layers at the same relative
        depths as 10/20/31 of 32, token counts in proportion to 288 -> 200 -> 150 -> 100 of 576."""
        layers, prev = [], 0
        for i in (10, 20, 31):
            layer = min(max(round(i * num_layers / 32), prev + 1), num_layers - 1)
            if layer > prev:
                layers.append(layer)
                prev = layer
        scale = num_visual_tokens / 576
        keeps = [max(1, round(k * scale)) for k in (200, 150, 100)][: len(layers)]
        target = max(1, round(288 * scale))
        cfg = cls(target_merge_tokens=target, merge_ratio=target / num_visual_tokens, pruning_layers=layers,
                  layer_keep_tokens=keeps, **overrides)
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        def bad(key, msg):
            raise VtpruneError(f"pruning config: '{key}' {msg}")

        if self.policy not in POLICIES:
            bad("policy", f"must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.policy != "two_stage" and (not isinstance(self.budget, int) or self.budget < 1):
            bad("budget", f"must be a positive integer for policy '{self.policy}', got {self.budget!r}")
        if self.merger_type not in ("simple", "question_aware"):
            bad("merger_type", f"must be 'simple' or 'question_aware', got {self.merger_type!r}")
        if not isinstance(self.merge_ratio, (int, float)) or not 0 < self.merge_ratio <= 1:
            bad("merge_ratio", f"must be in (0, 1], got {self.merge_ratio!r}")
        if not isinstance(self.proportional_attention, bool):
            bad("proportional_attention", f"must be true or false, got {self.proportional_attention!r}")
        for key in ("merge_locality", "selection_logit_scale"):  # optional strengths, 0 switches them off
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                bad(key, f"must be a number >= 0 (0: off), got {v!r}")
        if not isinstance(self.target_merge_tokens, int) or self.target_merge_tokens < 1:
            bad("target_merge_tokens", f"must be a positive integer, got {self.target_merge_tokens!r}")
        layers = self.pruning_layers
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            bad("pruning_layers", f"must be a list of layer indices, got {layers!r}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            bad("pruning_layers", f"must be strictly increasing, got {layers}")
        if any(i < 1 for i in layers):
            bad("pruning_layers", f"must be >= 1 (layer 0 is before the decoder: that is the merger), got {layers}")
        keeps = self.layer_keep_tokens
        if not isinstance(keeps, list) or len(keeps) != len(layers) or not all(isinstance(k, int) and k >= 1
                                                                              for k in keeps):
            bad("layer_keep_tokens", f"must be one positive integer per pruning layer ({len(layers)}), got {keeps!r}")
        if any(b > a for a, b in zip(keeps, keeps[1:])):
            bad("layer_keep_tokens", f"must not increase from layer to layer, got {keeps}")
        if self.keep_mode not in ("topk", "threshold"):
            bad("keep_mode", f"must be 'topk' or 'threshold', got {self.keep_mode!r}")
        if not 0 < self.keep_threshold < 1:
            bad("keep_threshold", f"must be in (0, 1), got {self.keep_threshold!r}")
        if self.pruner_d_internal < 1 or self.pruner_d_internal % self.pruner_num_heads:
            bad("pruner_d_internal", f"must be a positive multiple of pruner_num_heads ({self.pruner_num_heads})")
        if not 0 < self.temperature_min <= self.temperature:
            bad("temperature_min", f"must be in (0, temperature = {self.temperature}], got {self.temperature_min}")
        if not 0 < self.temperature_anneal_rate <= 1:
            bad("temperature_anneal_rate", f"must be in (0, 1], got {self.temperature_anneal_rate}")
        if self.mask_gradient not in ("logit", "value"):
            bad("mask_gradient", f"must be 'logit' or 'value', got {self.mask_gradient!r}")
        if self.task_loss_average not in ("example", "token"):
            bad("task_loss_average", f"must be 'token' or 'example', got {self.task_loss_average!r}")
        for key in ("adv_loss_weight", "task_loss_weight", "merge_sparsity_weight"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                bad(key, f"must be a number >= 0, got {getattr(self, key)!r}")
        if not isinstance(self.optimizers, dict):
            bad("optimizers", "must be a mapping")
        for name in self.optimizers:
            if name not in ("token_merger", "layer_pruners", "discriminator"):
                bad("optimizers", f"has unknown entry '{name}' (token_merger, layer_pruners, discriminator)")
            lr = (self.optimizers[name] or {}).get("lr")
            if not isinstance(lr, (int, float)) or lr <= 0:
                bad(f"optimizers.{name}.lr", f"must be a number > 0, got {lr!r}")

    def check_against_model(self, num_visual_tokens: int, num_layers: int) -> None:
        def bad(key, msg):
            raise VtpruneError(f"pruning config: '{key}' {msg}")

        if self.policy == "two_stage":
            if self.target_merge_tokens > num_visual_tokens:
                bad("target_merge_tokens", f"is {self.target_merge_tokens}, more than the model's "
                                           f"{num_visual_tokens} visual tokens")
            expected = self.merge_ratio * num_visual_tokens
            if abs(expected - self.target_merge_tokens) > 1:
                bad("merge_ratio", f"{self.merge_ratio} of {num_visual_tokens} visual tokens is {expected:g}, "
                                   f"inconsistent with target_merge_tokens = {self.target_merge_tokens}")
            if self.layer_keep_tokens and self.layer_keep_tokens[0] > self.target_merge_tokens:
                bad("layer_keep_tokens", f"starts at {self.layer_keep_tokens[0]}, more than the "
                                         f"{self.target_merge_tokens} merged tokens")
            if any(i >= num_layers for i in self.pruning_layers):
                bad("pruning_layers", f"{self.pruning_layers} has a layer outside the decoder's 0..{num_layers - 1}")
        elif self.budget > num_visual_tokens:
            bad("budget", f"is {self.budget}, more than the model's {num_visual_tokens} visual tokens")
