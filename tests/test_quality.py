"""Issue 7's machinery: the SynthVQA generator, answer metrics, the evaluation harness, the plot."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vtprune.quality import synthvqa as sv
from vtprune.quality.metrics import bleu, exact_match, normalize_answer

# the research scripts (recipes/train_base.py, select_heads.py) are imported by file name
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))


def test_samples_are_deterministic_and_splits_differ():
    a, objs, qs, cap = sv.sample(3, 7)
    b, objs2, qs2, cap2 = sv.sample(3, 7)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and qs == qs2 and cap == cap2
    c, _, _, _ = sv.sample(1, 7)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert a.size == (336, 336) and 3 <= len(objs) <= 5


def test_answers_match_the_drawn_objects():
    """Every answer follows from the objects, and each object is drawn where it is said to be."""
    for i in range(40):
        img, objs, qs, cap = sv.sample(5, i)
        px = np.asarray(img).astype(int)
        for o in objs:  # the centre pixel has the object's colour
            assert np.abs(px[o.y, o.x] - np.array(sv.COLOURS[o.colour])).max() <= 1
        pairs = {(o.colour, o.shape) for o in objs}
        assert len(pairs) == len(objs)
        for q in qs:
            words = q["question"].rstrip("?").split()
            if q["type"] == "colour":
                shape = words[-1]
                assert [o.colour for o in objs if o.shape == shape] == [q["answer"]]
            elif q["type"] == "shape":
                colour = words[-2]
                assert [o.shape for o in objs if o.colour == colour] == [q["answer"]]
            elif q["type"] == "count":
                assert sv.NUMBERS[sum(o.colour == words[2] for o in objs)] == q["answer"]
            elif q["type"] == "exists":
                assert (((words[-2], words[-1]) in pairs) == (q["answer"] == "yes"))
            elif q["type"] == "left_right":
                a = next(o for o in objs if o.name == " ".join(words[2:4]))
                b = next(o for o in objs if o.name == " ".join(words[-2:]))
                assert q["answer"] == ("left" if a.x < b.x else "right")
        names = [o.name for o in sorted(objs, key=lambda o: o.x)]
        assert all(n in cap for n in names) and cap.index(names[0]) < cap.index(names[-1])


def test_write_split(tmp_path):
    path = sv.write_split(str(tmp_path), "val", 10, progress=False)
    recs = [json.loads(line) for line in open(path)]
    assert len(recs) == 10 * 3  # two questions + one caption per image
    assert {r["type"] for r in recs} == set(sv.QUESTION_TYPES) | {"caption"}
    assert all(os.path.isfile(tmp_path / r["image"]) for r in recs)
    assert len({r["id"] for r in recs}) == len(recs)


def test_normalisation_and_metrics():
    assert normalize_answer("Two.") == normalize_answer("2") == "2"
    assert exact_match("A circle", "circle") and exact_match("The color is Gray!", "colour is grey")
    assert not exact_match("circles", "circle") and not exact_match("left", "right")
    assert bleu(["a red circle and a blue square"], ["a red circle and a blue square"]) == pytest.approx(100.0)
    assert bleu(["a red circle"], ["a blue square and a green diamond"]) < 20
    assert bleu([], []) is None


def test_eval_reports_accuracy_tokens_and_flops(small_engine, tmp_path):
    """The harness scores what the engine answered: an 'answer' equal to the model's own greedy
    output is counted right, anything else wrong."""
    from vtprune import format_prompt
    from vtprune.quality.evaluate import evaluate, load_records, to_markdown

    imgs = []
    for i in range(4):
        img, _, _, _ = sv.sample(9, i)
        img.save(tmp_path / f"{i}.png")
        imgs.append(str(tmp_path / f"{i}.png"))
    own = [r.text for r in small_engine.generate(imgs, [format_prompt("What colour is the square?")] * 4,
                                                  max_new_tokens=6)]
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(4):
            ans = own[i] if i < 3 else own[i] + " extra"
            f.write(json.dumps({"image": f"{i}.png", "question": "What colour is the square?", "answer": ans,
                                "type": "colour"}) + "\n")
        f.write(json.dumps({"image": "0.png", "question": "Describe the image.", "answer": "A red circle.",
                            "type": "caption"}) + "\n")
    res = evaluate(small_engine, load_records(str(tmp_path / "d.jsonl")), max_new_tokens=6, progress=False,
                   predictions_path=str(tmp_path / "pred.jsonl"))
    assert res.n_questions == 4 and res.n_captions == 1
    assert res.accuracy == pytest.approx(75.0) and res.accuracy_by_type == {"colour": pytest.approx(75.0)}
    assert res.bleu is not None and res.avg_visual_tokens == 36.0
    assert res.prefill_gflops == pytest.approx(res.prefill_gflops_unpruned) and res.latency_ms_per_question > 0
    preds = [json.loads(x) for x in open(tmp_path / "pred.jsonl")]
    assert [p["correct"] for p in preds] == [True, True, True, False, None]
    assert "| unpruned | 36.0 | 75.0 |" in to_markdown([res])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vtprune", *args], capture_output=True, text=True, timeout=600)


def test_cli_compare_writes_json_markdown_and_plot(small_dir, tmp_path):
    sv.write_split(str(tmp_path), "test", 3, progress=False)
    cfg = tmp_path / "ts.yaml"
    cfg.write_text("policy: two_stage\ntarget_merge_tokens: 18\nmerge_ratio: 0.5\npruning_layers: [1, 2, 3]\n"
                   "layer_keep_tokens: [12, 9, 6]\npruner_d_internal: 32\n")
    out = tmp_path / "cmp"
    pred = tmp_path / "pred.jsonl"
    r = _cli("eval", "--model", small_dir, "--data", str(tmp_path / "test.jsonl"), "--compare", "--pruning", str(cfg),
             "--budget", "6", "--out", str(out), "--max-new-tokens", "4", "--predictions", str(pred))
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.load(open(str(out) + ".json"))
    names = [x["name"] for x in data["results"]]
    assert names == ["unpruned", "two_stage@11", "visionzip@6", "divprune@6", "random@6", "fastv@11", "pdrop@11",
                     "dart@11", "visionzip@11", "divprune@11", "random@11"]
    skipped = ["fastv@6", "pdrop@6", "dart@6"]  # unreachable on 4 layers
    assert [s["name"] for s in data["skipped"]] == skipped
    # where the run is: each setting's bar (stderr) and each skip (stdout) says "setting i/14"
    order = ["unpruned", "two_stage@11", "fastv@6", "pdrop@6", "dart@6", "visionzip@6", "divprune@6", "random@6",
             "fastv@11", "pdrop@11", "dart@11", "visionzip@11", "divprune@11", "random@11"]
    for i, name in enumerate(order, 1):
        where = r.stdout if name in skipped else r.stderr
        assert f"setting {i}/14 {name}" in where, (name, r.stdout, r.stderr[-3000:])
    assert "setting 3/14 fastv@6: skipped: " in r.stdout
    # --predictions: every setting that ran, 9 records each (3 images: 2 questions + a caption), tagged
    recs = [json.loads(x) for x in open(pred)]
    assert [x["setting"] for x in recs] == [n for n in names for _ in range(9)]
    truth = [json.loads(x) for x in open(tmp_path / "test.jsonl")]
    for name, res in zip(names, data["results"]):
        mine = [x for x in recs if x["setting"] == name]
        assert [(x["id"], x["answer"]) for x in mine] == [(t["id"], t["answer"]) for t in truth]
        assert all(x["correct"] == (None if x["type"] == "caption" else exact_match(x["prediction"], x["answer"]))
                   for x in mine)
        qa = [x["correct"] for x in mine if x["type"] != "caption"]
        assert res["accuracy"] == pytest.approx(100.0 * sum(qa) / len(qa)), name
        caps = [x for x in mine if x["type"] == "caption"]
        assert res["bleu"] == pytest.approx(bleu([x["prediction"] for x in caps], [x["answer"] for x in caps]))
    for x in data["results"]:
        if x["name"] != "unpruned":
            assert abs(x["avg_visual_tokens"] - float(x["name"].split("@")[1])) <= 1.0, x["name"]
    from PIL import Image
    assert Image.open(str(out) + ".png").size == (900, 560)
    assert "| unpruned | 36.0 |" in open(str(out) + ".md").read()


def test_cli_eval_errors_are_one_line(small_dir, tmp_path):
    r = _cli("eval", "--model", small_dir, "--data", str(tmp_path / "none.jsonl"))
    assert r.returncode == 2 and f"eval data {tmp_path / 'none.jsonl'}: not found" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "d.jsonl").write_text("{}\n")
    r = _cli("eval", "--model", small_dir, "--data", str(tmp_path / "d.jsonl"), "--compare", "--pruning", "a.yaml",
             "--pruning", "b.yaml")
    assert r.returncode == 2 and "pruning config a.yaml: not found" in r.stderr
    r = _cli("eval", "--model", small_dir, "--data", str(tmp_path / "d.jsonl"))
    assert r.returncode == 2 and "no usable records (1 line skipped; line 1: 'image' is missing)" in r.stderr


def test_score_matches_transformers(small_dir, small_engine):
    """Continuation log-likelihoods from the engine's teacher-forced decode equal those of
    transformers' LlavaForConditionalGeneration over prompt + continuation."""
    import torch
    from conftest import load_reference, make_image

    from vtprune import format_prompt

    model, processor = load_reference(small_dir)
    images = [make_image(1), make_image(2)]
    prompts = [format_prompt("What is this?"), format_prompt("Count them.")]
    conts = [" A red circle.", " Three"]
    scores = small_engine.score(images, prompts, conts)
    for img, p, c, (lp, greedy) in zip(images, prompts, conts, scores):
        n_p = processor(images=img, text=p, return_tensors="pt")["input_ids"].shape[1]
        inputs = processor(images=img, text=p + c, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        ids = inputs["input_ids"][0]
        lps = torch.log_softmax(logits[n_p - 1:-1], -1)[torch.arange(len(ids) - n_p), ids[n_p:]]
        assert lp == pytest.approx(float(lps.sum()), abs=1e-3)
        assert greedy == bool((logits[n_p - 1:-1].argmax(-1) == ids[n_p:]).all())
    own = small_engine.generate(images[:1], prompts[:1], max_new_tokens=3)[0]
    text = small_engine.prompts.decode(own.token_ids)
    assert small_engine.score(images[:1], prompts[:1], [text])[0][1]  # its own greedy output is greedy


def test_base_training_targets_and_conversations():
    """Stage A's patch labels sit under the objects; stage B's answers are right, labels sit on
    answers only, and a packed row computes each turn exactly as the engine's single-question
    prompt would."""
    import random

    import torch

    from vtprune.engine.inputs import format_prompt
    from train_base import GRID, Examples, patch_labels, pixels, training_questions
    from vtprune.engine.tokenizer import build_tokenizer

    img, objs, qs, cap = sv.sample(4, 2)
    y = patch_labels(objs)
    assert y.shape == (3, GRID, GRID)
    for o in objs:
        r, c = o.y // 14, o.x // 14
        assert y[0, r, c] == 1 + list(sv.COLOURS).index(o.colour) and y[2, r, c] == 1
        assert y[1, r, c] == 1 + sv.SHAPES.index(o.shape)
    assert int(y[2].sum()) == len(objs) and (y[0] == 0).float().mean() > 0.7  # mostly background
    px = pixels([img])
    from transformers import CLIPImageProcessor
    ref = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
        images=[img], return_tensors="pt")["pixel_values"]
    assert (px - ref).abs().max() < 1e-5

    tok = build_tokenizer(384, sv.vocabulary_text())
    ex = Examples(tok, tok.convert_tokens_to_ids("<image>"))
    qa = training_questions(objs, random.Random(0))
    assert {q.split()[0] for q, _ in qa} >= {"What", "How", "Is"} and len(qa) >= 12
    for q, a in qa:  # every training answer agrees with the drawn objects
        if q.startswith("How many"):
            assert a == sv.NUMBERS[sum(o.colour == q.split()[2] for o in objs)]
        elif q.startswith("Is there"):
            assert (a == "yes") == any(f" {o.name}?" in q for o in objs)
        elif q.startswith("What colour"):
            assert a == next(o.colour for o in objs if f" {o.shape}?" in q)
    prefix, turns = ex.turns(qa[:3])
    for (q, a), (ids, labels) in zip(qa[:3], turns):  # prefix + turn == the engine's prompt + answer
        prompt = ex.enc.encode(format_prompt(q))
        assert prefix + ids[: len(prompt) - len(prefix)] == prompt
        assert tok.decode([t for t in labels if t != -100], skip_special_tokens=False) == f" {a}</s>"
        assert all(t == -100 for t in labels[: len(prompt) - len(prefix)])

    # one packed forward == each turn alone behind the image (block mask, positions restart)
    from transformers import LlavaForConditionalGeneration

    from train_base import build_config
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(tok)).eval()
    px, ids, mask, pos, labels, dense = ex.batch(4, 2, 2)
    assert dense.shape == (2, 3, GRID, GRID) and bool((dense[0] == y).all())
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=px).logits
        starts = [t for t in range(1, ids.shape[1]) if pos[1, t] != pos[1, t - 1] + 1 and ids[1, t] != tok.pad_token_id]
        P = int(pos[1, starts[0]])
        ends = starts[1:] + [int((ids[1] != tok.pad_token_id).nonzero().max()) + 1]
        assert len(starts) >= 12 and P > GRID * GRID
        for s_, e_ in zip([P] + starts, [starts[0]] + ends):
            alone = model(input_ids=torch.cat([ids[1, :P], ids[1, s_:e_]])[None], pixel_values=px[1:]).logits[0, P:]
            assert (alone - packed[1, s_:e_]).abs().max() < 1e-5  # 4e-7 measured; 7e-4 without position ids
    # the curriculum hides background visual tokens only (object tokens and text stay visible)
    px, ids, mask, pos, labels, dense = ex.batch(4, 2, 1, background_keep=0.05)
    vis = ids[0] == tok.convert_tokens_to_ids("<image>")
    last = int((ids[0] != tok.pad_token_id).nonzero().max())
    shown = mask[0, 0, last][vis].view(GRID, GRID)  # what the last answer token sees
    assert bool(shown[y[0] > 0].all()) and 0.1 < float(shown.float().mean()) < 0.5
    assert bool(ex.batch(4, 2, 1)[2][0, 0, last][vis].all())


