"""MoE dispatch/combine stages in Triton: the same functions, with the same results, as
pykernels/reference/moe.py (read its docstring for the stage definitions and the metadata row layout).

Row copies (pack, permute) move payloads as integers of the element's width, so that every bit pattern (fp8
NaN codes included) arrives unchanged whatever the target does with floats. Each program owns one token row
and one BLOCK_H slice of it, sized for 16 bytes per thread; it reads the slice once and writes it to every
destination. The two counting stages (dispatch_layout, expert_ranks) are single-program scans: one pass over
the tokens in chunks, carrying running counts from chunk to chunk, so no second kernel or host round trip is
needed for the prefix sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pykernels.reference import moe as reference
from pykernels.triton.aot import AotKernel
from pykernels.triton.common import round_to_bf16
from pykernels.triton.fp8_quant import e4m3_codes, finite_scale, group_amax

NUM_WARPS = 4
SCALE_GROUP = reference.SCALE_GROUP
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@triton.jit
def quantized_block(row, BLOCK_H: tl.constexpr, NG: tl.constexpr):
    """A row block's e4m3 codes and the bits of its per-128-group scales, exactly as per_token_group_quant_fp8
    computes them, non-finite groups included."""
    xg = tl.reshape(row.to(tl.float32), [NG, 128])
    scale = finite_scale(group_amax(xg, 1), False)
    return tl.reshape(e4m3_codes(xg, scale[:, None]), [BLOCK_H]), scale.to(tl.int32, bitcast=True)


@triton.jit
def _to_output(acc, out_ptr):
    """float32 sums to the output's dtype, bf16 rounded to nearest even on every target."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = round_to_bf16(acc)
    return acc.to(out_ptr.dtype.element_ty)


