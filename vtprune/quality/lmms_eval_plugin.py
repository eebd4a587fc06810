"""lmms-eval model plugin: standard benchmarks (GQA, POPE, MME, ...) through the vtprune engine,
with or without pruning.

    pip install -e ".[lmms]"        # or the CPU recipe in the README (keeps a CPU torch)
    lmms-eval --model vtprune \\
        --model_args pretrained=llava-1.5-7b-hf,pruning=configs/vision_token_pruning.yaml,dtype=bfloat16 \\
        --tasks gqa,pope,mme --batch_size 16 --output_path logs/

Registration: lmms-eval >= 0.7 finds the model through the `lmms_eval.models` entry point in
pyproject.toml (`lmms_eval_manifests` below: a ModelManifest naming
vtprune.quality.lmms.models.vtprune.VtpruneLMM). Older lmms-eval: LMMS_EVAL_PLUGINS=vtprune.quality.lmms
(its plugin layout: a `models` package with AVAILABLE_MODELS and a `tasks` package), or this
module as the launcher, `python -m vtprune.quality.lmms_eval_plugin ARGS` (registers the model in
whatever registry the installed lmms-eval has, then runs lmms-eval's own command line).

model_args: pretrained (llava-hf directory), pruning (YAML), policy and budget (a baseline),
device, dtype, batch_size (N, or auto: start at max_batch_size, halve when out of memory),
max_batch_size, max_new_tokens (the default for tasks that set none: 1024, as lmms-eval's llava
wrappers), system_prompt (put before "USER:", e.g. LLaVA-1.5's vicuna_v1 system message).
`--device` / `--batch_size` / `--max_batch_size` given on lmms-eval's command line reach the
model the same way.

What the model does with lmms-eval's requests:
- generate_until: every generation kwarg is honoured (until, max_new_tokens, temperature, top_p,
  do_sample: an explicit do_sample false is greedy, true samples at `temperature` (1 when
  unset), absent samples when temperature > 0, as the llava wrappers decide); num_beams > 1,
  repetition_penalty != 1, top_k, min_new_tokens, num_return_sequences > 1 end the run with one
  line (vtprune decodes greedily or samples, nothing else); keys that do not change decoding
  (image_aspect_ratio, ...) are ignored with one warning. max_new_tokens is capped at what the
  model's context leaves after the prompt.
- loglikelihood: batched through LlavaEngine.score (one vision pass per image: the choices of
  one question share it). It returns (mean negative log-likelihood per continuation token,
  is_greedy), the convention of lmms-eval's llava and llava_hf wrappers: lmms-eval >= 0.4 takes
  the argmin for multiple_choice (acc, acc_norm), and its `perplexity` aggregate of a
  loglikelihood task is then exp(-mean NLL), as for those wrappers (acc_mutual_info takes an
  argmax of the same numbers and comes out inverted for every loss-returning model, theirs too).
- Prompts: "USER: <image>\\n{context} ASSISTANT:" (vtprune.format_prompt), one `<image>` per
  visual (joined with spaces, as the llava wrappers do) unless the context places them itself,
  none for a doc without a visual (text-only: no vision pass). Docs this engine cannot run
  (several images under a pruning policy, videos or audio, unreadable images, prompts longer
  than the context) are rejected one by one, counted and reported on stderr per task, and score
  as wrong answers ("" / (inf, False)); the run goes on.
- Data parallel (accelerate launch / torchrun): rank and world size come from accelerate, each
  process loads the engine on its own GPU (cuda:LOCAL_RANK) and lmms-eval gives it its share of
  the docs.

`EngineLMM` holds the logic and needs no lmms-eval (tests drive it with stand-in requests);
`VtpruneLMM` (vtprune/quality/lmms/models/vtprune.py) is the lmms subclass around it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

from ..cli import pruning_spec
from ..engine import LlavaEngine
from ..engine.inputs import IMAGE_TOKEN
from ..engine.runtime import default_device_dtype
from ..errors import VtpruneError

MODEL_NAME = "vtprune"
MODEL_CLASS = "vtprune.quality.lmms.models.vtprune.VtpruneLMM"

# lmms-eval's llava and llava_hf wrappers generate at most 1024 new tokens when a task sets none.
DEFAULT_MAX_NEW_TOKENS = 1024
# batch_size=auto starts here (or at max_batch_size) and halves when out of memory.
AUTO_BATCH_START = 64

# generation kwargs that would change the output and that the engine does not implement, with
# the value at which they are off
_UNSUPPORTED_KWARGS = {"num_beams": 1, "repetition_penalty": 1.0, "top_k": 0, "min_new_tokens": 0,
                       "num_return_sequences": 1, "no_repeat_ngram_size": 0}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def lmms_eval_manifests():
    """The `lmms_eval.models` entry point (lmms-eval >= 0.7): the model's manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)]


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Generation:
    """One task's decoding settings, from lmms-eval's generation kwargs."""
    until: tuple
    max_new_tokens: int
    temperature: float   # 0: greedy
    top_p: float


