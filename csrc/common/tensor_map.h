// TMA descriptors (CUtensorMap) built on the host without linking libcuda: cuTensorMapEncodeTiled is a
// driver API, fetched through the runtime's entry-point query so that the module imports, and its host-side
// functions run, on machines without a driver. Include it before any CUTLASS header: cutlass/
// cuda_host_adapter.hpp includes cudaTypedefs.h inside namespace cutlass, which would hide its typedefs here.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/check.h"

namespace pykernels {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    void* symbol = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    PK_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &symbol, 12000, cudaEnableDefault,
                                                   &found));
    if (found != cudaDriverEntryPointSuccess || symbol == nullptr) {
      throw std::runtime_error("pykernels: the CUDA driver does not provide cuTensorMapEncodeTiled (needs >= 12.0)");
    }
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(symbol);
  }
  return fn;
}

// Encodes a tiled map, or throws naming `what`, the CUresult, the dims and the box.
inline CUtensorMap encode_tensor_map(const char* what, CUtensorMapDataType dtype, cuuint32_t rank, const void* base,
                                     const cuuint64_t* dims, const cuuint64_t* strides_bytes, const cuuint32_t* box,
                                     CUtensorMapSwizzle swizzle,
                                     CUtensorMapL2promotion l2_promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
  CUtensorMap map;
  cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult status = tensor_map_encode_tiled()(
      &map, dtype, rank, const_cast<void*>(base), dims, strides_bytes, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, l2_promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS) {
    std::string shape, box_shape;
    for (cuuint32_t d = 0; d < rank; ++d) {
      shape += (d ? " x " : "") + std::to_string(dims[d]);
      box_shape += (d ? " x " : "") + std::to_string(box[d]);
    }
    throw std::runtime_error(std::string("pykernels: cuTensorMapEncodeTiled failed for ") + what + " with CUresult " +
                             std::to_string(int(status)) + " (dims " + shape + ", box " + box_shape +
                             ", innermost first)");
  }
  return map;
}

}  // namespace pykernels
