"""Issue 17: prompts with several images or none (the engine against transformers), the lmms-eval
plugin's logic (no lmms-eval needed), and the real lmms-eval 0.7.3 end to end (its CLI on the
embedded model, single process and two gloo processes, against `vtprune eval`).

The lmms-eval tests run lmms-eval in its own environment: VTPRUNE_LMMS_PYTHON names its python
(.ci/run installs lmms-eval 0.7.3 into a venv with --system-site-packages and sets it); without
it they use this interpreter when it can import lmms_eval, and skip (with that reason) otherwise.
"""
import glob
import importlib.util
import json
import os
import sys

import pytest
import torch
from conftest import make_image
from hostile import ROOT, run

from vtprune import LlavaEngine, format_prompt
from vtprune.errors import VtpruneError
from vtprune.quality import lmms_eval_plugin as plugin
from vtprune.quality.lmms_eval_plugin import EngineLMM, Generation, build_prompt, generation_settings

ASSET = os.path.join(ROOT, "vtprune", "assets", "synthvqa-llava")


# ----------------------------------------------------------------------------- engine
def _reference_inputs(proc, images, prompt):
    ims = None if images is None else (images if isinstance(images, list) else [images])
    return proc(images=ims, text=prompt, return_tensors="pt")


def test_several_images_and_text_only_match_transformers(engine, reference):
    """One batch mixing a two-image prompt, a text-only prompt and a one-image prompt: each row's
    logits equal transformers' (which pairs the <image> placeholders with the images in order)
    and so do 8 greedy tokens."""
    model, proc = reference
    a, b, c = make_image(1), make_image(2, 200, 300), make_image(3)
    prompts = ["USER: <image>\n<image>\nWhich one is brighter? ASSISTANT:", "USER: What is two plus two? ASSISTANT:",
               format_prompt("What is it?")]
    images = [[a, b], None, c]
    ours = engine.next_token_logits(images, prompts)
    for i, (im, p) in enumerate(zip(images, prompts)):
        inputs = _reference_inputs(proc, im, p)
        with torch.no_grad():
            ref = model(**inputs).logits[0, -1].float()
        assert ref.abs().max() > 1.0
        assert (ours[i] - ref).abs().max().item() < 1e-4, f"prompt {i}"
    results = engine.generate(images, prompts, max_new_tokens=8)
    for i, (im, p) in enumerate(zip(images, prompts)):
        inputs = _reference_inputs(proc, im, p)
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
        eos = engine.eos_token_ids
        if any(t in eos for t in ref):
            ref = ref[: next(j for j, t in enumerate(ref) if t in eos) + 1]
        assert results[i].token_ids == ref, f"prompt {i}"
    assert [r.stats["visual_tokens"] for r in results] == [2 * 576, 0, 576]
    assert [r.stats["visual_tokens_per_layer"][0] for r in results] == [2 * 576, 0, 576]
    # the two images swapped: a different prompt (the order is the placeholders' order)
    swapped = engine.next_token_logits([[b, a]], prompts[:1])
    assert (swapped[0] - ours[0]).abs().max().item() > 1e-3


def test_text_only_batch_runs_no_vision_pass(small_engine, monkeypatch):
    want = small_engine.generate([None, None], ["USER: Hi ASSISTANT:", "USER: Count to three ASSISTANT:"],
                                 max_new_tokens=5)

    def no_vision(*a, **k):
        raise AssertionError("the vision tower ran for a text-only batch")

    monkeypatch.setattr(small_engine.model.vision, "forward", no_vision)
    got = small_engine.generate([None, None], ["USER: Hi ASSISTANT:", "USER: Count to three ASSISTANT:"],
                                max_new_tokens=5)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert small_engine.score(None, "USER: Hi ASSISTANT:", " hello")[0][0] < 0
    with pytest.raises(VtpruneError, match=r"prompt 0 has 1 '<image>' placeholder but no image"):
        small_engine.generate([None], [format_prompt("q")])
    with pytest.raises(VtpruneError, match=r"prompt 0 has 2 '<image>' placeholders but 1 image: .*a list of 2"):
        small_engine.generate([make_image(0)], ["<image><image> q"])


