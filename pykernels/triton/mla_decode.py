"""MLA decode in Triton: stage 1 runs the split-KV schedule (one persistent program per 64-row query tile and
SM part), stage 2 merges the splits of each request by their lse.

The M dimension of every tl.dot is 64 query rows: all s_q x h_q rows of a request packed together (row
r = t * h_q + h, the order of q's memory), so each 64-token KV page is read from HBM once per split for all
heads, not once per small group of heads.

Registers decide the shape of the page loop. The 64 x 512 float32 accumulator takes 128 registers per
thread over 8 warps; a single 64 x 576 x 64 score product beside it spilled (Triton hoists the wgmma
descriptors of the loop-invariant Q tile and of both K stages out of the loop: 0.5-1 KB of stack per
thread). So the scores are accumulated over nine 64-column chunks in a runtime loop, each chunk of Q and K
loaded where it is used (cp.async-pipelined), and V, the page's first 512 columns, is loaded again for
P V. The second read of the page and the per-page Q chunks come from L1/L2, not HBM; the CUDA kernel keeps
Q and the page resident in shared memory instead. The alternatives compiled for sm_90 all spill: each page
loaded once as [64, 512] + [64, 64] with the 512 part reused as V (470-800 B of stack per thread: with Q and
the page in fixed shared buffers, the descriptors of every wgmma k-step are hoisted into registers), and a
third cp.async stage so that a chunk stays in flight rather than waiting for all copies per chunk (72 B
for the bf16 cache, 40 B with V in two halves).

The split and page loops are while loops: their bounds come from the schedule in memory, which Triton
3.6's interpreter cannot take as range() bounds. Only the constant-bound chunk loop is software-pipelined.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pykernels.triton.aot import AotKernel
from pykernels.triton.common import round_to_bf16

LOG2E = 1.4426950408889634


@triton.jit
def mla_decode_split_kernel(
    q_ptr,  # [b, s_q, h_q, 576] bf16: rows of one request are contiguous
    kv_ptr,  # [num_blocks, 64, 576] bf16 or fp8e4nv
    block_table_ptr,  # [b, max_blocks] int32
    seqlens_ptr,  # [b] int32
    kv_scale_ptr,  # [1] float32 (read only when FP8)
    part_splits_ptr,  # [num_parts + 1] int32
    splits_ptr,  # [capacity, 4] int32: request, first page, end page, index in request
    split_offsets_ptr,  # [b + 1] int32
    out_ptr,  # [b, s_q, h_q, 512] bf16: final output of unsplit requests
    lse_ptr,  # [b, h_q, s_q] float32
    out_part_ptr,  # [capacity, rows, 512] float32: partial outputs of split requests
    lse_part_ptr,  # [capacity, rows] float32
    s_q,  # query tokens per request
    h_q,  # query heads
    max_blocks,  # block_table row length
    scale_log2,  # softmax_scale * log2(e)
    FP8: tl.constexpr,  # kv_ptr holds float8_e4m3fn values to multiply by kv_scale
    CAUSAL: tl.constexpr,  # query token t sees keys 0 .. len - s_q + t
    BLOCK_M: tl.constexpr,  # query rows per program (64)
    PAGE: tl.constexpr,  # tokens per page and per KV tile (64)
    DV: tl.constexpr,  # 512 latent columns (K and V)
    DR: tl.constexpr,  # 64 RoPE columns (K only)
):
    m_block = tl.program_id(0)
    part = tl.program_id(1)
    rows = s_q * h_q
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    offs_n = tl.arange(0, PAGE)
    offs_v = tl.arange(0, DV)
    offs_r = tl.arange(0, DR)
    if FP8:
        # The e4m3 -> bf16 conversion is exact; the per-tensor scale multiplies scores and outputs instead.
        kv_scale = tl.load(kv_scale_ptr)
    else:
        kv_scale = 1.0
    score_scale = scale_log2 * kv_scale
    g = tl.load(part_splits_ptr + part)
    last = tl.load(part_splits_ptr + part + 1)
    while g < last:
        request = tl.load(splits_ptr + g * 4)
        page_begin = tl.load(splits_ptr + g * 4 + 1)
        page_end = tl.load(splits_ptr + g * 4 + 2)
        seqlen = tl.load(seqlens_ptr + request)
        n_splits = tl.load(split_offsets_ptr + request + 1) - tl.load(split_offsets_ptr + request)
        q_rows = q_ptr + (request.to(tl.int64) * rows + offs_m[:, None]) * (DV + DR)
        if CAUSAL:
            key_limit = seqlen - s_q + offs_m // h_q + 1  # exclusive, per row
        else:
            key_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
        table_row = block_table_ptr + request.to(tl.int64) * max_blocks
        # A page without tokens (a length-0 request's only page) has no block_table entry to trust, and with a
        # schedule nothing checked the lengths against the table's width: read neither.
        page = page_begin
        block_id = tl.load(table_row + page, mask=(page * PAGE < seqlen) & (page < max_blocks), other=0)
        while page < page_end:
            # The next page's id is read a page ahead, so the tile addresses never wait on the block table.
            next_page = page + 1
            next_id = tl.load(table_row + next_page, other=0,
                              mask=(next_page < page_end) & (next_page * PAGE < seqlen) & (next_page < max_blocks))
            tokens = page * PAGE + offs_n
            # Rows past the sequence's end may hold anything (NaN): never load them, so that 0 * NaN
            # cannot reach the accumulator.
            token_ok = tokens < seqlen
            kv_rows = kv_ptr + (block_id.to(tl.int64) * PAGE + offs_n[:, None]) * (DV + DR)
            s = tl.zeros([BLOCK_M, PAGE], dtype=tl.float32)
            for c in range(0, DV + DR, DR):
                q_c = tl.load(q_rows + c + offs_r[None, :], mask=row_ok[:, None], other=0.0)
                k_c = tl.load(kv_rows + c + offs_r[None, :], mask=token_ok[:, None], other=0.0)
                if FP8:
                    k_c = k_c.to(tl.bfloat16)
                s = tl.dot(q_c, tl.trans(k_c), s)
            k_nope = tl.load(kv_rows + offs_v[None, :], mask=token_ok[:, None], other=0.0)
            if FP8:
                k_nope = k_nope.to(tl.bfloat16)
            s = s * score_scale
            visible = tokens[None, :] < key_limit[:, None]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen no key yet keeps max -inf; subtracting 0 then keeps exp2 at 0, not NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(round_to_bf16(p).to(tl.bfloat16), k_nope)
            m_i = m_new
            block_id = next_id
            page = next_page
        # l_i is exactly 0 only for a row that saw no key (its largest term is exp2(0) = 1); a NaN score
        # makes it NaN, which then reaches out and lse.
        no_keys = l_i == 0.0
        inv_l = tl.where(no_keys, 0.0, kv_scale / l_i)
        o = acc * inv_l[:, None]
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        if n_splits == 1:
            out_rows = out_ptr + (request.to(tl.int64) * rows + offs_m[:, None]) * DV
            tl.store(out_rows + offs_v[None, :], round_to_bf16(o).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
            t = offs_m // h_q
            h = offs_m - t * h_q
            tl.store(lse_ptr + request.to(tl.int64) * rows + h * s_q + t, tl.where(no_keys, float("inf"), lse),
                     mask=row_ok)
        else:
            # A split whose keys a row cannot see weighs 0 in the combine: lse -inf.
            part_rows = out_part_ptr + (g * rows + offs_m[:, None]).to(tl.int64) * DV  # capacity * rows < 2^31
            tl.store(part_rows + offs_v[None, :], o, mask=row_ok[:, None])
            tl.store(lse_part_ptr + g * rows + offs_m, tl.where(no_keys, float("-inf"), lse), mask=row_ok)
        g += 1


@triton.jit
def mla_combine_kernel(
    split_offsets_ptr,  # [b + 1] int32
    out_part_ptr,  # [capacity, rows, 512] float32
    lse_part_ptr,  # [capacity, rows] float32
    out_ptr,  # [b, s_q, h_q, 512] bf16
    lse_ptr,  # [b, h_q, s_q] float32
    s_q,
    h_q,
    BLOCK_R: tl.constexpr,  # rows per program
    DV: tl.constexpr,  # 512
):
    request = tl.program_id(0)
    rows = s_q * h_q
    offs_m = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_m < rows
    offs_v = tl.arange(0, DV)
    first = tl.load(split_offsets_ptr + request)
    last = tl.load(split_offsets_ptr + request + 1)
    if last - first > 1:
        lse_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        g = first
        while g < last:
            lse_max = tl.maximum(lse_max, tl.load(lse_part_ptr + g * rows + offs_m, mask=row_ok,
                                                  other=float("-inf")))
            g += 1
        lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, DV], dtype=tl.float32)
        g = first
        while g < last:
            lse_g = tl.load(lse_part_ptr + g * rows + offs_m, mask=row_ok, other=float("-inf"))
            w = tl.exp(lse_g - lse_ref)
            o = tl.load(out_part_ptr + (g * rows + offs_m[:, None]).to(tl.int64) * DV + offs_v[None, :],
                        mask=row_ok[:, None], other=0.0)
            acc += w[:, None] * o
            total += w
            g += 1
        # As in the split kernel: total is 0 only for a row no split saw a key of, NaN carries through.
        no_keys = total == 0.0
        acc = acc * tl.where(no_keys, 0.0, 1.0 / total)[:, None]
        lse = tl.where(no_keys, float("inf"), lse_ref + tl.log(total))
        tl.store(out_ptr + (request.to(tl.int64) * rows + offs_m[:, None]) * DV + offs_v[None, :],
                 round_to_bf16(acc).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        t = offs_m // h_q
        h = offs_m - t * h_q
        tl.store(lse_ptr + request.to(tl.int64) * rows + h * s_q + t, lse, mask=row_ok)


BLOCK_M = 64
PAGE = 64
COMBINE_ROWS = 16
SPLIT_WARPS = 8
SPLIT_STAGES = 2
COMBINE_WARPS = 4


def mla_decode(q, kv_cache, block_table, cache_seqlens, kv_scale, schedule, out, lse, out_partial, lse_partial,
               softmax_scale: float, causal: bool) -> None:
    b, s_q, h_q, _ = q.shape
    rows = s_q * h_q
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    scale_arg = kv_scale if fp8 else lse  # any float32 pointer; never read without FP8
    grid = (triton.cdiv(rows, BLOCK_M), schedule.num_parts)
    mla_decode_split_kernel[grid](
        q, kv_cache, block_table, cache_seqlens, scale_arg, schedule.part_splits, schedule.splits,
        schedule.split_offsets, out, lse, out_partial, lse_partial, s_q, h_q, block_table.shape[1],
        softmax_scale * LOG2E, FP8=fp8, CAUSAL=causal, BLOCK_M=BLOCK_M, PAGE=PAGE, DV=512, DR=64,
        num_warps=SPLIT_WARPS, num_stages=SPLIT_STAGES)
    mla_combine_kernel[(b, triton.cdiv(rows, COMBINE_ROWS))](
        schedule.split_offsets, out_partial, lse_partial, out, lse, s_q, h_q, BLOCK_R=COMBINE_ROWS, DV=512,
        num_warps=COMBINE_WARPS)


def _split_signature(kv_type: str) -> dict:
    return {"q_ptr": "*bf16", "kv_ptr": kv_type, "block_table_ptr": "*i32", "seqlens_ptr": "*i32",
            "kv_scale_ptr": "*fp32", "part_splits_ptr": "*i32", "splits_ptr": "*i32", "split_offsets_ptr": "*i32",
            "out_ptr": "*bf16", "lse_ptr": "*fp32", "out_part_ptr": "*fp32", "lse_part_ptr": "*fp32",
            "s_q": "i32", "h_q": "i32", "max_blocks": "i32", "scale_log2": "fp32"}


# The configs the wrappers launch (both caches, causal on, as MTP decode runs them); the audit compiles them
# for sm_90 and requires wgmma (HGMMA) and no spills.
AOT_KERNELS = [
    AotKernel(
        name=f"mla_decode_split_kernel[{kv},causal]",
        fn=mla_decode_split_kernel,
        signature=_split_signature(ty),
        constexprs={"FP8": kv == "fp8", "CAUSAL": True, "BLOCK_M": BLOCK_M, "PAGE": PAGE, "DV": 512, "DR": 64},
        num_warps=SPLIT_WARPS,
        num_stages=SPLIT_STAGES,
        expect={"no_local_memory": True, "min_instructions": {"HGMMA": 1}},
    )
    for kv, ty in (("bf16", "*bf16"), ("fp8", "*fp8e4nv"))
] + [
    AotKernel(
        name="mla_combine_kernel",
        fn=mla_combine_kernel,
        signature={"split_offsets_ptr": "*i32", "out_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "out_ptr": "*bf16",
                   "lse_ptr": "*fp32", "s_q": "i32", "h_q": "i32"},
        constexprs={"BLOCK_R": COMBINE_ROWS, "DV": 512},
        num_warps=COMBINE_WARPS,
        expect={"no_local_memory": True},
    ),
]