def test_select_heads_keeps_the_best_validation_checkpoint(small_dir, tmp_path):
    """Chunked head training: one validation row per chunk, and best/ holds the weights of the
    best-scoring chunk (re-evaluated here to the same numbers)."""
    import yaml
    from test_training import _write_run

    from vtprune import LlavaEngine
    from vtprune.quality.evaluate import evaluate, load_records
    from select_heads import main

    cfg, data = _write_run(tmp_path, lr=1e-2, temperature=0.1)
    with open(data, "a") as f:  # a caption-type record, so that BLEU is scored too
        f.write(json.dumps({"image": "img0.png", "question": "Describe the image.", "answer": "a red box",
                            "type": "caption"}) + "\n")
    out = tmp_path / "sel"
    assert main(["--model", small_dir, "--config", cfg, "--data", data, "--val", data, "--out", str(out),
                 "--steps", "3", "--every", "1", "--batch-size", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in open(out / "selection.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    best = max(rows, key=lambda r: r["score"])
    header = open(out / "best" / "pruning.yaml").readline()
    assert f"step {best['step']} " in header
    engine = LlavaEngine.from_pretrained(small_dir, pruning=str(out / "best" / "pruning.yaml"))
    again = evaluate(engine, load_records(data), progress=False)
    assert again.accuracy == best["accuracy"] and again.bleu == pytest.approx(best["bleu"])
    assert yaml.safe_load(open(out / "best" / "pruning.yaml"))["weights"] == "pruning.safetensors"
    assert main(["--model", small_dir, "--config", cfg, "--data", data, "--val", data, "--out",
                 str(tmp_path / "bad"), "--steps", "1", "--every", "2"]) == 2


def test_quality_grid_aggregates_over_seeds_and_splits_and_resumes(small_dir, tmp_path):
    """recipes/quality_grid.py on the tiny model: every run's numbers on every split, the mean and
    sd over seeds recomputed from the runs' own files, the shipped seed one of them, val watched
    every --every steps; a rerun redoes only what is missing (a deleted result: its training is
    resumed from the checkpoint, at the last step, so only its evaluation runs again)."""
    import statistics

    from test_training import _write_run
    from quality_grid import main

    cfg, data = _write_run(tmp_path, lr=1e-2, temperature=0.1, lr_schedule="cosine", ema_decay=0.5)
    with open(data, "a") as f:
        f.write(json.dumps({"image": "img0.png", "question": "Describe the image.", "answer": "a red box",
                            "type": "caption"}) + "\n")
    runs, stem = tmp_path / "runs", tmp_path / "res" / "grid"
    argv = ["--model", small_dir, "--train", data, "--val", data, "--split", f"a={data}", "--split", f"b={data}",
            "--config", f"201={cfg}", "--config", f"64={cfg}", "--config", f"32={cfg}", "--runs", str(runs),
            "--out", str(stem), "--groups", "main", "--steps", "2", "--budget-steps", "64=3", "--every", "1",
            "--seeds", "0", "1", "--seeds-32", "0", "--batch-size", "2", "--no-progress"]
    missing = [a if a != f"b={data}" else f"b={tmp_path}/none.jsonl" for a in argv]
    assert main(missing) == 2 and not runs.exists()  # a missing split: refused before anything runs
    bad_args = [["--budget-steps", x] for x in ("64", "65=3", "64=0", "64=x")]  # a budget of the grid, a count >= 1
    bad_args += [["--split", f"a={data}"], ["--steps", "0"], ["--batch-size", "0"], ["--every", "-1"], ["--budgets", "65"]]
    for bad in bad_args:
        with pytest.raises(SystemExit) as e:
            main(argv + bad)
        assert e.value.code == 2 and not runs.exists(), bad
    assert main(argv) == 0
    res = json.load(open(f"{stem}.json"))
    runs_of = {(r["name"], r["seed"]): r for r in res["runs"]}
    assert set(runs_of) == {("two_stage_201", 0), ("two_stage_201", 1), ("two_stage_64", 0), ("two_stage_64", 1),
                            ("two_stage_32", 0)}
    assert [v["step"] for v in runs_of[("two_stage_201", 0)]["val"]] == [1, 2]
    assert [v["step"] for v in runs_of[("two_stage_64", 0)]["val"]] == [1, 2, 3]  # every main run watches val
    # the val-selected heads: the checkpoint with the best val score (the first of equal ones),
    # kept in RUN/best/ and evaluated on every split; a setting of its own in the aggregate
    for (name, seed), r in runs_of.items():
        best = max(r["val"], key=lambda x: x["score"])
        assert r["val_selected"]["step"] == best["step"] and r["val_selected"]["val_accuracy"] == best["accuracy"]
        header = open(runs / name / f"seed{seed}" / "best" / "pruning.yaml").readline()
        assert header.startswith("# chosen on the val split") and f"step {best['step']} of " in header
        assert set(r["val_selected"]["splits"]) == {"a", "b"}
    assert res["aggregate"]["two_stage_201_val_selected"]["selected_steps"] == \
        [runs_of[("two_stage_201", k)]["val_selected"]["step"] for k in (0, 1)]
    from vtprune import LlavaEngine
    from vtprune.quality.evaluate import evaluate, load_records
    eng = LlavaEngine.from_pretrained(small_dir, pruning=str(runs / "two_stage_64" / "seed0" / "best" / "pruning.yaml"))
    assert evaluate(eng, load_records(data), progress=False).accuracy == \
        runs_of[("two_stage_64", 0)]["val_selected"]["splits"]["a"]["accuracy"]
    # --budget-steps 64=3: the 64-token runs train 3 steps (their checkpoint says so), the others --steps
    assert {n: runs_of[(n, 0)]["steps"] for n in ("two_stage_201", "two_stage_64", "two_stage_32")} == \
        {"two_stage_201": 2, "two_stage_64": 3, "two_stage_32": 2}
    assert "step 3 of 3" in open(runs / "two_stage_64" / "seed0" / "train" / "pruning.yaml").read()
    unpruned = {s: json.load(open(runs / "reference" / s / "unpruned.json")) for s in "ab"}
    agg = res["aggregate"]["two_stage_201"]
    per_seed = [statistics.fmean(runs_of[("two_stage_201", k)]["splits"][s]["accuracy"] for s in "ab") for k in (0, 1)]
    assert agg["over_splits"]["accuracy"][0] == pytest.approx(statistics.fmean(per_seed))
    assert agg["over_splits"]["accuracy"][1] == pytest.approx(statistics.stdev(per_seed))
    loss = [statistics.fmean(unpruned[s]["accuracy"] - runs_of[("two_stage_201", k)]["splits"][s]["accuracy"]
                             for s in "ab") for k in (0, 1)]
    assert agg["over_splits"]["accuracy_loss_points"][0] == pytest.approx(statistics.fmean(loss))
    assert agg["closest_to_mean_seed"] in (0, 1)
    assert res["aggregate"]["two_stage_32"]["over_splits"]["accuracy"][1] == 0.0  # one seed: sd 0
    md = open(f"{stem}.md").read()
    assert "| two_stage_64 | 2 | 3 |" in md and "| two_stage_201 | 2 | 2 |" in md and "| unpruned |" in md
    assert "| two_stage_201_val_selected | 2 | 2 (chosen: " in md

    done = {p: os.path.getmtime(p) for p in runs.glob("*/seed*/result.json")}
    redo, left = runs / "two_stage_64" / "seed1" / "result.json", runs / "two_stage_201" / "seed1" / "result.json"
    before = json.load(open(redo))
    os.remove(redo)
    os.remove(left)
    assert main(argv + ["--budgets", "64"]) == 0  # only the 64-token runs: the 201 one stays missing
    after = json.load(open(redo))
    assert after["splits"] == before["splits"]  # the same heads, evaluated again
    assert not left.exists()
    assert all(os.path.getmtime(p) == t for p, t in done.items() if p not in (redo, left))


def test_quality_grid_ablations_compare_with_the_main_run_of_their_budget():
    """Each ablation's delta is to two_stage_<its budget> on the same seeds and splits: the 64-token
    one to two_stage_64, not to two_stage_201; runs missing a split or outside the seeds are left
    out, and a budget whose main run is missing gets no rows."""
    import statistics

    from quality_grid import ablations

    def run(name, seed, acc, bleu_):
        return {"name": name, "seed": seed, "splits": {s: {"accuracy": acc + d, "bleu": bleu_ + d}
                                                       for s, d in (("a", 1.0), ("b", -1.0))}}

    results = [run("two_stage_201", 0, 95.0, 78.0), run("two_stage_201", 1, 97.0, 80.0),
               run("no_gan", 0, 94.0, 77.0), run("no_gan", 1, 94.0, 79.0), run("no_gan", 2, 10.0, 10.0),
               run("two_stage_64", 0, 90.0, 70.0), run("two_stage_64", 1, 92.0, 72.0),
               run("with_gan_64", 0, 85.0, 60.0), run("with_gan_64", 1, 87.0, 64.0)]
    rows = {r["name"]: r for r in ablations(results, ["a", "b"], [0, 1])}
    assert list(rows) == ["two_stage_201", "no_gan", "two_stage_64", "with_gan_64"]
    assert rows["no_gan"]["seeds"] == [0, 1] and rows["no_gan"]["budget"] == 201
    assert rows["no_gan"]["d_accuracy"] == pytest.approx(94.0 - 96.0)
    assert rows["no_gan"]["d_bleu"] == pytest.approx(78.0 - 79.0)
    assert rows["with_gan_64"]["budget"] == 64
    assert rows["with_gan_64"]["d_accuracy"] == pytest.approx(86.0 - 91.0)
    assert rows["with_gan_64"]["d_bleu"] == pytest.approx(62.0 - 71.0)
    assert rows["two_stage_64"]["d_accuracy"] == 0.0
    assert rows["with_gan_64"]["accuracy"][1] == pytest.approx(statistics.stdev([85.0, 87.0]))
    no_main = [r for r in results if r["name"] != "two_stage_64"]
    assert [r["name"] for r in ablations(no_main, ["a", "b"], [0, 1])] == ["two_stage_201", "no_gan"]
    assert ablations(results, ["a", "c"], [0, 1]) == []  # no run has split c
