#include "moe/moe.cuh"
#include "moe/moe.h"

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

namespace pykernels {
namespace {

using moe::kMaxExperts;
using moe::kMaxLocalExperts;
using moe::kMaxTopk;
using moe::kMaxWorld;
using moe::kRowThreads;
using moe::kScaleGroup;
using moe::kScanThreads;

// A contiguous matrix of `dtype`, shape [rows, cols] (-1 = any), on the same CUDA device as `ref`.
void require_matrix(const TensorView& t, DType dtype, int64_t rows, int64_t cols, const TensorView* ref,
                    const std::string& what = "") {
  require_dtype(t, dtype);
  require_ndim(t, 2);
  if (rows >= 0) require_size(t, 0, rows, what);
  if (cols >= 0) require_size(t, 1, cols, what);
  require_contiguous(t);
  if (ref != nullptr) {
    require_cuda(t);
    require_same_device(*ref, t);
  }
}

void require_vector(const TensorView& t, DType dtype, int64_t size, const TensorView* ref, const std::string& what) {
  require_dtype(t, dtype);
  require_ndim(t, 1);
  require_size(t, 0, size, what);
  require_contiguous(t);
  if (ref != nullptr) {
    require_cuda(t);
    require_same_device(*ref, t);
  }
}

void require_range(const std::string& name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    throw_value_error(name, "a value in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]",
                      std::to_string(value));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The widest unit a row of `row_bytes` bytes at these pointers can be copied in.
int copy_unit(int64_t row_bytes, int element_bytes, const void* a, const void* b) {
  if (row_bytes % 16 == 0 && aligned16(a) && aligned16(b)) return 16;
  return element_bytes;
}

void require_grid(const std::string& name, int64_t rows) {
  require_range(name + " rows", rows, 0, std::numeric_limits<int32_t>::max());
}

template <typename V>
void launch_pack(const TensorView& x, const TensorView* x_scales, const TensorView& topk_idx,
                 const TensorView& topk_weights, const TensorView& slots, const TensorView& send_offsets,
                 const TensorView& send_x, const TensorView& meta, int64_t row_bytes, int num_scales, int num_local,
                 cudaStream_t stream) {
  const int64_t tokens = x.size(0);
  moe::pack_kernel<V><<<static_cast<unsigned>(tokens), kRowThreads, 0, stream>>>(
      x.ptr<const V>(), x_scales ? x_scales->ptr<const float>() : nullptr, topk_idx.ptr<const int64_t>(),
      topk_weights.ptr<const float>(), slots.ptr<const int32_t>(), send_offsets.ptr<const int64_t>(), send_x.ptr<V>(),
      meta.ptr<int32_t>(), row_bytes / static_cast<int64_t>(sizeof(V)), static_cast<int>(topk_idx.size(1)),
      num_scales, num_local, static_cast<int>(slots.size(1)), static_cast<int>(meta.size(1)));
  PK_CHECK_LAUNCH("moe::pack_kernel");
}

template <typename V>
void launch_permute(const TensorView& x, const TensorView* x_scales, const TensorView& topk_idx,
                    const TensorView& rank, const TensorView& starts, const TensorView& x_sorted,
                    const TensorView* s_sorted, const TensorView& m_indices, const TensorView& pos, int64_t row_bytes,
                    cudaStream_t stream) {
  moe::permute_kernel<V><<<static_cast<unsigned>(x.size(0)), kRowThreads, 0, stream>>>(
      x.ptr<const V>(), x_scales ? x_scales->ptr<const float>() : nullptr, topk_idx.ptr<const int64_t>(),
      rank.ptr<const int32_t>(), starts.ptr<const int64_t>(), x_sorted.ptr<V>(),
      s_sorted ? s_sorted->ptr<float>() : nullptr, m_indices.ptr<int32_t>(), pos.ptr<int32_t>(),
      row_bytes / static_cast<int64_t>(sizeof(V)), static_cast<int>(topk_idx.size(1)),
      x_scales ? static_cast<int>(x_scales->size(1)) : 0, static_cast<int>(starts.size(0)));
  PK_CHECK_LAUNCH("moe::permute_kernel");
}

// Runs f.template operator()<V>() with V the copy unit for `bytes` (16, 2 or 1).
template <typename F>
void with_copy_unit(int bytes, const F& f) {
  if (bytes == 16) return f.template operator()<uint4>();
  if (bytes == 2) return f.template operator()<uint16_t>();
  return f.template operator()<uint8_t>();
}

struct PackLaunch {
  const TensorView &x;
  const TensorView* x_scales;
  const TensorView &topk_idx, &topk_weights, &slots, &send_offsets, &send_x, &meta;
  int64_t row_bytes;
  int num_scales, num_local;
  cudaStream_t stream;
  template <typename V>
  void operator()() const {
    launch_pack<V>(x, x_scales, topk_idx, topk_weights, slots, send_offsets, send_x, meta, row_bytes, num_scales,
                   num_local, stream);
  }
};

struct PermuteLaunch {
  const TensorView &x;
  const TensorView* x_scales;
  const TensorView &topk_idx, &rank, &starts, &x_sorted;
  const TensorView* s_sorted;
  const TensorView &m_indices, &pos;
  int64_t row_bytes;
  cudaStream_t stream;
  template <typename V>
  void operator()() const {
    launch_permute<V>(x, x_scales, topk_idx, rank, starts, x_sorted, s_sorted, m_indices, pos, row_bytes, stream);
  }
};

template <typename T, int VEC>
void launch_combine(const TensorView& buf, const TensorView& slots, const TensorView& send_offsets,
                    const TensorView& out, cudaStream_t stream) {
  moe::combine_reduce_kernel<T, VEC><<<static_cast<unsigned>(out.size(0)), kRowThreads, 0, stream>>>(
      buf.ptr<const T>(), slots.ptr<const int32_t>(), send_offsets.ptr<const int64_t>(), out.ptr<T>(), out.size(1),
      static_cast<int>(slots.size(1)));
  PK_CHECK_LAUNCH("moe::combine_reduce_kernel");
}

template <typename T, int VEC>
void launch_unpermute(const TensorView& y, const TensorView& pos, const TensorView& weights, const TensorView& out,
                      cudaStream_t stream) {
  moe::unpermute_kernel<T, VEC><<<static_cast<unsigned>(out.size(0)), kRowThreads, 0, stream>>>(
      y.ptr<const T>(), pos.ptr<const int32_t>(), weights.ptr<const float>(), out.ptr<T>(), out.size(1),
      static_cast<int>(pos.size(1)));
  PK_CHECK_LAUNCH("moe::unpermute_kernel");
}

void require_reduce_dtype(const TensorView& t) {
  if (t.dtype != DType::BFloat16 && t.dtype != DType::Float32) {
    throw_type_error(t.name, "dtype bfloat16 or float32", dtype_name(t.dtype));
  }
}

// 16-byte vectors when the row length and pointers allow, else one element at a time.
template <template <typename, int> class Launch, typename... Args>
void with_reduce_type(DType dtype, bool vectorize, Args&&... args) {
  if (dtype == DType::BFloat16) {
    if (vectorize) return Launch<__nv_bfloat16, 8>::run(args...);
    return Launch<__nv_bfloat16, 1>::run(args...);
  }
  if (vectorize) return Launch<float, 4>::run(args...);
  return Launch<float, 1>::run(args...);
}

template <typename T, int VEC>
struct CombineLaunch {
  template <typename... A>
  static void run(A&&... a) { launch_combine<T, VEC>(a...); }
};

template <typename T, int VEC>
struct UnpermuteLaunch {
  template <typename... A>
  static void run(A&&... a) { launch_unpermute<T, VEC>(a...); }
};

// The planners read and write through host pointers.
void require_host(const TensorView& t) {
  if (t.is_cuda) throw_value_error(t.name, "a CPU tensor (the planners run on the host)", "a tensor on " + t.device_str());
}

// Expert ids the planners index with: [-1, limit).
void require_ids(const TensorView& topk_idx, int64_t limit) {
  for (int64_t p = 0; p < topk_idx.numel(); ++p) {
    const int64_t e = topk_idx.ptr<const int64_t>()[p];
    if (e < -1 || e >= limit) {
      throw_value_error(topk_idx.name, "ids in [0, " + std::to_string(limit) + ") or -1", std::to_string(e));
    }
  }
}

bool vectorizable(const TensorView& a, const TensorView& b, int64_t hidden) {
  const int vec = 16 / dtype_size(a.dtype);
  return hidden % vec == 0 && aligned16(a.data) && aligned16(b.data);
}

}  // namespace

void moe_dispatch_layout(const TensorView& topk_idx, const TensorView& per_rank, const TensorView& per_expert,
                         const TensorView& slots, int num_experts, cudaStream_t stream) {
  require_dtype(topk_idx, DType::Int64);
  require_ndim(topk_idx, 2);
  require_contiguous(topk_idx);
  require_cuda(topk_idx);
  const int64_t tokens = topk_idx.size(0);
  require_range("topk_idx tokens", tokens, 0, std::numeric_limits<int32_t>::max());
  require_range("topk_idx top-k", topk_idx.size(1), 1, 1024);
  require_range("num_experts", num_experts, 1, kMaxExperts);
  require_ndim(per_rank, 1);
  const int64_t world = per_rank.size(0);
  require_range("world size", world, 1, kMaxWorld);
  if (num_experts % world != 0) {
    throw_value_error("num_experts", "a multiple of the world size " + std::to_string(world),
                      std::to_string(num_experts));
  }
  require_vector(per_rank, DType::Int64, world, &topk_idx, "world");
  require_vector(per_expert, DType::Int64, num_experts, &topk_idx, "num_experts");
  require_matrix(slots, DType::Int32, tokens, world, &topk_idx, "[T, world]");
  moe::dispatch_layout_kernel<<<1, kScanThreads, 0, stream>>>(
      topk_idx.ptr<const int64_t>(), per_rank.ptr<int64_t>(), per_expert.ptr<int64_t>(), slots.ptr<int32_t>(),
      static_cast<int>(tokens), static_cast<int>(topk_idx.size(1)), num_experts, static_cast<int>(world));
  PK_CHECK_LAUNCH("moe::dispatch_layout_kernel");
}

void moe_pack(const TensorView& x, const TensorView* x_scales, const TensorView& topk_idx,
              const TensorView& topk_weights, const TensorView& slots, const TensorView& send_offsets,
              const TensorView& send_x, const TensorView& meta, int num_local, bool quantize, cudaStream_t stream) {
  require_dtype(x, x_scales != nullptr ? DType::Float8E4M3 : DType::BFloat16);
  require_ndim(x, 2);
  require_contiguous(x);
  require_cuda(x);
  const int64_t tokens = x.size(0), hidden = x.size(1);
  const bool fp8 = x_scales != nullptr || quantize;
  if (fp8 && hidden % kScaleGroup != 0) {
    throw_value_error(x.name, "a hidden size that is a multiple of 128 for FP8", "shape " + x.shape_str());
  }
  if (quantize && x_scales != nullptr) throw_value_error("quantize", "false for an FP8 x", "true");
  const int num_scales = fp8 ? static_cast<int>(hidden / kScaleGroup) : 0;
  if (x_scales != nullptr) require_matrix(*x_scales, DType::Float32, tokens, num_scales, &x, "[T, H / 128]");
  require_grid("x", tokens);
  require_matrix(topk_idx, DType::Int64, tokens, -1, &x, "one row per token");
  const int64_t topk = topk_idx.size(1);
  require_range("topk_idx top-k", topk, 1, 1024);
  require_matrix(topk_weights, DType::Float32, tokens, topk, &x, "same as topk_idx");
  require_ndim(slots, 2);
  const int64_t world = slots.size(1);
  require_range("world size", world, 1, kMaxWorld);
  require_matrix(slots, DType::Int32, tokens, world, &x, "[T, world]");
  require_vector(send_offsets, DType::Int64, world, &x, "world");
  require_range("num_local", num_local, 1, std::numeric_limits<int32_t>::max());
  require_matrix(send_x, fp8 ? DType::Float8E4M3 : DType::BFloat16, -1, hidden, &x, "[N, H]");
  require_matrix(meta, DType::Int32, send_x.size(0), 2 * topk + num_scales, &x, "[N, 2 * top-k + H / 128]");
  if (tokens == 0 || send_x.size(0) == 0) return;
  if (quantize) {
    // 16-byte bf16 loads and 8-byte fp8 stores; a torch allocation of rows of 128 elements always allows them.
    require_aligned(x, 16);
    require_aligned(send_x, 8);
    moe::pack_quantize_kernel<<<static_cast<unsigned>(tokens), kRowThreads, 0, stream>>>(
        x.ptr<const __nv_bfloat16>(), topk_idx.ptr<const int64_t>(), topk_weights.ptr<const float>(),
        slots.ptr<const int32_t>(), send_offsets.ptr<const int64_t>(), send_x.ptr<uint8_t>(), meta.ptr<int32_t>(),
        static_cast<int>(hidden), static_cast<int>(topk), num_local, static_cast<int>(world),
        static_cast<int>(meta.size(1)));
    PK_CHECK_LAUNCH("moe::pack_quantize_kernel");
    return;
  }
  const int element_bytes = dtype_size(x.dtype);
  const int64_t row_bytes = hidden * element_bytes;
  with_copy_unit(copy_unit(row_bytes, element_bytes, x.data, send_x.data),
                 PackLaunch{x, x_scales, topk_idx, topk_weights, slots, send_offsets, send_x, meta, row_bytes,
                            num_scales, num_local, stream});
}

void moe_combine_reduce(const TensorView& buf, const TensorView& slots, const TensorView& send_offsets,
                        const TensorView& out, cudaStream_t stream) {
  require_reduce_dtype(buf);
  require_ndim(buf, 2);
  require_contiguous(buf);
  require_cuda(buf);
  const int64_t hidden = buf.size(1);
  require_ndim(slots, 2);
  const int64_t tokens = slots.size(0), world = slots.size(1);
  require_range("world size", world, 1, kMaxWorld);
  require_grid("slots", tokens);
  require_matrix(slots, DType::Int32, tokens, world, &buf, "[T, world]");
  require_vector(send_offsets, DType::Int64, world, &buf, "world");
  require_matrix(out, buf.dtype, tokens, hidden, &buf, "[T, H]");
  if (tokens == 0 || hidden == 0) return;
  with_reduce_type<CombineLaunch>(buf.dtype, vectorizable(buf, out, hidden), buf, slots, send_offsets, out, stream);
}

void moe_expert_ranks(const TensorView& topk_idx, const TensorView& counts, const TensorView& rank,
                      const TensorView& chunk_counts, cudaStream_t stream) {
  require_matrix(topk_idx, DType::Int64, -1, -1, nullptr);
  require_cuda(topk_idx);
  require_ndim(counts, 1);
  require_range("num_local", counts.size(0), 1, kMaxLocalExperts);
  const int num_local = static_cast<int>(counts.size(0));
  require_vector(counts, DType::Int64, num_local, &topk_idx, "num_local");
  require_matrix(rank, DType::Int32, topk_idx.size(0), topk_idx.size(1), &topk_idx, "same as topk_idx");
  const int64_t chunks = moe_expert_rank_chunks(topk_idx.numel());
  const int64_t num_pairs = topk_idx.numel();
  require_matrix(chunk_counts, DType::Int32, chunks, num_local, &topk_idx, "[ceil(pairs / 1024), num_local]");
  if (chunks > 0) {
    moe::expert_chunk_counts_kernel<<<static_cast<unsigned>(chunks), kScanThreads, 0, stream>>>(
        topk_idx.ptr<const int64_t>(), chunk_counts.ptr<int32_t>(), num_pairs, num_local);
    PK_CHECK_LAUNCH("moe::expert_chunk_counts_kernel");
  }
  const unsigned offset_ctas = static_cast<unsigned>((num_local + moe::kOffsetWarps - 1) / moe::kOffsetWarps);
  moe::expert_chunk_offsets_kernel<<<offset_ctas, moe::kOffsetWarps * 32, 0, stream>>>(
      chunk_counts.ptr<int32_t>(), counts.ptr<int64_t>(), chunks, num_local);
  PK_CHECK_LAUNCH("moe::expert_chunk_offsets_kernel");
  if (chunks > 0) {
    moe::expert_ranks_kernel<<<static_cast<unsigned>(chunks), kScanThreads, 0, stream>>>(
        topk_idx.ptr<const int64_t>(), chunk_counts.ptr<const int32_t>(), rank.ptr<int32_t>(), num_pairs, num_local);
    PK_CHECK_LAUNCH("moe::expert_ranks_kernel");
  }
}

int64_t moe_expert_rank_chunks(int64_t num_pairs) {
  // Ranks and per-chunk offsets are int32: one expert could take every pair.
  require_range("num_pairs", num_pairs, 0, std::numeric_limits<int32_t>::max());
  return moe::rank_chunks(num_pairs);
}

void moe_permute(const TensorView& x, const TensorView* x_scales, const TensorView& topk_idx, const TensorView& rank,
                 const TensorView& starts, const TensorView& x_sorted, const TensorView* s_sorted,
                 const TensorView& m_indices, const TensorView& pos, cudaStream_t stream) {
  require_dtype(x, x_scales != nullptr ? DType::Float8E4M3 : DType::BFloat16);
  require_ndim(x, 2);
  require_contiguous(x);
  require_cuda(x);
  const int64_t rows = x.size(0), hidden = x.size(1);
  require_grid("x", rows);
  require_matrix(topk_idx, DType::Int64, rows, -1, &x, "one row per token");
  const int64_t topk = topk_idx.size(1);
  require_range("topk_idx top-k", topk, 1, kMaxTopk);
  require_matrix(rank, DType::Int32, rows, topk, &x, "same as topk_idx");
  require_ndim(starts, 1);
  require_range("starts size (num_local)", starts.size(0), 1, std::numeric_limits<int32_t>::max());
  require_vector(starts, DType::Int64, starts.size(0), &x, "num_local");
  require_matrix(x_sorted, x.dtype, -1, hidden, &x, "[M, H]");
  const int64_t total = x_sorted.size(0);
  require_vector(m_indices, DType::Int32, total, &x, "[M]");
  require_matrix(pos, DType::Int32, rows, topk, &x, "same as topk_idx");
  if ((x_scales == nullptr) != (s_sorted == nullptr)) {
    throw_value_error("s_sorted", "a tensor exactly when x_scales is given", s_sorted ? "a tensor" : "None");
  }
  if (x_scales != nullptr) {
    require_matrix(*x_scales, DType::Float32, rows, -1, &x, "[R, S]");
    require_matrix(*s_sorted, DType::Float32, total, x_scales->size(1), &x, "[M, S]");
  }
  if (rows == 0) return;
  const int element_bytes = dtype_size(x.dtype);
  const int64_t row_bytes = hidden * element_bytes;
  with_copy_unit(copy_unit(row_bytes, element_bytes, x.data, x_sorted.data),
                 PermuteLaunch{x, x_scales, topk_idx, rank, starts, x_sorted, s_sorted, m_indices, pos, row_bytes,
                               stream});
}

void moe_unpermute(const TensorView& y_sorted, const TensorView& pos, const TensorView& weights,
                   const TensorView& out, cudaStream_t stream) {
  require_reduce_dtype(y_sorted);
  require_ndim(y_sorted, 2);
  require_contiguous(y_sorted);
  require_cuda(y_sorted);
  const int64_t hidden = y_sorted.size(1);
  require_ndim(pos, 2);
  const int64_t rows = pos.size(0), topk = pos.size(1);
  require_grid("pos", rows);
  require_range("pos top-k", topk, 1, kMaxTopk);
  require_matrix(pos, DType::Int32, rows, topk, &y_sorted, "[R, k]");
  require_matrix(weights, DType::Float32, rows, topk, &y_sorted, "same as pos");
  require_matrix(out, y_sorted.dtype, rows, hidden, &y_sorted, "[R, N]");
  if (rows == 0 || hidden == 0) return;
  with_reduce_type<UnpermuteLaunch>(y_sorted.dtype, vectorizable(y_sorted, out, hidden), y_sorted, pos, weights, out,
                                    stream);
}

// ---- low-latency mode -----------------------------------------------------------------------------------

namespace {

// A contiguous CUDA tensor of `dtype` with exactly `shape`, on ref's device, 16-byte aligned.
void require_ll(const TensorView& t, DType dtype, std::initializer_list<int64_t> shape, const TensorView& ref,
                const std::string& what) {
  require_dtype(t, dtype);
  require_ndim(t, static_cast<int>(shape.size()));
  int dim = 0;
  for (int64_t size : shape) require_size(t, dim++, size, what);
  require_contiguous(t);
  require_cuda(t);
  require_same_device(ref, t);
  require_aligned(t, 16);
}

// The word offsets of a low-latency row: payload, then scales, then ids, within row_words (a multiple of 4).
void require_ll_row(int64_t row_words, int64_t payload_bytes, int64_t scale_word, int64_t num_scales,
                    int64_t id_word, int64_t topk) {
  if (row_words % 4 != 0) throw_value_error("row words", "a multiple of 4 (16-byte rows)", std::to_string(row_words));
  require_range("scale_word", scale_word, (payload_bytes + 3) / 4, row_words);
  require_range("id_word", id_word, scale_word + num_scales, row_words - topk);
}

}  // namespace

void moe_ll_pack(const TensorView& x, const TensorView& topk_idx, const TensorView& send, int num_experts, int world,
                 int64_t max_tokens, int scale_word, int id_word, bool fp8, cudaStream_t stream) {
  require_dtype(x, DType::BFloat16);
  require_ndim(x, 2);
  const int64_t tokens = x.size(0), hidden = x.size(1);
  require_range("world size", world, 1, kMaxWorld);
  require_range("num_experts", num_experts, world, std::numeric_limits<int32_t>::max());
  if (num_experts % world != 0) {
    throw_value_error("num_experts", "a multiple of the world size " + std::to_string(world),
                      std::to_string(num_experts));
  }
  require_range("max_tokens_per_rank", max_tokens, 1, std::numeric_limits<int32_t>::max() / world);
  require_range("x tokens", tokens, 0, max_tokens);
  if (hidden <= 0 || hidden % (fp8 ? kScaleGroup : 8) != 0) {
    throw_value_error(x.name, std::string("a hidden size that is a positive multiple of ") + (fp8 ? "128" : "8"),
                      "shape " + x.shape_str());
  }
  require_ll(x, DType::BFloat16, {tokens, hidden}, x, "[T, H]");
  require_ndim(topk_idx, 2);
  const int64_t topk = topk_idx.size(1);
  require_range("topk_idx top-k", topk, 1, kMaxTopk);
  require_matrix(topk_idx, DType::Int64, tokens, topk, &x, "one row per token");
  require_ndim(send, 2);
  const int64_t row_words = send.size(1);
  require_ll(send, DType::Int32, {world * max_tokens, row_words}, x, "[W * M, row words]");
  const int64_t num_scales = fp8 ? hidden / kScaleGroup : 0;
  require_ll_row(row_words, hidden * (fp8 ? 1 : 2), scale_word, num_scales, id_word, topk);
  const int num_local = num_experts / world;
  const dim3 grid(static_cast<unsigned>(max_tokens));
  if (fp8) {
    moe::ll_pack_kernel<true><<<grid, kRowThreads, 0, stream>>>(
        x.ptr<const __nv_bfloat16>(), topk_idx.ptr<const int64_t>(), send.ptr<int32_t>(), static_cast<int>(tokens),
        static_cast<int>(hidden), static_cast<int>(topk), num_experts, num_local, world, max_tokens,
        static_cast<int>(row_words), scale_word, id_word);
  } else {
    moe::ll_pack_kernel<false><<<grid, kRowThreads, 0, stream>>>(
        x.ptr<const __nv_bfloat16>(), topk_idx.ptr<const int64_t>(), send.ptr<int32_t>(), static_cast<int>(tokens),
        static_cast<int>(hidden), static_cast<int>(topk), num_experts, num_local, world, max_tokens,
        static_cast<int>(row_words), scale_word, id_word);
  }
  PK_CHECK_LAUNCH("moe::ll_pack_kernel");
}

void moe_ll_unpack(const TensorView& recv, const TensorView& pos, const TensorView& out_x, const TensorView* out_s,
                   int scale_word, int id_word, cudaStream_t stream) {
  require_dtype(recv, DType::Int32);
  require_ndim(recv, 2);
  const int64_t rows = recv.size(0), row_words = recv.size(1);
  require_grid("recv", rows);
  require_ll(recv, DType::Int32, {rows, row_words}, recv, "[S, row words]");
  require_ndim(pos, 2);
  const int64_t topk = pos.size(1);
  require_range("pos top-k", topk, 1, kMaxTopk);
  require_matrix(pos, DType::Int32, rows, topk, &recv, "[S, k]");
  const bool fp8 = out_s != nullptr;
  require_ndim(out_x, 3);
  const int64_t num_local = out_x.size(0), hidden = out_x.size(2);
  require_range("num_local", num_local, 1, kMaxLocalExperts);
  if (hidden <= 0 || hidden % (fp8 ? kScaleGroup : 8) != 0) {
    throw_value_error(out_x.name, std::string("a hidden size that is a positive multiple of ") + (fp8 ? "128" : "8"),
                      "shape " + out_x.shape_str());
  }
  require_ll(out_x, fp8 ? DType::Float8E4M3 : DType::BFloat16, {num_local, rows, hidden}, recv, "[L, S, H]");
  const int64_t num_scales = fp8 ? hidden / kScaleGroup : 0;
  if (fp8) require_ll(*out_s, DType::Float32, {num_local, rows, num_scales}, recv, "[L, S, H / 128]");
  const int64_t payload_bytes = hidden * (fp8 ? 1 : 2);
  require_ll_row(row_words, payload_bytes, scale_word, num_scales, id_word, topk);
  if (rows == 0) return;
  moe::ll_unpack_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
      recv.ptr<const int32_t>(), pos.ptr<const int32_t>(), out_x.ptr<uint4>(), fp8 ? out_s->ptr<float>() : nullptr,
      rows, payload_bytes / 16, static_cast<int>(row_words), scale_word, id_word, static_cast<int>(topk),
      static_cast<int>(num_scales), static_cast<int>(num_local));
  PK_CHECK_LAUNCH("moe::ll_unpack_kernel");
}

void moe_ll_combine_pack(const TensorView& y, const TensorView& recv, const TensorView& pos, const TensorView& ret,
                         int id_word, cudaStream_t stream) {
  require_dtype(y, DType::BFloat16);
  require_ndim(y, 3);
  const int64_t num_local = y.size(0), rows = y.size(1), hidden = y.size(2);
  if (hidden <= 0 || hidden % 8 != 0) {
    throw_value_error(y.name, "a hidden size that is a positive multiple of 8", "shape " + y.shape_str());
  }
  require_range("num_local", num_local, 1, kMaxLocalExperts);
  require_grid("y", rows);
  require_ll(y, DType::BFloat16, {num_local, rows, hidden}, y, "[L, S, N]");
  require_ndim(recv, 2);
  const int64_t row_words = recv.size(1);
  require_ll(recv, DType::Int32, {rows, row_words}, y, "[S, row words]");
  require_ndim(pos, 2);
  const int64_t topk = pos.size(1);
  require_range("pos top-k", topk, 1, kMaxTopk);
  require_matrix(pos, DType::Int32, rows, topk, &y, "[S, k]");
  require_range("id_word", id_word, 0, row_words - topk);
  require_ll(ret, DType::BFloat16, {rows, topk, hidden}, y, "[S, k, N]");
  if (rows == 0) return;
  moe::ll_combine_pack_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
      y.ptr<const uint4>(), recv.ptr<const int32_t>(), pos.ptr<const int32_t>(), ret.ptr<uint4>(), rows, hidden / 8,
      static_cast<int>(row_words), id_word, static_cast<int>(topk), static_cast<int>(num_local));
  PK_CHECK_LAUNCH("moe::ll_combine_pack_kernel");
}

