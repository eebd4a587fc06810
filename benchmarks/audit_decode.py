"""Audit of one decode step, without a GPU: kernel launches, host syncs, shape stability.

    python benchmarks/audit_decode.py                 # 7B architecture on the meta device, B = 1 and 64
    python benchmarks/audit_decode.py --json out.json # also write the report
    python benchmarks/audit_decode.py --tiny          # the tiny model on CPU tensors (real values)

For each system (vtprune unpruned, vtprune two-stage with the design's schedule, transformers'
LlavaForConditionalGeneration with its DynamicCache) and batch size, one decode step (the token
after a 576 + 45-token prompt; two-stage: 288 merged + 45) runs under a TorchDispatchMode that
sees every aten op after autograd and composite decomposition, as a CUDA build would run them:
- kernels: ops that launch a kernel, i.e. all but views (ops whose schema returns an alias
  that is not written), empty allocations and metadata queries. Attention is counted as the one
  fused SDPA kernel a GPU runs (F.scaled_dot_product_attention is replaced by a shape-only stub:
  on meta/CPU it would decompose into the math path's dozen ops); matmuls as one launch each.
- syncs: ops that make the host wait for the device: .item()/bool() (item, _local_scalar_dense,
  is_nonzero, equal; .tolist() on a CUDA tensor shows as a copy between devices), ops whose output shape depends on data (nonzero,
  masked_select, unique, boolean indexing, repeat_interleave without output_size), and copies
  between devices. A CUDA graph admits none.
- stable: the op sequence with every input/output shape, compared between two steps (a CUDA
  graph replays one recorded sequence; the engine's decode is captured once per cache).
Meta tensors carry shapes and dtypes only, so the 7B model costs no memory; where an op needs a
value (transformers' mask code calls .item()), the sync is recorded and a stand-in value returned.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPT_TEXT = 45
SYNC_OPS = {"item", "_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "unique",
            "_unique", "_unique2", "unique_consecutive", "unique_dim", "argwhere"}
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "sym_size",
             "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
             "dim", "size", "stride", "_to_copy_noop"}
MATMUL = {"linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "_scaled_mm"}


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1] + ("." + func._overloadname if func._overloadname != "default" else "")


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _shapes(obj):
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), str(obj.dtype).replace("torch.", ""))
    if isinstance(obj, (list, tuple)):
        return tuple(_shapes(o) for o in obj)
    return None


class OpAudit(TorchDispatchMode):
    """Records (op, category, input and output shapes) of every aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        base = name.split(".")[0]
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_meta = any(t.device.type == "meta" for t in tensors)
        sync = None
        if base in SYNC_OPS:
            sync = "item" if base == "_local_scalar_dense" else name  # .item() decomposes outside inference mode
        elif base == "index" and any(t.dtype == torch.bool for t in tensors[1:]):
            sync = "index with a boolean mask"
        elif base == "repeat_interleave" and "output_size" not in kwargs and len(tensors) and tensors[-1].dim():
            sync = "repeat_interleave without output_size"
        elif base in ("_to_copy", "copy_") and len({t.device for t in tensors} | (
                {torch.device(kwargs["device"])} if kwargs.get("device") is not None else set())) > 1:
            sync = f"{name} between devices"
        if sync is not None:
            self.syncs.append(sync)
            if on_meta:  # a stand-in value: the audit counts, it does not compute
                return self._stand_in(base, tensors)
        out = func(*args, **kwargs)
        first = tensors[0] if tensors else None
        if sync is not None:
            category = "sync"
        elif base in ("to", "_to_copy", "type_as"):  # aliases its input when nothing changes
            same = isinstance(out, torch.Tensor) and out.dtype == first.dtype and out.device == first.device
            category = "view" if same and base != "_to_copy" else "cast"
        elif base in ("contiguous", "reshape", "flatten"):  # copies only what cannot be viewed
            category = "view" if first.is_contiguous() else "other"
        elif _is_view(func) or base in NO_KERNEL:
            category = "view"
        elif base in MATMUL:
            category = "matmul"
        elif base == "sdpa":
            category = "attention"
        else:
            category = "other"
        self.ops.append((name, category, _shapes(list(args) + list(kwargs.values())), _shapes(out)))
        return out

    @staticmethod
    def _stand_in(base, tensors):
        t = tensors[0]
        if base in ("nonzero", "argwhere"):
            return torch.empty(0, t.dim(), dtype=torch.long, device=t.device)
        if base in ("masked_select",):
            return torch.empty(0, dtype=t.dtype, device=t.device)
        if base.startswith("unique") or base.startswith("_unique"):
            return torch.empty(0, dtype=t.dtype, device=t.device)
        if base in ("is_nonzero", "equal", "allclose"):
            return True
        if base == "_local_scalar_dense":
            return True if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        if base == "item":
            return True if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        return t.clone()

    def kernels(self) -> list[tuple]:
        """Ops that launch a kernel (a sync's own copy to the host is counted as the sync)."""
        return [op for op in self.ops if op[1] not in ("view", "sync")]


