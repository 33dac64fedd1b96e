// The page pipeline of the MLA decode kernel, as functions the host checks through the binding (a simulation
// of the barrier protocol over split shapes) and the kernel calls.
//
// Pages are numbered by `seq`, their position among all pages of the CTA's part, across split boundaries.
// Page seq lives in stage seq % 2; each stage has one mbarrier per 64-column box (bf16; one for the raw
// e4m3 page), and the load of page seq is the (seq / 2)-th completion of its stage's barriers, so its
// consumers wait for parity (seq / 2) & 1.
#pragma once

#include <cstdint>

#include "mla_decode/mla_decode_index.h"

namespace pykernels {
namespace mla {

constexpr int kStages = 2;
constexpr int kMmaK = 16;                        // K of one bf16 HGMMA
constexpr int kStepsPerBox = kBoxCols / kMmaK;   // QK^T k-steps that read one box
// P (64 query rows x 64 tokens, bf16) of a page is written over its stage's RoPE box: QK^T is the only
// reader of columns 512..575, and P V (V = columns 0..511) the only reader of P.
constexpr int kPBox = kColTiles - 1;
static_assert(kPBox * kBoxCols == kHeadDimV, "the last box is the RoPE part, which P V does not read");
static_assert(kRowsPerTile * kPageSize * 2 == kBoxBytes, "P has the size and 128-byte-swizzled shape of a box");

// How far ahead of the page being consumed loads run: a step reads both stages (bf16: P V of page seq while
// the next page's QK^T and softmax run; FP8: P V of page seq while page seq + 1 is converted in place in
// the other stage), so page seq + 2 loads when the step ends.
constexpr int kLoadDistance = kStages;

__host__ __device__ inline int stage_of(int seq) { return seq % kStages; }
__host__ __device__ inline uint32_t parity_of(int seq) { return static_cast<uint32_t>(seq / kStages) & 1u; }

}  // namespace mla
}  // namespace pykernels
