// MLA decode kernels for sm_90a: a persistent split-KV attention kernel over a paged latent cache and the
// combine kernel that merges a request's splits by their lse.
//
// One CTA = one 64-row query tile (rows r = t * h_q + h of one request, q's memory order) x one SM part of
// the schedule (mla_decode_plan.h). 256 threads, two warpgroups:
//   - thread 0 issues the copies: a page is 9 TMA boxes of 64 tokens x 64 columns (bf16 cache, 128-byte
//     swizzle, the layout the GMMA descriptors read), each on its own transaction barrier so that QK^T's
//     first k-steps run while later boxes land, or one bulk copy of its 36 KB into the back half of its
//     stage's tile (e4m3 cache, converted in place by all threads) on one barrier, with an evict-first L2
//     hint (each page is read once per query tile); the two pages after the one being consumed are loaded
//     or in flight (stages, barrier parities and the load distance from mla_decode_pipeline.h). Q arrives
//     the same way (9 boxes of a 3-D map, rows past the request's end zero-filled) and the next split's Q is
//     issued as soon as the last QK^T of a split has read the current one, so it lands under the epilogue;
//   - each warpgroup computes half the scores, S[:, 32 w .. 32 w + 31] = Q K_w^T (64x32, K = 576: 36 HGMMA
//     m64n32k16), and the online softmax of that half in registers; the two halves meet once per page
//     through shared memory (each row's partial maximum), so both warpgroups derive the same running
//     maximum and rescale factor, and each writes its half of P (bf16);
//   - each warpgroup rescales and accumulates its half of O = P V (64x256, 4 HGMMA m64n256k16), so the
//     64x512 float32 accumulator is split across 256 threads (128 registers each); each keeps the row sums
//     of its own score columns, added once in the epilogue. With a bf16 cache P is written over the RoPE box
//     of its page's stage (QK^T, its only reader, has completed in both warpgroups by the softmax's barrier),
//     which leaves 9 KB of the 227 KB free.
// Schedule (bf16 cache). Both warpgroups issue independent HGMMA chains and each runs half the softmax (16
// scores per thread). A step, per page seq of a split, issues the QK^T of page seq + 1, rescales O under it
// (those HGMMAs write acc_s only), issues the P V of page seq, and once wgmma.wait_group 1 reports the QK^T
// done (groups complete in order), runs the softmax of page seq + 1 while that P V runs: maxima exchanged
// at one CTA barrier, P written over page seq + 1's RoPE box. The step ends with wait_group 0 and the CTA
// barrier that frees page seq's stage; page seq + 2 then loads into it. (FlashMLA's seesaw gets the same
// overlap with the warpgroups alternating over a page pair, a second P buffer and per-page scale exchanges;
// here one warpgroup's QK^T, rescale, P V and softmax overlap within itself, and the 16 score registers are
// the only accumulators added in flight.) Static figures per page, by formula, per SM at 4096 dense bf16
// FLOP, 16 MUFU.EX2 and 128 FP32 operations per clock: QK^T 64 * 64 * 576 * 2 = 4.72 MFLOP = 1152 clocks;
// P V 64 * 512 * 64 * 2 = 4.19 MFLOP = 1024 clocks; softmax 4096 exp2 = 256 clocks of MUFU plus the
// maxima exchange (a CTA barrier) and 8 KB of P stores; O's rescale 32768 FMUL = 256 clocks.
//   before (each page serial: QK^T, softmax, rescale, P V): per page pair the tensor cores waited for
//     2 x (softmax + rescale + 2 CTA barriers) >= 2 x 512 clocks + 4 barriers, against 2 x 2176 clocks of
//     MMA;
//   after: the softmax hides under P V (256 MUFU clocks plus a barrier < 1024 clocks). The rescale's
//     FMULs sit after the last box's wait in the SASS (ptxas sinks them to P V's issue, their next use,
//     wherever the source puts them, even between the boxes with operand fences), so they hide under QK^T
//     (256 < 1152 clocks) only when the page landed before the step; when its boxes land as QK^T consumes
//     them, only the last box's 4 HGMMAs (128 clocks) run under them. Per page pair the tensor cores wait
//     for 2 x (the step-ending CTA barrier, the wgmma issue after it and up to 128 clocks of rescale),
//     plus, once per split, the first page's softmax;
//   the price: a step reads both stages, so page seq + 2's load is issued when step seq ends and its QK^T
//     starts with step seq + 1, consuming boxes as they land (a box's latency is exposed where, before,
//     the next page's load ran under a whole step). Whether that costs memory-bound shapes anything is a
//     GPU measurement.
// Registers are at the limit (255, no spill): values used once per split or per page are recomputed where
// they are used (opaque_index) rather than held through the page loop.
// Rows of a page past the request's end may hold anything (NaN in unused slots): their scores are masked
// by a select, and their V columns are zeroed in shared memory before P V, since 0 * NaN is NaN. Only a
// request's last page (or an empty request's unloaded page) needs it; the zeroing runs after both
// warpgroups' QK^T, under the fence and barrier that publish P, so it costs no barrier of its own.
// An FP8 cache is converted once per page to bf16 (exactly: every e4m3 value is a bf16 value); kv_scale
// multiplies the scores and the output instead. Schedule (FP8 cache): a step runs QK^T, the softmax and P V
// of page seq serially, and converts page seq + 1 while that P V runs: its raw bytes landed in the back half
// of the other stage's tile (freed by the previous step's closing barrier), and each thread holds its 18
// chunks (36 registers) across a CTA barrier before writing the whole tile, so the conversion is in place
// and two bf16 tiles, Q and P fit (231,424 of 232,448 B). Static figures per page, by formula: the
// conversion is 4608 16-byte chunks, about 30 instructions each, 2 warps per SM sub-partition issuing one
// per clock: about 1080 clocks, against P V's 1024. Before, it ran between the page's landing and its QK^T
// with the tensor cores idle, so per page pair they waited for 2 x (conversion + softmax + rescale +
// 3 CTA barriers); after, for 2 x (softmax + rescale + 3 CTA barriers + what the conversion exceeds P V by).
//
// Why CuTe's atoms rather than hand-packed wgmma descriptors: the descriptor bits (swizzle mode, leading and
// stride byte offsets, base offset) must agree with the shared-memory layout the loads write, and the
// accumulator's register-to-(row, col) map must agree with the softmax and the epilogue. With
// GMMA::Layout_K_SW128_Atom / Layout_MN_SW128_Atom layouts, SM90_64xNx16 MMA atoms and identity-tensor
// partitions, one layout object drives the descriptors and the epilogue coordinates, and both come from
// code CUTLASS tests on hardware. That the TMA boxes' 128-byte swizzle writes what this layout describes is
// checked on the host (mla_layouts_consistent). No GPU is available where this file was written, so the
// fewer hand-derived encodings, the fewer ways to be silently wrong.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "mla_decode/mla_decode_index.h"
#include "mla_decode/mla_decode_pipeline.h"
#include "mla_decode/mla_decode_plan.h"

