"""Batch inference jobs: JSONL requests in, JSONL answers out, resumable.

    vtprune batch --model DIR --input requests.jsonl --output answers.jsonl
                  [--pruning cfg.yaml] [--batch-size 16] [--max-new-tokens 64]
                  [--scheduler inflight|static] [--kv-budget-gb GB] [--max-rows N]

Input records: {"id": ..., "image": path, "prompt": "... <image> ..."} or {"id", "image", "question"}.
- The input is streamed: a window of batch_size x 8 records is read, grouped by prompt length
  (and image, so questions about one image share its vision-tower pass), and answered batch by
  batch; every batch's records are written and flushed (fsync) before the next batch starts.
- Scheduler: "inflight" (default; engine/scheduler.py) keeps up to --max-rows decode rows, as many
  as --kv-budget-gb holds of the requests' pruned KV rows, and refills finished rows between decode
  steps with requests prefilled --batch-size at a time (records are written as requests finish);
  "static" decodes each batch until its longest answer is done. Greedy answers are the same.
- Resumable: ids already answered in the output are skipped. A job killed at any moment
  (kill -9 included) and re-run ends with every id answered exactly once: a torn last line (a
  write cut short) is cut off before appending.

Job settings are checked at start-up, before any file is written: the input must be a readable
regular file with at least one line, the output (and the files derived from it: torchrun's
`OUT.partR-of-W`, the in-flight file `OUT.inflight`) must be writable and none of them may be the
input (symlinks, hard links and relative paths included); an existing output must hold vtprune
records only (a foreign file is refused, naming its first foreign line, and never truncated);
batch_size >= 1; max_new_tokens >= 1 and small enough that the shortest possible prompt
('<image>' alone) still fits the model's context.

A bad request becomes an error record and the job goes on. Error records are
`{"id", "line", "error"}` (id null when the line has no usable id) and come in three kinds:
- final: the request itself is bad (bad JSON, not UTF-8, not an object, bad id, bad or missing
  fields, a prompt without exactly one '<image>', a missing, special or unreadable image file, an
  image PIL refuses or fails on, a duplicate id). Re-runs skip them; delete the line to retry.
- `"retry": "other settings", "settings": FP`: it failed under these settings (a prompt too long
  for max_new_tokens or for the context, out of memory even alone, the process died twice while
  answering it alone). A re-run with the same settings (same fingerprint FP: model, device, dtype,
  pruning, max_new_tokens, vtprune version) skips it; with other settings it is answered again.
- `"retry": "always"`: an unexpected exception inside the engine (a bug: its traceback goes to
  stderr once per job); every re-run tries it again.
An output can therefore hold error records and, later, the answer for one id: the answer wins
(`read_results` gives one record per id). Every id still gets at most one answer.

Hard crashes (the OOM killer, a segfault): before each batch starts, its ids are written to
`OUT.inflight` (atomically). A re-run that finds the file answers that batch one request at a
time, first; a request that was in flight alone when the job died twice gets a retry-with-other-
settings error record instead of crashing every re-run. A clean end removes the file.

Out of memory (CUDA, or the CPU allocator): the batch is split in halves and retried. In flight, a
failing scheduler (out of memory included) hands the requests it held to the static path.
Under torchrun each rank appends to `OUT.partR-of-W`; ids already in the output or in any part
file (of any world size) count as done, and parts are merged into the output by appending the
lines it lacks (a single-process run merges leftover parts too).
Python API: `answer_requests(engine, requests)` yields results for an iterable of request dicts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import __version__
from .engine import inputs as engine_inputs  # load_image read at call time (tests patch it)
from .engine.inputs import IMAGE_TOKEN, format_prompt
from .errors import VtpruneError
from .files import check_file, check_output_file, iter_lines, open_regular

# A request is one short JSON line (a prompt fills at most the model's context: 4096 tokens, about
# 16 KB of text, for LLaVA-1.5); longer lines are refused without being read into memory.
MAX_LINE_BYTES = 1 << 20
# Integer ids must fit in a signed 64-bit integer: most JSON readers (and databases) store ints so.
_INT_ID_LIMIT = 1 << 63
_INFLIGHT_TAG = "vtprune batch in-flight"
# Error messages of releases before retry kinds existed whose cause is a setting: treated as retryable.
_LEGACY_SETTING_ERRORS = ("exceeds the model's context", "longer than the model's context", "out of GPU memory")


@dataclass
class Request:
    id: object
    key: str
    line: int
    image: object
    prompt: str
    tokens: int = 0


def _key(i) -> str:
    return json.dumps(i)


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"a float ({json.dumps(v)})"
    return {bool: "a boolean", int: "an integer", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _id_problem(rid) -> str | None:
    """Why `rid` cannot be a request id, or None when it can."""
    if rid is None:
        return "missing field 'id'"
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return f"field 'id' must be a string or an integer, got {_json_type(rid)}"
    if isinstance(rid, int) and not -_INT_ID_LIMIT <= rid < _INT_ID_LIMIT:
        return "field 'id' is an integer out of range: integer ids must fit in 64 bits (give it as a string)"
    if isinstance(rid, str):
        if not rid:
            return "field 'id' is an empty string"
        return _unicode_problem(rid, "id")
    return None


def _unicode_problem(s: str, field: str) -> str | None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return f"field '{field}' is not valid Unicode (it holds an unpaired surrogate escape)"
    return None


def _to_request(record: dict, line: int, key: str, allow_objects: bool = False) -> Request:
    """A valid Request or a VtpruneError naming what is wrong with the record (its id is valid)."""
    image = record.get("image")
    if image is None:
        raise VtpruneError("missing field 'image'")
    if isinstance(image, str):
        if not image:
            raise VtpruneError("field 'image' is an empty string")
        if "\x00" in image:
            raise VtpruneError("field 'image' contains a NUL byte")
        problem = _unicode_problem(image, "image")
        if problem:
            raise VtpruneError(problem)
    elif not (allow_objects and (isinstance(image, os.PathLike) or _is_pil(image))):
        wanted = "a file path or a PIL image" if allow_objects else "a string (a file path)"
        raise VtpruneError(f"field 'image' must be {wanted}, got {_json_type(image)}")
    prompt, question = record.get("prompt"), record.get("question")
    if prompt is not None and question is not None:
        raise VtpruneError("fields 'prompt' and 'question' are both given; give one")
    if prompt is None:
        if question is None:
            raise VtpruneError("missing field 'prompt' or 'question'")
        if not isinstance(question, str):
            raise VtpruneError(f"field 'question' must be a string, got {_json_type(question)}")
        if not question.strip():
            raise VtpruneError("field 'question' is empty")
        if IMAGE_TOKEN in question:
            raise VtpruneError(f"field 'question' contains '{IMAGE_TOKEN}'; give a full 'prompt' instead")
        field, prompt = "question", format_prompt(question)
    else:
        if not isinstance(prompt, str):
            raise VtpruneError(f"field 'prompt' must be a string, got {_json_type(prompt)}")
        field, n = "prompt", prompt.count(IMAGE_TOKEN)
        if n != 1:
            raise VtpruneError(f"field 'prompt' has {'no' if n == 0 else n} '{IMAGE_TOKEN}' placeholder"
                               f"{'s' if n > 1 else ''}; exactly one is required (or give a 'question')")
    problem = _unicode_problem(prompt, field)
    if problem:
        raise VtpruneError(problem)
    return Request(record["id"], key, line, image, prompt)


def _where(image) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else "(a PIL image)"


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Image.Image)


# ----------------------------------------------------------------------------- settings
def _check_int(value, name: str, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VtpruneError(f"{flag} {value!r}: {name} must be an integer >= 1")
    return value


def check_settings(batch_size, max_new_tokens, window: int = 8) -> None:
    """Job settings that can be checked without a model."""
    _check_int(batch_size, "the batch size", "--batch-size")
    _check_int(max_new_tokens, "the number of new tokens", "--max-new-tokens")
    _check_int(window, "the grouping window (in batches)", "window")


def check_context(engine, max_new_tokens: int) -> None:
    """Refuse a max_new_tokens that no prompt could satisfy: even '<image>' alone (BOS and the
    visual tokens that enter the decoder, fewer with pruning) plus max_new_tokens must fit."""
    ctx = engine.cfg.text.max_position_embeddings
    shortest = len(engine.prompts.encode(IMAGE_TOKEN))
    if shortest + max_new_tokens > ctx:
        raise VtpruneError(f"--max-new-tokens {max_new_tokens}: too large for the model's context of {ctx} tokens; "
                           f"the shortest possible prompt ('<image>' alone) is {shortest} tokens "
                           f"({engine.prompts.num_visual_tokens} visual), so at most {ctx - shortest} new tokens fit")


def settings_fingerprint(engine, max_new_tokens: int, extra: dict | None = None) -> str:
    """12 hex digits naming what decides whether a request can be answered at all (not the
    batch size: 'even alone' errors do not depend on it)."""
    plan = getattr(engine, "plan", None)
    cfg = getattr(plan, "cfg", None)
    pruning = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else (repr(cfg) if cfg is not None else None)
    desc = {"vtprune": __version__, "model": repr(engine.cfg), "device": str(engine.device.type),
            "dtype": str(engine.dtype), "pruning": pruning, "max_new_tokens": max_new_tokens, **(extra or {})}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=repr).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- answering
def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)  # torch's CPU allocator


def _short(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class _Answerer:
    """Turns a stream of Requests (and ready error records, passed through) into output records."""

    def __init__(self, engine, batch_size: int, max_new_tokens: int, window: int, fingerprint: str,
                 generate_kwargs: dict, alone=frozenset(), before_batch=None, after_batch=None,
                 scheduler: str = "inflight", kv_budget_gb: float | None = None, max_rows: int | None = None):
        self.engine, self.batch_size, self.max_new_tokens, self.window = engine, batch_size, max_new_tokens, window
        self.fp, self.kwargs, self.alone = fingerprint, generate_kwargs, alone
        self.before_batch, self.after_batch = before_batch, after_batch
        self.ctx = engine.cfg.text.max_position_embeddings
        self.internal_errors = 0
        self.scheduler = None
        if scheduler == "inflight":  # the engine checks the options (each error names its option)
            self.scheduler = engine.inflight(max_new_tokens, prefill_batch=batch_size,
                                             max_rows=max_rows or MAX_ROWS_PER_BATCH * batch_size,
                                             kv_budget_gb=kv_budget_gb, **generate_kwargs)
            self.scheduler.lookahead = batch_size * window

    def settings_error(self, r: Request, msg: str) -> dict:
        return {"id": r.id, "line": r.line, "error": msg, "retry": "other settings", "settings": self.fp}

    def internal_error(self, r: Request, e: BaseException) -> dict:
        if not self.internal_errors:  # a bug: its traceback, once per job
            print(f"vtprune: internal error on request {r.id!r} (line {r.line}); the job goes on. Traceback:",
                  file=sys.stderr)
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        self.internal_errors += 1
        return {"id": r.id, "line": r.line, "error": f"internal error ({_short(e)}); please report it",
                "retry": "always"}

    def __call__(self, items: Iterable) -> Iterator[dict]:
        if self.scheduler is not None:
            yield from self._inflight(items)
            return
        pending: list[Request] = []
        for item in items:
            if isinstance(item, dict):
                yield item
                continue
            err = self._fit(item)
            if err is not None:
                yield err
            elif item.key in self.alone:
                yield from self._batch([item])
            else:
                pending.append(item)
                if len(pending) >= self.batch_size * self.window:
                    yield from self._group(pending)
                    pending = []
        yield from self._group(pending)

    def _fit(self, r: Request) -> dict | None:
        """Tokenize once to know the prompt's length: a prompt that cannot fit is reported (under
        these settings) before its image is even loaded."""
        try:
            r.tokens = len(self.engine.prompts.encode(r.prompt))
        except Exception as e:  # noqa: BLE001 - one request's problem, not the job's
            return self.internal_error(r, e)
        visual = self.engine.prompts.num_visual_tokens
        if r.tokens - visual >= self.ctx:  # no pruning could make it fit: the request's own problem
            return {"id": r.id, "line": r.line,
                    "error": f"prompt is {r.tokens} tokens ({visual} of them visual): its text alone does not fit in "
                             f"the model's context of {self.ctx}"}
        if r.tokens > self.ctx:
            return self.settings_error(r, f"prompt is {r.tokens} tokens ({visual} of them visual), longer than the "
                                          f"model's context of {self.ctx}")
        if r.tokens + self.max_new_tokens > self.ctx:
            return self.settings_error(r, f"prompt is {r.tokens} tokens ({visual} of them visual); with "
                                          f"max_new_tokens {self.max_new_tokens} it exceeds the model's context "
                                          f"of {self.ctx} (at most {self.ctx - r.tokens} new tokens fit)")
        return None

    @staticmethod
    def _sorted(pending: list[Request]) -> list[Request]:
        """By (prompt length, image): little padding per batch, and questions about one image side
        by side (one vision-tower pass, a shared prefix)."""
        return sorted(pending, key=lambda r: (r.tokens, r.image if isinstance(r.image, str) else str(id(r.image))))

    def _group(self, pending: list[Request]) -> Iterator[dict]:
        """Sort a window and answer it batch by batch (the static scheduler)."""
        pending = self._sorted(pending)
        for i in range(0, len(pending), self.batch_size):
            yield from self._batch(pending[i: i + self.batch_size])

    def _inflight(self, items: Iterable) -> Iterator[dict]:
        """The in-flight scheduler over the whole stream (windows sorted as for static batches):
        records come out as requests finish. Records that are ready without the model (bad
        lines, prompts too long, images that do not load) go out between them. If the scheduler
        fails (out of memory, a bad prompt it could not foresee, a bug), the requests it held go
        through the static path, which splits batches and writes each request's error record,
        and the scheduler goes on with the rest of the stream."""
        from .engine.scheduler import Item

        side: list[dict] = []      # records ready to go out
        held: dict[str, tuple[Request, object]] = {}  # key -> (request, its image or None): given to the scheduler

        def windows():
            pending: list[Request] = []
            for item in items:
                if isinstance(item, dict):
                    side.append(item)
                    continue
                err = self._fit(item)
                if err is not None:
                    side.append(err)
                elif item.key in self.alone:  # a suspect of a crash: alone, on the static path
                    side.extend(self._batch([item]))
                else:
                    pending.append(item)
                    if len(pending) >= self.batch_size * self.window:
                        yield from self._sorted(pending)
                        pending = []
            yield from self._sorted(pending)

        def feed():
            for r in windows():
                held[r.key] = (r, None)
                yield Item(r.key, r.image, r.prompt, r.tokens)

        def load(it: Item):
            r, _ = held[it.key]
            image, err = self._load(r.image)
            if err is not None:
                del held[it.key]
                side.append({"id": r.id, "line": r.line, **err})
                return None
            held[it.key] = (r, image)
            return image

        def on_admit(in_flight: list[Item]):
            if self.before_batch is not None:
                self.before_batch([held[it.key][0] for it in in_flight])

        stream = feed()
        while True:
            try:
                for key, ids, stats in self.scheduler.run(stream, on_admit, load):
                    yield from self._drain(side)  # read (or loaded) before this answer was done
                    r, _ = held.pop(key)
                    res = self.engine._result(ids, self.scheduler.stops, stats)
                    yield {"id": r.id, "text": res.text, "token_ids": res.token_ids, "stats": res.stats}
                yield from self._drain(side)
                break
            except Exception:  # noqa: BLE001 - the static path below reports each request's own error
                pass
            # handled outside the except block, so that a later error does not chain onto this one
            self.scheduler.release()
            self.engine.release_cache()
            yield from self._drain(side)
            left = list(held.values())
            held.clear()
            for i in range(0, len(left), self.batch_size):
                yield from self._static_batch(left[i: i + self.batch_size])
        if self.after_batch is not None:
            self.after_batch()

    def _static_batch(self, chunk: list[tuple[Request, object]]) -> Iterator[dict]:
        """Requests the in-flight scheduler held when it failed, with their images where it had
        loaded them (None: not yet), through the static path."""
        if self.before_batch is not None:
            self.before_batch([r for r, _ in chunk])
        good, images = [], []
        for r, image in chunk:
            if image is None:
                image, err = self._load(r.image)
                if err is not None:
                    yield {"id": r.id, "line": r.line, **err}
                    continue
            good.append(r)
            images.append(image)
        if good:
            yield from self._generate(good, images)
        if self.after_batch is not None:
            self.after_batch()

    @staticmethod
    def _drain(records: list[dict]) -> Iterator[dict]:
        while records:
            yield records.pop(0)

    def _batch(self, batch: list[Request]) -> Iterator[dict]:
        if self.before_batch is not None:
            self.before_batch(batch)
        good, images, cache = [], [], {}
        for r in batch:  # load each image once per batch (one object: the engine encodes it once)
            k = os.fspath(r.image) if isinstance(r.image, (str, os.PathLike)) else id(r.image)
            if k not in cache:
                cache[k] = self._load(r.image)
            image, err = cache[k]
            if err is not None:
                yield {"id": r.id, "line": r.line, **err}
            else:
                good.append(r)
                images.append(image)
        if good:
            yield from self._generate(good, images)
        if self.after_batch is not None:  # runs once the consumer has taken every record of the batch
            self.after_batch()

    def _load(self, image):
        """(PIL image, None) or (None, error fields). Any failure of one image is that request's
        error: PIL's DecompressionBombError, a plugin's struct.error, MemoryError, ..."""
        try:
            if isinstance(image, (str, os.PathLike)):
                check_file(image, "image")  # a FIFO or a device is refused before any open
            return engine_inputs.load_image(image, 0, self.engine.image_processor), None
        except VtpruneError as e:
            return None, {"error": str(e).replace("image 0: ", "image ", 1)}
        except MemoryError as e:  # the machine's limit more than the image's fault
            return None, {"error": f"image {_where(image)}: out of memory while loading it ({_short(e)})",
                          "retry": "other settings", "settings": self.fp}
        except Exception as e:  # noqa: BLE001
            return None, {"error": f"image {_where(image)}: cannot be loaded ({_short(e)})"}

    def _generate(self, reqs: list[Request], images: list) -> Iterator[dict]:
        try:
            results = self.engine.generate(images, [r.prompt for r in reqs], max_new_tokens=self.max_new_tokens,
                                           **self.kwargs)
        except Exception as e:  # noqa: BLE001 - split, then the request alone gets the error record
            error = e
        else:
            for r, res in zip(reqs, results):
                yield {"id": r.id, "text": res.text, "token_ids": res.token_ids, "stats": res.stats}
            return
        # handled outside the except block, so that a later error does not chain onto this one
        self.engine.release_cache()
        if _is_oom(error) and len(reqs) > 1:
            half = len(reqs) // 2
            yield from self._generate(reqs[:half], images[:half])
            yield from self._generate(reqs[half:], images[half:])
        elif len(reqs) > 1:
            for r, im in zip(reqs, images):
                yield from self._generate([r], [im])
        elif _is_oom(error):
            yield self.settings_error(reqs[0], f"out of memory even alone ({_short(error, 200)}); retried with "
                                               "other settings (a smaller --max-new-tokens, pruning, dtype)")
        elif isinstance(error, VtpruneError):
            yield self.settings_error(reqs[0], str(error).replace("prompt 0", "prompt"))
        else:
            yield self.internal_error(reqs[0], error)


_GENERATE_OPTIONS = ("temperature", "top_p", "seed", "stop", "use_cuda_graph")
SCHEDULERS = ("inflight", "static")
# Decode rows of the in-flight scheduler without --max-rows: this many per prefill batch, fewer
# when the KV budget holds fewer.
MAX_ROWS_PER_BATCH = 4


def check_scheduler(scheduler, kv_budget_gb=None, max_rows=None) -> None:
    """The scheduler settings of a job, checked at start-up (before any file is written)."""
    from .engine.engine import check_kv_budget

    if scheduler not in SCHEDULERS:
        raise VtpruneError(f"--scheduler {scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    if kv_budget_gb is not None:
        check_kv_budget(kv_budget_gb, "--kv-budget-gb")
    if max_rows is not None:
        _check_int(max_rows, "the number of decode rows", "--max-rows")


def answer_requests(engine, requests: Iterable[dict], batch_size: int = 16, max_new_tokens: int = 64,
                    window: int = 8, scheduler: str = "inflight", kv_budget_gb: float | None = None,
                    max_rows: int | None = None, **generate_kwargs) -> Iterator[dict]:
    """Yields one output record per request (answers and error records, as in a job's output),
    as requests finish. `requests`: an iterable of dicts {"id", "image" (a path or a PIL image),
    "prompt" or "question"}; an item that is not such a dict gets an error record (`line`: its
    1-based position). Bad settings raise VtpruneError here, before anything is yielded.
    scheduler "inflight" (engine/scheduler.py: up to max_rows decode rows, default
    MAX_ROWS_PER_BATCH x batch_size, within kv_budget_gb, refilled between decode steps with
    requests prefilled batch_size at a time) or "static" (batches decoded to their longest row)."""
    check_settings(batch_size, max_new_tokens, window)
    check_scheduler(scheduler, kv_budget_gb, max_rows)
    unknown = sorted(set(generate_kwargs) - set(_GENERATE_OPTIONS))
    if unknown:
        raise VtpruneError(f"answer_requests: unknown option(s) {', '.join(unknown)}; "
                           f"known: {', '.join(_GENERATE_OPTIONS)}")
    if isinstance(requests, (dict, str, bytes)) or not hasattr(requests, "__iter__"):
        raise VtpruneError(f"requests: expected an iterable of request dicts, got {type(requests).__name__}"
                           + (" (wrap one request in a list)" if isinstance(requests, dict) else ""))
    check_context(engine, max_new_tokens)
    fp = settings_fingerprint(engine, max_new_tokens, {k: generate_kwargs[k] for k in sorted(generate_kwargs)})

    def items():
        seen: dict[str, int] = {}
        for line, record in enumerate(requests, 1):
            if not isinstance(record, dict):
                yield {"id": None, "line": line, "error": f"expected a request dict, got {_json_type(record)}"}
                continue
            problem = _id_problem(record.get("id"))
            if problem:
                yield {"id": None, "line": line, "error": problem}
                continue
            key = _key(record["id"])
            if key in seen:
                yield _duplicate(record["id"], line, seen[key])
                continue
            seen[key] = line
            try:
                yield _to_request(record, line, key, allow_objects=True)
            except VtpruneError as e:
                yield {"id": record["id"], "line": line, "error": str(e)}

    answer = _Answerer(engine, batch_size, max_new_tokens, window, fp, generate_kwargs, scheduler=scheduler,
                       kv_budget_gb=kv_budget_gb, max_rows=max_rows)  # checks the scheduler's options
    return answer(items())


def _duplicate(rid, line: int, first: int) -> dict:
    return {"id": rid, "line": line, "duplicate": True,
            "error": f"duplicate id {rid!r}: line {first} has it first (that line is answered, this one is not)"}


# ----------------------------------------------------------------------------- the output
def _classify(rec) -> str | None:
    """'answer', 'final', 'line' (an error tracked by its line), 'retry-settings', 'retry-always',
    or None when `rec` is not a record a job writes."""
    if not isinstance(rec, dict) or "id" not in rec:
        return None
    rid = rec["id"]
    if rid is not None and _id_problem(rid):
        return None
    if "error" in rec:
        line = rec.get("line")
        if not isinstance(rec["error"], str) or (line is not None and (isinstance(line, bool)
                                                                       or not isinstance(line, int))):
            return None
        if rid is None or rec.get("duplicate"):
            return "line" if isinstance(line, int) else None
        retry = rec.get("retry")
        if retry == "always":
            return "retry-always"
        if retry == "other settings":
            return "retry-settings" if isinstance(rec.get("settings"), str) else None
        if retry is not None:
            return None
        if any(s in rec["error"] for s in _LEGACY_SETTING_ERRORS):
            return "retry-always"
        return "final"
    if rid is not None and isinstance(rec.get("text"), str) and isinstance(rec.get("token_ids"), list):
        return "answer"
    return None


class _Done:
    """What an output (and its sibling part files) already holds."""

    def __init__(self):
        self.answered: set[str] = set()
        self.final: set[str] = set()
        self.retry_settings: dict[str, set[str]] = {}
        self.lines: set[int] = set()

    def add(self, rec: dict, kind: str | None = None) -> str | None:
        kind = kind or _classify(rec)
        if kind == "answer":
            self.answered.add(_key(rec["id"]))
        elif kind == "final":
            self.final.add(_key(rec["id"]))
        elif kind == "line":
            self.lines.add(rec["line"])
        elif kind == "retry-settings":
            self.retry_settings.setdefault(_key(rec["id"]), set()).add(rec["settings"])
        return kind

    def is_done(self, key: str, fp: str) -> bool:
        return key in self.answered or key in self.final or fp in self.retry_settings.get(key, ())


@dataclass
class _OutputFile:
    path: str
    what: str
    cut_at: int | None = None  # a torn last line starts here
    add_newline: bool = False  # the last record lacks its newline


def _foreign(what: str, path: str, line: int, reason: str) -> VtpruneError:
    return VtpruneError(f"{what} {path} line {line} {reason}: it is not a vtprune batch output; refusing to append "
                        f"to it (give another --output)")


def _scan_output(path: str, what: str, done: _Done, records: list | None = None) -> _OutputFile:
    """Read an existing output (read-only): every complete line must be a job record, else the
    file is refused (naming the line) and left as it is. A last line without its newline is a
    record (kept) or a torn write of one (`{"id": ...` cut short: cut off before appending)."""
    info = _OutputFile(path, what)
    if not os.path.exists(path):
        return info
    f = open_regular(path, what)
    offset, n = 0, 0
    with f:
        for raw in f:
            n += 1
            start, offset = offset, offset + len(raw)
            complete = raw.endswith(b"\n")
            body = raw.rstrip(b"\r\n")
            if not body.strip():
                continue
            try:
                rec = json.loads(body.decode("utf-8"))
                kind = _classify(rec)
            except UnicodeDecodeError:
                rec, kind, reason = None, None, "is not UTF-8 text"
            except (ValueError, RecursionError):
                rec, kind, reason = None, None, "is not valid JSON"
            else:
                reason = f"is {_json_type(rec)}, not a record" if not isinstance(rec, dict) else \
                    "is a JSON object that is not a vtprune batch record"
            if kind is None:
                if not complete and body.startswith(b'{"id": '):
                    info.cut_at = start  # killed mid-write: a prefix of one of our records
                    continue
                raise _foreign(what, path, n, reason)
            done.add(rec, kind)
            if records is not None:
                records.append(rec)
            info.add_newline = not complete
    return info


def _repair(info: _OutputFile) -> None:
    """Make the file end on a whole record before appending (only on files scanned as ours)."""
    if info.cut_at is None and not info.add_newline:
        return
    with open_regular(info.path, info.what, "r+b") as f:
        if info.cut_at is not None:
            f.truncate(info.cut_at)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    info.cut_at, info.add_newline = None, False


def _encode(rec: dict) -> bytes:
    line = json.dumps(rec, ensure_ascii=False)
    try:
        return (line + "\n").encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate from somewhere: \u escapes are valid JSON
        return (json.dumps(rec) + "\n").encode("ascii")


def _part_files(output: str) -> list[tuple[int, int, str]]:
    """(world, rank, path) of every `OUTPUT.partR-of-W` next to the output."""
    d = os.path.dirname(os.path.abspath(output))
    pat = re.compile(re.escape(os.path.basename(output)) + r"\.part(\d+)-of-(\d+)")
    try:
        names = os.listdir(d)
    except OSError:
        return []
    found = []
    for name in names:
        m = pat.fullmatch(name)
        if m and os.path.isfile(os.path.join(d, name)):
            found.append((int(m.group(2)), int(m.group(1)), os.path.join(os.path.dirname(output), name)))
    return sorted(found)


def merge_parts(output: str, parts: list[str] | None = None) -> int:
    """Append to `output` the lines of the part files that it does not hold yet (parts are kept:
    a re-run resumes from them; merging twice adds nothing). Returns the number of lines added."""
    parts = [p for _, _, p in _part_files(output)] if parts is None else parts
    done = _Done()
    info = _scan_output(output, "output file", done)
    have = set()
    if os.path.exists(output):
        with open_regular(output, "output file") as f:
            for raw in f:
                if raw.endswith(b"\n"):
                    have.add(hashlib.sha1(raw).digest())
    new = []
    for p in parts:
        if not os.path.exists(p):
            continue
        _scan_output(p, "part file", _Done())
        with open_regular(p, "part file") as f:
            for raw in f:
                h = hashlib.sha1(raw).digest()
                if raw.endswith(b"\n") and raw.strip() and h not in have:
                    have.add(h)
                    new.append(raw)
    if not new and info.cut_at is None and not info.add_newline:
        return 0
    _repair(info)
    with open_regular(output, "output file", "ab") as out:
        out.write(b"".join(new))
        out.flush()
        os.fsync(out.fileno())
    return len(new)


def read_results(output: str) -> list[dict]:
    """One record per id from a job's output (and its part files): the answer when there is one,
    else the last error record; then the errors of lines without a usable id (bad JSON,
    duplicates), in line order."""
    by_id, by_line = {}, {}
    files = ([output] if os.path.exists(output) else []) + [p for _, _, p in _part_files(output)]
    for path in files:
        records: list = []
        _scan_output(path, "output file", _Done(), records)
        for rec in records:
            if _classify(rec) == "line":
                by_line.setdefault(rec["line"], rec)
                continue
            k = _key(rec["id"])
            if k not in by_id or "error" in by_id[k]:  # an answer is never replaced
                by_id[k] = rec
    return list(by_id.values()) + [by_line[k] for k in sorted(by_line)]


# ----------------------------------------------------------------------------- the job
def _shard_of(key: str, world: int) -> int:
    """Requests are sharded by id (a stable hash), so duplicates meet in one shard."""
    import zlib

    return zlib.crc32(key.encode()) % world


def check_world(env=None) -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK / WORLD_SIZE (0, 1 without them)."""
    env = os.environ if env is None else env
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0")):
        raw = env.get(name, default)
        try:
            values[name] = int(raw)
        except ValueError:
            raise VtpruneError(f"environment variable {name}={raw!r} is not an integer") from None
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if world < 1 or not 0 <= rank < world:
        raise VtpruneError(f"environment variables RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world


class Job:
    """A checked job: `open_job` does every check that needs no model, read-only; `run` answers."""

    def __init__(self, input_path: str, output: str, batch_size: int, max_new_tokens: int, shard, window: int):
        self.input, self.output = input_path, output
        self.batch_size, self.max_new_tokens, self.shard, self.window = batch_size, max_new_tokens, shard, window
        rank, world = shard
        self.target = output if world == 1 else f"{output}.part{rank}-of-{world}"
        self.inflight = self.target + ".inflight"
        self.done = _Done()
        self.files: list[_OutputFile] = []
        self.previous: dict | None = None  # the in-flight file a killed run left

    # -------------------------------------------------------------- start-up
    def _check_paths(self, inputs: dict) -> None:
        guarded = {"input file": self.input, **{k: v for k, v in inputs.items() if v is not None}}
        paths = [("output file", self.output)]
        if self.target != self.output:
            paths.append(("part file", self.target))
        paths += [("in-flight file", self.inflight), ("in-flight file", self.inflight + ".tmp")]
        for what, p in paths:
            check_output_file(p, what, inputs=guarded)

    def _check_input(self) -> None:
        self.input = check_file(self.input, "input file")
        lines = iter_lines(self.input, "input file", MAX_LINE_BYTES)  # opens it: unreadable fails here
        first = next(lines, None)
        lines.close()
        if first is not None:
            return
        size = os.path.getsize(self.input)
        raise VtpruneError(f"input file {self.input}: " + ("is empty (no requests)" if size == 0 else
                                                           "holds no requests (only blank lines)"))

    def _scan(self) -> None:
        own = [(self.output, "output file")] + [(p, "part file") for _, _, p in _part_files(self.output)]
        if self.target != self.output and all(p != self.target for p, _ in own):
            own.append((self.target, "part file"))
        for path, what in own:
            self.files.append(_scan_output(path, what, self.done))
        self.previous = self._read_inflight()

    def _read_inflight(self) -> dict | None:
        if not os.path.exists(self.inflight):
            return None
        f = open_regular(self.inflight, "in-flight file")
        with f:
            data = f.read(1 << 24)
        try:
            state = json.loads(data.decode("utf-8"))
            ok = (isinstance(state, dict) and state.get("tag") == _INFLIGHT_TAG
                  and isinstance(state.get("settings"), str) and isinstance(state.get("in_flight"), list)
                  and isinstance(state.get("crashes"), dict)
                  and not any(_id_problem(i) for i in state["in_flight"])
                  and all(isinstance(n, int) for n in state["crashes"].values()))
        except (ValueError, RecursionError):
            ok = False
        if not ok:
            raise VtpruneError(f"in-flight file {self.inflight}: not written by vtprune batch; refusing to overwrite "
                               f"it (move it away if it is not needed)")
        return state

    # -------------------------------------------------------------- the run
    def run(self, engine, progress: bool = True, settings: dict | None = None, scheduler: str = "inflight",
            kv_budget_gb: float | None = None, max_rows: int | None = None, **generate_kwargs) -> dict:
        from tqdm import tqdm

        check_scheduler(scheduler, kv_budget_gb, max_rows)
        check_context(engine, self.max_new_tokens)
        fp = settings_fingerprint(engine, self.max_new_tokens, settings)
        done = self.done
        crashes: dict[str, int] = {}
        suspects: set[str] = set()
        prev = self.previous
        if prev is not None:
            if prev["settings"] == fp:
                crashes = {k: n for k, n in prev["crashes"].items() if not done.is_done(k, fp)}
            in_flight = [_key(i) for i in prev["in_flight"]]
            left = [k for k in in_flight if not done.is_done(k, fp)]
            if len(in_flight) == 1 and left:  # it was alone when the job died
                crashes[left[0]] = crashes.get(left[0], 0) + 1
            suspects = set(left) | set(crashes)
        counts = {"answered": 0, "errors": 0, "retry": 0, "skipped": 0, "generated_tokens": 0}

        for info in self.files:  # the first write of the job: whole records at every file's end
            if info.path == self.target:
                _repair(info)
        out = open_regular(self.target, "output file" if self.target == self.output else "part file", "ab")
        t0 = time.perf_counter()
        bar = tqdm(desc="batch", unit="req", disable=not progress, file=sys.stderr)
        buffer: list[dict] = []

        def write(recs):
            if not recs:
                return
            out.write(b"".join(_encode(r) for r in recs))
            out.flush()
            os.fsync(out.fileno())
            for r in recs:
                kind = done.add(r)
                if "error" in r:
                    counts["errors"] += 1
                    counts["retry"] += kind in ("retry-settings", "retry-always")
                else:
                    counts["answered"] += 1
                    counts["generated_tokens"] += r["stats"]["generated_tokens"]
            bar.update(len(recs))
            recs.clear()
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(img_s=f"{counts['answered'] / dt:.1f}", tok_s=f"{counts['generated_tokens'] / dt:.0f}",
                            errors=counts["errors"])

        def mark(in_flight: list):
            self._write_inflight({"tag": _INFLIGHT_TAG, "settings": fp, "in_flight": in_flight,
                                  "crashes": {k: n for k, n in crashes.items() if not done.is_done(k, fp)}})

        def before_batch(batch: list[Request]):
            write(buffer)  # everything before this batch is on disk before it is marked in flight
            mark([r.id for r in batch])

        def poisoned(items):
            for item in items:
                if isinstance(item, Request) and crashes.get(item.key, 0) >= 2:
                    yield {"id": item.id, "line": item.line, "retry": "other settings", "settings": fp,
                           "error": "the job died twice while answering this request alone (killed for memory by "
                                    "the system, or a crash in native code); not retried with these settings"}
                    continue
                yield item

        answer = _Answerer(engine, self.batch_size, self.max_new_tokens, self.window, fp, generate_kwargs,
                           alone=frozenset(suspects), before_batch=before_batch, after_batch=lambda: write(buffer),
                           scheduler=scheduler, kv_budget_gb=kv_budget_gb, max_rows=max_rows)
        rank, world = self.shard
        counts["skipped"] = sum(_shard_of(k, world) == rank for k in done.answered | done.final |
                                {k for k, fps in done.retry_settings.items() if fp in fps})
        clean = False
        try:
            with out:
                if suspects:  # last run's batch in flight, one request at a time, first
                    for rec in answer(poisoned(self._stream(fp, only=suspects))):
                        buffer.append(rec)
                    write(buffer)  # done before the main pass looks
                for rec in answer(poisoned(self._stream(fp))):
                    buffer.append(rec)
                    if len(buffer) >= self.batch_size:
                        write(buffer)
                write(buffer)
            clean = True
        finally:
            bar.close()
            if clean or not crashes:
                self._remove_inflight()
            else:  # interrupted (Ctrl-C, an error): no batch killed the process, the counts stay
                mark([])
        if self.target == self.output and any(True for _ in _part_files(self.output)):
            merge_parts(self.output)  # leftovers of an interrupted torchrun job
        counts["internal_errors"] = answer.internal_errors
        counts["seconds"] = time.perf_counter() - t0
        return counts

    def _stream(self, fp: str, only: set | None = None) -> Iterator:
        """Requests not answered yet and error records for bad lines and duplicate ids (all lines,
        or with `only`, the first line of each of those ids). Lines without a usable id belong
        to shard 0 and are tracked by line number."""
        rank, world = self.shard
        seen: dict[str, int] = {}
        for n, raw in iter_lines(self.input, "input file", MAX_LINE_BYTES):
            rec, problem = None, None
            if raw is None:
                problem = f"line is longer than {MAX_LINE_BYTES} bytes; a request is one short JSON line"
            else:
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    problem = f"line is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                except json.JSONDecodeError as e:
                    problem = f"bad JSON: {e.msg} (column {e.colno})"
                except ValueError as e:  # Python refuses integers of more than 4300 digits
                    problem = ("bad JSON: an integer of more than 4300 digits" if "digits" in str(e)
                               else f"bad JSON: {_short(e, 200)}")
                except RecursionError:
                    problem = "bad JSON: nested too deeply"
                else:
                    if not isinstance(rec, dict):
                        problem = f"expected a JSON object, got {_json_type(rec)}"
                    else:
                        problem = _id_problem(rec.get("id"))
            if problem is not None:
                if only is None and rank == 0 and n not in self.done.lines:
                    yield {"id": None, "line": n, "error": problem}
                continue
            key = _key(rec["id"])
            if _shard_of(key, world) != rank:
                continue
            if only is not None:
                if key in only and key not in seen and not self.done.is_done(key, fp):
                    seen[key] = n
                    yield self._request(rec, n, key)
                continue
            if key in seen:
                if n not in self.done.lines:
                    yield _duplicate(rec["id"], n, seen[key])
                continue
            seen[key] = n
            if not self.done.is_done(key, fp):
                yield self._request(rec, n, key)

    @staticmethod
    def _request(rec: dict, n: int, key: str):
        try:
            return _to_request(rec, n, key)
        except VtpruneError as e:
            return {"id": rec["id"], "line": n, "error": str(e)}

    def _write_inflight(self, state: dict) -> None:
        tmp = self.inflight + ".tmp"
        with open_regular(tmp, "in-flight file", "ab") as f:
            f.truncate(0)
            f.write(json.dumps(state).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.inflight)

    def _remove_inflight(self) -> None:
        for p in (self.inflight, self.inflight + ".tmp"):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass


def open_job(input_path, output_path, batch_size: int = 16, max_new_tokens: int = 64, shard=(0, 1),
             inputs: dict | None = None, window: int = 8) -> Job:
    """Every check a job can make without a model, before it writes anything: settings, the input,
    the output paths (none may be the input, nor any of `inputs` {what: path}), and existing
    outputs (vtprune records only)."""
    check_settings(batch_size, max_new_tokens, window)
    job = Job(input_path, output_path, batch_size, max_new_tokens, shard, window)
    job._check_input()
    job._check_paths(inputs or {})
    job._scan()
    return job


def run_job(engine, input_path: str, output_path: str, batch_size: int = 16, max_new_tokens: int = 64,
            shard=(0, 1), progress: bool = True, settings: dict | None = None, scheduler: str = "inflight",
            kv_budget_gb: float | None = None, max_rows: int | None = None) -> dict:
    """Answer every not-yet-answered request of input_path into output_path (appending); the
    scheduler options as in answer_requests."""
    job = open_job(input_path, output_path, batch_size, max_new_tokens, shard)
    return job.run(engine, progress=progress, settings=settings, scheduler=scheduler, kv_budget_gb=kv_budget_gb,
                   max_rows=max_rows)
