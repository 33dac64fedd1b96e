#include "fp8_quant/fp8_quant.cuh"
#include "fp8_quant/fp8_quant.h"

#include <algorithm>
#include <climits>
#include <string>

namespace pykernels {
namespace {

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

void require_input_dtype(const TensorView& x) {
  if (x.dtype != DType::Float32 && x.dtype != DType::Float16 && x.dtype != DType::BFloat16) {
    throw_type_error(x.name, "dtype float32, float16 or bfloat16", dtype_name(x.dtype));
  }
}

// Elements per 16-byte load, or 1 when the row length, the group or the pointers do not allow it.
int vector_width(const TensorView& x, const TensorView& q, int64_t k, int64_t group) {
  const int vec = 16 / dtype_size(x.dtype);
  const bool ok = k % vec == 0 && group % vec == 0 && reinterpret_cast<uintptr_t>(x.data) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data) % vec == 0;
  return ok ? vec : 1;
}

int sm_count_of_current_device() {
  int device = 0, sms = 0;
  PK_CUDA_CHECK(cudaGetDevice(&device));
  PK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename T, int VEC>
void launch_token_group(const TensorView& x, const TensorView& q, const TensorView& scales,
                        const TokenGroupScaleLayout& layout, int64_t rows, int64_t k, int group_size, bool ue8m0,
                        cudaStream_t stream) {
  const int chunks_per_group = group_size / VEC;
  const int lanes_per_group = std::min(32, chunks_per_group);
  const int groups_per_row = static_cast<int>((k + group_size - 1) / group_size);
  const int64_t total_groups = rows * groups_per_row;
  const int64_t groups_per_cta = static_cast<int64_t>(fp8_quant::kThreads / 32) * (32 / lanes_per_group);
  // Enough CTAs to cover every group once, capped at a few waves; the kernel loops over the rest.
  const int64_t wanted = (total_groups + groups_per_cta - 1) / groups_per_cta;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 8LL * sm_count_of_current_device())));
  const T* src = x.ptr<const T>();
  auto* dst = q.ptr<uint8_t>();
  auto* s = scales.ptr<float>();
  if (chunks_per_group <= 32) {
    fp8_quant::per_token_group_quant_fp8_kernel<T, VEC, true><<<grid, fp8_quant::kThreads, 0, stream>>>(
        src, dst, s, layout, rows, k, group_size, groups_per_row, lanes_per_group, ue8m0);
  } else {
    fp8_quant::per_token_group_quant_fp8_kernel<T, VEC, false><<<grid, fp8_quant::kThreads, 0, stream>>>(
        src, dst, s, layout, rows, k, group_size, groups_per_row, lanes_per_group, ue8m0);
  }
  PK_CHECK_LAUNCH("per_token_group_quant_fp8_kernel");
}

template <typename T, int VEC>
void launch_block(const TensorView& w, const TensorView& q, const TensorView& scales, int64_t groups, int64_t n,
                  int64_t k, int block_size, bool ue8m0, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((k + block_size - 1) / block_size),
                  static_cast<unsigned>((n + block_size - 1) / block_size), static_cast<unsigned>(groups));
  fp8_quant::per_block_quant_fp8_kernel<T, VEC><<<grid, fp8_quant::kThreads, 0, stream>>>(
      w.ptr<const T>(), q.ptr<uint8_t>(), scales.ptr<float>(), n, k, block_size, ue8m0);
  PK_CHECK_LAUNCH("per_block_quant_fp8_kernel");
}

// Launches bound to their arguments, called back with the element type and vector width.
struct TokenGroupLaunch {
  const TensorView &x, &q, &scales;
  TokenGroupScaleLayout layout;
  int64_t rows, k;
  int group_size;
  bool ue8m0;
  cudaStream_t stream;
  template <typename T, int VEC>
  void operator()() const { launch_token_group<T, VEC>(x, q, scales, layout, rows, k, group_size, ue8m0, stream); }
};

struct BlockLaunch {
  const TensorView &w, &q, &scales;
  int64_t groups, n, k;
  int block_size;
  bool ue8m0;
  cudaStream_t stream;
  template <typename T, int VEC>
  void operator()() const { launch_block<T, VEC>(w, q, scales, groups, n, k, block_size, ue8m0, stream); }
};

// Calls f.template operator()<T, VEC>() for x's element type and the chosen vector width.
template <typename F>
void dispatch_dtype_and_width(DType dtype, int vec, const F& f) {
  switch (dtype) {
    case DType::BFloat16:
      if (vec == 8) return f.template operator()<__nv_bfloat16, 8>();
      return f.template operator()<__nv_bfloat16, 1>();
    case DType::Float16:
      if (vec == 8) return f.template operator()<__half, 8>();
      return f.template operator()<__half, 1>();
    default:
      if (vec == 4) return f.template operator()<float, 4>();
      return f.template operator()<float, 1>();
  }
}

