"""End-to-end generation speed: the vtprune engine against transformers' LLaVA, same run.

    python benchmarks/bench_e2e.py                      # GPU: LLaVA-1.5-7B architecture, bf16, B=1,16,64
    python benchmarks/bench_e2e.py --hf-compile         # add transformers static cache + torch.compile
    python benchmarks/bench_e2e.py --tiny               # CPU smoke run on a toy config (what CI runs)

Random weights of the exact architecture (speed does not depend on weight values). Prompt:
576 visual + 45 text tokens per row, all rows alike; EOS is disabled so every row generates
--new-tokens tokens. Per system and batch size:
  ttft       median wall time of a 1-token generation (vision tower + prefill + first token)
  decode     (median time of a --new-tokens generation - ttft) / (new_tokens - 1), per step
  tok/s      batch * new_tokens / median time of the full generation
  peak GB    torch.cuda.max_memory_allocated during that batch size
  % of floor the hardware floor of that step (benchmarks/hardware.py: bytes of weights + KV read /
             copy bandwidth, or FLOPs / matmul peak, the larger) / the measured time, on a card
             hardware.py knows (H200), or the one --floor-card names
Writes a JSON file and a markdown table (into benchmarks/results/ by default).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hardware  # noqa: E402
from results_io import RESULTS_DIR, device_name, today, write_results  # noqa: E402

from vtprune import LlavaEngine  # noqa: E402
from vtprune.engine.config import LlavaModelConfig  # noqa: E402
from vtprune.engine.inputs import PreparedBatch  # noqa: E402


def make_inputs(cfg: LlavaModelConfig, batch: int, text_tokens: int, device, dtype, seed=0, n_vis=None):
    """[B, text + visual] ids (BOS, 5 text ids, the image tokens, the remaining text ids) and pixels.
    `n_vis`: image tokens in the prompt (fewer when a policy merges/prunes before the decoder)."""
    g = torch.Generator().manual_seed(seed)
    n_vis = n_vis or cfg.num_visual_tokens
    vocab_hi = min(cfg.text.vocab_size, cfg.image_token_index)
    text = torch.randint(100, vocab_hi, (text_tokens,), generator=g)
    text[0] = 1  # BOS
    ids = torch.cat([text[:6], torch.full((n_vis,), cfg.image_token_index), text[6:]])
    ids = ids.expand(batch, -1).contiguous()
    s = cfg.vision.image_size
    pixels = torch.randn(batch, 3, s, s, generator=g)
    return ids.to(device), pixels.to(device, dtype)


def timed(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def floors(cfg, args, batch: int, dtype, vis_per_layer=None, n_vis=None) -> dict:
    """The step's floors on args.card (None: no card known): decode with the KV cache holding each
    layer's prompt tokens plus, on average, half the generated ones; the prefill of the prompt."""
    if args.card is None:
        return {}
    L = cfg.text.num_layers
    vis = vis_per_layer or [cfg.num_visual_tokens] * L
    nbytes = torch.empty(0, dtype=dtype).element_size()
    kv = [args.text_tokens + v + (args.new_tokens - 1) / 2 for v in vis]
    dec = hardware.decode_floor_s(cfg, batch, kv, args.card, nbytes)
    pre = hardware.prefill_floor_s(cfg, batch, [args.text_tokens + v for v in vis], n_vis or cfg.num_visual_tokens,
                                   args.card, nbytes)
    return {"decode_floor_ms": dec["floor_s"] * 1e3, "ttft_floor_ms": pre["floor_s"] * 1e3,
            "floor_card": args.card.name}


