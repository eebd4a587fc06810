"""`LlavaEngine`: the public API (load, generate, next_token_logits)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import CheckpointError, VtpruneError
from .config import LlavaModelConfig
from .generate import CompiledDecode, DecodeGraph, PreparedBatch, decode_step, decode_tokens, prefill
from .inputs import PromptEncoder, check_pairs, load_image
from .kv_cache import KVCache
from .model import LlavaModel
from .weights import load_weights

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Prompt capacity and decode length are rounded up to this many slots so that requests of
# similar length reuse one KV cache and one captured CUDA graph (masked slots cost nothing
# but reads: at most 63 of ~680 slots for LLaVA-1.5 prompts).
_SLOT_ROUND = 64


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise VtpruneError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise VtpruneError(f"unsupported device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VtpruneError(f"device {device!r} requested but CUDA is not available "
                               f"(torch {torch.__version__}, no GPU visible)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VtpruneError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise VtpruneError(f"unsupported device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')")
    return dev


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]            # generated ids only; includes the EOS id when one ended the row
    stats: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs a fallback notice per processor load when torchvision is absent."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
        Two-stage weights load from the config's `weights` safetensors file."""
        self.plan = None
        visual = self.cfg.num_visual_tokens
        if pruning is not None:
            from ..pruning import PruningConfig, build_plan
            self.plan = build_plan(PruningConfig.load(pruning), self.model, self.device, self.dtype)
            visual = self.plan.visual_in_sequence
        # the prompt holds one image token per visual token that enters the decoder
        self.prompts = PromptEncoder(self.tokenizer, visual, self.cfg.image_token_index)
        self._decode_state = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, pruning=None) -> "LlavaEngine":
        """Load a llava-hf directory (config.json, model*.safetensors, tokenizer, preprocessor)."""
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        path = os.fspath(path)
        if not os.path.exists(path):
            raise CheckpointError(f"model directory not found: {path}")
        if not os.path.isdir(path):
            raise CheckpointError(f"model path is not a directory: {path}")
        if not os.access(path, os.R_OK | os.X_OK):
            raise CheckpointError(f"model directory is not readable: {path}")
        cfg = LlavaModelConfig.from_any(path)
        tokenizer, image_processor = _load_processors(path)
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
            from ..tiny_model import build_tokenizer
            tokenizer = build_tokenizer()
        if image_processor is None:
            image_processor = _default_image_processor(cfg.vision.image_size)
        engine = cls(model, tokenizer, image_processor, device, dtype, cfg.text.eos_token_id)
        engine.set_pruning(pruning)
        return engine

    # ------------------------------------------------------------------ inputs
    def prepare(self, images, prompts, max_new_tokens: int = 0) -> PreparedBatch:
        """Validate and encode one batch: pixel values and right-padded token ids on the device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        check_pairs(images, prompts)
        # Several prompts about one image (the same path, or the same PIL object) share its
        # vision-tower pass: only distinct images are preprocessed and encoded.
        keys, index, distinct = {}, [], []
        for i, im in enumerate(images):
            key = ("path", os.path.realpath(os.fspath(im))) if isinstance(im, (str, os.PathLike)) else ("obj", id(im))
            if key not in keys:
                keys[key] = len(distinct)
                distinct.append(im)
            index.append(keys[key])
        pil = [load_image(im, index.index(j)) for j, im in enumerate(distinct)]
        ids = [self.prompts.encode(p) for p in prompts]
        ctx = self.cfg.text.max_position_embeddings
        for i, row in enumerate(ids):
            if len(row) > ctx:
                raise VtpruneError(f"prompt {i} is {len(row)} tokens ({self.prompts.num_visual_tokens} of them "
                                   f"visual), longer than the model's context of {ctx}")
            if len(row) + max_new_tokens > ctx:
                raise VtpruneError(f"prompt {i} is {len(row)} tokens; with max_new_tokens={max_new_tokens} it "
                                   f"exceeds the model's context of {ctx} (use max_new_tokens <= {ctx - len(row)})")
        T = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), T), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
        with _quiet_transformers():
            pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        lengths = torch.tensor([len(r) for r in ids], dtype=torch.long)
        image_index = None if len(distinct) == len(images) else torch.tensor(index).to(self.device)
        return PreparedBatch(input_ids.to(self.device), lengths.to(self.device),
                             pixels.to(self.device, self.dtype), image_index)

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
        """Generate for a batch of (image, prompt) pairs in one pass; one result per prompt."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VtpruneError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if temperature < 0:
            raise VtpruneError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise VtpruneError(f"top_p must be in (0, 1], got {top_p}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise VtpruneError("stop strings must be non-empty strings")

        t0 = time.perf_counter()
        batch = self.prepare(images, prompts, max_new_tokens)
        rows, t_first, t_end, trace = self.generate_prepared(batch, max_new_tokens, temperature, top_p, seed,
                                                             stops, use_cuda_graph)
        lengths = batch.lengths.tolist()
        layer_stats = self._layer_stats(batch, trace)
        results = []
        for i, row in enumerate(rows):
            end = self._stop_index(row, stops)
            ids = row[:end] if end is not None else row
            text = self.prompts.decode(ids)
            for s in stops:
                if s in text:
                    text = text[: text.index(s)]
            results.append(GenerationResult(text=text.strip(), token_ids=ids, stats={
                "prompt_tokens": lengths[i],
                "visual_tokens": self.prompts.num_visual_tokens,
                "generated_tokens": len(ids),
                "time_to_first_token_s": t_first - t0,  # includes image loading and preprocessing
                "decode_s": t_end - t_first,
                **{k: v[i] for k, v in layer_stats.items()},
            }))
        return results

    @torch.inference_mode()
    def generate_prepared(self, batch: PreparedBatch, max_new_tokens: int, temperature: float = 0.0,
                          top_p: float = 1.0, seed: int | None = None, stops: Sequence[str] = (),
                          use_cuda_graph: bool = True):
        """The decoding loop on an already prepared batch (benchmarks and batch jobs call this).
        Returns the generated ids per row (not yet cut at EOS/stop strings: see `_stop_index`),
        the perf_counter times at which the first token was ready and decoding ended, and the
        prefill's per-layer token counts (a PrefillTrace, or None without pruning)."""
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
        if isinstance(continuations, str):
            continuations = [continuations]
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(continuations) != len(prompts):
            raise VtpruneError(f"got {len(prompts)} prompts and {len(continuations)} continuations")
        conts = [self.prompts.continuation(p, c) for p, c in zip(prompts, continuations)]
        for c, cont in zip(continuations, conts):
            if not cont:
                raise VtpruneError(f"continuation {c!r} has no tokens")
        n = max(len(c) for c in conts)
        batch = self.prepare(images, prompts, n)
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
    def _prefill(self, batch: PreparedBatch, cache):
        if self.plan is None:
            return prefill(self.model, batch, cache, self.share_prefix), None
        return self.plan.prefill(self.model, batch, cache, self.share_prefix)

    def _layer_stats(self, batch: PreparedBatch, trace) -> dict[str, list]:
        """Per row: visual and total tokens entering each decoder layer, prefill FLOPs with and
        without pruning (engine/flops.py)."""
        from .flops import prefill_flops

        L, nv = self.cfg.text.num_layers, self.cfg.num_visual_tokens
        lengths = batch.lengths.tolist()
        if trace is None:
            full = [prefill_flops(self.cfg, [n] * L, nv) for n in lengths]
            return {"visual_tokens_per_layer": [[nv] * L for _ in lengths],
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
        round_up = (lambda n: -(-n // _SLOT_ROUND) * _SLOT_ROUND)
        caps = self.plan.capacities(T) if self.plan is not None else [T] * self.cfg.text.num_layers
        P, N = [round_up(c) for c in caps], round_up(max_new_tokens)
        compiled = self.compile_decode
        graph = use_cuda_graph and self.device.type == "cuda" and not compiled
        key = (B, tuple(P), N, graph, compiled)
        if self._decode_state is None or self._decode_state[0] != key:
            self._decode_state = None  # free the old buffers before allocating new ones
            t = self.cfg.text
            segments = [p.layer for p in self.plan.drop_points] if self.plan is not None else None
            cache = KVCache(B, t.num_layers, t.num_kv_heads, t.head_dim, P, N, self.dtype, self.device,
                            segments=segments, key_bias=self.plan is not None and self.plan.uses_key_bias)
            base_positions = torch.zeros(B, dtype=torch.long, device=self.device)
            runner = (CompiledDecode(self.model, cache, base_positions) if compiled
                      else DecodeGraph(self.model, cache, base_positions) if graph else None)
            self._decode_state = (key, cache, runner, base_positions)
        _, cache, runner, base_positions = self._decode_state
        # generated tokens follow the prompt's last RoPE position (a two-stage merge keeps the
        # original positions: PruningPlan.position_offset)
        base_positions.copy_(batch.lengths + (self.plan.position_offset if self.plan is not None else 0))
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


def _load_processors(path: str):
    from transformers import AutoImageProcessor, AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                              "tokenizer_config.json")):
        raise CheckpointError(f"no tokenizer files (tokenizer.json / tokenizer.model) in {path}")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json",
                                                              "processor_config.json")):
        raise CheckpointError(f"no preprocessor_config.json (or processor_config.json) in {path}")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot load tokenizer/image processor from {path}: {e}") from None
    return tokenizer, image_processor


def _default_image_processor(image_size: int):
    with _quiet_transformers():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})


def _eos_ids(path: str, cfg: LlavaModelConfig, tokenizer) -> tuple[int, ...]:
    """EOS ids as transformers' generate picks them: generation_config.json first."""
    gen = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
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
