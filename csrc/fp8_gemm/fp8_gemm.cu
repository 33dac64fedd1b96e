#include "fp8_gemm/fp8_gemm.h"

#include <algorithm>
#include <string>
#include <utility>

#include "common/tensor_map.h"
#include "fp8_gemm/fp8_gemm_launch.h"

namespace pykernels {
namespace {

using fp8_gemm::Config;
using fp8_gemm::kBlockK;
using fp8_gemm::Layout;

// A 3-D map over an e4m3 operand [groups, rows, K] (K innermost), loading 128 x box_rows boxes with the
// 128-byte swizzle wgmma reads. Boxes past `rows` are zero-filled, so tails need no masking and nothing
// leaks in from the next group.
CUtensorMap make_operand_map(const void* base, int64_t groups, int64_t rows, int64_t k, int box_rows) {
  const cuuint64_t dims[3] = {cuuint64_t(k), cuuint64_t(rows), cuuint64_t(groups)};
  const cuuint64_t strides[2] = {cuuint64_t(k), cuuint64_t(k * rows)};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {cuuint32_t(kBlockK), cuuint32_t(box_rows), 1};
  return encode_tensor_map("an e4m3 operand", CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, base, dims, strides, box,
                           CU_TENSOR_MAP_SWIZZLE_128B);
}

// A 3-D map over MN-major A scales [groups, K/128, rows] (rows innermost, scale_a_pad(rows) apart),
// loading box_rows scales of one 128-K block at a time; rows past `rows` are zero-filled.
CUtensorMap make_scale_map(const void* base, int64_t groups, int64_t rows, int64_t k_blocks, int box_rows) {
  const int64_t pad = fp8_gemm::scale_a_pad(rows);
  const cuuint64_t dims[3] = {cuuint64_t(rows), cuuint64_t(k_blocks), cuuint64_t(groups)};
  const cuuint64_t strides[2] = {cuuint64_t(pad * 4), cuuint64_t(pad * k_blocks * 4)};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {cuuint32_t(box_rows), 1, 1};
  return encode_tensor_map("the A scales", CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, base, dims, strides, box,
                           CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE);
}

// A 3-D map over the bf16 output [groups, rows, N] (N innermost) that the epilogue's TMA stores write
// through: boxes of output_box_cols(block_n) columns x 64 rows, in the tile's swizzle. Rows past `rows`
// and columns past N are clipped, so the stores need no bounds checks and cannot reach the next group.
CUtensorMap make_output_map(void* base, int64_t groups, int64_t rows, int64_t n, int block_n) {
  const cuuint64_t dims[3] = {cuuint64_t(n), cuuint64_t(rows), cuuint64_t(groups)};
  const cuuint64_t strides[2] = {cuuint64_t(n * 2), cuuint64_t(n * 2 * rows)};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {cuuint32_t(fp8_gemm::output_box_cols(block_n)), cuuint32_t(fp8_gemm::kOutputRows), 1};
  const int swizzle_bytes = fp8_gemm::output_swizzle_bytes(block_n);
  const CUtensorMapSwizzle swizzle = swizzle_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                     : swizzle_bytes == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                           : CU_TENSOR_MAP_SWIZZLE_NONE;
  return encode_tensor_map("the output", CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, base, dims, strides, box, swizzle);
}

int sm_count(int device) {
  int sms = 0;
  PK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

struct Problem {
  Layout layout;
  const TensorView *a, *sa, *b, *sb, *out;
  fp8_gemm::ScaleALayout sa_layout;
  const int* group_info;
  int64_t a_groups;  // G for masked, else 1
  int64_t m_rows;
  int64_t n, k, num_groups;
  int m_hint;  // rows per group the tile choice plans for
};

// The tile shape forced by fp8_gemm_force_tile (block_m 0: none), for tests that drive every instantiation.
Config forced_tile;
// The multicast mode forced by fp8_gemm_force_multicast (-1: select_config's).
int forced_multicast = -1;

// Launches the instantiation if the extension has it (the cluster kernels exist only for
// multicast_instantiated shapes); false otherwise.
template <int kMathWG, int kBlockN, fp8_gemm::Multicast kMulticast>
bool launch_if_instantiated(const fp8_gemm::LaunchArgs& args, cudaStream_t stream) {
  if constexpr (!fp8_gemm::multicast_instantiated(kMulticast, 64 * kMathWG, kBlockN)) {
    return false;
  } else {
    fp8_gemm::launch_tile<kMathWG, kBlockN, kMulticast>(args, stream);
    return true;
  }
}

template <int kMathWG, fp8_gemm::Multicast kMulticast, size_t... I>
void launch_width(int block_n, const fp8_gemm::LaunchArgs& args, cudaStream_t stream, std::index_sequence<I...>) {
  const bool launched =
      ((block_n == fp8_gemm::block_n_choice(I) &&
        launch_if_instantiated<kMathWG, fp8_gemm::block_n_choice(I), kMulticast>(args, stream)) ||
       ...);
  PK_ASSERT(launched, "no kernel instantiated for BLOCK_N " + std::to_string(block_n) + " with multicast mode " +
                          std::to_string(int(kMulticast)));
}

template <int kMathWG>
void launch_mode(const Config& cfg, const fp8_gemm::LaunchArgs& args, cudaStream_t stream) {
  using fp8_gemm::Multicast;
  const auto widths = std::make_index_sequence<fp8_gemm::kNumBlockNChoices>{};
  switch (cfg.multicast) {
    case Multicast::Off: return launch_width<kMathWG, Multicast::Off>(cfg.block_n, args, stream, widths);
    case Multicast::SharedA: return launch_width<kMathWG, Multicast::SharedA>(cfg.block_n, args, stream, widths);
    case Multicast::SharedB: return launch_width<kMathWG, Multicast::SharedB>(cfg.block_n, args, stream, widths);
  }
}

void launch(const Problem& pr, const Config& cfg, int num_ctas, cudaStream_t stream) {
  fp8_gemm::LaunchArgs args;
  // The boxes are the rows each CTA loads per stage: half the shared tile with multicast.
  const fp8_gemm::TileLoads loads =
      fp8_gemm::tile_loads(pr.layout, cfg.multicast, fp8_gemm::Tile{0, 0, 0, false}, cfg.block_m, cfg.block_n, 0);
  args.map_a = make_operand_map(pr.a->data, pr.a_groups, pr.m_rows, pr.k, loads.a.rows);
  args.map_b = make_operand_map(pr.b->data, pr.num_groups, pr.n, pr.k, loads.b.rows);
  args.params.layout = pr.layout;
  args.params.m_rows = int(pr.m_rows);
  args.params.n = int(pr.n);
  args.params.k = int(pr.k);
  args.params.num_groups = int(pr.num_groups);
  args.params.sa = pr.sa->ptr<const float>();
  args.params.sa_layout = pr.sa_layout;
  if (pr.sa_layout == fp8_gemm::ScaleALayout::MnMajor) {
    args.map_sa = make_scale_map(pr.sa->data, pr.a_groups, pr.m_rows, pr.k / kBlockK, cfg.block_m);
  } else {
    args.map_sa = CUtensorMap{};
  }
  args.params.sb = pr.sb->ptr<const float>();
  args.params.out = pr.out->ptr<__nv_bfloat16>();
  args.params.tma_store = fp8_gemm::output_tma_storable(pr.n, reinterpret_cast<uintptr_t>(pr.out->data));
  args.map_out = args.params.tma_store
                     ? make_output_map(pr.out->data, pr.a_groups, pr.m_rows, pr.n, cfg.block_n)
                     : CUtensorMap{};
  args.params.group_info = pr.group_info;
  args.num_ctas = num_ctas;
  if (cfg.num_math_warpgroups == 1) {
    launch_mode<1>(cfg, args, stream);
  } else {
    launch_mode<2>(cfg, args, stream);
  }
}

void require_operand(const TensorView& x, int ndim) {
  require_cuda(x);
  require_dtype(x, DType::Float8E4M3);
  require_ndim(x, ndim);
  require_contiguous(x);
  if (x.size(-1) <= 0 || x.size(-1) % kBlockK != 0) {
    throw_value_error(x.name, "K (the last dimension) a positive multiple of 128", "shape " + x.shape_str());
  }
  require_aligned(x, 16);  // TMA reads from 16-byte aligned global addresses
}

void require_scales(const TensorView& s, const TensorView& of, int ndim) {
  require_same_device(of, s);
  require_dtype(s, DType::Float32);
  require_ndim(s, ndim);
  require_contiguous(s);
  require_aligned(s, 4);
}

// The A scales' layout, recognized from their strides (either is accepted; see ScaleALayout).
fp8_gemm::ScaleALayout require_scales_a(const TensorView& sa, const TensorView& a, int ndim) {
  require_same_device(a, sa);
  require_dtype(sa, DType::Float32);
  require_ndim(sa, ndim);
  const auto layout = fp8_gemm::scale_a_layout(sa.ndim, sa.shape.data(), sa.strides.data());
  if (layout == fp8_gemm::ScaleALayout::Invalid) {
    std::string strides;
    for (int i = 0; i < sa.ndim; ++i) strides += (i ? ", " : "") + std::to_string(sa.strides[i]);
    throw_value_error(sa.name, "the scales of a row-major (contiguous) or MN-major TMA-aligned (stride(-2) 1, "
                      "stride(-1) M rounded up to 4 = " + std::to_string(fp8_gemm::scale_a_pad(sa.size(-2))) +
                      (ndim == 3 ? ", stride(0) that times K/128" : "") + ")",
                      "shape " + sa.shape_str() + " with strides (" + strides + ")");
  }
  // TMA reads MN-major scales from a 16-byte aligned base; plain loads need float alignment.
  require_aligned(sa, layout == fp8_gemm::ScaleALayout::MnMajor ? 16 : 4);
  return layout;
}

void run(const Problem& pr, cudaStream_t stream) {
  const TensorView &a = *pr.a, &b = *pr.b, &out = *pr.out;
  require_same_device(a, b);
  require_same_device(a, out);
  require_dtype(out, DType::BFloat16);
  require_contiguous(out);
  require_aligned(out, 4);
  if (b.size(-1) != pr.k) {
    throw_value_error(b.name, "K = " + std::to_string(pr.k) + " (as in a)", "shape " + b.shape_str());
  }
  const int64_t k_blocks = pr.k / kBlockK;
  const int64_t n_blocks = (pr.n + kBlockK - 1) / kBlockK;
  if (pr.layout == Layout::Masked) {
    require_size(*pr.sa, 0, pr.a_groups, "groups of a");
    require_size(*pr.sa, 1, pr.m_rows, "rows of a");
  } else {
    require_size(*pr.sa, 0, pr.m_rows, "rows of a");
  }
  require_size(*pr.sa, -1, k_blocks, "K / 128");
  if (pr.sb->ndim == 3) require_size(*pr.sb, 0, pr.num_groups, "groups of b");
  require_size(*pr.sb, -2, n_blocks, "ceil(N / 128)");
  require_size(*pr.sb, -1, k_blocks, "K / 128");
  const int64_t out_rows = pr.a_groups * pr.m_rows;
  if (out.numel() != out_rows * pr.n || out.size(-1) != pr.n) {
    throw_value_error(out.name, "shape with " + std::to_string(out_rows) + " rows of N = " + std::to_string(pr.n),
                      "shape " + out.shape_str());
  }
  // The kernel indexes rows, columns and K in int: a column or row plus one tile must not overflow.
  if (pr.m_rows >= fp8_gemm::kMaxDim || pr.n >= fp8_gemm::kMaxDim || pr.k >= fp8_gemm::kMaxDim ||
      out_rows * pr.n >= (int64_t(1) << 62)) {
    throw_value_error(a.name, "dimensions below 2^30", "shape " + a.shape_str());
  }
  if (out_rows == 0 || pr.n == 0 || pr.num_groups == 0) return;

  int device = 0;
  PK_CUDA_CHECK(cudaGetDevice(&device));
  if (a.device_id >= 0 && a.device_id != device) {
    throw_value_error(a.name, "a tensor on the current CUDA device cuda:" + std::to_string(device), a.device_str());
  }
  const int sms = sm_count(device);
  const int plan_groups = pr.layout == Layout::Masked ? int(pr.num_groups) : 1;
  Config cfg = fp8_gemm::select_config(pr.m_hint, int(pr.n), int(pr.k), plan_groups, sms, pr.layout);
  if (forced_tile.block_m != 0) cfg = forced_tile;
  const int row_tiles = int((pr.m_rows + cfg.block_m - 1) / cfg.block_m);
  const int column_tiles = int((pr.n + cfg.block_n - 1) / cfg.block_n);
  if (forced_multicast >= 0) {
    cfg.multicast = static_cast<fp8_gemm::Multicast>(forced_multicast);
    const bool runnable = cfg.multicast == fp8_gemm::Multicast::Off ||
                          (fp8_gemm::multicast_instantiated(cfg.multicast, cfg.block_m, cfg.block_n) &&
                           fp8_gemm::multicast_allowed(cfg.multicast, pr.layout, row_tiles, cfg.block_n));
    if (!runnable) {
      throw_value_error("multicast", "a mode this shape and tile allow (BLOCK_N one of 112, 128, 144, 160, 192; B: "
                        "BLOCK_M 128, the plain layout and an even number of row blocks)",
                        std::to_string(forced_multicast) + " for " + std::to_string(row_tiles) + " x " +
                            std::to_string(column_tiles) + " tiles of " + std::to_string(cfg.block_m) + " x " +
                            std::to_string(cfg.block_n));
    }
  }
  // select_config planned with the hint's rows; the kernel walks the tensor's: both pair up alike
  // (A depends on N alone, B exists only for the plain layout, whose hint is M).
  PK_ASSERT(fp8_gemm::multicast_allowed(cfg.multicast, pr.layout, row_tiles, cfg.block_n),
            "multicast mode " + std::to_string(int(cfg.multicast)) + " on an unpaired shape");
  // Upper bound of the tiles the scheduler can hand out; masked counts are only known on the device.
  const int64_t max_tiles = pr.a_groups * row_tiles * int64_t(column_tiles);
  int num_ctas = int(std::max<int64_t>(1, std::min<int64_t>(max_tiles, sms)));
  if (cfg.multicast != fp8_gemm::Multicast::Off) {
    // Whole clusters, one per tile pair at most (A shared: an odd last column block is a pair of its own).
    const int64_t pairs = cfg.multicast == fp8_gemm::Multicast::SharedA
                              ? pr.a_groups * row_tiles * int64_t((column_tiles + 1) / fp8_gemm::kClusterSize)
                              : max_tiles / fp8_gemm::kClusterSize;
    const int64_t clusters = std::min<int64_t>(pairs, sms / fp8_gemm::kClusterSize);
    num_ctas = fp8_gemm::kClusterSize * int(std::max<int64_t>(1, clusters));
  }
  launch(pr, cfg, num_ctas, stream);
}

}  // namespace

void fp8_gemm_force_tile(int block_m, int block_n) {
  if (block_m == 0 && block_n == 0) {
    forced_tile = Config();
    return;
  }
  bool width_known = false;
  for (int i = 0; i < fp8_gemm::kNumBlockNChoices; ++i) width_known |= fp8_gemm::block_n_choice(i) == block_n;
  if ((block_m != 64 && block_m != 128) || !width_known) {
    throw_value_error("block_m, block_n", "an instantiated tile (block_m 64 or 128, block_n one of the "
                      "fp8_gemm_config choices) or (0, 0)", std::to_string(block_m) + ", " + std::to_string(block_n));
  }
  Config forced;
  forced.block_m = block_m;
  forced.block_n = block_n;
  forced.num_math_warpgroups = block_m / 64;
  forced.num_stages = fp8_gemm::num_stages(block_m, block_n);
  forced.smem_bytes = fp8_gemm::smem_bytes(block_m, block_n);
  forced_tile = forced;
}

void fp8_gemm_force_multicast(int mode) {
  if (mode < -1 || mode > 2) {
    throw_value_error("mode", "-1 (select_config's), 0 (off), 1 (A shared) or 2 (B shared)", std::to_string(mode));
  }
  forced_multicast = mode;
}

void fp8_gemm_nt(const TensorView& a, const TensorView& sa, const TensorView& b, const TensorView& sb,
                 const TensorView& out, cudaStream_t stream) {
  require_operand(a, 2);
  require_operand(b, 2);
  const auto sa_layout = require_scales_a(sa, a, 2);
  require_scales(sb, b, 2);
  Problem pr{Layout::Plain, &a, &sa, &b, &sb, &out, sa_layout, nullptr, 1, a.size(0), b.size(0), a.size(1), 1,
             int(std::min<int64_t>(a.size(0), 1 << 30))};
  run(pr, stream);
}

void m_grouped_fp8_gemm_nt_contiguous(const TensorView& a, const TensorView& sa, const TensorView& b,
                                      const TensorView& sb, const TensorView& m_indices, const TensorView& out,
                                      cudaStream_t stream) {
  require_operand(a, 2);
  require_operand(b, 3);
  const auto sa_layout = require_scales_a(sa, a, 2);
  require_scales(sb, b, 3);
  require_same_device(a, m_indices);
  require_dtype(m_indices, DType::Int32);
  require_ndim(m_indices, 1);
  require_contiguous(m_indices);
  require_size(m_indices, 0, a.size(0), "rows of a");
  if (a.size(0) % 128 != 0) {
    throw_value_error(a.name, "M_total a multiple of GROUPED_M_ALIGNMENT = 128", "shape " + a.shape_str());
  }
  Problem pr{Layout::Contiguous, &a, &sa, &b, &sb, &out, sa_layout, m_indices.ptr<const int>(), 1, a.size(0), b.size(1),
             a.size(1), b.size(0), int(std::min<int64_t>(a.size(0), 1 << 30))};
  run(pr, stream);
}

void m_grouped_fp8_gemm_nt_masked(const TensorView& a, const TensorView& sa, const TensorView& b,
                                  const TensorView& sb, const TensorView& masked_m, int expected_m,
                                  const TensorView& out, cudaStream_t stream) {
  require_operand(a, 3);
  require_operand(b, 3);
  const auto sa_layout = require_scales_a(sa, a, 3);
  require_scales(sb, b, 3);
  require_same_device(a, masked_m);
  require_dtype(masked_m, DType::Int32);
  require_ndim(masked_m, 1);
  require_contiguous(masked_m);
  require_size(masked_m, 0, a.size(0), "groups of a");
  require_size(b, 0, a.size(0), "groups of a");
  if (expected_m <= 0) throw_value_error("expected_m", "a positive row count hint", std::to_string(expected_m));
  Problem pr{Layout::Masked, &a, &sa, &b, &sb, &out, sa_layout, masked_m.ptr<const int>(), a.size(0), a.size(1), b.size(1),
             a.size(2), b.size(0), int(std::min<int64_t>(expected_m, a.size(1)))};
  run(pr, stream);
}

}  // namespace pykernels
