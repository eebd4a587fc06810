"""Typed view of a LLaVA-1.5 config (the llava-hf `config.json`, or a `LlavaConfig`).

Only what the engine needs is read, and every value it reads is type- and range-checked here
(vtprune/validate.py: no bools or floats for integers, no NaN) with a message naming the key by
its full path, so the model code never branches on config formats or meets a value it cannot run.
Both transformers 4.x keys (`rope_theta`, `rope_scaling`) and 5.x keys (`rope_parameters`)
are understood.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, VtpruneError
from ..files import read_json
from ..validate import check_bool, check_choice, check_int, check_mapping, check_number, is_int, show, type_name

# The activation functions a config may name (model.py implements each one under this name).
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")


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
        where = "config"
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            config = read_model_json(path, "config.json", missing=f"config.json not found: {path}")
            where = f"config.json {path}"
        elif hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: expected a LlavaConfig or a JSON object, got {type_name(config)}")
        return _parse(config, where)


def read_model_json(path: str, what: str, missing: str | None = None):
    """A JSON file of a model directory, parsed; every problem is one CheckpointError naming the file
    ("not found", "permission denied", "is a directory", "not UTF-8 text", "not valid JSON", a
    symlink loop, a FIFO)."""
    if missing is not None and not os.path.lexists(path):
        raise CheckpointError(missing)
    try:
        return read_json(path, what)
    except CheckpointError:
        raise
    except VtpruneError as e:
        raise CheckpointError(str(e)) from None


# Values the engine runs. Sizes are capped at 2**31 - 1 (int32 indexing in the kernels; the
# largest LLaVA-1.5 value is a 32064-token vocabulary): a bigger number is a typo, not a model.
_MAX = 2**31 - 1


# What transformers' LlamaConfig / CLIPVisionConfig take for a key config.json leaves out (or sets
# to null): the hub's llava-hf/llava-1.5-7b-hf config.json gives text_config only its vocab_size,
# context and eps (hidden_size, heads and layers are LlamaConfig's defaults, Vicuna-7B's sizes) and
# vision_config no hidden_act or layer_norm_eps. Values of transformers 5.24 (unchanged since 4.28;
# tests/test_hostile_config.py compares them with the installed classes). Derived values
# (num_key_value_heads = heads, head_dim = hidden / heads) are computed, as transformers does.
TEXT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                 "hidden_act": "silu", "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
                 "tie_word_embeddings": False}
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-5,
                   "hidden_act": "quick_gelu"}


class _Section:
    """Typed reads of one mapping of config.json, every error naming the key by its full path;
    an absent or null key takes `defaults` (transformers' value), else the default given."""

    def __init__(self, d: dict, prefix: str, where: str, defaults: dict | None = None):
        self.d, self.prefix, self.where, self.defaults = d, prefix, f"{where}: ", defaults or {}

    def _value(self, key: str, default: Any):
        v = self.d.get(key)
        if v is None:
            default = self.defaults.get(key, default)
            if default is ...:
                raise CheckpointError(f"{self.where}missing key '{self.prefix}{key}'")
            return default
        return v

    def int(self, key: str, default: Any = ..., lo: int = 1, hi: int = _MAX) -> int:
        return check_int(self._value(key, default), self.prefix + key, lo, hi, error=CheckpointError,
                         where=self.where)

    def positive(self, key: str, default: Any = ...) -> float:
        return check_number(self._value(key, default), self.prefix + key, 0, lo_open=True, error=CheckpointError,
                            where=self.where, want="a finite number > 0")

    def bool(self, key: str, default: bool) -> bool:
        return check_bool(self._value(key, default), self.prefix + key, error=CheckpointError, where=self.where)

    def choice(self, key: str, default: Any, choices) -> str:
        return check_choice(self._value(key, default), self.prefix + key, choices, error=CheckpointError,
                            where=self.where)

    def fail(self, msg: str):
        raise CheckpointError(self.where + msg)


def _token_ids(value, key: str, vocab: int, sec: _Section) -> tuple[int, ...]:
    """eos_token_id: an id, a list of ids, or null (none), each in [0, vocab)."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and not value:
        sec.fail(f"{key} must be a token id or a non-empty list of them, got []")
    for i in items:
        if not is_int(i) or not 0 <= i < vocab:
            sec.fail(f"{key} must be a token id in [0, {vocab}) or a list of them, got {show(value)}")
    return tuple(int(i) for i in items)


def _parse(d: dict, where: str = "config") -> LlavaModelConfig:
    top = _Section(d, "", where)
    model_type = d.get("model_type", "llava")
    if model_type != "llava":
        top.fail(f"model_type is {_quoted(model_type)}, only 'llava' (LLaVA-1.5) is supported")
    for key in ("vision_config", "text_config"):
        if key not in d or d[key] is None:
            top.fail(f"missing key '{key}' ('vision_config' and 'text_config' must both be present)")
        check_mapping(d[key], key, error=CheckpointError, where=top.where)
    v = _Section(d["vision_config"], "vision_config.", where, VISION_DEFAULTS)
    t = _Section(d["text_config"], "text_config.", where, TEXT_DEFAULTS)
    vt = v.d.get("model_type", "clip_vision_model")
    if vt != "clip_vision_model":
        top.fail(f"vision_config.model_type is {_quoted(vt)}, only 'clip_vision_model' is supported")
    tt = t.d.get("model_type", "llama")
    if tt != "llama":
        top.fail(f"text_config.model_type is {_quoted(tt)}, only 'llama' is supported")
    acts = ACTIVATIONS

    vision = VisionConfig(
        hidden_size=v.int("hidden_size"),
        intermediate_size=v.int("intermediate_size"),
        num_layers=v.int("num_hidden_layers"),
        num_heads=v.int("num_attention_heads"),
        image_size=v.int("image_size"),
        patch_size=v.int("patch_size"),
        num_channels=v.int("num_channels"),
        layer_norm_eps=v.positive("layer_norm_eps"),
        hidden_act=v.choice("hidden_act", ..., acts),
    )
    if vision.hidden_size % vision.num_heads:
        v.fail(f"vision_config.hidden_size ({vision.hidden_size}) must be a multiple of "
               f"vision_config.num_attention_heads ({vision.num_heads})")
    if vision.image_size % vision.patch_size:
        v.fail(f"vision_config.image_size ({vision.image_size}) must be a multiple of vision_config.patch_size "
               f"({vision.patch_size})")
    if vision.num_channels != 3:
        v.fail(f"vision_config.num_channels must be 3 (images are converted to RGB), got {vision.num_channels}")

    # RoPE: transformers 5 writes rope_parameters, 4.x writes rope_theta (+ rope_scaling).
    rope, rope_key = {}, "text_config.rope_parameters"
    for key in ("rope_parameters", "rope_scaling"):
        if t.d.get(key) is not None:
            rope, rope_key = check_mapping(t.d[key], "text_config." + key, error=CheckpointError,
                                           where=top.where), "text_config." + key
            break
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        top.fail(f"{rope_key}.rope_type {_quoted(rope_type)} is not supported (only 'default')")
    if rope.get("rope_theta") is not None:
        rope_theta = _Section(rope, rope_key + ".", where).positive("rope_theta")
    else:
        rope_theta = t.positive("rope_theta")

    hidden = t.int("hidden_size")
    heads = t.int("num_attention_heads")
    kv_heads = t.int("num_key_value_heads", heads)
    if t.d.get("head_dim") is None and hidden % heads:
        t.fail(f"text_config.hidden_size ({hidden}) must be a multiple of text_config.num_attention_heads "
               f"({heads}) when text_config.head_dim is not given")
    head_dim = t.int("head_dim", hidden // heads)
    if head_dim % 2:  # RoPE rotates pairs of dimensions
        t.fail(f"text_config.head_dim must be even (RoPE rotates pairs of dimensions), got {head_dim}")
    if heads % kv_heads:
        t.fail(f"text_config.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    vocab = t.int("vocab_size")
    tie = t.d.get("tie_word_embeddings")
    text = TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=t.int("intermediate_size"),
        num_layers=t.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=t.positive("rms_norm_eps"),
        rope_theta=rope_theta,
        max_position_embeddings=t.int("max_position_embeddings"),
        hidden_act=t.choice("hidden_act", ..., acts),
        attention_bias=t.bool("attention_bias", ...),
        mlp_bias=t.bool("mlp_bias", ...),
        tie_word_embeddings=(t.bool("tie_word_embeddings", ...) if tie is not None
                             else top.bool("tie_word_embeddings", False)),
        eos_token_id=_token_ids(t.d.get("eos_token_id", 2), "text_config.eos_token_id", vocab, t),
    )

    n = vision.num_layers
    layers = d.get("vision_feature_layer", -2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if not layers or not all(is_int(i) for i in layers):
        top.fail(f"vision_feature_layer must be a layer index or a non-empty list of them, got "
                 f"{show(d.get('vision_feature_layer'))}")
    for i in layers:
        if not -(n + 1) <= i <= n:
            top.fail(f"vision_feature_layer {i} is out of range for {n} vision layers "
                     f"(hidden states {-(n + 1)}..{n})")
    strategy = top.choice("vision_feature_select_strategy", "default", ("default", "full"))
    key = "image_token_id" if d.get("image_token_index") is None and d.get("image_token_id") is not None \
        else "image_token_index"
    image_token = top.int(key, 32000, lo=0)
    if image_token >= vocab:
        top.fail(f"{key} {image_token} is outside the vocabulary (text_config.vocab_size = {vocab})")
    return LlavaModelConfig(
        vision=vision,
        text=text,
        image_token_index=image_token,
        vision_feature_layers=tuple(int(i) for i in layers),
        select_strategy=strategy,
        projector_act=top.choice("projector_hidden_act", "gelu", acts),
        projector_bias=top.bool("multimodal_projector_bias", True),
    )


def _quoted(value) -> str:
    return f"'{value}'" if isinstance(value, str) else show(value)