void moe_ll_combine_reduce(const TensorView& returned, const TensorView& topk_idx, const TensorView& weights,
                           const TensorView& out, int num_experts, cudaStream_t stream) {
  require_dtype(returned, DType::BFloat16);
  require_ndim(returned, 4);
  const int64_t world = returned.size(0), max_tokens = returned.size(1), topk = returned.size(2),
                hidden = returned.size(3);
  require_range("world size", world, 1, kMaxWorld);
  require_range("returned top-k", topk, 1, kMaxTopk);
  if (hidden <= 0 || hidden % 8 != 0) {
    throw_value_error(returned.name, "a hidden size that is a positive multiple of 8", "shape " + returned.shape_str());
  }
  require_ll(returned, DType::BFloat16, {world, max_tokens, topk, hidden}, returned, "[W, M, k, N]");
  require_range("num_experts", num_experts, static_cast<int>(world), std::numeric_limits<int32_t>::max());
  if (num_experts % world != 0) {
    throw_value_error("num_experts", "a multiple of the world size " + std::to_string(world),
                      std::to_string(num_experts));
  }
  require_ndim(topk_idx, 2);
  const int64_t tokens = topk_idx.size(0);
  require_range("topk_idx tokens", tokens, 0, max_tokens);
  require_matrix(topk_idx, DType::Int64, tokens, topk, &returned, "[T, k]");
  require_matrix(weights, DType::Float32, tokens, topk, &returned, "same as topk_idx");
  require_ll(out, DType::BFloat16, {tokens, hidden}, returned, "[T, N]");
  if (tokens == 0) return;
  moe::ll_combine_reduce_kernel<<<static_cast<unsigned>(tokens), kRowThreads, 0, stream>>>(
      returned.ptr<const __nv_bfloat16>(), topk_idx.ptr<const int64_t>(), weights.ptr<const float>(),
      out.ptr<__nv_bfloat16>(), hidden, static_cast<int>(topk), num_experts,
      num_experts / static_cast<int>(world), max_tokens);
  PK_CHECK_LAUNCH("moe::ll_combine_reduce_kernel");
}

