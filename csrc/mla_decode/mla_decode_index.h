// Index math of the MLA decode kernels that the host can check (through the binding): which tokens of a page
// hold keys, where each TMA box of a page or of a query tile starts, which requests go through the combine.
// The kernels call these same functions.
#pragma once

#include <cstdint>

#include "mla_decode/mla_decode_plan.h"

namespace pykernels {
namespace mla {

constexpr int kHeadDimK = 576;  // 512 latent + 64 RoPE
constexpr int kHeadDimV = 512;
constexpr int kRowsPerTile = 64;  // query rows per CTA: the M of every MMA
// One TMA box is 64 rows x 64 bf16 columns: one 128-byte swizzle row per tile row, so a 576-column tile
// arrives as kColTiles boxes, each the 8 KB column block a K-major 128-byte-swizzled GMMA operand stores
// contiguously.
constexpr int kBoxCols = 64;
constexpr int kColTiles = kHeadDimK / kBoxCols;
constexpr int kBoxBytes = kPageSize * kBoxCols * 2;
static_assert(kHeadDimK % kBoxCols == 0, "the head dim must be whole 64-column boxes");
static_assert(kRowsPerTile == kPageSize, "a query tile and a page share the box height");

// Bytes that land on a stage's barrier for one page, bf16 (kColTiles boxes) or e4m3 (one bulk copy).
constexpr uint32_t kPageBytesBf16 = kColTiles * kBoxBytes;
constexpr uint32_t kPageBytesFp8 = kPageSize * kHeadDimK;
constexpr uint32_t kQTileBytes = kColTiles * kBoxBytes;
static_assert(kPageBytesBf16 == kPageSize * kHeadDimK * 2 && kPageBytesFp8 % 16 == 0,
              "the boxes cover the page exactly; a bulk copy moves whole 16-byte units");
static_assert(kPageBytesBf16 < (1u << 20), "an mbarrier's transaction count holds less than 2^20 bytes");

// Tokens of page `page` that hold keys of a request of `seqlen` tokens, 0..64. Rows from this count to 64 are
// zeroed in shared memory before P V (they may hold NaN, or nothing was loaded); a page with 0 valid tokens
// (an empty request's planned page) is not loaded and its block_table entry is not read. 64-bit so that no
// length or page index overflows.
__host__ __device__ inline int valid_tokens_of(int seqlen, int page) {
  const int64_t left = static_cast<int64_t>(seqlen) - static_cast<int64_t>(page) * kPageSize;
  return left <= 0 ? 0 : left >= kPageSize ? kPageSize : static_cast<int>(left);
}

// TMA coordinates, innermost first, of box `col_tile` of cache page `block_id`: the cache [num_blocks, 64, 1,
// 576] seen as the 2-D tensor [num_blocks * 64 rows, 576 columns]. The host refuses caches whose row count
// does not fit int32 (mla_decode), so block_id * 64 does not overflow for any id in range.
struct PageBox {
  int col, row;
};
__host__ __device__ inline PageBox page_box(int block_id, int col_tile) {
  return PageBox{col_tile * kBoxCols, block_id * kPageSize};
}

// TMA coordinates of box `col_tile` of query tile `row_block` of `request`: q [b, s_q * h_q, 576] seen as 3-D,
// so rows past s_q * h_q are out of range and arrive as zeros instead of the next request's rows.
struct QBox {
  int col, row, request;
};
__host__ __device__ inline QBox q_box(int request, int row_block, int col_tile) {
  return QBox{col_tile * kBoxCols, row_block * kRowsPerTile, request};
}

// A request with one split is written in final form by the split kernel; the combine skips it (and never
// waits for the split kernel).
__host__ __device__ inline bool needs_combine(const int* split_offsets, int request) {
  return split_offsets[request + 1] - split_offsets[request] > 1;
}

}  // namespace mla
}  // namespace pykernels
