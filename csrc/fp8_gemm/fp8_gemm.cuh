// FP8 block-scaled GEMM for sm_90a (DeepSeek-V3 recipe): D[m, n] = bf16(sum over 128-K blocks kb of
// (A[m, kb] . B[n, kb]) * sa[m, kb] * sb[n / 128, kb]), one persistent warp-specialized kernel serving
// the plain, grouped-contiguous and grouped-masked layouts.
//
// Per CTA (BLOCK_M = 64 * kMathWG rows, BLOCK_N columns):
//   warpgroup 0, the producer: gives registers back (setmaxnreg.dec to 40) and one thread walks the tile
//     scheduler, issuing TMA loads (cp.async.bulk.tensor, 128-byte swizzle, out-of-range rows and columns
//     filled with zeros) of each 128-K block of A and B, and of A's scales when they are MN-major, into a
//     ring of kStages shared-memory stages (a compile-time count per tile shape); each load completes on
//     the stage's "full" mbarrier by transaction count. Row-major A scales cannot form a TMA box: a second
//     producer warp gathers them into the stage with plain loads and arrives on "full" lane by lane.
//   warpgroups 1..kMathWG, the math: take registers (setmaxnreg.inc to 232), wait on "full", run 4 wgmma
//     m64nBLOCK_Nk32 e4m3 (QGMMA) into a zeroed fragment, release the stage on its "empty" mbarrier, then
//     promote on the CUDA cores: acc += fragment * sa[row] * sb[column block] in float32, one FFMA per
//     element: the column where a tile crosses into the next 128-wide scale block of B is a template
//     argument of the k-loop, which is compiled once per possible crossing and chosen once per tile. The
//     tensor core never accumulates more than one 128-K block (its FP8 accumulation keeps too few bits).
//   Epilogue: each math warpgroup converts its 64 x BLOCK_N accumulator to bf16 (zeros for rows without
//   data), writes it with stmatrix into its shared-memory output tile, laid out and swizzled as the output
//   tensor map's boxes (fp8_gemm_epilogue.h), and one of its threads stores the boxes with TMA (rows and
//   columns outside the output clipped by TMA). Nobody waits for the store: it runs under the next tile's
//   main loop, and only the next epilogue, before it rewrites the tile, waits for the store to have read
//   it. The producer meanwhile already fills stages for the next tile. Outputs that cannot take a tensor
//   map (N % 8 != 0, a base not 16-byte aligned) are stored from registers with bounds checks instead.
//
// With multicast (kMulticast SharedA or SharedB, launched as 2-CTA clusters; select_config decides which
// operand, a compile-time fact so that the producer's load coordinates fold), the two CTAs of a
// cluster work on two tiles sharing A's or B's block (Scheduler's pair walk keeps them in lockstep). Each
// producer loads half of the shared tile into both CTAs' stages with one multicast TMA load (tile_loads),
// and its other operand into its own: every "full" barrier still expects the whole stage. With an odd
// number of column blocks and A shared, the last pair of a row has one tile: the other CTA only loads its
// half of A for it (Tile::load_only) and releases the stages in step. A stage is then written by both
// producers, so it is free only when the math warps of both CTAs released it: each math warp arrives on
// the "empty" barrier of both CTAs (the peer's through its cluster address), whose count is doubled.
// Barrier init is made visible cluster-wide before any load, and no CTA exits before its peer is done with
// its shared memory and barriers.
//
// Why CuTe's atoms and not hand-written PTX: the wgmma (SM90::GMMA::MMA_64xNx32_F32E4M3E4M3_SS_TN), TMA
// (SM90_TMA_LOAD_3D, SM90_TMA_STORE_3D), stmatrix (SM90_U32x4_STSM_N), mbarrier (ClusterTransactionBarrier),
// named barrier and setmaxnreg wrappers are the tested ones CUTLASS's own kernels run, and the
// shared-memory descriptor is filled through CuTe's named GmmaDescriptor fields rather than packed bits.
// Only these thin arch-level headers are used, not CuTe's layout algebra or CUTLASS's collectives: each
// instantiation then costs seconds of compile time, not a minute.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/copy_sm90.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/arch/mma_sm90_gmma_ext.hpp>
#include <cute/swizzle.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <cstdint>
#include <utility>

#include "fp8_gemm/fp8_gemm_launch.h"
#include "fp8_gemm/fp8_gemm_schedule.h"

