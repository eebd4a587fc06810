"""Kernel microbenchmarks: each vtprune op against the unfused PyTorch version, same run
(gumbel_topk, soft_merge forward+backward, gather_tokens, compact_kv).

    python benchmarks/bench_kernels.py            # GPU: the 7B shapes (the project's perf anchors)
    python benchmarks/bench_kernels.py --tiny     # CPU smoke run (small shapes)

Times are medians (triton.testing.do_bench on a GPU when triton is installed, else CUDA events /
wall clock over --repeats runs). GB/s counts bytes read + written once (the minimum traffic);
"of copy" is that against the card's copy ceiling (--copy-gbs, default 4250 GB/s: H200,
benchmarks/hardware.py). Writes JSON and a markdown table into benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import RESULTS_DIR, device_name, today, write_results  # noqa: E402

from vtprune.kernels import compaction, gumbel_topk, soft_merge  # noqa: E402
from vtprune.kernels.soft_merge import soft_merge_reference  # noqa: E402


def median_time_s(fn, device, repeats: int) -> float:
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=max(100, repeats), return_mode="median") / 1e3
        except ImportError:
            pass
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ragged_indices(B, T, K, device, seed=0):
    """Every row keeps K of T tokens (sorted), as a top-k pruning step does."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(T, generator=g)[:K].sort().values for _ in range(B)])
    return idx.to(device), torch.full((B,), K, dtype=torch.long, device=device)


def torch_gather_tokens(src, idx):
    return torch.gather(src, 1, idx[..., None].expand(-1, -1, src.shape[2]))


def torch_gather_kv(k, v, idx):
    e = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return torch.gather(k, 2, e), torch.gather(v, 2, e)


def compaction_cases(args, device, dtype):
    rows = []
    B, T, K, D = args.hidden_shape
    src = torch.randn(B, T, D, device=device, dtype=dtype)
    idx, lengths = ragged_indices(B, T, K, device)
    nbytes = 2 * B * K * D * src.element_size()
    shape = f"B={B}, {T}->{K}, D={D}, {str(dtype).replace('torch.', '')}"
    rows.append(case("gather_tokens hidden states", shape, nbytes, args, device,
                     ours=lambda: compaction.gather_tokens(src, idx, lengths, validate=False),
                     base=lambda: torch_gather_tokens(src, idx)))
    del src

    B, H, T, K, Dh = args.kv_shape
    idx, lengths = ragged_indices(B, T, K, device, seed=1)
    k = torch.randn(B, H, T, Dh, device=device, dtype=dtype)
    v = torch.randn_like(k)
    ko, vo = torch.empty(B, H, K, Dh, device=device, dtype=dtype), torch.empty(B, H, K, Dh, device=device, dtype=dtype)
    nbytes = 2 * 2 * B * H * K * Dh * k.element_size()
    shape = f"B={B}, H={H}, {T}->{K}, Dh={Dh}"
    rows.append(case("compact_kv one layer (K and V)", shape, nbytes, args, device,
                     ours=lambda: compaction.compact_kv([k], [v], idx, lengths, [ko], [vo], validate=False),
                     base=lambda: torch_gather_kv(k, v, idx)))
    del k, v, ko, vo

    L = args.layers
    if L > 1:
        try:
            ks = [torch.randn(B, H, T, Dh, device=device, dtype=dtype) for _ in range(L)]
            vs = [torch.randn_like(t) for t in ks]
            kos = [torch.empty(B, H, K, Dh, device=device, dtype=dtype) for _ in range(L)]
            vos = [torch.empty_like(t) for t in kos]
        except torch.cuda.OutOfMemoryError:
            print(f"skipping the {L}-layer case: out of memory")
            return rows

        def base_all():
            for kk, vv in zip(ks, vs):
                torch_gather_kv(kk, vv, idx)
        rows.append(case(f"compact_kv {L} layers, one launch", shape, nbytes * L, args, device,
                         ours=lambda: compaction.compact_kv(ks, vs, idx, lengths, kos, vos, validate=False),
                         base=base_all))
    return rows