namespace pykernels {
namespace mla {

using namespace cute;

constexpr int kThreads = 256;
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

constexpr int kSCols = kPageSize / 2;  // score columns (tokens of a page) per warpgroup
using MmaS = decltype(make_tiled_mma(SM90_64x32x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{}));
using MmaO = decltype(make_tiled_mma(SM90_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>{}));

// Shared memory. bf16 cache: two bf16 stages, each with one barrier per box, P written over the RoPE box of
// its page's stage (mla_decode_pipeline.h). FP8 cache: two bf16 stages, each page's raw e4m3 bytes landing
// in the back half of its stage's tile and converted in place, and P. With Q (72 KB) and the 1 KB the launch
// adds to align the base (the 128-byte swizzle of TMA and of the GMMA descriptors is a function of address
// bits 4..9), bf16 takes 223,232 B and FP8 231,424 B of the 232,448 a CTA may use (mla_shared_plan checks
// both on the host).
// The page a cursor points at: split g of this CTA's part, page `page` of its request.
struct PageJob {
  int g, page, request;
};

template <bool kFp8>
struct KvStages;
template <>
struct KvStages<false> {
  static constexpr int kBarriers = kColTiles;
  alignas(1024) bf16 tile[kStages][kTileElems];
};
template <>
struct KvStages<true> {
  static constexpr int kBarriers = 1;
  // A page's raw e4m3 bytes land in the back half of its stage's tile and are converted in place.
  alignas(1024) bf16 tile[kStages][kTileElems];
  alignas(1024) bf16 p[kRowsPerTile * kPageSize];
};

template <bool kFp8>
struct SharedStorage {
  alignas(1024) bf16 q[kRowsPerTile * kHeadDimK];
  KvStages<kFp8> kv;
  // Per warpgroup and row: the maximum of its half of a page's scores; in the epilogue, its row sums.
  float row_part[2][kRowsPerTile];
  // full[s][b]: box b of stage s holds its page (bf16), or stage s holds its raw page (FP8, b = 0).
  alignas(8) uint64_t full[kStages][KvStages<kFp8>::kBarriers];
  uint64_t q_full;                // the current split's Q has landed
  // Thread 0's load cursor, kept out of registers: the last page whose load was issued.
  PageJob ahead;
  int part_pages;          // pages of the CTA's part (written by thread 0 before a CTA barrier)
  int valid[kStages];      // FP8: valid tokens of the page loaded into stage s (written before its arrival)
};

// Dynamic shared memory a launch requests: the kernel rounds the base up to 1024 bytes.
template <bool kFp8>
constexpr int launch_shared_bytes() {
  return static_cast<int>(sizeof(SharedStorage<kFp8>)) + 1024;
}

struct Params {
  const void* kv;             // [num_blocks, 64, 576] e4m3 (a bf16 cache is read through its tensor map)
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

constexpr uint64_t kEvictFirst = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_FIRST);
constexpr uint64_t kEvictNormal = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);

// One contiguous global -> shared copy completing on `bar` (cp.async.bulk; CuTe's SM90_BULK_COPY_G2S takes
// no cache hint).
__device__ inline void bulk_copy_g2s(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar, uint64_t hint) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n"
      ::"r"(cast_smem_ptr_to_uint(smem)), "l"(gmem), "r"(bytes), "r"(cast_smem_ptr_to_uint(bar)), "l"(hint)
      : "memory");
}

