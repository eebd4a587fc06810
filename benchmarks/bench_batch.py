"""Batch job throughput: `vtprune batch` (run_job) against transformers' batched generate on the
same requests, same run; or (--schedulers) static against in-flight batching, unpruned against
two-stage, at one KV memory budget, on a mixed SynthVQA job (questions and captions).

    python benchmarks/bench_batch.py                 # GPU: LLaVA-1.5-7B architecture, bf16
    python benchmarks/bench_batch.py --tiny          # CPU smoke run
    python -m vtprune.quality.synthvqa --out /tmp/sv --seed 5 --train 0 --val 0 --test 40
    python benchmarks/bench_batch.py --schedulers --data /tmp/sv/test.jsonl    # embedded model, CPU
    python benchmarks/bench_batch.py --synthetic     # GPU: 7B architecture, SynthVQA answer lengths
    python benchmarks/bench_batch.py --synthetic --tiny --requests 12 --repeats 1   # CPU smoke run

--schedulers: the embedded SynthVQA model (or --model), unpruned and with its two-stage config
(--pruning), each answered by `run_job` with --scheduler static and inflight. The budget
(--kv-budget-gb; default: --budget-rows unpruned rows) decides the rows of both: static batches of
as many requests as it holds rows of kv_cache.row_bytes (the longest prompt, max_new_tokens), the
in-flight scheduler as many decode rows. Medians of --repeats runs (the four systems interleaved,
so that a slow spell of a shared machine hits all); the in-flight runs' rows in flight per decode
step go to the JSON and a PNG.

Requests: --requests questions, --per-image of them about each generated image, prompts of
different lengths. Both systems get the same token ids and pixels and generate exactly
--new-tokens tokens per request (EOS disabled; random weights). Reported: requests (images)/s
and generated tokens/s over the whole job, wall clock including image loading and writing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from results_io import RESULTS_DIR, device_name, today, write_results  # noqa: E402

from vtprune import LlavaEngine  # noqa: E402
from vtprune.batch import run_job  # noqa: E402
from vtprune.demo import demo_image  # noqa: E402

QUESTIONS = ["What is in the image?", "How many objects are there?", "What colour is the largest shape?",
             "Describe the image in one sentence, mentioning every object you can see and where it is."]


def make_requests(tmp: str, n: int, per_image: int) -> str:
    import json

    path = os.path.join(tmp, "requests.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            img = os.path.join(tmp, f"img{i // per_image}.png")
            if not os.path.exists(img):
                demo_image(i // per_image).save(img)
            f.write(json.dumps({"id": i, "image": img, "question": QUESTIONS[i % len(QUESTIONS)]}) + "\n")
    return path


def bench_vtprune(engine, req_path, tmp, args) -> dict:
    out = os.path.join(tmp, "answers.jsonl")
    if os.path.exists(out):
        os.remove(out)
    t = time.perf_counter()
    counts = run_job(engine, req_path, out, batch_size=args.batch_size, max_new_tokens=args.new_tokens, progress=False)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"system": "vtprune batch", "requests": counts["answered"], "seconds": dt,
            "requests_per_s": counts["answered"] / dt, "generated_tok_per_s": counts["generated_tokens"] / dt}


def bench_transformers(engine, config, req_path, args) -> dict:
    import json

    from transformers import LlavaForConditionalGeneration

    from vtprune.engine.inputs import format_prompt, load_image

    torch.manual_seed(0)
    with torch.device(engine.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=engine.dtype, attn_implementation="sdpa")
    model.eval()
    reqs = [json.loads(line) for line in open(req_path)]
    t = time.perf_counter()
    n_tok = 0
    for i in range(0, len(reqs), args.batch_size):
        chunk = reqs[i: i + args.batch_size]
        ids = [engine.prompts.encode(format_prompt(r["question"])) for r in chunk]
        T = max(map(len, ids))
        input_ids = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for j, row in enumerate(ids):  # left padding, as transformers' batched generate expects
            input_ids[j, T - len(row):] = torch.tensor(row)
            mask[j, T - len(row):] = 1
        pixels = engine.image_processor(images=[load_image(r["image"]) for r in chunk],
                                        return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(engine.device), attention_mask=mask.to(engine.device),
                                 pixel_values=pixels.to(engine.device, engine.dtype), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        n_tok += (out.shape[1] - T) * len(chunk)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del model
    return {"system": "transformers generate (sdpa)", "requests": len(reqs), "seconds": dt,
            "requests_per_s": len(reqs) / dt, "generated_tok_per_s": n_tok / dt}


def markdown(result) -> str:
    lines = [f"# Batch job throughput, {result['device_name']} ({result['date']})", "",
             f"torch {result['torch']}; {result['requests']} requests, {result['per_image']} per image, batch size "
             f"{result['batch_size']}, {result['new_tokens']} new tokens each; config {result['config']}.", "",
             "| system | seconds | requests/s | generated tok/s |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['system']} | {r['seconds']:.2f} | {r['requests_per_s']:.2f} | "
                     f"{r['generated_tok_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def scheduler_requests(data: str, tmp: str) -> tuple[str, int]:
    """The SynthVQA split's records as batch requests (absolute image paths); (path, count)."""
    import json

    base = os.path.dirname(os.path.abspath(data))
    path = os.path.join(tmp, "requests.jsonl")
    n = 0
    with open(data) as f, open(path, "w") as out:
        for line in f:
            r = json.loads(line)
            out.write(json.dumps({"id": r["id"], "image": os.path.join(base, r["image"]),
                                  "question": r["question"]}) + "\n")
            n += 1
    return path, n