def peak_extra_gb(fn, device) -> float:
    """Memory allocated above the starting point while fn runs (CUDA only, else NaN)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def case(name, shape, nbytes, args, device, ours, base):
    """Times both; if the vtprune op fails (a Triton kernel that does not compile or launch on this
    card), its time is NaN, the reference is still timed, and the row says so (never fatal)."""
    nan = float("nan")
    fallback = None
    try:
        t_ours = median_time_s(ours, device, args.repeats)
    except Exception as e:  # noqa: BLE001 - recorded, the other ops still run
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        fallback = f"vtprune op failed ({type(e).__name__}: {lines[-1][:200] if lines else ''}); reference timed only"
        t_ours = nan
    t_base = median_time_s(base, device, args.repeats)
    row = {"op": name, "shape": shape, "bytes": nbytes,
           "vtprune_us": t_ours * 1e6, "torch_us": t_base * 1e6,
           "vtprune_gbs": nbytes / t_ours / 1e9 if nbytes else nan,
           "torch_gbs": nbytes / t_base / 1e9 if nbytes else nan,
           "speedup": t_base / t_ours,
           "vtprune_peak_gb": nan if fallback else peak_extra_gb(ours, device),
           "torch_peak_gb": peak_extra_gb(base, device)}
    row["vtprune_of_copy"] = row["vtprune_gbs"] / args.copy_gbs
    if fallback:
        row["fallback"] = fallback
        print(f"{name:>36} FALLBACK: {fallback}", flush=True)
    print(f"{name:>36} {shape:>34}  vtprune {row['vtprune_us']:9.1f} us {row['vtprune_gbs']:7.0f} GB/s  "
          f"torch {row['torch_us']:9.1f} us {row['torch_gbs']:7.0f} GB/s  x{row['speedup']:.2f}", flush=True)
    return row


def selection_cases(args, device):
    """gumbel_topk against noise + topk + sort (the unfused PyTorch version, as in the project's perf anchors)."""
    rows = []
    for B in args.topk_batches:
        N, k = args.topk_shape
        logits = torch.randn(B, N, device=device)

        def unfused():
            u = torch.rand(B, N, device=device).clamp_(1e-20, 0.99999988)
            p = logits - torch.log(-torch.log(u))
            return torch.topk(p, k, dim=-1).indices.sort(dim=-1).values
        nbytes = B * N * 4 * 3 + B * k * 8  # logits read; mask, soft, indices written
        rows.append(case("gumbel_topk (noise+select+mask+soft+idx)", f"B={B}, N={N}, k={k}", nbytes, args, device,
                         ours=lambda: gumbel_topk(logits, k, seed=1, validate=False), base=unfused))
    return rows


def merge_cases(args, device, dtype):
    """soft_merge forward + backward against the reference under autograd."""
    B, N, M, D, d = args.merge_shape
    x = torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, N, d, device=device, dtype=dtype, requires_grad=True)
    q = torch.randn(B, M, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, M, D, device=device, dtype=dtype)

    def fwd_bwd(fn):
        def run():
            x.grad = k.grad = q.grad = None
            fn(x, k, q, 1.0).backward(grad)
        return run
    nbytes = (x.numel() + k.numel() + q.numel()) * x.element_size() * 2 + grad.numel() * x.element_size() * 2
    shape = f"B={B}, N={N}, M={M}, D={D}, d={d}"
    return [case("soft_merge forward+backward", shape, nbytes, args, device,
                 ours=fwd_bwd(soft_merge), base=fwd_bwd(soft_merge_reference))]


def markdown(result) -> str:
    lines = [f"# Kernel microbenchmarks, {result['device_name']} ({result['date']})", "",
             f"torch {result['torch']}; medians; GB/s = bytes read + written / time; copy ceiling "
             f"{result['copy_gbs']:.0f} GB/s.", "",
             "| op | shape | vtprune µs | GB/s | of copy | torch µs | GB/s | speedup | extra GB vtprune / torch |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "–" if v != v else format(v, fmt)  # NaN: not measured
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['shape']} | {r['vtprune_us']:.1f} | {f(r['vtprune_gbs'], '.0f')} | "
                     f"{f(r['vtprune_of_copy'], '.0%')} | {r['torch_us']:.1f} | {f(r['torch_gbs'], '.0f')} | "
                     f"{r['speedup']:.2f}x | {f(r['vtprune_peak_gb'], '.2f')} / {f(r['torch_peak_gb'], '.2f')} |")
    lines += [f"\n{r['op']}: {r['fallback']}" for r in result["rows"] if "fallback" in r]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--copy-gbs", type=float, default=4250.0)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        device = torch.device(args.device or "cpu")
        args.hidden_shape, args.kv_shape, args.layers = (4, 64, 32, 128), (4, 4, 80, 48, 32), 3
        args.topk_batches, args.topk_shape, args.merge_shape = (2,), (64, 16), (2, 48, 16, 32, 16)
        args.repeats = args.repeats or 3
        dtype = torch.float32
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # the perf anchors' shapes: hidden B=64 576->288 D=4096; one layer's K,V B=64 H=32 676->400 Dh=128
        args.hidden_shape, args.kv_shape, args.layers = (64, 576, 288, 4096), (64, 32, 676, 400, 128), 32
        # gumbel_topk: B=64 and B=1, N=576, k=288; soft_merge: B=64, N=576, M=288, D=1024 (issue #3),
        # d = pruner_d_internal 512 (the design's merger; the kernel reads it in tiles since issue 18)
        args.topk_batches, args.topk_shape, args.merge_shape = (64, 1), (576, 288), (64, 576, 288, 1024, 512)
        args.repeats = args.repeats or 50
        dtype = torch.bfloat16
    rows = selection_cases(args, device) + merge_cases(args, device, dtype) + compaction_cases(args, device, dtype)
    name = device_name(device)
    date = today()
    result = {"benchmark": "kernels", "date": date, "device_name": name, "torch": torch.__version__,
              "copy_gbs": args.copy_gbs, "rows": rows}
    write_results(args.out, "kernels", args.tag, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
