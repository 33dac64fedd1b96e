// MoE expert-parallel stages (see pykernels/reference/moe.py for their exact definitions).
//
// Row stages (pack, permute, combine-reduce, unpermute) give each token row to one CTA, which reads every
// 16-byte chunk of the row once and writes it to all of that row's destinations: they are pure bandwidth.
// The dispatch layout is a one-CTA, one-pass scan: chunks of 1024 tokens, warp votes for the within-warp
// prefix, a shared-memory scan over the 32 warps, running totals carried from chunk to chunk (4 chunks at
// 4096 tokens). Expert ranks, which see every (token, slot) pair a rank receives, split the same scan over
// one CTA per chunk (see expert_ranks_kernel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/fp8.cuh"
#include "fp8_quant/fp8_quant.cuh"

namespace pykernels {
namespace moe {

constexpr int kScanThreads = 1024;          // one CTA scans everything
constexpr int kScanWarps = kScanThreads / 32;
constexpr int kMaxWorld = 64;               // destination sets are 64-bit masks
constexpr int kMaxExperts = 4096;           // per-expert counters live in shared memory
constexpr int kMaxLocalExperts = 256;       // expert_ranks keeps a [warps][experts] table in shared memory
constexpr int kMaxTopk = 32;
constexpr int kRowThreads = 128;
constexpr int kScaleGroup = 128;
static_assert(kScanThreads % 32 == 0 && kScanWarps <= 32, "the warp scan runs in one warp's worth of entries");
static_assert(kScanWarps * kMaxLocalExperts * 4 + kMaxLocalExperts * 4 <= 48 * 1024, "static shared memory");

// ---- index math, shared by the kernels and the host planners the tests run on the CPU ----------------

// Whether a slot names an expert. Ids outside [0, num_experts) are ignored by every stage (the checked
// path refuses them on the host first), so no id can index past a per-expert or per-rank table.
__host__ __device__ inline bool is_expert(int64_t e, int num_experts) { return e >= 0 && e < num_experts; }

// Bit r set when the token has an expert on rank r (experts r*num_local .. (r+1)*num_local-1).
__host__ __device__ inline uint64_t destination_mask(const int64_t* topk_row, int topk, int num_local,
                                                     int num_experts) {
  uint64_t mask = 0;
#pragma unroll 1
  for (int j = 0; j < topk; ++j) {
    const int64_t e = topk_row[j];
    if (is_expert(e, num_experts)) mask |= uint64_t{1} << (e / num_local);
  }
  return mask;
}

// The id rank `rank` knows expert `e` by, or -1 when e lives elsewhere (or is -1).
__host__ __device__ inline int32_t local_expert_id(int64_t e, int rank, int num_local) {
  const int64_t local = e - static_cast<int64_t>(rank) * num_local;
  return (e >= 0 && local >= 0 && local < num_local) ? static_cast<int32_t>(local) : -1;
}

// Rows an expert's segment takes in the expert-sorted buffer.
__host__ __device__ inline int64_t padded_rows(int64_t count, int alignment) {
  return (count + alignment - 1) / alignment * alignment;
}

// Row of the send buffer that carries a token to its destination: the destination's first row plus the
// token's slot within that destination's segment.
__host__ __device__ inline int64_t send_row(const int64_t* send_offsets, const int32_t* token_slots_row, int rank) {
  return send_offsets[rank] + token_slots_row[rank];
}

// Row of the expert-sorted buffer that carries pair (token, slot), or -1.
__host__ __device__ inline int64_t sorted_row(int64_t e, int num_local, const int64_t* starts,
                                              int32_t rank_in_expert) {
  return e >= 0 && e < num_local ? starts[e] + rank_in_expert : -1;
}

// ---- device helpers -------------------------------------------------------------------------------

__device__ inline unsigned lanes_below() {
  unsigned mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

// In-place exclusive scan of table[w][col] over the warps w, starting at running[col]; running[col] gets
// the total. Called by every thread, with one thread per column.
__device__ inline void scan_warp_counts(int* table, int columns, int* running) {
#pragma unroll 1
  for (int col = threadIdx.x; col < columns; col += blockDim.x) {
    int base = running[col];
#pragma unroll 1  // a serial chain through shared memory; unrolling only buys registers the CTA lacks
    for (int w = 0; w < kScanWarps; ++w) {
      const int c = table[w * columns + col];
      table[w * columns + col] = base;
      base += c;
    }
    running[col] = base;
  }
}

// ---- counting stages -------------------------------------------------------------------------------

// topk_idx [T, topk] -> per_rank [world], per_expert [num_experts], slots [T, world] (int32, -1 = not sent).
__global__ void __launch_bounds__(kScanThreads) dispatch_layout_kernel(
    const int64_t* __restrict__ topk_idx, int64_t* __restrict__ per_rank, int64_t* __restrict__ per_expert,
    int32_t* __restrict__ slots, int num_tokens, int topk, int num_experts, int world) {
  __shared__ int expert_count[kMaxExperts];
  __shared__ int warp_count[kScanWarps * kMaxWorld];
  __shared__ int running[kMaxWorld];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int num_local = num_experts / world;
  for (int e = threadIdx.x; e < num_experts; e += kScanThreads) expert_count[e] = 0;
  for (int r = threadIdx.x; r < world; r += kScanThreads) running[r] = 0;
  __syncthreads();
  for (int base = 0; base < num_tokens; base += kScanThreads) {
    const int t = base + threadIdx.x;
    const bool valid = t < num_tokens;
    const int64_t* row = topk_idx + static_cast<int64_t>(valid ? t : 0) * topk;
    const uint64_t mask = valid ? destination_mask(row, topk, num_local, num_experts) : 0;
    if (valid) {
#pragma unroll 1
      for (int j = 0; j < topk; ++j) {
        if (is_expert(row[j], num_experts)) atomicAdd(&expert_count[row[j]], 1);
      }
    }
#pragma unroll 1
    for (int r = 0; r < world; ++r) {
      const unsigned votes = __ballot_sync(0xffffffffu, (mask >> r) & 1);
      if (lane == 0) warp_count[warp * world + r] = __popc(votes);
    }
    __syncthreads();
    scan_warp_counts(warp_count, world, running);
    __syncthreads();
#pragma unroll 1
    for (int r = 0; r < world; ++r) {
      const bool hit = (mask >> r) & 1;
      const unsigned votes = __ballot_sync(0xffffffffu, hit);
      if (valid) {
        slots[static_cast<int64_t>(t) * world + r] = hit ? warp_count[warp * world + r] + __popc(votes & lanes_below()) : -1;
      }
    }
    __syncthreads();
  }
#pragma unroll 1
  for (int r = threadIdx.x; r < world; r += kScanThreads) per_rank[r] = running[r];
#pragma unroll 1
  for (int e = threadIdx.x; e < num_experts; e += kScanThreads) per_expert[e] = expert_count[e];
}

// Expert ranks run on the whole GPU in three launches over chunks of kRankChunk pairs: per-chunk counts
// (one CTA per chunk), an exclusive scan of those counts over the chunks (one warp per expert), then each
// chunk's ranks from its offsets (one CTA per chunk). At EP8 prefill (4096 tokens x top-8 from each of 8
// ranks) that is ~256 CTAs per launch instead of one CTA walking ~256 chunks in turn.
constexpr int kRankChunk = kScanThreads;
constexpr int kOffsetWarps = 8;  // experts per CTA of the scan launch

__host__ __device__ inline int64_t rank_chunks(int64_t num_pairs) { return (num_pairs + kRankChunk - 1) / kRankChunk; }

// A local id that indexes the per-expert tables; anything else (-1, or an id a caller let through
// unchecked) takes no row.
__host__ __device__ inline bool is_local_expert(int64_t e, int num_local) { return e >= 0 && e < num_local; }

// chunk_counts [chunks][num_local] int32: pairs of each expert in each chunk.
__global__ void __launch_bounds__(kScanThreads) expert_chunk_counts_kernel(
    const int64_t* __restrict__ topk_idx, int32_t* __restrict__ chunk_counts, int64_t num_pairs, int num_local) {
  __shared__ int count[kMaxLocalExperts];
  for (int e = threadIdx.x; e < num_local; e += kScanThreads) count[e] = 0;
  __syncthreads();
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kRankChunk + threadIdx.x;
  if (p < num_pairs) {
    const int64_t e = topk_idx[p];
    if (is_local_expert(e, num_local)) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_local; e += kScanThreads) {
    chunk_counts[static_cast<int64_t>(blockIdx.x) * num_local + e] = count[e];
  }
}

// In place: chunk_counts[c][e] -> pairs of e in chunks before c; counts[e] = the total. One warp per
// expert, 32 chunks per step: a shuffle scan across the lanes, the carry in a register.
__global__ void __launch_bounds__(kOffsetWarps * 32) expert_chunk_offsets_kernel(
    int32_t* __restrict__ chunk_counts, int64_t* __restrict__ counts, int64_t chunks, int num_local) {
  const int lane = threadIdx.x % 32;
  const int e = blockIdx.x * kOffsetWarps + threadIdx.x / 32;
  if (e >= num_local) return;  // whole warps leave together: e is uniform across a warp
  int64_t carry = 0;
#pragma unroll 1
  for (int64_t base = 0; base < chunks; base += 32) {
    const int64_t c = base + lane;
    const int32_t n = c < chunks ? chunk_counts[c * num_local + e] : 0;
    int32_t inclusive = n;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const int32_t up = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    if (c < chunks) chunk_counts[c * num_local + e] = static_cast<int32_t>(carry + inclusive - n);
    carry += __shfl_sync(0xffffffffu, inclusive, 31);
  }
  if (lane == 0) counts[e] = carry;
}

// One CTA per chunk: each pair's rank = its expert's offset at the chunk + its rank inside the chunk
// (warp votes for the within-warp prefix, a shared-memory scan over the warps).
__global__ void __launch_bounds__(kScanThreads) expert_ranks_kernel(
    const int64_t* __restrict__ topk_idx, const int32_t* __restrict__ chunk_offsets, int32_t* __restrict__ rank,
    int64_t num_pairs, int num_local) {
  __shared__ int warp_count[kScanWarps * kMaxLocalExperts];
  __shared__ int running[kMaxLocalExperts];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t chunk = blockIdx.x;
  for (int e = threadIdx.x; e < num_local; e += kScanThreads) running[e] = chunk_offsets[chunk * num_local + e];
#pragma unroll 1
  for (int e = lane; e < num_local; e += 32) warp_count[warp * num_local + e] = 0;
  __syncthreads();
  const int64_t p = chunk * kRankChunk + threadIdx.x;
  const int64_t id = p < num_pairs ? topk_idx[p] : -1;
  const int e = is_local_expert(id, num_local) ? static_cast<int>(id) : -1;
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const int before = __popc(peers & lanes_below());
  if (e >= 0 && before == 0) warp_count[warp * num_local + e] = __popc(peers);
  __syncthreads();
  scan_warp_counts(warp_count, num_local, running);
  __syncthreads();
  if (p < num_pairs) rank[p] = e >= 0 ? warp_count[warp * num_local + e] + before : -1;
}

// ---- row stages ------------------------------------------------------------------------------------

// Copies one row of `row_units` units of type V (uint4 = 16 bytes when the row allows it) to `count` rows.
template <typename V>
__device__ inline void copy_row_to(const V* __restrict__ src, V* __restrict__ dst_base, const int64_t* dst_rows,
                                   int count, int64_t row_units) {
  for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) {
    const V v = src[i];
    for (int d = 0; d < count; ++d) dst_base[dst_rows[d] * row_units + i] = v;
  }
}

// The metadata rows of token t, for each destination (int32 words: ids | weight bits | scale bits).
__device__ inline void write_meta(const int64_t* topk_row, const float* weight_row, const float* scale_row,
                                  int topk, int num_scales, int num_local, const int* dst_ranks,
                                  const int64_t* dst_rows, int count, int32_t* meta, int meta_width) {
  const int per_dst = 2 * topk + num_scales;
  for (int i = threadIdx.x; i < count * per_dst; i += blockDim.x) {
    const int d = i / per_dst, w = i % per_dst;
    int32_t value;
    if (w < topk) {
      value = local_expert_id(topk_row[w], dst_ranks[d], num_local);
    } else if (w < 2 * topk) {
      const bool mine = local_expert_id(topk_row[w - topk], dst_ranks[d], num_local) >= 0;
      value = __float_as_int(mine ? weight_row[w - topk] : 0.0f);
    } else {
      value = __float_as_int(scale_row[w - 2 * topk]);
    }
    meta[dst_rows[d] * meta_width + w] = value;
  }
}

// Loads token t's destinations into shared memory; returns how many there are.
__device__ inline int load_destinations(const int32_t* slots_row, const int64_t* send_offsets, int world,
                                        int* dst_ranks, int64_t* dst_rows) {
  __shared__ int count;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int r = 0; r < world; ++r) {
      if (slots_row[r] >= 0) {
        dst_ranks[n] = r;
        dst_rows[n] = send_row(send_offsets, slots_row, r);
        ++n;
      }
    }
    count = n;
  }
  __syncthreads();
  return count;
}

