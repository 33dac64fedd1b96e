"""pykernels.compat: DeepGEMM, FlashMLA and DeepEP call shapes over pykernels, tested with cases ported from
the anchors' own tests and their tolerances:

- DeepGEMM (tests/test_fp8_fp4.py): calc_diff < 1e-3 against the unquantized product, the whole output
  compared in the contiguous layout (padding rows included), valid rows per group in the masked one.
- FlashMLA (tests/test_flash_mla_dense_decoding.py): out within cosine difference 5e-6 and, element-wise,
  |d| < 8e-4 or |d| < 2.01/128 |ref|; lse within 1e-6 or 8.01/65536 relative; NaN in unused cache slots,
  shuffled block tables, zero-length requests.
- DeepEP (tests/legacy/test_intranode.py, tests/legacy/test_low_latency.py): see tests/compat_dist.py.
"""

import math
import random

import pytest
import torch

import compat_dist
import moe_dist
import pykernels
from pykernels.compat import deep_ep, deep_gemm, flash_mla

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("PYKERNELS_BACKEND", request.param)
    return request.param


def calc_diff(x, y):
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator) if denominator > 0 else 0.0


# ---- DeepGEMM --------------------------------------------------------------------------------------------

def per_token_cast(x):
    """DeepGEMM's activation recipe: amax per row per 128 columns, scale amax / 448, x * (1 / scale)."""
    m, k = x.shape
    groups = x.float().view(m, k // 128, 128)
    sf = groups.abs().amax(dim=2).clamp(min=1e-4) / 448
    return (groups * (1 / sf).unsqueeze(2)).to(torch.float8_e4m3fn).view(m, k), sf


def per_block_cast(x):
    n, k = x.shape
    padded = torch.zeros(-(-n // 128) * 128, k)
    padded[:n] = x.float()
    blocks = padded.view(-1, 128, k // 128, 128)
    sf = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / 448
    q = (blocks * (1 / sf)).to(torch.float8_e4m3fn).view_as(padded)[:n].contiguous()
    return q, sf.view(blocks.shape[0], blocks.shape[2])


def grouped_cast(x, cast):
    pairs = [cast(g) for g in x]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def mn_major(sf):
    return deep_gemm.get_mn_major_tma_aligned_tensor(sf)


def test_mn_major_tma_aligned_layout():
    sf = torch.randn(37, 3)
    out = mn_major(sf)
    assert out.shape == (37, 3) and out.stride() == (1, 40) and torch.equal(out, sf)
    assert mn_major(out) is out
    grouped = torch.randn(2, 5, 4)
    out = mn_major(grouped)
    assert out.stride() == (32, 1, 8) and torch.equal(out, grouped)
    assert deep_gemm.get_tma_aligned_size(37, 4) == 40 and deep_gemm.get_tma_aligned_size(37, 2) == 40


@pytest.mark.parametrize("m,n,k", [(1, 576, 512), (37, 200, 384), (130, 130, 256), (64, 2112, 7168)])
def test_deep_gemm_fp8_gemm_nt(backend, m, n, k):
    if backend == "triton" and m * n * k > 37 * 200 * 384:
        pytest.skip("interpreter time: one small Triton case suffices")
    a = torch.randn(m, k).to(torch.bfloat16)
    b = torch.randn(n, k).to(torch.bfloat16)
    ref = a.double() @ b.double().T
    (qa, sfa), (qb, sfb) = per_token_cast(a), per_block_cast(b)
    for sfa_layout, sfb_layout in ((sfa, sfb), (mn_major(sfa), sfb.T.contiguous().T)):
        d = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        assert deep_gemm.fp8_gemm_nt((qa, sfa_layout), (qb, sfb_layout), d) is None
        assert calc_diff(d, ref) < 1e-3


def test_deep_gemm_writes_a_strided_d():
    a, b = torch.randn(9, 256).to(torch.bfloat16), torch.randn(64, 256).to(torch.bfloat16)
    storage = torch.full((9, 80), float("nan"), dtype=torch.bfloat16)
    d = storage[:, :64]
    deep_gemm.fp8_gemm_nt(per_token_cast(a), per_block_cast(b), d)
    assert calc_diff(d, a.double() @ b.double().T) < 1e-3
    assert bool(storage[:, 64:].isnan().all())


def test_deep_gemm_m_grouped_contiguous(backend):
    groups, n, k = 3, 136, 256
    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    actual = [70, 5, 130] if backend == "torch" else [70, 5]
    m = sum(-(-x // align) * align for x in actual)
    a = torch.randn(m, k).to(torch.bfloat16)
    b = torch.randn(groups, n, k).to(torch.bfloat16)
    layout = torch.empty(m, dtype=torch.int32)
    ref = torch.empty(m, n, dtype=torch.float64)
    start = 0
    for g, rows in enumerate(actual):
        end = start + -(-rows // align) * align
        layout[start:start + rows], layout[start + rows:end] = g, -1
        a[start + rows:end] = 0  # as DeepGEMM's generator: padding rows of A are zero, so are the reference's
        ref[start:end] = a[start:end].double() @ b[g].double().T
        start = end
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(per_token_cast(a), grouped_cast(b, per_block_cast), d, layout)
    assert calc_diff(d, ref) < 1e-3  # the whole output: NaN left in a padding row would fail it


def test_deep_gemm_m_grouped_masked(backend):
    groups, max_m, n, k = 3, 24, 136, 256
    a = torch.randn(groups, max_m, k).to(torch.bfloat16)
    b = torch.randn(groups, n, k).to(torch.bfloat16)
    masked_m = torch.tensor([17, 0, 24], dtype=torch.int32)
    qa, sfa = grouped_cast(a, per_token_cast)
    d = torch.full((groups, max_m, n), float("nan"), dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_masked((qa, mn_major(sfa)), grouped_cast(b, per_block_cast), d, masked_m, 20)
    for g, rows in enumerate(masked_m.tolist()):
        if rows:
            assert calc_diff(d[g, :rows], a[g, :rows].double() @ b[g].double().T) < 1e-3


def test_deep_gemm_missing_features_say_what():
    a, b = per_token_cast(torch.randn(4, 128)), per_block_cast(torch.randn(8, 128))
    cases = [
        (lambda: deep_gemm.fp8_gemm_nt(a, b, torch.empty(4, 8), c=torch.zeros(4, 8)), "accumulation into d"),
        (lambda: deep_gemm.fp8_gemm_nt(a, b, torch.empty(4, 8)), "float32 output d"),
        (lambda: deep_gemm.fp8_gemm_nt(a, b, torch.empty(4, 8, dtype=torch.bfloat16), recipe=(1, 1, 128)),
         "recipe=.1, 1, 128."),
        (lambda: deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, None, [], None), "the k-grouped GEMM"),
        (lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, None, None, use_psum_layout=True), "PSUM"),
        (lambda: deep_gemm.fp8_gemm_nt((a[0], a[1].int()), b, torch.empty(4, 8, dtype=torch.bfloat16)),
         "packed UE8M0"),
    ]
    for call, what in cases:
        with pytest.raises(NotImplementedError, match=f"DeepGEMM: .*{what}"):
            call()
    with pytest.raises(TypeError, match="sfa: expected dtype float32, got float16"):
        deep_gemm.fp8_gemm_nt((a[0], a[1].half()), b, torch.empty(4, 8, dtype=torch.bfloat16))


# ---- FlashMLA --------------------------------------------------------------------------------------------

def flash_mla_inputs(b, s_q, s_k, h_q, varlen, zero_lengths, seed):
    """As FlashMLA's generate_test_data: q and K in [-1, 1] / 10 scale, a shuffled block table whose unused
    entries hold a huge id, NaN in every unused cache slot, lengths >= s_q (or 0 for some requests)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.full((b,), s_k, dtype=torch.int32)
    if varlen:
        for i in range(b):
            lengths[i] = max(int(rng.normalvariate(s_k, s_k / 2)), s_q)
    if zero_lengths:
        lengths[torch.randn(b, generator=gen) > 0] = 0
        lengths[0], lengths[-1] = 0, max(int(lengths[-1]), s_q)
    pages = -(-int(lengths.max()) // 256) * 256 // 64
    block_table = torch.randperm(b * pages, generator=gen).to(torch.int32).view(b, pages)
    q = (torch.randn(b, s_q, h_q, 576, generator=gen) / 10).clamp(-1, 1).to(torch.bfloat16)
    cache = (torch.randn(b * pages, 64, 1, 576, generator=gen) / 10).clamp(-1, 1).to(torch.bfloat16)
    for i in range(b):
        used = -(-int(lengths[i]) // 64)
        cache[block_table[i, used:].long()] = float("nan")
        if int(lengths[i]) % 64:
            cache[block_table[i, used - 1], int(lengths[i]) % 64:] = float("nan")
        block_table[i, used:] = 2147480000
    return q, cache, block_table, lengths


def flash_mla_reference(q, cache, block_table, lengths, causal):
    """float64 attention per request; a request of length 0 gives out 0 and lse +inf."""
    b, s_q, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        if n == 0:
            continue
        kv = cache[block_table[i, :-(-n // 64)].long()].reshape(-1, 576)[:n].double()
        scores = torch.einsum("shd,td->hst", q[i].double(), kv) / math.sqrt(576)
        if causal and s_q > 1:
            visible = torch.arange(n)[None, :] <= (n - s_q + torch.arange(s_q))[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        lse[i] = torch.logsumexp(scores, dim=-1)
        out[i] = torch.einsum("hst,td->shd", torch.softmax(scores, dim=-1), kv[:, :512])
    return out, lse


def assert_flash_mla_close(out, lse, ref_out, ref_lse):
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert calc_diff(out, ref_out) < 5e-6
    err = (out.double() - ref_out).abs()
    assert bool(((err < 8e-4) | (err < 2.01 / 128 * ref_out.abs())).all()), float(err.max())
    lse_err = (lse.double() - ref_lse)[finite].abs()
    assert bool(((lse_err < 1e-6) | (lse_err < 8.01 / 65536 * ref_lse[finite].abs())).all()), float(lse_err.max())


FLASH_MLA_CASES = [  # (b, s_q, s_k, h_q, varlen, causal, zero-length requests)
    (2, 1, 140, 3, True, False, False),
    (3, 2, 20, 9, False, True, False),
    (4, 2, 300, 16, True, True, True),
    (1, 4, 140, 1, False, True, False),
    (2, 2, 4096, 128, True, True, True),  # DeepSeek-V3's 128 heads over long, uneven requests
]


@pytest.mark.parametrize("case", FLASH_MLA_CASES)
def test_flash_mla_with_kvcache(backend, case):
    b, s_q, s_k, h_q, varlen, causal, zero_lengths = case
    if backend == "triton" and case is not FLASH_MLA_CASES[2]:
        pytest.skip("interpreter time: the Triton path runs the case with zero-length requests")
    q, cache, block_table, lengths = flash_mla_inputs(b, s_q, s_k, h_q, varlen, zero_lengths, seed=sum(case))
    sched_meta, num_splits = flash_mla.get_mla_metadata(lengths, s_q * h_q, 1)
    assert num_splits is None and not sched_meta.have_initialized
    for _ in range(2):  # the second call reuses the schedule the first one planned
        out, lse = flash_mla.flash_mla_with_kvcache(q, cache, block_table, lengths, 512, sched_meta, num_splits,
                                                    causal=causal)
        assert_flash_mla_close(out, lse, *flash_mla_reference(q, cache, block_table, lengths, causal))
    assert sched_meta.have_initialized and sched_meta.schedule.batch == b


def test_flash_mla_schedule_must_match_its_first_use():
    q, cache, block_table, lengths = flash_mla_inputs(2, 1, 70, 4, False, False, seed=3)
    sched_meta, _ = flash_mla.get_mla_metadata()
    flash_mla.flash_mla_with_kvcache(q, cache, block_table, lengths, 512, sched_meta)
    with pytest.raises(ValueError, match="tile_scheduler_metadata: expected a call consistent with the first"):
        flash_mla.flash_mla_with_kvcache(q, cache, block_table, lengths, 512, sched_meta, causal=True)
    with pytest.raises(TypeError, match="tile_scheduler_metadata: expected the FlashMLASchedMeta"):
        flash_mla.flash_mla_with_kvcache(q, cache, block_table, lengths, 512, None)


def test_flash_mla_missing_features_say_what():
    q, cache, block_table, lengths = flash_mla_inputs(1, 1, 70, 4, False, False, seed=4)
    meta = flash_mla.get_mla_metadata()[0]
    call = flash_mla.flash_mla_with_kvcache
    cases = [
        (lambda: call(q, cache, None, None, 512, meta, indices=torch.zeros(1, 1, 64, dtype=torch.int32)),
         "sparse attention .indices"),
        (lambda: call(q, cache, block_table, lengths, 512, meta, is_fp8_kvcache=True), "the FP8 KV cache"),
        (lambda: call(q, cache, block_table, lengths, 512, meta, attn_sink=torch.zeros(4)), "attention sinks"),
        (lambda: call(q, cache.expand(-1, -1, 2, -1), block_table, lengths, 512, meta), "more than one KV head"),
    ]
    for run, what in cases:
        with pytest.raises(NotImplementedError, match=f"FlashMLA: {what}"):
            run()


# ---- DeepEP ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,counts,backend_name", [(3, [21, 0, 30], "torch"), (2, [9, 14], "triton")])
def test_deep_ep_intranode(world, counts, backend_name):
    checks = moe_dist.run_ranks(world, compat_dist.program_deep_ep_intranode, backend_name, 11, counts, 256, 4,
                                4 * world)
    assert checks == [6] * world


@pytest.mark.parametrize("counts,backend_name", [([5, 8], "torch"), ([7, 0], "triton")])
def test_deep_ep_low_latency_and_num_worst_tokens(counts, backend_name):
    # 2 x forms x (bf16, FP8) x (identity, scaled experts) combines, then the num_worst_tokens check.
    checks = moe_dist.run_ranks(2, compat_dist.program_deep_ep_low_latency, backend_name, 23, counts, 256, 3, 8)
    assert checks == [9, 9]


def test_deep_ep_missing_features_say_what():
    with pytest.raises(NotImplementedError, match="DeepEP: mpi4py communicators"):
        deep_ep.Buffer(None, comm=object())
    with pytest.raises(NotImplementedError, match="DeepEP: shrink mode"):
        deep_ep.Buffer(None, enable_shrink=True)
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 256 * 128 * 7168 * 2
    with pytest.raises(ValueError, match="num_experts: expected a multiple of num_ranks = 8, got 250"):
        deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 250)
    # The remaining checks run before any collective, so a Buffer over no group serves them.
    buffer = deep_ep.Buffer.__new__(deep_ep.Buffer)
    buffer.low_latency_mode, buffer.group_size = True, 2
    x, idx = torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(4, 2, dtype=torch.int64)
    dispatch = buffer.low_latency_dispatch
    cases = [
        (lambda: dispatch(x, idx, 8, 8, round_scale=True), "power-of-two .round_scale."),
        (lambda: dispatch(x, idx, 8, 8, round_scale=True, use_ue8m0=True), "UE8M0"),
        (lambda: dispatch(x, idx, 8, 8, return_recv_hook=True), "return_recv_hook=True"),
        (lambda: dispatch(x, idx, 8, 8, dispatch_wait_recv_cost_stats=torch.zeros(2, dtype=torch.int64)),
         "dispatch_wait_recv_cost_stats"),
        (lambda: buffer.low_latency_combine(x, idx, idx.float(), None, use_logfmt=True), "LogFMT"),
        (lambda: buffer.low_latency_combine(x, idx, idx.float(), None, zero_copy=True), "zero-copy"),
        (lambda: buffer.low_latency_combine(x, idx, idx.float(), None, return_recv_hook=True), "return_recv_hook"),
        (lambda: buffer.get_next_low_latency_combine_buffer(None), "zero-copy"),
        (lambda: buffer.internode_dispatch(), "internode dispatch"),
    ]
    for call, what in cases:
        with pytest.raises(NotImplementedError, match=f"DeepEP: .*{what}"):
            call()
    with pytest.raises(TypeError, match="cumulative_local_expert_recv_stats: expected dtype int32"):
        dispatch(x, idx, 8, 8, cumulative_local_expert_recv_stats=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="cumulative_local_expert_recv_stats: expected shape"):
        dispatch(x, idx, 8, 8, cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="handle: expected the handle low_latency_dispatch returned"):
        buffer.low_latency_combine(x, idx, idx.float(), (None,) * 5)
    buffer.low_latency_mode = False
    with pytest.raises(ValueError, match="low_latency_mode: expected True for low_latency_dispatch"):
        dispatch(x, idx, 8, 8)
    with pytest.raises(ValueError, match="low_latency_mode: expected True for clean_low_latency_buffer"):
        buffer.clean_low_latency_buffer(8, 256, 8)


def test_backend_variable_is_checked(monkeypatch):
    monkeypatch.setenv("PYKERNELS_BACKEND", "fast")
    a, b = per_token_cast(torch.randn(4, 128)), per_block_cast(torch.randn(8, 128))
    with pytest.raises(ValueError, match="PYKERNELS_BACKEND: expected one of 'auto', 'cuda', 'triton', 'torch', got 'fast'"):
        deep_gemm.fp8_gemm_nt(a, b, torch.empty(4, 8, dtype=torch.bfloat16))
    monkeypatch.setenv("PYKERNELS_BACKEND", "cuda")
    if not pykernels.backends()["cuda"]["available"]:
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            deep_gemm.fp8_gemm_nt(a, b, torch.empty(4, 8, dtype=torch.bfloat16))
