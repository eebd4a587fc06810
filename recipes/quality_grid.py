"""The SynthVQA quality grid: two-stage heads trained with several seeds (and the design's
ablations), each evaluated on several test splits, next to unpruned and the training-free
baselines; mean +- sd over seeds per split and over splits.

    python recipes/quality_grid.py --model DIR --train train.jsonl --val val.jsonl \
        --split test=test.jsonl --split seed11=seed11/test.jsonl ... --runs RUNS --out STEM \
        [--groups main ablations baselines] [--budgets 201 64 32] [--steps 200] [--seeds 0 1 2] [--ablation-seeds 0 1]

Resumable: every finished piece is a file under RUNS (a run's result.json, a reference
setting's RUNS/reference/<split>/<setting>.json) and is not redone; a run interrupted while
training continues from its last checkpoint (Trainer --resume); an interrupted evaluation is
redone. Writes STEM.json (every run's numbers and the aggregates) and STEM.md (the tables);
rerunning with the same arguments after everything is done only rewrites those two.

Two sets of heads per main run, both reported: the last step's (`two_stage_<budget>`), and the
checkpoint that scored best on the validation split (`two_stage_<budget>_val_selected`: of the
checkpoints every --every steps, the best accuracy/unpruned + BLEU/unpruned on val, the score of
recipes/select_heads.py; RUN/best/). Val is the only thing looked at to choose; the test splits
only report. Validation rows (RUN/val.jsonl) also give the stability numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import yaml  # noqa: E402

from vtprune.errors import VtpruneError  # noqa: E402

from select_heads import score  # noqa: E402  (recipes/ is this script's directory)

CONFIGS = {201: "configs/synthvqa_two_stage_201.yaml", 64: "configs/synthvqa_two_stage_64.yaml",
           32: "configs/synthvqa_two_stage_32.yaml"}
# (name, budget, overrides of that budget's config, TrainSettings overrides, group). The
# ablations switch one part of the design off against two_stage_201 (for the temperature: a
# fixed 0.1 instead of the configs' annealing 1.0 -> 0.1).
VARIANTS = [
    ("two_stage_201", 201, {}, {}, "main"),
    ("two_stage_64", 64, {}, {}, "main"),
    ("two_stage_32", 32, {}, {}, "main"),
    ("no_gan", 201, {"adv_loss_weight": 0.0}, {}, "ablations"),
    ("simple_merger", 201, {"merger_type": "simple"}, {}, "ablations"),
    ("fixed_tau", 201, {"temperature": 0.1}, {}, "ablations"),
    ("no_proportional_attention", 201, {"proportional_attention": False}, {}, "ablations"),
    ("no_spatial_merge", 201, {"merge_locality": 0.0}, {}, "ablations"),
    ("old_recipe", 201, {"lr_schedule": "constant", "ema_decay": 0.0}, {"adv_loss": "non_saturating"}, "ablations"),
    # the 64-token config trains without the adversarial loss (its discriminator wins outright:
    # configs/synthvqa_two_stage_64.yaml says why); this puts it back at the weight 201 keeps
    ("with_gan_64", 64, {"adv_loss_weight": 0.1}, {}, "ablations"),
]
ABLATION_OF = {"no_gan": "adversarial (GAN) loss", "simple_merger": "question-aware merger",
               "fixed_tau": "temperature annealing 1.0 -> 0.1 (vs a fixed 0.1)",
               "no_proportional_attention": "proportional attention", "no_spatial_merge": "spatial merge (locality)",
               "old_recipe": "cosine lr + weight average (vs constant lr, raw weights)",
               "with_gan_64": "no adversarial loss (vs the GAN at weight 0.1, as at 201)"}
BASELINES = ["random", "divprune", "pdrop", "visionzip", "fastv", "dart"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def summary(r) -> dict:
    return {"accuracy": r.accuracy, "bleu": r.bleu, "accuracy_by_type": r.accuracy_by_type,
            "avg_visual_tokens": r.avg_visual_tokens, "n_questions": r.n_questions, "n_captions": r.n_captions}


class Grid:
    def __init__(self, a):
        self.a = a
        self.splits = dict(a.split)
        self.configs = {**CONFIGS, **{int(k): v for k, v in a.config}}
        self._engine = None
        self._records = {}

    # ------------------------------------------------------------------ shared pieces
    def engine(self):
        if self._engine is None:
            from vtprune.engine.engine import LlavaEngine
            self._engine = LlavaEngine.from_pretrained(self.a.model)
        return self._engine

    def records(self, path: str):
        if path not in self._records:
            from vtprune.quality.evaluate import load_records
            self._records[path] = load_records(path)
        return self._records[path]

    def evaluate(self, spec, path: str, name: str) -> dict:
        from vtprune.quality.evaluate import evaluate
        eng = self.engine()
        eng.set_pruning(spec)
        return summary(evaluate(eng, self.records(path), name=name, progress=self.a.progress, label=name))

    # ------------------------------------------------------------------ reference settings
    def reference(self, split: str, setting: str) -> dict | None:
        path = os.path.join(self.a.runs, "reference", split, setting + ".json")
        if os.path.exists(path):
            return read_json(path)
        if setting == "unpruned":
            spec = None
        else:
            policy, budget = setting.split("@")
            spec = {"policy": policy, "budget": int(budget)}
        log(f"reference {setting} on {split}")
        try:
            out = self.evaluate(spec, self.splits[split], f"{setting} {split}")
        except VtpruneError as e:  # a budget the policy cannot reach on this model (dart at 64)
            out = {"skipped": " ".join(str(e).split())}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, out)
        return out

    def val_score(self, r: dict) -> float:
        """select_heads.score against unpruned on the val split (RUNS/reference/val/unpruned.json)."""
        path = os.path.join(self.a.runs, "reference", "val", "unpruned.json")
        if not os.path.exists(path):
            log("reference unpruned on val")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json(path, self.evaluate(None, self.a.val, "unpruned val"))
        return score(SimpleNamespace(**r), SimpleNamespace(**read_json(path)))

    # ------------------------------------------------------------------ one training run
    def run(self, name: str, budget: int, overrides: dict, train: dict, seed: int, splits: list[str],
            val_every: int, steps: int) -> dict:
        from vtprune.training.checkpoint import read_state
        from vtprune.training.trainer import Trainer, TrainSettings

        a = self.a
        rdir = os.path.join(a.runs, name, f"seed{seed}")
        done = os.path.join(rdir, "result.json")
        if os.path.exists(done):
            return read_json(done)
        os.makedirs(rdir, exist_ok=True)
        cfg_path = os.path.join(rdir, "config.yaml")
        if not os.path.exists(cfg_path):
            base = self.configs[budget]
            with open(base, encoding="utf-8") as f:
                cfg = yaml.safe_load(f)
            cfg.update(overrides)
            with open(cfg_path, "w", encoding="utf-8") as f:
                f.write(f"# {name}: {base} with {json.dumps(overrides)}\n")
                yaml.safe_dump(cfg, f, sort_keys=False)
        train_dir = os.path.join(rdir, "train")
        resume = os.path.isdir(train_dir) and read_state(train_dir) is not None
        tr = Trainer(TrainSettings(model=a.model, config=cfg_path, data=a.train, out=train_dir, steps=steps,
                                   batch_size=a.batch_size, seed=seed, save_every=val_every or steps,
                                   progress=a.progress, **{"adv_loss": a.adv_loss, **train}), resume=resume)
        log(f"{name} seed {seed}: training {'from step %d' % tr.step if resume else 'from scratch'} to {steps}")
        val_log = os.path.join(rdir, "val.jsonl")
        best_dir = os.path.join(rdir, "best")
        rows = [json.loads(x) for x in open(val_log, encoding="utf-8")] if os.path.exists(val_log) else []
        rows = [r for r in rows if r["step"] <= tr.step]

        def watch() -> None:
            """Val at this checkpoint; RUN/best/ holds the best-scoring one so far (copied before the
            row is logged: a run killed in between re-evaluates this checkpoint on resume)."""
            r = self.evaluate(os.path.join(train_dir, "pruning.yaml"), a.val, f"{name} seed {seed} val")
            row = {"step": tr.step, "accuracy": r["accuracy"], "bleu": r["bleu"], "score": self.val_score(r),
                   "accuracy_by_type": r["accuracy_by_type"]}
            if row["score"] > max((x.get("score", float("-inf")) for x in rows), default=float("-inf")):
                tmp = best_dir + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                shutil.copy(os.path.join(train_dir, "pruning.safetensors"), tmp)
                with open(os.path.join(train_dir, "pruning.yaml"), encoding="utf-8") as f:
                    body = f.read()
                with open(os.path.join(tmp, "pruning.yaml"), "w", encoding="utf-8") as f:
                    f.write(f"# chosen on the val split ({os.path.basename(a.val)}): step {tr.step} of {steps}, score "
                            f"{row['score']:.4f} (accuracy {r['accuracy']:.2f}, BLEU {r['bleu']:.2f}; the run's val.jsonl)\n"
                            + body)
                shutil.rmtree(best_dir, ignore_errors=True)
                os.replace(tmp, best_dir)
            rows.append(row)
            with open(val_log + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(x) + "\n" for x in rows)
            os.replace(val_log + ".tmp", val_log)
            log(f"{name} seed {seed} step {tr.step}: val accuracy {r['accuracy']:.1f}, BLEU {r['bleu']:.1f}")

        def due() -> bool:
            return bool(val_every) and tr.step > 0 and (tr.step % val_every == 0 or tr.step == steps) \
                and (not rows or rows[-1]["step"] < tr.step)

        t0 = time.perf_counter()
        if due():  # resumed at a checkpoint whose val row was not written
            watch()
        while tr.step < steps:
            tr.train(stop_after=(val_every or steps) - tr.step % (val_every or steps))
            if due():
                watch()
        tr.close()
        train_s = time.perf_counter() - t0
        result = {"name": name, "budget": budget, "overrides": overrides, "train_settings": train,
                  "adv_loss": tr.settings.adv_loss, "seed": seed, "steps": steps,
                  "train_seconds_this_session": train_s, "val": rows, "splits": {}}
        for split in splits:
            log(f"{name} seed {seed}: test split {split}")
            result["splits"][split] = self.evaluate(os.path.join(train_dir, "pruning.yaml"), self.splits[split],
                                                    f"{name} seed {seed} {split}")
        if rows and all("score" in x for x in rows):  # (rows of an older grid have no score)
            best = max(rows, key=lambda x: x["score"])  # the first of equal scores, as watch() kept it
            sel = {"step": best["step"], "val_accuracy": best["accuracy"], "val_bleu": best["bleu"], "splits": {}}
            for split in splits:
                if best["step"] == steps:  # the last step's heads: evaluated above
                    sel["splits"][split] = result["splits"][split]
                else:
                    log(f"{name} seed {seed}: val-selected heads (step {best['step']}), test split {split}")
                    sel["splits"][split] = self.evaluate(os.path.join(best_dir, "pruning.yaml"), self.splits[split],
                                                         f"{name} seed {seed} step {best['step']} {split}")
            result["val_selected"] = sel
        write_json(done, result)
        return result


# ---------------------------------------------------------------------- aggregation
def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def stability(rows: list[dict], steps: int) -> float | None:
    """Largest change of val accuracy between consecutive checkpoints in the last half of training."""
    acc = [r["accuracy"] for r in rows if r["step"] >= steps / 2]
    return max((abs(b - a) for a, b in zip(acc, acc[1:])), default=None)


def _mean_ratio(pairs, scale: float, offset: float):
    """mean of offset + scale * x / ref over (x, ref) pairs; None where a reference is 0 (a split
    without captions, or an untrained model) or a value is missing."""
    if any(x is None or not ref for x, ref in pairs):
        return None
    return statistics.fmean(offset + scale * x / ref for x, ref in pairs)


def aggregate(results: list[dict], refs: dict, splits: list[str]) -> dict:
    """Per variant: per split mean +- sd over seeds; over splits: the seeds' mean-over-split numbers'
    mean +- sd, and the losses against unpruned (accuracy points, BLEU %, share of accuracy)."""
    out = {}
    names = list(dict.fromkeys(r["name"] for r in results))
    for name in names:
        rs = [r for r in results if r["name"] == name]
        have = [s for s in splits if all(s in r["splits"] for r in rs)]
        v = {"seeds": [r["seed"] for r in rs], "budget": rs[0]["budget"], "steps": sorted({r["steps"] for r in rs}),
             "splits": {}, "over_splits": {}}
        if "selected_step" in rs[0]:
            v["selected_steps"] = [r["selected_step"] for r in rs]
        for s in have:
            acc = [r["splits"][s]["accuracy"] for r in rs]
            bl = [r["splits"][s]["bleu"] for r in rs]
            v["splits"][s] = {"accuracy": mean_sd(acc), "bleu": mean_sd(bl),
                              "avg_visual_tokens": rs[0]["splits"][s]["avg_visual_tokens"]}
        ref = {s: refs.get((s, "unpruned")) for s in have}
        if have and all(ref.values()):
            per_seed = []
            for r in rs:
                a = statistics.fmean(r["splits"][s]["accuracy"] for s in have)
                b = statistics.fmean(r["splits"][s]["bleu"] for s in have)
                loss_pts = statistics.fmean(ref[s]["accuracy"] - r["splits"][s]["accuracy"] for s in have)
                share = _mean_ratio([(r["splits"][s]["accuracy"], ref[s]["accuracy"]) for s in have], 100.0, 0.0)
                bleu_loss = _mean_ratio([(r["splits"][s]["bleu"], ref[s]["bleu"]) for s in have], -100.0, 100.0)
                per_seed.append({"seed": r["seed"], "accuracy": a, "bleu": b, "accuracy_loss_points": loss_pts,
                                 "accuracy_share": share, "bleu_loss_pct": bleu_loss})
            v["per_seed"] = per_seed
            v["over_splits"] = {k: mean_sd([p[k] for p in per_seed])
                                for k in ("accuracy", "bleu", "accuracy_loss_points", "accuracy_share", "bleu_loss_pct")}
            v["over_splits_of"] = have
            # the seed to ship: closest to the mean (accuracy and BLEU, each in units of its sd)
            ma, sa = v["over_splits"]["accuracy"]
            mb, sb = v["over_splits"]["bleu"]
            v["closest_to_mean_seed"] = min(per_seed, key=lambda p: ((p["accuracy"] - ma) / (sa or 1)) ** 2 +
                                            ((p["bleu"] - mb) / (sb or 1)) ** 2)["seed"]
        stab = [stability(r["val"], r["steps"]) for r in rs if r["val"]]
        if stab and all(x is not None for x in stab):
            v["val_max_step_change_last_half"] = {"per_seed": stab, "max": max(stab)}
            v["val_curves"] = {r["seed"]: [(x["step"], x["accuracy"], x["bleu"]) for x in r["val"]] for r in rs}
        out[name] = v
    return out


def ablations(results: list[dict], splits: list[str], seeds: list[int]) -> list[dict]:
    """Per budget, the main run (two_stage_<budget>) on the ablations' seeds and splits, then that
    budget's ablations: mean +- sd over seeds of each seed's mean over the splits, and the
    difference of the means to the main run of the same budget."""
    budget_of = {name: budget for name, budget, *_ in VARIANTS}
    rows = []
    for budget in dict.fromkeys(budget_of[n] for n in ABLATION_OF):
        main_name = f"two_stage_{budget}"
        group = []
        for name in [main_name] + [n for n in ABLATION_OF if budget_of[n] == budget]:
            rs = [r for r in results if r["name"] == name and r["seed"] in seeds and all(s in r["splits"] for s in splits)]
            if not rs:
                continue
            acc = [statistics.fmean(r["splits"][s]["accuracy"] for s in splits) for r in rs]
            bl = [statistics.fmean(r["splits"][s]["bleu"] for s in splits) for r in rs]
            group.append({"name": name, "budget": budget,
                          "without": ABLATION_OF.get(name, "— (the shipped recipe; last step)"),
                          "seeds": [r["seed"] for r in rs], "accuracy": mean_sd(acc), "bleu": mean_sd(bl)})
        if len(group) > 1 and group[0]["name"] == main_name:
            for r in group:
                r["d_accuracy"] = r["accuracy"][0] - group[0]["accuracy"][0]
                r["d_bleu"] = r["bleu"][0] - group[0]["bleu"][0]
            rows += group
    return rows


def fmt(ms, digits=1):
    m, s = ms if ms is not None else (None, None)
    if m is None:
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(agg: dict, refs: dict, splits: list[str], meta: dict, abl: list[dict]) -> str:
    lines = [f"# SynthVQA quality grid ({meta['date']}, {meta['machine']})", "",
             f"Heads: each run's last step; for the `_val_selected` settings each run's checkpoint with the best "
             f"val score (the steps column: steps trained, chosen steps); batch {meta['batch_size']}; "
             f"mean ± sd over training seeds. Test splits: " +
             ", ".join(f"{s} ({refs[(s, 'unpruned')]['n_questions']} q + {refs[(s, 'unpruned')]['n_captions']} "
                       f"captions)" for s in splits if (s, "unpruned") in refs) + ".", ""]
    lines += ["## Per split: accuracy % / BLEU", "",
              "| setting | seeds | steps | " + " | ".join(splits) + " |", "|---|---|---|" + "---|" * len(splits)]
    for s_name in ["unpruned"] + sorted({k[1] for k in refs if k[1] != "unpruned"},
                                        key=lambda x: (-int(x.split("@")[1]), x)):
        cells = []
        for s in splits:
            r = refs.get((s, s_name))
            cells.append("—" if r is None or "skipped" in r else f"{r['accuracy']:.1f} / {r['bleu']:.1f}")
        if any(c != "—" for c in cells):
            lines.append(f"| {s_name} | — | — | " + " | ".join(cells) + " |")
    for name, v in agg.items():
        cells = []
        for s in splits:
            x = v["splits"].get(s)
            cells.append("—" if x is None else f"{fmt(x['accuracy'])} / {fmt(x['bleu'])}")
        steps = ", ".join(map(str, v["steps"]))
        if "selected_steps" in v:
            steps += f" (chosen: {', '.join(map(str, v['selected_steps']))})"
        lines.append(f"| {name} | {len(v['seeds'])} | {steps} | " + " | ".join(cells) + " |")
    lines += ["", "## Over splits (each seed's mean over the splits it was evaluated on; then mean ± sd over seeds)",
              "", "| setting | splits | accuracy % | BLEU | accuracy lost (points) | share of unpruned accuracy % | "
              "BLEU lost % | val: largest step-to-step move, last half (points) | shipped seed (closest to mean) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, v in agg.items():
        o = v.get("over_splits") or {}
        st = v.get("val_max_step_change_last_half")
        lines.append(f"| {name} | {', '.join(v.get('over_splits_of', []))} | {fmt(o.get('accuracy'))} | "
                     f"{fmt(o.get('bleu'))} | {fmt(o.get('accuracy_loss_points'), 2)} | {fmt(o.get('accuracy_share'))} | "
                     f"{fmt(o.get('bleu_loss_pct'))} | "
                     f"{'—' if st is None else ', '.join(f'{x:.1f}' for x in st['per_seed'])} | "
                     f"{v.get('closest_to_mean_seed', '—')} |")
    if abl:
        lines += ["", f"## Ablations (splits {', '.join(meta['ablation_splits'])}; seeds "
                      f"{', '.join(map(str, meta['ablation_seeds']))}; Δ: difference of the means to the main run "
                      f"of the same budget, two_stage_<budget>)", "",
                  "| budget | run | what it changes | seeds | accuracy % | BLEU | Δ accuracy | Δ BLEU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in abl:
            lines.append(f"| {r['budget']} | {r['name']} | {r['without']} | {len(r['seeds'])} | {fmt(r['accuracy'])} | "
                         f"{fmt(r['bleu'])} | {r['d_accuracy']:+.1f} | {r['d_bleu']:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True, help="training JSONL")
    p.add_argument("--val", required=True, help="validation JSONL (watched during training)")
    p.add_argument("--split", action="append", required=True, type=lambda s: tuple(s.split("=", 1)),
                   metavar="NAME=PATH", help="a test split (repeat); the first is the main one")
    p.add_argument("--config", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                   metavar="BUDGET=PATH", help="another base config for the 201, 64 or 32 runs (default: configs/synthvqa_*)")
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True, help="results stem: STEM.json, STEM.md")
    p.add_argument("--groups", nargs="+", default=["main", "ablations", "baselines"],
                   choices=["main", "ablations", "baselines"], help="what to run, in this order")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--budget-steps", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                   metavar="BUDGET=STEPS", help="another step count for the runs of one budget (repeat)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--adv-loss", default="hinge", help="the adversarial loss's form (vtprune train --adv-loss)")
    p.add_argument("--budgets", type=int, nargs="+", default=[201, 64, 32], choices=[201, 64, 32],
                   help="the main runs' budgets (e.g. --budgets 64: only the 64-token heads)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the main runs")
    p.add_argument("--seeds-32", type=int, nargs="+", default=None, help="default: --seeds")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ablation-splits", nargs="+", default=None, help="default: every split")
    p.add_argument("--every", type=int, default=50, help="val evaluation interval of the main runs (their "
                                                         "val-selected heads) and of old_recipe (0: none)")
    p.add_argument("--baseline-budgets", type=int, nargs="+", default=[201, 64, 32])
    p.add_argument("--baseline-splits", nargs="+", default=None, help="default: every split")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    for item in a.split:
        if len(item) != 2 or not all(item):
            p.error(f"--split takes NAME=PATH, got {'='.join(item)!r}")
    for item in a.config:
        if len(item) != 2 or item[0] not in ("201", "64", "32"):
            p.error(f"--config takes 201=PATH, 64=PATH or 32=PATH, got {'='.join(item)!r}")
    names = [n for n, _ in a.split]
    if len(set(names)) != len(names):
        p.error(f"--split: each NAME once, got {', '.join(names)}")
    for flag, value, lo in [("--steps", a.steps, 1), ("--batch-size", a.batch_size, 1), ("--every", a.every, 0)]:
        if value < lo:
            p.error(f"{flag} must be >= {lo}, got {value}")
    budget_steps = {}
    for item in a.budget_steps:
        if len(item) != 2 or item[0] not in ("201", "64", "32") or not item[1].isdigit() or int(item[1]) < 1:
            p.error(f"--budget-steps takes 201=N, 64=N or 32=N with N >= 1, got {'='.join(item)!r}")
        budget_steps[int(item[0])] = int(item[1])
    for what, path in [("--train", a.train), ("--val", a.val)] + [(f"--split {n}", f) for n, f in a.split] \
            + [(f"--config {b}", f) for b, f in a.config]:
        if not os.path.isfile(path):  # before anything runs: else a missing split read as "budget not reachable"
            print(f"quality_grid: error: {what}: no such file: {path}", file=sys.stderr)
            return 2
    g = Grid(a)
    splits = [s for s, _ in a.split]
    ablation_splits = a.ablation_splits or splits
    results = []
    try:
        for s in splits:
            g.reference(s, "unpruned")
        for name, budget, overrides, train, group in VARIANTS:
            if group not in a.groups or (group == "main" and budget not in a.budgets):
                continue
            seeds = a.seeds if group == "main" else a.ablation_seeds
            if name == "two_stage_32" and a.seeds_32 is not None:
                seeds = a.seeds_32
            every = a.every if (group == "main" or name == "old_recipe") else 0
            steps = budget_steps.get(budget, a.steps)  # an ablation trains as long as its budget's main runs
            for seed in seeds:
                results.append(g.run(name, budget, overrides, train, seed,
                                     splits if group == "main" else ablation_splits, every, steps))
        if "baselines" in a.groups:
            for s in a.baseline_splits or splits:
                for b in a.baseline_budgets:
                    for policy in BASELINES:
                        g.reference(s, f"{policy}@{b}")
    except VtpruneError as e:
        print(f"quality_grid: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        # whatever is done so far, also after an interruption: every result file under RUNS
        report(a, splits, a.ablation_splits or splits)
    return 0


def report(a, splits, ablation_splits) -> None:
    import platform
    results = []
    for name, *_ in VARIANTS:
        d = os.path.join(a.runs, name)
        if os.path.isdir(d):
            for seed_dir in sorted(os.listdir(d)):
                f = os.path.join(d, seed_dir, "result.json")
                if os.path.exists(f):
                    results.append(read_json(f))
    # each main run's val-selected heads as a setting of its own, after the last-step one
    settings = []
    for name in dict.fromkeys(r["name"] for r in results):
        rs = [r for r in results if r["name"] == name]
        settings += rs
        settings += [{**r, "name": name + "_val_selected", "splits": r["val_selected"]["splits"], "val": [],
                      "selected_step": r["val_selected"]["step"]} for r in rs if "val_selected" in r]
    refs = {}
    ref_dir = os.path.join(a.runs, "reference")
    for s in splits:
        d = os.path.join(ref_dir, s)
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if f.endswith(".json"):
                r = read_json(os.path.join(d, f))
                if "skipped" not in r:
                    refs[(s, f[:-5])] = r
    agg = aggregate(settings, refs, splits)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "steps": a.steps, "budget_steps": {b: int(n) for b, n in a.budget_steps}, "batch_size": a.batch_size, "adv_loss": a.adv_loss, "splits": dict(a.split),
            "ablation_splits": ablation_splits, "ablation_seeds": a.ablation_seeds}
    abl = ablations(results, ablation_splits, a.ablation_seeds)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_json(a.out + ".json", {"meta": meta, "aggregate": agg, "ablations": abl, "runs": results,
                                 "reference": {f"{s}/{k}": v for (s, k), v in refs.items()}})
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(agg, refs, splits, meta, abl))
    log(f"wrote {a.out}.json and {a.out}.md ({len(results)} runs)")


if __name__ == "__main__":
    sys.exit(main())