// One CTA per token: its payload row (V units) and metadata to each destination's send row.
template <typename V>
__global__ void __launch_bounds__(kRowThreads) pack_kernel(
    const V* __restrict__ x, const float* __restrict__ x_scales, const int64_t* __restrict__ topk_idx,
    const float* __restrict__ topk_weights, const int32_t* __restrict__ slots, const int64_t* __restrict__ send_offsets,
    V* __restrict__ send_x, int32_t* __restrict__ meta, int64_t row_units, int topk, int num_scales, int num_local,
    int world, int meta_width) {
  __shared__ int dst_ranks[kMaxWorld];
  __shared__ int64_t dst_rows[kMaxWorld];
  const int64_t t = blockIdx.x;
  const int count = load_destinations(slots + t * world, send_offsets, world, dst_ranks, dst_rows);
  if (count == 0) return;
  copy_row_to<V>(x + t * row_units, send_x, dst_rows, count, row_units);
  write_meta(topk_idx + t * topk, topk_weights + t * topk, x_scales + t * num_scales, topk, num_scales, num_local,
             dst_ranks, dst_rows, count, meta, meta_width);
}

constexpr int kQuantVec = 8;  // bf16 values a lane quantizes: 16 bytes

// Quantizes one bf16 row of `hidden` values (a multiple of 128) by 128-element groups across the CTA, as the
// quantizer does: 16 lanes per group, kQuantVec values a lane, the group's amax reduced across its lanes (a
// NaN or an infinity gives a NaN or infinite scale and NaN codes). write(vals, scale, g, col, first_lane)
// stores a lane's values at column col of group g; first_lane marks the lane that writes the scale.
template <typename Write>
__device__ inline void quantize_row_groups(const __nv_bfloat16* __restrict__ row, int hidden, Write write) {
  constexpr int kLanesPerGroup = kScaleGroup / kQuantVec;
  static_assert(kLanesPerGroup == 16 && kRowThreads % kLanesPerGroup == 0, "two groups per warp");
  constexpr int kGroupsPerPass = kRowThreads / kLanesPerGroup;
  const int groups = hidden / kScaleGroup;
  const int lane_in_group = threadIdx.x % kLanesPerGroup;
  // The loop bound is uniform across the CTA, so every shuffle sees all 32 lanes.
  for (int g0 = 0; g0 < groups; g0 += kGroupsPerPass) {
    const int g = g0 + static_cast<int>(threadIdx.x) / kLanesPerGroup;
    const bool valid = g < groups;
    const int64_t col = static_cast<int64_t>(g) * kScaleGroup + lane_in_group * kQuantVec;
    float vals[kQuantVec];
    float amax = 0.0f;
    if (valid) {
      fp8_quant::load_as_float<__nv_bfloat16, kQuantVec>(row + col, vals);
      amax = fp8_quant::abs_max(vals);
    }
    amax = fp8_quant::lanes_amax(amax, kLanesPerGroup);
    if (!valid) continue;
    write(vals, fp8_scale_from_amax(amax, false), g, col, lane_in_group == 0);
  }
}

