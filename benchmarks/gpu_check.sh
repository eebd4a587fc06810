#!/usr/bin/env bash
# One script for a lent GPU machine: build the extension, run the GPU tests, run the benchmarks,
# and leave everything under $OUT (defaults to ./gpu-out). Correct on CPU first (it skips what
# needs a GPU). Usage: OUT=/some/dir bash benchmarks/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export VTPRUNE_CACHE=${VTPRUNE_CACHE:-/tmp/vtprune-cache}
QUICK=${1:-}
# Without a GPU the full-size benchmarks would not fit (the 7B model on CPU): smoke-run them.
SIZE=""
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || SIZE="--tiny"
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  python -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
} | tee "$OUT/env.txt"

echo "== build the compaction ops (JIT, ninja)"
python -c "
import time; t = time.time()
from vtprune.kernels._extension import load_ops, has_cuda_kernels, _state
print('loaded', load_ops(), 'cuda kernels', has_cuda_kernels(), _state.get('reason', ''), f'{time.time() - t:.0f} s')
" 2>&1 | tee "$OUT/build.txt"

echo "== tests"
python -m pytest -q tests/test_compaction.py tests/test_gumbel_topk.py tests/test_soft_merge.py \
  tests/test_engine_cuda.py 2>&1 | tail -25 | tee "$OUT/tests.txt"

echo "== kernel benchmarks"
python benchmarks/bench_kernels.py $SIZE --out "$OUT" 2>&1 | tail -20 | tee "$OUT/bench_kernels.log"

echo "== end-to-end benchmark"
if [ -n "$SIZE" ]; then
  python benchmarks/bench_e2e.py --tiny --out "$OUT" 2>&1 | tail -12 | tee "$OUT/bench_e2e.log"
elif [ "$QUICK" = "--quick" ]; then
  python benchmarks/bench_e2e.py --out "$OUT" --batch-sizes 1,64 --repeats 3 2>&1 | tail -20 | tee "$OUT/bench_e2e.log"
else
  python benchmarks/bench_e2e.py --out "$OUT" 2>&1 | tail -20 | tee "$OUT/bench_e2e.log"
fi

echo "== batch job benchmark"
if [ -n "$SIZE" ]; then
  python benchmarks/bench_batch.py --tiny --out "$OUT" 2>&1 | tail -8 | tee "$OUT/bench_batch.log"
else
  python benchmarks/bench_batch.py --out "$OUT" 2>&1 | tail -8 | tee "$OUT/bench_batch.log"
fi
