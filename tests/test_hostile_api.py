"""Hostile arguments to the Python API: every bad value of generate, generate_prepared, score,
next_token_logits, set_pruning and prepare is one VtpruneError naming the argument, raised before
any image is read; valid extremes (tiny temperatures, the largest seed, a set of stop strings)
work. Small model (36 visual tokens), in-process."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import make_image

from vtprune import LlavaEngine, VtpruneError, format_prompt
from vtprune.engine.arguments import MIN_TEMPERATURE
from vtprune.engine.sampling import sample_next
from vtprune.pruning import PruningConfig

P = format_prompt("What is it?")
# Argument errors must come before any image is read: this path does not exist, so a test that
# got past the argument checks would fail with "image ...: not found" instead.
NO_IMAGE = "/nonexistent/vtprune-hostile-api.png"
SMALL_TWO_STAGE = dict(target_merge_tokens=18, merge_ratio=0.5, pruning_layers=[1, 2, 3],
                       layer_keep_tokens=[12, 8, 4], pruner_d_internal=32, pruner_num_heads=4)


@pytest.fixture(scope="module")
def eng(small_dir):
    """An engine of its own: the set_pruning tests change its configuration."""
    return LlavaEngine.from_pretrained(small_dir)


GENERATE_CASES = [
    # temperature
    ({"temperature": float("nan")}, r"^temperature must be a finite number, got nan$"),
    ({"temperature": float("inf")}, r"^temperature must be a finite number, got inf$"),
    ({"temperature": -0.5}, r"^temperature must be >= 0 \(0 = greedy\), got -0\.5$"),
    ({"temperature": 1e-310}, r"^temperature 1e-310 is below 1\.18e-38, the smallest normal float32 .*use 0 for greedy"),
    ({"temperature": "0.7"}, r"^temperature must be a number, got str '0\.7'$"),
    ({"temperature": True}, r"^temperature must be a number, got bool True$"),
    ({"temperature": None}, r"^temperature must be a number, got None$"),
    # top_p
    ({"top_p": None}, r"^top_p must be a number, got None$"),
    ({"top_p": float("nan")}, r"^top_p must be a finite number, got nan$"),
    ({"top_p": 0}, r"^top_p must be in \(0, 1\], got 0\.0$"),
    ({"top_p": 1.5}, r"^top_p must be in \(0, 1\], got 1\.5$"),
    ({"top_p": "0.9"}, r"^top_p must be a number, got str '0\.9'$"),
    # seed
    ({"seed": True}, r"^seed must be None or an integer in \[0, 2\*\*64\), got bool True$"),
    ({"seed": 1.5}, r"^seed must be None or an integer in \[0, 2\*\*64\), got float 1\.5$"),
    ({"seed": -1}, r"^seed must be an integer in \[0, 2\*\*64\), got -1$"),
    ({"seed": 2**64}, r"^seed must be an integer in \[0, 2\*\*64\), got 18446744073709551616$"),
    ({"seed": "7"}, r"^seed must be None or an integer in \[0, 2\*\*64\), got str '7'$"),
    # max_new_tokens
    ({"max_new_tokens": True}, r"^max_new_tokens must be an integer, got bool True$"),
    ({"max_new_tokens": 8.0}, r"^max_new_tokens must be an integer, got float 8\.0$"),
    ({"max_new_tokens": "8"}, r"^max_new_tokens must be an integer, got str '8'$"),
    ({"max_new_tokens": 0}, r"^max_new_tokens must be an integer >= 1, got 0$"),
    # stop
    ({"stop": 5}, r"^stop must be a string or a list of strings, got int 5$"),
    ({"stop": b"."}, r"^stop must be a string or a list of strings, got bytes b'\.'$"),
    ({"stop": {"k": "v"}}, r"^stop must be a string or a list of strings, got dict"),
    ({"stop": ["ok", 3]}, r"^stop\[1\] must be a string, got int 3$"),
    ({"stop": ["ok", ""]}, r"^stop\[1\] is an empty string"),
    ({"stop": ""}, r"^stop is an empty string"),
    ({"stop": {"a", 3}}, r"^stop: every stop string must be a string, got int 3$"),
    # use_cuda_graph
    ({"use_cuda_graph": "yes"}, r"^use_cuda_graph must be True or False, got str 'yes'$"),
    ({"use_cuda_graph": 1}, r"^use_cuda_graph must be True or False, got int 1$"),
]


@pytest.mark.parametrize("kwargs,match", GENERATE_CASES, ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"
                                                             for k, _ in GENERATE_CASES])
def test_generate_refuses_the_argument_before_reading_images(eng, kwargs, match):
    with pytest.raises(VtpruneError, match=match):
        eng.generate([NO_IMAGE], [P], **kwargs)


@pytest.mark.parametrize("images,prompts,match", [
    ([NO_IMAGE], 5, r"^prompts must be a string or a list of strings, got int 5$"),
    ([NO_IMAGE], None, r"^prompts must be a string or a list of strings, got None$"),
    ([NO_IMAGE], {P}, r"^prompts must be a string or a list of strings, got set"),
    ([], [], r"^no prompts given$"),
    ([NO_IMAGE], [P, P], r"^got 1 images and 2 prompts: give one image per prompt$"),
    ([], P, r"^got 0 images and 1 prompts"),
    ([NO_IMAGE, NO_IMAGE], [P, 3], r"^prompt 1: expected a string, got int$"),
    (NO_IMAGE, "no placeholder", r"^prompt 0 has no '<image>' placeholder"),
])
def test_images_and_prompts(eng, images, prompts, match):
    with pytest.raises(VtpruneError, match=match):
        eng.generate(images, prompts)
    with pytest.raises(VtpruneError, match=match):
        eng.next_token_logits(images, prompts)


def test_max_new_tokens_beyond_the_context(eng):
    ctx = eng.cfg.text.max_position_embeddings
    n = len(eng.prompts.encode(P))
    im = make_image(0)
    with pytest.raises(VtpruneError, match=rf"^prompt 0 is {n} tokens; with max_new_tokens={10**12} it exceeds "
                                           rf"the model's context of {ctx} \(use max_new_tokens <= {ctx - n}\)$"):
        eng.generate([im], [P], max_new_tokens=10**12)
    batch = eng.prepare([im], [P])
    with pytest.raises(VtpruneError, match=rf"^max_new_tokens={ctx - n + 1} after prompts of {n} positions exceeds "
                                           rf"the model's context of {ctx} \(use max_new_tokens <= {ctx - n}\)$"):
        eng.generate_prepared(batch, ctx - n + 1)
    with pytest.raises(VtpruneError, match=r"^max_new_tokens must be an integer, got str '3'$"):
        eng.prepare([im], [P], "3")


def test_generate_prepared_checks_its_arguments(eng):
    batch = eng.prepare([make_image(0)], [P])
    with pytest.raises(VtpruneError, match=r"^batch must be a PreparedBatch \(LlavaEngine.prepare\), got dict$"):
        eng.generate_prepared({"input_ids": batch.input_ids}, 4)
    with pytest.raises(VtpruneError, match=r"^stops must be a string or a list of strings, got int 3$"):
        eng.generate_prepared(batch, 4, stops=3)
    with pytest.raises(VtpruneError, match=r"^temperature must be a finite number, got nan$"):
        eng.generate_prepared(batch, 4, temperature=float("nan"))
    with pytest.raises(VtpruneError, match=r"^seed must be an integer in \[0, 2\*\*64\), got 18446744073709551616$"):
        eng.generate_prepared(batch, 4, temperature=1.0, seed=2**64)


def test_two_stage_context_counts_the_unpruned_positions(small_dir):
    """A two-stage merge keeps the unpruned RoPE positions (36 visual tokens -> 18 in the prompt,
    at the positions of 36): the context limit counts positions, so 18 fewer new tokens fit than
    the kept tokens alone would allow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # randomly initialised heads
        pruned = LlavaEngine.from_pretrained(small_dir, pruning=SMALL_TWO_STAGE)
    ctx = pruned.cfg.text.max_position_embeddings
    n = len(pruned.prompts.encode(P))
    assert pruned.plan.position_offset == 18
    limit = ctx - n - 18
    batch = pruned.prepare([make_image(0)], [P], limit)  # fits exactly
    assert batch.input_ids.shape == (1, n)
    with pytest.raises(VtpruneError, match=rf"^prompt 0 is {n} tokens \(at the positions of 36 unpruned visual "
                                           rf"tokens\); with max_new_tokens={limit + 1} it exceeds the model's "
                                           rf"context of {ctx} \(use max_new_tokens <= {limit}\)$"):
        pruned.prepare([make_image(0)], [P], limit + 1)


