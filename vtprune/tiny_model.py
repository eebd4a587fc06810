"""Small LLaVA checkpoints built locally (nothing is downloaded).

`build_tiny_llava(dir)` writes a complete llava-hf directory — config, safetensors weights,
tokenizer, image processor — using transformers' own `LlavaForConditionalGeneration` and
`LlavaProcessor.save_pretrained`, so the directory is exactly what a user downloading
llava-hf/llava-1.5-7b-hf has, at a size that runs on a laptop CPU. Tests, `python main.py`
and the CPU benchmark smoke runs use it.

The tokenizer is the engine's byte-level BPE stand-in (engine/tokenizer.py).
"""
from __future__ import annotations

import os

import torch

from .engine.runtime import quiet_transformers
from .engine.tokenizer import IMAGE_TOKEN, build_tokenizer


def tiny_llava_config(image_size: int = 336, patch_size: int = 14, vision_hidden: int = 32,
                      vision_layers: int = 3, text_hidden: int = 64, text_layers: int = 4,
                      heads: int = 4, kv_heads: int = 2, vocab_size: int = 512,
                      vision_feature_layer=-2, select_strategy: str = "default",
                      max_position_embeddings: int = 2048, image_token_index: int | None = None):
    """A LlavaConfig of the LLaVA-1.5 family at toy size (defaults: 576 visual tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = build_tokenizer(vocab_size)
    if image_token_index is None:
        image_token_index = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                              num_hidden_layers=vision_layers, num_attention_heads=heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=text_hidden * 3 - 8,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       vocab_size=max(vocab_size, image_token_index + 1),
                       max_position_embeddings=max_position_embeddings,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                       vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy=select_strategy)


def build_tiny_llava(out_dir: str, seed: int = 0, **config_kwargs) -> str:
    """Write a random tiny LLaVA in the llava-hf layout to `out_dir` and return it."""
    cfg = tiny_llava_config(**config_kwargs)
    torch.manual_seed(seed)
    with quiet_transformers():
        from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

        model = LlavaForConditionalGeneration(cfg).eval()
        _spread_weights(model, seed)
        size = cfg.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                             crop_size={"height": size, "width": size})
        processor = LlavaProcessor(image_processor=image_processor,
                                   tokenizer=build_tokenizer(config_kwargs.get("vocab_size", 512)),
                                   patch_size=cfg.vision_config.patch_size,
                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                   num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return out_dir


def _spread_weights(model, seed: int) -> None:
    """transformers' init (std 0.02) makes a toy model's logits nearly flat, so greedy search
    would hinge on float noise; std 0.2 on the decoder and output layers gives decisive logits
    and exact-match tests that mean something."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model" in name or "lm_head" in name or "projector" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
