// Token-axis gather ("compaction") of hidden states and KV caches: shared declarations.
// Plain C++ (no PyTorch headers) so compact.cu compiles with nvcc alone (CI checks that).
#pragma once
#include <cstdint>

namespace vtprune {

// Every tensor of one launch has the same geometry. Byte offsets:
//   src row (b, h, t) at src + b*src_sb + h*src_sh + t*src_st, `row_bytes` contiguous bytes
//   dst row (b, h, j) at dst + b*dst_sb + h*dst_sh + j*dst_st
// out[b, h, j] = src[b, h, idx[b, j]] for j < lengths[b]; zero for lengths[b] <= j < K.
// Hidden states [B, T, D] are the case H = 1, row = D elements.
struct GatherGeom {
  int64_t src_sb, src_sh, src_st;
  int64_t dst_sb, dst_sh, dst_st;
  int64_t B, H, T, K;
  int64_t row_bytes;
  int64_t idx_sb;  // elements between rows of idx
};

// Gathers `num_tensors` (src[i] -> dst[i]) pairs, up to 64 per kernel launch (more are
// chunked). idx is int32 (idx_is_int64 false) or int64; lengths is int64 [B].
// Returns 0 on success, else a cudaError_t value. `stream` is a cudaStream_t.
int launch_gather_rows(const void* const* src, void* const* dst, int num_tensors, const GatherGeom& g,
                       const void* idx, bool idx_is_int64, const int64_t* lengths, void* stream);

}  // namespace vtprune
