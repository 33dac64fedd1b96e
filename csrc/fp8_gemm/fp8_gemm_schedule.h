// Index math of the FP8 GEMM kernel, shared by the device code and the host (launcher, bindings, tests):
// the tile heuristic, the grouped raster order and the persistent tile scheduler of the three layouts.
//
// Everything here is __host__ __device__ and free of CUDA calls, so the tests exercise on the CPU exactly
// the code the kernel runs: every tile visited once, nothing out of range, groups skipped as specified.
#pragma once

#include <cuda_runtime.h>  // __host__ __device__ for the host compiler too

#include <cstdint>

#include "fp8_gemm/fp8_gemm_epilogue.h"

namespace pykernels::fp8_gemm {

constexpr int kBlockK = 128;           // one scale block of K: the unit of promotion
constexpr int kMaxStages = 8;
constexpr int kRasterGroup = 8;        // m-blocks per raster group (also the Triton kernel's GROUP_M)
// Dynamic shared memory per block: sm_90's 227 KB opt-in less the 1 KB of static shared memory the
// kernel image carries (cuobjdump reports it; the audit shows it).
constexpr int kSmemLimit = 232448 - 1024;
constexpr int kSmemReserve = 2048;     // barriers plus the 1024-byte alignment of the swizzled tiles

// M, N and K stay below this: the kernel's int row, column and K indices then cannot overflow.
constexpr int kMaxDim = 1 << 30;

enum class Layout : int { Plain = 0, Contiguous = 1, Masked = 2 };

// The operand the two CTAs of a 2-CTA cluster share, each loading half of its tile and multicasting the
// half to both: SharedA pairs the tiles (m, 2j) and (m, 2j + 1), SharedB the tiles (2i, n) and (2i + 1, n).
// Off: no cluster, one CTA per tile as without multicast.
enum class Multicast : int { Off = 0, SharedA = 1, SharedB = 2 };
constexpr int kClusterSize = 2;

// Every BLOCK_N the extension instantiates (for BLOCK_M 64 and 128), and so every width select_config may
// pick. Narrow widths fill the SMs at decode sizes (M <= 128: N / BLOCK_N tiles). 192 is the widest whose
// two fp32 register sets (wgmma fragment and promoted accumulator, 96 each) still fit in a math thread's
// kMathRegisters beside the loop's scalars without spilling; its tiles start at column 0 or 64 of a
// 128-column scale block, so they span two at most, as 144 and 160 do at any offset.
constexpr int kNumBlockNChoices = 11;
__host__ __device__ constexpr int block_n_choice(int i) {
  constexpr int widths[kNumBlockNChoices] = {16, 32, 48, 56, 64, 96, 112, 128, 144, 160, 192};
  return widths[i];
}
// A tile's fixed cost per K step (barrier waits, scale loads, descriptor and loop bookkeeping), in units of
// one output column: the cost model prices a tile of width BLOCK_N at BLOCK_N + kTileOverheadColumns.
constexpr int kTileOverheadColumns = 32;

struct Config {
  int block_m = 0;
  int block_n = 0;
  int num_math_warpgroups = 0;  // block_m / 64: each math warpgroup owns 64 rows
  int num_stages = 0;
  int raster_group = kRasterGroup;
  int64_t num_tiles = 0;
  int64_t num_waves = 0;
  double wave_utilization = 0.0;  // share of the SMs busy in the last wave
  int smem_bytes = 0;
  Multicast multicast = Multicast::Off;
};

// For a >= 0, b > 0; exact up to INT_MAX (no a + b - 1 to overflow).
__host__ __device__ constexpr int ceil_div(int a, int b) { return a / b + (a % b != 0); }

__host__ __device__ constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// One pipeline stage: the A and B tiles of a 128-K block plus the block_m float32 A scales of that block.
__host__ __device__ constexpr int stage_bytes(int block_m, int block_n) {
  return (block_m + block_n) * kBlockK + block_m * 4;
}

// The epilogue's bf16 output tiles, one 64-row tile per math warpgroup: outside the ring, since the TMA
// store of one tile reads them while the next tile's stages fill.
__host__ __device__ constexpr int output_bytes(int block_m, int block_n) {
  return block_m / kOutputRows * output_tile_bytes(block_n);
}

// Pipeline stages of a tile shape: as many as fit in shared memory beside the output tiles, at most
// kMaxStages. A compile-time fact of each instantiation (the kernel's ring size) that the host reproduces
// for the launch.
__host__ __device__ constexpr int num_stages(int block_m, int block_n) {
  const int fit = (kSmemLimit - kSmemReserve - output_bytes(block_m, block_n)) / stage_bytes(block_m, block_n);
  return fit < kMaxStages ? fit : kMaxStages;
}

__host__ __device__ constexpr int smem_bytes(int block_m, int block_n) {
  return num_stages(block_m, block_n) * stage_bytes(block_m, block_n) + output_bytes(block_m, block_n) +
         kSmemReserve;
}

// A tile of width block_n starting at column n0 spans at most two 128-column scale blocks of B: its first
// split_columns(n0, block_n) columns use the block n0 / 128, the rest the next one. n0 is a multiple of
// block_n, so the result is a multiple of gcd(block_n, 128) in [gcd, block_n] (block_n: one block only).
__host__ __device__ constexpr int split_columns(int n0, int block_n) {
  return kBlockK - n0 % kBlockK < block_n ? kBlockK - n0 % kBlockK : block_n;
}

// Whether every tile of width block_n spans at most two scale blocks: the worst offset within a block is
// 128 - gcd(block_n, 128).
__host__ __device__ constexpr bool spans_two_scale_blocks_at_most(int block_n) {
  return kBlockK - gcd(block_n, kBlockK) + block_n <= 2 * kBlockK;
}

// The A scales (one float32 per row per 128-K block) come in one of two layouts:
//   RowMajor: [.., M, K/128] contiguous; element (g, m, kb) at (g * M + m) * K/128 + kb. A producer warp
//             gathers each stage's BLOCK_M scales into shared memory with plain loads.
//   MnMajor:  DeepGEMM's TMA-aligned layout, M innermost and padded to a 16-byte multiple:
//             element (g, m, kb) at g * M_pad * K/128 + kb * M_pad + m, M_pad = scale_a_pad(M) (for the
//             masked layout M is M_max). TMA loads each stage's BLOCK_M scales as one box.
enum class ScaleALayout : int { Invalid = -1, RowMajor = 0, MnMajor = 1 };

__host__ __device__ constexpr int64_t scale_a_pad(int64_t m) { return (m + 3) / 4 * 4; }

__host__ __device__ constexpr int64_t scale_a_offset(ScaleALayout layout, int64_t group, int64_t row, int64_t kb,
                                                     int64_t m_rows, int64_t k_blocks) {
  return layout == ScaleALayout::MnMajor ? (group * k_blocks + kb) * scale_a_pad(m_rows) + row
                                         : (group * m_rows + row) * k_blocks + kb;
}

// Which layout a scale tensor of shape [(G,) M, K/128] with these element strides is in. Contiguous
// tensors are RowMajor (when K/128 == 1 both layouts place the scales alike); strides of size-1
// dimensions are free, as in every stride check.
__host__ __device__ inline ScaleALayout scale_a_layout(int ndim, const int64_t* shape, const int64_t* strides) {
  if (ndim < 2) return ScaleALayout::Invalid;
  int64_t expected = 1;
  bool contiguous = true;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) contiguous = false;
    expected *= shape[i];
  }
  if (contiguous) return ScaleALayout::RowMajor;
  const int64_t m = shape[ndim - 2], k_blocks = shape[ndim - 1], m_pad = scale_a_pad(m);
  const bool rows_ok = m == 1 || strides[ndim - 2] == 1;
  const bool blocks_ok = k_blocks == 1 || strides[ndim - 1] == m_pad;
  const bool groups_ok = ndim == 2 || shape[0] == 1 || strides[0] == m_pad * k_blocks;
  return ndim <= 3 && rows_ok && blocks_ok && groups_ok ? ScaleALayout::MnMajor : ScaleALayout::Invalid;
}

