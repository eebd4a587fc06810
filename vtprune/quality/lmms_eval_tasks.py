"""Local lmms-eval tasks from a `vtprune eval` JSONL file: the same records, scored by lmms-eval.

    python -m vtprune.quality.lmms_eval_tasks --data data/synthvqa/test.jsonl --out tasks/ [--limit N]
    lmms-eval --model vtprune --model_args pretrained=DIR --include_path tasks/ \\
        --tasks synthvqa_qa,synthvqa_mc --output_path logs/

writes tasks/synthvqa.json (the question records: image paths made absolute; captions left out,
they are scored by BLEU), the same records as tasks/synthvqa.jsonl for `vtprune eval --data`,
and two task YAMLs reading it with the `datasets` json builder (no
download):
  synthvqa_qa  generate_until, lmms-eval's exact_match (ignoring case and punctuation); greedy,
               max_new_tokens 32 (vtprune eval's defaults)
  synthvqa_mc  multiple_choice over the answers of the question's kind (colours, shapes, counts,
               yes/no, left/right for SynthVQA; otherwise every answer of the same "type"), acc
Both build the prompt from the question alone (doc_to_text), so the engine sees exactly
vtprune eval's prompt, format_prompt(question).
"""
from __future__ import annotations

import argparse
import json
import os

from ..errors import VtpruneError
from ..files import make_output_dir
from . import synthvqa as sv
from .evaluate import CAPTION, load_records

# SynthVQA's answer sets per question type (vtprune/quality/synthvqa.py)
def _synthvqa_choices() -> dict[str, list[str]]:
    return {"colour": list(sv.COLOURS), "shape": list(sv.SHAPES), "count": list(sv.NUMBERS[:4]),
            "exists": ["yes", "no"], "left_right": ["left", "right"]}


def doc_to_visual(doc):
    from PIL import Image

    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


_QA = """task: {name}_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function vtprune.quality.lmms_eval_tasks.doc_to_visual
doc_to_text: !function vtprune.quality.lmms_eval_tasks.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 32
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""

_MC = """task: {name}_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function vtprune.quality.lmms_eval_tasks.doc_to_visual
doc_to_text: !function vtprune.quality.lmms_eval_tasks.doc_to_text
doc_to_choice: !function vtprune.quality.lmms_eval_tasks.doc_to_choice
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(data: str, out_dir: str, name: str = "synthvqa", limit: int | None = None) -> dict:
    """Write OUT/NAME.json(l), OUT/NAME_qa.yaml and OUT/NAME_mc.yaml from the records of `data` (the
    first `limit` records, as `vtprune eval --limit`). Returns the paths and counts."""
    examples = load_records(data)
    if limit is not None:
        if limit < 1:
            raise VtpruneError(f"--limit must be >= 1, got {limit}")
        examples = examples[:limit]
    qa = [e for e in examples if e.kind != CAPTION]
    if not qa:
        raise VtpruneError(f"{data}: no question records (captions are left out)")
    known = _synthvqa_choices()
    by_type: dict[str, list[str]] = {}
    for e in qa:
        answers = by_type.setdefault(e.kind or "", [])
        if e.answer not in answers:
            answers.append(e.answer)
    docs = []
    for e in qa:
        choices = known.get(e.kind) or by_type[e.kind or ""]
        if e.answer not in choices:
            choices = choices + [e.answer]
        docs.append({"id": str(e.id), "image": os.path.abspath(os.fspath(e.image)), "question": e.question,
                     "answer": e.answer, "type": e.kind or "", "choices": list(choices)})
    make_output_dir(out_dir, "--out")
    json_path = os.path.abspath(os.path.join(out_dir, f"{name}.json"))
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(docs, f, indent=0)
    # the same records for `vtprune eval --data NAME.jsonl` (its format, image paths absolute)
    jsonl_path = json_path[:-len(".json")] + ".jsonl"
    with open(jsonl_path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({k: d[k] for k in ("id", "image", "question", "answer", "type")}) + "\n")
    paths = {"data": json_path, "jsonl": jsonl_path}
    for kind, template in (("qa", _QA), ("mc", _MC)):
        paths[kind] = os.path.join(out_dir, f"{name}_{kind}.yaml")
        with open(paths[kind], "w", encoding="utf-8") as f:
            f.write(template.format(name=name, data=json.dumps(json_path)))
    return {**paths, "questions": len(qa), "captions_left_out": len(examples) - len(qa)}


def main(argv=None) -> int:
    import sys

    p = argparse.ArgumentParser(prog="python -m vtprune.quality.lmms_eval_tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help='JSONL: {"image", "question", "answer"[, "type", "id"]} per line')
    p.add_argument("--out", required=True, help="folder for NAME.json and the task YAMLs (lmms-eval --include_path)")
    p.add_argument("--name", default="synthvqa", help="task name prefix (NAME_qa, NAME_mc)")
    p.add_argument("--limit", type=int, default=None, help="the first N records only")
    a = p.parse_args(argv)
    try:
        r = write_tasks(a.data, a.out, a.name, a.limit)
    except VtpruneError as e:
        print(f"vtprune: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['data']} and {r['jsonl']} ({r['questions']} questions, {r['captions_left_out']} captions "
          f"left out), {r['qa']}, {r['mc']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
