"""Hardware floors: the least time a step can take on a card, to report results as fractions of it.

All constants live here, with their source. A step's floor is the larger of
    memory: bytes it must read (weights + KV cache) / the card's copy bandwidth
    compute: its FLOPs (2 per multiply-accumulate) / the card's dense bf16 matmul peak
(`floor = max(memory, compute)`; the percentage reached is floor / measured).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    copy_gb_s: float      # device-to-device copy, bytes read + written per second / 1e9
    bf16_tflop_s: float   # dense bf16 matmul, 1e12 FLOP/s
    source: str


# The project's perf anchors for the lent H200 (device-to-device copy counting bytes read +
# written; a bf16 8192^3 matmul); when and how they were measured: README "Benchmarks".
H200 = Card("NVIDIA H200", 4250.0, 693.0, "the project's perf anchors (README: Benchmarks)")
CARDS = {"h200": H200}


def card_for(device_name: str, override: str | None = None) -> Card | None:
    """The card whose name the device's contains (case-insensitive), or `override` by key."""
    if override:
        return CARDS[override.lower()]
    name = device_name.lower()
    return next((c for k, c in CARDS.items() if k in name), None)


def decoder_weight_params(cfg) -> int:
    """Weights a decode step reads: every decoder layer, the final norm and lm_head (the
    embedding table is read one row per token, negligible)."""
    t = cfg.text
    d, m, hd = t.hidden_size, t.intermediate_size, t.head_dim
    attn = d * t.num_heads * hd * 2 + d * t.num_kv_heads * hd * 2  # q, o; k, v
    return t.num_layers * (attn + 3 * d * m + 2 * d) + d + t.vocab_size * d


def decode_floor_s(cfg, batch: int, kv_tokens_per_layer: list[float], card: Card, dtype_bytes: int = 2) -> dict:
    """One decode step of `batch` rows, each attending over kv_tokens_per_layer[l] cached tokens."""
    t = cfg.text
    params = decoder_weight_params(cfg)
    kv_per_token_layer = 2 * t.num_kv_heads * t.head_dim * dtype_bytes
    kv_bytes = batch * sum(kv_tokens_per_layer) * kv_per_token_layer
    weight_bytes = params * dtype_bytes
    flops = 2 * params * batch + batch * sum(4 * n * t.num_heads * t.head_dim for n in kv_tokens_per_layer)
    memory_s = (weight_bytes + kv_bytes) / (card.copy_gb_s * 1e9)
    compute_s = flops / (card.bf16_tflop_s * 1e12)
    return {"floor_s": max(memory_s, compute_s), "memory_s": memory_s, "compute_s": compute_s,
            "bytes": weight_bytes + kv_bytes, "flops": flops}


def prefill_floor_s(cfg, batch: int, tokens_per_layer: list[int], projected_tokens: int, card: Card,
                    dtype_bytes: int = 2) -> dict:
    """Time to first token: vision tower + projector + decoder prefill FLOPs (engine/flops.py's
    formula) / matmul peak, or every weight read once / copy bandwidth, whichever is larger."""
    from vtprune.engine.flops import prefill_flops

    flops = 2 * batch * prefill_flops(cfg, tokens_per_layer, projected_tokens)
    v = cfg.vision
    vision_params = cfg.vision_layers_needed * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    weight_bytes = (decoder_weight_params(cfg) + vision_params) * dtype_bytes
    memory_s = weight_bytes / (card.copy_gb_s * 1e9)
    compute_s = flops / (card.bf16_tflop_s * 1e12)
    return {"floor_s": max(memory_s, compute_s), "memory_s": memory_s, "compute_s": compute_s, "flops": flops}
