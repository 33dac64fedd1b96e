// The BLOCK_M = 64 (1 math warpgroup) instantiations of the FP8 GEMM kernel, one per block_n_choice width.
#include "fp8_gemm/fp8_gemm_launch.cuh"

namespace pykernels::fp8_gemm {

template void launch_tile<1, 16>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 32>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 48>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 56>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 64>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 96>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 112>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 128>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 144>(const LaunchArgs&, cudaStream_t);
template void launch_tile<1, 160>(const LaunchArgs&, cudaStream_t);

}  // namespace pykernels::fp8_gemm
