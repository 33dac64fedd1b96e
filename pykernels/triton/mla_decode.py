"""MLA decode in Triton: stage 1 runs the split-KV schedule (one persistent program per query tile of
BLOCK_M rows and SM part), stage 2 merges the splits of each request by their lse.

The M dimension of every tl.dot is a tile of the s_q x h_q rows of a request packed together (row
r = t * h_q + h, the order of q's memory), so each 64-token KV page is read once per split for BLOCK_M
rows, not once per head.

Each page is loaded once, as two [64, 256] halves of its 512 latent columns and a [64, 64] RoPE tile; the
halves are both K for the scores and V for P V, so nothing is read twice. The output accumulates in two
[BLOCK_M, 256] halves, one per V half. The page loop is a three-stage tl.range loop: for a bfloat16 cache
Triton's pipeliner turns the page's loads into cp.async copies into two shared-memory stages, so page
i + 1's copies are in flight while page i's MMAs run, with one wait per page (for the older stage) and
none per chunk. A float8_e4m3fn page is widened to bfloat16 in registers, so the pipeliner leaves its two
halves as plain loads at the top of the iteration (its RoPE tile still goes through cp.async).

Registers decide the shape. With 64 rows per program (one wgmma M) every form tried spills on sm_90:
the [64, 512] float32 accumulator is 128 registers per thread over 8 warps, and Triton hoists the wgmma
descriptors of the loop-invariant Q tile beside it (16-600 B of stack per thread with Triton 3.6 and 3.9,
in one or two loads per page, V whole or in halves or quarters, 8 or 16 warps). Tiles of 16 or 32 rows use
mma.sync (HMMA) instead and fit. A float8_e4m3fn page is widened to bfloat16 after its transpose, so that the
score's K^T and P V's V come from one conversion (converting first and transposing for the scores kept a
second, shuffled copy of the page in registers and spilled).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    NUM_STAGES: tl.constexpr,  # page tiles in flight in the page loop
):
    m_block = tl.program_id(0)
    part = tl.program_id(1)
    rows = s_q * h_q
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    offs_n = tl.arange(0, PAGE)
    HALF: tl.constexpr = DV // 2
    offs_h = tl.arange(0, HALF)
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
        acc_lo = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        q_lo = tl.load(q_rows + offs_h[None, :], mask=row_ok[:, None], other=0.0)
        q_hi = tl.load(q_rows + HALF + offs_h[None, :], mask=row_ok[:, None], other=0.0)
        q_rope = tl.load(q_rows + DV + offs_r[None, :], mask=row_ok[:, None], other=0.0)
        table_row = block_table_ptr + request.to(tl.int64) * max_blocks
        # A page without tokens (a length-0 request's only page) has no block_table entry to trust, and with a
        # schedule nothing checked the lengths against the table's width: read neither.
        block_id = tl.load(table_row + page_begin, mask=(page_begin * PAGE < seqlen) & (page_begin < max_blocks),
                           other=0)
        for page in tl.range(page_begin, page_end, num_stages=NUM_STAGES):
            # Each page's id is read an iteration ahead: the tile copies then depend on a loop-carried value,
            # not on a load of their own iteration, and the pipeliner keeps the next page's copies in flight
            # during this page's MMAs (with the id loaded in the same iteration it gave the tiles one buffer).
            next_page = page + 1
            next_id = tl.load(table_row + next_page, other=0,
                              mask=(next_page < page_end) & (next_page * PAGE < seqlen) & (next_page < max_blocks))
            tokens = page * PAGE + offs_n
            # Rows past the sequence's end may hold anything (NaN): never load them, so that 0 * NaN
            # cannot reach the accumulator.
            token_ok = tokens < seqlen
            kv_rows = kv_ptr + (block_id.to(tl.int64) * PAGE + offs_n[:, None]) * (DV + DR)
            # K^T in halves; transposed back, the same tensors are V's halves.
            kt_lo = tl.trans(tl.load(kv_rows + offs_h[None, :], mask=token_ok[:, None], other=0.0)).to(tl.bfloat16)
            kt_hi = tl.trans(tl.load(kv_rows + HALF + offs_h[None, :], mask=token_ok[:, None],
                                     other=0.0)).to(tl.bfloat16)
            kt_rope = tl.trans(tl.load(kv_rows + DV + offs_r[None, :], mask=token_ok[:, None],
                                       other=0.0)).to(tl.bfloat16)
            s = tl.dot(q_lo, kt_lo)
            s = tl.dot(q_hi, kt_hi, s)
            s = tl.dot(q_rope, kt_rope, s)
            s = s * score_scale
            visible = tokens[None, :] < key_limit[:, None]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen no key yet keeps max -inf; subtracting 0 then keeps exp2 at 0, not NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = round_to_bf16(p).to(tl.bfloat16)
            acc_lo = tl.dot(p, tl.trans(kt_lo), acc_lo * alpha[:, None])
            acc_hi = tl.dot(p, tl.trans(kt_hi), acc_hi * alpha[:, None])
            m_i = m_new
            block_id = next_id
        # l_i is exactly 0 only for a row that saw no key (its largest term is exp2(0) = 1); a NaN score
        # makes it NaN, which then reaches out and lse.
        no_keys = l_i == 0.0
        inv_l = tl.where(no_keys, 0.0, kv_scale / l_i)
        o_lo = acc_lo * inv_l[:, None]
        o_hi = acc_hi * inv_l[:, None]
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        if n_splits == 1:
            out_rows = out_ptr + (request.to(tl.int64) * rows + offs_m[:, None]) * DV + offs_h[None, :]
            tl.store(out_rows, round_to_bf16(o_lo).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.store(out_rows + HALF, round_to_bf16(o_hi).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
            t = offs_m // h_q
            h = offs_m - t * h_q
            tl.store(lse_ptr + request.to(tl.int64) * rows + h * s_q + t, tl.where(no_keys, float("inf"), lse),
                     mask=row_ok)
        else:
            # A split whose keys a row cannot see weighs 0 in the combine: lse -inf.
            # capacity * rows < 2^31
            part_rows = out_part_ptr + (g * rows + offs_m[:, None]).to(tl.int64) * DV + offs_h[None, :]
            tl.store(part_rows, o_lo, mask=row_ok[:, None])
            tl.store(part_rows + HALF, o_hi, mask=row_ok[:, None])
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


PAGE = 64
COMBINE_ROWS = 16
COMBINE_WARPS = 4


@dataclass(frozen=True)
class SplitConfig:
    block_m: int  # query rows per program
    num_warps: int
    num_stages: int  # pipeline stages of the page loop: 3 keeps the next page in flight during this one


# Per cache dtype, the largest row tile that compiles for sm_90 without spilling (Triton 3.6 and 3.9): 32 rows
# for bfloat16; 16 for float8_e4m3fn, whose widening to bfloat16 in registers takes the room of 16 rows.
SPLIT_CONFIGS = {
    torch.bfloat16: SplitConfig(block_m=32, num_warps=8, num_stages=3),
    torch.float8_e4m3fn: SplitConfig(block_m=16, num_warps=8, num_stages=3),
}


def mla_decode(q, kv_cache, block_table, cache_seqlens, kv_scale, schedule, out, lse, out_partial, lse_partial,
               softmax_scale: float, causal: bool) -> None:
    b, s_q, h_q, _ = q.shape
    rows = s_q * h_q
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    config = SPLIT_CONFIGS[kv_cache.dtype]
    scale_arg = kv_scale if fp8 else lse  # any float32 pointer; never read without FP8
    grid = (triton.cdiv(rows, config.block_m), schedule.num_parts)
    mla_decode_split_kernel[grid](
        q, kv_cache, block_table, cache_seqlens, scale_arg, schedule.part_splits, schedule.splits,
        schedule.split_offsets, out, lse, out_partial, lse_partial, s_q, h_q, block_table.shape[1],
        softmax_scale * LOG2E, FP8=fp8, CAUSAL=causal, BLOCK_M=config.block_m, PAGE=PAGE, DV=512, DR=64,
        NUM_STAGES=config.num_stages, num_warps=config.num_warps, num_stages=config.num_stages)
    mla_combine_kernel[(b, triton.cdiv(rows, COMBINE_ROWS))](
        schedule.split_offsets, out_partial, lse_partial, out, lse, s_q, h_q, BLOCK_R=COMBINE_ROWS, DV=512,
        num_warps=COMBINE_WARPS)


def _split_signature(kv_type: str) -> dict:
    return {"q_ptr": "*bf16", "kv_ptr": kv_type, "block_table_ptr": "*i32", "seqlens_ptr": "*i32",
            "kv_scale_ptr": "*fp32", "part_splits_ptr": "*i32", "splits_ptr": "*i32", "split_offsets_ptr": "*i32",
            "out_ptr": "*bf16", "lse_ptr": "*fp32", "out_part_ptr": "*fp32", "lse_part_ptr": "*fp32",
            "s_q": "i32", "h_q": "i32", "max_blocks": "i32", "scale_log2": "fp32"}


def _page_bytes(kv: str) -> int:
    return PAGE * (512 + 64) * (1 if kv == "fp8" else 2)


# The configs the wrapper launches (both caches, causal on, as MTP decode runs them); the audit compiles them
# for sm_90 and requires mma.sync, no spills, the page loop's global loads to be one page (K's 576 columns
# once, V taken from them: a separate V load would add 64 x 512 elements), and its one cp.async wait per
# page to leave the next page's copies in flight.
AOT_KERNELS = [
    AotKernel(
        name=f"mla_decode_split_kernel[{kv},causal,m{cfg.block_m}]",
        fn=mla_decode_split_kernel,
        signature=_split_signature(ty),
        constexprs={"FP8": kv == "fp8", "CAUSAL": True, "BLOCK_M": cfg.block_m, "PAGE": PAGE, "DV": 512, "DR": 64,
                    "NUM_STAGES": cfg.num_stages},
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        expect={"no_local_memory": True, "min_instructions": {"HMMA": 1},
                "mma_loop_load_bytes": _page_bytes(kv), "mma_loop_pipelined": True},
    )
    for kv, ty, cfg in (("bf16", "*bf16", SPLIT_CONFIGS[torch.bfloat16]),
                        ("fp8", "*fp8e4nv", SPLIT_CONFIGS[torch.float8_e4m3fn]))
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
