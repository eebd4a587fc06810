"""`LlavaEngine`: the public API (load, generate, next_token_logits)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import CheckpointError, VtpruneError
from ..files import check_dir, check_file, read_bytes, read_yaml
from . import arguments as check
from .config import LlavaModelConfig, _Section, _token_ids, read_model_json
from .flops import prefill_flops, vision_flops
from .generate import CompiledDecode, DecodeGraph, decode_step, decode_tokens, prefill
from .inputs import PreparedBatch, PromptEncoder, check_pairs, load_image, prompt_images
from .kv_cache import KVCache, layout
from .model import LlavaModel
from .runtime import quiet_transformers, resolve_device, resolve_dtype
from .tokenizer import build_tokenizer
from .weights import load_weights



@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]            # generated ids only; includes the EOS id when one ended the row
    stats: dict[str, Any] = field(default_factory=dict)


def _build_on_meta(cfg: LlavaModelConfig) -> LlavaModel:
    with torch.device("meta"):
        return LlavaModel(cfg)


class LlavaEngine:
    """LLaVA-1.5 inference with the engine's own model, KV cache and decoding loop."""

    def __init__(self, model: LlavaModel, tokenizer, image_processor, device: torch.device,
                 dtype: torch.dtype, eos_token_ids: Sequence[int]):
        self.model = model.eval()
        model.prepare_inference(dtype)  # fused QKV / gate-up matrices, RoPE table (once, at load)
        self.cfg: LlavaModelConfig = model.cfg
        self.device, self.dtype = device, dtype
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.pad_token_id = 0 if self.cfg.image_token_index != 0 else 1
        self._decode_state: tuple | None = None  # (key, KVCache, DecodeGraph | None, base positions)
        self.share_prefix = True  # rows about one image compute their common prefix once
        # decode steps through torch.compile (CompiledDecode) instead of the hand-captured CUDA graph
        self.compile_decode = False
        self.set_pruning(None)

    def set_pruning(self, pruning) -> None:
        """Attach a pruning configuration (PruningConfig, dict or YAML path), or None for none.
        Two-stage weights load from the config's `weights` safetensors file. If the new
        configuration cannot be used, the error is raised and the engine keeps its previous one."""
        plan, visual = None, self.cfg.num_visual_tokens
        if pruning is not None:
            # local: pruning sits above the engine (pruning/plan.py imports it), and importing it
            # loads the compiled ops, which an engine without pruning must not wait for
            from ..pruning import PruningConfig, build_plan

            if isinstance(pruning, (str, os.PathLike)):
                # the file's own problems (missing, a directory, a FIFO, unreadable, not UTF-8,
                # not YAML) as one error naming the path, before its keys are read
                read_yaml(pruning, "pruning config")
            elif not isinstance(pruning, (PruningConfig, dict)):
                raise VtpruneError(f"pruning must be None, a PruningConfig, a dict or a YAML path, got "
                                   f"{type(pruning).__name__}")
            plan = build_plan(PruningConfig.load(pruning), self.model, self.device, self.dtype)
            visual = plan.visual_in_sequence
        # the prompt holds one image token per visual token that enters the decoder
        prompts = PromptEncoder(self.tokenizer, visual, self.cfg.image_token_index)
        self.plan, self.prompts, self._decode_state = plan, prompts, None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, pruning=None) -> "LlavaEngine":
        """Load a llava-hf directory (config.json, model*.safetensors, tokenizer, preprocessor)."""
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        try:  # missing, a file, unreadable, a symlink loop: one error naming the path and why
            path = check_dir(path, "model directory")
        except VtpruneError as e:
            raise CheckpointError(str(e)) from None
        cfg = LlavaModelConfig.from_any(path)
        tokenizer, image_processor = _load_processors(path, cfg)
        model = _build_on_meta(cfg)
        load_weights(model, path, device, dtype)
        model.decoder.rotary.reset_parameters(device)
        engine = cls(model, tokenizer, image_processor, device, dtype, _eos_ids(path, cfg, tokenizer))
        engine.set_pruning(pruning)
        return engine

    @classmethod
    def from_config(cls, config, device="cpu", dtype=torch.float32, seed: int = 0,
                    tokenizer=None, image_processor=None, pruning=None) -> "LlavaEngine":
        """Random weights with the config's architecture (benchmarks: speed does not depend on
        weight values). Without a tokenizer, the project's small byte-level stand-in is used."""
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        cfg = LlavaModelConfig.from_any(config)
        model = _build_on_meta(cfg)
        _init_random(model, device, dtype, seed)
        if tokenizer is None:
            tokenizer = build_tokenizer()
        if image_processor is None:
            image_processor = _default_image_processor(cfg.vision.image_size)
        engine = cls(model, tokenizer, image_processor, device, dtype, cfg.text.eos_token_id)
        engine.set_pruning(pruning)
        return engine

    # ------------------------------------------------------------------ inputs
    def prepare(self, images, prompts, max_new_tokens: int = 0, _reserved: str = "max_new_tokens") -> PreparedBatch:
        """Validate and encode one batch: pixel values and right-padded token ids on the device.
        `images` holds one entry per prompt: an image, a list of images (one per `<image>`
        placeholder, in order) or None (a text-only prompt). `max_new_tokens`: positions to leave
        free after the longest prompt within the model's context."""
        prompts, images = check.check_prompts(prompts), check.check_images(images)
        max_new_tokens = check.check_int(max_new_tokens, _reserved, 0)
        counts = check_pairs(images, prompts)
        if self.plan is not None:
            self.plan.check_image_counts(counts)
        flat = [im for entry, c in zip(images, counts) for im in prompt_images(entry, c)]
        # Several prompts about one image (the same path, or the same PIL object) share its
        # vision-tower pass: only distinct images are preprocessed and encoded.
        keys, index, distinct = {}, [], []
        for i, im in enumerate(flat):
            key = _image_key(im)
            if key not in keys:
                keys[key] = len(distinct)
                distinct.append(im)
            index.append(keys[key])
        # with the processor: an image elongated beyond 16:1 is resized and cropped on the crop only
        pil = [load_image(im, index.index(j), self.image_processor) for j, im in enumerate(distinct)]
        ids = [self.prompts.encode(p) for p in prompts]
        ctx = self.cfg.text.max_position_embeddings
        # A two-stage merge keeps the unpruned RoPE positions (PruningPlan.position_offset): the
        # context bounds the positions a prompt and its new tokens occupy, not the tokens kept.
        offset = self._position_offset() if any(counts) else 0  # text-only batches run unpruned
        for i, row in enumerate(ids):
            span = len(row) + offset
            where = f" (at the positions of {self.cfg.num_visual_tokens} unpruned visual tokens)" if offset else ""
            if span > ctx:
                raise VtpruneError(f"prompt {i} is {len(row)} tokens ({self.prompts.num_visual_tokens} of them "
                                   f"visual){where}, longer than the model's context of {ctx}")
            if span + max_new_tokens > ctx:
                raise VtpruneError(f"prompt {i} is {len(row)} tokens{where}; with {_reserved}={max_new_tokens} it "
                                   f"exceeds the model's context of {ctx} (use {_reserved} <= {ctx - span})")
        T = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), T), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
        pixels = None
        if pil:
            with quiet_transformers():
                pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device,
                                                                                                   self.dtype)
        lengths = torch.tensor([len(r) for r in ids], dtype=torch.long)
        image_index = None if len(distinct) == len(flat) else torch.tensor(index).to(self.device)
        per_row = None if all(c == 1 for c in counts) else tuple(counts)
        return PreparedBatch(input_ids.to(self.device), lengths.to(self.device), pixels, image_index, per_row)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def next_token_logits(self, images, prompts) -> torch.Tensor:
        """Logits [B, vocab] (float32) for the token after each prompt."""
        batch = self.prepare(images, prompts)
        return self._prefill(batch, None)[0].float()

    @torch.inference_mode()
    def generate(self, images, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | str | None = None,
                 use_cuda_graph: bool = True) -> list[GenerationResult]:
        """Generate for a batch of (image, prompt) pairs in one pass; one result per prompt.
        temperature 0 is greedy; otherwise it must be at least 1.2e-38 (arguments.MIN_TEMPERATURE).
        `stop`: a string or a list / tuple / set of non-empty strings."""
        # every argument is checked before any image is read (each error names its argument)
        max_new_tokens = check.check_max_new_tokens(max_new_tokens)
        temperature, top_p = check.check_temperature(temperature), check.check_top_p(top_p)
        seed, stops = check.check_seed(seed), check.check_stops(stop)
        use_cuda_graph = check.check_flag(use_cuda_graph, "use_cuda_graph")

        t0 = time.perf_counter()
        batch = self.prepare(images, prompts, max_new_tokens)
        rows, t_first, t_end, trace = self.generate_prepared(batch, max_new_tokens, temperature, top_p, seed,
                                                             stops, use_cuda_graph)
        lengths = batch.lengths.tolist()
        layer_stats = self._layer_stats(batch, trace)
        results = []
        for i, row in enumerate(rows):
            end = self._stop_index(row, stops)
            results.append(self._result(row if end is None else row[:end], stops, {
                "prompt_tokens": lengths[i],
                "visual_tokens": self.prompts.num_visual_tokens * _images_in_row(batch, i),
                "time_to_first_token_s": t_first - t0,  # includes image loading and preprocessing
                "decode_s": t_end - t_first,
                **{k: v[i] for k, v in layer_stats.items()},
            }))
        return results

    def _result(self, ids: list[int], stops: list[str], stats: dict) -> GenerationResult:
        """The result of one row's generated ids, already cut after its stop (`_stop_index`): the
        text is cut before the stop string and stripped."""
        text = self.prompts.decode(ids)
        for s in stops:
            if s in text:
                text = text[: text.index(s)]
        stats = dict(stats)
        stats["generated_tokens"] = len(ids)
        return GenerationResult(text=text.strip(), token_ids=ids, stats=stats)

    def inflight(self, max_new_tokens: int = 64, prefill_batch: int = 16, max_rows: int = 64,
                 kv_budget_gb: float | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] | str | None = None,
                 use_cuda_graph: bool = True):
        """An in-flight batching scheduler (engine/scheduler.py) for this engine and its pruning:
        up to `max_rows` decode rows, as many as `kv_budget_gb` of KV cache holds (default: on
        CUDA a share of the memory free after the weights, on CPU scheduler.CPU_KV_BUDGET_GB),
        refilled between decode steps with requests prefilled `prefill_batch` at a time. Greedy
        answers equal `generate`'s; sampled ones (temperature > 0) do not follow the static path's
        random stream (every row draws from one generator at every step, in another order)."""
        from .scheduler import InflightScheduler

        max_new_tokens = check.check_max_new_tokens(max_new_tokens)
        prefill_batch = check.check_int(prefill_batch, "prefill_batch", 1)
        max_rows = check.check_int(max_rows, "max_rows", 1)
        budget = None if kv_budget_gb is None else int(check_kv_budget(kv_budget_gb) * (1 << 30))
        temperature, top_p = check.check_temperature(temperature), check.check_top_p(top_p)
        seed, stops = check.check_seed(seed), check.check_stops(stop)
        use_cuda_graph = check.check_flag(use_cuda_graph, "use_cuda_graph")
        return InflightScheduler(self, max_new_tokens, prefill_batch, max_rows, budget, stops, temperature, top_p,
                                 seed, use_cuda_graph)

    @torch.inference_mode()
    def generate_inflight(self, images, prompts, max_new_tokens: int | Sequence[int] = 64,
                          **options) -> list[GenerationResult]:
        """`generate` through the in-flight scheduler (options: those of `inflight`); one result
        per prompt, in order. Greedy results equal `generate`'s, request for request.
        `max_new_tokens` may be a list, one cap per prompt (a row leaves when it reaches its own)."""
        from .scheduler import Item

        prompts, images = check.check_prompts(prompts), check.check_images(images)
        counts = check_pairs(images, prompts)
        caps = [None] * len(prompts)
        if isinstance(max_new_tokens, (list, tuple)):
            if len(max_new_tokens) != len(prompts):
                raise VtpruneError(f"max_new_tokens: {len(max_new_tokens)} values for {len(prompts)} prompts "
                                   f"(give one per prompt, or one number)")
            caps = [check.check_max_new_tokens(n) for n in max_new_tokens]
            max_new_tokens = max(caps)
        if self.plan is not None:
            self.plan.check_image_counts(counts)
            if not any(counts):
                raise VtpruneError("generate_inflight: text-only prompts under a pruning plan: use generate")
        sched = self.inflight(max_new_tokens, **options)
        items = [Item(i, im, p, len(self.prompts.encode(p)), cap)
                 for i, (im, p, cap) in enumerate(zip(images, prompts, caps))]
        out = {key: self._result(ids, sched.stops, stats) for key, ids, stats in sched.run(items)}
        return [out[i] for i in range(len(items))]

    @torch.inference_mode()
    def generate_prepared(self, batch: PreparedBatch, max_new_tokens: int, temperature: float = 0.0,
                          top_p: float = 1.0, seed: int | None = None, stops: Sequence[str] = (),
                          use_cuda_graph: bool = True):
        """The decoding loop on an already prepared batch (benchmarks and batch jobs call this).
        Returns the generated ids per row (not yet cut at EOS/stop strings: see `_stop_index`),
        the perf_counter times at which the first token was ready and decoding ended, and the
        prefill's per-layer token counts (a PrefillTrace, or None without pruning)."""
        if not isinstance(batch, PreparedBatch):
            raise VtpruneError(f"batch must be a PreparedBatch (LlavaEngine.prepare), got {type(batch).__name__}")
        max_new_tokens = check.check_max_new_tokens(max_new_tokens)
        temperature, top_p = check.check_temperature(temperature), check.check_top_p(top_p)
        seed, stops = check.check_seed(seed), check.check_stops(stops, "stops")
        use_cuda_graph = check.check_flag(use_cuda_graph, "use_cuda_graph")
        # rows are right-padded to T tokens: T + the offset bounds every row's positions
        span, ctx = batch.input_ids.shape[1] + self._position_offset(batch), self.cfg.text.max_position_embeddings
        if span + max_new_tokens > ctx:
            raise VtpruneError(f"max_new_tokens={max_new_tokens} after prompts of {span} positions exceeds the "
                               f"model's context of {ctx} (use max_new_tokens <= {max(ctx - span, 0)})")
        cache, step_fn = self._decoder_state(batch, max_new_tokens, use_cuda_graph)
        first_logits, trace = self._prefill(batch, cache)
        generator = None
        if temperature > 0 and seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        self._sync()
        t_first = time.perf_counter()

        def finished(rows: list[list[int]]) -> bool:
            return all(self._stop_index(r, stops) is not None for r in rows)

        # The host looks at the tokens every 8 steps on a GPU (one sync each): at most 7 wasted
        # steps per batch, against a ~10 us sync + launch gap per step if it looked every step.
        sync_every = 1 if self.device.type == "cpu" else 8
        rows = decode_tokens(first_logits, max_new_tokens, step_fn, temperature, top_p, generator,
                             finished, sync_every)
        return rows, t_first, time.perf_counter(), trace

    @torch.inference_mode()
    def score(self, images, prompts, continuations: Sequence[str], use_cuda_graph: bool = True):
        """Log-likelihood of each continuation after its prompt, with this engine's pruning:
        [(sum of token log-probs, whether greedy decoding would produce exactly it)]. The
        continuation is teacher-forced through the KV cache, token by token, as generation
        would read it (its tokens are those of prompt + continuation after the prompt's)."""
        prompts = check.check_prompts(prompts)
        continuations = check.check_continuations(continuations, len(prompts))
        use_cuda_graph = check.check_flag(use_cuda_graph, "use_cuda_graph")
        images = check.check_images(images)
        check_pairs(images, prompts)  # the prompts' types and placeholders, before they are tokenized
        conts = [self.prompts.continuation(p, c) for p, c in zip(prompts, continuations)]
        for i, (c, cont) in enumerate(zip(continuations, conts)):
            if not cont:
                raise VtpruneError(f"continuations[{i}] {c!r} has no tokens")
        n = max(len(c) for c in conts)
        batch = self.prepare(images, prompts, n, _reserved="continuation tokens")
        cache, step_fn = self._decoder_state(batch, n, use_cuda_graph)
        logits, _ = self._prefill(batch, cache)
        B = len(conts)
        target = torch.tensor([c + [c[-1]] * (n - len(c)) for c in conts], device=self.device)
        valid = torch.tensor([[j < len(c) for j in range(n)] for c in conts], device=self.device)
        logp = torch.zeros(B, device=self.device, dtype=torch.float32)
        greedy = torch.ones(B, dtype=torch.bool, device=self.device)
        for s in range(n):
            lp = torch.log_softmax(logits.float(), dim=-1)
            t = target[:, s]
            logp += torch.where(valid[:, s], lp[torch.arange(B, device=self.device), t], 0.0)
            greedy &= ~valid[:, s] | (lp.argmax(-1) == t)
            if s < n - 1:
                logits = step_fn(t, s)
        return [(float(a), bool(g)) for a, g in zip(logp.tolist(), greedy.tolist())]

    def release_cache(self) -> None:
        """Free the KV cache and CUDA graph kept between generate calls."""
        self._decode_state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ internals
    def _position_offset(self, batch: PreparedBatch | None = None) -> int:
        plan = self.plan if batch is None else self._plan_for(batch)
        return plan.position_offset if plan is not None else 0

    def _plan_for(self, batch: PreparedBatch):
        """The pruning plan that applies to this batch: none for a batch without images (no
        visual token to prune; PruningPlan.check_image_counts refuses other mixes)."""
        return None if batch.pixel_values is None else self.plan

    def _prefill(self, batch: PreparedBatch, cache):
        plan = self._plan_for(batch)
        if plan is None:
            return prefill(self.model, batch, cache, self.share_prefix), None
        return plan.prefill(self.model, batch, cache, self.share_prefix)

    def _layer_stats(self, batch: PreparedBatch, trace) -> dict[str, list]:
        """Per row: visual and total tokens entering each decoder layer, prefill FLOPs with and
        without pruning (engine/flops.py)."""
        L, nv = self.cfg.text.num_layers, self.cfg.num_visual_tokens
        lengths = batch.lengths.tolist()
        if trace is None:
            # one vision-tower pass per image (prefill_flops counts one)
            counts = [_images_in_row(batch, i) for i in range(len(lengths))]
            full = [prefill_flops(self.cfg, [n] * L, c * nv) + (c - 1) * vision_flops(self.cfg)
                    for n, c in zip(lengths, counts)]
            return {"visual_tokens_per_layer": [[c * nv] * L for c in counts],
                    "tokens_per_layer": [[n] * L for n in lengths],
                    "prefill_flops": full, "prefill_flops_unpruned": full}
        # the prompt as it would be unpruned: its image run holds all nv visual tokens
        unpruned = batch.lengths + (nv - self.prompts.num_visual_tokens)
        pruned, full = self.plan.prefill_flops(trace, unpruned)
        return {"visual_tokens_per_layer": torch.stack(trace.visual, 1).tolist(),
                "tokens_per_layer": torch.stack(trace.total, 1).tolist(),
                "prefill_flops": pruned, "prefill_flops_unpruned": full}

    def _stop_index(self, row: list[int], stops: list[str]) -> int | None:
        """Length of `row` up to and including its stop (EOS id or a stop string), or None."""
        for j, t in enumerate(row):
            if t in self.eos_token_ids:
                return j + 1
        if stops:
            text = self.prompts.decode(row)
            if any(s in text for s in stops):
                for j in range(1, len(row) + 1):  # shortest prefix whose text holds a stop string
                    t = self.prompts.decode(row[:j])
                    if any(s in t for s in stops):
                        return j
        return None

    def _decoder_state(self, batch: PreparedBatch, max_new_tokens: int, use_cuda_graph: bool):
        """A KV cache (and CUDA graph) sized for this batch, reused when the shape repeats."""
        B, T = batch.input_ids.shape
        plan = self._plan_for(batch)
        P, N = layout(plan, T, max_new_tokens, self.cfg.text.num_layers)
        compiled = self.compile_decode
        graph = use_cuda_graph and self.device.type == "cuda" and not compiled
        key = (B, tuple(P), N, graph, compiled, plan is not None)  # a text-only batch under a plan: plain cache
        if self._decode_state is None or self._decode_state[0] != key:
            self._decode_state = None  # free the old buffers before allocating new ones
            t = self.cfg.text
            segments = [p.layer for p in plan.drop_points] if plan is not None else None
            cache = KVCache(B, t.num_layers, t.num_kv_heads, t.head_dim, P, N, self.dtype, self.device,
                            segments=segments, key_bias=plan is not None and plan.uses_key_bias)
            base_positions = torch.zeros(B, dtype=torch.long, device=self.device)
            runner = (CompiledDecode(self.model, cache, base_positions) if compiled
                      else DecodeGraph(self.model, cache, base_positions) if graph else None)
            self._decode_state = (key, cache, runner, base_positions)
        _, cache, runner, base_positions = self._decode_state
        # generated tokens follow the prompt's last RoPE position (a two-stage merge keeps the
        # original positions: PruningPlan.position_offset)
        base_positions.copy_(batch.lengths + (plan.position_offset if plan is not None else 0))
        if runner is not None:
            return cache, runner
        step = torch.zeros(1, dtype=torch.long, device=self.device)

        def step_fn(tokens, s):
            step.fill_(s)
            return decode_step(self.model, cache, tokens, step, base_positions)
        return cache, step_fn

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def check_kv_budget(value, name: str = "kv_budget_gb") -> float:
    """A KV budget in GB: a finite number > 0."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise VtpruneError(f"{name} must be a number of GB > 0, got {value!r}")
    return float(value)


def _images_in_row(batch: PreparedBatch, i: int) -> int:
    return 1 if batch.images_per_row is None else batch.images_per_row[i]


def _image_key(im):
    """Images named by the same path (after symlinks) or given as the same object are one image."""
    if isinstance(im, (str, os.PathLike)):
        try:
            return ("path", os.path.realpath(os.fspath(im)))
        except (TypeError, ValueError, OSError):  # a NUL byte, a bytes path: load_image reports it
            return ("obj", id(im))
    return ("obj", id(im))


# JSON files of a model directory that transformers reads for the tokenizer and image processor:
# each is read here first, so that a bad one (not UTF-8, not JSON, a directory, unreadable, a
# symlink loop, a FIFO) is one CheckpointError naming it instead of a traceback from transformers.
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json")
_PROCESSOR_JSON = ("preprocessor_config.json", "processor_config.json")


def _check_model_files(path: str) -> None:
    def exists(name):
        return os.path.lexists(os.path.join(path, name))

    if not any(exists(f) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"no tokenizer files (tokenizer.json / tokenizer.model) in {path}")
    if not any(exists(f) for f in _PROCESSOR_JSON):
        raise CheckpointError(f"no preprocessor_config.json (or processor_config.json) in {path}")
    for name in _TOKENIZER_JSON + _PROCESSOR_JSON:
        if not exists(name):
            continue
        file = os.path.join(path, name)
        data = read_model_json(file, name)
        if not isinstance(data, dict):
            raise CheckpointError(f"{name} {file}: expected a JSON object, got {type(data).__name__}")
        if "auto_map" in data:  # custom tokenizer / processor classes are code shipped with the model
            raise CheckpointError(f"{name} {file}: 'auto_map' names custom code, which is never run "
                                  f"(no trust_remote_code); use a model with the standard LLaVA processor")
    for name in ("tokenizer.model", "merges.txt"):  # binary / text files of slow tokenizers
        if exists(name):
            try:
                read_bytes(check_file(os.path.join(path, name), name), name)
            except VtpruneError as e:
                raise CheckpointError(str(e)) from None


def _load_processors(path: str, cfg: LlavaModelConfig | None = None):
    """The tokenizer and image processor of a model directory, with transformers' own classes
    (local files only, no remote code); with `cfg`, checked against the model: the tokenizer's ids
    fit the vocabulary and the processor makes images of the vision tower's size."""
    from transformers import AutoImageProcessor, AutoTokenizer

    _check_model_files(path)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers / tokenizers parse the model's files, any error is theirs
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"cannot load tokenizer/image processor from {path}: {msg}") from None
    if cfg is not None:
        if len(tokenizer) > cfg.text.vocab_size:
            raise CheckpointError(f"{path}: the tokenizer has {len(tokenizer)} tokens, more than "
                                  f"text_config.vocab_size ({cfg.text.vocab_size}) in config.json")
        from PIL import Image

        size = cfg.vision.image_size
        try:
            with quiet_transformers():
                shape = tuple(image_processor(images=[Image.new("RGB", (size, size))],
                                              return_tensors="pt")["pixel_values"].shape)
        except Exception as e:  # noqa: BLE001 - the processor's settings come from the model's JSON
            raise CheckpointError(f"{path}: the image processor fails on a {size}x{size} image "
                                  f"({' '.join(str(e).split())})") from None
        if shape != (1, 3, size, size):
            raise CheckpointError(f"{path}: the image processor makes images of shape {list(shape[1:])}, the "
                                  f"vision tower needs [3, {size}, {size}] (vision_config.image_size; check "
                                  f"crop_size / size in preprocessor_config.json)")
    return tokenizer, image_processor