// Whether a shape's tiles pair up for `mode`, so that the two CTAs of each cluster always work on tiles
// sharing that operand and running the same k-blocks (zero tiles: none):
//   SharedA pairs n-blocks 2j and 2j + 1 of one row block, in every layout. Both tiles lie in the same
//     group and row block, so the grouped layouts' padding (-1) blocks, skipped blocks and blocks past
//     masked_m come in pairs too, and the pair agrees on them without looking at the peer. With an odd
//     n_blocks the last pair of each row has no second tile: its rank-1 CTA is load_only (see Tile).
//   SharedB pairs m-blocks 2i and 2i + 1 of one column block: the plain layout only (in the grouped ones
//     the two row blocks can fall in different groups, or one past masked_m), m_blocks even, and each
//     CTA's half of the B tile whole 8-row swizzle atoms (1024 bytes) so both halves land where a single
//     box would put them.
__host__ __device__ constexpr bool multicast_allowed(Multicast mode, Layout layout, int m_blocks, int block_n) {
  return mode == Multicast::SharedB ? layout == Layout::Plain && m_blocks % 2 == 0 && block_n % 16 == 0 : true;
}

// The tile shapes compiled with each multicast mode, and so the only ones select_config turns it on for.
// More than one wave of tiles makes the cost model choose wide tiles: these widths are its choice for over
// 95% of the multi-wave shapes of a sweep over M, N, groups and SM counts (each mode's kernels cost build
// time). B pairs need two row blocks, so BLOCK_M = 64
// (at most 64 rows per group) never pairs B in the plain layout.
__host__ __device__ constexpr bool multicast_instantiated(Multicast mode, int block_m, int block_n) {
  return mode == Multicast::Off ||
         ((mode == Multicast::SharedA ? block_m == 64 || block_m == 128 : block_m == 128) &&
          (block_n == 112 || block_n == 128 || block_n == 144 || block_n == 160 || block_n == 192));
}