// One CTA per token, bf16 in, FP8 out: 16 lanes per 128-element group, 8 elements (16 bytes) per lane,
// the scale reduced across the 16 lanes as the quantizer reduces it (a group holding a NaN or an infinity
// gets a NaN or infinite scale and NaN codes); the quantized bytes and the scale go to every destination.
__global__ void __launch_bounds__(kRowThreads) pack_quantize_kernel(
    const __nv_bfloat16* __restrict__ x, const int64_t* __restrict__ topk_idx, const float* __restrict__ topk_weights,
    const int32_t* __restrict__ slots, const int64_t* __restrict__ send_offsets, uint8_t* __restrict__ send_x,
    int32_t* __restrict__ meta, int hidden, int topk, int num_local, int world, int meta_width) {
  __shared__ int dst_ranks[kMaxWorld];
  __shared__ int64_t dst_rows[kMaxWorld];
  const int64_t t = blockIdx.x;
  const int count = load_destinations(slots + t * world, send_offsets, world, dst_ranks, dst_rows);
  if (count == 0) return;
  quantize_row_groups(x + t * hidden, hidden, [&](const float (&vals)[kQuantVec], float scale, int g, int64_t col,
                                                  bool first_lane) {
    for (int d = 0; d < count; ++d) {
      fp8_quant::quantize_store<kQuantVec>(vals, scale, send_x + dst_rows[d] * hidden + col);
      if (first_lane) meta[dst_rows[d] * meta_width + 2 * topk + g] = __float_as_int(scale);
    }
  });
  write_meta(topk_idx + t * topk, topk_weights + t * topk, nullptr, topk, 0, num_local, dst_ranks, dst_rows, count,
             meta, meta_width);
}