@pytest.mark.parametrize("continuations,match", [
    ("", r"^continuations\[0\] is an empty string \(it has no tokens to score\)$"),
    ([3], r"^continuations\[0\] must be a string, got int 3$"),
    ([" a", " b"], r"^got 1 prompts and 2 continuations: give one continuation per prompt$"),
    (None, r"^continuations must be a string or a list of strings, got None$"),
    (b" yes", r"^continuations must be a string or a list of strings, got bytes b' yes'$"),
])
def test_score_continuations(eng, continuations, match):
    with pytest.raises(VtpruneError, match=match):
        eng.score([NO_IMAGE], [P], continuations)


def test_score_other_arguments(eng):
    with pytest.raises(VtpruneError, match=r"^use_cuda_graph must be True or False, got str 'no'$"):
        eng.score([NO_IMAGE], [P], [" a"], use_cuda_graph="no")
    with pytest.raises(VtpruneError, match=r"^prompt 0: expected a string, got int$"):  # before tokenizing it
        eng.score([NO_IMAGE], [7], [" a"])
    ctx = eng.cfg.text.max_position_embeddings
    n = len(eng.prompts.encode(P))
    long = " word" * (ctx - n + 5)
    k = len(eng.prompts.continuation(P, long))
    with pytest.raises(VtpruneError, match=rf"^prompt 0 is {n} tokens; with continuation tokens={k} it exceeds the "
                                           rf"model's context of {ctx}"):
        eng.score([make_image(0)], [P], [long])


