"""The decoder's KV cache: preallocated, static shapes, one buffer pair per layer, one row per
request in flight.

Layout of layer l's buffers, [R, H_kv, S_l, Dh] with S_l = P_l + N:

    row b, slots [0, P_l)        row b's prompt as layer l holds it: slots [0, len_l[b]) are valid
    row b, slots [P_l, P_l + N)  row b's generated tokens: its own step s is written at slot P_l + s

    layer:      0 .. 1        2 .. 3        4        5      (a two-stage plan: merge, drops at 2, 4, 5)
    P_l:        320           192           192      192    (capacities(T) of the plan, rounded to 64)
    row 0       [prompt|gen]  [kept |gen]   ...             request 7, at its step 12
    row 1       [prompt|gen]  [kept |gen]   ...             request 9, at its step 3 (inserted later)
    row 2       (free: computed with the others, its results ignored)

Why this layout:
- Prefill of right-padded rows is plain causal attention (no mask); the cache is written as is.
- Each row writes its decode step to slot P_l + step[b] (one `scatter_` per layer with a [R]
  step tensor on the device; the static batch path passes one step for every row): the decode
  step has static shapes whatever the rows' ages, and is captured in a CUDA graph once.
- Rows are independent: `insert_rows` copies a freshly prefilled batch (its own small cache)
  into free rows between decode steps, lengths, key biases and masks included; a finished row is
  retired by simply no longer reading it. This is what the in-flight scheduler
  (engine/scheduler.py) needs.
- Layers own their prompt capacity P_l and lengths len_l: P_l is the pruning plan's per-layer
  size (PruningPlan.capacities), so layers after a merge or drop hold only kept tokens and a
  pruned request holds fewer KV bytes per row (`row_bytes`); decode reads are proportional to
  kept tokens. The decode mask comes from (len_l, P_l, step).
- key_bias=True adds one additive bias per slot (0 unless set; PruningPlan writes log(size) of
  merged tokens there, proportional attention): the decode masks are then float, not bool.
- Capacities are rounded up to SLOT_ROUND slots (`layout`) so that batches of similar length
  reuse one cache and one captured graph (masked slots cost reads only: at most 63 of ~680 slots
  for LLaVA-1.5 prompts).
"""
from __future__ import annotations

import torch

# Prompt capacity and decode length are rounded up to this many slots (see the docstring).
SLOT_ROUND = 64


