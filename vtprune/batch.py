"""Batch inference jobs: JSONL requests in, JSONL answers out, resumable.

    vtprune batch --model DIR --input requests.jsonl --output answers.jsonl
                  [--pruning cfg.yaml] [--batch-size 16] [--max-new-tokens 64]

Input records: {"id": ..., "image": path, "prompt": "... <image> ..."} or {"id", "image", "question"}.
- The input is streamed: a window of batch_size x 8 records is read, grouped by prompt length
  (and image, so questions about one image share its vision-tower pass), and answered batch by
  batch; every answer is written and flushed (fsync) as soon as its batch finishes.
- Resumable: ids already answered in the output are skipped. A job killed at any moment
  (kill -9 included) and re-run ends with every id answered exactly once: a torn last line is
  cut off before appending.
- Bad records (bad JSON, missing fields, missing or corrupt image, duplicate id) become error
  records {"id", "line", "error"} and the job goes on.
- Out of GPU memory: the batch is split in halves and retried; a single request that still does
  not fit gets an error record.
Python API: `answer_requests(engine, requests)` yields results for an iterable of request dicts.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import VtpruneError


@dataclass
class Request:
    id: object
    line: int
    image: object
    prompt: str


def _to_request(record, line: int, format_prompt) -> Request:
    """A valid Request or a VtpruneError naming what is wrong with the record."""
    if not isinstance(record, dict):
        raise VtpruneError(f"expected a JSON object, got {type(record).__name__}")
    if "id" not in record or record["id"] is None:
        raise VtpruneError("missing field 'id'")
    if not isinstance(record["id"], (str, int)):
        raise VtpruneError("field 'id' must be a string or an integer")
    if not record.get("image"):
        raise VtpruneError("missing field 'image'")
    prompt = record.get("prompt")
    if prompt is None:
        q = record.get("question")
        if not isinstance(q, str) or not q.strip():
            raise VtpruneError("missing field 'prompt' or 'question'")
        prompt = format_prompt(q)
    if not isinstance(prompt, str):
        raise VtpruneError("field 'prompt' must be a string")
    return Request(record["id"], line, record["image"], prompt)


def answer_requests(engine, requests: Iterable[dict], batch_size: int = 16, max_new_tokens: int = 64,
                    window: int = 8, **generate_kwargs) -> Iterator[dict]:
    """Yields one output record per request (answers and error records), batch by batch."""
    from .engine.inputs import format_prompt, load_image

    def batches():
        pending: list[Request] = []
        for line, record in enumerate(requests, 1):
            if isinstance(record, dict) and "__line__" in record:  # the job's own line numbers
                record = dict(record)
                line = record.pop("__line__")
            try:
                pending.append(_to_request(record, line, format_prompt))
            except VtpruneError as e:
                yield [], [{"id": record.get("id") if isinstance(record, dict) else None, "line": line,
                            "error": str(e)}]
                continue
            if len(pending) >= batch_size * window:
                yield from _group(pending, batch_size)
                pending = []
        yield from _group(pending, batch_size)

    for batch, errors in batches():
        yield from errors
        if not batch:
            continue
        good, images, cache = [], [], {}
        for r in batch:  # load each image once per batch (one object: the engine encodes it once)
            key = str(r.image)
            try:
                if key not in cache:
                    cache[key] = load_image(r.image, 0)
                images.append(cache[key])
                good.append(r)
            except VtpruneError as e:
                yield {"id": r.id, "line": r.line, "error": str(e).replace("image 0: ", "image: ")}
        if good:
            yield from _generate_split(engine, good, images, max_new_tokens, generate_kwargs)


def _group(pending: list[Request], batch_size: int):
    """Sort a window by (prompt length, image) and cut it into batches."""
    pending = sorted(pending, key=lambda r: (len(r.prompt), str(r.image)))
    for i in range(0, len(pending), batch_size):
        yield pending[i: i + batch_size], []


def _generate_split(engine, reqs, images, max_new_tokens, kwargs):
    import torch

    try:
        results = engine.generate(images, [r.prompt for r in reqs], max_new_tokens=max_new_tokens, **kwargs)
    except torch.cuda.OutOfMemoryError:
        engine.release_cache()
        if len(reqs) == 1:
            yield {"id": reqs[0].id, "line": reqs[0].line, "error": "out of GPU memory even alone"}
            return
        half = len(reqs) // 2
        yield from _generate_split(engine, reqs[:half], images[:half], max_new_tokens, kwargs)
        yield from _generate_split(engine, reqs[half:], images[half:], max_new_tokens, kwargs)
        return
    except VtpruneError as e:  # a prompt problem (no <image>, too long): report each request
        if len(reqs) == 1:
            yield {"id": reqs[0].id, "line": reqs[0].line, "error": str(e).replace("prompt 0", "prompt")}
            return
        for r, im in zip(reqs, images):
            yield from _generate_split(engine, [r], [im], max_new_tokens, kwargs)
        return
    for r, res in zip(reqs, results):
        yield {"id": r.id, "text": res.text, "token_ids": res.token_ids, "stats": res.stats}


# ----------------------------------------------------------------------------- the job
def read_done(output: str) -> tuple[set, set]:
    """Ids answered (or failed for good) in an existing output, and error lines already reported.
    Cuts a torn last line (the job was killed mid-write) so that appending stays valid JSONL."""
    done, reported = set(), set()
    if not os.path.exists(output):
        return done, reported
    with open(output, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
            data = data[:cut]
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if "error" in rec:
            reported.add(rec.get("line"))
            if rec.get("duplicate") or not isinstance(rec.get("id"), (str, int)):
                continue
        if isinstance(rec.get("id"), (str, int)):
            done.add(_key(rec["id"]))
    return done, reported


def _key(i):
    return json.dumps(i)


def _shard_of(record_id, world: int) -> int:
    """Requests are sharded by id (a stable hash), so duplicates meet in one shard."""
    import zlib

    return zlib.crc32(_key(record_id).encode()) % world


def _stream_input(path: str, done: set, reported: set, shard=(0, 1)):
    """Records not answered yet, as dicts, plus error records for bad lines and duplicate ids.
    Records without a usable id (and bad JSON) belong to shard 0 and are tracked by line."""
    seen = set(done)
    rank, world = shard
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                if rank == 0 and line_no not in reported:
                    yield {"__error__": {"id": None, "line": line_no, "error": f"bad JSON: {e.msg}"}}
                continue
            rid = rec.get("id") if isinstance(rec, dict) else None
            if not isinstance(rid, (str, int)):
                if rank == 0 and line_no not in reported:
                    yield {"__line__": line_no, **(rec if isinstance(rec, dict) else {"value": rec})}
                continue
            if _shard_of(rid, world) != rank:
                continue
            key = _key(rid)
            if key in done:
                continue
            if key in seen:
                if line_no not in reported:
                    yield {"__error__": {"id": rid, "line": line_no, "duplicate": True,
                                         "error": f"duplicate id {rid!r} (answered once, at its first line)"}}
                continue
            seen.add(key)
            yield {"__line__": line_no, **rec}


def run_job(engine, input_path: str, output_path: str, batch_size: int = 16, max_new_tokens: int = 64,
            shard=(0, 1), progress: bool = True) -> dict:
    """Answer every not-yet-answered request of input_path into output_path (appending)."""
    from tqdm import tqdm

    if not os.path.isfile(input_path):
        raise VtpruneError(f"input file not found: {input_path}")
    if batch_size < 1 or max_new_tokens < 1:
        raise VtpruneError("--batch-size and --max-new-tokens must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(out_dir):
        raise VtpruneError(f"output directory does not exist: {out_dir}")
    done, reported = read_done(output_path)
    records = _stream_input(input_path, done, reported, shard)
    pre_errors: list[dict] = []

    def requests():
        for rec in records:
            if "__error__" in rec:
                pre_errors.append(rec["__error__"])
                continue
            yield rec

    counts = {"answered": 0, "errors": 0, "skipped": len(done), "generated_tokens": 0}
    t0 = time.perf_counter()
    bar = tqdm(desc="batch", unit="req", disable=not progress, file=sys.stderr)
    with open(output_path, "a", encoding="utf-8") as out:
        def write(recs):
            for r in recs:
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
                if "error" in r:
                    counts["errors"] += 1
                else:
                    counts["answered"] += 1
                    counts["generated_tokens"] += r["stats"]["generated_tokens"]
            out.flush()
            os.fsync(out.fileno())
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(len(recs))
            bar.set_postfix(img_s=f"{counts['answered'] / dt:.1f}", tok_s=f"{counts['generated_tokens'] / dt:.0f}",
                            errors=counts["errors"])

        buffer = []
        for rec in answer_requests(engine, requests(), batch_size, max_new_tokens):
            if pre_errors:
                write(pre_errors)
                pre_errors.clear()
            buffer.append(rec)
            if len(buffer) >= batch_size:
                write(buffer)
                buffer = []
        write(buffer + pre_errors)
    bar.close()
    counts["seconds"] = time.perf_counter() - t0
    return counts


def main(argv=None) -> int:
    """`python -m vtprune.batch ...` (also under torchrun) and `vtprune batch ...`."""
    from .cli import main as cli_main

    return cli_main(["batch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
