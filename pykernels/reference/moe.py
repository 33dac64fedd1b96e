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
                    a bf16 payload is quantized to FP8 (per_token_group_quant_fp8, groups of 128) on the way,
                    by the quantizer's rules to the bit: a group holding a NaN gets scale NaN, one holding an
                    infinity +inf, and all codes of such a group are NaN.
  combine_reduce    out[t] = sum over r in ascending order of buf[send_offsets[r] + token_slots[t, r]] in
                    float32 (zero for a token sent nowhere), cast to buf's dtype.
  expert_ranks      recv_topk_idx [R, k] -> rows per local expert [L], and each (token, slot) pair's rank
                    among the pairs of its expert in row-major order (-1 where the id is -1).
  permute           writes pair (i, j) of expert e to row padded_starts[e] + rank[i, j] of the expert-sorted
                    buffer, where each expert's segment is padded to `alignment` rows; m_indices holds the
                    expert of every row, -1 on padding rows (whose payload and scales are zero).
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
    valid = (topk_idx >= 0) & (topk_idx < num_experts)  # other ids are ignored (the unchecked path's rule)
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
    valid = (flat >= 0) & (flat < num_local)  # other ids take no row (the unchecked path's rule)
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
    Padding rows are zero on every backend."""
    valid = (topk_idx >= 0) & (topk_idx < starts.shape[0])
    pos = torch.where(valid, starts[topk_idx.clamp(0, max(starts.shape[0] - 1, 0))] + rank.long(), -1)
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


# ---- low-latency mode --------------------------------------------------------------------------------------
#
# Every buffer has a size fixed by (W, M = max tokens per rank, H, k), never by the routing, so that nothing
# is read back to the host and the whole exchange can be captured in a CUDA graph.
#
#   ll_pack           x [T, H], topk_idx [T, k] -> send [W * M, row words] int32: block r (M rows) is what
#                     rank r receives; row t of it carries token t's payload (FP8 with its scales, quantized
#                     as pack's quantize=True, non-finite groups included; or bf16)
#                     and its k expert ids local to r (-1 for other ranks' experts, for -1 slots, for ids
#                     outside [0, E), and on the rows t >= T). A row whose ids are all -1 has an
#                     unspecified payload.
#   ll_positions      received ids [S, k] (S = W * M rows, block q from rank q) -> recv_count [L] int32 and
#                     pos [S, k] int32: the row of expert e's receive block that row s takes, its rank among
#                     the received rows holding e (in row order; a row naming e twice takes one row), -1
#                     where the id is -1.
#   ll_unpack         -> recv_x [L, S, H] (and scales [L, S, H / 128] for FP8): recv_x[e, pos[s, j]] is row
#                     s's payload for e = id[s, j]; rows at or past recv_count[e] are unspecified.
#   ll_combine_pack   y [L, S, H] bf16 -> ret [S, k, H] bf16: ret[s, j] = y[id[s, j], pos[s, j]], unspecified
#                     where the id is -1. Block q of ret goes back to rank q.
#   ll_combine_reduce returned [W, M, k, H] (block q from rank q) -> out [T, H] bf16: out[t] = sum over the
#                     slots j in order of topk_weights[t, j] * returned[id // L, t, j] for ids in [0, E), in
#                     float32 (rounded product, rounded sum), rounded once to bf16.
#
# Row layout (int32 words): the payload's bytes (H fp8 or 2H bf16), padded to a word; then S scales
# (float32 bits, FP8 only); then k local ids; padded to 16 bytes.


class LowLatencyRow:
    """Word offsets of one low-latency dispatch row (see above)."""

    def __init__(self, hidden: int, topk: int, fp8: bool):
        self.hidden, self.topk, self.fp8 = hidden, topk, fp8
        self.payload_bytes = hidden * (1 if fp8 else 2)
        self.num_scales = hidden // SCALE_GROUP if fp8 else 0
        self.scale_word = -(-self.payload_bytes // 4)
        self.id_word = self.scale_word + self.num_scales
        self.words = -(-(self.id_word + topk) // 4) * 4

    @property
    def payload_dtype(self):
        return FP8 if self.fp8 else torch.bfloat16


def ll_valid_ids(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The slots that name an expert: ids in [0, num_experts); every other id is ignored."""
    return (topk_idx >= 0) & (topk_idx < num_experts)


