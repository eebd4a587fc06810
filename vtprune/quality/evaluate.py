"""The evaluation harness: accuracy, caption BLEU, visual tokens, FLOPs and latency of one
pruning setting on a JSONL data set, and the comparison of every policy at equal budgets.

    vtprune eval --model DIR --data test.jsonl [--pruning cfg.yaml | --policy fastv --budget 64]
    vtprune eval --model DIR --data test.jsonl --compare --pruning a.yaml --pruning b.yaml [--budget 64 ...]

Records: {"image", "question", "answer"} plus optional "id" and "type" (type "caption": scored by
BLEU; everything else by exact match after normalisation, see metrics.py). Bad records are
reported with their line number and skipped. Answers are greedy. `--predictions F` writes one
record per question and setting, tagged {"setting": name, ...} (every setting with --compare). Latency is wall time per
question in batches of --batch-size (model load and warm-up excluded); FLOPs are the prefill's
(engine/flops.py), and "visual tokens" the average over decoder layers of the visual tokens
entering each layer (the budget unit of pruning papers).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from ..engine.inputs import format_prompt
from ..errors import VtpruneError
from ..files import fs_error, make_output_dir
from .metrics import bleu, exact_match
from .plot import line_chart

CAPTION = "caption"


@dataclass
class EvalResult:
    name: str
    policy: str
    n_questions: int
    n_captions: int
    accuracy: float | None                 # % exact match (non-caption records)
    accuracy_by_type: dict
    bleu: float | None                     # corpus BLEU of captions
    visual_tokens_per_layer: list          # mean over rows, per decoder layer
    avg_visual_tokens: float               # mean over layers
    prefill_gflops: float                  # mean per row
    prefill_gflops_unpruned: float
    latency_ms_per_question: float
    seconds: float
    extra: dict = field(default_factory=dict)


def load_records(path: str):
    """The file's usable records (bad lines are skipped with a warning: training/data.py)."""
    from ..training.data import TrainingData  # local: importing training loads the compiled ops

    return TrainingData(path, what="eval data").examples


def prediction_lines(setting: str, rows) -> str:
    """One JSONL record per (example, result), tagged with the setting that produced it."""
    return "".join(json.dumps({"setting": setting, "id": e.id, "line": e.line, "type": e.kind,
                               "question": e.question, "answer": e.answer, "prediction": r.text,
                               "correct": None if e.kind == CAPTION else exact_match(r.text, e.answer)}) + "\n"
                   for e, r in rows)


def write_predictions(f, setting: str, rows) -> None:
    f.write(prediction_lines(setting, rows))
    f.flush()


