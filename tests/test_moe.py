"""MoE dispatch/combine and the expert permutation: the reference against independent loops, every
backend's stages against the reference, argument checks that fire before any communication, and the whole
exchange across 2 and 4 CPU ranks over gloo (tests/moe_dist.py spawns them, with a hard timeout).

Tolerances: layouts, slots, counts, packed rows and permutations are integer or copy results and must be
exact. Sums (combine, unpermute) are float32 accumulations in a fixed order, so backends must agree with the
reference to float32 rounding of the final cast: bit-exact for float32 outputs up to the addition order, and
within one bf16 ulp (2^-8 relative) for bf16 outputs. FP8 bytes may differ by one e4m3 step on rounding ties.
"""

import pytest
import torch

import moe_dist
import pykernels
from pykernels import moe
from pykernels.reference import fp8_quant as fq
from pykernels.reference import moe as ref

BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
FP8 = torch.float8_e4m3fn


def routing(tokens, topk, experts, seed=0, allowed=None):
    return moe_dist.make_routing(tokens, topk, experts, torch.Generator().manual_seed(seed), allowed)


# ---- the reference against independent loops ----------------------------------------------------------------

@pytest.mark.parametrize("tokens,topk,experts,world", [(1, 1, 2, 2), (37, 4, 16, 4), (130, 8, 64, 8), (0, 2, 4, 2)])
def test_reference_layout_vs_loops(tokens, topk, experts, world):
    idx, _ = routing(tokens, topk, experts, seed=tokens)
    per_rank, per_expert, slots = ref.dispatch_layout(idx, experts, world)
    num_local = experts // world
    next_slot = [0] * world
    want_expert = [0] * experts
    for t in range(tokens):
        ranks = {int(e) // num_local for e in idx[t] if e >= 0}
        for e in idx[t]:
            if e >= 0:
                want_expert[int(e)] += 1
        for r in range(world):
            if r in ranks:
                assert int(slots[t, r]) == next_slot[r]
                next_slot[r] += 1
            else:
                assert int(slots[t, r]) == -1
    assert per_rank.tolist() == next_slot and per_expert.tolist() == want_expert
    assert slots.dtype == torch.int32 and per_rank.dtype == torch.int64


def test_reference_expert_ranks_and_permute_vs_loops():
    idx, _ = routing(50, 6, 8, seed=3)
    counts, rank = ref.expert_ranks(idx, 8)
    seen = [0] * 8
    for i in range(50):
        for j in range(6):
            e = int(idx[i, j])
            assert int(rank[i, j]) == (seen[e] if e >= 0 else -1)
            if e >= 0:
                seen[e] += 1
    assert counts.tolist() == seen
    starts, total = ref.padded_starts(counts.tolist(), 16)
    assert total == sum(-(-c // 16) * 16 for c in seen) and starts[0] == 0
    x = torch.randn(50, 64).bfloat16()
    xs, _, m_indices, pos = ref.permute(x, None, idx, rank, torch.tensor(starts), total)
    for i in range(50):
        for j in range(6):
            e = int(idx[i, j])
            if e < 0:
                assert int(pos[i, j]) == -1
                continue
            p = int(pos[i, j])
            assert starts[e] <= p < starts[e] + seen[e] and int(m_indices[p]) == e and torch.equal(xs[p], x[i])
    assert int((m_indices >= 0).sum()) == sum(seen)


def test_reference_unpermute_and_combine_vs_float64():
    idx, w = routing(40, 4, 8, seed=5)
    counts, rank = ref.expert_ranks(idx, 8)
    starts, total = ref.padded_starts(counts.tolist(), 8)
    _, _, _, pos = ref.permute(torch.zeros(40, 1), None, idx, rank, torch.tensor(starts), total)
    y = torch.randn(total, 96)
    got = ref.unpermute(y, pos, w)
    want = torch.zeros(40, 96, dtype=torch.float64)
    for i in range(40):
        for j in range(4):
            if pos[i, j] >= 0:
                want[i] += float(w[i, j]) * y[int(pos[i, j])].double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # float32 sums of <= 4 terms

    per_rank, _, slots = ref.dispatch_layout(idx, 8, 4)
    offsets = ref.exclusive_cumsum(per_rank)
    buf = torch.randn(int(per_rank.sum()), 96)
    got = ref.combine_reduce(buf, slots, offsets)
    want = torch.zeros(40, 96, dtype=torch.float64)
    for t in range(40):
        for r in range(4):
            if slots[t, r] >= 0:
                want[t] += buf[int(offsets[r] + slots[t, r])].double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


# ---- every backend's stages against the reference --------------------------------------------------------

STAGE_CASES = [(1, 1, 4, 2, 128), (37, 4, 16, 4, 256), (70, 8, 32, 8, 384), (5, 3, 6, 3, 200)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,topk,experts,world,hidden", STAGE_CASES)
def test_dispatch_stages_match_reference(backend, tokens, topk, experts, world, hidden, device):
    stages = moe._stages(backend)
    idx, w = routing(tokens, topk, experts, seed=tokens + hidden)
    x = torch.randn(tokens, hidden).bfloat16()
    per_rank, per_expert, slots = stages.dispatch_layout(idx.to(device), experts, world)
    want_rank, want_expert, want_slots = ref.dispatch_layout(idx, experts, world)
    assert torch.equal(per_rank.cpu(), want_rank) and torch.equal(per_expert.cpu(), want_expert)
    assert torch.equal(slots.cpu(), want_slots)

    offsets = ref.exclusive_cumsum(want_rank)
    num_send, num_local = int(want_rank.sum()), experts // world
    args = (idx, w, want_slots, offsets, num_send, num_local)
    on = [t.to(device) for t in args[:4]] + list(args[4:])
    send_x, meta = stages.pack(x.to(device), None, *on)
    want_x, want_meta = ref.pack(x, None, *args)
    assert torch.equal(send_x.cpu(), want_x) and torch.equal(meta.cpu(), want_meta)

    if hidden % 128 == 0:  # FP8 pairs and on-the-fly quantization
        q, s = fq.per_token_group_quant_fp8(x)
        send_q, meta_q = stages.pack(q.to(device), s.to(device), *on)
        want_q, want_meta_q = ref.pack(q, s, *args)
        assert torch.equal(send_q.cpu().view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(meta_q.cpu(), want_meta_q)
        send_q, meta_q = stages.pack(x.to(device), None, *on, quantize=True)
        assert torch.equal(meta_q.cpu(), want_meta_q), "fused quantization: scales or metadata differ"
        assert moe_dist.fp8_steps(send_q.cpu(), want_q) <= 1

    for dtype in (torch.bfloat16, torch.float32):
        buf = torch.randn(num_send, hidden).to(dtype)
        got = stages.combine_reduce(buf.to(device), want_slots.to(device), offsets.to(device))
        want = ref.combine_reduce(buf, want_slots, offsets)
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu(), want, rtol=2 ** -8 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,topk,num_local,hidden,alignment", [(1, 1, 1, 128, 128), (45, 4, 5, 256, 16),
                                                                   (90, 8, 32, 384, 128), (7, 2, 3, 136, 4)])
def test_permute_stages_match_reference(backend, rows, topk, num_local, hidden, alignment, device):
    stages = moe._stages(backend)
    idx, w = routing(rows, topk, num_local, seed=rows)
    counts, rank = stages.expert_ranks(idx.to(device), num_local)
    want_counts, want_rank = ref.expert_ranks(idx, num_local)
    assert torch.equal(counts.cpu(), want_counts) and torch.equal(rank.cpu(), want_rank)
    starts, total = ref.padded_starts(want_counts.tolist(), alignment)
    starts = torch.tensor(starts)
    x = torch.randn(rows, hidden).bfloat16()
    scales = torch.rand(rows, hidden // 128) if hidden % 128 == 0 else None
    data = x if scales is None else x.to(FP8)
    got = stages.permute(data.to(device), None if scales is None else scales.to(device), idx.to(device),
                         want_rank.to(device), starts.to(device), total)
    want = ref.permute(data, scales, idx, want_rank, starts, total)
    valid = want[3][want[3] >= 0].long()
    assert torch.equal(got[3].cpu(), want[3]) and torch.equal(got[2].cpu(), want[2])
    assert torch.equal(got[0].cpu()[valid].view(torch.uint8), want[0][valid].view(torch.uint8))
    if scales is not None:
        assert torch.equal(got[1].cpu()[valid], want[1][valid])
    for dtype in (torch.bfloat16, torch.float32):
        y = torch.randn(total, hidden).to(dtype)
        y[want[2] < 0] = float("nan")  # padding rows must never be read
        out = stages.unpermute(y.to(device), want[3].to(device), w.to(device))
        assert out.dtype == dtype and not bool(out.isnan().any())
        torch.testing.assert_close(out.cpu(), ref.unpermute(y, want[3], w),
                                   rtol=2 ** -8 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_unpermute_round_trip(backend, device):
    """permute_to_experts then unpermute_from_experts with weights 1/count gives each token back."""
    idx, _ = routing(60, 6, 10, seed=11)
    x = torch.randn(60, 256).bfloat16().to(device)
    x_sorted, m_indices, perm = moe.permute_to_experts(x, idx.to(device), alignment=32, backend=backend)
    assert x_sorted.shape[0] % 32 == 0 and m_indices.dtype == torch.int32 and perm.shape == idx.shape
    counts = [int((m_indices.cpu() == e).sum()) for e in range(10)]
    assert counts == [int((idx == e).sum()) for e in range(10)]
    fan = (idx >= 0).sum(1, keepdim=True)
    w = torch.where(idx >= 0, 1.0 / fan.clamp(min=1).float(), 0.0).to(device)
    back = moe.unpermute_from_experts(x_sorted, perm, w, backend=backend).cpu()
    routed = fan.squeeze(1) > 0
    # A mean of identical bf16 rows in float32, rounded once: within one bf16 ulp.
    torch.testing.assert_close(back[routed], x.cpu()[routed], rtol=2 ** -8, atol=0)
    assert bool((back[~routed] == 0).all())


# ---- argument checks: before any communication ----------------------------------------------------------

class NoCommunication(moe.Transport):
    """A transport for a world of 4 that lets through only the agreement header (as if the other ranks sent
    the same one) and fails the test if Buffer ever moves rows: a bad call must raise first."""

    rank, world_size = 0, 4

    def exchange_counts(self, counts):
        assert counts.shape[0] == 4 and counts.dtype == torch.int64, "only the agreement header may pass"
        assert not bool(counts[:, 0].any()), "a bad call must join the header marked invalid"
        return counts.clone()

    def exchange_rows(self, send, send_splits, recv_splits):
        raise AssertionError("rows moved before the arguments were checked")


def test_bad_inputs_raise_before_any_rows_move():
    buffer = moe.Buffer(transport=NoCommunication(), backend="torch")
    x = torch.randn(6, 256).bfloat16()
    idx, w = routing(6, 2, 8)
    cases = [
        (lambda: buffer.dispatch(x, idx.clone().fill_(8), w, 8), ValueError, "topk_idx: expected expert ids in \\[0, 8\\)"),
        (lambda: buffer.dispatch(x, idx.clone().fill_(-2), w, 8), ValueError, "got -2"),
        (lambda: buffer.dispatch(x, idx, w, 10), ValueError, "num_experts: expected a positive multiple of the group size 4"),
        (lambda: buffer.dispatch(x, idx, w, 8.0), TypeError, "num_experts: expected an int"),
        (lambda: buffer.dispatch(x[:5], idx, w, 8), ValueError, "topk_idx: expected 5 rows"),
        (lambda: buffer.dispatch(x, idx, w[:5], 8), ValueError, "topk_weights: expected shape"),
        (lambda: buffer.dispatch(x.float(), idx, w, 8), TypeError, "x: expected dtype bfloat16"),
        (lambda: buffer.dispatch(x, idx.int(), w, 8), TypeError, "topk_idx: expected dtype int64"),
        (lambda: buffer.dispatch(x, idx, w.double(), 8), TypeError, "topk_weights: expected dtype float32"),
        (lambda: buffer.dispatch((x.to(FP8)[:, :200].contiguous(), torch.ones(6, 2)), idx, w, 8), ValueError,
         "multiple of 128 for FP8"),
        (lambda: buffer.dispatch((x.to(FP8), torch.ones(6, 3)), idx, w, 8), ValueError, "x\\[1\\]: expected shape"),
        (lambda: buffer.dispatch((x, torch.ones(6, 2)), idx, w, 8), TypeError, "x\\[0\\]: expected dtype float8"),
        (lambda: buffer.dispatch(x[:, :200].contiguous(), idx, w, 8, quantize_fp8=True), ValueError, "quantize_fp8"),
        (lambda: buffer.dispatch(x, idx, w, 8, layout=(1, 2)), TypeError, "layout: expected"),
        (lambda: buffer.get_dispatch_layout(idx, 6), ValueError, "num_experts"),
        (lambda: buffer.combine(x, None), TypeError, "handle: expected the DispatchHandle"),
        (lambda: buffer.dispatch(x, idx, None, 8), TypeError, "topk_weights: expected a torch.Tensor, got NoneType"),
        (lambda: buffer.dispatch(x, idx, w, 8, quantize_fp8="no"), TypeError, "quantize_fp8: expected a bool"),
        (lambda: buffer.dispatch(x, idx, w, 8, check_ids=1), TypeError, "check_ids: expected a bool"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    with pytest.raises(ValueError, match="backend: expected one of"):
        moe.Buffer(transport=NoCommunication(), backend="nccl")
    with pytest.raises(TypeError, match="transport: expected a pykernels.moe.Transport"):
        moe.Buffer(transport=object())


def test_explicit_backend_that_cannot_run_says_why_before_communication():
    buffer = moe.Buffer(transport=NoCommunication(), backend="cuda")
    idx, w = routing(6, 2, 8)
    if torch.cuda.is_available():
        pytest.skip("checks the error a CPU-only machine gives")
    with pytest.raises(RuntimeError, match="backend='cuda' needs"):
        buffer.dispatch(torch.randn(6, 128).bfloat16(), idx, w, 8)


class Loopback(moe.Transport):
    """A one-rank transport that hands every row straight back: Buffer works with any Transport."""

    rank, world_size = 0, 1

    def exchange_counts(self, counts):
        return counts.clone()

    def exchange_rows(self, send, send_splits, recv_splits):
        assert list(send_splits) == list(recv_splits)
        return send.clone()


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffer_over_a_swapped_in_transport(backend, device):
    buffer = moe.Buffer(transport=Loopback(), backend=backend)
    idx, w = routing(23, 3, 6, seed=9)
    x = torch.randn(23, 256).bfloat16()
    recv_x, recv_idx, recv_w, per_expert, handle = buffer.dispatch(x.to(device), idx.to(device), w.to(device), 6)
    routed = (idx >= 0).any(1)
    assert torch.equal(recv_x.cpu(), x[routed]) and torch.equal(recv_idx.cpu(), idx[routed])
    assert torch.equal(recv_w.cpu(), w[routed])
    assert per_expert == [int((idx == e).sum()) for e in range(6)]
    out = buffer.combine(recv_x, handle).cpu()
    assert torch.equal(out[routed], x[routed]) and bool((out[~routed] == 0).all())
    # A layout given as the plain (per_rank, per_expert, in_rank) triple gives the same exchange.
    layout = tuple(buffer.get_dispatch_layout(idx.to(device), 6))
    again = buffer.dispatch(x.to(device), idx.to(device), w.to(device), 6, layout=layout)
    assert torch.equal(again[0].cpu(), recv_x.cpu()) and torch.equal(again[4].token_slots, handle.token_slots)
    (q, s), _, _, _, handle = buffer.dispatch(x.to(device), idx.to(device), w.to(device), 6, quantize_fp8=True)
    want_q, want_s = fq.per_token_group_quant_fp8(x[routed])
    assert torch.equal(s.cpu(), want_s) and moe_dist.fp8_steps(q.cpu(), want_q) <= 1


def test_layout_is_local_and_matches_reference():
    buffer = moe.Buffer(transport=NoCommunication(), backend="torch")
    idx, _ = routing(33, 4, 16, seed=2)
    layout = buffer.get_dispatch_layout(idx, 16)
    per_rank, per_expert, in_rank = layout
    want_rank, want_expert, want_slots = ref.dispatch_layout(idx, 16, 4)
    assert torch.equal(per_rank, want_rank) and torch.equal(per_expert, want_expert)
    assert torch.equal(in_rank, want_slots >= 0) and in_rank.dtype == torch.bool


def test_permute_and_unpermute_bad_inputs():
    x = torch.randn(4, 256).bfloat16()
    idx = torch.tensor([[0, 1], [1, -1], [-1, -1], [2, 0]])
    with pytest.raises(ValueError, match="recv_topk_idx: expected local expert ids in \\[0, 2\\)"):
        moe.permute_to_experts(x, idx, num_local_experts=2)
    with pytest.raises(ValueError, match="recv_topk_idx: expected 4 rows"):
        moe.permute_to_experts(x, idx[:3])
    with pytest.raises(ValueError, match="alignment: expected a power of two"):
        moe.permute_to_experts(x, idx, alignment=100)
    with pytest.raises(TypeError, match="recv_x: expected dtype bfloat16"):
        moe.permute_to_experts(x.half(), idx)
    _, _, perm = moe.permute_to_experts(x, idx, alignment=4)
    with pytest.raises(ValueError, match="recv_topk_weights: expected shape"):
        moe.unpermute_from_experts(torch.randn(12, 8), perm, torch.rand(4, 3))
    with pytest.raises(ValueError, match="perm: expected rows in \\[0, 3\\)"):
        moe.unpermute_from_experts(torch.randn(3, 8), perm, torch.rand(4, 2))
    with pytest.raises(TypeError, match="perm: expected dtype int32"):
        moe.unpermute_from_experts(torch.randn(12, 8), perm.long(), torch.rand(4, 2))


# ---- multi-rank over gloo -------------------------------------------------------------------------------

# (world, token counts per rank, hidden, topk, experts, allowed experts or None): uneven counts, a rank
# without tokens, and (allowed) experts only on some ranks, so that other ranks receive nothing.
DIST_CASES = [
    (2, [37, 20], 256, 4, 8, None),
    (4, [37, 0, 5, 64], 136, 6, 16, [0, 1, 2, 3, 4, 5, 6, 7, 12, 13]),
]


@pytest.mark.parametrize("world,counts,hidden,topk,experts,allowed", DIST_CASES)
def test_dispatch_combine_multi_rank(world, counts, hidden, topk, experts, allowed):
    stats = moe_dist.run_ranks(world, moe_dist.program_dispatch_combine, "torch", world, counts, hidden, topk,
                               experts, allowed)
    assert sum(s["received"] for s in stats) == sum(s["sent"] for s in stats)
    if allowed is not None:
        assert stats[2]["received"] == 0, "rank 2 hosts none of the allowed experts"


def test_dispatch_combine_multi_rank_triton():
    moe_dist.run_ranks(2, moe_dist.program_dispatch_combine, "triton", 7, [9, 14], 128, 3, 4, None)


def test_fp8_dispatch_multi_rank():
    received = moe_dist.run_ranks(4, moe_dist.program_fp8, "torch", 3, [21, 0, 8, 30], 256, 4, 16)
    assert sum(received) > 0


def test_all_tokens_routed_nowhere_multi_rank():
    """With every slot -1 nothing is sent or received, and combine returns zeros."""
    stats = moe_dist.run_ranks(2, moe_dist.program_dispatch_combine, "torch", 5, [6, 3], 128, 2, 4, [])
    assert all(s["received"] == 0 and s["sent"] == 0 for s in stats)


def test_bad_calls_leave_no_rank_hanging():
    assert moe_dist.run_ranks(2, moe_dist.program_bad_calls_then_dispatch, "torch") == [4, 4]


@pytest.mark.skipif(not hasattr(pykernels, "m_grouped_fp8_gemm_nt_contiguous"),
                    reason="grouped FP8 GEMM not in this build")
@pytest.mark.parametrize("world,backend", [(2, "torch"), (4, "torch"), (2, "triton")])
def test_moe_layer_end_to_end_multi_rank(world, backend):
    counts = [40, 9, 0, 23][:world]
    diffs = moe_dist.run_ranks(world, moe_dist.program_moe_layer, backend, 13, counts, 256, 192, 4, 8)
    assert max(diffs) < 1e-4


def test_harness_reports_a_failing_rank_without_hanging():
    with pytest.raises(AssertionError, match="rank 1 of 2 failed"):
        moe_dist.run_ranks(2, moe_dist.program_fails_on_rank_1, timeout=60)


# ---- the CUDA kernels' index math, run on the host ------------------------------------------------------

def _extension():
    from pykernels import _backend

    ext, why = _backend.extension()
    if ext is None:
        pytest.skip(f"the CUDA extension is not built here: {why}")
    return ext


@pytest.mark.parametrize("tokens,topk,experts,world,hidden", STAGE_CASES + [(300, 8, 256, 8, 0), (0, 2, 4, 2, 0)])
def test_cuda_planners_match_reference(tokens, topk, experts, world, hidden):
    ext = _extension()
    idx, _ = routing(tokens, topk, experts, seed=tokens + 1)
    per_rank = torch.full((world,), -7, dtype=torch.int64)
    per_expert = torch.full((experts,), -7, dtype=torch.int64)
    slots = torch.full((tokens, world), -7, dtype=torch.int32)
    ext.moe_plan_dispatch_layout(idx, per_rank, per_expert, slots, experts)
    want_rank, want_expert, want_slots = ref.dispatch_layout(idx, experts, world)
    assert torch.equal(per_rank, want_rank) and torch.equal(per_expert, want_expert)
    assert torch.equal(slots, want_slots)

    num_local = experts // world
    local, _ = routing(tokens, topk, num_local, seed=tokens + 2)
    counts = torch.full((num_local,), -7, dtype=torch.int64)
    rank = torch.full(local.shape, -7, dtype=torch.int32)
    ext.moe_plan_expert_ranks(local, counts, rank)
    want_counts, want_rank_in_expert = ref.expert_ranks(local, num_local)
    assert torch.equal(counts, want_counts) and torch.equal(rank, want_rank_in_expert)
    starts, total = ref.padded_starts(want_counts.tolist(), 128)
    assert [ext.moe_padded_rows(int(c), 128) for c in want_counts] == [-(-int(c) // 128) * 128 for c in want_counts]
    m_indices = torch.full((total,), -1, dtype=torch.int32)
    pos = torch.full(local.shape, -7, dtype=torch.int32)
    ext.moe_plan_permute(local, rank, torch.tensor(starts), m_indices, pos)
    _, _, want_m, want_pos = ref.permute(torch.zeros(tokens, 1), None, local, want_rank_in_expert,
                                         torch.tensor(starts), total)
    assert torch.equal(pos, want_pos) and torch.equal(m_indices, want_m)
    # Every sorted row is used at most once and never past its expert's padded segment.
    rows = pos[pos >= 0]
    assert rows.unique().numel() == rows.numel() and (rows.numel() == 0 or int(rows.max()) < total)


def test_cuda_launchers_validate_before_launch():
    ext = _extension()
    idx, w = routing(8, 2, 8)
    x = torch.randn(8, 256).bfloat16()
    slots = torch.zeros(8, 4, dtype=torch.int32)
    offsets = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="topk_idx: expected dtype int64"):
        ext.moe_dispatch_layout(idx.int(), torch.empty(4, dtype=torch.int64), torch.empty(8, dtype=torch.int64),
                                slots, 8, 0)
    with pytest.raises(ValueError, match="topk_idx: expected a CUDA tensor"):
        ext.moe_dispatch_layout(idx, torch.empty(4, dtype=torch.int64), torch.empty(8, dtype=torch.int64), slots, 8, 0)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        ext.moe_pack(x, None, idx, w, slots, offsets, torch.empty(8, 256).bfloat16(),
                     torch.empty(8, 4, dtype=torch.int32), 2, False, 0)
    with pytest.raises(TypeError, match="x: expected dtype float8_e4m3fn"):
        ext.moe_pack(x, torch.ones(8, 2), idx, w, slots, offsets, x, x, 2, False, 0)
    with pytest.raises(TypeError, match="buf: expected dtype bfloat16 or float32"):
        ext.moe_combine_reduce(x.half(), slots, offsets, x, 0)
    with pytest.raises(ValueError, match="recv_topk_idx: expected a CUDA tensor"):
        ext.moe_expert_ranks(idx, torch.empty(4, dtype=torch.int64), torch.empty(8, 2, dtype=torch.int32),
                             torch.empty(1, 4, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="num_local: expected a value in \\[1, 256\\]"):
        ext.moe_plan_expert_ranks(idx, torch.empty(300, dtype=torch.int64), torch.empty(8, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="y_sorted: expected a CUDA tensor"):
        ext.moe_unpermute(x, torch.zeros(8, 2, dtype=torch.int32), torch.zeros(8, 2), x, 0)
    with pytest.raises(ValueError, match="rank: expected a CPU tensor|rank: expected shape|rank: expected size"):
        ext.moe_plan_permute(idx, torch.zeros(8, 3, dtype=torch.int32), torch.zeros(8, dtype=torch.int64),
                             torch.zeros(16, dtype=torch.int32), torch.zeros(8, 2, dtype=torch.int32))
    # The layout planner, like the kernel, ignores ids outside [0, E): none of these goes anywhere.
    per_rank, per_expert = torch.empty(4, dtype=torch.int64), torch.empty(8, dtype=torch.int64)
    ext.moe_plan_dispatch_layout(torch.tensor([[8, 9], [-3, 8 + 64 * 2]] * 4), per_rank, per_expert, slots, 8)
    assert not bool(per_rank.any()) and not bool(per_expert.any()) and bool((slots == -1).all())


# ---- GPU: DeepSeek-V3 sizes and NCCL ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_stages_deepseek_v3_sizes_gpu(backend):
    """4096 tokens, hidden 7168, top-8 of 256 experts on EP8: every stage against the reference."""
    if backend == "cuda":
        _extension()
    tokens, hidden, topk, experts, world = 4096, 7168, 8, 256, 8
    num_local = experts // world
    dev = torch.device("cuda")
    stages = moe._stages(backend)
    idx, w = routing(tokens, topk, experts, seed=42)
    x = torch.randn(tokens, hidden).bfloat16()
    per_rank, per_expert, slots = stages.dispatch_layout(idx.to(dev), experts, world)
    want_rank, want_expert, want_slots = ref.dispatch_layout(idx, experts, world)
    assert torch.equal(per_rank.cpu(), want_rank) and torch.equal(per_expert.cpu(), want_expert)
    assert torch.equal(slots.cpu(), want_slots)
    offsets = ref.exclusive_cumsum(want_rank)
    args = (idx, w, want_slots, offsets, int(want_rank.sum()), num_local)
    on = [t.to(dev) for t in args[:4]] + list(args[4:])
    send_x, meta = stages.pack(x.to(dev), None, *on)
    want_x, want_meta = ref.pack(x, None, *args)
    assert torch.equal(send_x.cpu(), want_x) and torch.equal(meta.cpu(), want_meta)
    send_q, meta_q = stages.pack(x.to(dev), None, *on, quantize=True)
    want_q, want_meta_q = ref.pack(x, None, *args, quantize=True)
    assert torch.equal(meta_q.cpu(), want_meta_q) and moe_dist.fp8_steps(send_q.cpu(), want_q) <= 1
    buf = torch.randn(int(want_rank.sum()), hidden).bfloat16()
    got = stages.combine_reduce(buf.to(dev), want_slots.to(dev), offsets.to(dev))
    torch.testing.assert_close(got.cpu(), ref.combine_reduce(buf, want_slots, offsets), rtol=2 ** -8, atol=1e-6)

    # The receive side of one rank: 4096 rows routed to its 32 local experts.
    local, lw = routing(tokens, topk, num_local, seed=43)
    counts, rank = stages.expert_ranks(local.to(dev), num_local)
    want_counts, want_rank_in_expert = ref.expert_ranks(local, num_local)
    assert torch.equal(counts.cpu(), want_counts) and torch.equal(rank.cpu(), want_rank_in_expert)
    starts, total = ref.padded_starts(want_counts.tolist(), 128)
    starts = torch.tensor(starts)
    q, s = fq.per_token_group_quant_fp8(x)
    got = stages.permute(q.to(dev), s.to(dev), local.to(dev), rank, starts.to(dev), total)
    want = ref.permute(q, s, local, want_rank_in_expert, starts, total)
    valid = want[3][want[3] >= 0].long()
    assert torch.equal(got[3].cpu(), want[3]) and torch.equal(got[2].cpu(), want[2])
    assert torch.equal(got[0].cpu()[valid].view(torch.uint8), want[0][valid].view(torch.uint8))
    assert torch.equal(got[1].cpu()[valid], want[1][valid])
    y = torch.randn(total, hidden).bfloat16()
    out = stages.unpermute(y.to(dev), want[3].to(dev), lw.to(dev))
    torch.testing.assert_close(out.cpu(), ref.unpermute(y, want[3], lw), rtol=2 ** -8, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_dispatch_combine_nccl(backend):
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"NCCL dispatch/combine needs at least 2 GPUs; this machine has {gpus}")
    world = min(gpus, 8)
    counts = [512 + 37 * r for r in range(world)]
    counts[1] = 0  # a rank without tokens
    moe_dist.run_ranks(world, moe_dist.program_dispatch_combine, backend, 17, counts, 7168, 8, 32 * world, None,
                       dist_backend="nccl", timeout=300)
    moe_dist.run_ranks(world, moe_dist.program_fp8, backend, 18, counts, 7168, 8, 32 * world,
                       dist_backend="nccl", timeout=300)
    moe_dist.run_ranks(world, moe_dist.program_worst_cached_weighted, (backend,), 19, counts, 7168, 8, 32 * world,
                       dist_backend="nccl", timeout=300)


# ---- low-latency mode ------------------------------------------------------------------------------------

def ll_routing(tokens, topk, experts, seed):
    """Routing with the unchecked path's corner cases: ids == experts and beyond, ids below -1, and a token
    naming one expert twice (it must take one row of that expert's block, and both slots its output)."""
    gen = torch.Generator().manual_seed(seed)
    idx, w = moe_dist.make_routing(tokens, topk, experts, gen)
    if tokens > 3 and topk > 1:
        idx[1, 0], idx[2, topk - 1], idx[3, 0] = experts, experts + 5, -3
        idx[4 % tokens, 1] = idx[4 % tokens, 0] = 0
        w[4 % tokens, :2] = torch.tensor([0.25, 0.5])
    return idx, w


def simulate_low_latency(stages, xs, idxs, ws, experts, max_tokens, fp8, out_hidden, gen, device="cpu"):
    """Runs every rank's low-latency stages in one process, with the all-to-all done by hand, checks the
    receive side against expected_blocks and returns (combined outputs, float64 expectations)."""
    world = len(xs)
    num_local = experts // world
    row = ref.LowLatencyRow(xs[0].shape[1], idxs[0].shape[1], fp8)
    sends = [stages.ll_pack(x.to(device), idx.to(device), experts, world, max_tokens, row) for x, idx in zip(xs, idxs)]
    rows = world * max_tokens
    ys, returned_blocks = [], []
    for q in range(world):
        recv = torch.cat([s[q * max_tokens:(q + 1) * max_tokens] for s in sends])
        count, pos = stages.ll_positions(recv, num_local, row)
        recv_x, recv_s = stages.ll_unpack(recv, pos, num_local, row)
        count, recv_x = count.cpu(), recv_x.cpu()
        recv_s = None if recv_s is None else recv_s.cpu()
        blocks = moe_dist.expected_blocks(idxs, q, world, experts)
        assert count.dtype == torch.int32 and count.tolist() == [len(b) for b in blocks]
        assert recv_x.shape == (num_local, rows, row.hidden) and recv_x.is_contiguous()
        for e, block in enumerate(blocks):
            if not block:
                continue
            got = recv_x[e, :len(block)]
            want = torch.stack([xs[src][t] for src, t in block])
            if fp8:
                want_q, want_s = fq.per_token_group_quant_fp8(want)
                assert torch.equal(recv_s[e, :len(block)], want_s)
                assert moe_dist.fp8_steps(got, want_q) <= (0 if stages is ref else 1)
            else:
                assert recv_s is None and torch.equal(got, want)
        y = torch.randn((num_local, rows, out_hidden), generator=gen).bfloat16()
        for e, block in enumerate(blocks):
            y[e, len(block):] = float("nan")  # rows past recv_count must never be read
        ys.append(y)
        returned_blocks.append(stages.ll_combine_pack(y.to(device), recv, pos, row))
    outs, wants = [], []
    for src in range(world):
        back = torch.cat([r[src * max_tokens:(src + 1) * max_tokens] for r in returned_blocks])
        out = stages.ll_combine_reduce(back.view(world, max_tokens, row.topk, out_hidden), idxs[src].to(device),
                                       ws[src].to(device), experts).cpu()
        want = torch.zeros((idxs[src].shape[0], out_hidden), dtype=torch.float64)
        mag = torch.zeros_like(want)
        for t, ids in enumerate(idxs[src].tolist()):
            for j, e in enumerate(ids):
                if 0 <= e < experts:
                    q = e // num_local
                    i = moe_dist.expected_blocks(idxs, q, world, experts)[e - q * num_local].index((src, t))
                    term = float(ws[src][t, j]) * ys[q][e - q * num_local, i].double()
                    want[t] += term
                    mag[t] += term.abs()
        outs.append(out)
        wants.append((want, mag))
    return outs, wants


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,counts,hidden,topk,experts,max_tokens,fp8",
                         [(2, [5, 3], 256, 3, 4, 6, True), (3, [7, 0, 4], 136, 4, 9, 7, False),
                          (4, [1, 6, 2, 6], 384, 2, 8, 6, True)])
def test_low_latency_stages_against_loops(backend, world, counts, hidden, topk, experts, max_tokens, fp8, device):
    stages = moe._stages(backend)
    gen = torch.Generator().manual_seed(sum(counts) + hidden)
    xs, idxs, ws = [], [], []
    for r, t in enumerate(counts):
        xs.append((torch.randn((t, hidden), generator=gen) * 3).bfloat16())
        idx, w = ll_routing(t, topk, experts, seed=r + hidden)
        idxs.append(idx)
        ws.append(w)
    outs, wants = simulate_low_latency(stages, xs, idxs, ws, experts, max_tokens, fp8, 40, gen, device)
    for out, (want, mag) in zip(outs, wants):
        assert out.dtype == torch.bfloat16 and not bool(out.isnan().any())
        # float32 sums of <= k rounded products, one bf16 rounding: within 2^-8 of the magnitude.
        assert bool(((out.double() - want).abs() <= mag * 2 ** -8 + 1e-12).all())


def test_low_latency_pack_matches_reference_words():
    """The Triton pack writes the reference's ids, scales and payload bytes wherever they are specified."""
    idx, _ = ll_routing(5, 3, 6, seed=1)
    x = torch.randn(5, 256).bfloat16()
    for fp8 in (True, False):
        row = ref.LowLatencyRow(256, 3, fp8)
        want = ref.ll_pack(x, idx, 6, 3, 8, row).view(3, 8, row.words)
        got = moe._stages("triton").ll_pack(x, idx, 6, 3, 8, row).view(3, 8, row.words)
        ids = slice(row.id_word, row.id_word + 3)
        assert torch.equal(got[:, :, ids], want[:, :, ids])
        sent = (want[:, :, ids] >= 0).any(-1)
        assert torch.equal(got[:, :, :row.id_word][sent][:, row.scale_word:],
                           want[:, :, :row.id_word][sent][:, row.scale_word:])
        payload = lambda t: t[sent].view(torch.uint8)[:, :row.payload_bytes]
        if fp8:
            assert moe_dist.fp8_steps(payload(got).view(FP8), payload(want).view(FP8)) <= 1
        else:
            assert torch.equal(payload(got), payload(want))


# ---- non-finite input on the quantizing packs ----------------------------------------------------------------

NONFINITE_TOKENS = (1, 3, 6)


def nonfinite_tokens(tokens, hidden):
    """bf16 tokens over several binades with, in tokens 1, 3 and 6: a NaN in one group, +inf in another, -inf
    and a NaN sharing a third (NaN wins), and -inf as the row's very last element; every other group finite."""
    x = (torch.randn(tokens, hidden) * torch.logspace(-3, 3, tokens).unsqueeze(1)).bfloat16()
    x[1, 128 + 17] = float("nan")
    x[3, 5] = float("inf")
    x[3, 256 + 44], x[3, 256 + 45] = float("-inf"), float("nan")
    x[6, hidden - 1] = float("-inf")
    return x


def quantize_checked(x, backend, device):
    """The quantizer of `backend` on x, after checking its non-finite rule independently: scale NaN for a
    group holding a NaN, +inf for one holding an infinity and no NaN, every code of both the NaN code 0x7F;
    the other groups finite, within one e4m3 step of the reference quantizer and with its scales."""
    q, s = pykernels.fp8_quant.per_token_group_quant_fp8(x.to(device), backend=backend)
    q, s = q.cpu(), s.cpu()
    groups = x.float().view(x.shape[0], -1, 128)
    has_nan = groups.isnan().any(-1)
    has_inf = groups.isinf().any(-1) & ~has_nan
    assert int(has_nan.sum()) == 2 and int(has_inf.sum()) == 2
    assert torch.equal(s.isnan(), has_nan) and torch.equal(s == float("inf"), has_inf)
    bad = has_nan | has_inf
    codes = q.view(torch.uint8).view(x.shape[0], -1, 128)
    assert bool((codes[bad] == 0x7F).all())
    want_q, want_s = fq.per_token_group_quant_fp8(torch.where(bad.repeat_interleave(128, 1), 0.0, x.float()))
    assert torch.equal(s[~bad], want_s[~bad])
    assert moe_dist.fp8_steps(q.view(x.shape[0], -1, 128)[~bad], want_q.view(x.shape[0], -1, 128)[~bad]) <= 1
    return q, s


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantizing_pack_follows_the_quantizers_nonfinite_rule(backend, device):
    """quantize_fp8=True's pack: payload bytes and scale words bit-exact with the same backend's quantizer,
    the NaN and infinite groups included."""
    if backend == "cuda":
        _extension()
    tokens, hidden, topk, experts, world = 7, 384, 3, 12, 3
    idx, w = routing(tokens, topk, experts, seed=11)
    for t in NONFINITE_TOKENS:  # each to every rank, so each reaches several send rows
        idx[t] = torch.tensor([t % 4, 4 + (t + 1) % 4, 8 + (t + 2) % 4])
        w[t] = torch.rand(topk) + 0.05
    x = nonfinite_tokens(tokens, hidden)
    q, s = quantize_checked(x, backend, device)
    _, _, slots = ref.dispatch_layout(idx, experts, world)
    per_rank = (slots >= 0).sum(0)
    args = (idx, w, slots, ref.exclusive_cumsum(per_rank), int(per_rank.sum()), experts // world)
    on = [t.to(device) for t in args[:4]] + list(args[4:])
    send_q, meta_q = moe._stages(backend).pack(x.to(device), None, *on, quantize=True)
    want_q, want_meta_q = ref.pack(q, s, *args)
    assert torch.equal(send_q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(meta_q.cpu(), want_meta_q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_fp8_pack_follows_the_quantizers_nonfinite_rule(backend, device):
    """The low-latency FP8 pack: every sent row's payload bytes and scale words bit-exact with the same
    backend's quantizer, the NaN and infinite groups included."""
    if backend == "cuda":
        _extension()
    tokens, hidden, topk, experts, world, max_tokens = 7, 384, 3, 12, 3, 9
    idx, _ = ll_routing(tokens, topk, experts, seed=5)
    idx[6] = torch.tensor([2, 7, 11])
    x = nonfinite_tokens(tokens, hidden)
    q, s = quantize_checked(x, backend, device)
    row = ref.LowLatencyRow(hidden, topk, True)
    got = moe._stages(backend).ll_pack(x.to(device), idx.to(device), experts, world, max_tokens, row).cpu()
    got = got.view(world, max_tokens, row.words)
    want = ref.ll_pack(x, idx, experts, world, max_tokens, row).view(world, max_tokens, row.words)
    ids = slice(row.id_word, row.id_word + topk)
    assert torch.equal(got[:, :, ids], want[:, :, ids])
    sent = (got[:, :tokens, ids] >= 0).any(-1)
    assert bool(sent[:, list(NONFINITE_TOKENS)].any(0).all()), "every non-finite token must be sent somewhere"
    for r, t in sent.nonzero().tolist():
        assert torch.equal(got[r, t].view(torch.uint8)[:hidden], q[t].view(torch.uint8)), (r, t)
        assert torch.equal(got[r, t, row.scale_word:row.id_word], s[t].view(torch.int32)), (r, t)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_latency_reads_nothing_on_the_host(backend, device):
    buffer = moe.Buffer(transport=Loopback(), backend=backend)
    idx, w = ll_routing(6, 3, 5, seed=4)
    x = torch.randn(6, 128).bfloat16().to(device)
    idx, w = idx.to(device), w.to(device)
    counter = moe_dist.CountHostReads()
    with counter:
        recv_x, recv_s, count, handle = buffer.low_latency_dispatch(x, idx, 8, 5)
        out = buffer.low_latency_combine(torch.ones(5, 8, 64, dtype=torch.bfloat16, device=device), idx, w, handle)
    assert counter.reads == 0
    # Identity-free check on one rank: every expert output is 1, so out[t] = sum of t's valid weights.
    valid = (idx >= 0) & (idx < 5)
    want = torch.where(valid, w, 0.0).sum(1, keepdim=True).expand(6, 64)
    torch.testing.assert_close(out.float().cpu(), want.cpu(), rtol=2 ** -8, atol=0)
    assert count.tolist() == [len(b) for b in moe_dist.expected_blocks([idx.cpu()], 0, 1, 5)]


def test_low_latency_bad_inputs_raise_before_communication():
    buffer = moe.Buffer(transport=NoCommunication(), backend="torch")
    x = torch.randn(6, 256).bfloat16()
    idx, w = routing(6, 2, 8)
    cases = [
        (lambda: buffer.low_latency_dispatch(x, idx, 5, 8), ValueError, "x: expected at most max_tokens_per_rank = 5"),
        (lambda: buffer.low_latency_dispatch(x, idx, 0, 8), ValueError, "max_tokens_per_rank: expected an int in"),
        (lambda: buffer.low_latency_dispatch(x, idx, 6.0, 8), TypeError, "max_tokens_per_rank: expected an int"),
        (lambda: buffer.low_latency_dispatch(x, idx, 8, 10), ValueError, "num_experts"),
        (lambda: buffer.low_latency_dispatch(x, idx, 8, 8, use_fp8="no"), TypeError, "use_fp8: expected a bool"),
        (lambda: buffer.low_latency_dispatch(x[:, :200].contiguous(), idx, 8, 8), ValueError, "multiple of 128"),
        (lambda: buffer.low_latency_dispatch(x.float(), idx, 8, 8), TypeError, "x: expected dtype bfloat16"),
        (lambda: buffer.low_latency_dispatch(x, idx[:5], 8, 8), ValueError, "topk_idx: expected 6 rows"),
        (lambda: buffer.low_latency_combine(x, idx, w, None), TypeError, "handle: expected the LowLatencyHandle"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("world,counts", [(2, [5, 8]), (4, [8, 0, 3, 7])])
def test_low_latency_moe_layer_multi_rank(world, counts):
    """Torch stages, then Triton stages, in the same ranks (one spawn per world size)."""
    diffs = moe_dist.run_ranks(world, moe_dist.program_low_latency_layer, ("torch", "triton"), 21 + world, counts,
                               256, 128, 3, 2 * world, 8, timeout=240)
    assert max(diffs) < 1e-4


@pytest.mark.gpu
def test_low_latency_moe_layer_nccl():
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"NCCL low-latency dispatch/combine needs at least 2 GPUs; this machine has {gpus}")
    world = min(gpus, 8)
    counts = [128 - 7 * r for r in range(world)]
    counts[1] = 0
    moe_dist.run_ranks(world, moe_dist.program_low_latency_layer, ("auto", "triton", "torch"), 31, counts, 1024, 256,
                       8, 8 * world, 128, dist_backend="nccl", timeout=300)


@pytest.mark.gpu
def test_low_latency_cuda_graph_replay_gpu():
    """dispatch -> masked GEMM -> combine captured once in a CUDA graph and replayed with new tokens and new
    routing written into the captured inputs: each replay matches a dense float64 computation."""
    dev = torch.device("cuda")
    experts, max_tokens, hidden, inter, topk = 6, 24, 256, 128, 3
    buffer = moe.Buffer(transport=Loopback(), backend="auto")
    wq, ws = fq.per_block_quant_fp8(torch.randn(experts, inter, hidden) / 16)
    weights = (wq.to(dev), ws.to(dev))
    static_x = torch.zeros(max_tokens, hidden, dtype=torch.bfloat16, device=dev)
    static_idx = torch.full((max_tokens, topk), -1, dtype=torch.int64, device=dev)
    static_w = torch.zeros(max_tokens, topk, device=dev)

    def fill(seed):
        x = torch.randn(max_tokens, hidden, generator=torch.Generator().manual_seed(seed)).bfloat16()
        idx, w = ll_routing(max_tokens, topk, experts, seed)
        static_x.copy_(x)
        static_idx.copy_(idx)
        static_w.copy_(w)
        return x, idx, w

    def step():
        recv_x, recv_s, count, handle = buffer.low_latency_dispatch(static_x, static_idx, max_tokens, experts)
        y = pykernels.m_grouped_fp8_gemm_nt_masked((recv_x, recv_s), weights, count, max_tokens)
        return buffer.low_latency_combine(y, static_idx, static_w, handle)

    fill(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles every kernel before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    b = fq.dequantize_blocks(wq, ws).double()
    for seed in (1, 2):
        x, idx, w = fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        a = fq.dequantize_token_groups(*fq.per_token_group_quant_fp8(x)).double()
        want = torch.zeros(max_tokens, inter, dtype=torch.float64)
        for t in range(max_tokens):
            for j in range(topk):
                e = int(idx[t, j])
                if 0 <= e < experts:
                    want[t] += float(w[t, j]) * (a[t] @ b[e].T).bfloat16().double()
        assert moe_dist.calc_diff(out.cpu(), want) < 1e-4



# ---- unchecked ids, hand-built layouts, bounded per-expert state ------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_ids_outside_range_are_ignored_on_every_backend(backend, device):
    """check_ids=False: ids >= num_experts (even ones whose rank is past 64) and ids below -1 count as -1."""
    idx, w = routing(29, 4, 8, seed=8)
    bad = idx.clone()
    bad[0, 0], bad[3, 1], bad[5, 2], bad[7, 3] = 8, 8 + 4 * 70, -5, 9
    clean = torch.where((bad >= 0) & (bad < 8), bad, -1)
    stages = moe._stages(backend)
    got = stages.dispatch_layout(bad.to(device), 8, 4)
    for g, want in zip(got, ref.dispatch_layout(clean, 8, 4)):
        assert torch.equal(g.cpu(), want)
    buffer = moe.Buffer(transport=Loopback(), backend=backend)
    x = torch.randn(29, 128).bfloat16().to(device)
    recv = buffer.dispatch(x, bad.to(device), w.to(device), 8, check_ids=False)
    want = buffer.dispatch(x, clean.to(device), w.to(device), 8)
    for a, b in zip(recv[:3], want[:3]):
        assert torch.equal(a.cpu(), b.cpu())
    assert recv[3] == want[3]


def test_hand_built_layout_that_disagrees_is_refused_before_communication():
    buffer = moe.Buffer(transport=NoCommunication(), backend="torch")
    idx, w = routing(12, 2, 8, seed=6)
    per_rank, per_expert, slots = ref.dispatch_layout(idx, 8, 4)
    in_rank = slots >= 0
    short = per_rank.clone()
    short[1] -= 1
    with pytest.raises(ValueError, match="layout\\[0\\]: expected num_tokens_per_rank to count the tokens"):
        buffer.dispatch(torch.randn(12, 128).bfloat16(), idx, w, 8, layout=(short, per_expert, in_rank))


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_padding_rows_are_zero(backend, device):
    idx, _ = routing(19, 3, 5, seed=12)
    x = torch.randn(19, 256).bfloat16().to(device)
    q, s = fq.per_token_group_quant_fp8(x.cpu())
    for data in (x, (q.to(device), s.to(device))):
        out, m_indices, _ = moe.permute_to_experts(data, idx.to(device), alignment=16, num_local_experts=5,
                                                   backend=backend)
        pad = (m_indices < 0).cpu()
        assert bool(pad.any())
        if isinstance(out, tuple):
            assert not bool(out[0].cpu()[pad].view(torch.uint8).any()) and not bool(out[1].cpu()[pad].any())
        else:
            assert not bool(out.cpu()[pad].view(torch.int16).any())


def test_permute_per_expert_state_is_bounded():
    x = torch.randn(2, 128).bfloat16()
    idx = torch.tensor([[0, 30_000_000], [1, -1]])
    with pytest.raises(ValueError, match="recv_topk_idx: expected local expert ids below 65536 when "
                                         "num_local_experts is not given, got 30000000"):
        moe.permute_to_experts(x, idx, backend="torch")
    with pytest.raises(ValueError, match="recv_topk_idx: expected local expert ids in \\[0, 4\\)"):
        moe.permute_to_experts(x, idx, num_local_experts=4, backend="torch")
    with pytest.raises(ValueError, match="num_local_experts: expected an int in \\[1, 65536\\], got 1099511627776"):
        moe.permute_to_experts(x, idx, num_local_experts=2 ** 40, backend="torch")
    with pytest.raises(TypeError, match="num_local_experts: expected an int, got bool"):
        moe.permute_to_experts(x, idx, num_local_experts=True, backend="torch")


# ---- normal mode: cached dispatch, num_worst_tokens, weighted combine with bias ------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_num_worst_tokens_over_loopback(backend, device):
    """Padded receive, device counts, no host reads; a bound below the rows received drops the rows past it
    on both sides (their tokens combine to zero), never past the buffers."""
    buffer = moe.Buffer(transport=Loopback(), backend=backend)
    idx, w = routing(26, 3, 6, seed=14)
    x = torch.randn(26, 256).bfloat16().to(device)
    idx, w = idx.to(device), w.to(device)
    recv_x, recv_idx, recv_w, per_expert, handle = buffer.dispatch(x, idx, w, 6)
    rows = recv_x.shape[0]
    for worst in (rows + 5, rows - 3):
        counter = moe_dist.CountHostReads()
        with counter:
            wx, widx, ww, count, wh = buffer.dispatch(x, idx, w, 6, num_worst_tokens=worst)
            out = buffer.combine(wx, wh)
        assert counter.reads == 0
        kept = min(rows, worst)
        assert wx.shape == (worst, 256) and int(wh.num_recv_tokens) == kept
        assert torch.equal(wx[:kept], recv_x[:kept]) and torch.equal(widx[:kept], recv_idx[:kept])
        assert torch.equal(ww[:kept], recv_w[:kept])
        assert bool((widx[kept:] == -1).all()) and not bool(wx[kept:].float().any())
        assert count.dtype == torch.int32 and count.tolist() == [int((widx == e).sum()) for e in range(6)]
        routed = (idx >= 0).any(1).cpu()
        sent_rank = torch.cumsum(routed.long(), 0) - 1
        want = torch.where((routed & (sent_rank < worst)).unsqueeze(1), x.cpu(), torch.zeros(()))
        assert torch.equal(out.cpu(), want.bfloat16())
        again, again_idx, _, _, same = buffer.dispatch(2 * x, handle=wh)
        assert same is wh and torch.equal(again, 2 * wx) and torch.equal(again_idx, widx)
    (q, s), qidx, _, _, qh = buffer.dispatch(x, idx, w, 6, num_worst_tokens=rows + 2, quantize_fp8=True)
    (want_q, want_s), _, _, _, _ = buffer.dispatch(x, idx, w, 6, quantize_fp8=True)
    assert torch.equal(s[:rows], want_s) and not bool(s[rows:].any())
    assert torch.equal(q[:rows].view(torch.uint8), want_q.view(torch.uint8))
    assert not bool(q[rows:].view(torch.uint8).any())


def test_cached_and_worst_dispatch_bad_inputs_raise_before_communication():
    buffer = moe.Buffer(transport=NoCommunication(), backend="torch")
    x = torch.randn(6, 256).bfloat16()
    idx, w = routing(6, 2, 8)
    fake = moe.DispatchHandle(torch.zeros(6, 4, dtype=torch.int32), torch.zeros(4, dtype=torch.int64), (0,) * 4,
                              (0,) * 4, idx, w, 8, [0, 0])
    cases = [
        (lambda: buffer.dispatch(x, idx, w, 8, num_worst_tokens=0), ValueError, "num_worst_tokens: expected an int"),
        (lambda: buffer.dispatch(x, idx, w, 8, num_worst_tokens=2.5), TypeError, "num_worst_tokens: expected an int"),
        (lambda: buffer.dispatch(x, handle=object()), TypeError, "handle: expected the DispatchHandle"),
        (lambda: buffer.dispatch(x[:5], handle=fake), ValueError, "x: expected 6 rows"),
        (lambda: buffer.dispatch(x, idx, handle=fake), ValueError, "topk_idx: expected None with handle="),
        (lambda: buffer.combine(x, fake), ValueError, "y: expected 0 rows"),
        (lambda: buffer.combine(x[:0], fake, topk_weights=torch.ones(3)), ValueError, "topk_weights: expected shape"),
        (lambda: buffer.combine(x[:0], fake, bias=torch.ones(6, 256)), TypeError, "bias: expected dtype bfloat16"),
        (lambda: buffer.combine(x[:0], fake, bias=x[:5]), ValueError, "bias: expected shape"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_worst_cached_weighted_multi_rank():
    """Three ranks (one without tokens), torch then Triton stages in the same processes."""
    moe_dist.run_ranks(3, moe_dist.program_worst_cached_weighted, ("torch", "triton"), 43, [9, 0, 17], 128, 3, 9,
                       timeout=240)


def test_ranks_that_disagree_all_raise_the_same_error():
    messages = moe_dist.run_ranks(2, moe_dist.program_disagreements, "torch", timeout=120)
    for field in ("num_experts", "hidden size", "top-k", "payload dtype"):
        want = {"num_experts": "rank 0: 4, rank 1: 8", "hidden size": "rank 0: 256, rank 1: 128",
                "top-k": "rank 0: 2, rank 1: 1", "payload dtype": "rank 0: bfloat16, rank 1: float8_e4m3fn"}[field]
        assert messages[0][field] == messages[1][field]
        assert messages[0][field] == (f"dispatch: expected the same {field} on every rank, got {want}; "
                                      "no rows were exchanged")
    assert messages[0]["combine dtype"] == messages[1]["combine dtype"]
    assert "combine: expected the same combine dtype on every rank, got rank 0: bfloat16, rank 1: float32" \
        in messages[0]["combine dtype"]
    assert "same hidden size on every rank, got rank 0: 256, rank 1: 128" in messages[1]["combine hidden size"]
    # The rank with the bad input raises its own error; its peers say which rank and that nothing moved.
    assert messages[1]["bad input"].startswith("topk_idx: expected expert ids in [0, 4)")
    assert messages[0]["bad input"].startswith("dispatch: expected valid arguments on every rank, "
                                               "got an error on rank 1")
    assert messages[1]["combine bad input"].startswith("y: expected")
    assert "got an error on rank 1" in messages[0]["combine bad input"]


def test_cuda_expert_ranks_split_over_the_gpu():
    """The expert-ranks kernels run one CTA per 1024 pairs (EP8 prefill: 4096 tokens x top-8 from 8 ranks is
    256 CTAs, not one CTA walking 256 chunks), and the chunked decomposition, run on the host, gives the
    reference's ranks across chunk boundaries, with ids spread unevenly over the chunks."""
    ext = _extension()
    assert ext.moe_expert_rank_chunks(4096 * 8 * 8) == 256
    assert [ext.moe_expert_rank_chunks(n) for n in (0, 1, 1024, 1025)] == [0, 1, 1, 2]
    # Ranks and chunk offsets are int32, and one expert may take every pair.
    assert ext.moe_expert_rank_chunks(2 ** 31 - 1) == 2 ** 21
    with pytest.raises(ValueError, match="num_pairs: expected a value in \\[0, 2147483647\\], got 2147483648"):
        ext.moe_expert_rank_chunks(2 ** 31)
    gen = torch.Generator().manual_seed(17)
    local = torch.randint(-1, 7, (700, 5), generator=gen)
    local[:300] = torch.where(local[:300] >= 0, 2, -1)  # the first chunk mostly one expert
    counts = torch.full((7,), -7, dtype=torch.int64)
    rank = torch.full(local.shape, -7, dtype=torch.int32)
    ext.moe_plan_expert_ranks(local, counts, rank)
    want_counts, want_rank = ref.expert_ranks(local, 7)
    assert torch.equal(counts, want_counts) and torch.equal(rank, want_rank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_unchecked_ids_outside_range_are_ignored(backend, device):
    idx, w = routing(21, 3, 5, seed=19)
    bad = idx.clone()
    bad[0, 0], bad[2, 1], bad[4, 2], bad[6, 0] = 5, 30_000_000, -4, 2 ** 40
    clean = torch.where((bad >= 0) & (bad < 5), bad, -1)
    x = torch.randn(21, 256).bfloat16().to(device)
    got = moe.permute_to_experts(x, bad.to(device), alignment=8, num_local_experts=5, backend=backend,
                                 check_ids=False)
    want = moe.permute_to_experts(x, clean.to(device), alignment=8, num_local_experts=5, backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b.cpu())
    with pytest.raises(ValueError, match="num_local_experts: expected an int with check_ids=False"):
        moe.permute_to_experts(x, bad.to(device), check_ids=False, backend=backend)
    with pytest.raises(ValueError, match="recv_topk_idx: expected local expert ids in \\[0, 5\\)"):
        moe.permute_to_experts(x, bad.to(device), num_local_experts=5, backend=backend)


def test_cuda_low_latency_launchers_validate_and_index_like_the_reference():
    """The CUDA low-latency launchers refuse bad arguments before any launch, and their row indexing is the
    reference's (send block r row t; expert e's block of S rows; returned [W, M, k] rows)."""
    ext = _extension()
    assert [ext.moe_ll_send_row(r, t, 7) for r, t in ((0, 0), (2, 5), (3, 6))] == [0, 19, 27]
    assert ext.moe_ll_expert_row(3, 4, 5, 16) == 52 and ext.moe_ll_return_row(2, 5, 1, 6, 3) == (2 * 6 + 5) * 3 + 1
    # Rows past 2^31 (EP64 x 256 local experts x 256 tokens x H) index in 64 bits.
    assert ext.moe_ll_send_row(63, 5, 2 ** 30) == 63 * 2 ** 30 + 5
    assert ext.moe_ll_expert_row(255, 2 ** 31, 256, 2 ** 32) == 255 * 2 ** 32 + 2 ** 31
    assert ext.moe_ll_return_row(63, 2 ** 30, 7, 2 ** 31, 8) == (63 * 2 ** 31 + 2 ** 30) * 8 + 7
    # A received id that is not local, or a position outside its block, takes no row (unpack writes
    # nothing, combine-pack reads nothing) whatever the caller's pos says.
    for expert, pos in ((5, 4), (-1, 4), (-7, 4), (2 ** 40, 0), (3, -1), (3, 16), (0, 2 ** 40)):
        assert ext.moe_ll_expert_row(expert, pos, 5, 16) == -1, (expert, pos)
    assert ext.moe_ll_expert_row(4, 15, 5, 16) == 4 * 16 + 15 and ext.moe_ll_expert_row(0, 0, 5, 16) == 0
    row = ref.LowLatencyRow(256, 3, True)
    assert (row.scale_word, row.id_word, row.words) == (64, 66, 72)
    x = torch.randn(4, 256).bfloat16()
    idx, w = routing(4, 3, 8)
    send = torch.empty(2 * 6, row.words, dtype=torch.int32)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        ext.moe_ll_pack(x, idx, send, 8, 2, 6, row.scale_word, row.id_word, True, 0)
    with pytest.raises(ValueError, match="x tokens: expected a value in \\[0, 3\\]"):
        ext.moe_ll_pack(x, idx, send, 8, 2, 3, row.scale_word, row.id_word, True, 0)
    with pytest.raises(TypeError, match="x: expected dtype bfloat16"):
        ext.moe_ll_pack(x.float(), idx, send, 8, 2, 6, row.scale_word, row.id_word, True, 0)
    with pytest.raises(ValueError, match="num_experts: expected a multiple of the world size 3"):
        ext.moe_ll_pack(x, idx, send, 8, 3, 6, row.scale_word, row.id_word, True, 0)
    with pytest.raises(ValueError, match="recv: expected a CUDA tensor"):
        ext.moe_ll_unpack(send, torch.zeros(12, 3, dtype=torch.int32), torch.empty(4, 12, 256, dtype=FP8),
                          torch.empty(4, 12, 2), row.scale_word, row.id_word, 0)
    with pytest.raises(ValueError, match="y: expected a hidden size that is a positive multiple of 8"):
        ext.moe_ll_combine_pack(torch.empty(4, 12, 36).bfloat16(), send, torch.zeros(12, 3, dtype=torch.int32),
                                torch.empty(12, 3, 36).bfloat16(), row.id_word, 0)
    with pytest.raises(ValueError, match="returned: expected 4 dimensions"):
        ext.moe_ll_combine_reduce(torch.empty(2, 6, 3 * 64).bfloat16(), idx, w, torch.empty(4, 64).bfloat16(), 8, 0)


def test_cuda_low_latency_positions_glue_matches_reference():
    """The CUDA ll_positions ranks each id's first slot with the expert-ranks kernels and gives duplicate
    slots the first one's row; its torch part, run here with the reference's expert ranks, must equal
    the reference positions (duplicates, -1 and ids from several source ranks included)."""

    class HostExpertRanks(moe._CudaStages):
        def expert_ranks(self, topk_idx, num_local):
            return ref.expert_ranks(topk_idx, num_local)

    row = ref.LowLatencyRow(128, 4, False)
    idxs = [ll_routing(9, 4, 8, seed=s)[0] for s in range(2)]
    sends = [ref.ll_pack(torch.randn(9, 128).bfloat16(), idx, 8, 2, 10, row) for idx in idxs]
    for q in range(2):
        recv = torch.cat([s[q * 10:(q + 1) * 10] for s in sends])
        got = HostExpertRanks().ll_positions(recv, 4, row)
        want = ref.ll_positions(recv, 4, row)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_host_reads_on_the_checked_paths():
    """What the checked paths read on the host (Triton stages, whose kernels read nothing): dispatch the id
    range, the agreement header and the per-expert counts; combine the header; get_dispatch_layout the id
    range; permute_to_experts the id range and its output size; unpermute_from_experts the row range."""
    buffer = moe.Buffer(transport=Loopback(), backend="triton")
    idx, w = routing(14, 3, 6, seed=21)
    x = torch.randn(14, 128).bfloat16()
    reads = {}
    for name, call in (("layout", lambda: buffer.get_dispatch_layout(idx, 6)),
                       ("dispatch", lambda: buffer.dispatch(x, idx, w, 6)),
                       ("dispatch unchecked", lambda: buffer.dispatch(x, idx, w, 6, check_ids=False))):
        counter = moe_dist.CountHostReads()
        with counter:
            out = call()
        reads[name] = counter.reads
    recv_x, recv_idx, recv_w, _, handle = out
    for name, call in (("combine", lambda: buffer.combine(recv_x, handle)),
                       ("permute", lambda: moe.permute_to_experts(recv_x, recv_idx, alignment=8, backend="triton"))):
        counter = moe_dist.CountHostReads()
        with counter:
            out = call()
        reads[name] = counter.reads
    counter = moe_dist.CountHostReads()
    with counter:
        moe.unpermute_from_experts(out[0], out[2], recv_w, backend="triton")
    reads["unpermute"] = counter.reads
    assert reads == {"layout": 1, "dispatch": 3, "dispatch unchecked": 2, "combine": 1, "permute": 2, "unpermute": 1}
