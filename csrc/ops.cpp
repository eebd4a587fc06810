// vtprune::gather_tokens and vtprune::compact_kv: schemas, argument checks, the CPU twin of
// compact.cu, and the CUDA dispatch. Each op is declared once (TORCH_LIBRARY) and implemented
// for CPU and (when built WITH_CUDA) CUDA; Python registers the fake implementations
// (vtprune/kernels/compaction.py) so torch.compile can trace them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "compact.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace vtprune {
namespace {

using at::Tensor;

void check_index_args(const char* op, const Tensor& idx, const Tensor& lengths, int64_t B, const at::Device& dev) {
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == B, op, ": idx must be [B, K] with B = ", B, ", got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
              ": idx must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, op, ": lengths must be [B] with B = ", B, ", got ",
              lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong, op,
              ": lengths must be int32 or int64, got ", lengths.scalar_type());
  TORCH_CHECK(idx.device() == dev && lengths.device() == dev, op, ": idx (", idx.device(), ") and lengths (",
              lengths.device(), ") must be on the data's device ", dev);
}

// Index values: 0 <= lengths[b] <= K, and idx[b, :lengths[b]] strictly ascending within [0, T).
// CPU tensors only (on a GPU this would cost a synchronisation; the Python wrapper does it there).
void check_index_values(const char* op, const Tensor& idx64, const Tensor& len64, int64_t T) {
  const int64_t B = idx64.size(0), K = idx64.size(1);
  const int64_t* ip = idx64.data_ptr<int64_t>();
  const int64_t* lp = len64.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= K, op, ": lengths[", b, "] = ", lp[b], " is outside [0, K = ", K, "]");
    for (int64_t j = 0; j < lp[b]; ++j) {
      const int64_t v = ip[b * K + j];
      TORCH_CHECK(v >= 0 && v < T, op, ": idx[", b, ", ", j, "] = ", v, " is out of range [0, ", T, ")");
      TORCH_CHECK(j == 0 || v > ip[b * K + j - 1], op, ": idx[", b, "] must be strictly ascending, but idx[", b,
                  ", ", j, "] = ", v, " follows ", ip[b * K + j - 1]);
    }
  }
}

// The CPU twin of gather_rows_kernel: same geometry, same zero fill.
void gather_rows_cpu(const std::vector<const char*>& src, const std::vector<char*>& dst, const GatherGeom& g,
                     const int64_t* idx, const int64_t* lengths) {
  const int64_t n = static_cast<int64_t>(src.size());
  at::parallel_for(0, n * g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t h = p % g.H, b = (p / g.H) % g.B, t = p / (g.H * g.B);
      const char* s = src[t] + b * g.src_sb + h * g.src_sh;
      char* d = dst[t] + b * g.dst_sb + h * g.dst_sh;
      for (int64_t j = 0; j < g.K; ++j) {
        const int64_t r = j < lengths[b] ? idx[b * g.idx_sb + j] : -1;
        if (r >= 0 && r < g.T)
          std::memcpy(d + j * g.dst_st, s + r * g.src_st, g.row_bytes);
        else
          std::memset(d + j * g.dst_st, 0, g.row_bytes);
      }
    }
  });
}