def test_pruning_refuses_several_images_and_runs_text_only_unpruned(small_dir):
    eng = LlavaEngine.from_pretrained(small_dir, device="cpu", dtype=torch.float32,
                                      pruning={"policy": "random", "budget": 16})
    im = make_image(4)
    with pytest.raises(VtpruneError, match=r"prompt 1: pruning policy 'random' prunes the visual tokens of one "
                                           r"image per prompt, this prompt has 2"):
        eng.generate([im, [im, im]], [format_prompt("a"), "USER: <image> <image> b ASSISTANT:"], max_new_tokens=2)
    with pytest.raises(VtpruneError, match=r"prompt 1 has no image and others have one"):
        eng.generate([im, None], [format_prompt("a"), "USER: b ASSISTANT:"], max_new_tokens=2)
    text = ["USER: Hello there ASSISTANT:"]
    pruned = eng.generate([None], text, max_new_tokens=6)[0]
    pruned_score = eng.score([None], text, [" hello"])[0]
    assert eng.generate([im], [format_prompt("a")], max_new_tokens=2)[0].stats["visual_tokens"] == 16
    eng.set_pruning(None)
    plain = eng.generate([None], text, max_new_tokens=6)[0]
    assert pruned.token_ids == plain.token_ids
    assert pruned.stats["visual_tokens_per_layer"] == plain.stats["visual_tokens_per_layer"] == [0] * eng.cfg.text.num_layers
    assert pruned_score[0] == pytest.approx(eng.score([None], text, [" hello"])[0][0], abs=1e-5)


# ----------------------------------------------------------------------------- plugin logic
@pytest.mark.parametrize("gen, want", [
    (None, Generation((), 1024, 0.0, 1.0)),
    ({"until": "\n", "max_new_tokens": 16}, Generation(("\n",), 16, 0.0, 1.0)),
    ({"until": ["", "ASSISTANT:"], "temperature": 0, "top_p": 0, "num_beams": 1}, Generation(("ASSISTANT:",), 1024, 0.0, 1.0)),
    ({"temperature": 0.2, "do_sample": False, "top_p": 0.9}, Generation((), 1024, 0.0, 1.0)),   # explicit greedy
    ({"temperature": 0.7, "top_p": 0.9}, Generation((), 1024, 0.7, 0.9)),      # the llava wrappers' rule
    ({"do_sample": True}, Generation((), 1024, 1.0, 1.0)),                     # transformers' default temperature
    ({"do_sample": True, "temperature": 0.5, "top_p": None}, Generation((), 1024, 0.5, 1.0)),
])
def test_generation_settings(gen, want):
    assert generation_settings(gen) == want


@pytest.mark.parametrize("gen, needle", [
    ({"num_beams": 4}, "num_beams=4: beam search is not implemented"),
    ({"repetition_penalty": 1.2}, "repetition_penalty=1.2: repetition_penalty is not implemented"),
    ({"top_k": 50}, "top_k=50"),
    ({"max_new_tokens": 0}, "max_new_tokens=0: expected an integer >= 1"),
    ({"temperature": -1}, "temperature=-1: expected a number >= 0"),
    ({"do_sample": True, "temperature": 0.5, "top_p": 1.5}, "top_p=1.5: expected a number in (0, 1]"),
    ({"until": 3}, "until=3: expected a string or a list of strings"),
    ({"do_sample": "yes"}, "do_sample='yes': expected true or false"),
])
def test_generation_settings_refusals(gen, needle):
    with pytest.raises(VtpruneError) as e:
        generation_settings(gen)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_generation_settings_ignored_keys_and_batch_size():
    ignored = set()
    generation_settings({"image_aspect_ratio": "original", "max_new_tokens": 8}, ignored=ignored)
    assert ignored == {"image_aspect_ratio='original'"}
    assert plugin.parse_batch_size(8) == (8, False) and plugin.parse_batch_size("16") == (16, False)
    assert plugin.parse_batch_size("auto") == (plugin.AUTO_BATCH_START, True)
    assert plugin.parse_batch_size("auto:4", 12) == (12, True)
    for bad in ("0", "many", 0, True):
        with pytest.raises(VtpruneError, match="batch_size"):
            plugin.parse_batch_size(bad)
    with pytest.raises(VtpruneError, match="max_batch_size"):
        plugin.parse_batch_size(1, 0)


