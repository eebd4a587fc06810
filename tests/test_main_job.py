"""The README's main job runs on a fresh machine: the embedded default model is built locally."""
import os
import subprocess
import sys

from hostile import assert_cli_error, error_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_py_runs_on_the_embedded_default(tmp_path):
    from vtprune.demo import has_trained_default

    env = dict(os.environ, VTPRUNE_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "main.py", "--max-new-tokens", "24"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\nQ: ") == 5 and "576 visual" in r.stdout and "tok/s" in r.stdout
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
    assert_cli_error(r, "model directory not found")
    lines = error_lines(r)  # torch's CUDA build may print its own warning first (no GPU)
    assert len(lines) == 1 and lines[0].startswith("main.py: error: model directory not found"), r.stderr