int64_t moe_ll_send_row(int rank, int64_t token, int64_t max_tokens) { return moe::ll_send_row(rank, token, max_tokens); }
int64_t moe_ll_expert_row(int64_t expert, int64_t pos, int num_local, int64_t rows) {
  return moe::ll_expert_row(expert, pos, num_local, rows);
}
int64_t moe_ll_return_row(int rank, int64_t token, int slot, int64_t max_tokens, int topk) {
  return moe::ll_return_row(rank, token, slot, max_tokens, topk);
}

// ---- host planners -----------------------------------------------------------------------------------

void moe_plan_dispatch_layout(const TensorView& topk_idx, const TensorView& per_rank, const TensorView& per_expert,
                              const TensorView& slots, int num_experts) {
  require_matrix(topk_idx, DType::Int64, -1, -1, nullptr);
  require_ndim(per_rank, 1);
  const int64_t tokens = topk_idx.size(0), topk = topk_idx.size(1), world = per_rank.size(0);
  require_range("world size", world, 1, kMaxWorld);
  require_range("num_experts", num_experts, 1, kMaxExperts);
  if (num_experts % world != 0) {
    throw_value_error("num_experts", "a multiple of the world size " + std::to_string(world),
                      std::to_string(num_experts));
  }
  require_vector(per_rank, DType::Int64, world, nullptr, "world");
  require_vector(per_expert, DType::Int64, num_experts, nullptr, "num_experts");
  require_matrix(slots, DType::Int32, tokens, world, nullptr, "[T, world]");
  for (const TensorView* t : {&topk_idx, &per_rank, &per_expert, &slots}) require_host(*t);
  const int num_local = static_cast<int>(num_experts / world);
  const int64_t* idx = topk_idx.ptr<const int64_t>();
  int64_t* ranks = per_rank.ptr<int64_t>();
  int64_t* experts = per_expert.ptr<int64_t>();
  for (int64_t r = 0; r < world; ++r) ranks[r] = 0;
  for (int64_t e = 0; e < num_experts; ++e) experts[e] = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t* row = idx + t * topk;
    const uint64_t mask = moe::destination_mask(row, static_cast<int>(topk), num_local, num_experts);
    for (int64_t j = 0; j < topk; ++j) {
      if (moe::is_expert(row[j], num_experts)) ++experts[row[j]];
    }
    for (int64_t r = 0; r < world; ++r) {
      slots.ptr<int32_t>()[t * world + r] = ((mask >> r) & 1) ? static_cast<int32_t>(ranks[r]++) : -1;
    }
  }
}