def test_build_prompt():
    assert build_prompt("What is it?", 1) == format_prompt("What is it?")
    assert build_prompt("<image>\nWhat is it?", 1) == format_prompt("What is it?")
    assert build_prompt("Compare them.", 2) == "USER: <image> <image>\nCompare them. ASSISTANT:"
    assert build_prompt("First <image> then <image>, same?", 2) == "USER: First <image> then <image>, same? ASSISTANT:"
    assert build_prompt("2 + 2?", 0) == "USER: 2 + 2? ASSISTANT:"
    assert build_prompt("", 0) == ""
    assert build_prompt("Q?", 1, "A chat.") == "A chat. " + format_prompt("Q?")
    with pytest.raises(VtpruneError, match="the context has 1 '<image>' placeholders and the doc 2 visuals"):
        build_prompt("<image> Q?", 2)


class _Req:
    def __init__(self, *args, task_name=None, doc_id=None):
        self.args, self.task_name, self.doc_id = args, task_name, doc_id


def _docs():
    a, b = make_image(5), make_image(6)
    return [{"v": [a], "q": "What colour?"}, {"v": [a, b], "q": "Which is bigger?"}, {"v": [], "q": "Say hi"},
            {"v": ["clip.mp4"], "q": "What happens?"}, {"v": [b], "q": "<image>\nHow many?"},
            {"v": [a], "q": "Shape?"}]


def _lmm(engine, **kw):
    lmm = EngineLMM("unused", engine=engine, progress=False, **kw)
    lmm.task_dict = {"t": {"test": _docs()}}
    return lmm


def test_generate_until_batches_mixed_docs_and_rejects_one_by_one(small_engine, small_dir, capsys):
    """Docs with one, two and no image and a video, batched two by two: the answers equal the
    engine's own (format_prompt prompts, the until string honoured), the video is rejected alone
    (counted and reported), the run goes on; under a pruning policy the two-image doc is rejected too."""
    docs = _docs()
    gen = {"until": ["\n"], "max_new_tokens": 4, "temperature": 0, "do_sample": False}
    reqs = [_Req(d["q"], dict(gen), lambda d: d["v"], i, "t", "test") for i, d in enumerate(docs)]
    texts = _lmm(small_engine, batch_size=2).generate_until(reqs)
    prompts = [format_prompt("What colour?"), "USER: <image> <image>\nWhich is bigger? ASSISTANT:",
               "USER: Say hi ASSISTANT:", None, format_prompt("How many?"), format_prompt("Shape?")]
    for i, p in enumerate(prompts):
        if p is None:
            assert texts[i] == ""
            continue
        im = docs[i]["v"][0] if len(docs[i]["v"]) == 1 else (docs[i]["v"] or None)
        want = small_engine.generate([im], [p], max_new_tokens=4, stop=["\n"])[0].text
        assert texts[i] == want, f"doc {i}"
    err = capsys.readouterr().err
    assert "vtprune: task t: rejected 1 of 6 generate_until requests (1 docs, e.g. doc 3; scored as wrong): " \
           "visual 0 is a video or file path, not an image" in err
    pruned = LlavaEngine.from_pretrained(small_dir, device="cpu", dtype=torch.float32,
                                         pruning={"policy": "random", "budget": 16})
    lmm = _lmm(pruned, batch_size=4)
    texts = lmm.generate_until(reqs)
    assert texts[1] == texts[3] == "" and all(texts[i] == pruned.generate(
        [docs[i]["v"][0]], [prompts[i]], max_new_tokens=4, stop=["\n"])[0].text for i in (0, 4, 5))
    err = capsys.readouterr().err
    assert "rejected 2 of 6 generate_until requests (2 docs, e.g. doc 1, 3" in err
    assert "pruning policy 'random' prunes the visual tokens of one image per prompt, this prompt has 2" in err
    with pytest.raises(VtpruneError, match="num_beams=2: beam search is not implemented"):
        lmm.generate_until([_Req("q", {"num_beams": 2}, lambda d: d["v"], 0, "t", "test")])