def run_scheduler(engine, req: str, tmp: str, scheduler: str, rows: int, args, timelines: list) -> dict:
    from vtprune.engine import scheduler as sched_mod

    out = os.path.join(tmp, "answers.jsonl")
    if os.path.exists(out):
        os.remove(out)
    made = []
    init = sched_mod.InflightScheduler.__init__

    def keep(self, *a, **kw):  # the benchmark reads the scheduler's rows-in-flight log afterwards
        init(self, *a, **kw)
        made.append(self)
    sched_mod.InflightScheduler.__init__ = keep
    try:
        t = time.perf_counter()
        if scheduler == "static":
            counts = run_job(engine, req, out, batch_size=rows, max_new_tokens=args.new_tokens, progress=False,
                             scheduler="static")
        else:
            counts = run_job(engine, req, out, batch_size=args.prefill_batch, max_new_tokens=args.new_tokens,
                             progress=False, scheduler="inflight", kv_budget_gb=args.kv_budget_gb, max_rows=rows)
        dt = time.perf_counter() - t
    finally:
        sched_mod.InflightScheduler.__init__ = init
    if made:
        log = made[0].rows_in_flight
        timelines.append([(round(ts - t, 4), n) for ts, n in log])
    return {"seconds": dt, "answered": counts["answered"], "generated_tokens": counts["generated_tokens"],
            "requests_per_s": counts["answered"] / dt, "generated_tok_per_s": counts["generated_tokens"] / dt,
            "decode_steps": len(made[0].rows_in_flight) if made else None}