// Which operand a cluster shares for this tile shape, or Off. Multicast halves the L2-to-SM traffic of the
// shared tile and pays with lockstep between the two CTAs (each waits for the slower one's release of a
// stage), so it is used only with more than one wave of tiles, where the SMs stream operands tile after
// tile, and with an even SM count (every SM in a cluster). The larger of the two tiles is shared, as it
// saves more bytes; B on a tie (BLOCK_M = BLOCK_N = 128), as DeepGEMM prefers. When the preferred operand
// cannot pair up (multicast_allowed) the other is tried.
__host__ __device__ inline Multicast select_multicast(Layout layout, int block_m, int block_n, int m_blocks,
                                                      int64_t num_waves, int num_sms) {
  if (num_waves <= 1 || num_sms % kClusterSize != 0) return Multicast::Off;
  const Multicast preferred = block_m > block_n ? Multicast::SharedA : Multicast::SharedB;
  const Multicast other = block_m > block_n ? Multicast::SharedB : Multicast::SharedA;
  for (const Multicast mode : {preferred, other}) {
    const bool compiled = multicast_instantiated(mode, block_m, block_n);
    if (compiled && multicast_allowed(mode, layout, m_blocks, block_n)) return mode;
  }
  return Multicast::Off;
}

// Tiles per shape, deterministic. BLOCK_M is 64 (one math warpgroup) when a group holds at most 64 rows,
// else 128 (two). BLOCK_N minimizes the busiest SM's work, waves * (BLOCK_N + kTileOverheadColumns): a
// tile's time grows with its width plus a fixed cost, so narrow tiles win only when they fill more SMs,
// as at decode sizes (M <= 128, N = 2112: 132 tiles of width 16 in one wave) or M=256, N=7168 (128 tiles
// of width 112). Ties go to the better-filled last wave, then to the wider tile. Then select_multicast.
__host__ __device__ inline Config select_config(int m_per_group, int n, int k, int num_groups, int num_sms,
                                                Layout layout) {
  Config best;
  const int block_m = m_per_group <= 64 ? 64 : 128;
  int64_t best_cost = -1;
  for (int c = 0; c < kNumBlockNChoices; ++c) {
    const int block_n = block_n_choice(c);
    const int64_t tiles = int64_t(num_groups) * ceil_div(m_per_group, block_m) * ceil_div(n, block_n);
    const int64_t waves = (tiles + num_sms - 1) / num_sms;
    const int64_t cost = waves * (block_n + kTileOverheadColumns);
    const double utilization = double(tiles - (waves - 1) * num_sms) / num_sms;
    const bool better = best_cost < 0 || cost < best_cost ||
                        (cost == best_cost && (utilization > best.wave_utilization ||
                                               (utilization == best.wave_utilization && block_n > best.block_n)));
    if (better) {
      best_cost = cost;
      best.block_m = block_m;
      best.block_n = block_n;
      best.num_tiles = tiles;
      best.num_waves = waves;
      best.wave_utilization = utilization;
    }
  }
  best.num_math_warpgroups = block_m / 64;
  // K does not bound the stages: past a tile's last K block the producer runs ahead into the next tile.
  (void)k;
  best.num_stages = num_stages(best.block_m, best.block_n);
  best.smem_bytes = smem_bytes(best.block_m, best.block_n);
  best.multicast =
      select_multicast(layout, best.block_m, best.block_n, ceil_div(m_per_group, best.block_m), best.num_waves, num_sms);
  return best;
}