__host__ __device__ inline uint8_t* raw_of(SharedStorage<true>& smem, int stage);

// Thread 0: issues the copies of one page into `stage`, each completing its barrier (a bf16 box its own, so
// QK^T starts on the first box while the others land). An empty request's planned page loads nothing (and
// reads no block_table entry): each barrier completes on the arrival alone.
template <bool kFp8>
__device__ inline void load_page(const CUtensorMap* tma_kv, const Params& p, SharedStorage<kFp8>& smem, int stage,
                                 const PageJob& job) {
  uint64_t* bars = smem.full[stage];
  const int valid = valid_tokens_of(p.seqlens[job.request], job.page);
  // The consumers read it once the barrier completes: the arrival releases this write, their wait acquires.
  if constexpr (kFp8) smem.valid[stage] = valid;
  if (valid == 0) {
    CUTE_UNROLL
    for (int b = 0; b < KvStages<kFp8>::kBarriers; ++b) cutlass::arch::ClusterBarrier::arrive(&bars[b]);
    return;
  }
  const int block_id = p.block_table[static_cast<int64_t>(job.request) * p.max_blocks + job.page];
  if constexpr (kFp8) {
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&bars[0], kPageBytesFp8);
    const uint8_t* src = static_cast<const uint8_t*>(p.kv) + static_cast<int64_t>(block_id) * kPageBytesFp8;
    bulk_copy_g2s(raw_of(smem, stage), src, kPageBytesFp8, &bars[0], kEvictFirst);
  } else {
    CUTE_UNROLL
    for (int t = 0; t < kColTiles; ++t) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&bars[t], kBoxBytes);
      const PageBox box = page_box(block_id, t);
      SM90_TMA_LOAD_2D::copy(tma_kv, &bars[t], kEvictFirst, smem.kv.tile[stage] + t * kPageSize * kBoxCols, box.col,
                             box.row);
    }
  }
}

// Thread 0: issues the 9 boxes of query tile blockIdx.x of `request` into smem.q.
template <bool kFp8>
__device__ inline void load_q(const CUtensorMap* tma_q, SharedStorage<kFp8>& smem, int request) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.q_full, kQTileBytes);
  CUTE_UNROLL
  for (int t = 0; t < kColTiles; ++t) {
    const QBox box = q_box(request, blockIdx.x, t);
    SM90_TMA_LOAD_3D::copy(tma_q, &smem.q_full, kEvictNormal, smem.q + t * kRowsPerTile * kBoxCols, box.col, box.row,
                           box.request);
  }
}

// Zeroes V's columns of tokens valid..63 of a landed bf16 page (K's RoPE columns of those tokens only reach
// masked scores).
__device__ inline void zero_tail(bf16* tile, int valid) {
  Tensor sK = make_tensor(make_smem_ptr(tile), LayoutK{});
  constexpr int kChunksPerRow = kHeadDimV / 8;
#pragma unroll 1
  for (int c = valid * kChunksPerRow + threadIdx.x; c < kPageSize * kChunksPerRow; c += kThreads) {
    const int token = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    // 8 consecutive bf16 stay contiguous under the 128-byte swizzle (it permutes 16-byte chunks).
    *reinterpret_cast<uint4*>(&sK(token, col)) = make_uint4(0, 0, 0, 0);
  }
}

// `i`, through an instruction the compiler may not move or fold: values derived from it are recomputed where
// they are used instead of being held in registers across a loop.
__device__ inline int opaque_index(int i) {
  int out;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(out) : "r"(i));
  return out;
}

// Where a page's raw e4m3 bytes land (FP8): the back half of its stage's tile, which the page's bf16 form
// then overwrites.
__host__ __device__ inline uint8_t* raw_of(SharedStorage<true>& smem, int stage) {
  return reinterpret_cast<uint8_t*>(smem.kv.tile[stage]) + kPageBytesFp8;
}

