// Launchers for the FP8 block-scaled GEMM (DeepSeek-V3 recipe), D = A @ B^T in bf16. Each validates its
// arguments, throwing ArgError before anything is launched, builds the TMA descriptors, picks the tile
// configuration (fp8_gemm::select_config) and enqueues the persistent kernel on `stream`. None reads
// device memory on the host: the masked path is CUDA-graph capturable.
#pragma once

#include <cuda_runtime.h>

#include "common/tensor_view.h"
#include "fp8_gemm/fp8_gemm_schedule.h"

namespace pykernels {

// a [M, K] e4m3, sa [M, K/128] f32, b [N, K] e4m3, sb [ceil(N/128), K/128] f32 -> out [M, N] bf16.
// In every layout sa is either row-major contiguous or MN-major TMA-aligned (fp8_gemm::ScaleALayout),
// recognized from its strides.
void fp8_gemm_nt(const TensorView& a, const TensorView& sa, const TensorView& b, const TensorView& sb,
                 const TensorView& out, cudaStream_t stream);

// a [M_total, K], b [G, N, K], sb [G, ceil(N/128), K/128], m_indices int32 [M_total] (-1 = padding,
// segments aligned to 128 rows) -> out [M_total, N].
void m_grouped_fp8_gemm_nt_contiguous(const TensorView& a, const TensorView& sa, const TensorView& b,
                                      const TensorView& sb, const TensorView& m_indices, const TensorView& out,
                                      cudaStream_t stream);

// a [G, M_max, K], sa [G, M_max, K/128], b [G, N, K], masked_m int32 [G] (read on the device) ->
// out [G, M_max, N]; expected_m only steers the tile choice.
void m_grouped_fp8_gemm_nt_masked(const TensorView& a, const TensorView& sa, const TensorView& b,
                                  const TensorView& sb, const TensorView& masked_m, int expected_m,
                                  const TensorView& out, cudaStream_t stream);

// Test hook: every later launch uses this tile shape instead of select_config's (block_m 64 or 128,
// block_n one of block_n_choice), without multicast unless fp8_gemm_force_multicast says otherwise; (0, 0)
// restores the heuristic. Process-wide, not thread-safe.
void fp8_gemm_force_tile(int block_m, int block_n);

// Test hook: every later launch uses this multicast mode (0 off, 1 A shared, 2 B shared by 2-CTA clusters)
// instead of select_config's; -1 restores the heuristic. A launch whose shape or tile does not allow the
// mode raises ValueError before anything runs. Process-wide, not thread-safe.
void fp8_gemm_force_multicast(int mode);

}  // namespace pykernels
