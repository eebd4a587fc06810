"""Read llava-hf safetensors checkpoints into the engine's own modules.

Three key layouts exist in the wild and all map to one set of names here:
- hub llava-hf/llava-1.5-7b-hf (transformers < 4.52): `vision_tower.vision_model.*`,
  `language_model.model.*`, `language_model.lm_head.weight`, `multi_modal_projector.*`
- transformers 4.52 - 4.57 save_pretrained: `model.vision_tower.vision_model.*`,
  `model.language_model.*`, `lm_head.weight`
- transformers 5.x save_pretrained: `vision_tower.*` (no `vision_model`), `language_model.model.*`,
  `language_model.lm_head.weight`
Only safetensors are read (never pickles), tensor by tensor, straight to the target device and dtype.
"""
from __future__ import annotations

import json
import os
import re
import warnings

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .model import LlavaModel

_RULES = [
    (r"^model\.(vision_tower|multi_modal_projector|language_model|lm_head)\.", r"\1."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.encoder\.layers\.", "vision.layers."),
    (r"^vision_tower\.", "vision."),
    (r"^multi_modal_projector\.", "projector."),
    (r"^language_model\.", "decoder."),
    (r"^lm_head\.", "decoder.lm_head."),
]
# Present in checkpoints, not needed by the engine (CLIP's last layers past vision_feature_layer,
# its post-layernorm, which LLaVA never uses, and rotary buffers some old exports carry).
_UNUSED = re.compile(r"^vision\.(post_layernorm\.|layers\.\d+\.)|rotary_emb\.inv_freq$")


def canonical_name(key: str) -> str:
    for pattern, repl in _RULES:
        key = re.sub(pattern, repl, key)
    return key


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.startswith("model") and f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
        hint = " (found pickle files, which are never loaded: convert them to safetensors)" if bins else ""
        raise CheckpointError(f"no model*.safetensors files in {model_dir}{hint}")
    paths = [os.path.join(model_dir, f) for f in files]
    for p in paths:
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint shard missing: {p}")
    return paths


def load_weights(model: LlavaModel, model_dir: str, device, dtype) -> None:
    """Fill every parameter of `model` (built on the meta device) from the checkpoint."""
    expected = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        try:
            f = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {e}") from None
        with f:
            for key in f.keys():
                name = canonical_name(key)
                if name not in expected:
                    if not _UNUSED.search(name):
                        warnings.warn(f"checkpoint tensor '{key}' is not used by the engine", stacklevel=2)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                want = tuple(expected[name].shape)
                if shape != want:
                    raise CheckpointError(f"checkpoint tensor '{key}' has shape {list(shape)}, "
                                          f"expected {list(want)} for this config")
                loaded[name] = f.get_tensor(key).to(device=device, dtype=dtype)
    if "decoder.lm_head.weight" not in loaded and model.cfg.text.tie_word_embeddings \
            and "decoder.embed_tokens.weight" in loaded:
        loaded["decoder.lm_head.weight"] = loaded["decoder.embed_tokens.weight"]
    missing = [n for n in expected if n not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor '{missing[0]}'{more} in {model_dir}")
    model.load_state_dict(loaded, strict=False, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
