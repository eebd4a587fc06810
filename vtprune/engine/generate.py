"""Generation in three plain functions (prefill, decode_step, decode_tokens) plus the CUDA
graph that replays decode_step with static shapes.

A batch is right-padded: row b holds its `lengths[b]` prompt tokens at positions 0..len-1.
Generated token s of row b sits at RoPE position lengths[b] + s and in cache slot P + s
(see kv_cache.py), so every row advances in the same kernel launches.
"""
from __future__ import annotations

from typing import Callable

import torch

from .inputs import PreparedBatch
from .kv_cache import KVCache
from .model import LlavaModel
from .sampling import sample_next
from .shared_prefix import plan_sharing, prefill_shared_prefix

__all__ = ["vision_features", "prefill", "decode_step", "DecodeGraph", "CompiledDecode",
           "decode_tokens"]


def vision_features(model: LlavaModel, batch: PreparedBatch, probe=None) -> torch.Tensor:
    """The vision tower once per distinct image, then one row per image slot: [S, tokens, Dv]
    (S = B with one image per prompt)."""
    feats = model.vision(batch.pixel_values, probe=probe)
    return feats if batch.image_index is None else feats[batch.image_index]


def prefill(model: LlavaModel, batch: PreparedBatch, cache: KVCache | None, share_prefix: bool = True) -> torch.Tensor:
    """Vision tower, projector and decoder over the prompts; returns each row's last logits [B, V]."""
    feats = None if batch.pixel_values is None else model.projector(vision_features(model, batch))
    x = model.embed(batch.input_ids, feats)
    B, T = batch.input_ids.shape
    positions = torch.arange(T, device=x.device).expand(B, T)
    if cache is not None:
        cache.set_lengths(batch.lengths)
    sharing = plan_sharing(batch, model.cfg.image_token_index) if share_prefix else None
    if sharing is not None:  # questions about one image: its prefix runs once (shared_prefix.py)
        h = prefill_shared_prefix(model, batch, x, sharing, model.cfg.text.num_layers, cache)
    else:
        h = model.decoder(x, positions, cache)
    last = h[torch.arange(B, device=h.device), batch.lengths - 1]
    return model.decoder.logits(last)


def decode_step(model: LlavaModel, cache: KVCache, tokens: torch.Tensor, step: torch.Tensor,
                base_positions: torch.Tensor) -> torch.Tensor:
    """Feed each row's token at its step ([B]); returns logits [B, V] for the token after.
    `step` is an int64 device tensor: [1] (every row at one step, the static batch) or [B] (each
    row its own, the in-flight scheduler), so the whole function has static shapes."""
    x = model.decoder.embed_tokens(tokens[:, None])
    positions = (base_positions + step)[:, None]
    h = model.decoder(x, positions, cache, write_slot=step, attn_masks=cache.decode_masks(step))
    return model.decoder.logits(h[:, 0])


class DecodeGraph:
    """decode_step captured once in a CUDA graph for one cache; replays cost one launch.
    Inputs are copied into static buffers; the returned logits tensor is reused by every replay.
    per_row: one step per row ([B], a tensor given to each call) instead of one for all."""

    def __init__(self, model: LlavaModel, cache: KVCache, base_positions: torch.Tensor, warmup: int = 2,
                 per_row: bool = False):
        B = cache.batch
        dev = base_positions.device
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.step = torch.zeros(B if per_row else 1, dtype=torch.long, device=dev)
        self.base_positions = base_positions
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: lets cuBLAS/SDPA pick kernels outside capture
            for _ in range(warmup):
                decode_step(model, cache, self.tokens, self.step, self.base_positions)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(model, cache, self.tokens, self.step, self.base_positions)

    def __call__(self, tokens: torch.Tensor, step) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if isinstance(step, torch.Tensor):
            self.step.copy_(step)
        else:
            self.step.fill_(step)
        self.graph.replay()
        return self.logits


class CompiledDecode:
    """decode_step under torch.compile, gpt-fast's `torch.compile(decode_one_token,
    mode="reduce-overhead")`: inductor fuses the step's elementwise ops (RMSNorm, RoPE, SiLU * up)
    and, on a GPU, replays the result from CUDA graphs. The alternative to DecodeGraph (eager ops
    captured by hand); the GPU run measures both. One compilation per cache (shapes are static);
    the KV cache and its masks are marked static so the graphs write and read them in place. On
    CPU it compiles with mode "default" (no CUDA graphs): the tokens must equal eager decoding's."""

    def __init__(self, model: LlavaModel, cache: KVCache, base_positions: torch.Tensor):
        dev = base_positions.device
        self.model, self.cache, self.base_positions = model, cache, base_positions
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        if dev.type == "cuda":
            for t in [*cache.k, *cache.v, *cache.lengths, *cache._prompt_mask.values(), *cache._slot_step.values(),
                      base_positions, self.step]:
                torch._dynamo.mark_static_address(t)
        self.fn = torch.compile(decode_step, mode="reduce-overhead" if dev.type == "cuda" else "default",
                                fullgraph=True, dynamic=False)

    def __call__(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.step.fill_(step)
        return self.fn(self.model, self.cache, tokens, self.step, self.base_positions)


def decode_tokens(first_logits: torch.Tensor, max_new_tokens: int, step_fn: Callable,
                  temperature: float, top_p: float, generator: torch.Generator | None,
                  is_done: Callable[[list[list[int]]], bool], sync_every: int) -> list[list[int]]:
    """Sample token 0 from the prefill logits, then run `step_fn(tokens, step)` until every
    row is done or max_new_tokens are out. Tokens stay on the device; the host looks at them
    every `sync_every` steps (the only synchronisation) to ask `is_done`.
    Returns the generated ids per row (rows may run past their stop; the caller trims)."""
    B = first_logits.shape[0]
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=first_logits.device)
    tokens = sample_next(first_logits, temperature, top_p, generator)
    n = max_new_tokens
    for s in range(max_new_tokens):
        out[:, s] = tokens
        if s == max_new_tokens - 1:
            break
        if (s + 1) % sync_every == 0 and is_done(out[:, : s + 1].tolist()):
            n = s + 1
            break
        tokens = sample_next(step_fn(tokens, s), temperature, top_p, generator)
    return out[:, :n].tolist()
