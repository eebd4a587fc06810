"""In-flight (continuous) batching: a fixed set of R decode rows, refilled between decode steps.

    waiting requests ──prefill in batches (pruned prefill included)──▶ free rows of one KVCache
          ▲                                                                  │
          └──── finished rows retired (EOS / stop string / max_new_tokens) ◀─ decode step (all R rows)

One loop: (1) once `prefill_batch` rows are free (at most half the rows; fewer when fewer wait),
take up to `prefill_batch` waiting requests, prefill them into a small cache of their own and copy
it into free rows (KVCache.insert_rows); their first token comes from the prefill logits; (2) one decode step over all R rows, each at its own step and
RoPE position (free rows are computed and ignored: static shapes, one CUDA graph); (3) every row
that hit its stop is retired and its result given out. A request's tokens depend only on its own
prompt (rows never attend to each other), so greedy answers equal the static batch path's.

The cache is sized for the longest prompt of a lookahead of waiting requests (rounded, see
kv_cache.layout); when a longer one comes, the scheduler stops admitting, lets the rows drain and
builds a larger cache. R is what `kv_budget_bytes` holds of rows of kv_cache.row_bytes (a pruned
request's row is smaller: more rows), capped by `max_rows`.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from .generate import DecodeGraph, decode_step
from .kv_cache import KVCache, layout, row_bytes
from .sampling import sample_next

# Without --kv-budget-gb on a CPU: KV memory the scheduler may allocate (the machine's RAM is not
# a reliable signal of what the job may take). On CUDA the default is what is free after weights.
CPU_KV_BUDGET_GB = 2.0
# Of the GPU memory free after the weights, the share the KV cache may take: the rest is for the
# prefill's activations (vision tower, a batch of full prompts) and the allocator's slack.
CUDA_KV_SHARE = 0.6


@dataclass
class Item:
    """A request for the scheduler: `tokens` is its prompt length as encoded (PromptEncoder);
    `max_new_tokens` its own cap (None: the scheduler's; never above it)."""
    key: object
    image: object
    prompt: str
    tokens: int
    max_new_tokens: int | None = None


def _with_image(item: Item, image) -> bool:
    item.image = image
    return image is not None


@dataclass
class _Row:
    item: Item
    ids: list[int]
    stats: dict
    t0: float
    t_first: float = 0.0


def default_kv_budget(device: torch.device) -> int:
    """Bytes: on CUDA CUDA_KV_SHARE of the memory free now (after the weights), else CPU_KV_BUDGET_GB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_KV_SHARE)
    return int(CPU_KV_BUDGET_GB * (1 << 30))


def rows_for_budget(budget_bytes: int, bytes_per_row: int, max_rows: int) -> int:
    """Decode rows that fit: at least 1 (a request that does not fit alone is tried anyway: an
    out-of-memory error is then reported for it), at most max_rows."""
    return max(1, min(max_rows, budget_bytes // max(bytes_per_row, 1)))


class InflightScheduler:
    """Runs `engine`'s requests through R decode rows; `run` yields (key, generated ids cut at the
    stop, stats) per request as it finishes (not in input order)."""

    def __init__(self, engine, max_new_tokens: int, prefill_batch: int, max_rows: int, kv_budget_bytes: int | None,
                 stops=(), temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 use_cuda_graph: bool = True, lookahead: int = 128):
        self.engine, self.max_new_tokens, self.prefill_batch = engine, max_new_tokens, prefill_batch
        self.max_rows, self.stops = max_rows, list(stops)
        self.budget = default_kv_budget(engine.device) if kv_budget_bytes is None else kv_budget_bytes
        self.temperature, self.top_p, self.use_cuda_graph = temperature, top_p, use_cuda_graph
        self.lookahead = max(lookahead, prefill_batch)
        self.generator = None
        if temperature > 0 and seed is not None:
            self.generator = torch.Generator(engine.device).manual_seed(seed)
        # (perf_counter, rows busy) after each decode step, the last 65536 of them (benchmarks)
        self.rows_in_flight: deque[tuple[float, int]] = deque(maxlen=1 << 16)
        self.release()

    def release(self) -> None:
        """Drop the cache (and graph): the next run builds a new one."""
        self.cache, self.graph, self.rows, self.capacity = None, None, 0, -1

    def rows_for(self, prompt_tokens: int) -> int:
        e = self.engine
        per_row = row_bytes(e.plan, prompt_tokens, self.max_new_tokens, e.cfg.text, e.dtype, rounded=True)
        return rows_for_budget(self.budget, per_row, self.max_rows)

    # ------------------------------------------------------------------ the cache
    def _build(self, prompt_tokens: int):
        e, t = self.engine, self.engine.cfg.text
        plan = e.plan
        P, N = layout(plan, prompt_tokens, self.max_new_tokens, t.num_layers)
        R = self.rows_for(prompt_tokens)
        self.cache = None  # free the old buffers first
        segments = [p.layer for p in plan.drop_points] if plan is not None else None
        key_bias = plan is not None and plan.uses_key_bias
        self.cache = KVCache(R, t.num_layers, t.num_kv_heads, t.head_dim, P, N, e.dtype, e.device,
                             segments=segments, key_bias=key_bias)
        self.segments, self.key_bias = segments, key_bias
        self.capacity, self.rows = prompt_tokens, R
        self.base_positions = torch.zeros(R, dtype=torch.long, device=e.device)
        self.tokens = torch.zeros(R, dtype=torch.long, device=e.device)
        self.step = torch.zeros(R, dtype=torch.long, device=e.device)
        self.busy = torch.zeros(R, dtype=torch.long, device=e.device)  # 1 for rows holding a request
        self.graph = None
        if self.use_cuda_graph and e.device.type == "cuda":
            self.graph = DecodeGraph(e.model, self.cache, self.base_positions, per_row=True)

    def _decode(self) -> torch.Tensor:
        if self.graph is not None:
            return self.graph(self.tokens, self.step)
        return decode_step(self.engine.model, self.cache, self.tokens, self.step, self.base_positions)

    # ------------------------------------------------------------------ admission
    def _admit(self, group: list[Item], rows: list[int]) -> list[_Row]:
        """Prefill `group` (one batch, pruned with the engine's plan) into cache rows `rows`."""
        e, t = self.engine, self.engine.cfg.text
        t0 = time.perf_counter()
        batch = e.prepare([it.image for it in group], [it.prompt for it in group], self.max_new_tokens)
        plan = e._plan_for(batch)
        if (plan is None) != (e.plan is None):
            raise RuntimeError("in-flight batching under a pruning plan needs an image in every prompt")
        T = batch.input_ids.shape[1]
        if T > self.capacity:
            raise RuntimeError(f"prompt of {T} tokens admitted into a cache sized for {self.capacity}")
        caps = plan.capacities(T) if plan is not None else [T] * t.num_layers
        small = KVCache(len(group), t.num_layers, t.num_kv_heads, t.head_dim, caps, 0, e.dtype, e.device,
                        segments=self.segments, key_bias=self.key_bias)
        logits, trace = e._prefill(batch, small)
        index = torch.tensor(rows, device=e.device)
        self.cache.insert_rows(index, small)
        del small
        self.base_positions[index] = batch.lengths + e._position_offset(batch)
        self.step[index] = 0
        self.busy[index] = 1
        first = sample_next(logits, self.temperature, self.top_p, self.generator)
        self.tokens[index] = first
        first = first.tolist()
        t_first = time.perf_counter()
        layer_stats = e._layer_stats(batch, trace)
        lengths = batch.lengths.tolist()
        out = []
        for j, it in enumerate(group):
            images = 1 if batch.images_per_row is None else batch.images_per_row[j]
            stats = {"prompt_tokens": lengths[j], "visual_tokens": e.prompts.num_visual_tokens * images,
                     **{k: v[j] for k, v in layer_stats.items()}}
            out.append(_Row(it, [first[j]], stats, t0, t_first))
        return out

    # ------------------------------------------------------------------ the loop
    def run(self, items: Iterable[Item], on_admit: Callable[[list[Item]], None] | None = None,
            load: Callable[[Item], object] | None = None) -> Iterator[tuple[object, list[int], dict]]:
        """`on_admit(items in flight)` is called before each prefill with every request that is
        in a row or about to be (batch jobs write it to their in-flight file). `load(item)`, when
        given, is called at admission and returns the item's image, or None to leave the item out
        (it reports its own error): images are loaded only when their request gets a row."""
        self._source, self._on_admit, self._load = iter(items), on_admit, load
        self._waiting: deque[Item] = deque()
        self._busy: dict[int, _Row] = {}
        self._fill()
        while self._waiting or self._busy:
            yield from self._cycle()  # its results are handed out between decode steps

    def _fill(self) -> None:
        while len(self._waiting) < self.lookahead:
            it = next(self._source, None)
            if it is None:
                return
            self._waiting.append(it)

    @torch.inference_mode()
    def _cycle(self) -> list[tuple[object, list[int], dict]]:
        """Admit what fits into free rows, then one decode step; returns the requests finished."""
        waiting, busy, finished = self._waiting, self._busy, []
        if not busy:  # drained: (re)build for the longest prompt waiting when one does not fit
            need = max(it.tokens for it in waiting)
            if need > self.capacity or self.cache is None:
                self._build(need)
        # admit once a prefill batch's worth of rows is free (at most half the rows; all that
        # waits when fewer): a prefill has fixed costs per call (the plan's Python, the vision
        # tower's launches), so rows are refilled in groups rather than one by one (on a CPU,
        # where the prefill dominates, one-by-one refills were slower than static batches)
        want = max(1, min(self.prefill_batch, self.rows // 2, len(waiting)))
        while (waiting and len(busy) < self.rows and waiting[0].tokens <= self.capacity
               and (self.rows - len(busy) >= want or not busy)):
            free = [b for b in range(self.rows) if b not in busy]
            group = []
            while waiting and len(group) < min(len(free), self.prefill_batch) and waiting[0].tokens <= self.capacity:
                group.append(waiting.popleft())
            if self._on_admit is not None:
                self._on_admit([r.item for r in busy.values()] + group)
            if self._load is not None:
                group = [it for it in group if _with_image(it, self._load(it))]
            if not group:
                continue
            for b, row in zip(free, self._admit(group, free[: len(group)])):
                busy[b] = row
            self._fill()
            finished += self._retire()  # a request may end at its first token
        if not busy:
            return finished
        # one decode step: each busy row feeds its last token at its own step
        new = sample_next(self._decode(), self.temperature, self.top_p, self.generator)
        self.tokens.copy_(new)
        new = new.tolist()  # the host looks every step: any step may free a row
        for b, row in busy.items():
            row.ids.append(new[b])
        self.step += self.busy  # free rows stay at step 0: never past the decode slots
        self.rows_in_flight.append((time.perf_counter(), len(busy)))
        return finished + self._retire()

    def _cap(self, item: Item) -> int:
        return self.max_new_tokens if item.max_new_tokens is None else min(item.max_new_tokens, self.max_new_tokens)

    def _retire(self) -> list[tuple[object, list[int], dict]]:
        e, busy, out = self.engine, self._busy, []
        for b in [b for b, row in busy.items()
                  if e._stop_index(row.ids, self.stops) is not None or len(row.ids) >= self._cap(row.item)]:
            row = busy.pop(b)
            end = e._stop_index(row.ids, self.stops)
            row.stats.update(time_to_first_token_s=row.t_first - row.t0, decode_s=time.perf_counter() - row.t_first)
            out.append((row.item.key, row.ids if end is None else row.ids[:end], row.stats))
            self.step[b] = 0  # a free row writes its (ignored) token at slot P_l
            self.busy[b] = 0
        return out