def generation_settings(gen: dict | None, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                        ignored: set | None = None) -> Generation:
    """lmms-eval's generation kwargs -> Generation, or a VtpruneError for a setting the engine
    cannot honour. Keys that do not change decoding are added to `ignored`."""
    gen = dict(gen or {})
    until = gen.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise VtpruneError(f"generation kwarg until={until!r}: expected a string or a list of strings")
    until = tuple(u for u in until if u)  # an empty stop string stops nothing
    max_new = gen.pop("max_new_tokens", None)
    max_new = default_max_new_tokens if max_new is None else max_new
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise VtpruneError(f"generation kwarg max_new_tokens={max_new!r}: expected an integer >= 1")
    temperature = gen.pop("temperature", None)
    do_sample = gen.pop("do_sample", None)
    top_p = gen.pop("top_p", None)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                  or math.isnan(value)):
            raise VtpruneError(f"generation kwarg {name}={value!r}: expected a number >= 0")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise VtpruneError(f"generation kwarg do_sample={do_sample!r}: expected true or false")
    if do_sample is None:
        sample = bool(temperature)          # the llava wrappers: do_sample = temperature > 0
    else:
        sample = do_sample
        if sample and temperature is None:
            temperature = 1.0               # transformers' default temperature
    temperature = float(temperature or 0.0) if sample else 0.0
    top_p = 1.0 if top_p is None or temperature == 0 else float(top_p)
    if temperature > 0 and not 0 < top_p <= 1:
        raise VtpruneError(f"generation kwarg top_p={top_p!r}: expected a number in (0, 1] when sampling")
    for name, off in _UNSUPPORTED_KWARGS.items():
        value = gen.pop(name, None)
        if value is not None and value != off:
            what = "beam search" if name == "num_beams" else name
            raise VtpruneError(f"generation kwarg {name}={value!r}: {what} is not implemented (vtprune decodes "
                               f"greedily or samples with temperature / top_p); set {name}={off} in the task's "
                               f"generation_kwargs or with --gen_kwargs")
    if ignored is not None:
        ignored.update(f"{k}={v!r}" for k, v in gen.items())
    return Generation(until, max_new, temperature, top_p)


def parse_batch_size(batch_size, max_batch_size=None) -> tuple[int, bool]:
    """(batch size, auto) from an int, "N", "auto" or "auto:N" (lmms-eval's --batch_size forms)."""
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 1):
        if not (isinstance(max_batch_size, str) and max_batch_size.isdigit() and int(max_batch_size) >= 1):
            raise VtpruneError(f"max_batch_size={max_batch_size!r}: expected an integer >= 1")
        max_batch_size = int(max_batch_size)
    if isinstance(batch_size, str):
        s = batch_size.strip().lower()
        if s == "auto" or s.startswith("auto:"):
            return (max_batch_size or AUTO_BATCH_START), True
        if s.isdigit():
            batch_size = int(s)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise VtpruneError(f"batch_size={batch_size!r}: expected an integer >= 1, 'auto' or 'auto:N'")
    return batch_size, False


def _flatten(visuals) -> list:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, (list, tuple)):
            out += _flatten(v)
        elif v is not None:
            out.append(v)
    return out