namespace pykernels::fp8_gemm {

constexpr int kProducerRegisters = 40;
constexpr int kMathRegisters = 232;
// Named barrier ids of the math warpgroups' epilogues (one each, 128 threads). NamedBarrier::sync adds
// CUTLASS's reserved count, so the hardware ids are 8 and 9, never barrier 0 that __syncthreads uses.
constexpr int kEpilogueBarrier = 0;
static_assert(cutlass::arch::NamedBarrier::ReservedNamedBarrierCount + kEpilogueBarrier > 0 &&
                  cutlass::arch::NamedBarrier::ReservedNamedBarrierCount + kEpilogueBarrier + 2 <=
                      cutlass::arch::NamedBarrier::HardwareMaxNumNamedBarriers,
              "the epilogue barriers must stay off barrier 0 (__syncthreads) and within the 16 hardware ids");

// The e4m3 x e4m3 -> f32 wgmma of each instantiated BLOCK_N (block_n_choice).
template <int kBlockN>
struct GmmaOp;
template <>
struct GmmaOp<16> { using type = cute::SM90::GMMA::MMA_64x16x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<32> { using type = cute::SM90::GMMA::MMA_64x32x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<48> { using type = cute::SM90::GMMA::MMA_64x48x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<56> { using type = cute::SM90::GMMA::MMA_64x56x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<64> { using type = cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<96> { using type = cute::SM90::GMMA::MMA_64x96x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<112> { using type = cute::SM90::GMMA::MMA_64x112x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<128> { using type = cute::SM90::GMMA::MMA_64x128x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<144> { using type = cute::SM90::GMMA::MMA_64x144x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<160> { using type = cute::SM90::GMMA::MMA_64x160x32_F32E4M3E4M3_SS_TN<>; };
template <>
struct GmmaOp<192> { using type = cute::SM90::GMMA::MMA_64x192x32_F32E4M3E4M3_SS_TN<>; };

// Whether the output tile's layout (output_tile_offset) is, box by box, CuTe's description of the TMA
// swizzle mode the launcher encodes: Swizzle<B, 4, 3> over the box's bytes, B = log2(span / 16) (the form
// get_tma_swizzle_bits maps to SWIZZLE_32B/64B/128B), checked at each 16-byte unit stmatrix writes.
template <int kBlockN>
constexpr bool output_tile_is_cute_tma_swizzle() {
  constexpr int kSpan = output_swizzle_bytes(kBlockN);
  using Swizzle = cute::Swizzle<kSpan == 128 ? 3 : kSpan == 64 ? 2 : kSpan == 32 ? 1 : 0, 4, 3>;
  constexpr int kBoxCols = output_box_cols(kBlockN);
  for (int row = 0; row < kOutputRows; ++row) {
    for (int col = 0; col < kBlockN; col += 8) {
      const int box_base = col / kBoxCols * kOutputRows * kBoxCols * kOutputElementBytes;
      const int in_box = row * kBoxCols * kOutputElementBytes + col % kBoxCols * kOutputElementBytes;
      if (box_base + Swizzle::apply(in_box) != output_tile_offset(kBlockN, row, col)) return false;
    }
  }
  return true;
}

// The compile-time facts of one instantiation.
template <int kMathWG, int kBlockN>
struct TileShape {
  static constexpr int kBlockM = 64 * kMathWG;
  static constexpr int kFrag = kBlockN / 2;  // fp32 accumulator registers per thread for m64 x kBlockN
  static constexpr int kStages = num_stages(kBlockM, kBlockN);
  static constexpr int kSmemBytes = smem_bytes(kBlockM, kBlockN);
  static constexpr int kABytes = kBlockM * kBlockK;  // one stage's A tile
  static constexpr int kBBytes = kBlockN * kBlockK;
  static constexpr int kSaBytes = kBlockM * 4;  // one stage's A scales
  static constexpr int kOutBytes = output_tile_bytes(kBlockN);  // one math warpgroup's output tile
  // split_columns of any tile is a multiple of this; it is also the number of distinct k-loop instances.
  static constexpr int kSplitStep = gcd(kBlockN, kBlockK);

