// MLA decode kernels for sm_90a: a persistent split-KV attention kernel over a paged latent cache and the
// combine kernel that merges a request's splits by their lse.
//
// One CTA = one 64-row query tile (rows r = t * h_q + h of one request, q's memory order) x one SM part of
// the schedule (mla_decode_plan.h). 256 threads, two warpgroups:
//   - every thread issues cp.async for the next 64-token page while the current one is consumed; each
//     thread's copies arrive on the stage's mbarrier (cp.async.mbarrier.arrive.noinc), so a stage is ready
//     when all 256 threads' copies have landed;
//   - warpgroup 0 computes S = Q K^T (64x64, K = 576: 36 HGMMA m64n64k16) and the online softmax in
//     registers, and writes P (bf16) and the per-row rescale factor to shared memory;
//   - both warpgroups rescale and accumulate their half of O = P V (64x256 each, 4 HGMMA m64n256k16),
//     so the 64x512 float32 accumulator is split across 256 threads (128 registers each).
// An FP8 cache arrives as raw e4m3 bytes in two stages and is converted once per page to a bf16 tile
// (exactly: every e4m3 value is a bf16 value); kv_scale multiplies the scores and the output instead.
//
// Why CuTe's atoms rather than hand-packed wgmma descriptors: the descriptor bits (swizzle mode, leading and
// stride byte offsets, base offset) must agree with the shared-memory layout the loads write, and the
// accumulator's register-to-(row, col) map must agree with the softmax and the epilogue. With
// GMMA::Layout_K_SW128_Atom / Layout_MN_SW128_Atom layouts, SM90_64xNx16 MMA atoms and identity-tensor
// partitions, one layout object drives the copies, the descriptors and the epilogue coordinates, and all
// three come from code CUTLASS tests on hardware. No GPU is available where this file was written, so
// the fewer hand-derived encodings, the fewer ways to be silently wrong.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "mla_decode/mla_decode_plan.h"

namespace pykernels {
namespace mla {

using namespace cute;

constexpr int kThreads = 256;
constexpr int kRowsPerTile = 64;   // query rows per CTA: the M of every MMA
constexpr int kHeadDimK = 576;     // 512 latent + 64 RoPE
constexpr int kHeadDimV = 512;
constexpr int kVHalf = kHeadDimV / 2;  // output columns per warpgroup
constexpr int kTileElems = kPageSize * kHeadDimK;
static_assert(kPageSize == 64 && kRowsPerTile == 64, "one page is one 64-token KV tile; 64 query rows per tile");
static_assert(kHeadDimK % 64 == 0 && kHeadDimV % 64 == 0, "dims must be whole 128-byte swizzle atoms");

using bf16 = cutlass::bfloat16_t;
// Q [rows, 576], K [tokens, 576], P [rows, tokens]: K-major, 128-byte swizzle.
using LayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kRowsPerTile>, Int<kHeadDimK>>{}));
using LayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kPageSize>, Int<kHeadDimK>>{}));
using LayoutP = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kRowsPerTile>, Int<kPageSize>>{}));
// V [512 dims, 64 tokens] is the same bytes as K's first 512 columns seen MN-major: the MN atom (64 dims x 8
// tokens) is the K atom (8 tokens x 64 dims) transposed, and tiling tokens first (Step<_2, _1>) gives K's
// order (8-token atoms stacked along tokens, then 64-dim column blocks). The host test of this file's
// layouts is that both describe one buffer: LayoutK(t, d) == LayoutV(d, t) for every d < 512, t < 64.
using LayoutV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{}, Shape<Int<kHeadDimV>, Int<kPageSize>>{},
                                       Step<_2, _1>{}));

using MmaS = decltype(make_tiled_mma(SM90_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{}));
using MmaO = decltype(make_tiled_mma(SM90_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>{}));

// Shared memory. bf16 cache: two bf16 stages. FP8 cache: two raw e4m3 stages and one bf16 tile they are
// converted into. Both fit 227 KB with Q (72 KB) and P (8 KB).
template <bool kFp8>
struct KvStages;
template <>
struct KvStages<false> {
  alignas(1024) bf16 tile[2][kTileElems];
};
template <>
struct KvStages<true> {
  alignas(1024) bf16 tile[1][kTileElems];
  alignas(128) uint8_t raw[2][kTileElems];
};

