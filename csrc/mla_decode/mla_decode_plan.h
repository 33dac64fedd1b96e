// The split-KV scheduler of MLA decode, shared by the host (tests, through the binding) and the device
// (mla_plan_splits_kernel, so that planning can be captured in a CUDA graph). pykernels/mla_decode.py has
// the same walk in Python for the Triton and torch paths; tests require identical plans.
#pragma once

#include <cstdint>

namespace pykernels {
namespace mla {

constexpr int kPageSize = 64;       // tokens per cache page and per KV tile
constexpr int kFixedOverhead = 5;   // cost of one split in pages: Q load, epilogue, its share of the combine
constexpr int kSplitFields = 4;     // request, first page, end page, index within the request

// Pages a request of `seqlen` tokens is planned with. A length below 1 is refused by every checked entry
// point, but a CUDA graph replays lengths nobody checks (a serving loop may pad its batch with empty
// slots): such a request still gets one page, loaded from nowhere and all of it masked (output 0, lse +inf).
// Every split keeps a page so that each split's work item has the same shape in both planners. The
// rounding is 64-bit: ceil((2^31 - 1) / 64) must not wrap negative.
__host__ __device__ inline int pages_of(int seqlen) {
  return seqlen < 1 ? 1 : static_cast<int>((static_cast<int64_t>(seqlen) + kPageSize - 1) / kPageSize);
}

// Greedy balanced partition of the batch's pages over `num_parts` SM parts.
// A request of L tokens costs ceil(L / 64) + kFixedOverhead; each part may spend
// ceil(total / num_parts) + kFixedOverhead; requests are walked in order and cut at a page boundary when a
// part's budget runs out (the last part takes whatever remains, so every page is covered).
// Writes part_splits[num_parts + 1] (part p runs splits part_splits[p] .. part_splits[p+1]-1),
// splits[capacity][4] and split_offsets[batch + 1] (request i owns splits split_offsets[i] .. [i+1]-1).
// At most batch + num_parts - 1 splits are written: each part boundary cuts at most one request.
__host__ __device__ inline void plan_splits(const int* seqlens, int batch, int num_parts, int* part_splits,
                                            int* splits, int* split_offsets) {
  int64_t total = 0;
  for (int i = 0; i < batch; ++i) total += pages_of(seqlens[i]) + kFixedOverhead;
  const int64_t budget = (total + num_parts - 1) / num_parts + kFixedOverhead;
  int part = 0, count = 0;
  int64_t remaining = budget;
  part_splits[0] = 0;
  for (int request = 0; request < batch; ++request) {
    split_offsets[request] = count;
    const int pages = pages_of(seqlens[request]);
    int page = 0, index = 0;
    while (true) {
      const int left = pages - page;
      if (left + kFixedOverhead <= remaining || part == num_parts - 1) {
        int* s = splits + kSplitFields * count++;
        s[0] = request, s[1] = page, s[2] = pages, s[3] = index;
        remaining -= left + kFixedOverhead;
        break;
      }
      const int take = static_cast<int>(remaining - kFixedOverhead);
      if (take > 0) {
        int* s = splits + kSplitFields * count++;
        s[0] = request, s[1] = page, s[2] = page + take, s[3] = index++;
        page += take;
      }
      part_splits[++part] = count;
      remaining = budget;
    }
  }
  split_offsets[batch] = count;
  for (int p = part + 1; p <= num_parts; ++p) part_splits[p] = count;
}

}  // namespace mla
}  // namespace pykernels