def _round_up(n: int) -> int:
    return -(-n // SLOT_ROUND) * SLOT_ROUND


def layout(plan, prompt_len: int, max_new_tokens: int, num_layers: int) -> tuple[list[int], int]:
    """(prompt capacity P_l per layer, decode slots N) of a cache for prompts padded to
    `prompt_len` tokens under `plan` (a PruningPlan, or None: unpruned), rounded to SLOT_ROUND."""
    caps = plan.capacities(prompt_len) if plan is not None else [prompt_len] * num_layers
    return [_round_up(c) for c in caps], _round_up(max_new_tokens)


def row_bytes(plan, prompt_len: int, max_new_tokens: int, text_cfg, dtype, rounded: bool = False) -> int:
    """KV bytes one request holds: per layer, 2 (K, V) x H_kv x Dh x (its prompt tokens as that
    layer holds them after merge and pruning + max_new_tokens), plus the per-slot key bias of
    each segment with proportional attention. `rounded`: as a cache row of `layout` holds it
    (the in-flight scheduler's rows), else the exact count."""
    L = text_cfg.num_layers
    if rounded:
        caps, n = layout(plan, prompt_len, max_new_tokens, L)
    else:
        caps = plan.capacities(prompt_len) if plan is not None else [prompt_len] * L
        n = max_new_tokens
    size = torch.empty((), dtype=dtype).element_size()
    total = sum(2 * text_cfg.num_kv_heads * text_cfg.head_dim * (c + n) for c in caps)
    if plan is not None and plan.uses_key_bias:
        starts = sorted({0, *(p.layer for p in plan.drop_points)})
        total += sum(caps[i] + n for i in starts)
    return total * size


class KVCache:
    def __init__(self, batch: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 prompt_capacity: int | list[int], max_new_tokens: int, dtype, device,
                 segments: list[int] | None = None, key_bias: bool = False):
        """`segments`: first layers of the groups of layers that hold the same tokens (a pruning
        plan's drop layers, plus 0). Each group gets one lengths tensor, allocated here once and
        only ever written in place: a captured CUDA graph reads these very tensors."""
        caps = prompt_capacity if isinstance(prompt_capacity, list) else [prompt_capacity] * num_layers
        if len(caps) != num_layers:
            raise ValueError(f"prompt_capacity has {len(caps)} entries, expected {num_layers}")
        self.batch, self.max_new_tokens = batch, max_new_tokens
        self.prompt_capacity = caps
        self.k = [torch.zeros(batch, num_kv_heads, p + max_new_tokens, head_dim, dtype=dtype, device=device)
                  for p in caps]
        self.v = [torch.zeros_like(k) for k in self.k]
        starts = sorted({0, *(segments or [])})
        self.lengths: list[torch.Tensor] = []
        self.key_bias: list[torch.Tensor | None] = []
        for i in range(num_layers):
            if i in starts:
                group = torch.zeros(batch, dtype=torch.long, device=device)
                bias = torch.zeros(batch, caps[i] + max_new_tokens, dtype=dtype, device=device) if key_bias else None
                first = i
            if caps[i] != caps[first]:  # one mask (and bias) per segment serves all its layers
                raise ValueError(f"layer {i} has another prompt capacity ({caps[i]}) than its segment's first "
                                 f"layer {first} ({caps[first]})")
            self.lengths.append(group)
            self.key_bias.append(bias)
        self.segment_starts = starts
        # Per segment: the mask of its prompt slots ([B, 1, 1, S]: bool, or float with key_bias),
        # rewritten in place whenever its lengths or biases change, and each slot's decode step
        # (slot - P for generated slots, a value no step reaches for prompt slots). A decode step
        # then builds its masks in two ops per segment (<=, |) instead of seven (the audit).
        self._prompt_mask: dict[int, torch.Tensor] = {}
        self._slot_step: dict[int, torch.Tensor] = {}
        for i in starts:
            S, p = self.capacity(i), caps[i]
            slots = torch.arange(S, device=device)
            self._slot_step[i] = torch.where(slots >= p, slots - p, S + 1)
            fill = (torch.zeros if self.key_bias[i] is None else torch.empty)
            self._prompt_mask[i] = fill(batch, 1, 1, S, dtype=torch.bool if self.key_bias[i] is None else dtype,
                                        device=device)
            self._refresh_mask(i)

    def capacity(self, layer: int) -> int:
        return self.k[layer].shape[2]

    def set_lengths(self, lengths: torch.Tensor, layers=None) -> None:
        """Record how many prompt slots of each row are valid for `layers` (default all), which
        must be a whole number of segments. In place, so captured graphs see it."""
        layers = list(range(len(self.k))) if layers is None else list(layers)
        starts = [i for i in layers if i in self.segment_starts]
        if not layers or layers[0] not in self.segment_starts:
            raise ValueError(f"set_lengths: layers {layers[:1]}... do not start a cache segment "
                             f"{self.segment_starts}")
        for i in starts:
            self.lengths[i].copy_(lengths)
            self._refresh_mask(i)

    def _refresh_mask(self, i: int) -> None:
        """Rewrite segment i's prompt mask (in place: a captured CUDA graph reads this tensor)."""
        slots = torch.arange(self.capacity(i), device=self.lengths[i].device)
        prompt = slots[None, :] < self.lengths[i][:, None]
        bias = self.key_bias[i]
        if bias is not None:
            prompt = bias.masked_fill(~prompt, float("-inf"))
        self._prompt_mask[i].copy_(prompt[:, None, None, :])

    def set_key_bias(self, bias: torch.Tensor, layers=None) -> None:
        """Per-slot additive attention bias [B, T] of the prompt for the segments that start at one
        of `layers` (default all); slots from T on (padding, generated tokens) get 0. In place."""
        layers = list(range(len(self.k))) if layers is None else list(layers)
        for i in (i for i in layers if i in self.segment_starts):
            buf = self.key_bias[i]
            if buf is None:
                raise ValueError("set_key_bias: this cache was built without key_bias=True")
            T = bias.shape[1]
            buf[:, :T].copy_(bias)
            buf[:, T:].zero_()
            self._refresh_mask(i)

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[2]
        if T > self.prompt_capacity[layer]:
            raise ValueError(f"prefill of {T} tokens exceeds layer {layer}'s prompt capacity "
                             f"{self.prompt_capacity[layer]}")
        self.k[layer][:, :, :T].copy_(k)
        self.v[layer][:, :, :T].copy_(v)

    def write_decode(self, layer: int, step: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Row b's k, v [B, H_kv, 1, Dh] at slot P_l + step[b]; `step` is [B] (each row its own
        step) or [1] (every row at the same step)."""
        p = self.prompt_capacity[layer]  # slot p + step, written through a view of the decode slots:
        index = step.view(-1, 1, 1, 1).expand(k.shape)  # no slot = step + p add per layer and step
        self.k[layer][:, :, p:].scatter_(2, index, k)
        self.v[layer][:, :, p:].scatter_(2, index, v)
        return self.k[layer], self.v[layer]

    def decode_masks(self, step: torch.Tensor) -> list[torch.Tensor]:
        """[B, 1, 1, S_l] bool per layer: the row's prompt slots plus decode slots up to its
        step (`step` [B] or [1], as in write_decode; with key_bias: float, the slot's bias where
        visible and -inf elsewhere; generated slots' bias is 0). From device tensors only (no
        host sync), one mask per segment."""
        masks = {}
        for i in self.segment_starts:
            decoded = (self._slot_step[i] <= step[:, None])[:, None, None, :]  # [B or 1, 1, 1, S]
            prompt = self._prompt_mask[i]
            masks[i] = prompt | decoded if prompt.dtype == torch.bool else prompt.masked_fill(decoded, 0.0)
        out, current = [], None
        for i in range(len(self.lengths)):
            current = masks.get(i, current)
            out.append(current)
        return out

    def insert_rows(self, rows: torch.Tensor, src: "KVCache") -> None:
        """Copy the prefilled prompts of `src` (a cache of len(rows) rows with the same segments,
        no decode slots needed) into this cache's `rows`: keys, values, lengths and key biases;
        the rows' decode slots are left as they are (a row's mask shows only slots below its
        step). In place: a captured CUDA graph keeps reading the same buffers."""
        if src.segment_starts != self.segment_starts or len(src.k) != len(self.k):
            raise ValueError(f"insert_rows: the source cache's segments {src.segment_starts} differ from "
                             f"this cache's {self.segment_starts}")
        if src.batch != rows.numel():
            raise ValueError(f"insert_rows: {rows.numel()} rows given for a source cache of {src.batch}")
        for layer, c in enumerate(src.prompt_capacity):
            if c > self.prompt_capacity[layer]:
                raise ValueError(f"insert_rows: layer {layer} holds {c} prompt slots in the source, this cache "
                                 f"{self.prompt_capacity[layer]}")
            self.k[layer][rows, :, :c] = src.k[layer][:, :, :c]
            self.v[layer][rows, :, :c] = src.v[layer][:, :, :c]
        for i in self.segment_starts:
            self.lengths[i][rows] = src.lengths[i]
            bias = self.key_bias[i]
            if bias is not None:
                if src.key_bias[i] is None:
                    raise ValueError("insert_rows: this cache has key biases, the source has none")
                c = src.prompt_capacity[i]
                bias[rows] = 0.0
                bias[rows, :c] = src.key_bias[i][:, :c]
            self._refresh_mask(i)