template <bool kFp8>
struct SharedStorage {
  alignas(1024) bf16 q[kRowsPerTile * kHeadDimK];
  KvStages<kFp8> kv;
  alignas(1024) bf16 p[kRowsPerTile * kPageSize];
  float row_scale[kRowsPerTile];  // per-page rescale of O (exp2(m_old - m_new)), then 1 / l at the end
  alignas(8) uint64_t full[2];    // stage s holds its page
};

struct Params {
  const bf16* q;              // [b, s_q, h_q, 576]
  const void* kv;             // [num_blocks, 64, 576] bf16 or e4m3
  const int* block_table;     // [b, max_blocks]
  const int* seqlens;         // [b]
  const float* kv_scale;      // [1] (FP8 only)
  const int* part_splits;     // [num_parts + 1]
  const int* splits;          // [capacity, 4]
  const int* split_offsets;   // [b + 1]
  bf16* out;                  // [b, s_q, h_q, 512]
  float* lse;                 // [b, h_q, s_q]
  float* out_partial;         // [capacity, rows, 512]
  float* lse_partial;         // [capacity, rows]
  int s_q, h_q, max_blocks;
  float scale_log2;           // softmax_scale * log2(e)
  bool causal;
};

// The page a cursor points at: split g of this CTA's part, page `page` of its request.
struct PageJob {
  int g, page, request;
};

__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = cute::cast_smem_ptr_to_uint(smem);
  // src-size 0 zero-fills: rows past the sequence's end are never read (they may hold NaN).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}

// Issues this thread's share of one page's copies and arrives on `bar` when they land.
template <bool kFp8>
__device__ inline void load_page(const Params& p, SharedStorage<kFp8>& smem, int stage, const PageJob& job,
                                 int seqlen) {
  const int valid_tokens = min(kPageSize, seqlen - job.page * kPageSize);
  // The page planned for an empty request (see pages_of) reads nothing; page 0 keeps its zero-byte copies'
  // source addresses valid whatever its block_table entry holds.
  const int block_id =
      valid_tokens > 0 ? p.block_table[static_cast<int64_t>(job.request) * p.max_blocks + job.page] : 0;
  if constexpr (kFp8) {
    const uint8_t* src = static_cast<const uint8_t*>(p.kv) + static_cast<int64_t>(block_id) * kTileElems;
    uint8_t* dst = smem.kv.raw[stage];
    constexpr int kChunks = kTileElems / 16;
    // Not unrolled: precomputed addresses for every chunk would be loop invariants held in registers
    // across the whole kernel, beside the 128-register accumulator.
#pragma unroll 1
    for (int c = threadIdx.x; c < kChunks; c += kThreads) {
      const int token = c / (kHeadDimK / 16);
      const bool ok = token < valid_tokens;
      cp_async_16(dst + c * 16, ok ? src + c * 16 : src, ok);
    }
  } else {
    const bf16* src = static_cast<const bf16*>(p.kv) + static_cast<int64_t>(block_id) * kTileElems;
    Tensor sK = make_tensor(make_smem_ptr(smem.kv.tile[stage]), LayoutK{});
    constexpr int kChunksPerRow = kHeadDimK / 8;
    // Not unrolled: precomputed addresses for every chunk would be loop invariants held in registers
    // across the whole kernel, beside the 128-register accumulator.
#pragma unroll 1
    for (int c = threadIdx.x; c < kPageSize * kChunksPerRow; c += kThreads) {
      const int token = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool ok = token < valid_tokens;
      // 8 consecutive bf16 stay contiguous under the 128-byte swizzle (it permutes 16-byte chunks).
      cp_async_16(&sK(token, col), ok ? src + token * kHeadDimK + col : src, ok);
    }
  }
  cutlass::arch::cpasync_barrier_arrive_noinc(&smem.full[stage]);
}

// Converts a landed raw e4m3 page to the bf16 tile (exact) in K's swizzled layout.
__device__ inline void convert_page(SharedStorage<true>& smem, int stage) {
  Tensor sK = make_tensor(make_smem_ptr(smem.kv.tile[0]), LayoutK{});
  const uint8_t* raw = smem.kv.raw[stage];
  constexpr int kChunksPerRow = kHeadDimK / 8;
#pragma unroll 1
  for (int c = threadIdx.x; c < kPageSize * kChunksPerRow; c += kThreads) {
    const int token = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const uint2 bytes = *reinterpret_cast<const uint2*>(raw + token * kHeadDimK + col);
    const uint32_t words[2] = {bytes.x, bytes.y};
    alignas(16) __nv_bfloat162 vals[4];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[w] >> (16 * h));
        const __half2_raw halves = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
        vals[w * 2 + h] = __float22bfloat162_rn(__half22float2(*reinterpret_cast<const __half2*>(&halves)));
      }
    }
    *reinterpret_cast<uint4*>(&sK(token, col)) = *reinterpret_cast<const uint4*>(vals);
  }
}