void run_gather(const char* op, const std::vector<const char*>& src, const std::vector<char*>& dst,
                const GatherGeom& g, const Tensor& idx, const Tensor& lengths) {
  if (idx.is_cuda()) {
#ifdef WITH_CUDA
    const Tensor idx_c = idx.contiguous();
    const Tensor len64 = lengths.to(at::kLong).contiguous();
    GatherGeom gg = g;
    gg.idx_sb = idx_c.size(1);
    const int err = launch_gather_rows(reinterpret_cast<const void* const*>(src.data()),
                                       reinterpret_cast<void* const*>(dst.data()), static_cast<int>(src.size()),
                                       gg, idx_c.data_ptr(), idx_c.scalar_type() == at::kLong,
                                       len64.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed (cudaError ", err, ")");
    return;
#else
    TORCH_CHECK(false, op, ": this build of the vtprune extension has no CUDA support");
#endif
  }
  const Tensor idx64 = idx.to(at::kLong).contiguous();
  const Tensor len64 = lengths.to(at::kLong).contiguous();
  check_index_values(op, idx64, len64, g.T);
  GatherGeom gg = g;
  gg.idx_sb = idx64.size(1);
  gather_rows_cpu(src, dst, gg, idx64.data_ptr<int64_t>(), len64.data_ptr<int64_t>());
}

// True when each [t] slice of x (dims 2.. of a [B, T, ...] tensor) is one contiguous row.
bool rows_contiguous(const Tensor& x, int64_t first_row_dim) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= first_row_dim; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

Tensor gather_tokens(const Tensor& src_in, const Tensor& idx, const Tensor& lengths) {
  const char* op = "gather_tokens";
  TORCH_CHECK(src_in.dim() >= 2, op, ": src must be [B, T] or [B, T, ...], got ", src_in.sizes());
  const int64_t B = src_in.size(0), T = src_in.size(1);
  check_index_args(op, idx, lengths, B, src_in.device());
  const Tensor src = rows_contiguous(src_in, 2) ? src_in : src_in.contiguous();
  std::vector<int64_t> sizes = src.sizes().vec();
  sizes[1] = idx.size(1);
  Tensor out = at::empty(sizes, src.options());
  const int64_t es = src.element_size();
  int64_t row = 1;  // elements per token row
  for (int64_t d = 2; d < src.dim(); ++d) row *= src.size(d);
  GatherGeom g{src.stride(0) * es, 0, src.stride(1) * es, out.stride(0) * es, 0, out.stride(1) * es,
               B, 1, T, idx.size(1), row * es, 0};
#ifdef WITH_CUDA
  c10::OptionalDeviceGuard guard(src.device());
#endif
  if (out.numel() > 0)
    run_gather(op, {static_cast<const char*>(src.data_ptr())}, {static_cast<char*>(out.data_ptr())}, g, idx, lengths);
  return out;
}

void compact_kv(at::TensorList k_caches, at::TensorList v_caches, const Tensor& idx, const Tensor& lengths,
                at::TensorList k_out, at::TensorList v_out) {
  const char* op = "compact_kv";
  TORCH_CHECK(!k_caches.empty(), op, ": k_caches is empty");
  TORCH_CHECK(v_caches.size() == k_caches.size() && k_out.size() == k_caches.size() &&
                  v_out.size() == k_caches.size(),
              op, ": k_caches, v_caches, k_out and v_out must have the same length, got ", k_caches.size(), ", ",
              v_caches.size(), ", ", k_out.size(), ", ", v_out.size());
  const Tensor& ref = k_caches[0];
  TORCH_CHECK(ref.dim() == 4, op, ": caches must be [B, H, T, Dh], got ", ref.sizes());
  TORCH_CHECK(ref.stride(3) == 1, op, ": caches must be contiguous along Dh (stride(3) == 1)");
  const int64_t B = ref.size(0), H = ref.size(1), T = ref.size(2), Dh = ref.size(3);
  check_index_args(op, idx, lengths, B, ref.device());
  const int64_t K = idx.size(1);
  const Tensor& oref = k_out[0];
  TORCH_CHECK(oref.dim() == 4 && oref.size(0) == B && oref.size(1) == H && oref.size(2) >= K && oref.size(3) == Dh,
              op, ": k_out/v_out must be [B, H, >= K, Dh] = [", B, ", ", H, ", >=", K, ", ", Dh, "], got ",
              oref.sizes());
  TORCH_CHECK(oref.stride(3) == 1, op, ": k_out/v_out must be contiguous along Dh (stride(3) == 1)");
  std::vector<const char*> src;
  std::vector<char*> dst;
  auto add = [&](const Tensor& s, const Tensor& d, const char* sname, const char* dname, size_t i) {
    TORCH_CHECK(s.sizes() == ref.sizes() && s.strides() == ref.strides(), op, ": ", sname, "[", i,
                "] must have the shape and strides of k_caches[0] ", ref.sizes(), ", got ", s.sizes());
    TORCH_CHECK(d.sizes() == oref.sizes() && d.strides() == oref.strides(), op, ": ", dname, "[", i,
                "] must have the shape and strides of k_out[0] ", oref.sizes(), ", got ", d.sizes());
    TORCH_CHECK(s.scalar_type() == ref.scalar_type() && d.scalar_type() == ref.scalar_type(), op, ": ", sname,
                "[", i, "] and ", dname, "[", i, "] must be ", ref.scalar_type());
    TORCH_CHECK(s.device() == ref.device() && d.device() == ref.device(), op, ": ", sname, "[", i, "] and ",
                dname, "[", i, "] must be on ", ref.device());
    src.push_back(static_cast<const char*>(s.data_ptr()));
    dst.push_back(static_cast<char*>(d.data_ptr()));
  };
  for (size_t i = 0; i < k_caches.size(); ++i) add(k_caches[i], k_out[i], "k_caches", "k_out", i);
  for (size_t i = 0; i < v_caches.size(); ++i) add(v_caches[i], v_out[i], "v_caches", "v_out", i);
  const int64_t es = ref.element_size();
  GatherGeom g{ref.stride(0) * es, ref.stride(1) * es, ref.stride(2) * es,
               oref.stride(0) * es, oref.stride(1) * es, oref.stride(2) * es, B, H, T, K, Dh * es, 0};
#ifdef WITH_CUDA
  c10::OptionalDeviceGuard guard(ref.device());
#endif
  if (B > 0 && H > 0 && K > 0 && Dh > 0) run_gather(op, src, dst, g, idx, lengths);
}

}  // namespace

TORCH_LIBRARY(vtprune, m) {
  m.def("gather_tokens(Tensor src, Tensor idx, Tensor lengths) -> Tensor");
  m.def("compact_kv(Tensor[] k_caches, Tensor[] v_caches, Tensor idx, Tensor lengths, "
        "Tensor(a!)[] k_out, Tensor(b!)[] v_out) -> ()");
}

TORCH_LIBRARY_IMPL(vtprune, CPU, m) {
  m.impl("gather_tokens", &gather_tokens);
  m.impl("compact_kv", &compact_kv);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(vtprune, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens);
  m.impl("compact_kv", &compact_kv);
}
#endif

}  // namespace vtprune
