"""Architectures by name, as LlavaConfig objects built in code (nothing is downloaded)."""
from __future__ import annotations


def llava_1_5_7b_config():
    """The exact llava-hf/llava-1.5-7b-hf architecture: CLIP ViT-L/14-336 (24 layers, features
    from layer -2, CLS dropped -> 576 tokens), 2-layer GELU projector, Vicuna-7B (32 layers,
    hidden 4096, 32 heads, MLP 11008, vocab 32064, context 4096)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")
