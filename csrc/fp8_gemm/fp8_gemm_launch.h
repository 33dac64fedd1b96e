// One launch of the FP8 GEMM kernel for a tile shape, declared here and instantiated (for every
// block_n_choice width and both BLOCK_M) in fp8_gemm_bm64.cu and fp8_gemm_bm128.cu: the instantiations
// compile in parallel, and the launcher's translation unit carries no kernel code.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "fp8_gemm/fp8_gemm_schedule.h"

namespace pykernels::fp8_gemm {

struct Params {
  Layout layout;
  int m_rows;      // rows of A per group: M (plain), M_total (contiguous), M_max (masked)
  int n;
  int k;
  int num_groups;  // groups of B
  const float* sa;  // A scales, G_a x m_rows x K/128 in sa_layout (G_a = G for masked, else 1)
  ScaleALayout sa_layout;
  const float* sb;  // [G, ceil(N / 128), K / 128]
  __nv_bfloat16* out;  // [G_a * m_rows, N]
  // The epilogue stores through TMA (map_out) when the output allows a tensor map: rows of N bf16 a
  // multiple of 16 bytes apart (N % 8 == 0) and a 16-byte aligned base. Otherwise, chosen here once per
  // launch, each math thread stores its registers to `out` with bounds checks.
  bool tma_store;
  const int* group_info;  // m_indices or masked_m (device memory)
};

struct LaunchArgs {
  CUtensorMap map_a;  // A [G_a, m_rows, K] e4m3, box 128 x BLOCK_M (BLOCK_M / 2 when A is shared)
  CUtensorMap map_b;  // B [G, N, K] e4m3, box 128 x BLOCK_N (BLOCK_N / 2 when B is shared)
  CUtensorMap map_sa;  // MnMajor A scales [G_a, K/128, m_rows (M_pad apart)] f32, box BLOCK_M; unused for RowMajor
  CUtensorMap map_out;  // out [G_a, m_rows, N] bf16, box output_box_cols x 64, swizzled; unused without tma_store
  Params params;
  int num_ctas;  // even for the cluster kernels, which launch at most as many clusters as the GPU holds at once
};

// Sets the kernel's shared-memory limit and enqueues it on `stream` (with multicast: as 2-CTA clusters);
// throws CudaError on failure.
template <int kMathWG, int kBlockN, Multicast kMulticast>
void launch_tile(const LaunchArgs& args, cudaStream_t stream);

}  // namespace pykernels::fp8_gemm