// Converts the raw e4m3 page landed in stage `stage` into that stage's whole tile as bf16 (exact) in K's
// swizzled layout; tokens valid..63 become 0. In place: every thread first loads its 18 raw 8-byte chunks
// into registers, and the CTA barrier between the reads and the writes keeps any write off raw bytes another
// thread has yet to read. Called by all threads.
__device__ inline void convert_in_place(SharedStorage<true>& smem, int stage) {
  constexpr int kChunksPerRow = kHeadDimK / 8;
  constexpr int kChunksPerThread = kPageSize * kChunksPerRow / kThreads;
  static_assert(kPageSize * kChunksPerRow % kThreads == 0, "the page's chunks split evenly over the threads");
  static_assert(2 * kPageBytesFp8 == kTileElems * sizeof(bf16), "the raw page is the tile's back half");
  const uint8_t* raw = raw_of(smem, stage);
  const int valid = smem.valid[stage];
  // Addresses derive from an index the compiler cannot hoist, so that across the barrier only the raw bytes
  // stay in registers, not 36 addresses.
  const int reader = opaque_index(threadIdx.x);
  uint2 bytes[kChunksPerThread];
  CUTE_UNROLL
  for (int j = 0; j < kChunksPerThread; ++j) {
    const int c = reader + j * kThreads, token = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    bytes[j] = *reinterpret_cast<const uint2*>(raw + token * kHeadDimK + col);
  }
  __syncthreads();
  const int writer = opaque_index(threadIdx.x);
  Tensor sK = make_tensor(make_smem_ptr(smem.kv.tile[stage]), LayoutK{});
  CUTE_UNROLL
  for (int j = 0; j < kChunksPerThread; ++j) {
    const int c = writer + j * kThreads, token = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    uint4 packed = make_uint4(0, 0, 0, 0);
    if (token < valid) {
      const uint32_t words[2] = {bytes[j].x, bytes[j].y};
      alignas(16) __nv_bfloat162 vals[4];
      CUTE_UNROLL
      for (int w = 0; w < 2; ++w) {
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[w] >> (16 * h));
          const __half2_raw halves = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
          vals[w * 2 + h] = __float22bfloat162_rn(__half22float2(*reinterpret_cast<const __half2*>(&halves)));
        }
      }
      packed = *reinterpret_cast<const uint4*>(vals);
    }
    // 8 consecutive bf16 stay contiguous under the 128-byte swizzle (it permutes 16-byte chunks).
    *reinterpret_cast<uint4*>(&sK(token, col)) = packed;
  }
}

// Where P of the page in `stage` is written: the stage's RoPE box (bf16), or the one P buffer (FP8).
template <bool kFp8>
__host__ __device__ inline bf16* p_tile(SharedStorage<kFp8>& smem, int stage) {
  if constexpr (kFp8) {
    return smem.kv.p;
  } else {
    return smem.kv.tile[stage] + kPBox * kPageSize * kBoxCols;
  }
}

__device__ inline PageJob first_page_of(const Params& p, int g) {
  return PageJob{g, p.splits[g * kSplitFields + 1], p.splits[g * kSplitFields]};
}