def _check_visuals(visuals: list) -> str | None:
    """Why these visuals are not images the engine can take, or None."""
    from PIL import Image

    for j, v in enumerate(visuals):
        if isinstance(v, Image.Image):
            continue
        if isinstance(v, (str, os.PathLike)) and os.fspath(v).lower().endswith(_IMAGE_SUFFIXES):
            continue
        kind = "a video or file path" if isinstance(v, (str, os.PathLike)) else type(v).__name__
        return f"visual {j} is {kind}, not an image (vtprune evaluates image tasks)"
    return None


def build_prompt(context: str, n_images: int, system_prompt: str | None = None) -> str:
    """The LLaVA-1.5 prompt of an lmms-eval context with n_images visuals (VtpruneError when the
    context's own `<image>` placeholders do not match)."""
    if IMAGE_TOKEN in context:
        if context.count(IMAGE_TOKEN) != n_images:
            raise VtpruneError(f"the context has {context.count(IMAGE_TOKEN)} '{IMAGE_TOKEN}' placeholders "
                               f"and the doc {n_images} visuals")
        body = context.strip()
    elif n_images:
        body = " ".join([IMAGE_TOKEN] * n_images) + "\n" + context.strip()
    else:
        if not context.strip():
            return ""  # the unconditional half of acc_mutual_info: the continuation after BOS alone
        body = context.strip()
    prompt = f"USER: {body} ASSISTANT:"
    return f"{system_prompt.strip()} {prompt}" if system_prompt else prompt


# ----------------------------------------------------------------------------- the model
@dataclass
class _Item:
    index: int            # position in the request list
    task: str
    doc_id: object
    prompt: str = ""
    images: list = field(default_factory=list)
    continuation: str | None = None