@triton.jit
def dispatch_layout_kernel(
    idx_ptr,  # [T, TOPK] int64 expert ids, -1 = none
    per_rank_ptr,  # [world] int64 out: tokens sent to each rank
    per_expert_ptr,  # [num_experts] int64 out: (token, slot) pairs per expert
    slots_ptr,  # [T, world] int32 out: row in the destination's send segment, -1 = not sent
    num_tokens,
    num_experts,
    num_local,  # experts per rank
    world,
    TOPK: tl.constexpr,
    W_PAD: tl.constexpr,  # world rounded up to a power of two
    E_PAD: tl.constexpr,  # num_experts rounded up to a power of two
    BLOCK_T: tl.constexpr,  # tokens per chunk
):
    ranks = tl.arange(0, W_PAD)
    running = tl.zeros([W_PAD], dtype=tl.int32)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    start = 0
    while start < num_tokens:  # a while loop: triton 3.6's interpreter takes no runtime value as a range bound
        offs_t = start + tl.arange(0, BLOCK_T)
        in_range = offs_t < num_tokens
        hit = tl.zeros([BLOCK_T, W_PAD], dtype=tl.int32)
        for j in tl.static_range(TOPK):
            e = tl.load(idx_ptr + offs_t.to(tl.int64) * TOPK + j, mask=in_range, other=-1)
            valid = (e >= 0) & (e < num_experts)
            e = tl.where(valid, e, 0).to(tl.int32)
            counts += tl.histogram(e, E_PAD, mask=valid)
            dest = tl.where(valid, e // num_local, -1)
            hit = tl.maximum(hit, (dest[:, None] == ranks[None, :]).to(tl.int32))
        slot = tl.where(hit > 0, tl.cumsum(hit, axis=0) - 1 + running[None, :], -1)
        out_mask = in_range[:, None] & (ranks[None, :] < world)
        tl.store(slots_ptr + offs_t.to(tl.int64)[:, None] * world + ranks[None, :], slot, mask=out_mask)
        running += tl.sum(hit, axis=0)
        start += BLOCK_T
    tl.store(per_rank_ptr + ranks, running.to(tl.int64), mask=ranks < world)
    experts = tl.arange(0, E_PAD)
    tl.store(per_expert_ptr + experts, counts.to(tl.int64), mask=experts < num_experts)


@triton.jit
def pack_kernel(
    x_ptr,  # [T, hidden] payload (as integers) or bf16 when QUANTIZE
    xs_ptr,  # [T, hidden / 128] float32 scales of an FP8 payload (read when HAS_SCALES)
    idx_ptr,  # [T, TOPK] int64
    w_ptr,  # [T, TOPK] float32
    slots_ptr,  # [T, world] int32
    offsets_ptr,  # [world] int64: first send row of each destination
    send_x_ptr,  # [num_send, hidden] payload out (fp8 bytes when QUANTIZE)
    meta_ptr,  # [num_send, meta_width] int32 out
    hidden,
    num_local,
    world,
    meta_width,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # a multiple of 128 when the payload is FP8
    NG: tl.constexpr,  # scale groups per BLOCK_H: BLOCK_H / 128, at least 1
):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden
    row = tl.load(x_ptr + t * hidden + offs_h, mask=h_mask, other=0)
    groups = hb * NG + tl.arange(0, NG)
    g_mask = groups < hidden // 128
    if QUANTIZE:
        payload, scale_bits = quantized_block(row, BLOCK_H, NG)
    else:
        payload = row
        if HAS_SCALES:
            scale_bits = tl.load(xs_ptr + t * (hidden // 128) + groups, mask=g_mask, other=0.0).to(tl.int32,
                                                                                                  bitcast=True)
    offs_k = tl.arange(0, K_PAD)
    k_mask = offs_k < TOPK
    e = tl.load(idx_ptr + t * TOPK + offs_k, mask=k_mask, other=-1)
    wv = tl.load(w_ptr + t * TOPK + offs_k, mask=k_mask, other=0.0)
    r = 0
    while r < world:
        slot = tl.load(slots_ptr + t * world + r)
        if slot >= 0:
            dst = tl.load(offsets_ptr + r) + slot
            tl.store(send_x_ptr + dst * hidden + offs_h, payload, mask=h_mask)
            meta_row = meta_ptr + dst * meta_width
            if hb == 0:
                local = e - r * num_local
                mine = (e >= 0) & (local >= 0) & (local < num_local)
                tl.store(meta_row + offs_k, tl.where(mine, local, -1).to(tl.int32), mask=k_mask)
                tl.store(meta_row + TOPK + offs_k, tl.where(mine, wv, 0.0).to(tl.int32, bitcast=True), mask=k_mask)
            if QUANTIZE or HAS_SCALES:
                tl.store(meta_row + 2 * TOPK + groups, scale_bits, mask=g_mask)
        r += 1


@triton.jit
def combine_reduce_kernel(
    buf_ptr,  # [num_send, hidden] rows returned by the destination ranks
    slots_ptr,  # [T, world] int32
    offsets_ptr,  # [world] int64
    out_ptr,  # [T, hidden] out, buf's dtype
    hidden,
    world,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    r = 0
    while r < world:
        slot = tl.load(slots_ptr + t * world + r)
        if slot >= 0:
            src = tl.load(offsets_ptr + r) + slot
            acc += tl.load(buf_ptr + src * hidden + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        r += 1
    tl.store(out_ptr + t * hidden + offs_h, _to_output(acc, out_ptr), mask=h_mask)


@triton.jit
def expert_ranks_kernel(
    idx_ptr,  # [R * k] int64 local expert ids, -1 = none (row-major pairs)
    counts_ptr,  # [num_local] int64 out
    rank_ptr,  # [R * k] int32 out: the pair's rank among its expert's pairs, -1 = none
    num_pairs,
    num_local,
    L_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pairs per chunk
):
    experts = tl.arange(0, L_PAD)
    running = tl.zeros([L_PAD], dtype=tl.int32)
    start = 0
    while start < num_pairs:
        offs = start + tl.arange(0, BLOCK_P)
        in_range = offs < num_pairs
        e = tl.load(idx_ptr + offs, mask=in_range, other=-1)
        e = tl.where((e >= 0) & (e < num_local), e, -1).to(tl.int32)  # other ids take no row
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - 1 + running[None, :]
        rank = tl.sum(tl.where(onehot > 0, before, 0), axis=1)
        tl.store(rank_ptr + offs, tl.where(e >= 0, rank, -1), mask=in_range)
        running += tl.sum(onehot, axis=0)
        start += BLOCK_P
    tl.store(counts_ptr + experts, running.to(tl.int64), mask=experts < num_local)


@triton.jit
def permute_kernel(
    x_ptr,  # [R, hidden] payload as integers
    xs_ptr,  # [R, S] float32 scales (when HAS_SCALES)
    idx_ptr,  # [R, TOPK] int64 local expert ids
    rank_ptr,  # [R, TOPK] int32 from expert_ranks
    starts_ptr,  # [num_local] int64: first row of each expert's padded segment
    out_ptr,  # [M, hidden] out
    out_s_ptr,  # [M, S] out
    m_indices_ptr,  # [M] int32 out (pre-filled with -1 by the caller)
    pos_ptr,  # [R, TOPK] int32 out
    hidden,
    num_scales,
    num_local,
    TOPK: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden
    row = tl.load(x_ptr + i * hidden + offs_h, mask=h_mask, other=0)
    offs_s = tl.arange(0, S_PAD)
    s_mask = offs_s < num_scales
    if HAS_SCALES:
        srow = tl.load(xs_ptr + i * num_scales + offs_s, mask=s_mask, other=0.0)
    for j in tl.static_range(TOPK):
        e = tl.load(idx_ptr + i * TOPK + j)
        if (e >= 0) & (e < num_local):
            p = tl.load(starts_ptr + e) + tl.load(rank_ptr + i * TOPK + j)
            tl.store(out_ptr + p * hidden + offs_h, row, mask=h_mask)
            if hb == 0:
                tl.store(pos_ptr + i * TOPK + j, p.to(tl.int32))
                tl.store(m_indices_ptr + p, e.to(tl.int32))
                if HAS_SCALES:
                    tl.store(out_s_ptr + p * num_scales + offs_s, srow, mask=s_mask)
        else:
            if hb == 0:
                tl.store(pos_ptr + i * TOPK + j, -1)


@triton.jit
def unpermute_kernel(
    y_ptr,  # [M, hidden] expert outputs in expert-sorted order
    pos_ptr,  # [R, TOPK] int32 rows of y, -1 = none
    w_ptr,  # [R, TOPK] float32
    out_ptr,  # [R, hidden] out, y's dtype
    hidden,
    TOPK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        p = tl.load(pos_ptr + i * TOPK + j)
        if p >= 0:
            w = tl.load(w_ptr + i * TOPK + j)
            acc += w * tl.load(y_ptr + p.to(tl.int64) * hidden + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i * hidden + offs_h, _to_output(acc, out_ptr), mask=h_mask)


# ---- low-latency mode (fixed-size buffers; see the reference's definitions) ------------------------------

@triton.jit
def ll_pack_kernel(
    x_ptr,  # [T, hidden] bf16 (as int16 unless QUANTIZE)
    idx_ptr,  # [T, TOPK] int64
    send_bytes_ptr,  # the send buffer as bytes (FP8 payloads)
    send_half_ptr,  # ... as int16 (bf16 payloads)
    send_words_ptr,  # ... as int32 (scales and ids)
    num_tokens,
    hidden,
    num_experts,
    num_local,
    world,
    max_tokens,
    row_words,
    scale_word,
    id_word,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NG: tl.constexpr,
):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    offs_k = tl.arange(0, K_PAD)
    k_mask = offs_k < TOPK
    if t < num_tokens:
        t64 = t.to(tl.int64)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = offs_h < hidden
        row = tl.load(x_ptr + t64 * hidden + offs_h, mask=h_mask, other=0)
        groups = hb * NG + tl.arange(0, NG)
        g_mask = groups < hidden // 128
        if QUANTIZE:
            payload, scale_bits = quantized_block(row, BLOCK_H, NG)
        e = tl.load(idx_ptr + t64 * TOPK + offs_k, mask=k_mask, other=-1)
        valid = (e >= 0) & (e < num_experts)
        r = 0
        while r < world:
            local = e - r * num_local
            mine = valid & (local >= 0) & (local < num_local)
            dst = (r * max_tokens + t).to(tl.int64) * row_words
            if tl.max(mine.to(tl.int32), axis=0) > 0:
                if QUANTIZE:
                    tl.store(send_bytes_ptr + dst * 4 + offs_h, payload, mask=h_mask)
                    tl.store(send_words_ptr + dst + scale_word + groups, scale_bits, mask=g_mask)
                else:
                    tl.store(send_half_ptr + dst * 2 + offs_h, row, mask=h_mask)
            if hb == 0:
                tl.store(send_words_ptr + dst + id_word + offs_k, tl.where(mine, local, -1).to(tl.int32),
                         mask=k_mask)
            r += 1
    else:
        if hb == 0:
            r = 0
            while r < world:
                dst = (r * max_tokens + t).to(tl.int64) * row_words
                tl.store(send_words_ptr + dst + id_word + offs_k, tl.full([K_PAD], -1, tl.int32), mask=k_mask)
                r += 1


@triton.jit
def ll_positions_kernel(
    recv_ptr,  # [S, row_words] int32: the received rows
    count_ptr,  # [num_local] int32 out
    pos_ptr,  # [S, TOPK] int32 out
    num_rows,
    num_local,
    row_words,
    id_word,
    TOPK: tl.constexpr,
    L_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,  # rows per chunk
):
    experts = tl.arange(0, L_PAD)
    running = tl.zeros([L_PAD], dtype=tl.int32)
    start = 0
    while start < num_rows:
        offs_s = start + tl.arange(0, BLOCK_S)
        in_range = offs_s < num_rows
        ids_row = recv_ptr + offs_s.to(tl.int64) * row_words + id_word
        hit = tl.zeros([BLOCK_S, L_PAD], dtype=tl.int32)
        for j in tl.static_range(TOPK):
            e = tl.load(ids_row + j, mask=in_range, other=-1)
            hit = tl.maximum(hit, ((e[:, None] == experts[None, :]) & (e[:, None] >= 0)).to(tl.int32))
        before = tl.cumsum(hit, axis=0) - hit + running[None, :]
        for j in tl.static_range(TOPK):
            e = tl.load(ids_row + j, mask=in_range, other=-1)
            valid = (e >= 0) & (e < num_local)
            p = tl.sum(tl.where(e[:, None] == experts[None, :], before, 0), axis=1)
            tl.store(pos_ptr + offs_s.to(tl.int64) * TOPK + j, tl.where(valid, p, -1), mask=in_range)
        running += tl.sum(hit, axis=0)
        start += BLOCK_S
    tl.store(count_ptr + experts, running, mask=experts < num_local)


@triton.jit
def ll_unpack_kernel(
    recv_ptr,  # [S, row_words * 4 / P] the received rows as payload-width integers
    recv_words_ptr,  # the same rows as int32
    pos_ptr,  # [S, TOPK] int32
    out_ptr,  # [L, S, hidden] payload-width integers out
    out_s_ptr,  # [L, S, hidden / 128] float32 out (FP8)
    num_rows,
    hidden,
    row_words,
    scale_word,
    id_word,
    UNITS_PER_WORD: tl.constexpr,  # payload elements per int32 word: 4 (fp8) or 2 (bf16)
    TOPK: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NG: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden
    row = tl.load(recv_ptr + s * row_words * UNITS_PER_WORD + offs_h, mask=h_mask, other=0)
    groups = hb * NG + tl.arange(0, NG)
    num_scales = hidden // 128
    g_mask = groups < num_scales
    if HAS_SCALES:
        scales = tl.load(recv_words_ptr + s * row_words + scale_word + groups, mask=g_mask, other=0)
    for j in tl.static_range(TOPK):
        p = tl.load(pos_ptr + s * TOPK + j)
        if p >= 0:
            e = tl.load(recv_words_ptr + s * row_words + id_word + j).to(tl.int64)
            dst = e * num_rows + p
            tl.store(out_ptr + dst * hidden + offs_h, row, mask=h_mask)
            if HAS_SCALES:
                tl.store(out_s_ptr + dst * num_scales + groups, scales.to(tl.float32, bitcast=True), mask=g_mask)


@triton.jit
def ll_combine_pack_kernel(
    y_ptr,  # [L, S, hidden] bf16 expert outputs
    recv_words_ptr,  # [S, row_words] int32: the dispatch's received rows (for the ids)
    pos_ptr,  # [S, TOPK] int32
    ret_ptr,  # [S, TOPK, hidden] bf16 out
    num_rows,
    hidden,
    row_words,
    id_word,
    TOPK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden
    for j in tl.static_range(TOPK):
        p = tl.load(pos_ptr + s * TOPK + j)
        if p >= 0:
            e = tl.load(recv_words_ptr + s * row_words + id_word + j).to(tl.int64)
            v = tl.load(y_ptr + (e * num_rows + p) * hidden + offs_h, mask=h_mask, other=0)
            tl.store(ret_ptr + (s * TOPK + j) * hidden + offs_h, v, mask=h_mask)


@triton.jit
def ll_combine_reduce_kernel(
    ret_ptr,  # [W, max_tokens, TOPK, hidden] bf16: block q returned by rank q
    idx_ptr,  # [T, TOPK] int64
    w_ptr,  # [T, TOPK] float32
    out_ptr,  # [T, hidden] bf16 out
    hidden,
    num_experts,
    num_local,
    max_tokens,
    TOPK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        e = tl.load(idx_ptr + t * TOPK + j)
        if (e >= 0) & (e < num_experts):
            q = e // num_local
            w = tl.load(w_ptr + t * TOPK + j)
            src = ((q * max_tokens + t) * TOPK + j) * hidden
            acc += w * tl.load(ret_ptr + src + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * hidden + offs_h, _to_output(acc, out_ptr), mask=h_mask)


# ---- launch wrappers: the reference's stage functions ----------------------------------------------------

def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def block_h(hidden: int, element_size: int, minimum: int = 1) -> int:
    """Elements per program: 16 bytes per thread, no wider than the (padded) row."""
    return max(minimum, min(16 * 32 * NUM_WARPS // element_size, _pow2(hidden)))


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_WIDTH[t.element_size()])


def dispatch_layout(topk_idx, num_experts, world):
    tokens, topk = topk_idx.shape
    device = topk_idx.device
    per_rank = torch.empty(world, dtype=torch.int64, device=device)
    per_expert = torch.empty(num_experts, dtype=torch.int64, device=device)
    slots = torch.empty((tokens, world), dtype=torch.int32, device=device)
    e_pad = _pow2(num_experts)
    # One chunk's histogram input and hit matrix stay near 8K elements.
    block_t = max(16, min(256, 8192 // max(e_pad, _pow2(world))))
    dispatch_layout_kernel[(1,)](topk_idx, per_rank, per_expert, slots, tokens, num_experts, num_experts // world,
                                 world, TOPK=topk, W_PAD=_pow2(world), E_PAD=e_pad, BLOCK_T=block_t,
                                 num_warps=NUM_WARPS)
    return per_rank, per_expert, slots


def pack(x, x_scales, topk_idx, topk_weights, token_slots, send_offsets, num_send, num_local, quantize=False):
    tokens, hidden = x.shape
    topk = topk_idx.shape[1]
    fp8 = x_scales is not None or quantize
    send_x = torch.empty((num_send, hidden), dtype=reference.FP8 if fp8 else x.dtype, device=x.device)
    meta = torch.empty((num_send, reference.meta_width(topk, hidden if fp8 else None)), dtype=torch.int32,
                       device=x.device)
    if tokens == 0 or num_send == 0:
        return send_x, meta
    src = x if quantize else _as_int(x)
    bh = block_h(hidden, x.element_size(), SCALE_GROUP if fp8 else 1)
    grid = (tokens, triton.cdiv(hidden, bh))
    pack_kernel[grid](src, x_scales if x_scales is not None else meta, topk_idx, topk_weights, token_slots,
                      send_offsets, _as_int(send_x), meta, hidden, num_local, token_slots.shape[1], meta.shape[1],
                      TOPK=topk, K_PAD=_pow2(topk), HAS_SCALES=x_scales is not None, QUANTIZE=bool(quantize),
                      BLOCK_H=bh, NG=max(1, bh // SCALE_GROUP), num_warps=NUM_WARPS)
    return send_x, meta


def combine_reduce(buf, token_slots, send_offsets):
    tokens, world = token_slots.shape
    hidden = buf.shape[1]
    out = torch.empty((tokens, hidden), dtype=buf.dtype, device=buf.device)
    if tokens == 0 or hidden == 0:
        return out
    bh = block_h(hidden, buf.element_size())
    combine_reduce_kernel[(tokens, triton.cdiv(hidden, bh))](buf, token_slots, send_offsets, out, hidden, world,
                                                            BLOCK_H=bh, num_warps=NUM_WARPS)
    return out


def expert_ranks(topk_idx, num_local):
    counts = torch.empty(num_local, dtype=torch.int64, device=topk_idx.device)
    rank = torch.empty(topk_idx.shape, dtype=torch.int32, device=topk_idx.device)
    l_pad = _pow2(num_local)
    expert_ranks_kernel[(1,)](topk_idx, counts, rank, topk_idx.numel(), num_local, L_PAD=l_pad,
                              BLOCK_P=max(16, min(1024, 8192 // l_pad)), num_warps=NUM_WARPS)
    return counts, rank


def permute(x, x_scales, topk_idx, rank, starts, total_rows):
    rows, hidden = x.shape
    topk = topk_idx.shape[1]
    x_sorted = torch.zeros((total_rows, hidden), dtype=x.dtype, device=x.device)
    num_scales = x_scales.shape[1] if x_scales is not None else 0
    s_sorted = None if x_scales is None else torch.zeros((total_rows, num_scales), dtype=torch.float32,
                                                         device=x.device)
    m_indices = torch.full((total_rows,), -1, dtype=torch.int32, device=x.device)
    pos = torch.empty((rows, topk), dtype=torch.int32, device=x.device)
    if rows == 0:
        return x_sorted, s_sorted, m_indices, pos
    bh = block_h(hidden, x.element_size())
    permute_kernel[(rows, triton.cdiv(hidden, bh))](
        _as_int(x), x_scales if x_scales is not None else pos, topk_idx, rank, starts, _as_int(x_sorted),
        s_sorted if s_sorted is not None else pos, m_indices, pos, hidden, num_scales, starts.shape[0], TOPK=topk,
        HAS_SCALES=x_scales is not None, S_PAD=_pow2(num_scales), BLOCK_H=bh, num_warps=NUM_WARPS)
    return x_sorted, s_sorted, m_indices, pos


def unpermute(y_sorted, pos, weights):
    rows, topk = pos.shape
    hidden = y_sorted.shape[1]
    out = torch.empty((rows, hidden), dtype=y_sorted.dtype, device=y_sorted.device)
    if rows == 0 or hidden == 0:
        return out
    bh = block_h(hidden, y_sorted.element_size())
    unpermute_kernel[(rows, triton.cdiv(hidden, bh))](y_sorted, pos, weights, out, hidden, TOPK=topk, BLOCK_H=bh,
                                                     num_warps=NUM_WARPS)
    return out


def ll_pack(x, topk_idx, num_experts, world, max_tokens, row):
    tokens, hidden = x.shape
    send = torch.empty((world * max_tokens, row.words), dtype=torch.int32, device=x.device)
    if max_tokens == 0:
        return send
    bh = block_h(hidden, x.element_size(), SCALE_GROUP if row.fp8 else 1)
    grid = (max_tokens, triton.cdiv(hidden, bh))
    ll_pack_kernel[grid](x if row.fp8 else _as_int(x), topk_idx, send.view(torch.uint8), send.view(torch.int16),
                         send, tokens, hidden, num_experts, num_experts // world, world, max_tokens, row.words,
                         row.scale_word, row.id_word, TOPK=row.topk, K_PAD=_pow2(row.topk), QUANTIZE=row.fp8,
                         BLOCK_H=bh, NG=max(1, bh // SCALE_GROUP), num_warps=NUM_WARPS)
    return send


def ll_positions(recv, num_local, row):
    rows = recv.shape[0]
    count = torch.empty(num_local, dtype=torch.int32, device=recv.device)
    pos = torch.empty((rows, row.topk), dtype=torch.int32, device=recv.device)
    l_pad = _pow2(num_local)
    ll_positions_kernel[(1,)](recv, count, pos, rows, num_local, row.words, row.id_word, TOPK=row.topk,
                              L_PAD=l_pad, BLOCK_S=max(16, min(256, 8192 // l_pad)), num_warps=NUM_WARPS)
    return count, pos


def ll_unpack(recv, pos, num_local, row):
    rows = recv.shape[0]
    recv_x = torch.empty((num_local, rows, row.hidden), dtype=row.payload_dtype, device=recv.device)
    recv_s = torch.empty((num_local, rows, row.num_scales), dtype=torch.float32, device=recv.device) \
        if row.fp8 else None
    if rows == 0:
        return recv_x, recv_s
    unit = torch.uint8 if row.fp8 else torch.int16
    bh = block_h(row.hidden, recv_x.element_size(), SCALE_GROUP if row.fp8 else 1)
    ll_unpack_kernel[(rows, triton.cdiv(row.hidden, bh))](
        recv.view(unit), recv, pos, recv_x.view(unit), recv_s if recv_s is not None else recv, rows, row.hidden,
        row.words, row.scale_word, row.id_word, UNITS_PER_WORD=4 // recv_x.element_size(), TOPK=row.topk,
        HAS_SCALES=row.fp8, BLOCK_H=bh, NG=max(1, bh // SCALE_GROUP), num_warps=NUM_WARPS)
    return recv_x, recv_s


def ll_combine_pack(y, recv, pos, row):
    num_local, rows, hidden = y.shape
    ret = torch.empty((rows, row.topk, hidden), dtype=y.dtype, device=y.device)
    if rows == 0:
        return ret
    bh = block_h(hidden, y.element_size())
    ll_combine_pack_kernel[(rows, triton.cdiv(hidden, bh))](y, recv, pos, ret, rows, hidden, row.words, row.id_word,
                                                            TOPK=row.topk, BLOCK_H=bh, num_warps=NUM_WARPS)
    return ret


def ll_combine_reduce(returned, topk_idx, topk_weights, num_experts):
    world, max_tokens, topk, hidden = returned.shape
    tokens = topk_idx.shape[0]
    out = torch.empty((tokens, hidden), dtype=returned.dtype, device=returned.device)
    if tokens == 0:
        return out
    bh = block_h(hidden, returned.element_size())
    ll_combine_reduce_kernel[(tokens, triton.cdiv(hidden, bh))](
        returned, topk_idx, topk_weights, out, hidden, num_experts, num_experts // world, max_tokens, TOPK=topk,
        BLOCK_H=bh, num_warps=NUM_WARPS)
    return out


# Configs compiled ahead of time for sm_90 by the static audit: what the wrappers launch at DeepSeek-V3's
# sizes (4096 tokens, hidden 7168, top-8 of 256 experts, EP8: 8 ranks, 32 local experts).
_ROW_COPY = {"no_local_memory": True, "min_instructions": {"LDG.128": 1, "STG.128": 1}}

AOT_KERNELS = [
    AotKernel(
        name="dispatch_layout_kernel[E256,W8,k8]",
        fn=dispatch_layout_kernel,
        signature={"idx_ptr": "*i64", "per_rank_ptr": "*i64", "per_expert_ptr": "*i64", "slots_ptr": "*i32",
                   "num_tokens": "i32", "num_experts": "i32", "num_local": "i32", "world": "i32"},
        constexprs={"TOPK": 8, "W_PAD": 8, "E_PAD": 256, "BLOCK_T": 32},
        num_warps=NUM_WARPS,
        expect={"no_local_memory": True},
    ),
    AotKernel(
        name="pack_kernel[bf16,H7168,k8]",
        fn=pack_kernel,
        signature={"x_ptr": "*i16", "xs_ptr": "*i32", "idx_ptr": "*i64", "w_ptr": "*fp32", "slots_ptr": "*i32",
                   "offsets_ptr": "*i64", "send_x_ptr": "*i16", "meta_ptr": "*i32", "hidden": "i32:16",
                   "num_local": "i32", "world": "i32", "meta_width": "i32:16"},
        constexprs={"TOPK": 8, "K_PAD": 8, "HAS_SCALES": False, "QUANTIZE": False, "BLOCK_H": block_h(7168, 2),
                    "NG": block_h(7168, 2) // 128},
        num_warps=NUM_WARPS,
        expect=_ROW_COPY,
    ),
    AotKernel(
        name="pack_kernel[bf16->fp8,H7168,k8]",
        fn=pack_kernel,
        signature={"x_ptr": "*bf16", "xs_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32", "slots_ptr": "*i32",
                   "offsets_ptr": "*i64", "send_x_ptr": "*u8", "meta_ptr": "*i32", "hidden": "i32:16",
                   "num_local": "i32", "world": "i32", "meta_width": "i32"},
        constexprs={"TOPK": 8, "K_PAD": 8, "HAS_SCALES": False, "QUANTIZE": True, "BLOCK_H": block_h(7168, 2),
                    "NG": block_h(7168, 2) // 128},
        num_warps=NUM_WARPS,
        expect={"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    ),
    AotKernel(
        name="pack_kernel[fp8,H7168,k8]",
        fn=pack_kernel,
        signature={"x_ptr": "*u8", "xs_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32", "slots_ptr": "*i32",
                   "offsets_ptr": "*i64", "send_x_ptr": "*u8", "meta_ptr": "*i32", "hidden": "i32:16",
                   "num_local": "i32", "world": "i32", "meta_width": "i32"},
        constexprs={"TOPK": 8, "K_PAD": 8, "HAS_SCALES": True, "QUANTIZE": False, "BLOCK_H": block_h(7168, 1),
                    "NG": block_h(7168, 1) // 128},
        num_warps=NUM_WARPS,
        expect=_ROW_COPY,
    ),
    AotKernel(
        name="combine_reduce_kernel[bf16,H7168]",
        fn=combine_reduce_kernel,
        signature={"buf_ptr": "*bf16", "slots_ptr": "*i32", "offsets_ptr": "*i64", "out_ptr": "*bf16",
                   "hidden": "i32:16", "world": "i32"},
        constexprs={"BLOCK_H": block_h(7168, 2)},
        num_warps=NUM_WARPS,
        expect={"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    ),
    AotKernel(
        name="expert_ranks_kernel[L32]",
        fn=expert_ranks_kernel,
        signature={"idx_ptr": "*i64", "counts_ptr": "*i64", "rank_ptr": "*i32", "num_pairs": "i32",
                   "num_local": "i32"},
        constexprs={"L_PAD": 32, "BLOCK_P": 256},
        num_warps=NUM_WARPS,
        expect={"no_local_memory": True},
    ),
    AotKernel(
        name="permute_kernel[fp8,H7168,k8]",
        fn=permute_kernel,
        signature={"x_ptr": "*u8", "xs_ptr": "*fp32", "idx_ptr": "*i64", "rank_ptr": "*i32", "starts_ptr": "*i64",
                   "out_ptr": "*u8", "out_s_ptr": "*fp32", "m_indices_ptr": "*i32", "pos_ptr": "*i32",
                   "hidden": "i32:16", "num_scales": "i32", "num_local": "i32"},
        constexprs={"TOPK": 8, "HAS_SCALES": True, "S_PAD": 64, "BLOCK_H": block_h(7168, 1)},
        num_warps=NUM_WARPS,
        expect=_ROW_COPY,
    ),
    AotKernel(
        name="unpermute_kernel[bf16,H7168,k8]",
        fn=unpermute_kernel,
        signature={"y_ptr": "*bf16", "pos_ptr": "*i32", "w_ptr": "*fp32", "out_ptr": "*bf16", "hidden": "i32:16"},
        constexprs={"TOPK": 8, "BLOCK_H": block_h(7168, 2)},
        num_warps=NUM_WARPS,
        expect={"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    ),
    # Low-latency mode at DeepSeek-V3 decode sizes (hidden 7168, top-8, 32 local experts).
    AotKernel(
        name="ll_pack_kernel[bf16->fp8,H7168,k8]",
        fn=ll_pack_kernel,
        signature={"x_ptr": "*bf16", "idx_ptr": "*i64", "send_bytes_ptr": "*u8", "send_half_ptr": "*i16",
                   "send_words_ptr": "*i32", "num_tokens": "i32", "hidden": "i32:16", "num_experts": "i32",
                   "num_local": "i32", "world": "i32", "max_tokens": "i32", "row_words": "i32:16",
                   "scale_word": "i32", "id_word": "i32"},
        constexprs={"TOPK": 8, "K_PAD": 8, "QUANTIZE": True, "BLOCK_H": block_h(7168, 2, SCALE_GROUP),
                    "NG": block_h(7168, 2, SCALE_GROUP) // SCALE_GROUP},
        num_warps=NUM_WARPS,
        expect={"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    ),
    AotKernel(
        name="ll_unpack_kernel[fp8,H7168,k8]",
        fn=ll_unpack_kernel,
        signature={"recv_ptr": "*u8", "recv_words_ptr": "*i32", "pos_ptr": "*i32", "out_ptr": "*u8",
                   "out_s_ptr": "*fp32", "num_rows": "i32", "hidden": "i32:16", "row_words": "i32:16",
                   "scale_word": "i32", "id_word": "i32"},
        constexprs={"UNITS_PER_WORD": 4, "TOPK": 8, "HAS_SCALES": True, "BLOCK_H": block_h(7168, 1, SCALE_GROUP),
                    "NG": block_h(7168, 1, SCALE_GROUP) // SCALE_GROUP},
        num_warps=NUM_WARPS,
        expect={"no_local_memory": True},
    ),
    AotKernel(
        name="ll_combine_reduce_kernel[bf16,H7168,k8]",
        fn=ll_combine_reduce_kernel,
        signature={"ret_ptr": "*bf16", "idx_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": "*bf16", "hidden": "i32:16",
                   "num_experts": "i32", "num_local": "i32", "max_tokens": "i32"},
        constexprs={"TOPK": 8, "BLOCK_H": block_h(7168, 2)},
        num_warps=NUM_WARPS,
        expect={"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    ),
]
