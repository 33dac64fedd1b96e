"""MoE expert-parallel dispatch and combine: the stages every backend implements, in plain torch.

Terms. W ranks, E experts, L = E / W local experts per rank; expert e lives on rank e // L. A token is sent
once to every rank hosting at least one of its top-k experts (slot value -1 = no expert).

Stages (each a kernel on the CUDA and Triton backends, with these exact results):
  dispatch_layout   topk_idx [T, k] -> tokens per rank [W], tokens per expert [E], token_slots [T, W] int32:
                    the token's row within its destination rank's send segment (tokens in ascending order),
                    -1 where the token does not go to that rank.
  pack              gathers each (token, destination) pair into the send buffer at
                    send_offsets[r] + token_slots[t, r] (send_offsets = exclusive prefix sum of the per-rank
                    counts), with a metadata row: the local expert ids (-1 for experts of other ranks), the
                    weights (0 where the id is -1) and, for FP8 payloads, the token's scales. With quantize=True
                    a bf16 payload is quantized to FP8 (per_token_group_quant_fp8, groups of 128) on the way.
  combine_reduce    out[t] = sum over r in ascending order of buf[send_offsets[r] + token_slots[t, r]] in
                    float32 (zero for a token sent nowhere), cast to buf's dtype.
  expert_ranks      recv_topk_idx [R, k] -> rows per local expert [L], and each (token, slot) pair's rank
                    among the pairs of its expert in row-major order (-1 where the id is -1).
  permute           writes pair (i, j) of expert e to row padded_starts[e] + rank[i, j] of the expert-sorted
                    buffer, where each expert's segment is padded to `alignment` rows; m_indices holds the
                    expert of every row, -1 on padding rows.
  unpermute         out[i] = sum over j in ascending order of weights[i, j] * y_sorted[pos[i, j]] (pos >= 0),
                    in float32, cast to y_sorted's dtype.

Metadata row layout (int32 words): [k local expert ids | k weights (float32 bits) | S scales (float32 bits)],
S = H / 128 for FP8 payloads and 0 for bf16 ones.
"""

from __future__ import annotations

import torch

from pykernels.reference.fp8_quant import per_token_group_quant_fp8

FP8 = torch.float8_e4m3fn
SCALE_GROUP = 128