void moe_plan_expert_ranks(const TensorView& topk_idx, const TensorView& counts, const TensorView& rank) {
  require_matrix(topk_idx, DType::Int64, -1, -1, nullptr);
  require_ndim(counts, 1);
  require_range("num_local", counts.size(0), 1, kMaxLocalExperts);
  require_vector(counts, DType::Int64, counts.size(0), nullptr, "num_local");
  require_matrix(rank, DType::Int32, topk_idx.size(0), topk_idx.size(1), nullptr, "same as topk_idx");
  for (const TensorView* t : {&topk_idx, &counts, &rank}) require_host(*t);
  require_ids(topk_idx, counts.size(0));
  // The kernels' decomposition, run serially: per-chunk counts, their exclusive scan over the chunks,
  // then each pair's rank from its chunk's offset.
  const int num_local = static_cast<int>(counts.size(0));
  const int64_t num_pairs = topk_idx.numel();
  const int64_t chunks = moe_expert_rank_chunks(num_pairs);
  const int64_t* idx = topk_idx.ptr<const int64_t>();
  std::vector<int64_t> offsets(static_cast<size_t>(chunks * num_local), 0);
  for (int64_t p = 0; p < num_pairs; ++p) {
    if (moe::is_local_expert(idx[p], num_local)) ++offsets[(p / moe::kRankChunk) * num_local + idx[p]];
  }
  int64_t* c = counts.ptr<int64_t>();
  for (int e = 0; e < num_local; ++e) {
    int64_t carry = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t n = offsets[k * num_local + e];
      offsets[k * num_local + e] = carry;
      carry += n;
    }
    c[e] = carry;
  }
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t e = idx[p];
    rank.ptr<int32_t>()[p] =
        moe::is_local_expert(e, num_local) ? static_cast<int32_t>(offsets[(p / moe::kRankChunk) * num_local + e]++) : -1;
  }
}