template <bool kFp8>
__device__ inline const bf16* kv_tile(SharedStorage<kFp8>& smem, int stage) {
  if constexpr (kFp8) {
    return smem.kv.tile[0];
  } else {
    return smem.kv.tile[stage];
  }
}

__device__ inline PageJob first_page_of(const Params& p, int g) {
  return PageJob{g, p.splits[g * kSplitFields + 1], p.splits[g * kSplitFields]};
}

// A thread's wgmma accumulator fragment covers two rows, 8 apart: row(i) = first_row() + 8 * row_slot(i),
// with the slot a compile-time function of the fragment index (values come in pairs of columns, then the
// row + 8 pair). Keeping it compile-time keeps the per-row arrays in registers. mla_layouts_consistent()
// checks this against CuTe's thread-value layouts of both MMAs on the host.
__host__ __device__ constexpr int row_slot(int i) { return (i >> 1) & 1; }
__host__ __device__ constexpr int first_row(int thread_in_warpgroup) {
  return (thread_in_warpgroup / 32) * 16 + (thread_in_warpgroup % 32) / 4;
}

__device__ inline float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}

__device__ inline float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 1);
  return v + __shfl_xor_sync(0xffffffff, v, 2);
}

// grid (ceil(s_q * h_q / 64), num_parts), 256 threads, dynamic shared memory sizeof(SharedStorage<kFp8>).
template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const Params p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<kFp8>*>(smem_raw);
  const int first = p.part_splits[blockIdx.y], last = p.part_splits[blockIdx.y + 1];
  if (first >= last) return;
  const int tid = threadIdx.x, wg = tid / 128, tid_wg = tid % 128;
  const int rows = p.s_q * p.h_q;
  const int row_base = blockIdx.x * kRowsPerTile;
  const float kv_scale = kFp8 ? *p.kv_scale : 1.0f;
  const float score_scale = p.scale_log2 * kv_scale;

  if (tid == 0) {
    cutlass::arch::ClusterBarrier::init(&smem.full[0], kThreads);
    cutlass::arch::ClusterBarrier::init(&smem.full[1], kThreads);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q), LayoutQ{});
  Tensor sP = make_tensor(make_smem_ptr(smem.p), LayoutP{});
  MmaS mma_s;
  MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid_wg);
  auto thr_o = mma_o.get_thread_slice(tid_wg);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tOrP = thr_o.partition_fragment_A(sP);
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kRowsPerTile>, Int<kPageSize>>{}));
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kRowsPerTile>, Int<kVHalf>>{}));
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kRowsPerTile>, Int<kVHalf>>{});
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kRowsPerTile>, Int<kPageSize>>{});

  uint32_t phases = 0;  // bit s: parity of stage s's next completion (a bit field, not an array: no local memory)
  int stage = 0;
  PageJob job = first_page_of(p, first);
  load_page<kFp8>(p, smem, stage, job, p.seqlens[job.request]);

  for (int g = first; g < last; ++g) {
    const int request = p.splits[g * kSplitFields];
    const int page_end = p.splits[g * kSplitFields + 2];
    const int seqlen = p.seqlens[request];
    const bool unsplit = p.split_offsets[request + 1] - p.split_offsets[request] == 1;

    // Q of this request: rows past s_q * h_q are zero (their scores are finite and never stored).
    {
      const bf16* q = p.q + (static_cast<int64_t>(request) * rows + row_base) * kHeadDimK;
      constexpr int kChunksPerRow = kHeadDimK / 8;
#pragma unroll 1
      for (int c = tid; c < kRowsPerTile * kChunksPerRow; c += kThreads) {
        const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
        const bool ok = row_base + row < rows;
        cp_async_16(&sQ(row, col), ok ? q + row * kHeadDimK + col : p.q, ok);
      }
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      cutlass::arch::fence_view_async_shared();
      __syncthreads();
    }

    // Online-softmax state of warpgroup 0's two rows per thread (log2 domain).
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    int key_limit[2];
    CUTE_UNROLL
    for (int slot = 0; slot < 2; ++slot) {
      const int row = row_base + first_row(tid_wg) + slot * 8;
      key_limit[slot] = p.causal ? seqlen - p.s_q + row / p.h_q + 1 : seqlen;
    }
    clear(acc_o);

    for (int page = job.page; page < page_end; ++page) {
      // Prefetch the next page of this part (possibly the next split's first) into the other stage: its
      // previous contents were consumed before the barrier that ended the last iteration.
      const bool has_next = page + 1 < page_end || g + 1 < last;
      if (has_next) {
        const PageJob next = page + 1 < page_end ? PageJob{g, page + 1, request} : first_page_of(p, g + 1);
        load_page<kFp8>(p, smem, stage ^ 1, next, p.seqlens[next.request]);
      }
      cutlass::arch::ClusterBarrier::wait(&smem.full[stage], (phases >> stage) & 1);
      phases ^= 1u << stage;
      if constexpr (kFp8) convert_page(smem, stage);
      // Generic-proxy writes (cp.async, the FP8 conversion, P) must be fenced before wgmma reads them.
      cutlass::arch::fence_view_async_shared();
      __syncthreads();

      Tensor sK = make_tensor(make_smem_ptr(kv_tile<kFp8>(smem, stage)), LayoutK{});
      Tensor sV = make_tensor(make_smem_ptr(kv_tile<kFp8>(smem, stage)), LayoutV{});
      if (wg == 0) {
        Tensor tSrK = thr_s.partition_fragment_B(sK);
        warpgroup_fence_operand(acc_s);
        warpgroup_arrive();
        mma_s.accumulate_ = GMMA::ScaleOut::Zero;
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tSrQ); ++k) {
          cute::gemm(mma_s, tSrQ(_, _, k), tSrK(_, _, k), acc_s);
          mma_s.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_s);

        float tile_max[2] = {-INFINITY, -INFINITY};
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) {
          const int slot = row_slot(i);
          const int token = page * kPageSize + get<1>(tScS(i));
          const bool visible = token < key_limit[slot];
          acc_s(i) = visible ? acc_s(i) * score_scale : -INFINITY;
          tile_max[slot] = fmaxf(tile_max[slot], acc_s(i));
        }
        float ref[2], alpha[2], tile_sum[2] = {0.0f, 0.0f};
        CUTE_UNROLL
        for (int slot = 0; slot < 2; ++slot) {
          const float m_new = fmaxf(row_max[slot], quad_max(tile_max[slot]));
          // A row that has seen no key yet keeps max -inf; a reference of 0 keeps exp2 at 0 instead of NaN.
          ref[slot] = m_new == -INFINITY ? 0.0f : m_new;
          alpha[slot] = exp2f(row_max[slot] - ref[slot]);
          row_max[slot] = m_new;
        }
        // Values i, i + 1 (i even) are columns c, c + 1 of one row: stored as one bf16 pair.
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); i += 2) {
          const int slot = row_slot(i);
          const float p0 = exp2f(acc_s(i) - ref[slot]), p1 = exp2f(acc_s(i + 1) - ref[slot]);
          tile_sum[slot] += p0 + p1;
          *reinterpret_cast<__nv_bfloat162*>(&sP(get<0>(tScS(i)), get<1>(tScS(i)))) = __floats2bfloat162_rn(p0, p1);
        }
        CUTE_UNROLL
        for (int slot = 0; slot < 2; ++slot) {
          row_sum[slot] = row_sum[slot] * alpha[slot] + quad_sum(tile_sum[slot]);
          if (tid_wg % 4 == 0) smem.row_scale[first_row(tid_wg) + slot * 8] = alpha[slot];
        }
        cutlass::arch::fence_view_async_shared();
      }
      __syncthreads();

      CUTE_UNROLL
      for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= smem.row_scale[first_row(tid_wg) + 8 * row_slot(i)];
      Tensor sVhalf = local_tile(sV, Shape<Int<kVHalf>, Int<kPageSize>>{}, make_coord(wg, 0));
      Tensor tOrV = thr_o.partition_fragment_B(sVhalf);
      warpgroup_fence_operand(acc_o);
      warpgroup_arrive();
      mma_o.accumulate_ = GMMA::ScaleOut::One;
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tOrP); ++k) cute::gemm(mma_o, tOrP(_, _, k), tOrV(_, _, k), acc_o);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      __syncthreads();
      stage ^= 1;
    }

    // Epilogue: 1 / l through shared memory to warpgroup 1; warpgroup 0 writes the lse.
    if (wg == 0) {
      CUTE_UNROLL
      for (int slot = 0; slot < 2; ++slot) {
        const int local = first_row(tid_wg) + slot * 8;
        const float l = row_sum[slot];
        if (tid_wg % 4 == 0) {
          smem.row_scale[local] = l > 0.0f ? kv_scale / l : 0.0f;
          const int row = row_base + local;
          if (row < rows) {
            const float lse = l > 0.0f ? (row_max[slot] + log2f(l)) * 0.69314718055994531f : -INFINITY;
            if (unsplit) {
              const int t = row / p.h_q, h = row % p.h_q;
              p.lse[static_cast<int64_t>(request) * rows + h * p.s_q + t] = lse;
            } else {
              p.lse_partial[static_cast<int64_t>(g) * rows + row] = lse;
            }
          }
        }
      }
    }
    __syncthreads();
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); i += 2) {
      const int local = first_row(tid_wg) + 8 * row_slot(i), row = row_base + local;
      if (row >= rows) continue;
      const int col = wg * kVHalf + get<1>(tOcO(i));
      const float inv = smem.row_scale[local];
      const float v0 = acc_o(i) * inv, v1 = acc_o(i + 1) * inv;
      if (unsplit) {
        *reinterpret_cast<__nv_bfloat162*>(p.out + (static_cast<int64_t>(request) * rows + row) * kHeadDimV + col) =
            __floats2bfloat162_rn(v0, v1);
      } else {
        *reinterpret_cast<float2*>(p.out_partial + (static_cast<int64_t>(g) * rows + row) * kHeadDimV + col) =
            make_float2(v0, v1);
      }
    }
    __syncthreads();
    if (g + 1 < last) job = first_page_of(p, g + 1);
  }
}

