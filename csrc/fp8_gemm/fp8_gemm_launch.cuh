// The definition behind launch_tile, included only by the translation units that instantiate it.
#pragma once

#include <string>

#include "common/check.h"
#include "fp8_gemm/fp8_gemm.cuh"
#include "fp8_gemm/fp8_gemm_launch.h"

namespace pykernels::fp8_gemm {

template <int kMathWG, int kBlockN, Multicast kMulticast>
void launch_tile(const LaunchArgs& args, cudaStream_t stream) {
  constexpr int kSmemBytes = TileShape<kMathWG, kBlockN>::kSmemBytes;
  auto kernel = fp8_gemm_kernel<kMathWG, kBlockN, kMulticast>;
  PK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  if constexpr (kMulticast != Multicast::Off) {
    PK_ASSERT(args.num_ctas % kClusterSize == 0, "a cluster launch of " + std::to_string(args.num_ctas) + " CTAs");
    cudaLaunchAttribute cluster;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = kClusterSize;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(args.num_ctas);
    config.blockDim = dim3((kMathWG + 1) * 128);
    config.dynamicSmemBytes = kSmemBytes;
    config.stream = stream;
    config.attrs = &cluster;
    config.numAttrs = 1;
    PK_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args.map_a, args.map_b, args.map_sa, args.params));
  } else {
    kernel<<<args.num_ctas, (kMathWG + 1) * 128, kSmemBytes, stream>>>(args.map_a, args.map_b, args.map_sa,
                                                                     args.params);
  }
  PK_CHECK_LAUNCH("fp8_gemm_kernel");
}

}  // namespace pykernels::fp8_gemm