def test_loglikelihood_is_the_llava_wrappers_loss_batched_through_score(small_engine):
    """(mean NLL per continuation token, is_greedy) from LlavaEngine.score, batched (choices of a
    doc together) == one by one; string, callable and unconditional (acc_mutual_info) requests."""
    docs = _docs()
    to_visual = (lambda d: d["v"])
    reqs = []
    for i in (0, 1, 2, 4):
        for choice in ("red", "two words", "yes"):
            reqs.append(_Req(docs[i]["q"], " " + choice, to_visual, i, "t", "test"))
    reqs.append(_Req(docs[5]["q"], lambda d: "square", to_visual, 5, "t", "test"))
    reqs.append(_Req("", "yes", task_name="t", doc_id=0))
    lmm = _lmm(small_engine, batch_size=5)
    got = lmm.loglikelihood(reqs)
    one = _lmm(small_engine, batch_size=1).loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in one]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in one], abs=1e-4)
    for r, (loss, greedy) in zip(reqs, got):
        if len(r.args) == 2:
            prompt, im, cont = "", None, " yes"
        else:
            d = docs[r.args[3]]
            n = len(d["v"])
            prompt = build_prompt(d["q"], n)
            im = d["v"][0] if n == 1 else (d["v"] or None)
            cont = r.args[1] if isinstance(r.args[1], str) else " square"
        logp, want_greedy = small_engine.score([im], [prompt], [cont])[0]
        n_tok = len(small_engine.prompts.continuation(prompt, cont))
        assert loss > 0 and loss == pytest.approx(-logp / n_tok, abs=1e-4) and greedy == want_greedy
    # the sign lmms-eval's multiple_choice expects: argmin picks the engine's most likely choice
    losses = [v for v, _ in got[:3]]
    lps = [small_engine.score([docs[0]["v"][0]], [format_prompt("What colour?")], [" " + c])[0][0] / len(
        small_engine.prompts.continuation(format_prompt("What colour?"), " " + c)) for c in ("red", "two words", "yes")]
    assert min(range(3), key=losses.__getitem__) == max(range(3), key=lps.__getitem__)


# ----------------------------------------------------------------------------- the real lmms-eval
def _lmms_python() -> str:
    py = os.environ.get("VTPRUNE_LMMS_PYTHON")
    if py:
        assert os.path.isfile(py), f"VTPRUNE_LMMS_PYTHON={py}: no such file"
        return py
    if importlib.util.find_spec("lmms_eval") is not None:
        return sys.executable
    pytest.skip("lmms-eval is not installed here: .ci/run installs lmms-eval 0.7.3 into a venv and sets "
                "VTPRUNE_LMMS_PYTHON to its python (README: Evaluating with lmms-eval)")