  static_assert(kBlockN % 8 == 0 && kBlockN >= 16 && kBlockN <= 256, "wgmma e4m3 needs N a multiple of 8 up to 256");
  static_assert(spans_two_scale_blocks_at_most(kBlockN), "a tile may span at most two 128-column scale blocks");
  static_assert(kSplitStep % 8 == 0, "the scale split must fall between 8-column fragment chunks");
  static_assert(kMathWG == 1 || kMathWG == 2, "one or two math warpgroups");
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "swizzled stage tiles must stay 1024-byte aligned");
  static_assert(kStages >= 2 && kStages <= kMaxStages, "a pipeline needs two stages and fits in shared memory");
  static_assert(kStages * (kABytes + kBBytes + kSaBytes) + kMathWG * kOutBytes + 2 * kStages * 8 + 1023 <= kSmemBytes,
                "shared memory plan");
  static_assert(kMathWG * kOutBytes == output_bytes(kBlockM, kBlockN), "one output tile per math warpgroup");
  // The output tiles follow the B stages: 1024-byte aligned, as the 128-byte swizzle's 8-row pattern and
  // TMA's shared-memory operand need, and their swizzle patterns then start at each box's base.
  static_assert(kOutBytes % 1024 == 0, "output tiles must stay 1024-byte aligned");
  static_assert(output_boxes(kBlockN) * output_box_cols(kBlockN) == kBlockN, "store boxes cover the tile's columns");
  static_assert(output_box_cols(kBlockN) * kOutputElementBytes % 16 == 0 && output_box_cols(kBlockN) <= 256,
                "a TMA box row is a multiple of 16 bytes and at most 256 elements");
  static_assert(output_swizzle_bytes(kBlockN) != 0 || output_box_cols(kBlockN) * kOutputElementBytes / 16 % 2 == 1,
                "an unswizzled tile needs an odd number of 16-byte units per row to keep stmatrix conflict-free");
  static_assert(output_tile_is_cute_tma_swizzle<kBlockN>(), "stmatrix addresses must follow the TMA store's swizzle");
  static_assert(kSaBytes % 128 == 0, "TMA writes the scale boxes to 128-byte aligned shared memory");
  static_assert(2 * kFrag + 40 <= kMathRegisters, "fragment and accumulator must stay in registers");
  static_assert(kSmemBytes <= kSmemLimit, "dynamic shared memory above the 227 KB opt-in less static");
  // setmaxnreg moves registers within the block's allocation: what the warpgroups hold after it must fit
  // in the 64K-register file (ptxas sizes the allocation from __launch_bounds__, 65536 / threads).
  static_assert(kProducerRegisters * 128 + kMathRegisters * 128 * kMathWG <= 65536,
                "producer and math register counts exceed the register file");
  static_assert(kProducerRegisters % 8 == 0 && kMathRegisters % 8 == 0, "setmaxnreg takes multiples of 8");
};

// K-major operand tile in shared memory, 128-byte rows swizzled by TMA (SWIZZLE_128B): 8-row core groups
// 1024 bytes apart. The start address advances by 32 bytes per k32 step inside the swizzle atom, which
// the hardware resolves because the tile base is 1024-byte aligned. The start address sits in the low 14
// bits in 16-byte units, so later stages and k steps are reached by adding (offset >> 4) to a base
// descriptor: shared memory is below 256 KB, the field cannot carry into its neighbour.
__device__ __forceinline__ uint64_t smem_descriptor(const void* smem) {
  cute::GmmaDescriptor desc;
  desc.bitfield.start_address_ = static_cast<uint16_t>(cute::cast_smem_ptr_to_uint(smem) >> 4);
  desc.bitfield.leading_byte_offset_ = 0;  // unused by swizzled K-major layouts
  desc.bitfield.stride_byte_offset_ = 1024 >> 4;
  desc.bitfield.base_offset_ = 0;
  desc.bitfield.layout_type_ = static_cast<uint8_t>(cute::SM90::GMMA::LayoutType::B128);
  return desc.desc_;
}

// The A scales cross shared memory between the scale warp and the math warps, ordered only by the stage's
// mbarriers. CUTLASS's mbarrier wait and arrive are volatile asm without a memory clobber, so the compiler
// may move a plain C++ shared-memory access across them: a read hoisted above the "full" wait sees the
// previous stage's scales, a write sunk below the "full" arrive (or hoisted above the "empty" wait) races
// with the readers. Volatile asm keeps its order relative to other volatile asm, so these accesses stay
// between the barriers; the arrive's release and the wait's acquire then make the writes visible.
__device__ __forceinline__ float ld_shared(const float* ptr) {
  float value;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(value) : "r"(cute::cast_smem_ptr_to_uint(ptr)));
  return value;
}

__device__ __forceinline__ void st_shared(float* ptr, float value) {
  asm volatile("st.shared.f32 [%0], %1;" ::"r"(cute::cast_smem_ptr_to_uint(ptr)), "f"(value));
}

template <class Op, int... I>
__device__ __forceinline__ void gmma(uint64_t desc_a, uint64_t desc_b, float* d, bool accumulate,
                                     std::integer_sequence<int, I...>) {
  Op::fma(desc_a, desc_b, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}

// Calls body(std::integral_constant<int, split>) for the run-time split, one of kSplit, kSplit + kStep, ...
// up to kLast, the values split_columns can return for this width (kLast = kBlockN when a width divides
// into 128-column blocks, 128 for wider tiles, which always span two): each tile then runs a k-loop in
// which the scale block of every fragment column is a compile-time fact.
template <int kSplit, int kStep, int kLast, class Body>
__device__ __forceinline__ void with_split(int split, Body&& body) {
  if constexpr (kSplit >= kLast) {
    body(std::integral_constant<int, kLast>{});
  } else {
    if (split == kSplit) {
      body(std::integral_constant<int, kSplit>{});
    } else {
      with_split<kSplit + kStep, kStep, kLast>(split, static_cast<Body&&>(body));
    }
  }
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// Writes one warp's 16 rows of the accumulator as bf16 into the warpgroup's output tile: one stmatrix x4
// per two 8-column chunks (registers 4j..4j+7: chunk j rows r and r + 8, then chunk j + 1), an x2 for an
// odd last chunk. stsm_lane_offset gives each lane's row address.
template <int kBlockN>
__device__ __forceinline__ void stage_output(const float (&acc)[kBlockN / 2], uint8_t* tile, int warp_in_wg,
                                             int lane) {
  constexpr int kChunks = kBlockN / 8;
#pragma unroll
  for (int j = 0; j + 1 < kChunks; j += 2) {
    auto* row = reinterpret_cast<cute::uint128_t*>(tile + stsm_lane_offset(kBlockN, warp_in_wg, lane, j));
    cute::SM90_U32x4_STSM_N::copy(
        pack_bf16x2(acc[4 * j], acc[4 * j + 1]), pack_bf16x2(acc[4 * j + 2], acc[4 * j + 3]),
        pack_bf16x2(acc[4 * j + 4], acc[4 * j + 5]), pack_bf16x2(acc[4 * j + 6], acc[4 * j + 7]), *row);
  }
  if constexpr (kChunks % 2 == 1) {
    constexpr int j = kChunks - 1;
    auto* row = reinterpret_cast<cute::uint128_t*>(tile + stsm_lane_offset(kBlockN, warp_in_wg, lane, j));
    cute::SM90_U32x2_STSM_N::copy(pack_bf16x2(acc[4 * j], acc[4 * j + 1]),
                                  pack_bf16x2(acc[4 * j + 2], acc[4 * j + 3]), *row);
  }
}

// Waits until every TMA store this thread committed has completed its global writes, not only its reads
// of shared memory (CuTe's tma_store_wait waits for the reads): before the block exits.
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// The math warpgroups' ring position, shared by all tiles of the persistent loop.
struct Ring {
  int stage = 0;
  uint32_t phase = 0;
};

// One tile's main loop for one math warpgroup: per 128-K block, 4 wgmma k32 into a zeroed fragment, then
// promotion acc += fragment * sa[row] * sb[column block] with one FFMA per element: the first kSplit
// columns take scale block 0, the rest block 1, both known at compile time. The stage's A scales are read
// from shared memory (row_in_tile and row_in_tile + 8) before the stage is released.
template <int kMathWG, int kBlockN, int kSplit, bool kCluster>
__device__ __forceinline__ void tile_main_loop(float (&acc)[kBlockN / 2], cutlass::arch::ClusterTransactionBarrier* full,
                                               cutlass::arch::ClusterTransactionBarrier* empty, uint64_t desc_a,
                                               uint64_t desc_b, const float* smem_sa, int row_in_tile,
                                               const float* sb0, const float* sb1, int k_blocks, Ring& ring,
                                               int lane) {
  using Shape = TileShape<kMathWG, kBlockN>;
  using Op = typename GmmaOp<kBlockN>::type;
  constexpr bool kTwoBlocks = kSplit < kBlockN;
  constexpr int kFrag = Shape::kFrag;
  // One 128-K step per iteration, never unrolled: the ring position advances by one per step, and the
  // audit reads exactly one step's instruction mix per loop.
#pragma unroll 1
  for (int kb = 0; kb < k_blocks; ++kb) {
    // B's scales do not live in the stage: the compiler may issue their loads before the wait or among the
    // wgmmas, and either way their latency hides behind the tensor-core work.
    const float b0 = __ldg(sb0 + kb);
    const float b1 = kTwoBlocks ? __ldg(sb1 + kb) : b0;
    full[ring.stage].wait(ring.phase);
    const float a0 = ld_shared(smem_sa + ring.stage * Shape::kBlockM + row_in_tile);
    const float a1 = ld_shared(smem_sa + ring.stage * Shape::kBlockM + row_in_tile + 8);
    float frag[kFrag];
#pragma unroll
    for (int i = 0; i < kFrag; ++i) cute::warpgroup_fence_operand(frag[i]);
    cute::warpgroup_arrive();
    const uint64_t stage_a = desc_a + uint64_t((ring.stage * Shape::kABytes) >> 4);
    const uint64_t stage_b = desc_b + uint64_t((ring.stage * Shape::kBBytes) >> 4);
#pragma unroll
    for (int kk = 0; kk < kBlockK / 32; ++kk) {
      gmma<Op>(stage_a + uint64_t(kk * 32 >> 4), stage_b + uint64_t(kk * 32 >> 4), frag, kk > 0,
               std::make_integer_sequence<int, kFrag>{});
    }
    cute::warpgroup_commit_batch();
#pragma unroll
    for (int i = 0; i < kFrag; ++i) cute::warpgroup_fence_operand(frag[i]);
    cute::warpgroup_wait<0>();
    // The fragment is defined only once the wait returns: the fence ties every read of it below the wait.
#pragma unroll
    for (int i = 0; i < kFrag; ++i) cute::warpgroup_fence_operand(frag[i]);
    __syncwarp();
    if constexpr (kCluster) {
      // Lane r releases the stage in the CTA of rank r: both producers write into every stage.
      if (lane < kClusterSize) empty[ring.stage].arrive(lane);
    } else {
      if (lane == 0) empty[ring.stage].arrive();
    }
    if (++ring.stage == Shape::kStages) {
      ring.stage = 0;
      ring.phase ^= 1;
    }
    const float s00 = a0 * b0, s10 = a1 * b0;
    const float s01 = kTwoBlocks ? a0 * b1 : s00, s11 = kTwoBlocks ? a1 * b1 : s10;
    // wgmma's f32 fragment: register 4j+{0,1} holds row r, columns 8j + 2*(lane%4) + {0,1}; 4j+{2,3} row
    // r+8. Chunk j lies wholly below or above the split (a multiple of 8), so `first` folds per register.
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      const bool first = 8 * j < kSplit;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        acc[4 * j + e] = fmaf(frag[4 * j + e], first ? s00 : s01, acc[4 * j + e]);
        acc[4 * j + 2 + e] = fmaf(frag[4 * j + 2 + e], first ? s10 : s11, acc[4 * j + 2 + e]);
      }
    }
  }
}

// A load_only tile's stages (Tile): the producers of both CTAs fill them like any other, so the math warps
// wait for each and release it in both CTAs in step with the peer, computing nothing.
template <int kStages>
__device__ __forceinline__ void release_stages(cutlass::arch::ClusterTransactionBarrier* full,
                                               cutlass::arch::ClusterTransactionBarrier* empty, int k_blocks,
                                               Ring& ring, int lane) {
#pragma unroll 1
  for (int kb = 0; kb < k_blocks; ++kb) {
    full[ring.stage].wait(ring.phase);
    __syncwarp();
    if (lane < kClusterSize) empty[ring.stage].arrive(lane);
    if (++ring.stage == kStages) {
      ring.stage = 0;
      ring.phase ^= 1;
    }
  }
}

// One stage's TMA load of an operand tile (kShared: this CTA's half of the shared tile, multicast to
// load.cta_mask), box rows load.rows (the host builds the tensor map with that box), at 128-K block kb.
template <bool kShared>
__device__ __forceinline__ void load_operand(const CUtensorMap* map, uint64_t* bar, const OperandLoad& load,
                                             uint8_t* stage_tile, int kb) {
  const uint64_t hint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  uint8_t* dst = stage_tile + load.smem_row * kBlockK;
  if constexpr (kShared) {
    cute::SM90_TMA_LOAD_MULTICAST_3D::copy(map, bar, load.cta_mask, hint, dst, kb * kBlockK, load.row, load.group);
  } else {
    cute::SM90_TMA_LOAD_3D::copy(map, bar, hint, dst, kb * kBlockK, load.row, load.group);
  }
}

// Every thread of a multicast CTA ends here: the CTA's shared memory and barriers must outlive the peer's
// last multicast into them and its math warps' last remote release. Each warp arrives converged, at one
// site per role. Not .aligned all the same: that would be a promise the compiler cannot check, and a
// converged warp takes the same single arrival either way (ptxas branches to its divergent lowering,
// WARPSYNC.COLLECTIVE around UCGABAR_ARV, only when the warp is found divergent at run time).
template <bool kCluster>
__device__ __forceinline__ void wait_for_cluster_peer() {
  if constexpr (kCluster) {
    asm volatile("barrier.cluster.arrive;\n" ::: "memory");
    asm volatile("barrier.cluster.wait;\n" ::: "memory");
  }
}

template <int kMathWG, int kBlockN, Multicast kMulticast>
__global__ void __launch_bounds__((kMathWG + 1) * 128, 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap tma_a, const __grid_constant__ CUtensorMap tma_b,
                    const __grid_constant__ CUtensorMap tma_sa, const __grid_constant__ CUtensorMap tma_out,
                    const Params p) {
  using Shape = TileShape<kMathWG, kBlockN>;
  constexpr int kBlockM = Shape::kBlockM;
  constexpr int kFrag = Shape::kFrag;
  constexpr int kStages = Shape::kStages;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr bool kCluster = kMulticast != Multicast::Off;
  static_assert(multicast_instantiated(kMulticast, kBlockM, kBlockN), "a cluster kernel select_config never picks");
  static_assert(kMulticast != Multicast::SharedA || (kBlockM / kClusterSize) % 8 == 0,
                "each half of a shared A tile must be whole 8-row swizzle atoms");
  static_assert(kMulticast != Multicast::SharedB || (kBlockN / kClusterSize) % 8 == 0,
                "each half of a shared B tile must be whole 8-row swizzle atoms");
  // The peer's multicast half may complete on a "full" barrier before this CTA's producer announced the
  // stage's bytes, taking its transaction count below zero; the count holds magnitudes below 2^20.
  static_assert(stage_tx_bytes(kBlockM, kBlockN, true, false) < (1 << 20),
                "a stage's transaction bytes must fit an mbarrier's tx-count");

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* smem_a = smem;
  uint8_t* smem_b = smem_a + kStages * Shape::kABytes;
  uint8_t* smem_out = smem_b + kStages * Shape::kBBytes;
  float* smem_sa = reinterpret_cast<float*>(smem_out + kMathWG * Shape::kOutBytes);
  Barrier* full = reinterpret_cast<Barrier*>(smem_out + kMathWG * Shape::kOutBytes + kStages * Shape::kSaBytes);
  Barrier* empty = full + kStages;

  const int warpgroup = threadIdx.x / 128;
  const bool sa_by_tma = p.sa_layout == ScaleALayout::MnMajor;
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(&tma_a);
    cute::prefetch_tma_descriptor(&tma_b);
    if (sa_by_tma) cute::prefetch_tma_descriptor(&tma_sa);
    if (p.tma_store) cute::prefetch_tma_descriptor(&tma_out);
    for (int s = 0; s < kStages; ++s) {
      // The producer's arrive_and_expect_tx, plus one arrive per lane of the scale warp (RowMajor scales).
      full[s].init(sa_by_tma ? 1 : 1 + 32);
      empty[s].init(kMathWG * 4 * (kCluster ? kClusterSize : 1));  // one arrive per math warp (of each CTA)
    }
    // The barriers must be initialized before the async proxy (TMA's complete_tx) touches them.
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kCluster) {
    // ... and before the peer's multicast loads and remote arrivals reach them.
    cute::cluster_sync();
  } else {
    __syncthreads();
  }