template <typename T>
__device__ inline float as_float(T v) { return fp8_quant::to_float<T>(v); }

template <typename T>
__device__ inline T from_float(float v);
template <>
__device__ inline float from_float<float>(float v) { return v; }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One CTA per token: out[t] = sum over its destinations, in rank order, of the rows they returned.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) combine_reduce_kernel(
    const T* __restrict__ buf, const int32_t* __restrict__ slots, const int64_t* __restrict__ send_offsets,
    T* __restrict__ out, int64_t hidden, int world) {
  __shared__ int dst_ranks[kMaxWorld];
  __shared__ int64_t dst_rows[kMaxWorld];
  const int64_t t = blockIdx.x;
  const int count = load_destinations(slots + t * world, send_offsets, world, dst_ranks, dst_rows);
  using Chunk = fp8_quant::Vec<T, VEC>;
  for (int64_t c = threadIdx.x; c * VEC < hidden; c += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    for (int d = 0; d < count; ++d) {
      const Chunk v = *reinterpret_cast<const Chunk*>(buf + dst_rows[d] * hidden + c * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], as_float(v.v[i]));
    }
    Chunk o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_float<T>(acc[i]);
    *reinterpret_cast<Chunk*>(out + t * hidden + c * VEC) = o;
  }
}

// One CTA per received token: its row (V units) and scales to the sorted row of each of its pairs.
template <typename V>
__global__ void __launch_bounds__(kRowThreads) permute_kernel(
    const V* __restrict__ x, const float* __restrict__ x_scales, const int64_t* __restrict__ topk_idx,
    const int32_t* __restrict__ rank, const int64_t* __restrict__ starts, V* __restrict__ x_sorted,
    float* __restrict__ s_sorted, int32_t* __restrict__ m_indices, int32_t* __restrict__ pos, int64_t row_units,
    int topk, int num_scales, int num_local) {
  __shared__ int64_t dst_rows[kMaxTopk];
  __shared__ int count;
  const int64_t i = blockIdx.x;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int j = 0; j < topk; ++j) {
      const int64_t e = topk_idx[i * topk + j];
      const int64_t row = sorted_row(e, num_local, starts, rank[i * topk + j]);
      pos[i * topk + j] = static_cast<int32_t>(row);
      if (row >= 0) {
        m_indices[row] = static_cast<int32_t>(e);
        dst_rows[n++] = row;
      }
    }
    count = n;
  }
  __syncthreads();
  copy_row_to<V>(x + i * row_units, x_sorted, dst_rows, count, row_units);
  if (x_scales != nullptr) {
    for (int k = threadIdx.x; k < count * num_scales; k += blockDim.x) {
      s_sorted[dst_rows[k / num_scales] * num_scales + k % num_scales] = x_scales[i * num_scales + k % num_scales];
    }
  }
}