// Tile index within one GEMM -> (m block, n block), raster_group m-blocks at a time: the SMs working at
// the same moment share a few A row blocks and a band of B columns, both L2-resident. The Triton kernel's
// _raster computes the same order.
__host__ __device__ inline void raster_tile(int tile, int m_blocks, int n_blocks, int raster_group, int& m_block,
                                            int& n_block) {
  const int tiles_per_raster = raster_group * n_blocks;
  const int first_m = (tile / tiles_per_raster) * raster_group;
  const int rows = m_blocks - first_m < raster_group ? m_blocks - first_m : raster_group;
  const int within = tile % tiles_per_raster;
  m_block = first_m + within % rows;
  n_block = within / rows;
}

struct Tile {
  int group;    // which B (and, masked, which A) group; -1 for a contiguous padding tile
  int m_block;  // within the group's rows
  int n_block;
  bool zero;    // no rows to compute: the tile's output rows are written as zeros, nothing is loaded
  // SharedA with an odd number of column blocks, rank 1 in the last column pair: n_block is past the last
  // block, and the CTA only loads its half of A for its peer (and A's scales, for its own stage ring),
  // releasing each stage in step with the peer; it computes and stores nothing.
  bool load_only;
};

// The persistent scheduler: CTA `cta` of `num_ctas` visits tiles cta, cta + num_ctas, ... of the layout's
// tile space, in raster order:
//   Plain:      ceil(M / BM) x ceil(N / BN) tiles.
//   Contiguous: ceil(M_total / BM) x ceil(N / BN); a tile's group is m_indices of its first row (segments
//               are GROUPED_M_ALIGNMENT-aligned and BM divides it). Tiles whose first row is padding (-1)
//               are zero tiles; tiles whose group is >= G or below -1 are skipped.
//   Masked:     the groups' tiles back to back, group g contributing ceil(min(masked_m[g], M_max) / BM) x
//               ceil(N / BN) (read from masked_m on the device: no host sync, graph-capturable); then
//               the zero tiles, group g contributing the rest of its ceil(M_max / BM) row blocks.
// Producer and consumers of a CTA run the same scheduler and so agree on every tile.
//
// With multicast, the walk is over tile pairs, one per cluster at a time: cluster c = cta / 2 visits pairs
// c, c + num_ctas / 2, ... of the layout's space with two-block-wide (SharedA) or two-block-high (SharedB)
// tiles, and the CTA of rank r takes block 2j + r of the pair. Both CTAs of a cluster therefore walk the
// same pairs in the same order, skip the same ones and see the same zero tiles: they stay in lockstep on
// the shared stage ring without exchanging anything (multicast_allowed: each pair has two tiles, or one
// and a load_only partner).
struct Scheduler {
  Layout layout;
  int m_rows;  // M, M_total or M_max
  int m_blocks;  // of the walk: row pairs with SharedB
  int n_blocks;  // of the walk: column pairs with SharedA
  int column_blocks;  // of the output
  int num_groups;
  int block_m;
  int raster_group;
  const int* group_info;  // m_indices (contiguous) or masked_m (masked); unused for plain
  int next_index;
  int stride;
  Multicast multicast;
  int rank;  // in the cluster; 0 without multicast
  // Masked layout: the group the walk is in and the index of its first tile (tile indices only grow),
  // first through the groups' computed tiles, then (zero_pass) through their zero tiles.
  int cursor_group = 0;
  int cursor_first = 0;
  bool zero_pass = false;