def test_valid_extremes_work(eng):
    im = make_image(3)
    greedy = eng.generate([im], [P], max_new_tokens=6)[0].token_ids
    top = eng.generate([im], [P], max_new_tokens=6, temperature=1.0, seed=2**64 - 1)[0].token_ids
    assert eng.generate([im], [P], max_new_tokens=6, temperature=1.0, seed=np.uint64(2**64 - 1))[0].token_ids == top
    # a numpy scalar counts as the number it holds
    assert eng.generate([im], [P], max_new_tokens=6, temperature=np.float32(0.0))[0].token_ids == greedy
    text = eng.generate([im], [P], max_new_tokens=6)[0].text
    stop = text.split()[0] if text.split() else None
    if stop:  # a set of stop strings cuts like the list
        as_list = eng.generate([im], [P], max_new_tokens=6, stop=[stop, "\x00never"])[0]
        as_set = eng.generate([im], [P], max_new_tokens=6, stop={stop, "\x00never"})[0]
        assert (as_set.text, as_set.token_ids) == (as_list.text, as_list.token_ids)


@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 1e-30, 1e-12])
def test_tiny_valid_temperature_samples_the_argmax_without_nan(temperature):
    """logits / T overflows float32 for T below ~1e-37 / max|logit| (here |logits| ~ 20): unshifted,
    softmax gave NaN and multinomial raised. Shifted by the row maximum, the distribution is the
    argmax's (no ties here) at any T >= MIN_TEMPERATURE."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 500, generator=g) * 20
    for top_p in (1.0, 0.9):
        tokens = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(1))
        assert tokens.tolist() == logits.argmax(-1).tolist()
    half = sample_next(logits.half(), temperature, 1.0, torch.Generator().manual_seed(1))
    assert half.tolist() == logits.half().argmax(-1).tolist()


def test_tiny_temperature_end_to_end_is_greedy(eng):
    im = make_image(4)
    greedy = eng.generate([im], [P], max_new_tokens=8)[0].token_ids
    assert eng.generate([im], [P], max_new_tokens=8, temperature=1e-30, seed=3)[0].token_ids == greedy


def test_huge_temperature_samples_uniformly_without_nan():
    """T = 1e30 (or 1e300, inf in float32): every logit / T is 0, so the distribution is uniform."""
    logits = (torch.randn(1, 8) * 50).expand(800, 8)
    for T in (1e30, 1e300):
        counts = torch.bincount(sample_next(logits, T, 1.0, torch.Generator().manual_seed(0)), minlength=8)
        assert counts.sum() == 800 and counts.min() > 50  # ~100 each; any NaN would have raised


def test_set_pruning_bad_types_and_files(eng, tmp_path):
    with pytest.raises(VtpruneError, match=r"^pruning must be None, a PruningConfig, a dict or a YAML path, got int$"):
        eng.set_pruning(42)
    with pytest.raises(VtpruneError, match=r"^pruning must be None, a PruningConfig, a dict or a YAML path, got list$"):
        eng.set_pruning([SMALL_TWO_STAGE])
    with pytest.raises(VtpruneError, match=rf"^pruning config {tmp_path}: is a directory$"):
        eng.set_pruning(tmp_path)
    (tmp_path / "bad.yaml").write_bytes(b"policy: fastv\nbudget: \xff\n")
    with pytest.raises(VtpruneError, match=r"bad.yaml: not UTF-8 text \(byte 0xff on line 2\)$"):
        eng.set_pruning(str(tmp_path / "bad.yaml"))
    os.mkfifo(tmp_path / "fifo.yaml")  # refused from stat: opening it would block forever
    with pytest.raises(VtpruneError, match=r"fifo.yaml: is a FIFO \(named pipe\), not a regular file"):
        eng.set_pruning(str(tmp_path / "fifo.yaml"))
    with pytest.raises(VtpruneError, match=r"missing.yaml: not found$"):
        eng.set_pruning(str(tmp_path / "missing.yaml"))


def test_failed_set_pruning_keeps_the_previous_configuration(eng):
    """Before: the plan was dropped first, so a bad config left the engine unpruned but with the
    pruned prompt length (20 image tokens for a 36-token tower)."""
    im = make_image(5)
    try:
        eng.set_pruning(PruningConfig(policy="visionzip", budget=20))
        plan, before = eng.plan, eng.generate([im], [P], max_new_tokens=3)[0].token_ids
        for bad in ({"policy": "fastv", "budget": 10**6}, {"no_such_key": 1}, 3.5):
            with pytest.raises(VtpruneError):
                eng.set_pruning(bad)
            assert eng.plan is plan and eng.prompts.num_visual_tokens == 20
        assert eng.generate([im], [P], max_new_tokens=3)[0].token_ids == before
    finally:
        eng.set_pruning(None)
    assert eng.plan is None and eng.prompts.num_visual_tokens == 36


def test_data_records_skipped_with_a_capped_report(tmp_path):
    """Training / eval JSONL: each bad record is skipped with its line and reason; the first five
    are reported one warning each, the rest in one count."""
    from vtprune.training.data import TrainingData

    make_image(0, 20, 20).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "Q", "answer": "A"}
    bad = [dict(good, id=1.5), dict(good, type=["caption"]), dict(good, id=True), dict(good, answer=None),
           dict(good, image=""), dict(good, image="dir"), dict(good, image="fifo"), dict(good, question=" ")]
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # refused from stat, before PIL could block on it
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [dict(good, id=7)] + bad) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = TrainingData(str(tmp_path / "d.jsonl"), what="eval data")
    assert [(e.line, e.id) for e in data.examples] == [(1, "7")]
    assert data.skipped == [
        (2, "'id' must be a string or an integer, got a number (1.5)"),
        (3, "'type' must be a string, got an array"),
        (4, "'id' must be a string or an integer, got a boolean"),
        (5, "'answer' must be a string, got null"),
        (6, "'image' is empty"),
        (7, f"image {tmp_path / 'dir'}: is a directory"),
        (8, f"image {tmp_path / 'fifo'}: is a FIFO (named pipe), not a regular file; refused (it could block "
            f"forever)"),
        (9, "'question' is empty"),
    ]
    path = str(tmp_path / "d.jsonl")
    assert [str(w.message) for w in caught] == [f"{path}:{n}: skipped: {r}" for n, r in data.skipped[:5]] + [
        f"{path}: 3 more lines skipped (8 in all, 1 records used)"]


def test_eval_outputs_errors_name_the_path(tmp_path):
    from vtprune.quality.evaluate import _write_text, write_outputs

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(VtpruneError, match=rf"^--out directory {tmp_path / 'file.txt'}: exists and is not a "
                                           rf"directory$"):
        write_outputs([], str(tmp_path / "file.txt" / "results"), {})
    (tmp_path / "old.json").write_text("earlier results")
    with pytest.raises(VtpruneError, match=rf"^results file {tmp_path / 'none' / 'r.json'}: not found$"):
        _write_text(str(tmp_path / "none" / "r.json"), "results file", "{}")
    _write_text(str(tmp_path / "old.json"), "results file", "{}")  # replaced whole, no temporary left
    assert (tmp_path / "old.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == ["file.txt", "old.json"]