_sdpa_calls = []


def _sdpa_stub(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """One fused kernel, as flash / memory-efficient attention on a GPU: output [.., L, Dv]."""
    mode = torch.utils._python_dispatch._get_current_dispatch_mode()
    with torch.utils._python_dispatch._disable_current_modes():  # zeros, not garbage: later layers write
        out = torch.zeros(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)  # the KV cache
    if isinstance(mode, OpAudit):
        mode.ops.append(("sdpa", "attention", _shapes([query, key, value, attn_mask]), _shapes(out)))
    return out


@contextlib.contextmanager
def fused_attention():
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_stub
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def summarize(audit: OpAudit) -> dict:
    ks = audit.kernels()
    by_cat = collections.Counter(op[1] for op in ks)
    by_op = collections.Counter(op[0] for op in ks)
    return {"kernels": len(ks), "by_category": dict(by_cat), "by_op": dict(by_op.most_common()),
            "syncs": list(audit.syncs)}


def audit_steps(prepare, step, steps=(0, 1, 5), stub_attention: bool = True) -> dict:
    """For each s in `steps`: prepare(s) (the step's inputs, outside the audit: DecodeGraph copies
    them before each replay), then step() under the audit. Reports the first step's kernels and
    whether every step ran the same ops on the same shapes."""
    runs = []
    ctx = fused_attention() if stub_attention else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        for s in steps:
            prepare(s)
            audit = OpAudit()
            with audit:
                step()
            runs.append(audit)
    report = summarize(runs[0])
    report["stable"] = all(r.ops == runs[0].ops for r in runs[1:])
    report["syncs"] = sorted({s for r in runs for s in r.syncs})
    return report


# ----------------------------------------------------------------------------- systems
def _pruning_config(cfg):
    from vtprune.pruning import PruningConfig

    return PruningConfig.scaled_for(cfg.num_visual_tokens, cfg.text.num_layers,
                                    pruner_d_internal=min(512, cfg.text.hidden_size))


def vtprune_step(model, batch: int, two_stage: bool, new_tokens: int = 64):
    """The engine's decode step (engine._decoder_state without the graph) for a batch of prompts
    of 576 + 45 tokens (two-stage: merged + 45), prefilled lengths set as the prefill would."""
    from vtprune.engine.generate import decode_step
    from vtprune.engine.kv_cache import KVCache, layout
    from vtprune.pruning.plan import PruningPlan

    cfg = model.cfg
    dev = next(model.parameters()).device
    dtype = next(model.decoder.parameters()).dtype
    plan = PruningPlan(_pruning_config(cfg), cfg, None) if two_stage else None
    T = PROMPT_TEXT + (plan.visual_in_sequence if plan else cfg.num_visual_tokens)
    caps = plan.capacities(T) if plan else [T] * cfg.text.num_layers
    t = cfg.text
    cache = KVCache(batch, t.num_layers, t.num_kv_heads, t.head_dim, *layout(plan, T, new_tokens, t.num_layers),
                    dtype, dev, segments=[p.layer for p in plan.drop_points] if plan else None,
                    key_bias=plan is not None and plan.uses_key_bias)
    for start in cache.segment_starts:  # what the prefill leaves: every row's prompt length per segment
        layers = [i for i in range(t.num_layers) if i >= start]
        cache.set_lengths(torch.full((batch,), caps[start], dtype=torch.long, device=dev), layers=layers)
    base = torch.full((batch,), T + (plan.position_offset if plan else 0), dtype=torch.long, device=dev)
    tokens = torch.ones(batch, dtype=torch.long, device=dev)
    step_t = torch.zeros(1, dtype=torch.long, device=dev)

    def prepare(s):
        step_t.fill_(s)

    def step():
        return decode_step(model, cache, tokens, step_t, base)
    return prepare, step


def build_vtprune(config, device, dtype):
    from vtprune.engine.config import LlavaModelConfig
    from vtprune.engine.engine import _build_on_meta, _init_random

    cfg = LlavaModelConfig.from_any(config)
    model = _build_on_meta(cfg)
    if torch.device(device).type == "meta":
        model = model.to(dtype)
        model.decoder.rotary.reset_parameters("meta")
    else:
        _init_random(model, device, dtype, seed=0)
    model.prepare_inference(dtype)
    return model.eval()


def transformers_step(config, batch: int, device, dtype, model=None):
    """transformers' decode step on the same prompt: the next token through
    LlavaForConditionalGeneration with a DynamicCache holding 621 prompt positions."""
    from transformers import DynamicCache, LlavaForConditionalGeneration

    if model is None:
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    t = config.text_config
    P = PROMPT_TEXT + 576
    head_dim = t.hidden_size // t.num_attention_heads
    ids = torch.ones(batch, 1, dtype=torch.long, device=device)
    state = {}

    def prepare(s):  # generate's inputs for step s: a cache holding P + s positions
        cache = DynamicCache(config=t)
        kv = torch.zeros(batch, t.num_key_value_heads, P + s, head_dim, dtype=dtype, device=device)
        for layer in range(t.num_hidden_layers):
            cache.update(kv.clone(), kv.clone(), layer)
        state.update(cache=cache, mask=torch.ones(batch, P + s + 1, dtype=torch.long, device=device),
                     pos=torch.full((1,), P + s, dtype=torch.long, device=device))

    def step():
        return model(input_ids=ids, attention_mask=state["mask"], past_key_values=state["cache"],
                     cache_position=state["pos"], use_cache=True).logits
    return prepare, step, model


def run_audit(tiny: bool = False, batches=(1, 64)) -> dict:
    if tiny:
        from vtprune.tiny_model import tiny_llava_config
        config, device, dtype = tiny_llava_config(), "cpu", torch.float32
    else:
        from vtprune.model_configs import llava_1_5_7b_config
        config, device, dtype = llava_1_5_7b_config(), "meta", torch.bfloat16
    rows = []
    model = build_vtprune(config, device, dtype)
    hf = None
    for b in batches:
        for two_stage in (False, True):
            rep = audit_steps(*vtprune_step(model, b, two_stage))
            rows.append({"system": "vtprune" + (" two_stage" if two_stage else ""), "batch": b, **rep})
        prepare, step, hf = transformers_step(config, b, device, dtype, hf)
        rep = audit_steps(prepare, step)
        rows.append({"system": "transformers (sdpa, DynamicCache)", "batch": b, **rep})
    return {"config": "tiny" if tiny else "llava-1.5-7b", "device": device, "dtype": str(dtype).replace("torch.", ""),
            "layers": config.text_config.num_hidden_layers, "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"# Decode-step audit, {report['config']} ({report['device']}, {report['dtype']}, "
             f"{report['layers']} layers)", "",
             "| system | batch | kernels | matmul | attention | cast | other | host syncs | same shapes every step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        c = r["by_category"]
        lines.append(f"| {r['system']} | {r['batch']} | {r['kernels']} | {c.get('matmul', 0)} | "
                     f"{c.get('attention', 0)} | {c.get('cast', 0)} | {c.get('other', 0)} | "
                     f"{', '.join(r['syncs']) or 'none'} | {'yes' if r['stable'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU tensors instead of 7B on meta")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--ops", action="store_true", help="also print each system's kernels by op")
    args = p.parse_args(argv)
    report = run_audit(args.tiny, tuple(int(b) for b in args.batch_sizes.split(",")))
    print(markdown(report), end="")
    if args.ops:
        for r in report["rows"]:
            print(f"\n{r['system']} B={r['batch']}: " + ", ".join(f"{k} {v}" for k, v in r["by_op"].items()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