def meta_width(topk: int, fp8_hidden: int | None) -> int:
    """int32 words in one metadata row (see the module docstring)."""
    return 2 * topk + (fp8_hidden // SCALE_GROUP if fp8_hidden is not None else 0)


def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, world: int):
    """-> (num_tokens_per_rank [W] int64, num_tokens_per_expert [E] int64, token_slots [T, W] int32)."""
    num_local = num_experts // world
    valid = topk_idx >= 0
    per_expert = torch.bincount(topk_idx[valid], minlength=num_experts)
    dest = torch.where(valid, topk_idx // num_local, -1)
    in_rank = (dest.unsqueeze(-1) == torch.arange(world, device=topk_idx.device)).any(dim=1)
    per_rank = in_rank.sum(dim=0)
    slots = torch.where(in_rank, torch.cumsum(in_rank.long(), dim=0) - 1, -1).to(torch.int32)
    return per_rank.to(torch.int64), per_expert.to(torch.int64), slots


def _pairs(token_slots: torch.Tensor, send_offsets: torch.Tensor):
    """(token, destination rank, send row) of every sent pair."""
    tokens, ranks = torch.nonzero(token_slots >= 0, as_tuple=True)
    rows = send_offsets[ranks] + token_slots[tokens, ranks].long()
    return tokens, ranks, rows


def pack(x: torch.Tensor, x_scales: torch.Tensor | None, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
         token_slots: torch.Tensor, send_offsets: torch.Tensor, num_send: int, num_local: int,
         quantize: bool = False):
    """-> (send_x [num_send, H], send_meta [num_send, meta_width] int32). See the module docstring."""
    hidden = x.shape[1]
    fp8 = x_scales is not None or quantize
    if quantize:
        x, x_scales = per_token_group_quant_fp8(x, SCALE_GROUP)
    tokens, ranks, rows = _pairs(token_slots, send_offsets)
    send_x = torch.empty((num_send, hidden), dtype=x.dtype, device=x.device)
    send_x[rows] = x[tokens]
    k = topk_idx.shape[1]
    meta = torch.empty((num_send, meta_width(k, hidden if fp8 else None)), dtype=torch.int32, device=x.device)
    local = topk_idx[tokens] - (ranks * num_local).unsqueeze(1)
    mine = (topk_idx[tokens] >= 0) & (local >= 0) & (local < num_local)
    meta[rows, :k] = torch.where(mine, local, -1).to(torch.int32)
    meta[rows, k:2 * k] = torch.where(mine, topk_weights[tokens], 0.0).float().view(torch.int32)
    if fp8:
        meta[rows, 2 * k:] = x_scales[tokens].float().contiguous().view(torch.int32)
    return send_x, meta


def unpack_meta(meta: torch.Tensor, topk: int):
    """-> (topk_idx [N, k] int64, topk_weights [N, k] float32, scales [N, S] float32 or None)."""
    idx = meta[:, :topk].to(torch.int64)
    weights = meta[:, topk:2 * topk].contiguous().view(torch.float32)
    scales = meta[:, 2 * topk:].contiguous().view(torch.float32) if meta.shape[1] > 2 * topk else None
    return idx, weights, scales


def combine_reduce(buf: torch.Tensor, token_slots: torch.Tensor, send_offsets: torch.Tensor) -> torch.Tensor:
    """-> [T, H] in buf's dtype: each token's returned rows summed over destination ranks in order."""
    num_tokens, world = token_slots.shape
    acc = torch.zeros((num_tokens, buf.shape[1]), dtype=torch.float32, device=buf.device)
    for r in range(world):
        tokens = torch.nonzero(token_slots[:, r] >= 0, as_tuple=True)[0]
        acc[tokens] += buf[send_offsets[r] + token_slots[tokens, r].long()].float()
    return acc.to(buf.dtype)


def expert_ranks(topk_idx: torch.Tensor, num_local: int):
    """-> (rows per local expert [L] int64, rank [R, k] int32 of each pair among its expert's pairs)."""
    flat = topk_idx.reshape(-1)
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=num_local)
    # A stable sort by expert keeps the row-major order of pairs inside each expert.
    order = torch.sort(torch.where(valid, flat, num_local), stable=True).indices
    sorted_experts = flat[order]
    firsts = exclusive_cumsum(counts)
    rank = torch.full_like(flat, -1)
    n_valid = int(valid.sum())
    positions = torch.arange(n_valid, device=flat.device)
    rank[order[:n_valid]] = positions - firsts[sorted_experts[:n_valid]]
    return counts.to(torch.int64), rank.reshape(topk_idx.shape).to(torch.int32)


def padded_starts(counts, alignment: int):
    """Python ints: each expert's first row in the expert-sorted buffer, and the buffer's total rows."""
    starts, total = [], 0
    for c in counts:
        starts.append(total)
        total += -(-int(c) // alignment) * alignment
    return starts, total


def permute(x: torch.Tensor, x_scales: torch.Tensor | None, topk_idx: torch.Tensor, rank: torch.Tensor,
            starts: torch.Tensor, total_rows: int):
    """-> (x_sorted [M, H], scales_sorted [M, S] or None, m_indices [M] int32, pos [R, k] int32).
    Padding rows are zero here; other backends leave them unwritten."""
    valid = topk_idx >= 0
    pos = torch.where(valid, starts[topk_idx.clamp(min=0)] + rank.long(), -1)
    tokens, slots = torch.nonzero(valid, as_tuple=True)
    rows = pos[tokens, slots]
    x_sorted = torch.zeros((total_rows, x.shape[1]), dtype=x.dtype, device=x.device)
    x_sorted[rows] = x[tokens]
    s_sorted = None
    if x_scales is not None:
        s_sorted = torch.zeros((total_rows, x_scales.shape[1]), dtype=x_scales.dtype, device=x.device)
        s_sorted[rows] = x_scales[tokens]
    m_indices = torch.full((total_rows,), -1, dtype=torch.int32, device=x.device)
    m_indices[rows] = topk_idx[tokens, slots].to(torch.int32)
    return x_sorted, s_sorted, m_indices, pos.to(torch.int32)


def unpermute(y_sorted: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-> [R, N] in y_sorted's dtype: each token's expert rows, weighted and summed in slot order."""
    acc = torch.zeros((pos.shape[0], y_sorted.shape[1]), dtype=torch.float32, device=y_sorted.device)
    for j in range(pos.shape[1]):
        rows = torch.nonzero(pos[:, j] >= 0, as_tuple=True)[0]
        acc[rows] += weights[rows, j].float().unsqueeze(1) * y_sorted[pos[rows, j].long()].float()
    return acc.to(y_sorted.dtype)