def _entry_point_dir(tmp) -> str:
    """A dist-info holding pyproject.toml's lmms_eval.models entry points (what `pip install`
    writes), so that the checkout's declaration is the one lmms-eval reads."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["lmms_eval.models"]
    d = os.path.join(tmp, "site", "vtprune_checkout-0.0.dist-info")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: vtprune-checkout\nVersion: 0.0\n")
    with open(os.path.join(d, "entry_points.txt"), "w") as f:
        f.write("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return os.path.dirname(d)


# all 48 question records of a 24-image SynthVQA test split (seed 3): pruning_64 of 2026-12-07 (900-step
# heads) answers one wrong (record 45, left/right), which the comparison below needs to be able to fail
N_RECORDS = 48
PRUNING = os.path.join(ASSET, "pruning_64.yaml")


@pytest.fixture(scope="module")
def lmms_setup(tmp_path_factory):
    py = _lmms_python()
    tmp = str(tmp_path_factory.mktemp("lmms"))
    from vtprune.quality.lmms_eval_tasks import write_tasks
    from vtprune.quality.synthvqa import write_split

    data = write_split(os.path.join(tmp, "sv"), "test", 24, with_captions=False, progress=False)
    tasks = write_tasks(data, os.path.join(tmp, "tasks"))
    env = {"PYTHONPATH": ROOT + os.pathsep + _entry_point_dir(tmp), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRITON_INTERPRET": "0", "HF_HOME": os.path.join(tmp, "hf"), "TOKENIZERS_PARALLELISM": "false"}
    return {"py": py, "tmp": tmp, "data": data, "tasks": tasks, "env": env}


def _lmms_cmd(s, out, *extra, launcher=(), limit=N_RECORDS):
    model_args = f"pretrained={ASSET},pruning={PRUNING},dtype=float32"
    return [*launcher, "--model", "vtprune", "--model_args", model_args, "--device", "cpu",
            "--tasks", "synthvqa_qa,synthvqa_mc", "--include_path", os.path.dirname(s["tasks"]["qa"]),
            "--batch_size", "8", "--limit", str(limit), "--output_path", out, "--log_samples", *extra]


def _results(out):
    res = json.load(open(glob.glob(os.path.join(out, "*", "*_results.json"))[0]))["results"]
    samples = {}
    for task in ("synthvqa_qa", "synthvqa_mc"):
        path = glob.glob(os.path.join(out, "*", f"*_samples_{task}.jsonl"))[0]
        samples[task] = sorted((json.loads(ln) for ln in open(path)), key=lambda r: r["doc_id"])
    return (res["synthvqa_qa"]["exact_match,none"], res["synthvqa_mc"]["acc,none"]), samples


@pytest.fixture(scope="module")
def single_run(lmms_setup):
    s = lmms_setup
    out = os.path.join(s["tmp"], "single")
    lmms_eval = os.path.join(os.path.dirname(s["py"]), "lmms-eval")
    launcher = [lmms_eval] if os.path.isfile(lmms_eval) else [s["py"], "-m", "lmms_eval"]
    r = run(_lmms_cmd(s, out, launcher=launcher), env=s["env"], timeout=900)
    assert r.returncode == 0 and glob.glob(os.path.join(out, "*", "*_results.json")), r.stdout[-3000:] + r.stderr[-5000:]
    assert "Error during evaluation" not in r.stdout + r.stderr, r.stderr[-5000:]
    return _results(out), r


def test_lmms_eval_cli_equals_vtprune_eval(lmms_setup, single_run):
    """`lmms-eval --model vtprune` (found through the entry point, pruning_64) on a local SynthVQA
    task: generate_until's exact match and multiple_choice's acc equal `vtprune eval`'s accuracy
    on the same N_RECORDS records, answer by answer; multiple_choice picks the greedy answer everywhere."""
    s = lmms_setup
    (qa_acc, mc_acc), samples = single_run[0]
    preds = os.path.join(s["tmp"], "preds.jsonl")
    r = run([sys.executable, "-m", "vtprune", "eval", "--model", ASSET, "--data", s["tasks"]["jsonl"], "--pruning", PRUNING,
             "--limit", str(N_RECORDS), "--batch-size", "8", "--no-progress", "--predictions", preds],
            env={"TRITON_INTERPRET": "0"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in open(preds)]
    first = [json.loads(ln) for ln in open(s["data"])][:N_RECORDS]  # the writer kept the records and their order
    assert [row["id"] for row in rows] == [rec["id"] for rec in first]
    want = sum(row["correct"] for row in rows) / len(rows)
    assert len(rows) == N_RECORDS and 0.9 <= want < 1.0  # a run with a wrong answer: the comparison can fail
    assert qa_acc == pytest.approx(want, abs=1e-12) and mc_acc == pytest.approx(want, abs=1e-12)
    assert [x["filtered_resps"][0] if isinstance(x["filtered_resps"], list) else x["filtered_resps"]
            for x in samples["synthvqa_qa"]] == [row["prediction"] for row in rows]
    docs = json.load(open(s["tasks"]["data"]))
    for x, row, doc in zip(samples["synthvqa_mc"], rows, docs):
        losses = [float(v[0]) for v in x["filtered_resps"]]
        picked = doc["choices"][min(range(len(losses)), key=losses.__getitem__)]
        assert picked == row["prediction"], doc["id"]
    assert "Model Responding" in single_run[1].stderr  # the progress bar


DP_RECORDS = 16  # the first 16 of the single run's 48 (CI time)


def test_lmms_eval_two_gloo_processes_equal_one(lmms_setup, single_run):
    """torchrun with 2 CPU processes (gloo): each rank gets its share of the docs and the gathered
    results equal the single-process run's, doc by doc (its first DP_RECORDS docs)."""
    s = lmms_setup
    out = os.path.join(s["tmp"], "dp")
    launcher = [s["py"], "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(29500 + os.getpid() % 1000), "-m", "lmms_eval"]
    # two processes on the CI's two cores: one thread each; the legacy plugin variable on top
    # of the entry point (both name the same class)
    env = {**s["env"], "OMP_NUM_THREADS": "1", "LMMS_EVAL_PLUGINS": "vtprune.quality.lmms"}
    r = run(_lmms_cmd(s, out, launcher=launcher, limit=DP_RECORDS), env=env, timeout=900)
    assert r.returncode == 0 and glob.glob(os.path.join(out, "*", "*_results.json")), r.stdout[-3000:] + r.stderr[-5000:]
    accs, samples = _results(out)
    want_samples = {t: v[:DP_RECORDS] for t, v in single_run[0][1].items()}
    assert accs == tuple(sum(x[m] for x in want_samples[t]) / DP_RECORDS
                         for t, m in (("synthvqa_qa", "exact_match"), ("synthvqa_mc", "acc")))
    # rank 0's progress bar: its 8 of the 16 generate_until docs (the other 8 are rank 1's)
    bars = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.startswith("Model Responding: 100%")]
    assert any(f"| {DP_RECORDS // 2}/{DP_RECORDS // 2} [" in b for b in bars), bars
    assert not any(f"| {DP_RECORDS}/{DP_RECORDS} [" in b for b in bars), bars
    for task in samples:
        got = [(x["doc_id"], x["filtered_resps"]) for x in samples[task]]
        want = [(x["doc_id"], x["filtered_resps"]) for x in want_samples[task]]
        assert [d for d, _ in got] == list(range(DP_RECORDS))
        if task == "synthvqa_qa":
            assert got == want
        else:  # losses: another batch composition, float noise only
            for (_, g), (_, w) in zip(got, want):
                assert [v[1] for v in g] == [v[1] for v in w]
                assert [float(v[0]) for v in g] == pytest.approx([float(v[0]) for v in w], rel=1e-4, abs=1e-5)
    assert r.stdout.count("|synthvqa_qa|") == 1  # one results table (rank 0)


