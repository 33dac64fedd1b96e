// pykernels._C: one thin pybind11 module. Each binding turns its Python arguments into TensorViews and
// calls the op's launcher; validation lives in the launchers so that it runs before any launch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "common/check.h"
#include "common/py_tensor.h"
#include "fp8_gemm/fp8_gemm.h"
#include "fp8_gemm/fp8_gemm_epilogue.h"
#include "fp8_gemm/fp8_gemm_schedule.h"
#include "fp8_quant/fp8_quant.h"
#include "moe/moe.h"
#include "mla_decode/mla_decode.h"

namespace py = pybind11;
using pykernels::as_stream;
using pykernels::as_tensor;

namespace {

// What the runtime says about the machine, without ever failing: no driver and no GPU are answers.
py::dict device_info() {
  py::dict info;
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  info["runtime_version"] = runtime;
  cudaError_t status = cudaDriverGetVersion(&driver);
  info["driver_version"] = status == cudaSuccess ? py::object(py::int_(driver)) : py::none();
  status = cudaGetDeviceCount(&count);
  py::list devices;
  if (status != cudaSuccess) {
    info["error"] = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
    (void)cudaGetLastError();
    count = 0;
  } else {
    info["error"] = py::none();
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      (void)cudaGetLastError();
      continue;
    }
    py::dict d;
    d["index"] = i;
    d["name"] = std::string(prop.name);
    d["capability"] = py::make_tuple(prop.major, prop.minor);
    d["sm_count"] = prop.multiProcessorCount;
    d["total_memory"] = prop.totalGlobalMem;
    d["shared_memory_per_block_optin"] = prop.sharedMemPerBlockOptin;
    d["l2_cache_size"] = prop.l2CacheSize;
    devices.append(d);
  }
  info["devices"] = devices;
  return info;
}

