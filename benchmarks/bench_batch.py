"""Batch job throughput: `vtprune batch` (run_job) against transformers' batched generate on the
same requests, same run.

    python benchmarks/bench_batch.py                 # GPU: LLaVA-1.5-7B architecture, bf16
    python benchmarks/bench_batch.py --tiny          # CPU smoke run

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--per-image", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
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
