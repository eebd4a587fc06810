"""Benchmarks are scripts, not tests; this only checks that they run and write their results."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_bench_e2e_tiny_runs_and_writes_json_and_markdown(tmp_path):
    import bench_e2e

    result = bench_e2e.main(["--tiny", "--batch-sizes", "1,2", "--new-tokens", "4", "--out", str(tmp_path),
                             "--tag", "smoke", "--systems", "vtprune,transformers"])
    data = json.load(open(tmp_path / "smoke.json"))
    assert data == json.loads(json.dumps(result))
    systems = {(r["system"], r["batch"]) for r in data["rows"]}
    assert systems == {("vtprune", 1), ("vtprune", 2), ("transformers (sdpa)", 1), ("transformers (sdpa)", 2)}
    for r in data["rows"]:
        assert r["prompt_tokens"] == 576 + 45 and r["ttft_ms"] > 0 and r["generated_tok_per_s"] > 0
    assert "| vtprune | 2 | 621 | all |" in (tmp_path / "smoke.md").read_text()


def test_bench_e2e_pruned_systems_run(tmp_path):
    import bench_e2e

    result = bench_e2e.main(["--tiny", "--batch-sizes", "1", "--new-tokens", "3", "--out", str(tmp_path), "--tag",
                             "p", "--systems", "two_stage,pdrop,visionzip"])
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"vtprune two_stage", "vtprune pdrop", "vtprune visionzip"}
    # the two-stage schedule 288 -> 200 -> 150 -> 100 over 4 toy layers; baselines at the same budget
    assert rows["vtprune two_stage"]["avg_visual_tokens_per_layer"] == (288 + 200 + 150 + 100) / 4
    assert abs(rows["vtprune pdrop"]["avg_visual_tokens_per_layer"] - 184.5) <= 1
    assert rows["vtprune visionzip"]["prompt_tokens"] == 45 + 184


def test_bench_kernels_tiny_runs(tmp_path):
    import bench_kernels

    result = bench_kernels.main(["--tiny", "--repeats", "1", "--out", str(tmp_path), "--tag", "k"])
    ops = [r["op"] for r in result["rows"]]
    assert ops == ["gumbel_topk (noise+select+mask+soft+idx)", "soft_merge forward+backward",
                   "gather_tokens hidden states", "compact_kv one layer (K and V)", "compact_kv 3 layers, one launch"]
    assert all(r["vtprune_us"] > 0 and r["torch_us"] > 0 for r in result["rows"])
    assert json.dumps(json.load(open(tmp_path / "k.json"))["rows"]) == json.dumps(result["rows"])  # NaN-safe


def test_bench_batch_tiny_runs(tmp_path):
    import bench_batch

    result = bench_batch.main(["--tiny", "--requests", "4", "--per-image", "2", "--batch-size", "2",
                               "--new-tokens", "2", "--out", str(tmp_path), "--tag", "b"])
    assert [r["system"] for r in result["rows"]] == ["vtprune batch", "transformers generate (sdpa)"]
    assert all(r["requests"] == 4 and r["requests_per_s"] > 0 for r in result["rows"])
    assert (tmp_path / "b.md").exists()


def test_bench_batch_schedulers_runs_every_system_at_one_budget(tmp_path):
    import subprocess

    from vtprune.demo import has_trained_default
    from vtprune.quality.synthvqa import write_split

    if not has_trained_default():
        pytest.skip("the embedded SynthVQA model is not in this checkout")
    data = write_split(str(tmp_path / "sv"), "test", 2, seed=5, progress=False)
    # a process of its own without Triton's interpreter (conftest sets it for the kernel tests; the
    # two-stage prefill's top-k under the interpreter makes this run minutes instead of seconds)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_batch.py"), "--schedulers", "--data",
                        data, "--repeats", "1", "--new-tokens", "8", "--budget-rows", "2", "--out", str(tmp_path),
                        "--tag", "s"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.load(open(tmp_path / "s.json"))
    rows = {(r["pruning"], r["scheduler"]): r for r in result["rows"]}
    assert sorted(rows) == [("two-stage", "inflight"), ("two-stage", "static"), ("unpruned", "inflight"),
                            ("unpruned", "static")]
    assert rows["unpruned", "static"]["rows"] == 2 and rows["two-stage", "static"]["rows"] > 2
    assert all(r["requests"] == 6 for r in rows.values())
    # the same greedy answers: the same number of generated tokens under either scheduler
    for p in ("unpruned", "two-stage"):
        assert rows[p, "static"]["generated_tokens"] == rows[p, "inflight"]["generated_tokens"]
    assert max(n for _, n in result["rows_in_flight"]["two-stage inflight"][0]) <= rows["two-stage", "inflight"]["rows"]
    assert (tmp_path / "s.md").exists()
    from PIL import Image
    assert Image.open(tmp_path / "s.png").size == (900, 560)  # the rows-in-flight chart


def test_bench_batch_synthetic_runs_every_system_at_one_budget(tmp_path):
    """--synthetic (the GPU mode, here on the tiny architecture): static vs in-flight, unpruned vs
    two-stage, answer lengths from the SynthVQA mix; the same requests and tokens for every system."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_batch.py"), "--synthetic", "--tiny",
                        "--requests", "10", "--repeats", "1", "--budget-rows", "3", "--out", str(tmp_path),
                        "--tag", "y"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.load(open(tmp_path / "y.json"))
    rows = {(x["pruning"], x["scheduler"]): x for x in result["rows"]}
    assert sorted(rows) == [("two-stage", "inflight"), ("two-stage", "static"), ("unpruned", "inflight"),
                            ("unpruned", "static")]
    assert rows["unpruned", "static"]["rows"] == 3 and rows["two-stage", "static"]["rows"] > 3
    assert len({x["generated_tokens"] for x in rows.values()}) == 1 and result["requests"] == 10
    assert 1 <= result["answer_lengths"]["mean"] < result["answer_lengths"]["max"]  # a mix of lengths
    assert set(result["ratios"]) == {"inflight/static unpruned, tok/s", "inflight/static two-stage, tok/s",
                                     "two-stage inflight / unpruned static, tok/s"}