def bench_system(name, run, cfg, args, device, dtype, n_vis=None, extra=None, vis_per_layer=None) -> list[dict]:
    """`run(ids, pixels, n)` generates n tokens for the batch."""
    rows = []
    for b in args.batch_sizes:
        ids, pixels = make_inputs(cfg, b, args.text_tokens, device, dtype, n_vis=n_vis)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            run(ids, pixels, args.new_tokens)  # warm-up: graphs, allocator, autotuning
            run(ids, pixels, 1)
            ttft = timed(lambda: run(ids, pixels, 1), args.repeats, device)
            full = timed(lambda: run(ids, pixels, args.new_tokens), args.repeats, device)
        except torch.cuda.OutOfMemoryError:
            rows.append({"system": name, "batch": b, "error": "out of memory"})
            print(f"{name:>24} B={b:<3} out of memory", flush=True)
            continue
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        step = (full - ttft) / max(args.new_tokens - 1, 1)
        row = {"system": name, "batch": b, "prompt_tokens": ids.shape[1], **(extra or {}), "new_tokens": args.new_tokens,
               "ttft_ms": ttft * 1e3, "decode_ms_per_step": step * 1e3,
               "generated_tok_per_s": b * args.new_tokens / full, "total_s": full, "peak_gb": peak}
        fl = floors(cfg, args, b, dtype, vis_per_layer, n_vis)
        if fl:
            row.update(fl, decode_pct_of_floor=100 * fl["decode_floor_ms"] / row["decode_ms_per_step"],
                       ttft_pct_of_floor=100 * fl["ttft_floor_ms"] / row["ttft_ms"])
        rows.append(row)
        print(f"{name:>24} B={b:<3} ttft {row['ttft_ms']:8.1f} ms  decode {row['decode_ms_per_step']:7.2f} ms/step  "
              f"{row['generated_tok_per_s']:8.1f} tok/s  peak {peak:6.1f} GB", flush=True)
        if fl:
            print(f"{'':>24} decode B={b}: {row['decode_ms_per_step']:.3g} ms = {row['decode_pct_of_floor']:.3g}% of "
                  f"floor ({fl['decode_floor_ms']:.3g} ms); TTFT {row['ttft_ms']:.3g} ms = "
                  f"{row['ttft_pct_of_floor']:.3g}% of floor ({fl['ttft_floor_ms']:.3g} ms) on {fl['floor_card']}",
                  flush=True)
    return rows


def pruning_config(name: str, cfg: LlavaModelConfig, budget: float):
    """'two_stage': the design's defaults (configs/vision_token_pruning.yaml, scaled to toy models);
    a baseline: that policy at the two-stage schedule's average visual tokens per layer."""
    from vtprune.pruning import PruningConfig

    n, L = cfg.num_visual_tokens, cfg.text.num_layers
    if name == "two_stage":
        return PruningConfig.scaled_for(n, L, pruner_d_internal=min(512, cfg.text.hidden_size))
    return PruningConfig(policy=name, budget=max(1, round(budget)))


def run_vtprune(config, args, device, dtype, use_graph=True, policy=None, compile_=False):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random pruning heads: speed does not depend on their values
        engine = LlavaEngine.from_config(config, device=device, dtype=dtype, seed=0)
        extra = {}
        if policy is not None:
            two_stage = pruning_config("two_stage", engine.cfg, 0)
            engine.set_pruning(two_stage)
            budget = sum(engine.plan.visual_tokens_per_layer()) / engine.cfg.text.num_layers
            if policy != "two_stage":
                engine.set_pruning(pruning_config(policy, engine.cfg, budget))
            extra = {"avg_visual_tokens_per_layer": sum(engine.plan.visual_tokens_per_layer())
                     / engine.cfg.text.num_layers}
    vis_per_layer = engine.plan.visual_tokens_per_layer() if policy is not None else None
    engine.eos_token_ids = ()  # generate exactly n tokens, like min_new_tokens on the reference
    engine.compile_decode = compile_

    state = {"graph": use_graph}

    def run(ids, pixels, n):
        lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=device)
        engine.generate_prepared(PreparedBatch(ids, lengths, pixels), n, use_cuda_graph=state["graph"])
    name = ("vtprune (torch.compile)" if compile_ else "vtprune" if use_graph else "vtprune (no CUDA graph)") + (
        f" {policy}" if policy else "")
    bench = (lambda label: bench_system(label, run, engine.cfg, args, device, dtype,
                                        n_vis=engine.prompts.num_visual_tokens, extra=extra,
                                        vis_per_layer=vis_per_layer))
    try:
        rows = bench(name)
    except Exception as e:  # noqa: BLE001 - a failed capture / compile is a result: time eager instead
        if not (compile_ or (use_graph and device.type == "cuda")):
            raise
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        note = (f"{'torch.compile' if compile_ else 'CUDA graph capture'} failed ({type(e).__name__}: "
                f"{lines[-1][:200] if lines else ''}); timed eager decoding instead")
        print(f"{name:>24} FALLBACK: {note}", flush=True)
        engine.compile_decode, state["graph"] = False, False
        engine.release_cache()
        rows = bench(f"{name} [eager fallback]")
        for r in rows:
            r["fallback"] = note
    del engine
    return rows


def run_transformers(config, args, device, dtype, compile_=False):
    from transformers import LlavaForConditionalGeneration

    cfg = LlavaModelConfig.from_any(config)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    extra = {"cache_implementation": "static"} if compile_ else {}

    def run(ids, pixels, n):
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
    name = "transformers" + (" static+compile" if compile_ else " (sdpa)")
    rows = bench_system(name, run, cfg, args, device, dtype)
    del model
    return rows