def _default_image_processor(image_size: int):
    with quiet_transformers():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})


def _eos_ids(path: str, cfg: LlavaModelConfig, tokenizer) -> tuple[int, ...]:
    """EOS ids as transformers' generate picks them: generation_config.json first."""
    gen = os.path.join(path, "generation_config.json")
    if os.path.lexists(gen):
        data = read_model_json(gen, "generation_config.json")
        if not isinstance(data, dict):
            raise CheckpointError(f"generation_config.json {gen}: expected a JSON object, got "
                                  f"{type(data).__name__}")
        eos = _token_ids(data.get("eos_token_id"), "eos_token_id", cfg.text.vocab_size,
                         _Section(data, "", f"generation_config.json {gen}"))
        if eos:
            return eos
    if cfg.text.eos_token_id:
        return cfg.text.eos_token_id
    return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()


def _init_random(model: LlavaModel, device, dtype, seed: int) -> None:
    """Materialize meta parameters on `device` in `dtype`: N(0, 0.02) weights (transformers'
    initializer_range for both towers), zero biases, unit norms."""
    gen = torch.Generator(device).manual_seed(seed)
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if name == "bias":
                t.zero_()
            elif isinstance(mod, (torch.nn.LayerNorm,)) or type(mod).__name__ == "RMSNorm":
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            setattr(mod, name, torch.nn.Parameter(t, requires_grad=False))
    model.decoder.rotary.reset_parameters(device)