void moe_plan_permute(const TensorView& topk_idx, const TensorView& rank, const TensorView& starts,
                      const TensorView& m_indices, const TensorView& pos) {
  require_matrix(topk_idx, DType::Int64, -1, -1, nullptr);
  require_matrix(rank, DType::Int32, topk_idx.size(0), topk_idx.size(1), nullptr, "same as topk_idx");
  require_matrix(pos, DType::Int32, topk_idx.size(0), topk_idx.size(1), nullptr, "same as topk_idx");
  require_ndim(starts, 1);
  require_vector(starts, DType::Int64, starts.size(0), nullptr, "num_local");
  require_ndim(m_indices, 1);
  require_vector(m_indices, DType::Int32, m_indices.size(0), nullptr, "[M]");
  for (const TensorView* t : {&topk_idx, &rank, &starts, &m_indices, &pos}) require_host(*t);
  require_ids(topk_idx, starts.size(0));
  for (int64_t p = 0; p < topk_idx.numel(); ++p) {
    const int64_t e = topk_idx.ptr<const int64_t>()[p];
    const int64_t row = moe::sorted_row(e, static_cast<int>(starts.size(0)), starts.ptr<const int64_t>(),
                                        rank.ptr<const int32_t>()[p]);
    pos.ptr<int32_t>()[p] = static_cast<int32_t>(row);
    if (row >= 0) {
      if (row >= m_indices.size(0)) throw_value_error("m_indices", "room for row " + std::to_string(row), m_indices.shape_str());
      m_indices.ptr<int32_t>()[row] = static_cast<int32_t>(e);
    }
  }
}

int64_t moe_padded_rows(int64_t count, int alignment) {
  require_range("alignment", alignment, 1, std::numeric_limits<int32_t>::max());
  return moe::padded_rows(count, alignment);
}

}  // namespace pykernels