// out_row = sum over d < count of row_weights[d] * src[rows[d]], VEC values a thread per pass, in float32 with
// a rounded product then a rounded sum (the reference's two float32 operations, never fused), rounded once to T.
template <typename T, int VEC>
__device__ inline void weighted_row_sum(const T* __restrict__ src, const int64_t* rows, const float* row_weights,
                                        int count, int64_t hidden, T* __restrict__ out_row) {
  using Chunk = fp8_quant::Vec<T, VEC>;
  for (int64_t c = threadIdx.x; c * VEC < hidden; c += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
    for (int d = 0; d < count; ++d) {
      const Chunk v = *reinterpret_cast<const Chunk*>(src + rows[d] * hidden + c * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = __fadd_rn(acc[k], __fmul_rn(row_weights[d], as_float(v.v[k])));
    }
    Chunk o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_float<T>(acc[k]);
    *reinterpret_cast<Chunk*>(out_row + c * VEC) = o;
  }
}

// One CTA per token: out[i] = sum over its pairs, in slot order, of weight * expert row, in float32.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) unpermute_kernel(
    const T* __restrict__ y_sorted, const int32_t* __restrict__ pos, const float* __restrict__ weights,
    T* __restrict__ out, int64_t hidden, int topk) {
  __shared__ int64_t rows[kMaxTopk];
  __shared__ float row_weights[kMaxTopk];
  __shared__ int count;
  const int64_t i = blockIdx.x;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int j = 0; j < topk; ++j) {
      const int32_t p = pos[i * topk + j];
      if (p >= 0) {
        rows[n] = p;
        row_weights[n++] = weights[i * topk + j];
      }
    }
    count = n;
  }
  __syncthreads();
  weighted_row_sum<T, VEC>(y_sorted, rows, row_weights, count, hidden, out + i * hidden);
}

