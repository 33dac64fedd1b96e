// Index math of the FP8 GEMM epilogue's shared-memory output tile, shared by the kernel (stmatrix
// addresses), the launcher (the output tensor map's box and swizzle) and the host tests.
//
// Each math warpgroup stages its 64 x BLOCK_N bf16 result in its own tile, cut into column boxes that one
// TMA store each writes to global memory. A box is 64 rows of box_cols columns; under a swizzle its rows
// are exactly the swizzle span (TMA requires the inner box extent to be at most the span, and a full span
// keeps every row's 16-byte units inside one swizzle pattern), so box_cols = span / 2 and the width picks
// the widest span that divides its row: 128 B for 64, 128 and 192, 64 B for 32, 96 and 160, 32 B for 16,
// 48, 112 and 144. 56 columns (112 B) divide into no span: one unswizzled box of 112-byte rows, whose pitch of
// 7 bank groups (odd) already spreads 8 consecutive rows over 8 distinct bank groups.
//
// stmatrix writes 8 x 8 b16 matrices, one 16-byte row per addressed lane, 8 rows per shared-memory phase.
// A fragment chunk's 8 rows are 8 consecutive tile rows at one column: the swizzle (or the odd unswizzled
// pitch) sends them to 8 distinct 16-byte bank groups, so no phase conflicts. The tests check this, and
// that every element lands where TMA reads it, for every instantiated width.
#pragma once

#include <cuda_runtime.h>  // __host__ __device__ for the host compiler too

#include <cstdint>

namespace pykernels::fp8_gemm {

constexpr int kOutputRows = 64;        // rows of one math warpgroup's output tile, and of a store box
constexpr int kOutputElementBytes = 2;  // bf16

// Bytes of one math warpgroup's output tile.
__host__ __device__ constexpr int output_tile_bytes(int block_n) { return kOutputRows * block_n * kOutputElementBytes; }

// Whether an output of N columns at this address can take the TMA store: a tensor map needs its row
// stride (N bf16) a multiple of 16 bytes and a 16-byte aligned base. Otherwise the kernel falls back to
// bounds-checked stores from registers.
__host__ __device__ constexpr bool output_tma_storable(int64_t n, uintptr_t address) {
  return n * kOutputElementBytes % 16 == 0 && address % 16 == 0;
}

// The output tensor map's swizzle span in bytes (128, 64, 32; 0: none) for a tile width.
__host__ __device__ constexpr int output_swizzle_bytes(int block_n) {
  return block_n * kOutputElementBytes % 128 == 0  ? 128
         : block_n * kOutputElementBytes % 64 == 0 ? 64
         : block_n * kOutputElementBytes % 32 == 0 ? 32
                                                   : 0;
}

// Columns of one store box (the tensor map's inner box extent).
__host__ __device__ constexpr int output_box_cols(int block_n) {
  return output_swizzle_bytes(block_n) == 0 ? block_n : output_swizzle_bytes(block_n) / kOutputElementBytes;
}

__host__ __device__ constexpr int output_boxes(int block_n) { return block_n / output_box_cols(block_n); }

// Byte offset of store box `box` in a warpgroup's output tile: the boxes lie back to back.
__host__ __device__ constexpr int output_box_offset(int block_n, int box) {
  return box * kOutputRows * output_box_cols(block_n) * kOutputElementBytes;
}

// Where TMA finds byte `byte` of row `row` of a box whose rows are row_bytes long, relative to the box base
// (aligned to 8 rows of the span): the 16-byte unit index (address bits 4..) is XORed with the address
// bits 7.. (the row within the 8-row pattern, for 128 B; every second or fourth row for 64 B and 32 B),
// as many bits as the span has 16-byte units.
__host__ __device__ constexpr int tma_box_offset(int swizzle_bytes, int row_bytes, int row, int byte) {
  return swizzle_bytes == 0
             ? row * row_bytes + byte
             : (row * row_bytes + byte) ^ ((((row * row_bytes + byte) >> 7) & (swizzle_bytes / 16 - 1)) << 4);
}

// Byte offset of element (row, col) in a warpgroup's output tile: its box, boxes back to back, then the
// place TMA reads it from within the box.
__host__ __device__ constexpr int output_tile_offset(int block_n, int row, int col) {
  return output_box_offset(block_n, col / output_box_cols(block_n)) +
         tma_box_offset(output_swizzle_bytes(block_n), output_box_cols(block_n) * kOutputElementBytes, row,
                        col % output_box_cols(block_n) * kOutputElementBytes);
}

// The row address lane `lane` of warp `warp` (0..3 within the warpgroup) gives the stmatrix that stores the
// accumulator's 8-column chunk `chunk` (x2: its rows r and r + 8 of the warp's 16) or chunks `chunk` and
// `chunk + 1` (x4). Lane i addresses row i % 8 of matrix i / 8; the matrices are (chunk, rows 0-7),
// (chunk, rows 8-15), (chunk + 1, rows 0-7), (chunk + 1, rows 8-15) of the warp's rows, the order in which
// the wgmma fragment holds them (registers 4j..4j+3 of chunk j). An x2 reads lanes 0-15 only.
__host__ __device__ constexpr int stsm_lane_offset(int block_n, int warp, int lane, int chunk) {
  return output_tile_offset(block_n, 16 * warp + 8 * (lane / 8 % 2) + lane % 8, 8 * (chunk + lane / 16));
}

}  // namespace pykernels::fp8_gemm
