// Launchers for the MoE dispatch/combine stages (definitions in pykernels/reference/moe.py). Each validates
// its arguments, throwing ArgError before anything is launched, then enqueues on `stream`. Optional tensors
// (scales) are passed as nullptr.
//
// The moe_plan_* functions run the kernels' index math (the __host__ __device__ helpers of moe.cuh)
// serially on CPU tensors, so that the tests can hold it to the reference on a machine without a GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/tensor_view.h"

namespace pykernels {

// topk_idx [T, k] int64 -> per_rank [W] int64, per_expert [E] int64, slots [T, W] int32.
void moe_dispatch_layout(const TensorView& topk_idx, const TensorView& per_rank, const TensorView& per_expert,
                         const TensorView& slots, int num_experts, cudaStream_t stream);

// x [T, H] bf16 (or fp8 with x_scales [T, H/128]) -> send_x [N, H] (fp8 when quantize), meta [N, M] int32.
void moe_pack(const TensorView& x, const TensorView* x_scales, const TensorView& topk_idx,
              const TensorView& topk_weights, const TensorView& slots, const TensorView& send_offsets,
              const TensorView& send_x, const TensorView& meta, int num_local, bool quantize, cudaStream_t stream);

// buf [N, H] (bf16 / float32), slots [T, W], send_offsets [W] -> out [T, H].
void moe_combine_reduce(const TensorView& buf, const TensorView& slots, const TensorView& send_offsets,
                        const TensorView& out, cudaStream_t stream);

// topk_idx [R, k] int64 local ids -> counts [L] int64, rank [R, k] int32. chunk_counts: int32 workspace
// [moe_expert_rank_chunks(R * k), L].
void moe_expert_ranks(const TensorView& topk_idx, const TensorView& counts, const TensorView& rank,
                      const TensorView& chunk_counts, cudaStream_t stream);
// CTAs (chunks of pairs) the expert-ranks kernels run on for num_pairs (token, slot) pairs.
int64_t moe_expert_rank_chunks(int64_t num_pairs);

// x [R, H] (bf16 / fp8, scales [R, S]) -> x_sorted [M, H], s_sorted [M, S], m_indices [M] (pre-filled with -1),
// pos [R, k] int32.
void moe_permute(const TensorView& x, const TensorView* x_scales, const TensorView& topk_idx, const TensorView& rank,
                 const TensorView& starts, const TensorView& x_sorted, const TensorView* s_sorted,
                 const TensorView& m_indices, const TensorView& pos, cudaStream_t stream);

// y_sorted [M, N] (bf16 / float32), pos [R, k] int32, weights [R, k] float32 -> out [R, N].
void moe_unpermute(const TensorView& y_sorted, const TensorView& pos, const TensorView& weights,
                   const TensorView& out, cudaStream_t stream);

// Low-latency mode (pykernels/reference/moe.py): x [T, H] bf16 -> send [W * M, row words] int32 (FP8 payload
// quantized in the pack when fp8); recv + pos [S, k] -> out_x [L, S, H] (fp8 with out_s [L, S, H/128], or
// bf16); y [L, S, N] -> ret [S, k, N]; returned [W, M, k, N] + routing -> out [T, N]. All bf16 rows are
// copied in 16-byte units: H and N multiples of 8 (128 for FP8), every tensor 16-byte aligned.
void moe_ll_pack(const TensorView& x, const TensorView& topk_idx, const TensorView& send, int num_experts, int world,
                 int64_t max_tokens, int scale_word, int id_word, bool fp8, cudaStream_t stream);
void moe_ll_unpack(const TensorView& recv, const TensorView& pos, const TensorView& out_x, const TensorView* out_s,
                   int scale_word, int id_word, cudaStream_t stream);
void moe_ll_combine_pack(const TensorView& y, const TensorView& recv, const TensorView& pos, const TensorView& ret,
                         int id_word, cudaStream_t stream);
void moe_ll_combine_reduce(const TensorView& returned, const TensorView& topk_idx, const TensorView& weights,
                           const TensorView& out, int num_experts, cudaStream_t stream);
// The low-latency kernels' row indexing, for host tests.
int64_t moe_ll_send_row(int rank, int64_t token, int64_t max_tokens);
int64_t moe_ll_expert_row(int64_t expert, int64_t pos, int num_local, int64_t rows);
int64_t moe_ll_return_row(int rank, int64_t token, int slot, int64_t max_tokens, int topk);

// Host planners (CPU tensors, same outputs as the kernels above).
void moe_plan_dispatch_layout(const TensorView& topk_idx, const TensorView& per_rank, const TensorView& per_expert,
                              const TensorView& slots, int num_experts);
void moe_plan_expert_ranks(const TensorView& topk_idx, const TensorView& counts, const TensorView& rank);
void moe_plan_permute(const TensorView& topk_idx, const TensorView& rank, const TensorView& starts,
                      const TensorView& m_indices, const TensorView& pos);
int64_t moe_padded_rows(int64_t count, int alignment);

}  // namespace pykernels