class EngineLMM:
    """generate_until / loglikelihood over lmms-eval requests (objects with `.args`)."""

    def __init__(self, pretrained: str, pruning: str | None = None, policy: str | None = None,
                 budget: int | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size=1, max_batch_size=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 system_prompt: str | None = None, rank: int = 0, world_size: int = 1, progress: bool = True,
                 engine=None):
        self.batch_size, self.auto_batch = parse_batch_size(batch_size, max_batch_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VtpruneError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise VtpruneError(f"budget={budget!r}: expected an integer (visual tokens per layer)")
        self.max_new_tokens = max_new_tokens
        self.system_prompt = system_prompt or None
        self.rank, self.world_size, self.progress = rank, world_size, progress
        if engine is None:
            device, dtype = default_device_dtype(device, dtype)
            spec = pruning_spec(argparse.Namespace(pruning=pruning, policy=policy, budget=budget))
            engine = LlavaEngine.from_pretrained(pretrained, device=device, dtype=dtype, pruning=spec)
        self.engine = engine
        self.task_dict: dict = {}
        self.rejected: dict[str, list[tuple[object, str]]] = {}  # task -> [(doc_id, reason)]
        self._ignored: set = set()
        self._warned: set = set()

    # ------------------------------------------------------------------ requests
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        if doc_to_visual is None:
            return []
        return _flatten(doc_to_visual(self._doc(task, split, doc_id)))

    def _prepare(self, item: _Item, context: str, visuals: list) -> str | None:
        """Fill item.prompt / item.images; returns why the doc cannot run, or None."""
        reason = _check_visuals(visuals)
        if reason is not None:
            return reason
        plan = self.engine.plan
        if plan is not None and plan.refusal(len(visuals)) is not None:
            return plan.refusal(len(visuals))
        try:
            item.prompt = build_prompt(context, len(visuals), self.system_prompt)
        except VtpruneError as e:
            return str(e)
        item.images = visuals
        return None

    def _reject(self, item: _Item, reason: str) -> None:
        self.rejected.setdefault(item.task, []).append((item.doc_id, reason))

    def report(self, total: dict[str, int], what: str) -> list[str]:
        """One line per task with rejected docs (also printed on stderr), then clears the count."""
        lines = []
        where = f"rank {self.rank}: " if self.world_size > 1 else ""
        for task, rej in sorted(self.rejected.items()):
            docs = sorted({str(d) for d, _ in rej})
            reasons = sorted({r for _, r in rej})
            lines.append(f"vtprune: {where}task {task}: rejected {len(rej)} of {total.get(task, len(rej))} {what} "
                         f"requests ({len(docs)} docs, e.g. doc {', '.join(docs[:3])}; scored as wrong): "
                         + "; ".join(reasons[:3]))
        for ln in lines:
            print(ln, file=sys.stderr, flush=True)
        self.rejected = {}
        return lines

    def _warn_once(self, text: str) -> None:
        if text not in self._warned and self.rank == 0:
            self._warned.add(text)
            print(f"vtprune: warning: {text}", file=sys.stderr, flush=True)

    def _bar(self, total: int):
        if not self.progress or self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc="Model Responding", unit="req")

    # ------------------------------------------------------------------ batching
    def _chunks(self, items: list) -> list[list]:
        return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def _run(self, chunk: list[_Item], fn) -> list:
        """fn(chunk) -> one result per item; out of memory halves the chunk (and, for batch_size
        auto, every later one), a VtpruneError runs the items one by one and rejects those that
        fail alone. Rejected items get None."""
        import torch

        try:
            return fn(chunk)
        except torch.OutOfMemoryError:
            self.engine.release_cache()
            if len(chunk) == 1:
                self._reject(chunk[0], "out of memory even alone")
                return [None]
            half = (len(chunk) + 1) // 2
            if self.auto_batch and half < self.batch_size:
                self.batch_size = half
                self._warn_once(f"out of memory: batch_size auto now {half}")
            return self._run(chunk[:half], fn) + self._run(chunk[half:], fn)
        except VtpruneError as e:
            if len(chunk) == 1:
                self._reject(chunk[0], str(e).replace("prompt 0", "the prompt").replace("image 0", "the image"))
                return [None]
            return [r for it in chunk for r in self._run([it], fn)]

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests) -> list[str]:
        out: list[str] = [""] * len(requests)
        totals: dict[str, int] = {}
        # one group per distinct settings; within it the longest contexts first (similar
        # lengths batch together; an out-of-memory shows up at once)
        groups: dict[Generation, list[tuple]] = {}
        for i, r in enumerate(requests):
            context, gen, doc_to_visual, doc_id, task, split = r.args[:6]
            totals[task] = totals.get(task, 0) + 1
            g = generation_settings(gen, self.max_new_tokens, self._ignored)
            groups.setdefault(g, []).append((i, context, doc_to_visual, doc_id, task, split))
        if self._ignored:
            self._warn_once("ignored generation kwargs (they do not change vtprune's decoding): "
                            + ", ".join(sorted(self._ignored)))
        bar = self._bar(len(requests))
        ctx = self.engine.cfg.text.max_position_embeddings
        for g, reqs in groups.items():
            reqs.sort(key=lambda x: -len(x[1]))
            for start in range(0, len(reqs), self.batch_size):
                part = reqs[start:start + self.batch_size]
                by_count: dict[int, list[_Item]] = {}
                for i, context, doc_to_visual, doc_id, task, split in part:
                    item = _Item(i, task, doc_id)
                    reason = self._prepare(item, context, self._visuals(doc_to_visual, task, split, doc_id))
                    if reason is not None:
                        self._reject(item, reason)
                        continue
                    by_count.setdefault(min(len(item.images), 2), []).append(item)
                for items in by_count.values():
                    def gen_fn(chunk, g=g):
                        longest = max(len(self.engine.prompts.encode(it.prompt)) for it in chunk)
                        max_new = min(g.max_new_tokens, ctx - longest)
                        if max_new < 1:
                            raise VtpruneError(f"prompt 0 is {longest} tokens, as long as the model's context of {ctx}")
                        if max_new < g.max_new_tokens:
                            self._warn_once(f"max_new_tokens {g.max_new_tokens} capped at what the model's context "
                                            f"({ctx} tokens) leaves after the prompt")
                        results = self.engine.generate(
                            [self._images_arg(it) for it in chunk], [it.prompt for it in chunk], max_new_tokens=max_new,
                            temperature=g.temperature, top_p=g.top_p, stop=list(g.until) or None)
                        return [r.text for r in results]
                    for it, text in zip(items, self._run(items, gen_fn)):
                        if text is not None:
                            out[it.index] = text
                if bar is not None:
                    bar.update(len(part))
        if bar is not None:
            bar.close()
        self.report(totals, "generate_until")
        return out

    @staticmethod
    def _images_arg(item: _Item):
        """LlavaEngine's image entry for one prompt: the image, a list of several, or None."""
        if not item.images:
            return None
        return item.images[0] if len(item.images) == 1 else list(item.images)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood per continuation token, is_greedy) per request: see the
        module docstring for why a loss and not a log-likelihood."""
        out: list[tuple[float, bool]] = [(math.inf, False)] * len(requests)
        totals: dict[str, int] = {}
        items: list[_Item] = []
        visuals_cache: dict = {}  # the choices of one doc share its visuals (and its vision pass)
        for i, r in enumerate(requests):
            args = r.args
            task = getattr(r, "task_name", None) or (args[4] if len(args) >= 6 else "")
            totals[task] = totals.get(task, 0) + 1
            if len(args) >= 6:
                context, target, doc_to_visual, doc_id, task, split = args[:6]
                if not isinstance(target, str):
                    target = target(self._doc(task, split, doc_id))
                key = (task, split, doc_id)
                if key not in visuals_cache:
                    visuals_cache = {key: self._visuals(doc_to_visual, task, split, doc_id)}
                visuals = visuals_cache[key]
            else:  # acc_mutual_info's unconditional requests: (context, continuation), no visual
                (context, target), doc_id, visuals = args[:2], getattr(r, "doc_id", None), []
            item = _Item(i, task, doc_id)
            if not isinstance(target, str) or not target.strip():
                self._reject(item, f"continuation {target!r} is not a non-empty string")
                continue
            item.continuation = " " + target.lstrip()  # after "ASSISTANT:", as the llava wrappers join them
            reason = self._prepare(item, context, visuals)
            if reason is not None:
                self._reject(item, reason)
                continue
            items.append(item)
        bar = self._bar(len(requests))
        eng = self.engine

        def score_fn(chunk):
            scores = eng.score([self._images_arg(it) for it in chunk], [it.prompt for it in chunk],
                               [it.continuation for it in chunk])
            res = []
            for it, (logp, greedy) in zip(chunk, scores):
                n = len(eng.prompts.continuation(it.prompt, it.continuation))
                res.append((-logp / n, greedy))
            return res

        # requests keep lmms-eval's order (a doc's choices next to each other); a chunk is split
        # by image count, which the plan may require to be uniform
        for start in range(0, len(items), self.batch_size):
            part = items[start:start + self.batch_size]
            by_count: dict[int, list[_Item]] = {}
            for it in part:
                by_count.setdefault(min(len(it.images), 2), []).append(it)
            for group in by_count.values():
                for it, res in zip(group, self._run(group, score_fn)):
                    if res is not None:
                        out[it.index] = res
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.update(len(requests) - len(items))
            bar.close()
        self.report(totals, "loglikelihood")
        return out

    def generate_until_multi_round(self, requests):
        raise VtpruneError("multi-round generation tasks are not supported by the vtprune model")


# ----------------------------------------------------------------------------- launcher
def register() -> None:
    """Make --model vtprune resolvable in the running lmms-eval without pip metadata: its
    registry v2 (>= 0.7), the AVAILABLE_MODELS table (0.2-0.6) and register_model (all)."""
    import importlib

    models = importlib.import_module("lmms_eval.models")
    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is not None:
        for manifest in lmms_eval_manifests():
            registry.register_manifest(manifest, overwrite=True)
    else:
        table = getattr(models, "AVAILABLE_MODELS", None)
        if isinstance(table, dict):
            table[MODEL_NAME] = MODEL_CLASS
    importlib.import_module(MODEL_CLASS.rsplit(".", 1)[0])  # @register_model("vtprune")


def main() -> int:
    """`python -m vtprune.quality.lmms_eval_plugin ARGS`: lmms-eval's command line with the model
    registered (for installs without the entry point)."""
    try:
        from lmms_eval.__main__ import cli_evaluate
    except ImportError as e:
        print(f"vtprune: error: lmms-eval is not installed ({e}); pip install -e \".[lmms]\"", file=sys.stderr)
        return 2
    register()
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