def evaluate(engine, examples, name: str = "", batch_size: int = 32, max_new_tokens: int = 32,
             progress: bool = True, predictions_path: str | None = None, predictions_file=None,
             label: str | None = None) -> EvalResult:
    """One setting (the engine's current pruning). Predictions go to `predictions_path` (written
    anew) or are appended to the open text file `predictions_file`; `label` is the progress bar's."""
    rows, policy = [], engine.plan.cfg.policy if engine.plan is not None else "unpruned"
    # warm-up (allocator, kernels, CUDA graph) so that the first batch's latency is not an outlier
    engine.generate([examples[0].image], [format_prompt(examples[0].question)], max_new_tokens=2)
    it = range(0, len(examples), batch_size)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(examples), desc=label or f"eval {name or policy}", unit="q")
    busy = 0.0
    for start in it:
        chunk = examples[start:start + batch_size]
        t = time.perf_counter()
        results = engine.generate([e.image for e in chunk], [format_prompt(e.question) for e in chunk],
                                  max_new_tokens=max_new_tokens)
        busy += time.perf_counter() - t
        rows += list(zip(chunk, results))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    qa = [(e, r) for e, r in rows if e.kind != CAPTION]
    caps = [(e, r) for e, r in rows if e.kind == CAPTION]
    by_type: dict[str, list[bool]] = {}
    for e, r in qa:
        by_type.setdefault(e.kind or "all", []).append(exact_match(r.text, e.answer))
    correct = [c for v in by_type.values() for c in v]
    L = engine.cfg.text.num_layers
    per_layer = [sum(r.stats["visual_tokens_per_layer"][i] for _, r in rows) / len(rows) for i in range(L)]
    if predictions_path:
        make_output_dir(os.path.dirname(os.path.abspath(predictions_path)), "predictions directory")
        _write_text(predictions_path, "predictions file", prediction_lines(name or policy, rows))
    if predictions_file is not None:
        write_predictions(predictions_file, name or policy, rows)
    return EvalResult(
        name=name or policy, policy=policy, n_questions=len(qa), n_captions=len(caps),
        accuracy=100.0 * sum(correct) / len(correct) if correct else None,
        accuracy_by_type={k: 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())},
        bleu=bleu([r.text for _, r in caps], [e.answer for e, _ in caps]),
        visual_tokens_per_layer=per_layer, avg_visual_tokens=sum(per_layer) / L,
        prefill_gflops=sum(r.stats["prefill_flops"] for _, r in rows) / len(rows) / 1e9,
        prefill_gflops_unpruned=sum(r.stats["prefill_flops_unpruned"] for _, r in rows) / len(rows) / 1e9,
        latency_ms_per_question=1e3 * busy / len(rows), seconds=busy)


def _cfg_budget(cfg, engine) -> float:
    """Average visual tokens per layer of a two-stage config on this model (its budget)."""
    from ..pruning.plan import PruningPlan  # local: importing pruning loads the compiled ops

    plan = PruningPlan(cfg, engine.cfg)
    counts = plan.visual_tokens_per_layer()
    return sum(counts) / len(counts)


def run_settings(engine, examples, settings: list[tuple[str, object]], skipped: list | None = None,
                 predictions_path: str | None = None, **kw) -> list[EvalResult]:
    """settings: [(name, pruning spec or None)] evaluated one after the other on one engine.
    Settings the model cannot run are left out and described in `skipped`. `predictions_path`:
    every setting's predictions, tagged with its name, in one JSONL file (written anew, each
    setting's records as soon as it is done)."""
    skipped = [] if skipped is None else skipped
    out = []
    f = None
    if predictions_path:
        make_output_dir(os.path.dirname(os.path.abspath(predictions_path)), "predictions directory")
        try:
            f = open(predictions_path, "w", encoding="utf-8")
        except OSError as e:
            raise fs_error("predictions file", predictions_path, e) from None
    try:
        for i, (name, spec) in enumerate(settings, 1):
            label = f"setting {i}/{len(settings)} {name}"  # a bar per setting: say where in the run it is
            try:
                engine.set_pruning(spec)
            except VtpruneError as e:  # e.g. a budget a baseline cannot reach on this model's depth
                print(f"{label}: skipped: {e}")
                skipped.append({"name": name, "reason": str(e)})
                continue
            res = evaluate(engine, examples, name=name, predictions_file=f, label=label, **kw)
            if spec is not None and engine.plan is not None and engine.plan.cfg.policy != "two_stage":
                res.extra["budget"] = engine.plan.cfg.budget
            out.append(res)
    finally:
        if f is not None:
            f.close()
    engine.set_pruning(None)
    return out


def comparison_settings(engine, two_stage: list[str], budgets: list[int],
                        baselines=None) -> list[tuple[str, object]]:
    """Unpruned, each two-stage config, and every baseline at each two-stage config's budget
    (rounded to a token) and at each extra `budgets` value. Baselines: every registered policy
    that runs at a budget (the built-in training-free ones and any registered from outside)."""
    from ..pruning import PruningConfig, get_policy, policy_names  # local: importing pruning loads the compiled ops

    if baselines is None:
        baselines = [n for n in policy_names() if get_policy(n).needs_budget]

    settings: list[tuple[str, object]] = [("unpruned", None)]
    all_budgets = []
    for path in two_stage:
        cfg = PruningConfig.load(path)
        b = _cfg_budget(cfg, engine)
        settings.append((f"two_stage@{b:.0f}", cfg))
        all_budgets.append(round(b))
    all_budgets += [b for b in budgets if b not in all_budgets]
    for b in sorted(set(all_budgets)):
        for policy in baselines:
            settings.append((f"{policy}@{b}", PruningConfig(policy=policy, budget=b)))
    return settings