// The kernel writes scales through `layout`, so their strides must be exactly its strides (any stride
// along a dimension of size 1). Column-major scales also start 16-byte aligned, as TMA needs.
void require_scale_layout(const TensorView& scales, const TokenGroupScaleLayout& layout, bool column_major) {
  if (!column_major) {
    require_contiguous(scales);
    return;
  }
  const int nd = scales.ndim;
  int64_t expected[TensorView::kMaxDims];
  expected[nd - 1] = layout.group_stride;
  expected[nd - 2] = layout.row_stride;
  int64_t batch = layout.batch_stride;
  for (int d = nd - 3; d >= 0; --d) {
    expected[d] = batch;
    batch *= scales.size(d);
  }
  std::string want = "[", got = "[";
  bool ok = true;
  for (int d = 0; d < nd; ++d) {
    ok = ok && (scales.size(d) == 1 || scales.stride(d) == expected[d]);
    want += (d ? ", " : "") + std::to_string(expected[d]);
    got += (d ? ", " : "") + std::to_string(scales.stride(d));
  }
  if (!ok) {
    throw_value_error(scales.name, "column-major strides " + want + "] (M padded to " +
                                       std::to_string(kScaleRowAlignment) + ")", "strides " + got + "]");
  }
  require_aligned(scales, 16);
}

}  // namespace

void per_token_group_quant_fp8(const TensorView& x, const TensorView& q, const TensorView& scales,
                               int group_size, bool ue8m0, bool column_major_scales, cudaStream_t stream) {
  require_input_dtype(x);
  require_dtype(q, DType::Float8E4M3);
  require_dtype(scales, DType::Float32);
  if (x.ndim < 1) throw_value_error(x.name, "at least 1 dimension", "a scalar");
  if (column_major_scales && x.ndim < 2) {
    throw_value_error(x.name, "at least 2 dimensions ([..., M, K]) for column-major scales", "shape " + x.shape_str());
  }
  if (!is_power_of_two(group_size)) {
    throw_value_error("group_size", "a power of two", std::to_string(group_size));
  }
  const int64_t k = x.size(-1);
  if (k == 0) throw_value_error(x.name, "a non-empty last dimension", "shape " + x.shape_str());
  require_cuda(x);
  require_same_device(x, q);
  require_same_device(x, scales);
  require_contiguous(x);
  require_contiguous(q);
  if (q.ndim != x.ndim) throw_value_error(q.name, "shape " + x.shape_str(), "shape " + q.shape_str());
  for (int d = 0; d < x.ndim; ++d) require_size(q, d, x.size(d), "same as x");
  const int64_t groups_per_row = (k + group_size - 1) / group_size;
  if (scales.ndim != x.ndim) throw_value_error(scales.name, std::to_string(x.ndim) + " dimensions", scales.shape_str());
  for (int d = 0; d < x.ndim - 1; ++d) require_size(scales, d, x.size(d), "same as x");
  require_size(scales, -1, groups_per_row, "ceil(K / group_size)");
  const int64_t rows = x.numel() / k;
  const TokenGroupScaleLayout layout =
      token_group_scale_layout(rows, x.ndim >= 2 ? x.size(-2) : rows, groups_per_row, column_major_scales);
  require_scale_layout(scales, layout, column_major_scales);
  if (rows == 0) return;
  if (groups_per_row > INT32_MAX) {
    throw_value_error(x.name, "at most 2^31 - 1 groups per row", std::to_string(groups_per_row));
  }
  if (column_major_scales && rows > INT32_MAX) {
    throw_value_error(x.name, "at most 2^31 - 1 rows with column-major scales", std::to_string(rows));
  }
  dispatch_dtype_and_width(x.dtype, vector_width(x, q, k, group_size),
                           TokenGroupLaunch{x, q, scales, layout, rows, k, group_size, ue8m0, stream});
}

void per_block_quant_fp8(const TensorView& w, const TensorView& q, const TensorView& scales, int block_size,
                         bool ue8m0, cudaStream_t stream) {
  require_input_dtype(w);
  require_dtype(q, DType::Float8E4M3);
  require_dtype(scales, DType::Float32);
  if (w.ndim != 2 && w.ndim != 3) throw_value_error(w.name, "2 or 3 dimensions ([N, K] or [G, N, K])", w.shape_str());
  if (!is_power_of_two(block_size)) {
    throw_value_error("block_size", "a power of two", std::to_string(block_size));
  }
  require_cuda(w);
  require_same_device(w, q);
  require_same_device(w, scales);
  require_contiguous(w);
  require_contiguous(q);
  require_contiguous(scales);
  const int64_t groups = w.ndim == 3 ? w.size(0) : 1;
  const int64_t n = w.size(-2), k = w.size(-1);
  if (n == 0 || k == 0) throw_value_error(w.name, "non-empty N and K", "shape " + w.shape_str());
  if (q.ndim != w.ndim) throw_value_error(q.name, "shape " + w.shape_str(), "shape " + q.shape_str());
  for (int d = 0; d < w.ndim; ++d) require_size(q, d, w.size(d), "same as w");
  if (scales.ndim != w.ndim) throw_value_error(scales.name, std::to_string(w.ndim) + " dimensions", scales.shape_str());
  if (w.ndim == 3) require_size(scales, 0, groups, "G");
  require_size(scales, -2, (n + block_size - 1) / block_size, "ceil(N / block_size)");
  require_size(scales, -1, (k + block_size - 1) / block_size, "ceil(K / block_size)");
  if (groups == 0) return;
  PK_ASSERT(groups <= 65535 && (n + block_size - 1) / block_size <= 65535, "grid y/z limits");
  dispatch_dtype_and_width(w.dtype, vector_width(w, q, k, block_size),
                           BlockLaunch{w, q, scales, groups, n, k, block_size, ue8m0, stream});
}

}  // namespace pykernels