// ---- low-latency mode (definitions in pykernels/reference/moe.py) ----------------------------------
//
// Every buffer has a size fixed by (W, M = max tokens per rank, H, k). Rows are 16-byte aligned (a row is a
// multiple of 4 int32 words) and payloads are copied in 16-byte units, so the launchers require H % 8 == 0
// (bf16) or H % 128 == 0 (FP8).

// Send-buffer row that carries token t to rank r: block r holds max_tokens rows.
__host__ __device__ inline int64_t ll_send_row(int r, int64_t t, int64_t max_tokens) { return r * max_tokens + t; }

// Row of the flattened [L * S] receive layout that holds expert e's pos-th received row, or -1 when e is
// not a local id or pos not a row of its block: received ids come off the wire and pos from the caller,
// so a slot that disagrees with them reads or writes nothing rather than another expert's block or past
// the buffer.
__host__ __device__ inline int64_t ll_expert_row(int64_t e, int64_t pos, int num_local, int64_t rows) {
  return is_expert(e, num_local) && pos >= 0 && pos < rows ? e * rows + pos : -1;
}

// Row of the returned [W, M, k] buffer that holds rank q's output for (token t, slot j).
__host__ __device__ inline int64_t ll_return_row(int q, int64_t t, int j, int64_t max_tokens, int topk) {
  return (q * max_tokens + t) * topk + j;
}

// One CTA per token slot t < max_tokens: the local ids for every destination (-1 past the tokens), then the
// payload, read once, to each destination that hosts one of t's experts. FP8: 16 lanes per 128-element
// group, the scale reduced across them, as pack_quantize_kernel.
template <bool kFp8>
__global__ void __launch_bounds__(kRowThreads) ll_pack_kernel(
    const __nv_bfloat16* __restrict__ x, const int64_t* __restrict__ topk_idx, int32_t* __restrict__ send,
    int num_tokens, int hidden, int topk, int num_experts, int num_local, int world, int64_t max_tokens,
    int row_words, int scale_word, int id_word) {
  const int64_t t = blockIdx.x;
  const bool token = t < num_tokens;
  for (int i = threadIdx.x; i < world * topk; i += blockDim.x) {
    const int r = i / topk, j = i % topk;
    send[ll_send_row(r, t, max_tokens) * row_words + id_word + j] =
        token ? local_expert_id(topk_idx[t * topk + j], r, num_local) : -1;
  }
  if (!token) return;
  const uint64_t mask = destination_mask(topk_idx + t * topk, topk, num_local, num_experts);
  if constexpr (!kFp8) {
    const uint4* src = reinterpret_cast<const uint4*>(x + t * hidden);
    const int64_t units = hidden / 8, row_units = row_words / 4;
    for (int64_t i = threadIdx.x; i < units; i += blockDim.x) {
      const uint4 v = src[i];
      for (int r = 0; r < world; ++r) {
        if ((mask >> r) & 1) reinterpret_cast<uint4*>(send)[ll_send_row(r, t, max_tokens) * row_units + i] = v;
      }
    }
  } else {
    quantize_row_groups(x + t * hidden, hidden, [&](const float (&vals)[kQuantVec], float scale, int g,
                                                    int64_t col, bool first_lane) {
      for (int r = 0; r < world; ++r) {
        if (!((mask >> r) & 1)) continue;
        int32_t* row = send + ll_send_row(r, t, max_tokens) * row_words;
        fp8_quant::quantize_store<kQuantVec>(vals, scale, reinterpret_cast<uint8_t*>(row) + col);
        if (first_lane) row[scale_word + g] = __float_as_int(scale);
      }
    });
  }
}

