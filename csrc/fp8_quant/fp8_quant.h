// Launchers for the FP8 quantizers (DeepSeek-V3 fine-grained scaling). Each validates its arguments,
// throwing ArgError before anything is launched, then enqueues on `stream`.
#pragma once

#include <cuda_runtime.h>

#include "common/tensor_view.h"

namespace pykernels {

// x [..., K] (float32 / float16 / bfloat16, contiguous) -> q [..., K] float8_e4m3fn,
// scales [..., ceil(K / group_size)] float32. group_size: a power of two >= 1.
void per_token_group_quant_fp8(const TensorView& x, const TensorView& q, const TensorView& scales,
                               int group_size, bool ue8m0, cudaStream_t stream);

// w [N, K] or [G, N, K] -> q of the same shape, scales [(G,) ceil(N / block), ceil(K / block)] float32.
void per_block_quant_fp8(const TensorView& w, const TensorView& q, const TensorView& scales,
                         int block_size, bool ue8m0, cudaStream_t stream);

}  // namespace pykernels
