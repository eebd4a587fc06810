"""benchmarks/gpu_check.sh --dry-run (every stage on CPU with the tiny model, as on a lent GPU
machine) and the hardware floors bench_e2e reports results against."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

STAGES = ["env", "build", "gpu_tests", "kernels", "decode", "audit", "compile", "compile_check", "e2e_all", "batch",
          "batch_inflight"]


def test_7b_floors_match_perf_anchors():
    """The perf anchors (README "Benchmarks"): decode at B = 1 is 13.2 GB of decoder weights /
    4250 GB/s = 3.1 ms; at B = 64 unpruned (64 x ~650 tokens x 0.5 MiB of KV) ~8.2 ms."""
    import hardware
    from vtprune.engine.config import LlavaModelConfig
    from vtprune.model_configs import llava_1_5_7b_config

    cfg = LlavaModelConfig.from_any(llava_1_5_7b_config())
    params = hardware.decoder_weight_params(cfg)
    assert params == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32064 * 4096
    one = hardware.decode_floor_s(cfg, 1, [650] * 32, hardware.H200)
    assert one["memory_s"] == (2 * params + 650 * 32 * 2 * 4096 * 2) / 4250e9 == one["floor_s"]
    assert 3.1e-3 < one["floor_s"] < 3.2e-3
    b64 = hardware.decode_floor_s(cfg, 64, [650] * 32, hardware.H200)
    assert 8.1e-3 < b64["floor_s"] < 8.4e-3 and b64["compute_s"] < b64["memory_s"]
    pre = hardware.prefill_floor_s(cfg, 64, [621] * 32, 576, hardware.H200)
    assert pre["floor_s"] == pre["compute_s"] == pre["flops"] / 693e12  # a batch-64 prefill is compute-bound
    assert hardware.card_for("NVIDIA H200 NVL") is hardware.H200 and hardware.card_for("cpu") is None


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_BUDGET="1500")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "stages.tsv") as f:
        stages = list(csv.reader(f, delimiter="\t"))
    assert [s[0] for s in stages] == STAGES
    assert all(s[1] == "ok" for s in stages), stages
    decode = json.load(open(tmp_path / "decode.json"))
    assert decode["complete"] and {r["system"] for r in decode["rows"]} == {
        "vtprune", "vtprune two_stage", "transformers (sdpa)"}
    for row in decode["rows"]:  # every time next to its floor (the dry run prices the tiny model on an H200)
        assert row["floor_card"] == "NVIDIA H200" and row["decode_floor_ms"] > 0
        assert row["decode_pct_of_floor"] == pytest.approx(100 * row["decode_floor_ms"] / row["decode_ms_per_step"])
    assert "% of floor" in (tmp_path / "decode.md").read_text()
    compiled = json.load(open(tmp_path / "decode_compile.json"))
    assert [r["system"] for r in compiled["rows"]] == ["vtprune (torch.compile)"]
    audit = json.load(open(tmp_path / "audit_decode.json"))
    assert all(r["syncs"] == [] and r["stable"] for r in audit["rows"] if r["system"].startswith("vtprune"))
    assert json.load(open(tmp_path / "compile_check.json"))["rows"][0]["problems"] == []
    for name in ("kernels.json", "e2e.json", "batch.json", "batch_inflight.json", "build.log", "gpu_tests.log"):
        assert (tmp_path / name).exists(), name
    assert "compiled ops loaded: True" in (tmp_path / "build.log").read_text()
