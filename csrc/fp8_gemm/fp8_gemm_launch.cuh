// The definition behind launch_tile, included only by the translation units that instantiate it.
#pragma once

#include "common/check.h"
#include "fp8_gemm/fp8_gemm.cuh"
#include "fp8_gemm/fp8_gemm_launch.h"

namespace pykernels::fp8_gemm {

template <int kMathWG, int kBlockN>
void launch_tile(const LaunchArgs& args, cudaStream_t stream) {
  constexpr int kSmemBytes = TileShape<kMathWG, kBlockN>::kSmemBytes;
  auto kernel = fp8_gemm_kernel<kMathWG, kBlockN>;
  PK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  kernel<<<args.num_ctas, (kMathWG + 1) * 128, kSmemBytes, stream>>>(args.map_a, args.map_b, args.map_sa,
                                                                   args.map_out, args.params);
  PK_CHECK_LAUNCH("fp8_gemm_kernel");
}

}  // namespace pykernels::fp8_gemm
