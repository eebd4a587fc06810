#!/usr/bin/env bash
# One script for a lent GPU machine (minutes of device time, start-up included): stages in order
# of value, each under its own timeout and inside one overall budget, each writing its results
# into $OUT the moment it ends, so a run killed at any point returns everything done so far.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine (default OUT=gpu-out)
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --dry-run     # every stage on CPU, tiny model (CI does this)
#
# $OUT/stages.tsv gets one line per stage: name, status (ok / failed rc=N / timeout / skipped),
# seconds. Failures and fallbacks are recorded, never fatal. Nothing is fetched from the network:
# the only install is `pip install --no-build-isolation --no-deps -e .` (builds vtprune._C).
#
# Estimated on an H200 with 16 cores (sum of the stage estimates: 6.5 min; budget 9 min =
# GPU_CHECK_BUDGET=540 s, a stage never starts with less than its minimum left):
#   env 5 s | build (ops.cpp + compact.cu, one arch) ~90 s | GPU tests ~80 s (Triton JIT of ~20
#   kernels at 1-3 s each, compile_check) | kernel benchmarks ~30 s | decode timings, 7B at B = 1, 64:
#   vtprune, two-stage, transformers in one process ~90 s | torch.compile'd decode ~60-120 s per
#   shape | the rest (full e2e table, batch job, static vs in-flight batching) with what is left.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export VTPRUNE_CACHE=${VTPRUNE_CACHE:-/tmp/vtprune-cache}
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET:-540}
START=$(date +%s)
: > "$OUT/stages.tsv"

# stage NAME MAX_SECONDS MIN_SECONDS COMMAND...: runs COMMAND (a program, or a function of this
# script: they are exported) in a child bash, output into $OUT/NAME.log as it runs, under
# min(MAX, what is left of the budget); skipped below MIN.
stage() {
  local name=$1 max=$2 min=$3; shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((max < left ? max : left))
  if [ "$limit" -lt "$min" ]; then
    printf '%s\tskipped (%ss left of the budget, needs %ss)\t0\n' "$name" "$left" "$min" | tee -a "$OUT/stages.tsv"
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after ${limit}s" ;;
    *) status="failed rc=$rc" ;;
  esac
  tail -n 15 "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" | tee -a "$OUT/stages.tsv"
}

if [ "$DRY" = 1 ]; then
  # CPU: the tiny model; the ops take their PyTorch references (the Triton interpreter, which the
  # unit tests use, made the tiny two-stage prefill take 10 s here)
  unset TRITON_INTERPRET
  SIZE="--tiny"; BATCHES=1,2; NEW=4; REPEATS=1
  GPU_TESTS="tests/test_engine_cuda.py"
  COMPILE_BATCHES=1
  REST_SYSTEMS=fastv,vtprune-nograph  # the stage's path; each compile costs ~45 s of CPU
  INFLIGHT="--requests 12 --repeats 1"
else
  SIZE=""; BATCHES=1,64; NEW=32; REPEATS=3
  GPU_TESTS="tests/test_compaction.py tests/test_gumbel_topk.py tests/test_soft_merge.py tests/test_soft_merge_tiles.py \
tests/test_engine_cuda.py"
  COMPILE_BATCHES=1,64
  INFLIGHT="--requests 256 --repeats 2"  # 4 systems x 3 rounds of 256 SynthVQA-mix requests
  REST_SYSTEMS=two_stage-compile,fastv,pdrop,visionzip,random,vtprune-nograph
fi

env_info() {
  echo "date: $(date -u +%FT%TZ)  dry-run: $DRY"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "no nvcc"
  python - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
for m in ("triton", "transformers", "pytest", "ninja"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except ImportError:
        print(m, "MISSING")
EOF
}

build_ext() {
  if [ "$DRY" = 0 ]; then  # the machine's own torch; no dependency is fetched
    pip install --no-build-isolation --no-deps -e . || echo "FALLBACK: pip build failed; trying the JIT build"
  fi
  python - <<'EOF'
import time
t = time.time()
from vtprune.kernels._extension import _state, has_cuda_kernels, load_ops
ok = load_ops()
print("compiled ops loaded:", ok, "| CUDA kernels:", has_cuda_kernels(), "|", _state.get("reason") or "-",
      f"| {time.time() - t:.0f} s")
if not ok:
    print("FALLBACK: compaction runs its PyTorch reference")
EOF
}

gpu_tests() {
  if ! python -c "import pytest" 2>/dev/null; then
    echo "FALLBACK: pytest missing; running the CUDA engine checks as a script"
    python - <<'EOF'
import torch
from vtprune import LlavaEngine
from vtprune.tiny_model import tiny_llava_config
dev = "cuda" if torch.cuda.is_available() else "cpu"
e = LlavaEngine.from_config(tiny_llava_config(), device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
from PIL import Image
r = e.generate([Image.new("RGB", (64, 64))], ["USER: <image>\nHi ASSISTANT:"], max_new_tokens=4)
print("generate ok:", r[0].token_ids)
EOF
    return
  fi
  # -rA: one line per test, written as the run goes (a timeout keeps the lines so far)
  python -m pytest -q -rA -p no:cacheprovider $GPU_TESTS
}

kernel_check() {  # Triton's own compile of every kernel at the launchers' configs, on the real toolchain
  if [ "$DRY" = 1 ]; then  # one cheap kernel proves the path (CI runs the whole check in .ci/run)
    python -m vtprune.kernels.compile_check --only _gumbel_noise_kernel --json "$OUT/compile_check.json"
  else
    python -m vtprune.kernels.compile_check --arch 90 --json "$OUT/compile_check.json"
  fi
}

export DRY OUT SIZE GPU_TESTS
export -f env_info build_ext gpu_tests kernel_check
stage env 30 1 env_info
stage build 240 30 build_ext
stage gpu_tests 240 30 gpu_tests
stage kernels 120 20 python benchmarks/bench_kernels.py $SIZE --out "$OUT" --tag kernels
# decode-step timings of the 7B model (random bf16 weights made on the GPU): vtprune unpruned and
# two-stage (CUDA graph; eager if capture fails) and transformers, same process, same inputs
stage decode 300 60 python benchmarks/bench_e2e.py $SIZE --out "$OUT" --tag decode --systems vtprune,two_stage,transformers \
  --batch-sizes "$BATCHES" --new-tokens "$NEW" --repeats "$REPEATS" --floor-card h200
stage audit 60 10 python benchmarks/audit_decode.py $SIZE --json "$OUT/audit_decode.json"
stage compile 300 90 python benchmarks/bench_e2e.py $SIZE --out "$OUT" --tag decode_compile --systems vtprune-compile \
  --batch-sizes "$COMPILE_BATCHES" --new-tokens "$NEW" --repeats "$REPEATS" --floor-card h200
stage compile_check 120 30 kernel_check
# the rest, with whatever time is left
stage e2e_all 300 60 python benchmarks/bench_e2e.py $SIZE --out "$OUT" --tag e2e --floor-card h200 \
  --systems "$REST_SYSTEMS" --batch-sizes "$BATCHES" --new-tokens "$NEW" --repeats "$REPEATS"
stage batch 120 30 python benchmarks/bench_batch.py $SIZE --out "$OUT" --tag batch
# static vs in-flight batching, unpruned vs two-stage, at one KV budget (7B, random weights)
stage batch_inflight 150 30 python benchmarks/bench_batch.py $SIZE --synthetic $INFLIGHT --out "$OUT" --tag batch_inflight
echo "total $(($(date +%s) - START)) s; stages in $OUT/stages.tsv"
