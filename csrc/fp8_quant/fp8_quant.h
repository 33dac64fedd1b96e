// Launchers for the FP8 quantizers (DeepSeek-V3 fine-grained scaling). Each validates its arguments,
// throwing ArgError before anything is launched, then enqueues on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/tensor_view.h"

namespace pykernels {

// Where the scale of (row, group) lives for per-token-group quantization, rows being x's leading
// dimensions flattened. Row-major: [..., groups] contiguous. Column-major (DeepGEMM's MN-major, TMA-aligned
// activation scales): x [..., M, K] gives scales [..., M, groups] with stride 1 along M, M_pad along the
// groups and M_pad * groups between batches, M_pad = M rounded up to 4 floats (16 bytes).
struct TokenGroupScaleLayout {
  int64_t rows_per_batch;  // M (all rows when row-major)
  int64_t batch_stride, row_stride, group_stride;

  // row < 2^31 (the launcher checks): a 32-bit division is a few instructions, a 64-bit one a long sequence.
  __host__ __device__ int64_t offset(int64_t row, int64_t group) const {
    if (batch_stride == 0) return row * row_stride + group * group_stride;  // row-major: one batch
    const uint32_t batch = static_cast<uint32_t>(row) / static_cast<uint32_t>(rows_per_batch);
    const int64_t in_batch = row - static_cast<int64_t>(batch) * rows_per_batch;
    return batch * batch_stride + in_batch * row_stride + group * group_stride;
  }
};

constexpr int64_t kScaleRowAlignment = 4;  // floats: TMA wants 16-byte strides

// The layout for `rows` rows of which `rows_per_batch` (x's dim -2; ignored when row-major) form a batch.
inline TokenGroupScaleLayout token_group_scale_layout(int64_t rows, int64_t rows_per_batch, int64_t groups,
                                                      bool column_major) {
  if (!column_major) return {rows > 0 ? rows : 1, 0, groups, 1};
  const int64_t m_pad = (rows_per_batch + kScaleRowAlignment - 1) / kScaleRowAlignment * kScaleRowAlignment;
  return {rows_per_batch > 0 ? rows_per_batch : 1, m_pad * groups, 1, m_pad};
}

// x [..., K] (float32 / float16 / bfloat16, contiguous) -> q [..., K] float8_e4m3fn,
// scales [..., ceil(K / group_size)] float32 in the layout token_group_scale_layout gives (column-major
// needs x with at least 2 dimensions). group_size: a power of two >= 1. A group holding a NaN or an
// infinity gets a NaN or infinite scale and NaN codes.
void per_token_group_quant_fp8(const TensorView& x, const TensorView& q, const TensorView& scales,
                               int group_size, bool ue8m0, bool column_major_scales, cudaStream_t stream);

// w [N, K] or [G, N, K] -> q of the same shape, scales [(G,) ceil(N / block), ceil(K / block)] float32.
void per_block_quant_fp8(const TensorView& w, const TensorView& q, const TensorView& scales,
                         int block_size, bool ue8m0, cudaStream_t stream);

}  // namespace pykernels