  // cta and num_ctas count CTAs; with multicast num_ctas is even and a cluster's CTAs are cta 2c and 2c + 1.
  __host__ __device__ Scheduler(Layout layout_, int m_rows_, int n, int num_groups_, int block_m_, int block_n,
                                int raster_group_, const int* group_info_, int cta, int num_ctas,
                                Multicast multicast_ = Multicast::Off)
      : layout(layout_), m_rows(m_rows_),
        m_blocks(ceil_div(m_rows_, block_m_) / (multicast_ == Multicast::SharedB ? kClusterSize : 1)),
        n_blocks(multicast_ == Multicast::SharedA ? ceil_div(ceil_div(n, block_n), kClusterSize)
                                                  : ceil_div(n, block_n)),
        column_blocks(ceil_div(n, block_n)),
        num_groups(num_groups_), block_m(block_m_),
        // Row pairs: half as many per raster group keeps the rows a wave touches, and so its L2 footprint.
        raster_group(multicast_ == Multicast::SharedB ? raster_group_ / kClusterSize : raster_group_),
        group_info(group_info_),
        next_index(multicast_ == Multicast::Off ? cta : cta / kClusterSize),
        stride(multicast_ == Multicast::Off ? num_ctas : num_ctas / kClusterSize), multicast(multicast_),
        rank(multicast_ == Multicast::Off ? 0 : cta % kClusterSize) {}

  // A pair of the walk -> this CTA's tile of it.
  __host__ __device__ void take_own_block(Tile& tile) const {
    if (multicast == Multicast::SharedA) tile.n_block = kClusterSize * tile.n_block + rank;
    if (multicast == Multicast::SharedB) tile.m_block = kClusterSize * tile.m_block + rank;
    tile.load_only = multicast == Multicast::SharedA && tile.n_block >= column_blocks;
  }

  __host__ __device__ int masked_rows(int g) const {
    const int rows = group_info[g];
    return rows < 0 ? 0 : (rows > m_rows ? m_rows : rows);
  }