def markdown(result: dict) -> str:
    lines = [f"# End-to-end generation, {result['device_name']} ({result['date']})", "",
             f"torch {result['torch']}, transformers {result['transformers']}, dtype {result['dtype']}, "
             f"config {result['config']}, {result['new_tokens']} new tokens, median of {result['repeats']}.", "",
             "| system | batch | prompt tokens | avg visual tokens / layer | TTFT ms | decode ms/step | "
             "generated tok/s | peak GB | decode % of floor | TTFT % of floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['batch']} | – | – | {r['error']} | | | | | |")
            continue
        pct = (lambda k, f: f"{r[k]:.3g}% of {r[f]:.3g} ms" if k in r else "–")
        peak = "–" if r["peak_gb"] != r["peak_gb"] else f"{r['peak_gb']:.1f}"  # NaN on CPU
        avg = r.get("avg_visual_tokens_per_layer")
        avg = "all" if avg is None else f"{avg:.0f}"
        lines.append(f"| {r['system']} | {r['batch']} | {r['prompt_tokens']} | {avg} | {r['ttft_ms']:.1f} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['generated_tok_per_s']:.1f} | {peak} | "
                     f"{pct('decode_pct_of_floor', 'decode_floor_ms')} | {pct('ttft_pct_of_floor', 'ttft_floor_ms')} |")
    if any("floor_card" in r for r in result["rows"]):
        card = next(r["floor_card"] for r in result["rows"] if "floor_card" in r)
        c = hardware.card_for(card)
        lines += ["", f"Floors on {card}: copy {c.copy_gb_s:g} GB/s, bf16 matmul {c.bf16_tflop_s:g} TFLOP/s "
                      f"({c.source}); benchmarks/hardware.py."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy config on CPU (smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16,64; tiny: 1,2)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=45)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--systems", default="vtprune,two_stage,fastv,pdrop,visionzip,random,transformers",
                   help="comma-separated: vtprune (unpruned), vtprune-nograph, vtprune-compile (torch.compile'd "
                        "decode step), two_stage, two_stage-compile, fastv, pdrop, visionzip, "
                        "random (pruned engines; baselines at two_stage's average visual tokens per layer), "
                        "transformers")
    p.add_argument("--hf-compile", action="store_true", help="also transformers with static cache + torch.compile")
    p.add_argument("--floor-card", choices=sorted(hardware.CARDS), default=None,
                   help="report %% of this card's floor (default: the card hardware.py recognises, if any)")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="file name stem (default e2e-<device>-<date>)")
    args = p.parse_args(argv)

    if args.tiny:
        from vtprune.tiny_model import tiny_llava_config
        config = tiny_llava_config()
        device = torch.device(args.device or "cpu")
        dtype = torch.float32
        defaults = ("1,2", 8, 1)
    else:
        from vtprune.model_configs import llava_1_5_7b_config
        config = llava_1_5_7b_config()
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        defaults = ("1,16,64", 64, 5)
        if device.type != "cuda":
            print("warning: no GPU: the 7B architecture on CPU is very slow; use --tiny for a smoke run")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or defaults[0]).split(",")]
    args.new_tokens = args.new_tokens or defaults[1]
    args.repeats = args.repeats or defaults[2]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.card = hardware.card_for(device_name(device), args.floor_card)

    import transformers
    name, date = device_name(device), today()
    rows = []

    def save(final: bool):
        """After every system (a run killed later keeps what was measured), and at the end."""
        result = {"benchmark": "e2e", "date": date, "device_name": name, "torch": torch.__version__,
                  "transformers": transformers.__version__, "dtype": str(dtype).replace("torch.", ""),
                  "config": "tiny" if args.tiny else "llava-1.5-7b", "new_tokens": args.new_tokens,
                  "text_tokens": args.text_tokens, "repeats": args.repeats, "complete": final, "rows": rows}
        write_results(args.out, "e2e", args.tag, result, markdown(result), quiet=not final)
        return result

    systems = args.systems.split(",")
    for s in systems:
        if s == "vtprune":
            rows += run_vtprune(config, args, device, dtype)
        elif s == "vtprune-nograph":
            rows += run_vtprune(config, args, device, dtype, use_graph=False)
        elif s == "vtprune-compile":
            rows += run_vtprune(config, args, device, dtype, compile_=True)
        elif s == "two_stage-compile":
            rows += run_vtprune(config, args, device, dtype, policy="two_stage", compile_=True)
        elif s in ("two_stage", "fastv", "pdrop", "visionzip", "random"):
            rows += run_vtprune(config, args, device, dtype, policy=s)
        elif s == "transformers":
            rows += run_transformers(config, args, device, dtype)
        else:
            p.error(f"unknown system '{s}'")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(final=False)
    if args.hf_compile:
        rows += run_transformers(config, args, device, dtype, compile_=True)
    return save(final=True)


if __name__ == "__main__":
    main()