_REGISTRATION = r"""
import contextlib, io, json, sys
from lmms_eval.models import get_model
from lmms_eval import evaluator
cls = get_model("vtprune")
out = {"class": cls.__module__ + "." + cls.__name__}
def err(fn):
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        try:
            fn()
        except SystemExit as e:
            return e.code, buf.getvalue()
    return None, buf.getvalue()
out["twice"] = err(lambda: cls.create_from_arg_string("pretrained=X,device=cpu", {"device": "cuda", "batch_size": 1}))
out["unknown"] = err(lambda: cls.create_from_arg_string("pretrained=X,beams=2", {}))
out["missing"] = err(lambda: cls.create_from_arg_string(f"pretrained={sys.argv[1]}/nope", {}))
lm = cls.create_from_arg_string(f"pretrained={sys.argv[1]},dtype=float32,batch_size=auto",
                                {"batch_size": 1, "max_batch_size": 4, "device": "cpu"})
out["batch"] = [lm.batch_size, str(lm.device), lm.rank, lm.world_size]
out["unwrap"] = list(evaluator.unwrap_generation_output((0.25, True)))
out["unwrap_text"] = list(evaluator.unwrap_generation_output("text"))
class R:
    args = ("q", {"num_beams": 3}, lambda d: [], 0, "t", "test")
lm.task_dict = {"t": {"test": [{}]}}
out["beams"] = err(lambda: lm.generate_until([R()]))
import importlib.util, os
from lmms_eval.models import ModelRegistryV2, _merge_legacy_plugin_models
os.environ["LMMS_EVAL_PLUGINS"] = "vtprune.quality.lmms"
legacy = ModelRegistryV2()
_merge_legacy_plugin_models(legacy)
out["legacy"] = [legacy.resolve("vtprune").class_path, importlib.util.find_spec("vtprune.quality.lmms.tasks") is not None]
import lmms_eval.models as M
from lmms_eval.api.registry import MODEL_REGISTRY
M.MODEL_REGISTRY_V2 = ModelRegistryV2()  # as without the entry point: the launcher registers it
from vtprune.quality.lmms_eval_plugin import register
register()
out["launcher"] = [M.get_model("vtprune").__name__, MODEL_REGISTRY["vtprune"].__name__]
print("RESULT " + json.dumps(out))
"""