  // Each role builds its own scheduler after setmaxnreg: state live across the register reconfiguration
  // would be spilled.
  // B pairs exist in the plain layout only (multicast_allowed; the launcher checks it): those kernels compile
  // the plain walk alone, which keeps the 40-register producer warps free of spills.
  const Layout walk_layout = kMulticast == Multicast::SharedB ? Layout::Plain : p.layout;
  const auto make_scheduler = [&p, walk_layout]() {
    return Scheduler(walk_layout, p.m_rows, p.n, p.num_groups, kBlockM, kBlockN, kRasterGroup, p.group_info,
                     blockIdx.x, gridDim.x, kMulticast);
  };
  Tile tile;

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    const int k_blocks = p.k / kBlockK;
    Scheduler scheduler = make_scheduler();
    int stage = 0;
    uint32_t phase = 0;
    if (threadIdx.x / 32 == 1 && !sa_by_tma) {
      // The scale warp: RowMajor A scales are K/128 floats apart per row, too narrow a box for TMA; its
      // lanes gather each stage's BLOCK_M scales (zeros past the valid rows) and arrive one by one.
      const int lane = threadIdx.x % 32;
      while (scheduler.next(tile)) {
        if (tile.zero) continue;
        const int valid_rows = scheduler.valid_rows(tile);
        const int a_group = p.layout == Layout::Masked ? tile.group : 0;
        for (int kb = 0; kb < k_blocks; ++kb) {
          empty[stage].wait(phase ^ 1);
          for (int i = lane; i < kBlockM; i += 32) {
            const int row = tile.m_block * kBlockM + i;
            st_shared(smem_sa + stage * kBlockM + i,
                      row < valid_rows ? __ldg(p.sa + scale_a_offset(ScaleALayout::RowMajor, a_group, row, kb,
                                                                     p.m_rows, k_blocks))
                                       : 0.0f);
          }
          full[stage].arrive();
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
      wait_for_cluster_peer<kCluster>();
      return;
    }
    if (threadIdx.x == 0) {
      const uint64_t hint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
      while (scheduler.next(tile)) {
        const TileLoads loads = tile_loads(p.layout, kMulticast, tile, kBlockM, kBlockN, scheduler.rank);
        const uint32_t stage_bytes = stage_tx_bytes(kBlockM, kBlockN, sa_by_tma, tile.load_only);
        for (int kb = 0; kb < tile_k_blocks(tile, k_blocks); ++kb) {
          empty[stage].wait(phase ^ 1);
          full[stage].arrive_and_expect_tx(stage_bytes);
          uint64_t* bar = reinterpret_cast<uint64_t*>(&full[stage]);
          load_operand<kMulticast == Multicast::SharedA>(&tma_a, bar, loads.a, smem_a + stage * Shape::kABytes, kb);
          if (!tile.load_only) {
            load_operand<kMulticast == Multicast::SharedB>(&tma_b, bar, loads.b, smem_b + stage * Shape::kBBytes, kb);
          }
          if (sa_by_tma) {
            cute::SM90_TMA_LOAD_3D::copy(&tma_sa, bar, hint, smem_sa + stage * kBlockM, loads.sa.row, kb,
                                         loads.sa.group);
          }
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
    // Lanes 1-31 of warp 0 wait for the producer thread at the end of the branch above, so every warp
    // reaches the cluster barrier converged and at a single site.
    wait_for_cluster_peer<kCluster>();
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kMathRegisters>();
  const int k_blocks = p.k / kBlockK;
  Scheduler scheduler = make_scheduler();
  const int math_wg = warpgroup - 1;
  const int lane = threadIdx.x % 32;
  const int warp_in_wg = (threadIdx.x / 32) % 4;
  // wgmma's f32 fragment: register 4j+{0,1} holds row r, columns 8j + 2*(lane%4) + {0,1}; 4j+{2,3} row r+8.
  const int row_in_tile = math_wg * 64 + warp_in_wg * 16 + lane / 4;
  const int col_in_chunk = 2 * (lane % 4);
  const int n_scale_blocks = ceil_div(p.n, kBlockK);
  const bool n_even = (p.n % 2) == 0;
  // Stage 0's descriptors; the main loop offsets them to its stage and k step.
  const uint64_t desc_a = smem_descriptor(smem_a + math_wg * 64 * kBlockK);
  const uint64_t desc_b = smem_descriptor(smem_b);
  Ring ring;
  uint8_t* out_tile = smem_out + math_wg * Shape::kOutBytes;
  // The one thread of the warpgroup that issues, commits and waits for its TMA stores (bulk async-groups
  // belong to the thread that commits them).
  const bool store_leader = threadIdx.x % 128 == 0;

  while (scheduler.next(tile)) {
    if (tile.load_only) {
      release_stages<kStages>(full, empty, tile_k_blocks(tile, k_blocks), ring, lane);
      continue;
    }
    const int valid_rows = scheduler.valid_rows(tile);
    const int64_t group_row0 = p.layout == Layout::Masked ? int64_t(tile.group) * p.m_rows : 0;
    // Rows without data still run (past M their A rows and scales arrive as zeros); the epilogue replaces
    // their products with zeros.
    const int row0 = tile.m_block * kBlockM + row_in_tile;
    const int n0 = tile.n_block * kBlockN;

    float acc[kFrag];
#pragma unroll
    for (int i = 0; i < kFrag; ++i) acc[i] = 0.0f;
    // A zero tile runs no k step (the producers load nothing for it); its group may be -1.
    const int tile_k_blocks = tile.zero ? 0 : k_blocks;
    const int64_t b_group = tile.zero ? 0 : tile.group;
    const int sb_block0 = n0 / kBlockK;
    const int sb_block1 = min(sb_block0 + 1, n_scale_blocks - 1);
    const float* sb0 = p.sb + (b_group * n_scale_blocks + sb_block0) * k_blocks;
    const float* sb1 = p.sb + (b_group * n_scale_blocks + sb_block1) * k_blocks;
    constexpr int kLastSplit = kBlockN <= kBlockK ? kBlockN : kBlockK;
    with_split<Shape::kSplitStep, Shape::kSplitStep, kLastSplit>(split_columns(n0, kBlockN), [&](auto split) {
      tile_main_loop<kMathWG, kBlockN, decltype(split)::value, kCluster>(acc, full, empty, desc_a, desc_b, smem_sa,
                                                                        row_in_tile, sb0, sb1, tile_k_blocks, ring,
                                                                        lane);
    });

    // Every row of the tile inside the matrix (the group, masked) is stored: rows with data get the
    // product, the others zeros (padding rows of the contiguous layout, rows at or past masked_m, and all
    // rows of a zero tile), so the whole output is defined.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + 8 * half;
      const bool computed = !tile.zero && row < valid_rows &&
                            !(p.layout == Layout::Contiguous && row < p.m_rows && __ldg(p.group_info + row) < 0);
      if (!computed) {
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) acc[4 * j + 2 * half] = acc[4 * j + 2 * half + 1] = 0.0f;
      }
    }
    if (p.tma_store) {
      // The previous tile's store may still be reading the tile: its leader waits for the reads, then the
      // warpgroup may overwrite it.
      if (store_leader) cute::tma_store_wait<0>();
      cutlass::arch::NamedBarrier::sync(128, kEpilogueBarrier + math_wg);
      stage_output<kBlockN>(acc, out_tile, warp_in_wg, lane);
      // stmatrix writes through the generic proxy, the TMA store reads through the async proxy.
      cute::tma_store_fence();
      cutlass::arch::NamedBarrier::sync(128, kEpilogueBarrier + math_wg);
      const int wg_row = tile.m_block * kBlockM + math_wg * kOutputRows;
      if (store_leader && wg_row < p.m_rows) {
        constexpr int kBoxCols = output_box_cols(kBlockN);
        const int out_group = p.layout == Layout::Masked ? tile.group : 0;
#pragma unroll
        for (int box = 0; box < output_boxes(kBlockN); ++box) {
          cute::SM90_TMA_STORE_3D::copy(&tma_out, out_tile + output_box_offset(kBlockN, box), n0 + box * kBoxCols,
                                        wg_row, out_group);
        }
        cute::tma_store_arrive();
      }
      continue;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + 8 * half;
      if (row >= p.m_rows) continue;
      __nv_bfloat16* out_row = p.out + (group_row0 + row) * p.n;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        const int col = n0 + 8 * j + col_in_chunk;
        const float v0 = acc[4 * j + 2 * half], v1 = acc[4 * j + 2 * half + 1];
        if (n_even && col + 1 < p.n) {
          *reinterpret_cast<__nv_bfloat162*>(out_row + col) = __floats2bfloat162_rn(v0, v1);
        } else {
          if (col < p.n) out_row[col] = __float2bfloat16_rn(v0);
          if (col + 1 < p.n) out_row[col + 1] = __float2bfloat16_rn(v1);
        }
      }
    }
  }
  // Shared memory must outlive the stores' reads of it, and the kernel's completion their writes.
  if (p.tma_store && store_leader) tma_store_wait_all();
  wait_for_cluster_peer<kCluster>();
}

}  // namespace pykernels::fp8_gemm