def ll_pack(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, world: int, max_tokens: int,
            row: LowLatencyRow) -> torch.Tensor:
    tokens, hidden = x.shape
    num_local = num_experts // world
    send = torch.zeros((world, max_tokens, row.words), dtype=torch.int32, device=x.device)
    valid = ll_valid_ids(topk_idx, num_experts)
    ranks = torch.arange(world, device=x.device).view(world, 1, 1)
    local = topk_idx.unsqueeze(0) - ranks * num_local
    mine = valid.unsqueeze(0) & (local >= 0) & (local < num_local)
    send[:, :, row.id_word:row.id_word + row.topk] = -1
    send[:, :tokens, row.id_word:row.id_word + row.topk] = torch.where(mine, local, -1).to(torch.int32)
    if row.fp8:
        q, scales = per_token_group_quant_fp8(x, SCALE_GROUP)
        payload = q.view(torch.uint8)
        send[:, :tokens, row.scale_word:row.id_word] = scales.view(torch.int32)
    else:
        payload = x.contiguous().view(torch.uint8)
    send.view(torch.uint8)[:, :tokens, :row.payload_bytes] = payload
    return send.view(world * max_tokens, row.words)


def ll_positions(recv: torch.Tensor, num_local: int, row: LowLatencyRow):
    """recv [S, row words] int32 -> (recv_count [L] int32, pos [S, k] int32)."""
    ids = recv[:, row.id_word:row.id_word + row.topk].long()
    valid = (ids >= 0) & (ids < num_local)
    experts = torch.arange(num_local, device=recv.device)
    hit = ((ids.unsqueeze(-1) == experts) & valid.unsqueeze(-1)).any(dim=1).to(torch.int32)  # [S, L]
    before = torch.cumsum(hit, dim=0) - hit
    pos = torch.where(valid, before.gather(1, ids.clamp(0, num_local - 1)), -1)
    return hit.sum(dim=0).to(torch.int32), pos.to(torch.int32)


def ll_payload(recv: torch.Tensor, row: LowLatencyRow) -> torch.Tensor:
    """The payload of every received row, [S, H] in the payload dtype."""
    data = recv.view(torch.uint8)[:, :row.payload_bytes].contiguous()
    return data.view(row.payload_dtype)


def ll_unpack(recv: torch.Tensor, pos: torch.Tensor, num_local: int, row: LowLatencyRow):
    """-> (recv_x [L, S, H], recv_scales [L, S, H / 128] float32 or None). Unused rows are zero here."""
    rows = recv.shape[0]
    ids = recv[:, row.id_word:row.id_word + row.topk].long()
    # One spare row past the L * S real ones absorbs the writes of the -1 slots, so every write has a
    # fixed shape and no index is read back to the host.
    dest = torch.where(pos >= 0, ids.clamp(min=0) * rows + pos.long(), num_local * rows)
    payload = ll_payload(recv, row)
    out_x = torch.zeros((num_local * rows + 1, row.hidden), dtype=row.payload_dtype, device=recv.device)
    out_s = None
    if row.fp8:
        scales = recv[:, row.scale_word:row.id_word].contiguous().view(torch.float32)
        out_s = torch.zeros((num_local * rows + 1, row.num_scales), dtype=torch.float32, device=recv.device)
    for j in range(row.topk):
        out_x.view(torch.uint8)[dest[:, j]] = payload.view(torch.uint8)
        if out_s is not None:
            out_s[dest[:, j]] = scales
    recv_x = out_x[:num_local * rows].view(num_local, rows, row.hidden)
    recv_s = None if out_s is None else out_s[:num_local * rows].view(num_local, rows, row.num_scales)
    return recv_x, recv_s


def ll_combine_pack(y: torch.Tensor, recv: torch.Tensor, pos: torch.Tensor, row: LowLatencyRow) -> torch.Tensor:
    """y [L, S, H] -> ret [S, k, H] in y's dtype (zero where the id is -1 here)."""
    num_local, rows, hidden = y.shape
    ids = recv[:, row.id_word:row.id_word + row.topk].long()
    src = torch.where(pos >= 0, ids.clamp(min=0) * rows + pos.long(), 0)
    ret = y.reshape(num_local * rows, hidden)[src.reshape(-1)].view(rows, row.topk, hidden)
    return torch.where((pos >= 0).unsqueeze(-1), ret, torch.zeros((), dtype=y.dtype, device=y.device))


def ll_combine_reduce(returned: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                      num_experts: int) -> torch.Tensor:
    """returned [W, M, k, H] -> out [T, H] in returned's dtype."""
    world, _, topk, hidden = returned.shape
    tokens = topk_idx.shape[0]
    num_local = num_experts // world
    valid = ll_valid_ids(topk_idx, num_experts)
    source = torch.where(valid, topk_idx // num_local, 0)
    token = torch.arange(tokens, device=returned.device)
    acc = torch.zeros((tokens, hidden), dtype=torch.float32, device=returned.device)
    for j in range(topk):
        rows = returned[source[:, j], token, j].float()
        acc = acc + torch.where(valid[:, j].unsqueeze(1), topk_weights[:, j].float().unsqueeze(1) * rows, 0.0)
    return acc.to(returned.dtype)