def bench_schedulers(args) -> dict:
    import json
    import statistics

    from vtprune.demo import default_model_dir, default_pruning
    from vtprune.engine.kv_cache import row_bytes
    from vtprune.engine.scheduler import rows_for_budget

    model = args.model or default_model_dir()
    pruning = args.pruning or default_pruning()
    engine = LlavaEngine.from_pretrained(model, device="cpu", dtype=torch.float32)
    configs = [("unpruned", None), ("two-stage", pruning)]
    with tempfile.TemporaryDirectory() as tmp:
        req, n_req = scheduler_requests(args.data, tmp)
        questions = [json.loads(line)["question"] for line in open(req)]
        from vtprune.engine.inputs import format_prompt

        longest = max(len(engine.prompts.encode(format_prompt(q))) for q in questions)
        per_row = {}
        for name, cfg in configs:
            engine.set_pruning(cfg)
            T = longest - engine.cfg.num_visual_tokens + engine.prompts.num_visual_tokens
            per_row[name] = row_bytes(engine.plan, T, args.new_tokens, engine.cfg.text, engine.dtype, rounded=True)
        if args.kv_budget_gb is None:
            args.kv_budget_gb = args.budget_rows * per_row["unpruned"] / (1 << 30)
        budget = int(args.kv_budget_gb * (1 << 30))
        rows = {name: rows_for_budget(budget, per_row[name], args.max_rows) for name, _ in configs}
        runs: dict = {}
        timelines: dict = {}
        systems = [(name, cfg, s) for name, cfg in configs for s in ("static", "inflight")]
        for name, cfg, s in systems:  # warm-up: the compiled ops, the allocator, the page cache
            engine.set_pruning(cfg)
            run_scheduler(engine, req, tmp, s, rows[name], argparse.Namespace(**{**vars(args), "new_tokens": 4}), [])
        for rep in range(args.repeats):
            for name, cfg, s in systems:
                engine.set_pruning(cfg)
                r = run_scheduler(engine, req, tmp, s, rows[name], args, timelines.setdefault(f"{name} {s}", []))
                runs.setdefault(f"{name} {s}", []).append(r)
                print(f"  run {rep + 1}/{args.repeats} {name:>9} {s:>8}: {r['requests_per_s']:6.2f} req/s "
                      f"{r['generated_tok_per_s']:7.1f} tok/s ({r['seconds']:.1f} s)", flush=True)
    table = []
    for name, _ in configs:
        for s in ("static", "inflight"):
            rs = runs[f"{name} {s}"]
            table.append({"pruning": name, "scheduler": s, "rows": rows[name],
                          "kv_row_bytes": per_row[name], "requests": rs[0]["answered"],
                          "generated_tokens": rs[0]["generated_tokens"],
                          "seconds_median": statistics.median(r["seconds"] for r in rs),
                          "requests_per_s_median": statistics.median(r["requests_per_s"] for r in rs),
                          "generated_tok_per_s_median": statistics.median(r["generated_tok_per_s"] for r in rs),
                          "decode_steps": rs[0]["decode_steps"], "runs": rs})
    for r in table:  # the first measured run's log: how full the in-flight rows were, on average
        log = timelines.get(f"{r['pruning']} {r['scheduler']}")
        r["mean_rows_in_flight"] = (sum(n for _, n in log[0]) / len(log[0])) if log and log[0] else None
    by = {(r["pruning"], r["scheduler"]): r for r in table}

    def ratio(a, b, key="generated_tok_per_s_median"):
        return by[a][key] / by[b][key]
    ratios = {
        "inflight/static unpruned, tok/s": ratio(("unpruned", "inflight"), ("unpruned", "static")),
        "inflight/static two-stage, tok/s": ratio(("two-stage", "inflight"), ("two-stage", "static")),
        "two-stage/unpruned static, tok/s": ratio(("two-stage", "static"), ("unpruned", "static")),
        "two-stage/unpruned inflight, tok/s": ratio(("two-stage", "inflight"), ("unpruned", "inflight")),
        "two-stage inflight / unpruned static, tok/s": ratio(("two-stage", "inflight"), ("unpruned", "static")),
        "two-stage inflight / unpruned static, req/s": ratio(("two-stage", "inflight"), ("unpruned", "static"),
                                                             "requests_per_s_median"),
    }
    result = {"benchmark": "batch_schedulers", "date": today(), "device_name": device_name(torch.device("cpu")),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": os.path.basename(model.rstrip("/")),
              "pruning": pruning, "data": os.path.abspath(args.data), "requests": n_req,
              "new_tokens": args.new_tokens, "prefill_batch": args.prefill_batch, "kv_budget_gb": args.kv_budget_gb,
              "repeats": args.repeats, "rows": table, "ratios": ratios,
              "rows_in_flight": {k: v for k, v in timelines.items() if v and v[0]}}
    stem = write_results(args.out, "batch_schedulers", args.tag, result, scheduler_markdown(result))
    plot_rows(result, stem + ".png")
    return result