  // The next tile of this CTA; false when none is left.
  __host__ __device__ bool next(Tile& tile) {
    while (true) {
      const int index = next_index;
      tile.zero = false;
      if (layout == Layout::Masked) {
        int group_tiles = 0, valid_blocks = 0;
        while (true) {
          if (cursor_group >= num_groups) {
            if (zero_pass) return false;
            zero_pass = true;  // the computed tiles are all dealt: the zero tiles follow
            cursor_group = 0;
            continue;
          }
          valid_blocks = ceil_div(masked_rows(cursor_group), block_m);
          group_tiles = (zero_pass ? m_blocks - valid_blocks : valid_blocks) * n_blocks;
          if (index < cursor_first + group_tiles) break;
          cursor_first += group_tiles;
          ++cursor_group;
        }
        next_index += stride;
        tile.group = cursor_group;
        raster_tile(index - cursor_first, group_tiles / n_blocks, n_blocks, raster_group, tile.m_block,
                    tile.n_block);
        if (zero_pass) {
          tile.m_block += valid_blocks;
          tile.zero = true;
        }
        take_own_block(tile);
        return true;
      }
      if (index >= m_blocks * n_blocks) return false;
      next_index += stride;
      raster_tile(index, m_blocks, n_blocks, raster_group, tile.m_block, tile.n_block);
      tile.group = 0;
      if (layout == Layout::Contiguous) {
        tile.group = group_info[tile.m_block * block_m];
        if (tile.group < -1 || tile.group >= num_groups) continue;
        tile.zero = tile.group == -1;
      }
      take_own_block(tile);
      return true;
    }
  }

  // Rows of the tile's group that hold data (the epilogue computes rows below it and zeroes the rest up to
  // the group's end).
  __host__ __device__ int valid_rows(const Tile& tile) const {
    return layout == Layout::Masked ? masked_rows(tile.group) : m_rows;
  }
};

// 128-K blocks a tile runs through the stage ring: none for a zero tile (nothing is loaded for it).
__host__ __device__ constexpr int tile_k_blocks(const Tile& tile, int k_blocks) { return tile.zero ? 0 : k_blocks; }

// One TMA load of a stage by one CTA: `rows` rows of the operand from (group, row) at 128-K block kb, into
// the stage's tile at row smem_row, completing on the "full" barrier of every CTA in cta_mask (bit r: the
// CTA of rank r) at the same shared-memory offset.
struct OperandLoad {
  int group;
  int row;
  int smem_row;
  int rows;
  uint16_t cta_mask;
};

struct TileLoads {
  OperandLoad a, b, sa;  // sa: MN-major A scales (rows floats), when TMA loads them
};

// The loads one CTA issues per stage of a computed tile. Without multicast: whole tiles into itself. With
// it, the CTA of rank r loads rows [r * half, (r + 1) * half) of the shared tile into both CTAs (the peer
// loads the other half), and the rest into itself: the A scales stay per CTA, 512 bytes at most. A
// load_only tile loads no B (b.rows 0).
__host__ __device__ inline TileLoads tile_loads(Layout layout, Multicast multicast, const Tile& tile, int block_m,
                                                int block_n, int rank) {
  // Selects by value, not through a reference to the shared member: a run-time choice of member would put
  // the struct in local memory.
  const uint16_t own = uint16_t(1u << rank), both = uint16_t((1u << kClusterSize) - 1);
  const bool share_a = multicast == Multicast::SharedA, share_b = multicast == Multicast::SharedB;
  const int a_rows = share_a ? block_m / kClusterSize : block_m;
  const int b_rows = tile.load_only ? 0 : share_b ? block_n / kClusterSize : block_n;
  const int a_smem_row = share_a ? rank * a_rows : 0;
  const int b_smem_row = share_b ? rank * b_rows : 0;
  const int a_group = layout == Layout::Masked ? tile.group : 0;
  return TileLoads{{a_group, tile.m_block * block_m + a_smem_row, a_smem_row, a_rows, share_a ? both : own},
                   {tile.group, tile.n_block * block_n + b_smem_row, b_smem_row, b_rows, share_b ? both : own},
                   {a_group, tile.m_block * block_m, 0, block_m, own}};
}

// The transaction bytes a stage's "full" barrier expects in each CTA: the whole A and B tiles (with
// multicast half of the shared one comes from the peer's load; no B for a load_only tile) and the A scales
// when TMA loads them.
__host__ __device__ constexpr int stage_tx_bytes(int block_m, int block_n, bool sa_by_tma, bool load_only) {
  return (block_m + (load_only ? 0 : block_n)) * kBlockK + (sa_by_tma ? block_m * 4 : 0);
}

}  // namespace pykernels::fp8_gemm
