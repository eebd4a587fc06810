// Token-axis gather of hidden states and KV caches, one launch for many tensors.
//
// A pure copy: each output row is read once and written once, so the kernel should run at
// copy bandwidth (H200: 4250 GB/s read+write, ../shared/perf-anchors.md) against 1130-1250 GB/s
// for torch.gather on the same shapes. What gets it there:
// - 16-byte vector loads/stores whenever the row size, strides and base pointers allow
//   (a bf16 KV row is 128 * 2 = 256 bytes = 16 vectors; a hidden row 4096 * 2 = 512 vectors);
// - each block moves a tile of ~64 KB (4096 vectors) so that launch and index overheads vanish;
// - all layers' K and V caches in one launch: a table of up to 64 (src, dst) pointers passed by
//   value (1 KB of kernel parameters), grid.z = tensor x batch row, grid.y = head.
// Rows past a batch row's length are written as zeros, and an index outside [0, T) reads
// nothing (zeros) instead of faulting: the host validates indices when asked.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "compact.h"

namespace vtprune {
namespace {

constexpr int kMaxTensors = 64;
constexpr int kThreads = 256;
constexpr int64_t kTileVectors = 4096;

struct PointerTable {
  const char* src[kMaxTensors];
  char* dst[kMaxTensors];
};

template <typename Vec, typename Idx>
__global__ void __launch_bounds__(kThreads)
gather_rows_kernel(PointerTable tab, GatherGeom g, const Idx* __restrict__ idx,
                   const int64_t* __restrict__ lengths, int64_t rows_per_tile) {
  const int64_t b = blockIdx.z % g.B;
  const int64_t t = blockIdx.z / g.B;
  const int64_t h = blockIdx.y;
  const int64_t row0 = blockIdx.x * rows_per_tile;
  // In-tile index math in 32 bits (a tile is <= kTileVectors vectors or one row): 64-bit
  // division costs several times more instructions per 16-byte vector.
  const int rows = static_cast<int>(min(rows_per_tile, g.K - row0));
  const int vpr = static_cast<int>(g.row_bytes / static_cast<int64_t>(sizeof(Vec)));
  const int64_t len = lengths[b];
  const char* src = tab.src[t] + b * g.src_sb + h * g.src_sh;
  char* dst = tab.dst[t] + b * g.dst_sb + h * g.dst_sh + row0 * g.dst_st;
  const Idx* row_idx = idx + b * g.idx_sb + row0;
  for (int i = threadIdx.x; i < rows * vpr; i += kThreads) {
    const int r = i / vpr;
    const int c = i - r * vpr;
    Vec v{};
    if (row0 + r < len) {
      const int64_t s = static_cast<int64_t>(row_idx[r]);
      if (s >= 0 && s < g.T) v = *reinterpret_cast<const Vec*>(src + s * g.src_st + c * sizeof(Vec));
    }
    *reinterpret_cast<Vec*>(dst + r * g.dst_st + c * sizeof(Vec)) = v;
  }
}

bool aligned_to(int64_t bytes, const GatherGeom& g, const void* const* src, void* const* dst, int n) {
  auto ok = [bytes](int64_t x) { return x % bytes == 0; };
  if (!ok(g.row_bytes) || !ok(g.src_sb) || !ok(g.src_sh) || !ok(g.src_st) || !ok(g.dst_sb) ||
      !ok(g.dst_sh) || !ok(g.dst_st))
    return false;
  for (int i = 0; i < n; ++i)
    if (!ok(reinterpret_cast<uintptr_t>(src[i])) || !ok(reinterpret_cast<uintptr_t>(dst[i]))) return false;
  return true;
}

template <typename Vec, typename Idx>
int launch_typed(const void* const* src, void* const* dst, int n, const GatherGeom& g, const Idx* idx,
                 const int64_t* lengths, cudaStream_t stream) {
  const int64_t vpr = g.row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t rows_per_tile = std::max<int64_t>(1, kTileVectors / vpr);
  // grid.z = tensors x batch rows must stay <= 65535
  const int per_launch = static_cast<int>(std::min<int64_t>(kMaxTensors, std::max<int64_t>(1, 65535 / g.B)));
  if (g.B > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  for (int first = 0; first < n; first += per_launch) {
    const int count = std::min(per_launch, n - first);
    PointerTable tab{};
    for (int i = 0; i < count; ++i) {
      tab.src[i] = static_cast<const char*>(src[first + i]);
      tab.dst[i] = static_cast<char*>(dst[first + i]);
    }
    dim3 grid(static_cast<unsigned>((g.K + rows_per_tile - 1) / rows_per_tile), static_cast<unsigned>(g.H),
              static_cast<unsigned>(g.B * count));
    gather_rows_kernel<Vec, Idx><<<grid, kThreads, 0, stream>>>(tab, g, idx, lengths, rows_per_tile);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

template <typename Idx>
int launch_idx(const void* const* src, void* const* dst, int n, const GatherGeom& g, const Idx* idx,
               const int64_t* lengths, cudaStream_t stream) {
  if (aligned_to(16, g, src, dst, n)) return launch_typed<uint4, Idx>(src, dst, n, g, idx, lengths, stream);
  if (aligned_to(8, g, src, dst, n)) return launch_typed<uint2, Idx>(src, dst, n, g, idx, lengths, stream);
  if (aligned_to(4, g, src, dst, n)) return launch_typed<uint32_t, Idx>(src, dst, n, g, idx, lengths, stream);
  if (aligned_to(2, g, src, dst, n)) return launch_typed<uint16_t, Idx>(src, dst, n, g, idx, lengths, stream);
  return launch_typed<uint8_t, Idx>(src, dst, n, g, idx, lengths, stream);
}

}  // namespace

int launch_gather_rows(const void* const* src, void* const* dst, int num_tensors, const GatherGeom& g,
                       const void* idx, bool idx_is_int64, const int64_t* lengths, void* stream) {
  if (num_tensors == 0 || g.K == 0 || g.B == 0 || g.H == 0 || g.row_bytes == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (idx_is_int64)
    return launch_idx(src, dst, num_tensors, g, static_cast<const int64_t*>(idx), lengths, s);
  return launch_idx(src, dst, num_tensors, g, static_cast<const int32_t*>(idx), lengths, s);
}

}  // namespace vtprune