// The distinct receive rows a received row s goes to (one per local expert it names), in dst_rows.
__device__ inline int ll_destinations(const int32_t* recv_row, const int32_t* pos_row, int id_word, int topk,
                                      int num_local, int64_t rows, int64_t* dst_rows) {
  __shared__ int count;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int j = 0; j < topk; ++j) {
      const int64_t dst = ll_expert_row(recv_row[id_word + j], pos_row[j], num_local, rows);
      if (dst < 0) continue;
      bool seen = false;
      for (int d = 0; d < n; ++d) seen = seen || dst_rows[d] == dst;
      if (!seen) dst_rows[n++] = dst;
    }
    count = n;
  }
  __syncthreads();
  return count;
}

// One CTA per received row: its payload (16-byte units) and scales to each of its experts' rows.
__global__ void __launch_bounds__(kRowThreads) ll_unpack_kernel(
    const int32_t* __restrict__ recv, const int32_t* __restrict__ pos, uint4* __restrict__ out_x,
    float* __restrict__ out_s, int64_t rows, int64_t payload_units, int row_words, int scale_word, int id_word,
    int topk, int num_scales, int num_local) {
  __shared__ int64_t dst_rows[kMaxTopk];
  const int64_t s = blockIdx.x;
  const int32_t* row = recv + s * row_words;
  const int count = ll_destinations(row, pos + s * topk, id_word, topk, num_local, rows, dst_rows);
  const uint4* src = reinterpret_cast<const uint4*>(row);
  for (int64_t i = threadIdx.x; i < payload_units; i += blockDim.x) {
    const uint4 v = src[i];
    for (int d = 0; d < count; ++d) out_x[dst_rows[d] * payload_units + i] = v;
  }
  if (out_s != nullptr) {
    for (int i = threadIdx.x; i < count * num_scales; i += blockDim.x) {
      const int d = i / num_scales, g = i % num_scales;
      out_s[dst_rows[d] * num_scales + g] = __int_as_float(row[scale_word + g]);
    }
  }
}

// One CTA per received row: each slot's expert output (bf16, 16-byte units) to the row going back.
__global__ void __launch_bounds__(kRowThreads) ll_combine_pack_kernel(
    const uint4* __restrict__ y, const int32_t* __restrict__ recv, const int32_t* __restrict__ pos,
    uint4* __restrict__ ret, int64_t rows, int64_t units, int row_words, int id_word, int topk, int num_local) {
  __shared__ int64_t src_rows[kMaxTopk];
  const int64_t s = blockIdx.x;
  if (threadIdx.x < topk) {
    const int j = threadIdx.x;
    src_rows[j] = ll_expert_row(recv[s * row_words + id_word + j], pos[s * topk + j], num_local, rows);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < units; i += blockDim.x) {
    for (int j = 0; j < topk; ++j) {
      if (src_rows[j] >= 0) ret[(s * topk + j) * units + i] = y[src_rows[j] * units + i];
    }
  }
}

// One CTA per token: out[t] = sum over its slots with ids in [0, E), in slot order, of weight * the
// returned row, in float32 (rounded product, rounded sum), rounded once to bf16.
__global__ void __launch_bounds__(kRowThreads) ll_combine_reduce_kernel(
    const __nv_bfloat16* __restrict__ ret, const int64_t* __restrict__ topk_idx, const float* __restrict__ weights,
    __nv_bfloat16* __restrict__ out, int64_t hidden, int topk, int num_experts, int num_local, int64_t max_tokens) {
  __shared__ int64_t rows[kMaxTopk];
  __shared__ float row_weights[kMaxTopk];
  __shared__ int count;
  const int64_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int j = 0; j < topk; ++j) {
      const int64_t e = topk_idx[t * topk + j];
      if (!is_expert(e, num_experts)) continue;
      rows[n] = ll_return_row(static_cast<int>(e / num_local), t, j, max_tokens, topk);
      row_weights[n++] = weights[t * topk + j];
    }
    count = n;
  }
  __syncthreads();
  weighted_row_sum<__nv_bfloat16, 8>(ret, rows, row_weights, count, hidden, out + t * hidden);
}

}  // namespace moe
}  // namespace pykernels
