"""The README's main job runs on a fresh machine: the embedded default model is built locally."""
import ast
import os
import re
import subprocess
import sys

from hostile import assert_cli_error, error_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_marks(stdout):
    """Every answer carries its verdict, the caption also its BLEU against the expected caption,
    and each run's summary counts them."""
    from vtprune.quality.metrics import bleu, exact_match

    blocks = stdout.split("\nQ: ")[1:]
    verdicts = {"unpruned": [], "two-stage pruning": []}
    captions = {"unpruned": [], "two-stage pruning": []}
    for block in blocks:
        question = block.splitlines()[0]
        expected = ast.literal_eval(re.search(r"expected: (.*)$", block, re.M).group(1))
        for name in verdicts:
            m = re.search(rf"{name}: (.*)  \[(right|wrong)(?:, BLEU (\d+\.\d))?\]$", block, re.M)
            assert m, f"{name} has no mark in:\n{block}"
            text, verdict, score = ast.literal_eval(m.group(1)), m.group(2), m.group(3)
            assert verdict == ("right" if exact_match(text, expected) else "wrong"), block
            if question.startswith("Describe"):
                assert score == f"{bleu([text], [expected]):.1f}", block
                captions[name].append((text, expected))
            else:
                assert score is None, block
                verdicts[name].append(verdict == "right")
    assert len(captions["unpruned"]) == 1 and len(verdicts["unpruned"]) == 4
    for name in verdicts:
        cap = captions[name]
        summary = (f"{name}: {sum(verdicts[name])} of 4 questions right, caption BLEU "
                   f"{bleu([t for t, _ in cap], [e for _, e in cap]):.1f}; batch of 5 in ")
        assert summary in stdout, stdout


def test_main_py_runs_on_the_embedded_default(tmp_path):
    from vtprune.demo import has_trained_default

    env = dict(os.environ, VTPRUNE_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "main.py", "--max-new-tokens", "24"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\nQ: ") == 5 and "576 visual" in r.stdout and "tok/s" in r.stdout
    _check_marks(r.stdout)
    if has_trained_default():
        # the shipped model answers its own task, with and without its trained pruning heads
        assert "assets/synthvqa-llava" in r.stdout and "pruning_201.yaml" in r.stdout
        assert r.stdout.count("[right]") >= 6, r.stdout  # of 8 (4 questions x 2 runs)
        assert "288 visual in" in r.stdout  # the merge's 288 tokens enter the decoder
    else:
        assert os.path.isfile(tmp_path / "tiny-llava-random-v1" / "model.safetensors")


def test_main_py_bad_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "main.py", "--model", str(tmp_path / "missing")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    msg = f"main.py: error: model directory {tmp_path / 'missing'}: not found"
    assert_cli_error(r, msg)
    lines = error_lines(r)  # torch's CUDA build may print its own warning first (no GPU)
    assert lines == [msg], r.stderr
