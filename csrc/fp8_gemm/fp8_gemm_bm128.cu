// The BLOCK_M = 128 (2 math warpgroups) instantiations of the FP8 GEMM kernel, one per block_n_choice width.
#include "fp8_gemm/fp8_gemm_launch.cuh"

namespace pykernels::fp8_gemm {

template void launch_tile<2, 16>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 32>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 48>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 56>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 64>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 96>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 112>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 128>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 144>(const LaunchArgs&, cudaStream_t);
template void launch_tile<2, 160>(const LaunchArgs&, cudaStream_t);

}  // namespace pykernels::fp8_gemm
