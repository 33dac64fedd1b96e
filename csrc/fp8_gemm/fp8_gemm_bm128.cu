// The BLOCK_M = 128 (2 math warpgroups) instantiations of the FP8 GEMM kernel, one per block_n_choice width.
#include "fp8_gemm/fp8_gemm_launch.cuh"

namespace pykernels::fp8_gemm {

template void launch_tile<2, 16, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 32, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 48, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 56, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 64, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 96, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 112, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 128, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 144, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 160, Multicast::Off>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 192, Multicast::Off>(const LaunchArgs&, cudaStream_t);
// With multicast, only the shapes select_config can pick with it (multicast_instantiated).
template void launch_tile<2, 112, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 128, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 144, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 160, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 192, Multicast::SharedA>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 112, Multicast::SharedB>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 128, Multicast::SharedB>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 144, Multicast::SharedB>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 160, Multicast::SharedB>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 192, Multicast::SharedB>(const LaunchArgs&, cudaStream_t);

}  // namespace pykernels::fp8_gemm