// grid (b, rows), 128 threads: one query row of one request, 4 output columns per thread (the batch on x,
// whose limit is 2^31 - 1, not y's 65535). Requests with a single split were written by the decode kernel
// and are skipped.
constexpr int kCombineThreads = 128;

__global__ void __launch_bounds__(kCombineThreads) mla_combine_kernel(const int* split_offsets,
                                                                       const float* out_partial,
                                                                       const float* lse_partial, bf16* out,
                                                                       float* lse, int s_q, int h_q) {
  const int request = blockIdx.x, row = blockIdx.y;
  const int rows = s_q * h_q;
  const int first = split_offsets[request], last = split_offsets[request + 1];
  if (last - first <= 1) return;
  float lse_max = -INFINITY;
  for (int g = first; g < last; ++g) lse_max = fmaxf(lse_max, lse_partial[static_cast<int64_t>(g) * rows + row]);
  const float ref = lse_max == -INFINITY ? 0.0f : lse_max;
  float total = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  const int col = threadIdx.x * 4;
  for (int g = first; g < last; ++g) {
    const float w = __expf(lse_partial[static_cast<int64_t>(g) * rows + row] - ref);
    const float4 o = *reinterpret_cast<const float4*>(out_partial + (static_cast<int64_t>(g) * rows + row) * kHeadDimV + col);
    acc.x += w * o.x, acc.y += w * o.y, acc.z += w * o.z, acc.w += w * o.w;
    total += w;
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  bf16* dst = out + (static_cast<int64_t>(request) * rows + row) * kHeadDimV + col;
  dst[0] = bf16(acc.x * inv), dst[1] = bf16(acc.y * inv), dst[2] = bf16(acc.z * inv), dst[3] = bf16(acc.w * inv);
  if (threadIdx.x == 0) {
    const int t = row / h_q, h = row % h_q;
    lse[static_cast<int64_t>(request) * rows + h * s_q + t] = total > 0.0f ? ref + logf(total) : -INFINITY;
  }
}

__global__ void __launch_bounds__(1) mla_plan_splits_kernel(const int* seqlens, int batch, int num_parts,
                                                            int* part_splits, int* splits, int* split_offsets) {
  plan_splits(seqlens, batch, num_parts, part_splits, splits, split_offsets);
}

}  // namespace mla
}  // namespace pykernels
