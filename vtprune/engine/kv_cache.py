"""The decoder's KV cache: preallocated, static shapes, one buffer pair per layer.

Layout of layer l's buffers, [B, H_kv, S_l, Dh]:

    slots [0, P_l)            the prompt, right-padded: row b's tokens are slots [0, len_l[b])
    slots [P_l, P_l + N)      generated tokens; step s of every row is written at slot P_l + s

Why this layout:
- Prefill of right-padded rows is plain causal attention (no mask); the cache is written as is.
- Every row writes decode step s to the same slot, so a step is one `index_copy_` at a slot
  held in a device tensor: the decode step has static shapes and is captured in a CUDA graph.
- Layers own their prompt capacity P_l and lengths len_l, so layers after a pruning point can
  hold fewer (and per-row different) prompt tokens; the decode mask comes from (len_l, P_l).
- key_bias=True adds one additive bias per slot (0 unless set; PruningPlan writes log(size) of
  merged tokens there, proportional attention): the decode masks are then float, not bool.
"""
from __future__ import annotations

import torch


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
        p = self.prompt_capacity[layer]  # slot p + step, written through a view of the decode slots:
        self.k[layer][:, :, p:].index_copy_(2, step, k)  # no slot = step + p add per layer and step
        self.v[layer][:, :, p:].index_copy_(2, step, v)
        return self.k[layer], self.v[layer]

    def decode_masks(self, step: torch.Tensor) -> list[torch.Tensor]:
        """[B, 1, 1, S_l] bool per layer: the row's prompt slots plus decode slots up to `step`
        (with key_bias: float, the slot's bias where visible and -inf elsewhere; generated slots'
        bias is 0). From device tensors only (no host sync), one mask per segment."""
        masks = {}
        for i in self.segment_starts:
            decoded = self._slot_step[i] <= step  # [S]
            prompt = self._prompt_mask[i]
            masks[i] = prompt | decoded if prompt.dtype == torch.bool else prompt.masked_fill(decoded, 0.0)
        out, current = [], None
        for i in range(len(self.lengths)):
            current = masks.get(i, current)
            out.append(current)
        return out
