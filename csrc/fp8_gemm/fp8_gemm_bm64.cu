// The BLOCK_M = 64 (1 math warpgroup) instantiations of the FP8 GEMM kernel, one per block_n_choice width.
#include "fp8_gemm/fp8_gemm_launch.cuh"

namespace pykernels::fp8_gemm {

template void launch_tile<1, 16, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 32, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 48, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 56, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 64, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 96, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 112, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 128, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 144, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 160, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 192, Multicast::Off>(const LaunchArgs&, cudaStream_t);
// With multicast, only the shapes select_config can pick with it (multicast_instantiated).
template void launch_tile<1, 112, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 128, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 144, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 160, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 192, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);

}  // namespace pykernels::fp8_gemm
