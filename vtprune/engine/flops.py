"""Prefill FLOPs by the formula of the project's perf anchors: a SwiGLU decoder layer over n tokens
costs 4nd^2 + 2n^2d + 3ndm (projections, attention, MLP; multiply-accumulates), a CLIP layer
4nd^2 + 2n^2d + 2ndm, the projector n(d_in d + d^2)."""
from __future__ import annotations

from .config import LlavaModelConfig


def decoder_layer_flops(n: int, d: int, m: int) -> int:
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def vision_flops(cfg: LlavaModelConfig) -> int:
    v = cfg.vision
    n = v.num_patches + 1
    per_layer = 4 * n * v.hidden_size ** 2 + 2 * n * n * v.hidden_size + 2 * n * v.hidden_size * v.intermediate_size
    return cfg.vision_layers_needed * per_layer


def projector_flops(cfg: LlavaModelConfig, n_tokens: int) -> int:
    d_in = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
    d = cfg.text.hidden_size
    return n_tokens * (d_in * d + d * d)


def prefill_flops(cfg: LlavaModelConfig, tokens_per_layer: list[int], projected_tokens: int, extra: int = 0) -> int:
    """One row: vision tower + projector over `projected_tokens` + every decoder layer at its own
    token count + `extra` (pruning modules)."""
    t = cfg.text
    return (vision_flops(cfg) + projector_flops(cfg, projected_tokens) + extra
            + sum(decoder_layer_flops(n, t.hidden_size, t.intermediate_size) for n in tokens_per_layer))
