// The definition behind launch_tile, included only by the translation units that instantiate it.
#pragma once

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include "common/check.h"
#include "fp8_gemm/fp8_gemm.cuh"
#include "fp8_gemm/fp8_gemm_launch.h"

namespace pykernels::fp8_gemm {

// Devices whose resident cluster count launch_tile remembers; on others it asks at every launch.
constexpr int kRememberedDevices = 64;

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
    // The grid stays within the clusters the device holds at once: the persistent walk fixes each cluster's
    // tiles up front, so a cluster left waiting for a free pair of SMs would start its whole share only
    // after another one finished. Where the SMs of a GPC do not all pair up (a partitioned or reduced SM
    // set) fewer than num_sms / 2 fit. The count belongs to the device and the instantiation and is asked
    // once (relaxed atomics: concurrent first launches may each ask, and get the same answer).
    static std::atomic<int> resident_plus_one[kRememberedDevices];
    int device = 0;
    PK_CUDA_CHECK(cudaGetDevice(&device));
    const bool remembered = device >= 0 && device < kRememberedDevices;
    int clusters = remembered ? resident_plus_one[device].load(std::memory_order_relaxed) - 1 : -1;
    if (clusters < 0) {
      PK_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
      if (remembered) resident_plus_one[device].store(clusters + 1, std::memory_order_relaxed);
    }
    if (clusters < 1) {
      throw std::runtime_error("pykernels: this GPU cannot co-schedule a 2-CTA cluster of fp8_gemm_kernel<" +
                               std::to_string(kMathWG) + ", " + std::to_string(kBlockN) + ", multicast " +
                               std::to_string(int(kMulticast)) + "> (" + std::to_string(kSmemBytes) +
                               " bytes of shared memory per CTA); fp8_gemm_force_multicast(0) runs without clusters");
    }
    config.gridDim = dim3(std::min(args.num_ctas, kClusterSize * clusters));
    PK_CUDA_CHECK(
        cudaLaunchKernelEx(&config, kernel, args.map_a, args.map_b, args.map_sa, args.map_out, args.params));
  } else {
    kernel<<<args.num_ctas, (kMathWG + 1) * 128, kSmemBytes, stream>>>(args.map_a, args.map_b, args.map_sa,
                                                                     args.map_out, args.params);
  }
  PK_CHECK_LAUNCH("fp8_gemm_kernel");
}

}  // namespace pykernels::fp8_gemm
