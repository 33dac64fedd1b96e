// First: CUTLASS's cuda_host_adapter.hpp includes cudaTypedefs.h inside namespace cutlass.
#include "common/tensor_map.h"

#include "mla_decode/mla_decode.cuh"
#include "mla_decode/mla_decode.h"

#include <climits>
#include <cmath>
#include <string>
#include <utility>

namespace pykernels {
namespace {

void require_int32_vector(const TensorView& t, int64_t size, const std::string& what) {
  require_dtype(t, DType::Int32);
  require_ndim(t, 1);
  require_contiguous(t);
  require_size(t, 0, size, what);
}

// Launches `kernel` with programmatic stream serialization: it may start before the previous kernel in the
// stream has finished (once that one signals, or exits), and must wait (griddepcontrol.wait) before reading
// anything that kernel writes. Captured into a CUDA graph, the attribute becomes a programmatic edge.
template <typename... KernelArgs, typename... Args>
void launch_programmatic(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, int smem_bytes, cudaStream_t stream,
                         Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  PK_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// The split kernel waits for its predecessor (the planner, or whatever wrote q and the cache) after its
// prologue; the combine's CTAs start while the split kernel's last CTAs finish and all wait for it, so that
// the combine's completion implies the split kernel's; those of requests with one split then exit.
template <bool kFp8>
void launch_decode(const CUtensorMap& tma_q, const CUtensorMap& tma_kv, const mla::Params& params, int m_blocks,
                   int num_parts, cudaStream_t stream) {
  constexpr int smem_bytes = mla::launch_shared_bytes<kFp8>();
  static_assert(smem_bytes <= 232448, "shared memory exceeds the 227 KB a Hopper CTA may use");
  PK_CUDA_CHECK(cudaFuncSetAttribute(mla::mla_decode_kernel<kFp8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     smem_bytes));
  launch_programmatic(mla::mla_decode_kernel<kFp8>, dim3(m_blocks, num_parts), dim3(mla::kThreads), smem_bytes,
                      stream, tma_q, tma_kv, params);
}

void launch_combine(const mla::Params& params, int64_t b, int64_t rows, cudaStream_t stream) {
  launch_programmatic(mla::mla_combine_kernel, dim3(static_cast<unsigned>(b), static_cast<unsigned>(rows)),
                      dim3(mla::kCombineThreads), 0, stream, static_cast<const int*>(params.split_offsets),
                      static_cast<const float*>(params.out_partial), static_cast<const float*>(params.lse_partial),
                      params.out, params.lse, params.s_q, params.h_q);
}

// q [b, s_q, h_q, 576] as [b, rows, 576]: one box is a 64-row query tile's 64-column slice; rows past a
// request's end are out of range and arrive as zeros.
CUtensorMap make_q_map(const TensorView& q, int64_t b, int64_t rows) {
  const cuuint64_t dims[3] = {cuuint64_t(mla::kHeadDimK), cuuint64_t(rows), cuuint64_t(b)};
  const cuuint64_t strides[2] = {cuuint64_t(mla::kHeadDimK * 2), cuuint64_t(rows * mla::kHeadDimK * 2)};
  const cuuint32_t box[3] = {mla::kBoxCols, mla::kRowsPerTile, 1};
  return encode_tensor_map("q", CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, q.data, dims, strides, box,
                           CU_TENSOR_MAP_SWIZZLE_128B);
}

// The bf16 cache [num_blocks, 64, 1, 576] as [num_blocks * 64, 576]: a page is 9 boxes of 64 x 64.
CUtensorMap make_kv_map(const TensorView& kv_cache, int64_t num_blocks) {
  const cuuint64_t dims[2] = {cuuint64_t(mla::kHeadDimK), cuuint64_t(num_blocks * mla::kPageSize)};
  const cuuint64_t strides[1] = {cuuint64_t(mla::kHeadDimK * 2)};
  const cuuint32_t box[2] = {mla::kBoxCols, mla::kPageSize};
  return encode_tensor_map("kv_cache", CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, kv_cache.data, dims, strides, box,
                           CU_TENSOR_MAP_SWIZZLE_128B);
}

}  // namespace

bool mla_layouts_consistent() {
  // V's MN-major view and K's K-major view must address the same bytes.
  const mla::LayoutK layout_k{};
  const mla::LayoutV layout_v{};
  for (int t = 0; t < mla::kPageSize; ++t) {
    for (int d = 0; d < mla::kHeadDimV; ++d) {
      if (layout_k(t, d) != layout_v(d, t)) return false;
    }
  }
  // The kernel addresses a tile through a swizzled shared-memory pointer; TMA box `tile` lands at
  // tile * 8 KB with SWIZZLE_128B: 128-byte rows, 16-byte chunk j of row r stored at chunk j ^ (r % 8) (for a
  // 1024-byte aligned base, which the kernel's base is). Both Q and K tiles must be that image.
  alignas(1024) static mla::bf16 buffer[mla::kPageSize * mla::kHeadDimK];
  const auto base = reinterpret_cast<const char*>(buffer);
  auto tma_image = [&](auto tensor) {
    for (int r = 0; r < mla::kPageSize; ++r) {
      for (int c = 0; c < mla::kHeadDimK; ++c) {
        const int tile = c / mla::kBoxCols, byte = r * 128 + (c % mla::kBoxCols) * 2;
        const int want = tile * mla::kBoxBytes + (byte ^ (((byte >> 7) & 7) << 4));
        if (reinterpret_cast<const char*>(&tensor(r, c)) - base != want) return false;
      }
    }
    return true;
  };
  if (!tma_image(cute::make_tensor(cute::make_smem_ptr(buffer), mla::LayoutK{})) ||
      !tma_image(cute::make_tensor(cute::make_smem_ptr(buffer), mla::LayoutQ{}))) {
    return false;
  }
  // P written over a stage's RoPE box (bf16 cache): P(row, token) must be the byte K(row, 512 + token) of the
  // box it replaces, so that P's descriptors read exactly that box and nothing of V's 512 columns.
  const auto tile_k = cute::make_tensor(cute::make_smem_ptr(buffer), mla::LayoutK{});
  const auto tile_p = cute::make_tensor(cute::make_smem_ptr(buffer + mla::kPBox * mla::kPageSize * mla::kBoxCols),
                                        mla::LayoutP{});
  for (int r = 0; r < mla::kRowsPerTile; ++r) {
    for (int c = 0; c < mla::kPageSize; ++c) {
      if (&tile_p(r, c) != &tile_k(r, mla::kHeadDimV + c)) return false;
    }
  }
  // The softmax and the epilogue address rows as first_row(thread) + 8 * row_slot(value); the (M, N) index
  // is column-major, so column + 1 is index + M.
  auto rows_match = [](auto tv, int m) {
    for (int thr = 0; thr < 128; ++thr) {
      for (int v = 0; v < int(cute::size<1>(tv)); ++v) {
        if (int(tv(thr, v)) % m != mla::first_row(thr) + 8 * mla::row_slot(v)) return false;
        // Pairs (v even, v + 1) are adjacent columns of one row: P and the output are stored in pairs.
        if (v % 2 == 1 && int(tv(thr, v)) != int(tv(thr, v - 1)) + m) return false;
      }
    }
    return true;
  };
  return rows_match(mla::MmaS{}.get_layoutC_TV(), mla::kRowsPerTile) &&
         rows_match(mla::MmaO{}.get_layoutC_TV(), mla::kRowsPerTile);
}

std::vector<std::pair<int, int>> mla_page_boxes(int block_id) {
  std::vector<std::pair<int, int>> boxes;
  for (int t = 0; t < mla::kColTiles; ++t) {
    const mla::PageBox box = mla::page_box(block_id, t);
    boxes.emplace_back(box.col, box.row);
  }
  return boxes;
}

std::vector<std::array<int, 3>> mla_q_boxes(int request, int row_block) {
  std::vector<std::array<int, 3>> boxes;
  for (int t = 0; t < mla::kColTiles; ++t) {
    const mla::QBox box = mla::q_box(request, row_block, t);
    boxes.push_back({box.col, box.row, box.request});
  }
  return boxes;
}

int mla_valid_tokens(int seqlen, int page) { return mla::valid_tokens_of(seqlen, page); }

namespace {
template <bool kFp8>
std::vector<MlaSharedRegion> shared_plan() {
  using Storage = mla::SharedStorage<kFp8>;
  alignas(1024) static Storage storage;
  const auto at = [&](const void* field) {
    return static_cast<int64_t>(reinterpret_cast<const char*>(field) - reinterpret_cast<const char*>(&storage));
  };
  constexpr int64_t tile_bytes = sizeof(storage.kv.tile[0]);
  std::vector<MlaSharedRegion> plan{{"q", at(storage.q), sizeof(storage.q)}};
  for (int s = 0; s < static_cast<int>(sizeof(storage.kv.tile) / tile_bytes); ++s) {
    plan.push_back({"tile" + std::to_string(s), at(storage.kv.tile[s]), tile_bytes});
  }
  if constexpr (kFp8) {
    for (int s = 0; s < mla::kStages; ++s) {
      plan.push_back({"raw" + std::to_string(s), at(mla::raw_of(storage, s)), mla::kPageBytesFp8});
    }
  }
  for (int s = 0; s < mla::kStages; ++s) {
    plan.push_back({"p" + std::to_string(s), at(mla::p_tile<kFp8>(storage, s)), mla::kBoxBytes});
  }
  plan.push_back({"row_part", at(storage.row_part), sizeof(storage.row_part)});
  plan.push_back({"full", at(storage.full), sizeof(storage.full)});
  plan.push_back({"q_full", at(&storage.q_full), sizeof(storage.q_full)});
  plan.push_back({"launch", 0, mla::launch_shared_bytes<kFp8>()});
  return plan;
}
}  // namespace

std::vector<MlaSharedRegion> mla_shared_plan(bool fp8) { return fp8 ? shared_plan<true>() : shared_plan<false>(); }

int mla_load_distance() { return mla::kLoadDistance; }

std::pair<int, int> mla_page_stage(int seq) {
  if (seq < 0) throw_value_error("seq", "an int >= 0", std::to_string(seq));
  return {mla::stage_of(seq), static_cast<int>(mla::parity_of(seq))};
}

std::vector<bool> mla_combined_requests(const std::vector<int>& split_offsets) {
  if (split_offsets.size() < 2) {
    throw_value_error("split_offsets", "b + 1 >= 2 entries", std::to_string(split_offsets.size()) + " entries");
  }
  std::vector<bool> combined;
  for (size_t i = 0; i + 1 < split_offsets.size(); ++i) {
    combined.push_back(mla::needs_combine(split_offsets.data(), static_cast<int>(i)));
  }
  return combined;
}

void mla_plan_splits_host(const std::vector<int>& seqlens, int num_parts, std::vector<int>& part_splits,
                          std::vector<int>& splits, std::vector<int>& split_offsets) {
  if (num_parts < 1) throw_value_error("num_parts", "an int >= 1", std::to_string(num_parts));
  if (seqlens.empty()) throw_value_error("seqlens", "at least one request", "none");
  for (int n : seqlens) {
    if (n < 0) throw_value_error("seqlens", "every length >= 0", std::to_string(n));
  }
  const int batch = static_cast<int>(seqlens.size());
  part_splits.assign(num_parts + 1, 0);
  splits.assign(static_cast<size_t>(mla::kSplitFields) * (batch + num_parts), 0);
  split_offsets.assign(batch + 1, 0);
  mla::plan_splits(seqlens.data(), batch, num_parts, part_splits.data(), splits.data(), split_offsets.data());
}

void mla_plan_splits_device(const TensorView& seqlens, const TensorView& part_splits, const TensorView& splits,
                            const TensorView& split_offsets, cudaStream_t stream) {
  require_dtype(seqlens, DType::Int32);
  require_ndim(seqlens, 1);
  require_contiguous(seqlens);
  require_cuda(seqlens);
  const int64_t batch = seqlens.size(0);
  require_int32_vector(split_offsets, batch + 1, "b + 1");
  require_dtype(part_splits, DType::Int32);
  require_ndim(part_splits, 1);
  require_contiguous(part_splits);
  const int64_t num_parts = part_splits.size(0) - 1;
  if (batch < 1 || num_parts < 1) throw_value_error(part_splits.name, "num_parts + 1 >= 2 entries", part_splits.shape_str());
  require_dtype(splits, DType::Int32);
  require_ndim(splits, 2);
  require_contiguous(splits);
  require_size(splits, 0, batch + num_parts, "capacity = b + num_parts");
  require_size(splits, 1, mla::kSplitFields);
  for (const TensorView* t : {&part_splits, &splits, &split_offsets}) require_same_device(seqlens, *t);
  mla::mla_plan_splits_kernel<<<1, 1, 0, stream>>>(seqlens.ptr<const int>(), static_cast<int>(batch),
                                                   static_cast<int>(num_parts), part_splits.ptr<int>(),
                                                   splits.ptr<int>(), split_offsets.ptr<int>());
  PK_CHECK_LAUNCH("mla_plan_splits_kernel");
}

void mla_decode(const TensorView& q, const TensorView& kv_cache, const TensorView& block_table,
                const TensorView& seqlens, const TensorView* kv_scale, const TensorView& part_splits,
                const TensorView& splits, const TensorView& split_offsets, const TensorView& out,
                const TensorView& lse, const TensorView& out_partial, const TensorView& lse_partial,
                float softmax_scale, bool causal, cudaStream_t stream) {
  // Only a finite positive scale gives finite scores; NaN or 0 would reach every output silently.
  if (!(std::isfinite(softmax_scale) && softmax_scale > 0.0f)) {
    throw_value_error("softmax_scale", "a finite positive float", std::to_string(softmax_scale));
  }
  require_dtype(q, DType::BFloat16);
  if (kv_cache.dtype != DType::BFloat16 && kv_cache.dtype != DType::Float8E4M3) {
    throw_type_error(kv_cache.name, "dtype bfloat16 or float8_e4m3fn", dtype_name(kv_cache.dtype));
  }
  const bool fp8 = kv_cache.dtype == DType::Float8E4M3;
  if (fp8 && kv_scale == nullptr) throw_type_error("kv_scale", "a float32 tensor with a float8_e4m3fn kv_cache", "None");
  if (!fp8 && kv_scale != nullptr) throw_type_error("kv_scale", "None with a bfloat16 kv_cache", "a tensor");
  require_dtype(block_table, DType::Int32);
  require_dtype(out, DType::BFloat16);
  require_dtype(lse, DType::Float32);
  require_dtype(out_partial, DType::Float32);
  require_dtype(lse_partial, DType::Float32);
  require_ndim(q, 4);
  require_ndim(kv_cache, 4);
  require_ndim(block_table, 2);
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  require_size(q, 3, mla::kHeadDimK, "512 latent + 64 RoPE");
  if (b < 1) throw_value_error(q.name, "at least one request", "shape " + q.shape_str());
  if (s_q < 1 || s_q > 4) throw_value_error(q.name, "s_q (dim 1) in 1..4", "shape " + q.shape_str());
  if (h_q < 1 || h_q > 128) throw_value_error(q.name, "h_q (dim 2) in 1..128", "shape " + q.shape_str());
  require_size(kv_cache, 1, mla::kPageSize, "page size");
  require_size(kv_cache, 2, 1, "one latent KV head");
  require_size(kv_cache, 3, mla::kHeadDimK, "512 latent + 64 RoPE");
  require_size(block_table, 0, b, "b");
  // The kernel reads block_table[request * max_blocks + page] for every page with a key: a table without
  // columns has no entry to read, and max_blocks travels as an int.
  if (block_table.size(1) < 1 || block_table.size(1) > INT_MAX) {
    throw_value_error(block_table.name, "max_blocks (dim 1) in 1.." + std::to_string(INT_MAX),
                      "shape " + block_table.shape_str());
  }
  require_int32_vector(seqlens, b, "b");
  require_int32_vector(split_offsets, b + 1, "b + 1");
  require_dtype(part_splits, DType::Int32);
  require_ndim(part_splits, 1);
  const int64_t num_parts = part_splits.size(0) - 1;
  // The split kernel's grid is (m_blocks, num_parts): y is limited to 65535.
  if (num_parts < 1 || num_parts > 65535) {
    throw_value_error(part_splits.name, "2..65536 entries (num_parts + 1)", "shape " + part_splits.shape_str());
  }
  const int64_t capacity = b + num_parts;
  require_ndim(splits, 2);
  require_dtype(splits, DType::Int32);
  require_size(splits, 0, capacity, "b + num_parts");
  require_size(splits, 1, mla::kSplitFields);
  const int64_t rows = s_q * h_q;
  require_ndim(out, 4);
  for (int d = 0; d < 3; ++d) require_size(out, d, q.size(d), "same as q");
  require_size(out, 3, mla::kHeadDimV);
  require_ndim(lse, 3);
  require_size(lse, 0, b);
  require_size(lse, 1, h_q);
  require_size(lse, 2, s_q);
  require_ndim(out_partial, 3);
  require_size(out_partial, 0, capacity);
  require_size(out_partial, 1, rows);
  require_size(out_partial, 2, mla::kHeadDimV);
  require_ndim(lse_partial, 2);
  require_size(lse_partial, 0, capacity);
  require_size(lse_partial, 1, rows);
  require_cuda(q);
  for (const TensorView* t : {&kv_cache, &block_table, &seqlens, &part_splits, &splits, &split_offsets, &out, &lse,
                              &out_partial, &lse_partial}) {
    require_contiguous(*t);
    require_same_device(q, *t);
  }
  require_contiguous(q);
  if (kv_scale != nullptr) {
    require_dtype(*kv_scale, DType::Float32);
    if (kv_scale->numel() != 1) throw_value_error(kv_scale->name, "one element", "shape " + kv_scale->shape_str());
    require_same_device(q, *kv_scale);
  }
  for (const TensorView* t : {&q, &kv_cache, &out, &out_partial}) require_aligned(*t, 16);
  // TMA coordinates are int32: the cache's rows (num_blocks * 64) must fit.
  const int64_t num_blocks = kv_cache.size(0);
  if (num_blocks < 1 || num_blocks > INT_MAX / mla::kPageSize) {
    throw_value_error(kv_cache.name, "1.." + std::to_string(INT_MAX / mla::kPageSize) + " pages (dim 0)",
                      "shape " + kv_cache.shape_str());
  }

  mla::Params params{};
  params.kv = kv_cache.data;
  params.block_table = block_table.ptr<const int>();
  params.seqlens = seqlens.ptr<const int>();
  params.kv_scale = kv_scale != nullptr ? kv_scale->ptr<const float>() : nullptr;
  params.part_splits = part_splits.ptr<const int>();
  params.splits = splits.ptr<const int>();
  params.split_offsets = split_offsets.ptr<const int>();
  params.out = out.ptr<mla::bf16>();
  params.lse = lse.ptr<float>();
  params.out_partial = out_partial.ptr<float>();
  params.lse_partial = lse_partial.ptr<float>();
  params.s_q = static_cast<int>(s_q);
  params.h_q = static_cast<int>(h_q);
  params.max_blocks = static_cast<int>(block_table.size(1));
  params.scale_log2 = softmax_scale * 1.4426950408889634f;
  params.causal = causal && s_q > 1;

  const int m_blocks = static_cast<int>((rows + mla::kRowsPerTile - 1) / mla::kRowsPerTile);
  const CUtensorMap tma_q = make_q_map(q, b, rows);
  if (fp8) {
    const CUtensorMap unused{};  // the e4m3 cache moves by bulk copy
    launch_decode<true>(tma_q, unused, params, m_blocks, static_cast<int>(num_parts), stream);
  } else {
    launch_decode<false>(tma_q, make_kv_map(kv_cache, num_blocks), params, m_blocks, static_cast<int>(num_parts),
                         stream);
  }
  launch_combine(params, b, rows, stream);
}

}  // namespace pykernels