def test_lmms_eval_registration_and_one_line_refusals(lmms_setup, small_dir):
    """The entry point resolves --model vtprune to the importable class (so do LMMS_EVAL_PLUGINS
    and the launcher's register()); model_args given twice,
    unknown ones, a bad model directory and num_beams > 1 end with one `vtprune: error:` line and
    status 2; batch_size auto starts at --max_batch_size; the (ll, is_greedy) pairs survive
    lmms-eval's response unwrapping."""
    s = lmms_setup
    r = run([s["py"], "-c", _REGISTRATION, small_dir], env=s["env"], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["class"] == plugin.MODEL_CLASS
    assert out["twice"] == [2, "vtprune: error: device given twice: device=cpu in --model_args and cuda on the "
                               "command line\n"]
    assert out["unknown"][0] == 2 and out["unknown"][1].startswith("vtprune: error: unknown model_args beams")
    assert out["missing"][0] == 2 and "model directory" in out["missing"][1] and out["missing"][1].endswith("nope: not found\n")
    assert out["missing"][1].count("\n") == 1
    assert out["batch"] == [4, "cpu", 0, 1]
    assert out["unwrap"] == [[0.25, True], None] and out["unwrap_text"] == ["text", None]
    assert out["beams"][0] == 2 and out["beams"][1].startswith("vtprune: error: generation kwarg num_beams=3: beam "
                                                              "search is not implemented")
    assert out["beams"][1].count("\n") == 1
    assert out["legacy"] == [plugin.MODEL_CLASS, True]
    assert out["launcher"] == ["VtpruneLMM", "VtpruneLMM"]


def test_task_writer_keeps_question_records_and_choices(tmp_path):
    from vtprune.quality.lmms_eval_tasks import write_tasks

    make_image(0).save(tmp_path / "a.png")
    recs = [{"id": 1, "image": "a.png", "question": "What colour is the circle?", "answer": "red", "type": "colour"},
            {"id": 2, "image": "a.png", "question": "Describe the image.", "answer": "A red circle.", "type": "caption"},
            {"id": 3, "image": "a.png", "question": "Animal?", "answer": "cat", "type": "pet"},
            {"id": 4, "image": "a.png", "question": "Animal?", "answer": "dog", "type": "pet"},
            {"id": 5, "image": "a.png", "question": "Count?", "answer": "nine", "type": "count"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = write_tasks(str(tmp_path / "d.jsonl"), str(tmp_path / "tasks"), name="mine", limit=5)
    assert (r["questions"], r["captions_left_out"]) == (4, 1)
    docs = json.load(open(r["data"]))
    assert [d["id"] for d in docs] == ["1", "3", "4", "5"]
    assert docs[0]["choices"] == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert docs[1]["choices"] == docs[2]["choices"] == ["cat", "dog"]         # every answer of its type
    assert docs[3]["choices"] == ["zero", "one", "two", "three", "nine"]      # the gold answer is always a choice
    assert all(d["image"] == str(tmp_path / "a.png") for d in docs)
    assert [json.loads(ln)["id"] for ln in open(r["jsonl"])] == ["1", "3", "4", "5"]
    qa = open(r["qa"]).read()
    assert "task: mine_qa" in qa and json.dumps(r["data"]) in qa and "output_type: generate_until" in qa
    assert "output_type: multiple_choice" in open(r["mc"]).read()
    (tmp_path / "c.jsonl").write_text(json.dumps(recs[1]) + "\n")
    with pytest.raises(VtpruneError, match="no question records"):
        write_tasks(str(tmp_path / "c.jsonl"), str(tmp_path / "t2"))