def scheduler_markdown(result) -> str:
    lines = [f"# Static vs in-flight batching, {result['device_name']} ({result['date']})", "",
             f"torch {result['torch']}, {result['threads']} threads; model {result['model']}; {result['requests']} "
             f"SynthVQA requests (questions + captions), max {result['new_tokens']} new tokens, greedy; KV budget "
             f"{result['kv_budget_gb'] * 1024:.1f} MiB for every system; prefill batches of "
             f"{result['prefill_batch']} (in-flight); medians of {result['repeats']} runs.", "",
             "| pruning | scheduler | rows | KV bytes/row | seconds | requests/s | generated tok/s | decode steps "
             "| mean rows in flight |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['pruning']} | {r['scheduler']} | {r['rows']} | {r['kv_row_bytes'] / 1e6:.2f} MB | "
                     f"{r['seconds_median']:.2f} | {r['requests_per_s_median']:.2f} | "
                     f"{r['generated_tok_per_s_median']:.1f} | {r['decode_steps'] or ''} | "
                     f"{'' if r.get('mean_rows_in_flight') is None else format(r['mean_rows_in_flight'], '.1f')} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def plot_rows(result, path) -> str:
    """Rows in flight per decode step against time (the first measured run of each in-flight
    system), drawn with Pillow (vtprune.quality.plot: no plotting library needed)."""
    from vtprune.quality.plot import line_chart

    series = {}
    for name, runs in result["rows_in_flight"].items():
        rows = next(r["rows"] for r in result["rows"] if name.startswith(r["pruning"]))
        series[f"{name} ({rows} rows)"] = [(t, n) for t, n in runs[0]]
    line_chart(series, path, f"In-flight rows, one KV budget ({result['device_name']}, {result['date']})",
               "seconds into the job", "rows in flight")
    print(f"wrote {path}")
    return path


# ----------------------------------------------------------------------------- --synthetic
def synthvqa_answer_lengths(seed: int = 5, images: int = 40) -> list[int]:
    """Generated tokens (answer + EOS) of every record of a fresh SynthVQA split, as the embedded
    model's tokenizer counts them: the mix of one-word answers and ~25-token captions."""
    import json

    from transformers import AutoTokenizer

    from vtprune.demo import default_model_dir
    from vtprune.engine.runtime import quiet_transformers
    from vtprune.quality.synthvqa import write_split

    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        data = write_split(tmp, "test", images, seed=seed, progress=False)
        tok = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True, trust_remote_code=False)
        return [len(tok(" " + json.loads(line)["answer"], add_special_tokens=False)["input_ids"]) + 1
                for line in open(data)]


