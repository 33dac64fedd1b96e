// Launchers for MLA decode over a paged latent KV cache. Each validates its arguments, throwing ArgError
// before anything is launched, then enqueues on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/tensor_view.h"

namespace pykernels {

// Host check of the kernel's layout assumptions (V's view of the K tile; accumulator rows per thread).
bool mla_layouts_consistent();

// The kernels' index math, on the host: the TMA coordinates (column, row) of the 9 boxes of cache page
// `block_id`; (column, row, request) of the 9 boxes of a query tile; the tokens of a page that hold keys
// (the rest are zeroed before P V); which requests go through the combine, from split_offsets.
std::vector<std::pair<int, int>> mla_page_boxes(int block_id);
std::vector<std::array<int, 3>> mla_q_boxes(int request, int row_block);
int mla_valid_tokens(int seqlen, int page);

// The split kernel's shared-memory plan for a bf16 (fp8 = false) or e4m3 cache: each region's byte offset
// and size in the aligned SharedStorage (q, tile<s>, raw<s>, p<s> = where P of the page in stage s is
// written, row_part, full, q_full), and "launch": the dynamic shared memory requested (offset 0).
struct MlaSharedRegion {
  std::string name;
  int64_t offset, bytes;
};
std::vector<MlaSharedRegion> mla_shared_plan(bool fp8);

// The stage page `seq` of a part lands in and the parity of the barrier completion its consumers wait for
// (mla_decode_pipeline.h).
std::pair<int, int> mla_page_stage(int seq);
// How many pages ahead of the one being consumed the split kernel's loads run.
int mla_load_distance();
std::vector<bool> mla_combined_requests(const std::vector<int>& split_offsets);

// The split-KV plan on the host (for tests and for callers without a GPU): seqlens -> (part_splits
// [num_parts + 1], splits [4 * capacity], split_offsets [b + 1]); capacity = b + num_parts.
void mla_plan_splits_host(const std::vector<int>& seqlens, int num_parts, std::vector<int>& part_splits,
                          std::vector<int>& splits, std::vector<int>& split_offsets);

// The same plan computed by a one-thread kernel from device seqlens into device int32 tensors (capturable).
void mla_plan_splits_device(const TensorView& seqlens, const TensorView& part_splits, const TensorView& splits,
                            const TensorView& split_offsets, cudaStream_t stream);

// q [b, s_q, h_q, 576] bf16; kv_cache [num_blocks, 64, 1, 576] bf16 or float8_e4m3fn (with kv_scale [1] f32);
// block_table [b, max_blocks] int32; seqlens [b] int32; the schedule's three int32 tensors; out [b, s_q, h_q,
// 512] bf16; lse [b, h_q, s_q] f32; out_partial [capacity, s_q * h_q, 512] f32; lse_partial [capacity, s_q * h_q].
// kv_scale may be a view with data == nullptr (bf16 cache). A query row that sees no key (a request of
// length 0, whose block_table row is never read, or a causal row before its first key) gets out 0 and lse +inf.
// num_blocks * 64 must fit int32 (the TMA row coordinate). The split kernel and the combine are launched as
// programmatic dependents of whatever precedes them on `stream`.
void mla_decode(const TensorView& q, const TensorView& kv_cache, const TensorView& block_table,
                const TensorView& seqlens, const TensorView* kv_scale, const TensorView& part_splits,
                const TensorView& splits, const TensorView& split_offsets, const TensorView& out,
                const TensorView& lse, const TensorView& out_partial, const TensorView& lse_partial,
                float softmax_scale, bool causal, cudaStream_t stream);

}  // namespace pykernels