def to_markdown(results: list[EvalResult], header: str = "") -> str:
    lines = [header] if header else []
    lines += ["| setting | visual tokens / layer | accuracy % | BLEU | prefill GFLOPs (% of unpruned) | latency ms/q |",
              "|---|---|---|---|---|---|"]
    for r in results:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.1f}"
        b = "-" if r.bleu is None else f"{r.bleu:.1f}"
        lines.append(f"| {r.name} | {r.avg_visual_tokens:.1f} | {acc} | {b} | {r.prefill_gflops:.3f} "
                     f"({100 * r.prefill_gflops / r.prefill_gflops_unpruned:.0f}%) | {r.latency_ms_per_question:.1f} |")
    types = sorted({k for r in results for k in r.accuracy_by_type})
    if types and types != ["all"]:
        lines += ["", "Accuracy by question type (%):", "",
                  "| setting | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for r in results:
            lines.append(f"| {r.name} | " + " | ".join(f"{r.accuracy_by_type.get(t, float('nan')):.1f}" for t in types)
                         + " |")
    return "\n".join(lines) + "\n"


def environment(engine) -> dict:
    dev = engine.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(dev), "device_name": name, "cpu_threads": torch.get_num_threads(),
            "dtype": str(engine.dtype).replace("torch.", ""), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def output_paths(out: str, plot: bool = False) -> dict:
    """The files write_outputs writes for the stem `out` (a trailing .json is dropped)."""
    base = out[:-5] if out.endswith(".json") else out
    paths = {"json": base + ".json", "md": base + ".md"}
    if plot:
        paths["png"] = base + ".png"
    return paths


def _write_text(path: str, what: str, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed into place, so that a failed
    write (disk full, permission) leaves no half-written file and an earlier file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise fs_error(what, path if e.filename in (None, tmp, path) else e.filename, e) from None


def write_outputs(results: list[EvalResult], out: str, meta: dict, plot: bool = False) -> dict:
    """out.json, out.md (and out.png with plot): returns the written paths. Missing parent
    directories are created; a file-system problem is one VtpruneError naming the path."""
    make_output_dir(os.path.dirname(os.path.abspath(out)), "--out directory")
    data = {"meta": meta, "results": [r.__dict__ for r in results], "skipped": meta.pop("skipped", [])}
    paths = output_paths(out)
    _write_text(paths["json"], "results file", json.dumps(data, indent=1))
    header = (f"Evaluation of {meta.get('model')} on {meta.get('data')} ({meta.get('n_records')} records), "
              f"{meta.get('device_name')} ({meta.get('device')}, {meta.get('dtype')}), {meta.get('date')}\n")
    _write_text(paths["md"], "results file", to_markdown(results, header)
                + "".join(f"\nNot run: {sk['name']}: {sk['reason']}\n" for sk in data["skipped"]))
    if plot:
        series: dict[str, list] = {}
        unpruned = None
        for r in results:
            if r.accuracy is None:
                continue
            if r.policy == "unpruned":
                unpruned = ("unpruned", r.accuracy)
                continue
            series.setdefault(r.name.split("@")[0], []).append((r.avg_visual_tokens, r.accuracy))
        paths["png"] = line_chart(series, output_paths(out, plot=True)["png"], "Accuracy vs visual tokens per layer",
                                  "visual tokens per decoder layer (average)", "accuracy %", hline=unpruned)
    return paths