def run_synthetic(engine, images, prompts, lengths, scheduler: str, rows: int, args) -> dict:
    """One job: static batches of `rows` requests (each batch decodes until its longest answer,
    as static batching does; EOS is disabled, so lengths are the requests' own caps) or the
    in-flight scheduler with `rows` decode rows and one cap per request."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    if scheduler == "static":
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as batch jobs sort
        for k in range(0, len(order), rows):
            idx = order[k:k + rows]
            engine.generate([images[i] for i in idx], [prompts[i] for i in idx],
                            max_new_tokens=max(lengths[i] for i in idx))
        steps = None
    else:
        from vtprune.engine import scheduler as sched_mod

        made = []
        init = sched_mod.InflightScheduler.__init__

        def keep(self, *a, **kw):
            init(self, *a, **kw)
            made.append(self)
        sched_mod.InflightScheduler.__init__ = keep
        try:
            engine.generate_inflight(images, prompts, max_new_tokens=list(lengths), prefill_batch=args.prefill_batch,
                                     max_rows=rows, kv_budget_gb=args.kv_budget_gb)
        finally:
            sched_mod.InflightScheduler.__init__ = init
        steps = len(made[0].rows_in_flight)
    sync()
    dt = time.perf_counter() - t
    return {"seconds": dt, "requests_per_s": len(prompts) / dt, "generated_tok_per_s": sum(lengths) / dt,
            "decode_steps": steps}


def bench_synthetic(args) -> dict:
    """Static vs in-flight, unpruned vs the design's two-stage schedule (random heads), at one KV
    budget, on the LLaVA-1.5-7B architecture with random weights (--tiny: the tiny one on CPU);
    answer lengths drawn from the SynthVQA mix."""
    import random
    import statistics
    import warnings

    from vtprune.engine.kv_cache import row_bytes
    from vtprune.engine.scheduler import rows_for_budget

    from bench_e2e import pruning_config

    if args.tiny:
        from vtprune.tiny_model import tiny_llava_config
        config, device, dtype = tiny_llava_config(), torch.device("cpu"), torch.float32
    else:
        from vtprune.model_configs import llava_1_5_7b_config
        config = llava_1_5_7b_config()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random pruning heads: speed does not depend on their values
        engine = LlavaEngine.from_config(config, device=device, dtype=dtype, seed=0)
    engine.eos_token_ids = ()  # random weights: every request generates exactly its own length
    mix = synthvqa_answer_lengths()
    rng = random.Random(0)
    n = args.requests or (512 if device.type == "cuda" else 24)
    lengths = [rng.choice(mix) for _ in range(n)]
    images = [demo_image(i // args.per_image) for i in range(n)]
    from vtprune.engine.inputs import format_prompt
    prompts = [format_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    configs = [("unpruned", None), ("two-stage", pruning_config("two_stage", engine.cfg, 0))]
    longest = max(len(engine.prompts.encode(p)) for p in prompts)
    per_row, rows = {}, {}
    for name, cfg in configs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine.set_pruning(cfg)
        T = longest - engine.cfg.num_visual_tokens + engine.prompts.num_visual_tokens
        per_row[name] = row_bytes(engine.plan, T, max(lengths), engine.cfg.text, engine.dtype, rounded=True)
    if args.kv_budget_gb is None:
        args.kv_budget_gb = args.budget_rows * per_row["unpruned"] / (1 << 30)
    budget = int(args.kv_budget_gb * (1 << 30))
    for name, _ in configs:
        rows[name] = rows_for_budget(budget, per_row[name], args.max_rows)
    systems = [(name, cfg, s) for name, cfg in configs for s in ("static", "inflight")]
    runs: dict = {}
    for rep in range(args.repeats + 1):  # the first round warms up (graphs, allocator)
        for name, cfg, s in systems:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine.set_pruning(cfg)
            k = 4 if rep == 0 else n
            r = run_synthetic(engine, images[:k], prompts[:k], lengths[:k], s, rows[name], args)
            if rep:
                runs.setdefault((name, s), []).append(r)
                print(f"  run {rep}/{args.repeats} {name:>9} {s:>8}: {r['requests_per_s']:7.2f} req/s "
                      f"{r['generated_tok_per_s']:8.1f} tok/s ({r['seconds']:.1f} s)", flush=True)
    table = [{"pruning": name, "scheduler": s, "rows": rows[name], "kv_row_bytes": per_row[name], "requests": n,
              "generated_tokens": sum(lengths), "decode_steps": runs[name, s][0]["decode_steps"],
              "seconds_median": statistics.median(r["seconds"] for r in runs[name, s]),
              "requests_per_s_median": statistics.median(r["requests_per_s"] for r in runs[name, s]),
              "generated_tok_per_s_median": statistics.median(r["generated_tok_per_s"] for r in runs[name, s]),
              "runs": runs[name, s]} for name, _, s in systems]
    by = {(r["pruning"], r["scheduler"]): r["generated_tok_per_s_median"] for r in table}
    ratios = {"inflight/static unpruned, tok/s": by["unpruned", "inflight"] / by["unpruned", "static"],
              "inflight/static two-stage, tok/s": by["two-stage", "inflight"] / by["two-stage", "static"],
              "two-stage inflight / unpruned static, tok/s": by["two-stage", "inflight"] / by["unpruned", "static"]}
    result = {"benchmark": "batch_schedulers_synthetic", "date": today(), "device_name": device_name(device),
              "torch": torch.__version__, "config": "tiny" if args.tiny else "llava-1.5-7b", "dtype": str(dtype),
              "requests": n, "answer_lengths": {"mean": sum(lengths) / n, "max": max(lengths)},
              "prefill_batch": args.prefill_batch, "kv_budget_gb": args.kv_budget_gb, "repeats": args.repeats,
              "rows": table, "ratios": ratios}
    lines = [f"# Static vs in-flight batching, {result['config']} (random weights), {result['device_name']} "
             f"({result['date']})", "", f"{n} requests, answer lengths from the SynthVQA mix (mean "
             f"{sum(lengths) / n:.1f}, max {max(lengths)} tokens), KV budget {args.kv_budget_gb * 1024:.1f} MiB, "
             f"medians of {args.repeats} runs.", "",
             "| pruning | scheduler | rows | seconds | requests/s | generated tok/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['pruning']} | {r['scheduler']} | {r['rows']} | {r['seconds_median']:.2f} | "
              f"{r['requests_per_s_median']:.2f} | {r['generated_tok_per_s_median']:.1f} |" for r in table]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    write_results(args.out, "batch_schedulers_synthetic", args.tag, result, "\n".join(lines) + "\n")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--schedulers", action="store_true", help="static vs in-flight, unpruned vs two-stage (CPU)")
    p.add_argument("--synthetic", action="store_true",
                   help="static vs in-flight on the 7B architecture with random weights (GPU; --tiny: CPU), "
                        "answer lengths from the SynthVQA mix")
    p.add_argument("--data", default=None, help="--schedulers: a SynthVQA split's JSONL")
    p.add_argument("--model", default=None, help="--schedulers: model directory (default: the embedded one)")
    p.add_argument("--pruning", default=None, help="--schedulers: two-stage YAML (default: the embedded one)")
    p.add_argument("--kv-budget-gb", type=float, default=None)
    p.add_argument("--budget-rows", type=int, default=8, help="--schedulers without --kv-budget-gb: the budget "
                                                              "is this many unpruned rows")
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--per-image", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.synthetic:
        return bench_synthetic(args)
    if args.schedulers:
        if not args.data:
            p.error("--schedulers needs --data (a SynthVQA split: python -m vtprune.quality.synthvqa ...)")
        args.new_tokens = args.new_tokens or 32
        return bench_schedulers(args)
    if args.tiny:
        from vtprune.tiny_model import tiny_llava_config
        config, device, dtype = tiny_llava_config(), torch.device("cpu"), torch.float32
        defaults = (8, 4, 4)
    else:
        from vtprune.model_configs import llava_1_5_7b_config
        config = llava_1_5_7b_config()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        defaults = (256, 64, 64)
    args.requests = args.requests or defaults[0]
    args.batch_size = args.batch_size or defaults[1]
    args.new_tokens = args.new_tokens or defaults[2]
    engine = LlavaEngine.from_config(config, device=device, dtype=dtype, seed=0)
    engine.eos_token_ids = ()
    with tempfile.TemporaryDirectory() as tmp:
        req = make_requests(tmp, args.requests, args.per_image)
        bench_vtprune(engine, req, tmp, args)  # warm-up: graphs, allocator
        rows = [bench_vtprune(engine, req, tmp, args)]
        rows.append(bench_transformers(engine, config, req, args))
    for r in rows:
        print(f"{r['system']:>30}: {r['requests_per_s']:8.2f} req/s {r['generated_tok_per_s']:9.1f} tok/s")
    result = {"benchmark": "batch", "date": today(), "device_name": device_name(device), "torch": torch.__version__,
              "config": "tiny" if args.tiny else "llava-1.5-7b", "requests": args.requests,
              "per_image": args.per_image, "batch_size": args.batch_size, "new_tokens": args.new_tokens, "rows": rows}
    write_results(args.out, "batch", args.tag, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
