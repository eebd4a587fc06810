"""Train two-stage heads in chunks and keep the chunk that scores best on a validation split.

    python recipes/select_heads.py --model DIR --config CFG.yaml --data train.jsonl \
        --val val.jsonl --out RUN --steps 600 --every 100 [--batch-size 8]

Why: on the SynthVQA model the heads' noise-free (inference) accuracy moves by several points
from one few-hundred-step checkpoint to the next while the training loss, measured with Gumbel
noise, hardly changes (the runs that showed it: README "Measured quality", step 2). So the
checkpoint is chosen on held-out data, never on the test split.

Score of a checkpoint: accuracy / unpruned accuracy + BLEU / unpruned BLEU (each term whose
metric the split has). Writes RUN/selection.jsonl (one line per checkpoint) and RUN/best/
(pruning.safetensors + pruning.yaml, the chosen step in the yaml's header comment).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from vtprune.engine.engine import LlavaEngine  # noqa: E402
from vtprune.errors import VtpruneError  # noqa: E402
from vtprune.quality.evaluate import evaluate, load_records  # noqa: E402
from vtprune.training.trainer import TrainSettings, Trainer  # noqa: E402
from vtprune.validate import check_int  # noqa: E402


def score(result, unpruned) -> float:
    total = 0.0
    if result.accuracy is not None and unpruned.accuracy:
        total += result.accuracy / unpruned.accuracy
    if result.bleu is not None and unpruned.bleu:
        total += result.bleu / unpruned.bleu
    return total


def select(model: str, config: str, data: str, val: str, out: str, steps: int, every: int,
           batch_size: int = 8, seed: int = 0, progress: bool = True, adv_loss: str = "hinge") -> dict:
    check_int(steps, "--steps", 1)
    check_int(every, "--every", 1)
    if steps < every:
        raise VtpruneError(f"select_heads: need 1 <= --every <= --steps, got every={every}, steps={steps}")
    examples = load_records(val)
    tr = Trainer(TrainSettings(model=model, config=config, data=data, out=out, steps=steps, batch_size=batch_size,
                               seed=seed, save_every=every, progress=progress, adv_loss=adv_loss))
    engine = LlavaEngine.from_pretrained(model, device=tr.device, dtype=tr.dtype)
    unpruned = evaluate(engine, examples, name="unpruned", progress=False)
    log_path = os.path.join(out, "selection.jsonl")
    best = None
    with open(log_path, "w", encoding="utf-8") as log:
        while tr.step < steps:
            tr.train(stop_after=every)
            engine.set_pruning(os.path.join(out, "pruning.yaml"))
            r = evaluate(engine, examples, name=f"step {tr.step}", progress=False)
            s = score(r, unpruned)
            row = {"step": tr.step, "score": s, "accuracy": r.accuracy, "bleu": r.bleu,
                   "unpruned_accuracy": unpruned.accuracy, "unpruned_bleu": unpruned.bleu,
                   "accuracy_by_type": r.accuracy_by_type}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"step {tr.step}: accuracy {r.accuracy}, BLEU {r.bleu}, score {s:.4f}", file=sys.stderr)
            if best is None or s > best["score"]:
                best = row
                dst = os.path.join(out, "best")
                os.makedirs(dst, exist_ok=True)
                shutil.copy(os.path.join(out, "pruning.safetensors"), os.path.join(dst, "pruning.safetensors"))
                with open(os.path.join(out, "pruning.yaml"), encoding="utf-8") as f:
                    body = f.read()
                with open(os.path.join(dst, "pruning.yaml"), "w", encoding="utf-8") as f:
                    f.write(f"# chosen on {os.path.basename(val)}: step {tr.step} (score {s:.4f}, accuracy "
                            f"{r.accuracy}, BLEU {r.bleu}); see ../selection.jsonl\n" + body)
    tr.close()
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--val", required=True, help="validation JSONL (questions and/or captions)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, default=100, help="steps between evaluated checkpoints")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adv-loss", default="hinge", help="hinge or non_saturating (vtprune train's)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        best = select(a.model, a.config, a.data, a.val, a.out, a.steps, a.every, a.batch_size, a.seed,
                      not a.no_progress, a.adv_loss)
    except VtpruneError as e:
        print(f"select_heads: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