// The page after `job` in the part's order (the caller knows there is one).
__device__ inline PageJob next_page_of(const Params& p, const PageJob& job) {
  return job.page + 1 < p.splits[job.g * kSplitFields + 2] ? PageJob{job.g, job.page + 1, job.request}
                                                           : first_page_of(p, job.g + 1);
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

// Programmatic dependent launch: the combine kernel may start once every CTA of this grid has signalled (or
// exited); its griddepcontrol.wait still waits for this grid to finish and its writes to be visible.
__device__ inline void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
__device__ inline void wait_for_prerequisite_grid() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// grid (ceil(s_q * h_q / 64), num_parts), 256 threads, dynamic shared memory sizeof(SharedStorage<kFp8>) + 1024.
// tma_q: q as [b, s_q * h_q, 576] bf16, boxes 64 x 64 x 1, 128-byte swizzle. tma_kv: the bf16 cache as
// [num_blocks * 64, 576], boxes 64 x 64, 128-byte swizzle (unused, and not encoded, for an e4m3 cache).
template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_kernel(const __grid_constant__ CUtensorMap tma_q, const __grid_constant__ CUtensorMap tma_kv,
                      const Params p) {
  extern __shared__ uint8_t smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<kFp8>*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                                       ~uintptr_t(1023));
  const int tid = threadIdx.x, wg = tid / 128, tid_wg = tid % 128;
  const int rows = p.s_q * p.h_q;
  const int row_base = blockIdx.x * kRowsPerTile;

  // Prologue, which reads no global memory: it may overlap the kernel before this one (the planner), as this
  // kernel is launched as its programmatic dependent.
  if (tid == 0) {
    prefetch_tma_descriptor(&tma_q);
    if constexpr (!kFp8) prefetch_tma_descriptor(&tma_kv);
    // One arrival each: thread 0's arrive (with the expected bytes when something is loaded).
    CUTE_UNROLL
    for (int s = 0; s < kStages; ++s) {
      CUTE_UNROLL
      for (int b = 0; b < KvStages<kFp8>::kBarriers; ++b) cutlass::arch::ClusterBarrier::init(&smem.full[s][b], 1);
    }
    cutlass::arch::ClusterBarrier::init(&smem.q_full, 1);
    // The barriers must be initialized before the async proxy (complete_tx) touches them.
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  wait_for_prerequisite_grid();

  const int first = p.part_splits[blockIdx.y], last = p.part_splits[blockIdx.y + 1];
  if (first >= last) return;
  const float kv_scale = kFp8 ? *p.kv_scale : 1.0f;
  const float score_scale = p.scale_log2 * kv_scale;

  Tensor sQ = make_tensor(make_smem_ptr(smem.q), LayoutQ{});
  MmaS mma_s;
  MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid_wg);
  auto thr_o = mma_o.get_thread_slice(tid_wg);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kRowsPerTile>, Int<kVHalf>>{}));
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kRowsPerTile>, Int<kVHalf>>{});
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kRowsPerTile>, Int<kSCols>>{});
  mma_o.accumulate_ = GMMA::ScaleOut::One;
  static_assert(decltype(size<2>(tSrQ))::value == kColTiles * kStepsPerBox, "QK^T reads Q and K box by box");

  // S[:, this warpgroup's 32 tokens] = Q K^T of the page in `tile`, one commit group per box. bf16: each box is
  // waited for on its own barrier (completion `parity`) just before the 4 k-steps that read it, so the first
  // HGMMAs run while later boxes land. FP8: the converted tile was published before this is called.
  auto issue_scores = [&](const bf16* tile, uint64_t* box_full, uint32_t parity) {
    Tensor sK = make_tensor(make_smem_ptr(tile), LayoutK{});
    // This warpgroup's 32 tokens: 4 whole 8-row swizzle atoms, so the sub-tile keeps the atom layout the
    // descriptors describe.
    Tensor tSrK = thr_s.partition_fragment_B(local_tile(sK, Shape<Int<kSCols>, Int<kHeadDimK>>{}, make_coord(wg, 0)));
    warpgroup_fence_operand(acc_s);
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int box = 0; box < kColTiles; ++box) {
      if constexpr (!kFp8) cutlass::arch::ClusterBarrier::wait(&box_full[box], parity);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = box * kStepsPerBox; k < (box + 1) * kStepsPerBox; ++k) {
        cute::gemm(mma_s, tSrQ(_, _, k), tSrK(_, _, k), acc_s);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    }
    warpgroup_fence_operand(acc_s);
  };

  // O[:, this warpgroup's 256 columns] += P V of the page in `tile`, P read from `p_buf`: one commit group.
  auto issue_pv = [&](const bf16* tile, const bf16* p_buf) {
    Tensor sV = make_tensor(make_smem_ptr(tile), LayoutV{});
    Tensor tOrV = thr_o.partition_fragment_B(local_tile(sV, Shape<Int<kVHalf>, Int<kPageSize>>{}, make_coord(wg, 0)));
    Tensor tOrP = thr_o.partition_fragment_A(make_tensor(make_smem_ptr(p_buf), LayoutP{}));
    warpgroup_fence_operand(acc_o);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tOrP); ++k) cute::gemm(mma_o, tOrP(_, _, k), tOrV(_, _, k), acc_o);
    warpgroup_commit_batch();
  };

  int seq = 0;  // position of the current page among the part's pages: its stage and barrier parity
  if (tid == 0) {
    smem.part_pages = 0;
    for (int g = first; g < last; ++g) {
      smem.part_pages += p.splits[g * kSplitFields + 2] - p.splits[g * kSplitFields + 1];
    }
    smem.ahead = first_page_of(p, first);
    load_q(&tma_q, smem, smem.ahead.request);
    load_page<kFp8>(&tma_kv, p, smem, stage_of(0), smem.ahead);
    // Both stages are free: the part's first kLoadDistance pages load now.
    for (int seq_ahead = 1; seq_ahead < kLoadDistance && seq_ahead < smem.part_pages; ++seq_ahead) {
      smem.ahead = next_page_of(p, smem.ahead);
      load_page<kFp8>(&tma_kv, p, smem, stage_of(seq_ahead), smem.ahead);
    }
  }
  // Publishes smem.part_pages to every thread.
  __syncthreads();
  if constexpr (kFp8) {
    // The part's first page is converted here; each step converts the one after its own.
    cutlass::arch::ClusterBarrier::wait(&smem.full[0][0], parity_of(0));
    convert_in_place(smem, 0);
    // Converted tiles are generic-proxy writes that wgmma reads: fenced by each writer, then published by
    // a CTA barrier.
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
  }

  // The part's and the split's bounds are read where they are used, through an index the compiler cannot
  // hoist, rather than held in registers through the page loop (the overlapped schedule has none to spare).
  auto part_bound = [&](int end) { return p.part_splits[opaque_index(blockIdx.y) + end]; };
  for (int g = first; g < part_bound(1); ++g) {
    auto split_end = [&]() { return p.splits[opaque_index(g) * kSplitFields + 2]; };
    auto split_seqlen = [&]() { return p.seqlens[p.splits[opaque_index(g) * kSplitFields]]; };
    const int first_page = p.splits[g * kSplitFields + 1];

    // Online-softmax state of this thread's two rows (log2 domain): the maximum is the same in both
    // warpgroups; the sum covers this warpgroup's score columns only.
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    float alpha[2];  // the factor O is rescaled by before the P V of the page whose P was written last

    // The scores of `page` in acc_s (complete in this warpgroup) become P (bf16) in `p_buf`; row_max, row_sum
    // and alpha advance. Rows of the page past the request's end may hold anything (NaN in unused slots):
    // their scores are replaced by a select, never multiplied. Contains one CTA barrier, after which both
    // warpgroups' QK^T of this page have completed (so `p_buf` may be written even where it overlays K).
    auto softmax_to_p = [&](int page, bf16* p_buf) {
      Tensor sP = make_tensor(make_smem_ptr(p_buf), LayoutP{});
      // The fragment's (row, column) coordinates and the rows' key limits, recomputed at each page from an
      // index the compiler cannot hoist: held across the page loop they would take 10 registers (8 swizzled
      // P offsets) that the overlapped schedule lacks.
      const int thread = opaque_index(tid_wg);
      Tensor tScS = mma_s.get_thread_slice(thread)
                        .partition_C(make_identity_tensor(Shape<Int<kRowsPerTile>, Int<kSCols>>{}));
      const int keys = split_seqlen();
      int key_limit[2];  // keys each of the thread's rows sees
      CUTE_UNROLL
      for (int slot = 0; slot < 2; ++slot) {
        const int row = row_base + first_row(thread) + slot * 8;
        key_limit[slot] = p.causal ? keys - p.s_q + row / p.h_q + 1 : keys;
      }
      float tile_max[2] = {-INFINITY, -INFINITY};
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const int slot = row_slot(i);
        const int token = page * kPageSize + wg * kSCols + get<1>(tScS(i));
        const bool visible = token < key_limit[slot];
        acc_s(i) = visible ? acc_s(i) * score_scale : -INFINITY;
        tile_max[slot] = fmaxf(tile_max[slot], acc_s(i));
      }
      CUTE_UNROLL
      for (int slot = 0; slot < 2; ++slot) {
        const float half_max = quad_max(tile_max[slot]);
        if (tid_wg % 4 == 0) smem.row_part[wg][first_row(tid_wg) + slot * 8] = half_max;
      }
      __syncthreads();
      float ref[2], tile_sum[2] = {0.0f, 0.0f};
      CUTE_UNROLL
      for (int slot = 0; slot < 2; ++slot) {
        const int local = first_row(tid_wg) + slot * 8;
        // fmaxf is exact and the operands are the same in both warpgroups: both get the same maximum.
        const float m_new = fmaxf(row_max[slot], fmaxf(smem.row_part[0][local], smem.row_part[1][local]));
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
        *reinterpret_cast<__nv_bfloat162*>(&sP(get<0>(tScS(i)), wg * kSCols + get<1>(tScS(i)))) =
            __floats2bfloat162_rn(p0, p1);
      }
      CUTE_UNROLL
      for (int slot = 0; slot < 2; ++slot) row_sum[slot] = row_sum[slot] * alpha[slot] + quad_sum(tile_sum[slot]);
    };
    auto rescale_o = [&]() {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= alpha[row_slot(i)];
    };

    // q_full completes once per split of the part (one arrival with the tile's bytes), so the split's index
    // in the part is the completion this waits for; the next load is issued only after this split's last
    // QK^T, so no completion can be missed.
    cutlass::arch::ClusterBarrier::wait(&smem.q_full, static_cast<uint32_t>(g - part_bound(0)) & 1u);

    // Ends the step of page seq: after the barrier, both warpgroups' P V of the page has read its stage (V
    // and P; with an FP8 cache the next page's converted tile is published too), and page seq + 2 loads into
    // the freed stage.
    auto release = [&](int stage) {
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      __syncthreads();
      if (tid == 0 && seq + kLoadDistance < smem.part_pages) {
        smem.ahead = next_page_of(p, smem.ahead);
        load_page<kFp8>(&tma_kv, p, smem, stage, smem.ahead);
      }
      ++seq;
    };

    if constexpr (kFp8) {
      // FP8: page seq was converted into its stage's tile during the previous step (or before the first);
      // this step runs its QK^T, softmax and P V, and converts page seq + 1 (landed in the other stage's
      // back half) while that P V runs.
      const int page_end = split_end();
      clear(acc_o);
      for (int page = first_page; page < page_end; ++page) {
        const int stage = stage_of(seq), next = stage_of(seq + 1);
        issue_scores(smem.kv.tile[stage], smem.full[stage], parity_of(seq));
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_s);
        softmax_to_p(page, smem.kv.p);
        // P is a generic-proxy write that P V's wgmma reads.
        cutlass::arch::fence_view_async_shared();
        __syncthreads();
        // The split's last QK^T has read Q: the next split's Q loads now, under this P V and the epilogue.
        if (tid == 0 && page + 1 == page_end && g + 1 < part_bound(1)) {
          load_q(&tma_q, smem, p.splits[(g + 1) * kSplitFields]);
        }
        rescale_o();
        issue_pv(smem.kv.tile[stage], smem.kv.p);
        if (seq + 1 < smem.part_pages) {
          // The other stage was freed by the barrier that ended the previous step, before its load was
          // issued; the conversion touches neither this stage nor P, which P V reads.
          cutlass::arch::ClusterBarrier::wait(&smem.full[next][0], parity_of(seq + 1));
          convert_in_place(smem, next);
          cutlass::arch::fence_view_async_shared();
        }
        release(stage);
      }
    } else {
      // bf16, the overlapped schedule (file comment). The split's first page: its QK^T, then its P.
      auto p_ready = [&](int stage, int page) {
        // Tokens past the request's end: their V rows are zeroed (they may hold NaN, and 0 * NaN is NaN in
        // P V). Both warpgroups' QK^T of the page have completed (the barrier in softmax_to_p), so the rows
        // are dead for K. Only a request's last page (or an empty request's unloaded one) has such tokens.
        const int valid = valid_tokens_of(split_seqlen(), page);
        if (valid < kPageSize) zero_tail(smem.kv.tile[stage], valid);
        // P and the zeroed rows are generic-proxy writes that P V's wgmma (async proxy) reads, and that the
        // stage's next TMA load (async proxy) overwrites: each thread fences its own writes, and the CTA
        // barrier that follows (before P V, and before thread 0 issues that load) publishes them.
        cutlass::arch::fence_view_async_shared();
      };
      issue_scores(smem.kv.tile[stage_of(seq)], smem.full[stage_of(seq)], parity_of(seq));
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_s);
      softmax_to_p(first_page, p_tile<kFp8>(smem, stage_of(seq)));
      p_ready(stage_of(seq), first_page);
      __syncthreads();
      // O is cleared only now: the first page's QK^T and softmax run without its 128 registers live.
      clear(acc_o);
      // Every page but the split's last: the next page's QK^T is issued first, O's rescale runs under it (its
      // HGMMAs write acc_s only), then this page's P V; groups complete in order, so once all but the newest
      // (P V) are done the next page's scores are, and its softmax runs while P V does.
      for (int page = first_page; page + 1 < split_end(); ++page) {
        const int stage = stage_of(seq), next = stage_of(seq + 1);
        issue_scores(smem.kv.tile[next], smem.full[next], parity_of(seq + 1));
        rescale_o();
        issue_pv(smem.kv.tile[stage], p_tile<kFp8>(smem, stage));
        warpgroup_wait<1>();
        warpgroup_fence_operand(acc_s);
        softmax_to_p(page + 1, p_tile<kFp8>(smem, next));
        p_ready(next, page + 1);
        release(stage);
      }
      // The split's last page. Its QK^T, the split's last, completed in both warpgroups before the barrier
      // that ended the previous step (or the first page's): Q is free, and the next split's Q loads under
      // this P V and the epilogue.
      if (tid == 0 && g + 1 < part_bound(1)) load_q(&tma_q, smem, p.splits[(g + 1) * kSplitFields]);
      rescale_o();
      issue_pv(smem.kv.tile[stage_of(seq)], p_tile<kFp8>(smem, stage_of(seq)));
      release(stage_of(seq));
    }
    // This CTA's last split: the combine may start launching (it waits for the whole grid before reading).
    if (g + 1 == part_bound(1)) allow_dependent_launch();

    // The request, and this thread's rows (through tid_out), are derived again here rather than held in
    // registers through the page loop.
    const int request = p.splits[opaque_index(g) * kSplitFields];
    const bool unsplit = !needs_combine(p.split_offsets, request);
    const int tid_out = opaque_index(tid_wg);
    // Epilogue: each row's sum is the two warpgroups' sums, met in shared memory (the partial maxima there
    // were last read before the barrier that ended the page loop). A row that saw no key (an empty
    // request, or a causal row before its first key) gets out 0 and lse +inf; a split's partial lse stays
    // -inf there so that the combine gives it weight 0. Warpgroup 0 writes the lse.
    CUTE_UNROLL
    for (int slot = 0; slot < 2; ++slot) {
      if (tid_wg % 4 == 0) smem.row_part[wg][first_row(tid_wg) + slot * 8] = row_sum[slot];
    }
    __syncthreads();
    float inv[2];
    CUTE_UNROLL
    for (int slot = 0; slot < 2; ++slot) {
      const int local = first_row(tid_out) + slot * 8, row = row_base + local;
      const float l = smem.row_part[0][local] + smem.row_part[1][local];
      inv[slot] = l > 0.0f ? kv_scale / l : 0.0f;
      if (wg == 0 && tid_wg % 4 == 0 && row < rows) {
        const float lse = l > 0.0f ? (row_max[slot] + log2f(l)) * 0.69314718055994531f : -INFINITY;
        if (unsplit) {
          const int t = row / p.h_q, h = row % p.h_q;
          p.lse[static_cast<int64_t>(request) * rows + h * p.s_q + t] = l > 0.0f ? lse : INFINITY;
        } else {
          p.lse_partial[static_cast<int64_t>(g) * rows + row] = lse;
        }
      }
    }
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); i += 2) {
      const int local = first_row(tid_out) + 8 * row_slot(i), row = row_base + local;
      if (row >= rows) continue;
      const int col = wg * kVHalf + get<1>(tOcO(i));
      const float v0 = acc_o(i) * inv[row_slot(i)], v1 = acc_o(i + 1) * inv[row_slot(i)];
      if (unsplit) {
        *reinterpret_cast<__nv_bfloat162*>(p.out + (static_cast<int64_t>(request) * rows + row) * kHeadDimV + col) =
            __floats2bfloat162_rn(v0, v1);
      } else {
        *reinterpret_cast<float2*>(p.out_partial + (static_cast<int64_t>(g) * rows + row) * kHeadDimV + col) =
            make_float2(v0, v1);
      }
    }
    // The next split's first page writes its partial maxima over these sums.
    __syncthreads();
  }
}

