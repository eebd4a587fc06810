"""Typed view of a LLaVA-1.5 config (the llava-hf `config.json`, or a `LlavaConfig`).

Only what the engine needs is read, and everything it cannot run is refused here with a
message naming the key, so the model code never branches on config formats.
Both transformers 4.x keys (`rope_theta`, `rope_scaling`) and 5.x keys (`rope_parameters`)
are understood.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    hidden_act: str
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    eos_token_id: tuple[int, ...]


@dataclass(frozen=True)
class LlavaModelConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int
    vision_feature_layers: tuple[int, ...]  # indices into the vision tower's hidden-state list
    select_strategy: str                   # "default" drops CLS, "full" keeps it
    projector_act: str
    projector_bias: bool

    @property
    def num_visual_tokens(self) -> int:
        return self.vision.num_patches + (1 if self.select_strategy == "full" else 0)

    @property
    def vision_layers_needed(self) -> int:
        """How many encoder layers must run: hidden_states[i] is the output of layer i
        (hidden_states[0] is the embedding), so negative indices count from num_layers + 1."""
        n = self.vision.num_layers
        return max(i if i >= 0 else n + 1 + i for i in self.vision_feature_layers)

    @classmethod
    def from_any(cls, config: Any) -> "LlavaModelConfig":
        """From a LlavaConfig, a dict, or a path to a config.json / model directory."""
        if isinstance(config, cls):
            return config
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise CheckpointError(f"config.json not found: {path}") from None
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        elif hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, dict):
            raise CheckpointError(f"expected a LlavaConfig or dict, got {type(config).__name__}")
        return _parse(config)


def _get(d: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise CheckpointError(f"config: missing key '{where}{key}'")
    return default


def _parse(d: dict) -> LlavaModelConfig:
    model_type = d.get("model_type", "llava")
    if model_type != "llava":
        raise CheckpointError(f"config: model_type is '{model_type}', only 'llava' (LLaVA-1.5) is supported")
    v, t = d.get("vision_config"), d.get("text_config")
    if not isinstance(v, dict) or not isinstance(t, dict):
        raise CheckpointError("config: 'vision_config' and 'text_config' must both be present")
    vt = v.get("model_type", "clip_vision_model")
    if vt != "clip_vision_model":
        raise CheckpointError(f"config: vision_config.model_type is '{vt}', only 'clip_vision_model' is supported")
    tt = t.get("model_type", "llama")
    if tt != "llama":
        raise CheckpointError(f"config: text_config.model_type is '{tt}', only 'llama' is supported")

    vision = VisionConfig(
        hidden_size=_get(v, "hidden_size", "vision_config."),
        intermediate_size=_get(v, "intermediate_size", "vision_config."),
        num_layers=_get(v, "num_hidden_layers", "vision_config."),
        num_heads=_get(v, "num_attention_heads", "vision_config."),
        image_size=_get(v, "image_size", "vision_config."),
        patch_size=_get(v, "patch_size", "vision_config."),
        num_channels=_get(v, "num_channels", "vision_config.", 3),
        layer_norm_eps=_get(v, "layer_norm_eps", "vision_config.", 1e-5),
        hidden_act=_get(v, "hidden_act", "vision_config.", "quick_gelu"),
    )

    # RoPE: transformers 5 writes rope_parameters, 4.x writes rope_theta (+ rope_scaling).
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"config: text_config rope_type '{rope_type}' is not supported (only 'default')")
    rope_theta = float(rope.get("rope_theta", t.get("rope_theta", 10000.0)))

    hidden = _get(t, "hidden_size", "text_config.")
    heads = _get(t, "num_attention_heads", "text_config.")
    eos = t.get("eos_token_id", 2)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    text = TextConfig(
        vocab_size=_get(t, "vocab_size", "text_config."),
        hidden_size=hidden,
        intermediate_size=_get(t, "intermediate_size", "text_config."),
        num_layers=_get(t, "num_hidden_layers", "text_config."),
        num_heads=heads,
        num_kv_heads=_get(t, "num_key_value_heads", "text_config.", heads),
        head_dim=_get(t, "head_dim", "text_config.", hidden // heads),
        rms_norm_eps=float(_get(t, "rms_norm_eps", "text_config.", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=_get(t, "max_position_embeddings", "text_config.", 4096),
        hidden_act=_get(t, "hidden_act", "text_config.", "silu"),
        attention_bias=bool(t.get("attention_bias", False)),
        mlp_bias=bool(t.get("mlp_bias", False)),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", d.get("tie_word_embeddings", False))),
        eos_token_id=eos,
    )
    if text.num_heads % text.num_kv_heads:
        raise CheckpointError("config: text_config.num_attention_heads must be a multiple of num_key_value_heads")

    layers = d.get("vision_feature_layer", -2)
    layers = tuple(layers) if isinstance(layers, (list, tuple)) else (int(layers),)
    for i in layers:
        if not -(vision.num_layers + 1) <= i <= vision.num_layers:
            raise CheckpointError(
                f"config: vision_feature_layer {i} is out of range for {vision.num_layers} vision layers")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"config: vision_feature_select_strategy '{strategy}' must be 'default' or 'full'")
    image_token = d.get("image_token_index", d.get("image_token_id", 32000))
    if not 0 <= image_token < text.vocab_size:
        raise CheckpointError(f"config: image_token_index {image_token} is outside the vocabulary ({text.vocab_size})")
    return LlavaModelConfig(
        vision=vision,
        text=text,
        image_token_index=int(image_token),
        vision_feature_layers=layers,
        select_strategy=strategy,
        projector_act=d.get("projector_hidden_act", "gelu"),
        projector_bias=bool(d.get("multimodal_projector_bias", True)),
    )
