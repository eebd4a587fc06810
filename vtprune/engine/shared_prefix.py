"""Several questions about one image: compute the shared prefix once.

Rows whose prompts start with the same text and the same image (format_prompt gives every
question the prefix "USER: <image>") have identical decoder states over that prefix in every
layer before the first pruning decision (attention is causal; pruning after that point depends on
the question). The prefill then runs
  1. the distinct prefixes (text before the image + the image's tokens) through those layers once;
  2. each row's suffix (its question) through the same layers, attending to its prefix's keys;
  3. compact_kv / gather_tokens to lay each row out as an ordinary right-padded row: the KV cache
     slots and hidden states [prefix | suffix], for all these layers in one launch;
after which the prefill continues as usual (pruning included) from `stop`.
"""
from __future__ import annotations

import torch

from .inputs import PreparedBatch
from .kv_cache import KVCache
from .model import LlavaModel


def plan_sharing(batch: PreparedBatch, image_token: int):
    """(row -> distinct prefix index [B], prefix lengths [U], representative rows [U]) or None
    when no two rows share a prefix."""
    if batch.image_index is None or batch.images_per_row is not None:  # several or no images: not shared
        return None
    ids = batch.input_ids.tolist()
    lengths = batch.lengths.tolist()
    img = batch.image_index.tolist()
    keys, row_to_u, s_len, reps = {}, [], [], []
    for b, row in enumerate(ids):
        row = row[: lengths[b]]
        first = row.index(image_token)
        last = len(row) - 1 - row[::-1].index(image_token)
        key = (img[b], tuple(row[:first]), last - first)
        if key not in keys:
            keys[key] = len(reps)
            reps.append(b)
            s_len.append(last + 1)
        row_to_u.append(keys[key])
    if len(reps) == len(ids) or any(s >= n for s, n in zip([s_len[u] for u in row_to_u], lengths)):
        return None  # nothing shared, or a prompt ending with its image (no suffix to continue)
    dev = batch.input_ids.device
    return (torch.tensor(row_to_u, device=dev), torch.tensor(s_len, device=dev), torch.tensor(reps, device=dev))


def prefill_shared_prefix(model: LlavaModel, batch: PreparedBatch, x_full: torch.Tensor, sharing, stop: int,
                          cache: KVCache | None):
    """Layers [0, stop) with shared prefixes. x_full: the batch's input embeddings [B, T, D].
    Returns the hidden states entering layer `stop` [B, T, D] (right-padded rows), and fills the
    cache's layers < stop."""
    # local: importing the compaction ops loads (and on first use JIT-builds) the C++ extension,
    # which an engine whose batches never share a prefix must not wait for
    from ..kernels import compact_kv, gather_tokens

    row_to_u, s_len, reps = sharing
    B, T, D = x_full.shape
    dev = x_full.device
    U, S = reps.shape[0], int(s_len.max())
    layers = range(stop)
    L = model.cfg.text.num_layers
    t = model.cfg.text

    # 1. distinct prefixes
    xp = x_full[reps, :S]
    pcache = KVCache(U, L, t.num_kv_heads, t.head_dim, S, 0, x_full.dtype, dev)
    hp = model.decoder(xp, torch.arange(S, device=dev).expand(U, S), pcache, layers=layers)

    # 2. suffixes, attending to their prefix
    lengths = batch.lengths
    s_row = s_len[row_to_u]
    suf_len = lengths - s_row
    Ts = int(suf_len.max())
    j = torch.arange(Ts, device=dev)[None, :]
    src = (s_row[:, None] + j).clamp(max=T - 1)
    xs = x_full.gather(1, src[..., None].expand(B, Ts, D))
    positions = s_row[:, None] + j
    scache = KVCache(B, L, t.num_kv_heads, t.head_dim, Ts, 0, x_full.dtype, dev)
    pasts = {i: (pcache.k[i][row_to_u, :, :S], pcache.v[i][row_to_u, :, :S], s_row) for i in layers}
    hs = model.decoder(xs, positions, scache, layers=layers, pasts=pasts)

    # 3. one right-padded row each: [prefix | suffix] for hidden states and every layer's cache
    t_idx = torch.arange(T, device=dev)[None, :]
    idx = torch.where(t_idx < s_row[:, None], t_idx, S + t_idx - s_row[:, None])
    idx = torch.where(t_idx < lengths[:, None], idx, 0)
    h = gather_tokens(torch.cat([hp[row_to_u], hs], 1), idx, lengths, validate=False)
    if cache is not None and stop > 0:
        ks = [torch.cat([pcache.k[i][row_to_u, :, :S], scache.k[i][:, :, :Ts]], 2) for i in layers]
        vs = [torch.cat([pcache.v[i][row_to_u, :, :S], scache.v[i][:, :, :Ts]], 2) for i in layers]
        compact_kv(ks, vs, idx, lengths, [cache.k[i] for i in layers], [cache.v[i] for i in layers],
                   validate=False)
    return h