// grid (b, rows), 128 threads: one query row of one request, 4 output columns per thread (the batch on x,
// whose limit is 2^31 - 1, not y's 65535). Launched as a programmatic dependent of the split kernel. A
// request with a single split was written by the split kernel and has nothing to merge, but its CTAs still
// wait for the split kernel before they exit: griddepcontrol.wait (and the stream order of a plain launch)
// only covers the grid right before, so the work after this grid is ordered after the split kernel only if
// this grid cannot complete first. Without the wait, a batch with no split request lets this grid finish
// while the split kernel still writes out and lse and reads the plan, and the next launch (the next step's
// planner overwriting the plan, a split kernel reusing out, a programmatic consumer of out) races it.
constexpr int kCombineThreads = 128;

__global__ void __launch_bounds__(kCombineThreads) mla_combine_kernel(const int* split_offsets,
                                                                       const float* out_partial,
                                                                       const float* lse_partial, bf16* out,
                                                                       float* lse, int s_q, int h_q) {
  const int request = blockIdx.x, row = blockIdx.y;
  wait_for_prerequisite_grid();
  if (!needs_combine(split_offsets, request)) return;
  const int rows = s_q * h_q;
  const int first = split_offsets[request], last = split_offsets[request + 1];
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
    // No split saw a key: out 0, lse +inf.
    lse[static_cast<int64_t>(request) * rows + h * s_q + t] = total > 0.0f ? ref + logf(total) : INFINITY;
  }
}

// Lets the split kernel (a programmatic dependent) start its prologue while the plan is computed; it waits
// for this grid to finish before reading the plan.
__global__ void __launch_bounds__(1) mla_plan_splits_kernel(const int* seqlens, int batch, int num_parts,
                                                            int* part_splits, int* splits, int* split_offsets) {
  allow_dependent_launch();
  plan_splits(seqlens, batch, num_parts, part_splits, splits, split_offsets);
}

}  // namespace mla
}  // namespace pykernels
