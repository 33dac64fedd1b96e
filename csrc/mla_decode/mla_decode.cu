#include "mla_decode/mla_decode.cuh"
#include "mla_decode/mla_decode.h"

#include <string>

namespace pykernels {
namespace {

void require_int32_vector(const TensorView& t, int64_t size, const std::string& what) {
  require_dtype(t, DType::Int32);
  require_ndim(t, 1);
  require_contiguous(t);
  require_size(t, 0, size, what);
}

template <bool kFp8>
void launch_decode(const mla::Params& params, int m_blocks, int num_parts, cudaStream_t stream) {
  constexpr int smem_bytes = static_cast<int>(sizeof(mla::SharedStorage<kFp8>));
  static_assert(smem_bytes <= 232448, "shared memory exceeds the 227 KB a Hopper CTA may use");
  PK_CUDA_CHECK(cudaFuncSetAttribute(mla::mla_decode_kernel<kFp8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     smem_bytes));
  mla::mla_decode_kernel<kFp8><<<dim3(m_blocks, num_parts), mla::kThreads, smem_bytes, stream>>>(params);
  PK_CHECK_LAUNCH("mla_decode_kernel");
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

void mla_plan_splits_host(const std::vector<int>& seqlens, int num_parts, std::vector<int>& part_splits,
                          std::vector<int>& splits, std::vector<int>& split_offsets) {
  if (num_parts < 1) throw_value_error("num_parts", "an int >= 1", std::to_string(num_parts));
  if (seqlens.empty()) throw_value_error("seqlens", "at least one request", "none");
  for (int n : seqlens) {
    if (n < 1) throw_value_error("seqlens", "every length >= 1", std::to_string(n));
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
  require_int32_vector(seqlens, b, "b");
  require_int32_vector(split_offsets, b + 1, "b + 1");
  require_dtype(part_splits, DType::Int32);
  require_ndim(part_splits, 1);
  const int64_t num_parts = part_splits.size(0) - 1;
  if (num_parts < 1) throw_value_error(part_splits.name, "at least 2 entries", part_splits.shape_str());
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

  mla::Params params{};
  params.q = q.ptr<const mla::bf16>();
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
  PK_ASSERT(num_parts <= 65535, "grid y limit");
  if (fp8) {
    launch_decode<true>(params, m_blocks, static_cast<int>(num_parts), stream);
  } else {
    launch_decode<false>(params, m_blocks, static_cast<int>(num_parts), stream);
  }
  mla::mla_combine_kernel<<<dim3(static_cast<unsigned>(b), static_cast<unsigned>(rows)), mla::kCombineThreads, 0,
                            stream>>>(params.split_offsets, params.out_partial, params.lse_partial, params.out,
                                      params.lse, params.s_q, params.h_q);
  PK_CHECK_LAUNCH("mla_combine_kernel");
}

}  // namespace pykernels
