#!/usr/bin/env bash
# The whole CUDA extension, built and imported without a GPU (CI): a scratch venv gets the CUDA
# build of torch (2.14.1+cu130 from local disk, never the global environment), setup.py builds
# vtprune._C from ops.cpp + compact.cu with -DWITH_CUDA for sm_90 exactly as
# `pip install --no-build-isolation -e .` does on the GPU machine, and the library is loaded:
# the CUDA implementations of vtprune::gather_tokens / compact_kv must be registered (loading needs
# no GPU; only launching a kernel would).
#   bash benchmarks/cuda_ext_build.sh        (VTPRUNE_CUDA_VENV=DIR reuses/keeps that venv)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "warning: no nvcc under CUDA_HOME=$CUDA_HOME; CUDA extension not built" >&2
  exit 0
fi
# the CUDA torch takes ~5.5 GB unpacked: on a machine short of disk, say so and skip (a skipped
# check is printed, never a failure that has nothing to do with the code)
free_kb=$(df -Pk /tmp | awk 'NR == 2 {print $4}')
if [ -z "${VTPRUNE_CUDA_VENV:-}" ] && [ "${free_kb:-0}" -lt $((12 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kb / 1024)) MB free under /tmp (12 GB needed for a CUDA torch); CUDA extension not built" >&2
  exit 0
fi
VENV=${VTPRUNE_CUDA_VENV:-$(mktemp -d /tmp/vtprune-cuda-venv.XXXXXX)}
WORK=$(mktemp -d /tmp/vtprune-cuda-build.XXXXXX)
trap 'rm -rf "$WORK"; [ -n "${VTPRUNE_CUDA_VENV:-}" ] || rm -rf "$VENV"' EXIT
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.14.1 numpy setuptools wheel ninja 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
t1=$(date +%s)
# a copy of the sources, so the checkout's own vtprune/_C (a CPU build, maybe) is never replaced
cp -r setup.py pyproject.toml README.md csrc vtprune "$WORK/"
rm -f "$WORK"/vtprune/_C*.so
cd "$WORK"
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 "$VENV/bin/python" setup.py -q build_ext --inplace 2>&1 \
  | grep -v -E "^(running|copying|creating)" | tail -20
t2=$(date +%s)
"$VENV/bin/python" - <<'EOF'
import glob, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu visible:", torch.cuda.is_available())
so = glob.glob("vtprune/_C*.so")
assert so, "setup.py built no vtprune/_C*.so"
torch.ops.load_library(so[0])  # what vtprune.kernels._extension.load_ops does with vtprune._C
for op in ("gather_tokens", "compact_kv"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vtprune::{op}", key), (op, key)
print("vtprune._C:", so[0], "loads; vtprune::gather_tokens and compact_kv have CPU and CUDA kernels")
EOF
echo "CUDA extension: venv + torch $((t1 - t0)) s, build $((t2 - t1)) s, loaded"
