"""PruningConfig: every key of configs/vision_token_pruning.yaml, typed and validated.

Checks that need the model (visual token count, decoder depth) run in `check_against_model`,
when the engine attaches the config; everything else when the file is read. Errors name the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..engine.weights import safetensors_header
from ..errors import VtpruneError
from ..files import read_yaml
from ..validate import check_int, check_number, is_int, is_number, show, type_name, yaml_number
from .policies import get_policy, policy_names

OPTIMIZERS = ("token_merger", "layer_pruners", "discriminator")


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
    # leaving the softmax's redistribution out; "value" kept an early (layer-2) head steady on
    # SynthVQA (README, *Pruning*: val accuracy of both per checkpoint).
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
    # Training's end state (the defaults leave training as it was): "cosine" takes every lr to 0
    # by the last step (training/schedule.py: lr_factor_at); ema_decay > 0 saves an exponential
    # moving average of the weights (training/ema.py); the last noise_off_fraction of the steps
    # run without Gumbel noise, i.e. with inference's own hard top-k decisions in the forward
    # (the straight-through masks still carry gradient). Why: README, *Measured quality*.
    lr_schedule: str = "constant"
    ema_decay: float = 0.0
    noise_off_fraction: float = 0.0
    # safetensors file with the merger / pruner weights (relative to the YAML file); None: random
    weights: str | None = None

    @classmethod
    def from_yaml(cls, path) -> "PruningConfig":
        """Read and check a YAML file (`yaml.safe_load`: plain data only). A relative `weights`
        path is relative to the YAML file; the weights file must exist when the config is read."""
        if isinstance(path, (str, os.PathLike)) and not os.path.lexists(os.fspath(path)):
            raise VtpruneError(f"pruning config not found: {os.fspath(path)}")
        data = read_yaml(path, "pruning config")
        path = os.fspath(path)
        where = f"pruning config {path}"
        if data is None:  # an empty file: every default
            data = {}
        if not isinstance(data, dict):
            raise VtpruneError(f"{where}: expected a mapping of keys (policy: ..., merge_ratio: ...), got "
                               f"{type_name(data)}")
        weights = data.get("weights")
        if isinstance(weights, str) and weights and not os.path.isabs(weights):
            data = dict(data, weights=os.path.join(os.path.dirname(os.path.abspath(path)), weights))
        return cls.from_dict(data, where=where)

    @classmethod
    def from_dict(cls, data: dict, where: str = "pruning config") -> "PruningConfig":
        if not isinstance(data, dict):
            raise VtpruneError(f"{where}: expected a mapping of keys, got {type_name(data)}")
        for k in data:
            if not isinstance(k, str):
                raise VtpruneError(f"{where}: key {show(k)} is not a string (keys are names such as 'policy')")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VtpruneError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        data = dict(data)
        for f in dataclasses.fields(cls):  # PyYAML reads 1e-4 (no '.') as a string
            if f.name in data and f.type == "float":
                data[f.name] = yaml_number(data[f.name])
        if isinstance(data.get("optimizers"), dict):
            # entries not given keep their defaults; each given entry's lr may be PyYAML's "1e-4"
            opts = _default_optimizers()
            for name, spec in data["optimizers"].items():
                opts[name] = ({k: (yaml_number(v) if k == "lr" else v) for k, v in spec.items()}
                              if isinstance(spec, dict) else spec)
            data["optimizers"] = opts
        cfg = cls(**data)
        cfg.check(where)
        if cfg.weights:
            cfg.check_weights_file(where)
        return cfg
    @classmethod
    def load(cls, spec) -> "PruningConfig":
        """A PruningConfig, a dict, or a YAML path."""
        if isinstance(spec, cls):
            spec.check()
            if spec.weights:
                spec.check_weights_file()
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
    def check(self, where: str = "pruning config") -> None:
        """Every field's type and range (vtprune/validate.py: no bools for numbers, no NaN or inf);
        the error names the key."""
        w = f"{where}: "

        def bad(key, msg):
            raise VtpruneError(f"{w}'{key}' {msg}")

        def integer(key, lo=1):
            check_int(getattr(self, key), f"'{key}'", lo, where=w)

        def number(key, lo, hi=None, lo_open=False, hi_open=False, want=None):
            check_number(getattr(self, key), f"'{key}'", lo, hi, lo_open=lo_open, hi_open=hi_open, where=w,
                         want=want)

        def choice(key, choices):
            v = getattr(self, key)
            if not isinstance(v, str) or v not in choices:
                want = " or ".join(f"'{c}'" for c in choices) if len(choices) == 2 else "one of " + ", ".join(choices)
                bad(key, f"must be {want}, got {show(v)}")

        choice("policy", policy_names())  # the built-ins and every registered policy
        needs_budget = get_policy(self.policy).needs_budget
        if self.budget is not None or needs_budget:
            if not is_int(self.budget) or self.budget < 1:
                bad("budget", f"must be a positive integer for policy '{self.policy}', got {show(self.budget)}"
                    if needs_budget else f"must be a positive integer (or null), got {show(self.budget)}")
        choice("merger_type", ("simple", "question_aware"))
        number("merge_ratio", 0, 1, lo_open=True, want="in (0, 1]")
        if not isinstance(self.proportional_attention, bool):
            bad("proportional_attention", f"must be true or false, got {show(self.proportional_attention)}")
        for key in ("merge_locality", "selection_logit_scale"):  # optional strengths, 0 switches them off
            number(key, 0, want="a number >= 0 (0: off)")
        integer("target_merge_tokens")
        layers = self.pruning_layers
        if not isinstance(layers, list) or not all(is_int(i) for i in layers):
            bad("pruning_layers", f"must be a list of decoder layer indices (integers), got {show(layers)}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            bad("pruning_layers", f"must be strictly increasing (distinct layers, in order), got {layers}")
        if any(i < 1 for i in layers):
            bad("pruning_layers", f"must be >= 1 (layer 0 is before the decoder: that is the merger), got {layers}")
        keeps = self.layer_keep_tokens
        if not isinstance(keeps, list) or len(keeps) != len(layers) or not all(is_int(k) and k >= 1 for k in keeps):
            bad("layer_keep_tokens", f"must be one positive integer per pruning layer ({len(layers)}), got "
                                     f"{show(keeps)}")
        if any(b > a for a, b in zip(keeps, keeps[1:])):
            bad("layer_keep_tokens", f"must not increase from layer to layer, got {keeps}")
        choice("keep_mode", ("topk", "threshold"))
        number("keep_threshold", 0, 1, lo_open=True, hi_open=True, want="in (0, 1)")
        integer("pruner_num_heads")
        integer("pruner_d_internal")
        if self.pruner_d_internal % self.pruner_num_heads:
            bad("pruner_d_internal", f"must be a positive multiple of pruner_num_heads ({self.pruner_num_heads}), "
                                     f"got {self.pruner_d_internal}")
        number("temperature", 0, lo_open=True, want="a number > 0")
        if not is_number(self.temperature_min) or not math.isfinite(self.temperature_min) \
                or not 0 < self.temperature_min <= self.temperature:
            bad("temperature_min", f"must be in (0, temperature = {self.temperature:g}], got "
                                   f"{show(self.temperature_min)}")
        number("temperature_anneal_rate", 0, 1, lo_open=True, want="in (0, 1]")
        choice("mask_gradient", ("logit", "value"))
        choice("lr_schedule", ("constant", "cosine"))
        number("ema_decay", 0, 1, hi_open=True, want="in [0, 1) (0: off)")
        number("noise_off_fraction", 0, 1, want="in [0, 1]")
        choice("task_loss_average", ("token", "example"))
        for key in ("adv_loss_weight", "task_loss_weight", "merge_sparsity_weight"):
            number(key, 0, want="a number >= 0")
        if not isinstance(self.optimizers, dict):
            bad("optimizers", f"must be a mapping (token_merger, layer_pruners, discriminator -> {{lr: ...}}), "
                              f"got {type_name(self.optimizers)}")
        for name, spec in self.optimizers.items():
            if name not in OPTIMIZERS:
                bad("optimizers", f"has unknown entry {show(name)} ({', '.join(OPTIMIZERS)})")
            if not isinstance(spec, dict):
                bad(f"optimizers.{name}", f"must be a mapping such as {{lr: 1.0e-4}}, got {show(spec)}")
            for k in spec:
                if k != "lr":
                    bad(f"optimizers.{name}", f"has unknown key {show(k)} (only 'lr' is read)")
            check_number(spec.get("lr"), f"'optimizers.{name}.lr'", 0, lo_open=True, where=w, want="a number > 0")
        for name in OPTIMIZERS:
            if name not in self.optimizers:
                bad("optimizers", f"has no entry '{name}'")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            bad("weights", f"must be the path of a .safetensors file (or null), got {show(self.weights)}")

    def check_weights_file(self, where: str = "pruning config") -> None:
        """The `weights` file exists, is a regular file and a safetensors file (its header is read)."""
        try:
            safetensors_header(self.weights, "pruning weights")
        except VtpruneError as e:
            raise VtpruneError(f"{where}: 'weights': {e}") from None

    def check_against_model(self, num_visual_tokens: int, num_layers: int) -> None:
        def bad(key, msg):
            raise VtpruneError(f"pruning config: '{key}' {msg}")

        if not get_policy(self.policy).needs_budget:
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