// What the boundary read from a tensor-like object: used by tests to check DLPack and
// __cuda_array_interface__ parsing for every dtype, on any machine.
py::dict describe_tensor(py::handle obj) {
  auto t = as_tensor(obj, "tensor");
  py::dict d;
  d["dtype"] = pykernels::dtype_name(t.dtype);
  py::list shape, strides;
  for (int i = 0; i < t.ndim; ++i) {
    shape.append(t.shape[i]);
    strides.append(t.strides[i]);
  }
  d["shape"] = py::tuple(shape);
  d["strides"] = py::tuple(strides);
  d["device"] = t.device_str();
  d["data_ptr"] = reinterpret_cast<uintptr_t>(t.data);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels CUDA kernels for sm_90a (Hopper)";

  static py::exception<pykernels::CudaError> cuda_error(m, "CudaError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pykernels::ArgError& e) {
      PyErr_SetString(e.kind() == pykernels::ArgError::Kind::Type ? PyExc_TypeError : PyExc_ValueError, e.what());
    } catch (const pykernels::CudaError& e) {
      py::set_error(cuda_error, e.what());
    }
  });

  m.attr("compiled_archs") = py::make_tuple(PYKERNELS_CUDA_ARCHS);
  m.def("device_info", &device_info, "CUDA runtime/driver versions and the visible devices");
  m.def("describe_tensor", &describe_tensor, py::arg("tensor"), "How the boundary reads a tensor-like object");

  // ---- fp8_quant -------------------------------------------------------------------------------
  m.def(
      "per_token_group_quant_fp8",
      [](py::handle x, py::handle q, py::handle scales, int group_size, bool ue8m0, py::handle stream,
         bool column_major_scales) {
        pykernels::per_token_group_quant_fp8(as_tensor(x, "x"), as_tensor(q, "out"), as_tensor(scales, "scales"),
                                             group_size, ue8m0, column_major_scales, as_stream(stream));
      },
      py::arg("x"), py::arg("out"), py::arg("scales"), py::arg("group_size"), py::arg("ue8m0"), py::arg("stream"),
      py::arg("column_major_scales") = false);
  m.def(
      "token_group_scale_layout",
      [](int64_t rows, int64_t rows_per_batch, int64_t groups, bool column_major) {
        if (rows < 0 || rows_per_batch < 0 || groups < 0) {
          pykernels::throw_value_error("rows, rows_per_batch, groups", "non-negative counts",
                                       std::to_string(rows) + ", " + std::to_string(rows_per_batch) + ", " +
                                           std::to_string(groups));
        }
        if (rows > (1 << 24) || groups > (1 << 24) || rows * groups > (1 << 24)) {
          pykernels::throw_value_error("rows * groups", "at most 2^24 offsets to list",
                                       std::to_string(rows) + " * " + std::to_string(groups));
        }
        const auto l = pykernels::token_group_scale_layout(rows, rows_per_batch, groups, column_major);
        py::list offsets;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t g = 0; g < groups; ++g) offsets.append(l.offset(r, g));
        }
        return py::make_tuple(py::make_tuple(l.rows_per_batch, l.batch_stride, l.row_stride, l.group_stride), offsets);
      },
      py::arg("rows"), py::arg("rows_per_batch"), py::arg("groups"), py::arg("column_major"),
      "The CUDA quantizer's scale layout (rows_per_batch, batch, row and group strides) and the element offset "
      "it writes each (row, group) scale to, row by row");
  m.def(
      "per_block_quant_fp8",
      [](py::handle w, py::handle q, py::handle scales, int block_size, bool ue8m0, py::handle stream) {
        pykernels::per_block_quant_fp8(as_tensor(w, "w"), as_tensor(q, "out"), as_tensor(scales, "scales"),
                                       block_size, ue8m0, as_stream(stream));
      },
      py::arg("w"), py::arg("out"), py::arg("scales"), py::arg("block_size"), py::arg("ue8m0"), py::arg("stream"));

  // ---- fp8_gemm --------------------------------------------------------------------------------
  m.def(
      "fp8_gemm_nt",
      [](py::handle a, py::handle sa, py::handle b, py::handle sb, py::handle out, py::handle stream) {
        pykernels::fp8_gemm_nt(as_tensor(a, "a"), as_tensor(sa, "sa"), as_tensor(b, "b"), as_tensor(sb, "sb"),
                               as_tensor(out, "out"), as_stream(stream));
      },
      py::arg("a"), py::arg("sa"), py::arg("b"), py::arg("sb"), py::arg("out"), py::arg("stream"));
  m.def(
      "m_grouped_fp8_gemm_nt_contiguous",
      [](py::handle a, py::handle sa, py::handle b, py::handle sb, py::handle m_indices, py::handle out,
         py::handle stream) {
        pykernels::m_grouped_fp8_gemm_nt_contiguous(as_tensor(a, "a"), as_tensor(sa, "sa"), as_tensor(b, "b"),
                                                    as_tensor(sb, "sb"), as_tensor(m_indices, "m_indices"),
                                                    as_tensor(out, "out"), as_stream(stream));
      },
      py::arg("a"), py::arg("sa"), py::arg("b"), py::arg("sb"), py::arg("m_indices"), py::arg("out"),
      py::arg("stream"));
  m.def(
      "m_grouped_fp8_gemm_nt_masked",
      [](py::handle a, py::handle sa, py::handle b, py::handle sb, py::handle masked_m, int expected_m,
         py::handle out, py::handle stream) {
        pykernels::m_grouped_fp8_gemm_nt_masked(as_tensor(a, "a"), as_tensor(sa, "sa"), as_tensor(b, "b"),
                                                as_tensor(sb, "sb"), as_tensor(masked_m, "masked_m"), expected_m,
                                                as_tensor(out, "out"), as_stream(stream));
      },
      py::arg("a"), py::arg("sa"), py::arg("b"), py::arg("sb"), py::arg("masked_m"), py::arg("expected_m"),
      py::arg("out"), py::arg("stream"));
  m.def(
      "fp8_gemm_config",
      [](int64_t m, int64_t n, int64_t k, int64_t num_groups, int64_t num_sms, int layout) {
        using pykernels::fp8_gemm::kMaxDim;
        // select_config divides by the SM count and the block counts, and the kernel indexes rows, columns
        // and K in int: reject what would trap the process or overflow.
        const auto require_range = [](int64_t value, const char* name, int64_t high) {
          if (value < 1 || value > high) {
            pykernels::throw_value_error(name, "an int in [1, " + std::to_string(high) + "]", std::to_string(value));
          }
        };
        require_range(m, "m", kMaxDim - 1);
        require_range(n, "n", kMaxDim - 1);
        require_range(k, "k", kMaxDim - 1);
        require_range(num_groups, "num_groups", kMaxDim - 1);
        require_range(num_sms, "num_sms", 1 << 16);
        if (k % pykernels::fp8_gemm::kBlockK != 0) {
          pykernels::throw_value_error("k", "a positive multiple of 128", std::to_string(k));
        }
        if (layout < 0 || layout > 2) {
          pykernels::throw_value_error("layout", "0 (plain), 1 (contiguous) or 2 (masked)", std::to_string(layout));
        }
        const auto c = pykernels::fp8_gemm::select_config(int(m), int(n), int(k), int(num_groups), int(num_sms),
                                                          static_cast<pykernels::fp8_gemm::Layout>(layout));
        py::dict d;
        d["block_m"] = c.block_m;
        d["block_n"] = c.block_n;
        d["block_k"] = pykernels::fp8_gemm::kBlockK;
        d["num_math_warpgroups"] = c.num_math_warpgroups;
        d["num_stages"] = c.num_stages;
        d["raster_group"] = c.raster_group;
        d["num_tiles"] = c.num_tiles;
        d["num_waves"] = c.num_waves;
        d["wave_utilization"] = c.wave_utilization;
        d["smem_bytes"] = c.smem_bytes;
        d["multicast"] = int(c.multicast);
        return d;
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_groups"), py::arg("num_sms"), py::arg("layout") = 0,
      "The CUDA kernel's tile configuration for num_groups GEMMs of m x n x k on num_sms SMs in a layout (0 plain, "
      "1 contiguous, 2 masked); multicast: 0 off, 1 A shared by a 2-CTA cluster, 2 B shared");
  m.def(
      "fp8_gemm_tile_order",
      [](int layout, int m_rows, int n, int num_groups, int block_m, int block_n, int num_ctas,
         std::vector<int> group_info, bool include_zero_tiles) {
        using namespace pykernels::fp8_gemm;
        if (layout < 0 || layout > 2) {
          pykernels::throw_value_error("layout", "0 (plain), 1 (contiguous) or 2 (masked)", std::to_string(layout));
        }
        if (block_m <= 0 || block_n <= 0 || m_rows < 0 || n < 0 || num_groups < 0 || num_ctas < 0) {
          pykernels::throw_value_error("block_m, block_n, m_rows, n, num_groups, num_ctas",
                                       "positive tile sizes and non-negative counts",
                                       std::to_string(block_m) + ", " + std::to_string(block_n) + ", " +
                                           std::to_string(m_rows) + ", " + std::to_string(n) + ", " +
                                           std::to_string(num_groups) + ", " + std::to_string(num_ctas));
        }
        const size_t needed = layout == 1 ? size_t(m_rows) : layout == 2 ? size_t(num_groups) : 0;
        if (group_info.size() < needed) {
          pykernels::throw_value_error("group_info", std::to_string(needed) + " entries",
                                       std::to_string(group_info.size()));
        }
        py::list per_cta;
        for (int cta = 0; cta < num_ctas; ++cta) {
          Scheduler s(static_cast<Layout>(layout), m_rows, n, num_groups, block_m, block_n, kRasterGroup,
                      group_info.data(), cta, num_ctas);
          py::list tiles;
          Tile t;
          while (s.next(t)) {
            if (include_zero_tiles) {
              tiles.append(py::make_tuple(t.group, t.m_block, t.n_block, s.valid_rows(t), t.zero));
            } else if (!t.zero) {
              tiles.append(py::make_tuple(t.group, t.m_block, t.n_block, s.valid_rows(t)));
            }
          }
          per_cta.append(tiles);
        }
        return per_cta;
      },
      py::arg("layout"), py::arg("m_rows"), py::arg("n"), py::arg("num_groups"), py::arg("block_m"),
      py::arg("block_n"), py::arg("num_ctas"), py::arg("group_info"), py::arg("include_zero_tiles") = false,
      "The persistent scheduler's computed tiles (group, m_block, n_block, valid_rows), per CTA, in visiting "
      "order; with include_zero_tiles, every tile as (group, m_block, n_block, valid_rows, zero)");
  m.def(
      "fp8_gemm_cluster_steps",
      [](int layout, int m_rows, int n, int k, int num_groups, int block_m, int block_n, int num_ctas,
         std::vector<int> group_info, int multicast, bool sa_by_tma) {
        using namespace pykernels::fp8_gemm;
        if (layout < 0 || layout > 2) {
          pykernels::throw_value_error("layout", "0 (plain), 1 (contiguous) or 2 (masked)", std::to_string(layout));
        }
        if (multicast < 0 || multicast > 2) {
          pykernels::throw_value_error("multicast", "0 (off), 1 (A shared) or 2 (B shared)", std::to_string(multicast));
        }
        const auto mode = static_cast<Multicast>(multicast);
        const int cluster = mode == Multicast::Off ? 1 : kClusterSize;
        if (block_m <= 0 || block_n <= 0 || m_rows < 0 || n < 0 || k < 0 || num_groups < 0 || num_ctas <= 0 ||
            num_ctas % cluster != 0) {
          pykernels::throw_value_error("block_m, block_n, m_rows, n, k, num_groups, num_ctas",
                                       "positive tile sizes, non-negative counts and a positive num_ctas, even with "
                                       "multicast", std::to_string(block_m) + ", " + std::to_string(block_n) + ", " +
                                           std::to_string(m_rows) + ", " + std::to_string(n) + ", " +
                                           std::to_string(k) + ", " + std::to_string(num_groups) + ", " +
                                           std::to_string(num_ctas));
        }
        if (k % kBlockK != 0) pykernels::throw_value_error("k", "a multiple of 128", std::to_string(k));
        const auto layout_kind = static_cast<Layout>(layout);
        if (!multicast_allowed(mode, layout_kind, ceil_div(m_rows, block_m), block_n)) {
          pykernels::throw_value_error("multicast", "a mode this shape allows (multicast_allowed)",
                                       std::to_string(multicast));
        }
        const size_t needed = layout == 1 ? size_t(m_rows) : layout == 2 ? size_t(num_groups) : 0;
        if (group_info.size() < needed) {
          pykernels::throw_value_error("group_info", std::to_string(needed) + " entries",
                                       std::to_string(group_info.size()));
        }
        const int k_blocks = k / kBlockK;
        const auto load = [](const char* operand, const OperandLoad& l, int row_bytes) {
          return py::make_tuple(operand, l.group, l.row, l.smem_row, l.rows, int(l.cta_mask), l.rows * row_bytes);
        };
        py::list per_cta;
        for (int cta = 0; cta < num_ctas; ++cta) {
          Scheduler s(layout_kind, m_rows, n, num_groups, block_m, block_n, kRasterGroup, group_info.data(), cta,
                      num_ctas, mode);
          py::list steps;
          Tile t;
          while (s.next(t)) {
            py::list loads;
            if (tile_k_blocks(t, k_blocks) > 0) {
              const TileLoads l = tile_loads(layout_kind, mode, t, block_m, block_n, s.rank);
              loads.append(load("a", l.a, kBlockK));
              if (!t.load_only) loads.append(load("b", l.b, kBlockK));
              if (sa_by_tma) loads.append(load("sa", l.sa, 4));
            }
            steps.append(py::make_tuple(t.group, t.m_block, t.n_block, t.zero, t.load_only,
                                        tile_k_blocks(t, k_blocks),
                                        stage_tx_bytes(block_m, block_n, sa_by_tma, t.load_only), loads));
          }
          per_cta.append(steps);
        }
        return per_cta;
      },
      py::arg("layout"), py::arg("m_rows"), py::arg("n"), py::arg("k"), py::arg("num_groups"), py::arg("block_m"),
      py::arg("block_n"), py::arg("num_ctas"), py::arg("group_info"), py::arg("multicast"), py::arg("sa_by_tma"),
      "Every CTA's walk as the kernel's producer sees it: per tile (group, m_block, n_block, zero, load_only, "
      "k_blocks, stage transaction bytes, [(operand, group, row, smem_row, rows, cta_mask, bytes) per stage load])");
  m.def(
      "fp8_gemm_split_columns",
      [](int n0, int block_n) {
        if (block_n <= 0 || n0 < 0 || n0 % block_n != 0) {
          pykernels::throw_value_error("n0, block_n", "block_n > 0 and n0 a non-negative multiple of it",
                                       std::to_string(n0) + ", " + std::to_string(block_n));
        }
        return pykernels::fp8_gemm::split_columns(n0, block_n);
      },
      py::arg("n0"), py::arg("block_n"),
      "Columns of the tile starting at n0 that take B's scale block n0 / 128 (the rest take the next one)");
  m.def(
      "fp8_gemm_scale_a_layout",
      [](std::vector<int64_t> shape, std::vector<int64_t> strides) {
        if (shape.size() != strides.size()) {
          pykernels::throw_value_error("strides", std::to_string(shape.size()) + " entries (one per dimension)",
                                       std::to_string(strides.size()));
        }
        return int(pykernels::fp8_gemm::scale_a_layout(int(shape.size()), shape.data(), strides.data()));
      },
      py::arg("shape"), py::arg("strides"),
      "The A-scale layout the launchers see in these element strides: 0 row-major, 1 MN-major, -1 neither");
  m.def(
      "fp8_gemm_scale_a_offset",
      [](int layout, int64_t group, int64_t row, int64_t kb, int64_t m_rows, int64_t k_blocks) {
        if (layout != 0 && layout != 1) {
          pykernels::throw_value_error("layout", "0 (row-major) or 1 (MN-major)", std::to_string(layout));
        }
        return pykernels::fp8_gemm::scale_a_offset(static_cast<pykernels::fp8_gemm::ScaleALayout>(layout), group,
                                                   row, kb, m_rows, k_blocks);
      },
      py::arg("layout"), py::arg("group"), py::arg("row"), py::arg("kb"), py::arg("m_rows"), py::arg("k_blocks"),
      "Element offset of the A scale (group, row, K block) in a layout, as the kernel computes it");
  m.def(
      "fp8_gemm_block_n_choices",
      []() {
        py::list widths;
        for (int i = 0; i < pykernels::fp8_gemm::kNumBlockNChoices; ++i) {
          widths.append(pykernels::fp8_gemm::block_n_choice(i));
        }
        return widths;
      },
      "Every BLOCK_N the extension instantiates (each for BLOCK_M 64 and 128)");
  // The epilogue's output tile: stmatrix addresses and the TMA box layout they must match.
  const auto require_output_width = [](int block_n) {
    for (int i = 0; i < pykernels::fp8_gemm::kNumBlockNChoices; ++i) {
      if (pykernels::fp8_gemm::block_n_choice(i) == block_n) return;
    }
    pykernels::throw_value_error("block_n", "an instantiated BLOCK_N (fp8_gemm_block_n_choices)",
                                 std::to_string(block_n));
  };
  m.def(
      "fp8_gemm_output_tile",
      [require_output_width](int block_n) {
        using namespace pykernels::fp8_gemm;
        require_output_width(block_n);
        py::dict d;
        d["rows"] = kOutputRows;
        d["swizzle_bytes"] = output_swizzle_bytes(block_n);
        d["box_cols"] = output_box_cols(block_n);
        d["boxes"] = output_boxes(block_n);
        d["tile_bytes"] = output_tile_bytes(block_n);
        return d;
      },
      py::arg("block_n"),
      "One math warpgroup's output tile for a width: rows, the tensor map's swizzle span (0: none), box "
      "columns, boxes per tile and bytes");
  m.def(
      "fp8_gemm_output_tile_offset",
      [require_output_width](int block_n, int row, int col) {
        require_output_width(block_n);
        if (row < 0 || row >= pykernels::fp8_gemm::kOutputRows || col < 0 || col >= block_n) {
          pykernels::throw_value_error("row, col", "a row in [0, 64) and a column in [0, block_n)",
                                       std::to_string(row) + ", " + std::to_string(col));
        }
        return pykernels::fp8_gemm::output_tile_offset(block_n, row, col);
      },
      py::arg("block_n"), py::arg("row"), py::arg("col"),
      "Byte offset of element (row, col) in a warpgroup's output tile, as the kernel places it");
  m.def(
      "fp8_gemm_stsm_lane_offset",
      [require_output_width](int block_n, int warp, int lane, int chunk) {
        require_output_width(block_n);
        if (warp < 0 || warp >= 4 || lane < 0 || lane >= 32 || chunk < 0 || chunk >= block_n / 8) {
          pykernels::throw_value_error("warp, lane, chunk", "a warp in [0, 4), a lane in [0, 32) and a chunk in "
                                       "[0, block_n / 8)", std::to_string(warp) + ", " + std::to_string(lane) +
                                       ", " + std::to_string(chunk));
        }
        return pykernels::fp8_gemm::stsm_lane_offset(block_n, warp, lane, chunk);
      },
      py::arg("block_n"), py::arg("warp"), py::arg("lane"), py::arg("chunk"),
      "The byte offset in the output tile that a lane addresses in the epilogue's stmatrix of 8-column "
      "chunk `chunk` (and chunk + 1 for an x4)");
  m.def(
      "fp8_gemm_tma_box_offset",
      [](int swizzle_bytes, int row_bytes, int row, int byte) {
        if ((swizzle_bytes != 0 && swizzle_bytes != 32 && swizzle_bytes != 64 && swizzle_bytes != 128) ||
            row_bytes <= 0 || row_bytes % 16 != 0 || (swizzle_bytes != 0 && row_bytes > swizzle_bytes) || row < 0 ||
            byte < 0 || byte >= row_bytes) {
          pykernels::throw_value_error("swizzle_bytes, row_bytes, row, byte",
                                       "a span of 0, 32, 64 or 128, rows a multiple of 16 bytes up to the span, a "
                                       "row >= 0 and a byte within the row",
                                       std::to_string(swizzle_bytes) + ", " + std::to_string(row_bytes) + ", " +
                                           std::to_string(row) + ", " + std::to_string(byte));
        }
        return pykernels::fp8_gemm::tma_box_offset(swizzle_bytes, row_bytes, row, byte);
      },
      py::arg("swizzle_bytes"), py::arg("row_bytes"), py::arg("row"), py::arg("byte"),
      "Where TMA places byte `byte` of box row `row` in shared memory under a swizzle span");
  m.def(
      "fp8_gemm_output_tma_storable",
      [](int64_t n, uint64_t address) { return pykernels::fp8_gemm::output_tma_storable(n, uintptr_t(address)); },
      py::arg("n"), py::arg("address"),
      "Whether the launcher stores an output of N columns at this address with TMA (else from registers)");
  m.def("fp8_gemm_force_tile", &pykernels::fp8_gemm_force_tile, py::arg("block_m"), py::arg("block_n"),
        "Test hook: later launches use this tile shape; (0, 0) restores the heuristic");
  m.def("fp8_gemm_force_multicast", &pykernels::fp8_gemm_force_multicast, py::arg("mode"),
        "Test hook: later launches use this multicast mode (0 off, 1 A, 2 B shared); -1 restores the heuristic");

  // ---- moe -------------------------------------------------------------------------------------------
  // An optional tensor argument (scales): None, or a view that lives in `slot`.
  const auto optional_tensor = [](py::handle obj, const std::string& name,
                                  pykernels::TensorView& slot) -> const pykernels::TensorView* {
    if (obj.is_none()) return nullptr;
    slot = as_tensor(obj, name);
    return &slot;
  };
  m.def(
      "moe_dispatch_layout",
      [](py::handle topk_idx, py::handle per_rank, py::handle per_expert, py::handle slots, int num_experts,
         py::handle stream) {
        pykernels::moe_dispatch_layout(as_tensor(topk_idx, "topk_idx"), as_tensor(per_rank, "num_tokens_per_rank"),
                                       as_tensor(per_expert, "num_tokens_per_expert"), as_tensor(slots, "token_slots"),
                                       num_experts, as_stream(stream));
      },
      py::arg("topk_idx"), py::arg("per_rank"), py::arg("per_expert"), py::arg("slots"), py::arg("num_experts"),
      py::arg("stream"));
  m.def(
      "moe_pack",
      [optional_tensor](py::handle x, py::handle x_scales, py::handle topk_idx, py::handle topk_weights,
                        py::handle slots,
         py::handle send_offsets, py::handle send_x, py::handle meta, int num_local, bool quantize, py::handle stream) {
        pykernels::TensorView scales_view;
        pykernels::moe_pack(as_tensor(x, "x"), optional_tensor(x_scales, "x_scales", scales_view),
                            as_tensor(topk_idx, "topk_idx"), as_tensor(topk_weights, "topk_weights"),
                            as_tensor(slots, "token_slots"), as_tensor(send_offsets, "send_offsets"),
                            as_tensor(send_x, "send_x"), as_tensor(meta, "send_meta"), num_local, quantize,
                            as_stream(stream));
      },
      py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("slots"),
      py::arg("send_offsets"), py::arg("send_x"), py::arg("meta"), py::arg("num_local"), py::arg("quantize"),
      py::arg("stream"));
  m.def(
      "moe_combine_reduce",
      [](py::handle buf, py::handle slots, py::handle send_offsets, py::handle out, py::handle stream) {
        pykernels::moe_combine_reduce(as_tensor(buf, "buf"), as_tensor(slots, "token_slots"),
                                      as_tensor(send_offsets, "send_offsets"), as_tensor(out, "out"), as_stream(stream));
      },
      py::arg("buf"), py::arg("slots"), py::arg("send_offsets"), py::arg("out"), py::arg("stream"));
  m.def(
      "moe_expert_ranks",
      [](py::handle topk_idx, py::handle counts, py::handle rank, py::handle chunk_counts, py::handle stream) {
        pykernels::moe_expert_ranks(as_tensor(topk_idx, "recv_topk_idx"), as_tensor(counts, "counts"),
                                    as_tensor(rank, "rank"), as_tensor(chunk_counts, "chunk_counts"),
                                    as_stream(stream));
      },
      py::arg("topk_idx"), py::arg("counts"), py::arg("rank"), py::arg("chunk_counts"), py::arg("stream"));
  m.def("moe_expert_rank_chunks", &pykernels::moe_expert_rank_chunks, py::arg("num_pairs"),
        "CTAs of the expert-ranks kernels for num_pairs pairs (rows of their chunk_counts workspace)");
  m.def(
      "moe_ll_pack",
      [](py::handle x, py::handle topk_idx, py::handle send, int num_experts, int world, int64_t max_tokens,
         int scale_word, int id_word, bool fp8, py::handle stream) {
        pykernels::moe_ll_pack(as_tensor(x, "x"), as_tensor(topk_idx, "topk_idx"), as_tensor(send, "send"),
                               num_experts, world, max_tokens, scale_word, id_word, fp8, as_stream(stream));
      },
      py::arg("x"), py::arg("topk_idx"), py::arg("send"), py::arg("num_experts"), py::arg("world"),
      py::arg("max_tokens"), py::arg("scale_word"), py::arg("id_word"), py::arg("fp8"), py::arg("stream"));
  m.def(
      "moe_ll_unpack",
      [optional_tensor](py::handle recv, py::handle pos, py::handle out_x, py::handle out_s, int scale_word,
                        int id_word, py::handle stream) {
        pykernels::TensorView scales_view;
        pykernels::moe_ll_unpack(as_tensor(recv, "recv"), as_tensor(pos, "pos"), as_tensor(out_x, "recv_x"),
                                 optional_tensor(out_s, "recv_scales", scales_view), scale_word, id_word,
                                 as_stream(stream));
      },
      py::arg("recv"), py::arg("pos"), py::arg("out_x"), py::arg("out_s"), py::arg("scale_word"), py::arg("id_word"),
      py::arg("stream"));
  m.def(
      "moe_ll_combine_pack",
      [](py::handle y, py::handle recv, py::handle pos, py::handle ret, int id_word, py::handle stream) {
        pykernels::moe_ll_combine_pack(as_tensor(y, "y"), as_tensor(recv, "recv"), as_tensor(pos, "pos"),
                                       as_tensor(ret, "ret"), id_word, as_stream(stream));
      },
      py::arg("y"), py::arg("recv"), py::arg("pos"), py::arg("ret"), py::arg("id_word"), py::arg("stream"));
  m.def(
      "moe_ll_combine_reduce",
      [](py::handle returned, py::handle topk_idx, py::handle weights, py::handle out, int num_experts,
         py::handle stream) {
        pykernels::moe_ll_combine_reduce(as_tensor(returned, "returned"), as_tensor(topk_idx, "topk_idx"),
                                         as_tensor(weights, "topk_weights"), as_tensor(out, "out"), num_experts,
                                         as_stream(stream));
      },
      py::arg("returned"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("out"), py::arg("num_experts"),
      py::arg("stream"));
  m.def("moe_ll_send_row", &pykernels::moe_ll_send_row, py::arg("rank"), py::arg("token"), py::arg("max_tokens"));
  m.def("moe_ll_expert_row", &pykernels::moe_ll_expert_row, py::arg("expert"), py::arg("pos"),
        py::arg("num_local"), py::arg("rows"));
  m.def("moe_ll_return_row", &pykernels::moe_ll_return_row, py::arg("rank"), py::arg("token"), py::arg("slot"),
        py::arg("max_tokens"), py::arg("topk"));
  m.def(
      "moe_permute",
      [optional_tensor](py::handle x, py::handle x_scales, py::handle topk_idx, py::handle rank, py::handle starts,
         py::handle x_sorted, py::handle s_sorted, py::handle m_indices, py::handle pos, py::handle stream) {
        pykernels::TensorView scales_view, sorted_scales_view;
        pykernels::moe_permute(as_tensor(x, "recv_x"), optional_tensor(x_scales, "recv_scales", scales_view),
                               as_tensor(topk_idx, "recv_topk_idx"), as_tensor(rank, "rank"),
                               as_tensor(starts, "starts"), as_tensor(x_sorted, "x_sorted"),
                               optional_tensor(s_sorted, "s_sorted", sorted_scales_view),
                               as_tensor(m_indices, "m_indices"), as_tensor(pos, "perm"), as_stream(stream));
      },
      py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("rank"), py::arg("starts"),
      py::arg("x_sorted"), py::arg("s_sorted"), py::arg("m_indices"), py::arg("pos"), py::arg("stream"));
  m.def(
      "moe_unpermute",
      [](py::handle y_sorted, py::handle pos, py::handle weights, py::handle out, py::handle stream) {
        pykernels::moe_unpermute(as_tensor(y_sorted, "y_sorted"), as_tensor(pos, "perm"),
                                 as_tensor(weights, "recv_topk_weights"), as_tensor(out, "out"), as_stream(stream));
      },
      py::arg("y_sorted"), py::arg("pos"), py::arg("weights"), py::arg("out"), py::arg("stream"));
  m.def(
      "moe_plan_dispatch_layout",
      [](py::handle topk_idx, py::handle per_rank, py::handle per_expert, py::handle slots, int num_experts) {
        pykernels::moe_plan_dispatch_layout(as_tensor(topk_idx, "topk_idx"), as_tensor(per_rank, "per_rank"),
                                            as_tensor(per_expert, "per_expert"), as_tensor(slots, "slots"),
                                            num_experts);
      },
      py::arg("topk_idx"), py::arg("per_rank"), py::arg("per_expert"), py::arg("slots"), py::arg("num_experts"),
      "The dispatch layout computed on the host with the kernels' index math (CPU tensors)");
  m.def(
      "moe_plan_expert_ranks",
      [](py::handle topk_idx, py::handle counts, py::handle rank) {
        pykernels::moe_plan_expert_ranks(as_tensor(topk_idx, "topk_idx"), as_tensor(counts, "counts"),
                                         as_tensor(rank, "rank"));
      },
      py::arg("topk_idx"), py::arg("counts"), py::arg("rank"),
      "Rows per local expert and each pair's rank within its expert, on the host (CPU tensors)");
  m.def(
      "moe_plan_permute",
      [](py::handle topk_idx, py::handle rank, py::handle starts, py::handle m_indices, py::handle pos) {
        pykernels::moe_plan_permute(as_tensor(topk_idx, "topk_idx"), as_tensor(rank, "rank"),
                                    as_tensor(starts, "starts"), as_tensor(m_indices, "m_indices"),
                                    as_tensor(pos, "pos"));
      },
      py::arg("topk_idx"), py::arg("rank"), py::arg("starts"), py::arg("m_indices"), py::arg("pos"),
      "The expert-sorted row of every pair and the m_indices it implies, on the host (CPU tensors)");
  m.def("moe_padded_rows", &pykernels::moe_padded_rows, py::arg("count"), py::arg("alignment"),
        "Rows an expert segment of `count` rows takes once padded to `alignment`");

  // ---- mla_decode ------------------------------------------------------------------------------
  m.def("mla_layouts_consistent", &pykernels::mla_layouts_consistent,
        "Host check that the MLA kernel's shared-memory views, TMA boxes and accumulator row map agree with CuTe's "
        "layouts");
  m.def("mla_page_boxes", &pykernels::mla_page_boxes, py::arg("block_id"),
        "TMA coordinates (column, row) of the boxes the CUDA kernel loads for cache page block_id");
  m.def("mla_q_boxes", &pykernels::mla_q_boxes, py::arg("request"), py::arg("row_block"),
        "TMA coordinates (column, row, request) of the boxes of one 64-row query tile");
  m.def("mla_valid_tokens", &pykernels::mla_valid_tokens, py::arg("seqlen"), py::arg("page"),
        "Tokens of a page that hold keys (0..64); the CUDA kernel zeroes the rest and loads nothing at 0");
  m.def(
      "mla_shared_plan",
      [](bool fp8) {
        py::dict plan;
        for (const auto& region : pykernels::mla_shared_plan(fp8)) {
          plan[py::str(region.name)] = py::make_tuple(region.offset, region.bytes);
        }
        return plan;
      },
      py::arg("fp8"),
      "The split kernel's shared-memory plan: {region: (byte offset, bytes)}, and 'launch': (0, bytes requested)");
  m.def("mla_load_distance", &pykernels::mla_load_distance,
        "Pages ahead of the consumed one whose loads the split kernel has issued (a step reads both stages)");
  m.def("mla_page_stage", &pykernels::mla_page_stage, py::arg("seq"),
        "(stage, barrier parity) of a part's page seq in the split kernel's two-stage pipeline");
  m.def("mla_combined_requests", &pykernels::mla_combined_requests, py::arg("split_offsets"),
        "Per request, whether the combine kernel merges it (more than one split) or skips it");
  m.def(
      "mla_plan_splits",
      [](const std::vector<int>& seqlens, int num_parts) {
        std::vector<int> part_splits, splits, split_offsets;
        pykernels::mla_plan_splits_host(seqlens, num_parts, part_splits, splits, split_offsets);
        py::list split_list;
        for (int g = 0; g < split_offsets.back(); ++g) {
          split_list.append(py::make_tuple(splits[4 * g], splits[4 * g + 1], splits[4 * g + 2], splits[4 * g + 3]));
        }
        return py::make_tuple(part_splits, split_list, split_offsets);
      },
      py::arg("seqlens"), py::arg("num_parts"),
      "The split-KV plan the CUDA kernels run, computed on the host: (part_splits, splits, split_offsets)");
  m.def(
      "mla_plan_splits_device",
      [](py::handle seqlens, py::handle part_splits, py::handle splits, py::handle split_offsets, py::handle stream) {
        pykernels::mla_plan_splits_device(as_tensor(seqlens, "cache_seqlens"), as_tensor(part_splits, "part_splits"),
                                          as_tensor(splits, "splits"), as_tensor(split_offsets, "split_offsets"),
                                          as_stream(stream));
      },
      py::arg("cache_seqlens"), py::arg("part_splits"), py::arg("splits"), py::arg("split_offsets"), py::arg("stream"));
  m.def(
      "mla_decode",
      [](py::handle q, py::handle kv_cache, py::handle block_table, py::handle seqlens, py::handle kv_scale,
         py::handle part_splits, py::handle splits, py::handle split_offsets, py::handle out, py::handle lse,
         py::handle out_partial, py::handle lse_partial, float softmax_scale, bool causal, py::handle stream) {
        pykernels::TensorView scale_view;
        if (!kv_scale.is_none()) scale_view = as_tensor(kv_scale, "kv_scale");
        pykernels::mla_decode(as_tensor(q, "q"), as_tensor(kv_cache, "kv_cache"), as_tensor(block_table, "block_table"),
                              as_tensor(seqlens, "cache_seqlens"), kv_scale.is_none() ? nullptr : &scale_view,
                              as_tensor(part_splits, "part_splits"), as_tensor(splits, "splits"),
                              as_tensor(split_offsets, "split_offsets"), as_tensor(out, "out"), as_tensor(lse, "lse"),
                              as_tensor(out_partial, "out_partial"), as_tensor(lse_partial, "lse_partial"),
                              softmax_scale, causal, as_stream(stream));
      },
      py::arg("q"), py::arg("kv_cache"), py::arg("block_table"), py::arg("cache_seqlens"), py::arg("kv_scale"),
      py::arg("part_splits"), py::arg("splits"), py::arg("split_offsets"), py::arg("out"), py::arg("lse"),
      py::arg("out_partial"), py::arg("lse_partial"), py::arg("softmax_scale"), py::arg("causal"), py::arg("stream"));
}
