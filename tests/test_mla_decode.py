"""MLA decode: the reference against float64 math on the dense (unpaged) cache, the split-KV scheduler
(Python and C++ give the same plan; the splits cover every page once), argument checks and stale schedules,
then the Triton kernels (interpreter on CPU) and the CUDA kernels (GPU only) against float64.

Tolerances are FlashMLA's, on every backend: cosine difference 1 - 2 sum(xy) / sum(x^2 + y^2) < 5e-6 over
the whole output, and element-wise |out - exact| <= 8e-4 + 2.01/128 |exact|. out is bfloat16 (a relative
rounding of 2^-8), and the kernels round P, the softmax weights, to bfloat16 before P V as FlashMLA does.
A flat softmax (random q and k at scale 576^-0.5) averages V to about 0.03, where an absolute tolerance
hides any error, so the cases also use DeepSeek-V3's scale 0.135 with larger q norms: a peaked softmax whose
output is a few rows of V. lse is computed in float32 from float32 scores of bfloat16 inputs: 1e-4 relative
to its magnitude (the float64 answer uses the same bfloat16 inputs, so only summation order and float32
rounding differ). A row that sees no key must come out exactly 0 with lse +inf. FP8 caches are compared to
the reference on the same e4m3 cache (the dequantization is exact).
"""

import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pykernels
from pykernels import _backend, audit
from pykernels.mla_decode import FIXED_OVERHEAD, PAGE_SIZE, num_sm_parts_for, plan_splits
from pykernels.mla_decode import mla_decode as mla_decode_implementation
from pykernels.reference import mla_decode as ref
from pykernels.triton import mla_decode as triton_mla

FP8 = torch.float8_e4m3fn
COS_DIFF = 5e-6  # FlashMLA's tests
ATOL, RTOL = 8e-4, 2.01 / 128
LSE_RTOL = 1e-4
V3_SCALE = 0.135  # DeepSeek-V3: 192 ** -0.5 * mscale ** 2


def make_batch(lengths, s_q, h_q, device, fp8=False, extra_pages=3, table_slack=2, keep_dense=True, q_norm=1.0):
    """A paged cache holding random latent rows for each request, pages in a shuffled order, every unused
    page and every position past a sequence's end filled with NaN, block_table entries past the pages a
    request uses (all of them for a length-0 request) filled with garbage, out-of-range ids included. q is
    N(0, q_norm^2). Returns (q, kv_cache, block_table, cache_seqlens, kv_scale, dense): dense[i] is request
    i's [L_i, 576] rows in float64 on the CPU (after FP8 quantization and kv_scale, when fp8), the
    independent view the float64 check uses (None when keep_dense=False, for GPU-sized batches)."""
    b = len(lengths)
    pages = [-(-n // PAGE_SIZE) for n in lengths]
    max_blocks = max(pages) + table_slack
    num_blocks = sum(pages) + extra_pages
    order = torch.randperm(num_blocks).to(device)
    store_dtype = FP8 if fp8 else torch.bfloat16
    cache = torch.full((num_blocks, PAGE_SIZE, 1, 576), float("nan"), device=device).to(store_dtype)
    block_table = torch.randint(-5, 10 ** 6, (b, max_blocks), dtype=torch.int32)  # garbage past the used pages
    kv_scale = torch.tensor([0.0173], dtype=torch.float32, device=device) if fp8 else None
    dense, used = ([] if keep_dense else None), 0
    for i, n in enumerate(lengths):
        ids = order[used: used + pages[i]]
        used += pages[i]
        block_table[i, : pages[i]] = ids.int().cpu()
        rows = torch.randn(n, 576, device=device)
        stored = (rows / kv_scale).clamp(-448, 448).to(FP8) if fp8 else rows.bfloat16()
        if keep_dense:
            dense.append(stored.double().cpu() * (kv_scale.double().cpu() if fp8 else 1.0))
        padded = torch.full((pages[i] * PAGE_SIZE, 576), float("nan"), device=device).to(store_dtype)
        padded[:n] = stored
        cache[ids] = padded.reshape(pages[i], PAGE_SIZE, 1, 576)
    q = (torch.randn(b, s_q, h_q, 576, device=device) * q_norm).bfloat16()
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return q, cache, block_table.to(device), seqlens, kv_scale, dense


P_ROUNDING = 2.0 ** -8  # unit roundoff of bfloat16, the kernels' rounding of each softmax weight


def float64_attention(q, dense, s_q, causal, scale):
    """Per request, token and head, straight from the dense rows: (out [b, s_q, h_q, 512], lse [b, h_q, s_q],
    p_error [b, s_q, h_q, 512]). p_error bounds what rounding each weight p_j to bfloat16 before P V (as the
    kernels and FlashMLA do) may move an output element, sum_j d_j p_j V_j with independent |d_j| <= 2^-8:
    at most 2^-8 sum_j p_j |V_j|, and beyond 3 * 2^-8 sqrt(sum_j (p_j V_j)^2) (5 standard deviations) only
    with negligible probability; the smaller is used. It matters where two weights of V rows of opposite
    sign cancel, which a peaked softmax makes common and FlashMLA's flat-softmax cases did not."""
    b, _, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.zeros(b, h_q, s_q, dtype=torch.float64)
    p_error = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    for i in range(b):
        kv = dense[i]
        n = kv.shape[0]
        for t in range(s_q):
            visible = n - s_q + t + 1 if causal and s_q > 1 else n
            if visible <= 0:
                lse[i, :, t] = float("inf")  # no key: out 0, lse +inf
                continue
            scores = q[i, t].cpu().double() @ kv[:visible].T * scale  # [h_q, visible]
            top = scores.max(dim=-1, keepdim=True).values
            weights = torch.exp(scores - top)
            denom = weights.sum(dim=-1, keepdim=True)
            probs = weights / denom
            v = kv[:visible, :512]
            out[i, t] = probs @ v
            lse[i, :, t] = (top + torch.log(denom)).squeeze(-1)
            p_error[i, t] = P_ROUNDING * torch.minimum(probs @ v.abs(), 3 * ((probs * probs) @ (v * v)).sqrt())
    return out, lse, p_error


def attention_error(out, lse, want_out, want_lse, p_error=0.0):
    """What is wrong with (out, lse) against the exact answer, by FlashMLA's checks (the element-wise one
    widened by p_error, see float64_attention); None when nothing is."""
    out, lse = out.cpu().double(), lse.cpu().double()
    want_out, want_lse = want_out.cpu().double(), want_lse.cpu().double()
    empty = want_lse == float("inf")  # [b, h_q, s_q]: rows that see no key
    empty_rows = empty.transpose(1, 2)  # [b, s_q, h_q]
    if not ((out[empty_rows] == 0).all() and (lse[empty] == float("inf")).all()):
        return "a row that sees no key is not out 0, lse +inf"
    if not (torch.isfinite(out[~empty_rows]).all() and torch.isfinite(lse[~empty]).all()):
        return "non-finite values"
    cos_diff = 1 - 2 * (out * want_out).sum() / (out * out + want_out * want_out).sum().clamp(min=1e-300)
    if cos_diff >= COS_DIFF:
        return f"cosine difference {float(cos_diff):.3g} >= {COS_DIFF}"
    excess = (out - want_out).abs() - (ATOL + RTOL * want_out.abs() + p_error)
    if excess.max() > 0:
        return f"out off by {float((out - want_out).abs().max()):.4g} (worst excess {float(excess.max()):.3g})"
    lse_excess = (lse[~empty] - want_lse[~empty]).abs() - LSE_RTOL * (1 + want_lse[~empty].abs())
    if lse_excess.numel() and lse_excess.max() > 0:
        return f"lse off by {float((lse[~empty] - want_lse[~empty]).abs().max()):.4g}"
    return None


def assert_close(out, lse, want_out, want_lse, p_error=0.0):
    error = attention_error(out, lse, want_out, want_lse, p_error)
    assert error is None, error


# ---- reference vs float64 -------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths,s_q,h_q,causal,q_norm", [
    ([1, 63, 64, 65], 1, 16, False, 1.0),
    ([1, 0, 63, 64, 65], 2, 3, True, 3.0),
    ([200, 7, 2], 4, 5, True, 1.0),
    ([130, 1000, 0], 2, 128, False, 3.0),
])
@pytest.mark.parametrize("fp8", [False, True])
def test_reference_vs_float64(lengths, s_q, h_q, causal, q_norm, fp8):
    q, cache, table, seqlens, kv_scale, dense = make_batch(lengths, s_q, h_q, "cpu", fp8, q_norm=q_norm)
    out, lse = ref.mla_decode(q, cache, table, seqlens, softmax_scale=V3_SCALE, causal=causal, kv_scale=kv_scale)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want_out, want_lse, _ = float64_attention(q, dense, s_q, causal, V3_SCALE)
    assert_close(out, lse, want_out, want_lse)  # no P rounding in the reference: no widening
    # float32 math, one bfloat16 rounding of out: 2^-8 relative plus float32 noise.
    assert ((out.double() - want_out).abs() <= 2 ** -8 * want_out.abs() + 1e-5).all()
    seen = want_lse != float("inf")
    assert ((lse.double() - want_lse)[seen].abs() <= 1e-5 * (1 + want_lse[seen].abs())).all()


def test_checks_catch_a_wrong_answer():
    """FlashMLA's checks reject the answers of plausible bugs on the cases the kernel tests use: a split
    whose last page is dropped, P truncated to bfloat16 rather than rounded, a wrong softmax scale."""
    lengths, s_q, h_q = [1, 63, 64, 65, 900], 2, 16
    q, _, _, _, _, dense = make_batch(lengths, s_q, h_q, "cpu", q_norm=3.0)
    want_out, want_lse, p_error = float64_attention(q, dense, s_q, False, V3_SCALE)
    assert attention_error(want_out.bfloat16(), want_lse.float(), want_out, want_lse, p_error) is None
    dropped = [kv[:-64] if kv.shape[0] > 64 else kv for kv in dense]
    wrong = float64_attention(q, dropped, s_q, False, V3_SCALE)[:2]
    assert attention_error(*wrong, want_out, want_lse, p_error) is not None
    wrong = float64_attention(q, dense, s_q, False, V3_SCALE * 0.97)[:2]
    assert attention_error(*wrong, want_out, want_lse, p_error) is not None
    # The same computation with each bfloat16 rounding truncated, as the interpreter's casts did.
    trunc_out = torch.zeros_like(want_out)
    for i, kv in enumerate(dense):
        scores = torch.einsum("thd,nd->thn", q[i].double(), kv) * V3_SCALE
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        p_bf16 = (p.float().view(torch.int32) & -65536).view(torch.float32).double()
        o = (p_bf16 @ kv[:, :512]) / p.sum(-1, keepdim=True)
        trunc_out[i] = (o.float().view(torch.int32) & -65536).view(torch.float32).double()
    assert attention_error(trunc_out, want_lse, want_out, want_lse, p_error) is not None


def test_reference_rows_without_keys():
    """Length 0, and with causal the tokens t with len - s_q + t < 0: out 0 and lse +inf; the length-0
    request's block_table row (all garbage) is never read."""
    q, cache, table, seqlens, _, dense = make_batch([0, 1, 2, 70], 3, 4, "cpu")
    table[0, :2] = torch.tensor([10 ** 9, -7], dtype=torch.int32)
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, causal=True, backend="torch")
    assert_close(out, lse, *float64_attention(q, dense, 3, True, 576 ** -0.5)[:2])
    assert bool((lse[0] == float("inf")).all()) and bool((out[0] == 0).all())
    assert bool((lse[1, :, :2] == float("inf")).all()) and bool(torch.isfinite(lse[1, :, 2]).all())
    assert bool((lse[2, :, 0] == float("inf")).all()) and bool(torch.isfinite(lse[2, :, 1:]).all())


def test_reference_causal_rule():
    """Token t of s_q sees keys 0 .. L - s_q + t: with L = s_q, token 0 sees only key 0, so its output is
    exactly V[0] and its lse is its one score."""
    q, cache, table, seqlens, _, dense = make_batch([3], 3, 2, "cpu")
    out, lse = ref.mla_decode(q, cache, table, seqlens, causal=True)
    v0 = dense[0][0, :512]
    assert torch.equal(out[0, 0].float(), v0.float().bfloat16().float().expand(2, 512))
    score = (q[0, 0].double() @ dense[0][0]) * 576 ** -0.5
    assert torch.allclose(lse[0, :, 0].double(), score, rtol=1e-5, atol=1e-5)
    full, _ = ref.mla_decode(q, cache, table, seqlens, causal=False)
    assert not torch.equal(full[0, 0], out[0, 0])


def test_default_softmax_scale_is_576():
    q, cache, table, seqlens, _, _ = make_batch([70], 1, 4, "cpu")
    a = pykernels.mla_decode(q, cache, table, seqlens, backend="torch")
    b = pykernels.mla_decode(q, cache, table, seqlens, softmax_scale=576 ** -0.5, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert "192 ** -0.5 * mscale ** 2" in pykernels.mla_decode.__doc__


# ---- scheduler ----------------------------------------------------------------------------------------

SCHEDULER_CASES = [
    ([1], 1), ([1], 132), ([63, 64, 65], 4), ([1, 63, 64, 65], 132), ([100_000, 1, 5, 64, 65, 3000], 132),
    ([100_000] + [7] * 127, 66), ([4096] * 128, 132), ([16384] * 128, 33), ([1] * 300, 8), ([640], 3),
]


def check_plan(lengths, num_parts, part_splits, splits, split_offsets):
    b = len(lengths)
    pages = [-(-n // PAGE_SIZE) for n in lengths]
    assert len(part_splits) == num_parts + 1 and part_splits[0] == 0
    assert all(x <= y for x, y in zip(part_splits, part_splits[1:]))
    assert part_splits[-1] == len(splits) == split_offsets[-1]
    assert len(splits) <= b + num_parts - 1, "more splits than the buffers' capacity"
    budget = -(-sum(p + FIXED_OVERHEAD for p in pages) // num_parts) + FIXED_OVERHEAD
    for p in range(num_parts - 1):
        cost = sum(e - s + FIXED_OVERHEAD for _, s, e, _ in splits[part_splits[p]: part_splits[p + 1]])
        assert cost <= budget, f"part {p} costs {cost} > budget {budget}"
    for i in range(b):
        mine = splits[split_offsets[i]: split_offsets[i + 1]]
        assert mine, f"request {i} has no split"
        assert [s[0] for s in mine] == [i] * len(mine)
        assert [s[3] for s in mine] == list(range(len(mine)))
        # Contiguous, non-empty, in order, exactly [0, pages): each page once.
        assert mine[0][1] == 0 and mine[-1][2] == pages[i]
        assert all(s[1] < s[2] for s in mine)
        assert all(a[2] == c[1] for a, c in zip(mine, mine[1:]))


@pytest.mark.parametrize("lengths,num_parts", SCHEDULER_CASES)
def test_scheduler_covers_every_page_once(lengths, num_parts):
    check_plan(lengths, num_parts, *plan_splits(lengths, num_parts))


def test_scheduler_random_batches():
    rng = random.Random(7)
    for _ in range(200):
        lengths = [rng.choice([1, 63, 64, 65, rng.randint(1, 20000)]) for _ in range(rng.randint(1, 40))]
        num_parts = rng.randint(1, 140)
        check_plan(lengths, num_parts, *plan_splits(lengths, num_parts))


def test_scheduler_balances_work():
    """A 100k-token request among short ones is cut into many splits, so no part does far more than its share."""
    lengths = [100_000] + [64] * 31
    part_splits, splits, _ = plan_splits(lengths, 66)
    long_splits = [s for s in splits if s[0] == 0]
    assert len(long_splits) > 40
    costs = [sum(e - s + FIXED_OVERHEAD for _, s, e, _ in splits[a:b]) for a, b in zip(part_splits, part_splits[1:])]
    assert max(costs) <= sum(costs) / 66 + 2 * FIXED_OVERHEAD


def _extension():
    ext, why = _backend.extension()
    if ext is None:
        pytest.skip(f"CUDA extension not built: {why}")
    return ext


@pytest.mark.parametrize("lengths,num_parts", SCHEDULER_CASES)
def test_scheduler_cpp_matches_python(lengths, num_parts):
    ext = _extension()
    got = ext.mla_plan_splits(lengths, num_parts)
    want = plan_splits(lengths, num_parts)
    assert list(got[0]) == want[0]
    assert [tuple(s) for s in got[1]] == want[1]
    assert list(got[2]) == want[2]


def test_scheduler_cpp_matches_python_random():
    ext = _extension()
    rng = random.Random(11)
    for _ in range(200):
        lengths = [rng.randint(1, 70000) if rng.random() < 0.1 else rng.randint(1, 300) for _ in range(rng.randint(1, 64))]
        num_parts = rng.randint(1, 140)
        got = ext.mla_plan_splits(lengths, num_parts)
        assert (list(got[0]), [tuple(s) for s in got[1]], list(got[2])) == plan_splits(lengths, num_parts)


def test_scheduler_gives_unchecked_empty_lengths_one_page():
    """A replayed CUDA graph may see lengths of 0 (padding slots) that no check saw. Each such request must
    still own one split of one (fully masked) page: the CUDA kernel loads every split's first page before
    it starts the split, so a split without a page would shift the page pipeline of the other requests on
    its SM part."""
    lengths = [0, 100_000, 0, 1, 0] + [4096] * 20 + [0]
    for num_parts in (1, 3, 132):
        part_splits, splits, split_offsets = plan_splits(lengths, num_parts)
        check_plan([max(n, 1) for n in lengths], num_parts, part_splits, splits, split_offsets)
        for i, n in enumerate(lengths):
            if n == 0:
                assert splits[split_offsets[i]: split_offsets[i + 1]] == [(i, 0, 1, 0)]


def test_scheduler_takes_every_int32_length():
    """Tokens are indexed in int32 and lengths are rounded up to pages in 64-bit arithmetic: 2^31 - 1 is the
    longest the kernels take, and both planners agree on it; a longer one cannot reach them."""
    lengths = [5, 2 ** 31 - 1, 0, 2 ** 31 - 64]
    want = plan_splits(lengths, 4)
    assert want[1][want[2][1]: want[2][2]][-1][2] == 2 ** 25
    got = _extension().mla_plan_splits(lengths, 4)
    assert (list(got[0]), [tuple(s) for s in got[1]], list(got[2])) == want
    with pytest.raises(ValueError, match="seqlens: expected an int in .*2147483647.*got 2147483648"):
        plan_splits([5, 2 ** 31], 4)


def test_scheduler_cpp_matches_python_with_empty_and_rejects_negative_lengths():
    ext = _extension()
    lengths = [0, 5, 0, 130, 0]
    got = ext.mla_plan_splits(lengths, 3)
    assert (list(got[0]), [tuple(s) for s in got[1]], list(got[2])) == plan_splits(lengths, 3)
    with pytest.raises(ValueError, match="seqlens: expected every length >= 0, got -1"):
        ext.mla_plan_splits([5, -1], 4)


def test_get_mla_metadata_tensors():
    seqlens = torch.tensor([1, 63, 64, 65, 5000], dtype=torch.int32)
    sched = pykernels.get_mla_metadata(seqlens, 2 * 16, 1)
    assert isinstance(sched, pykernels.MlaSchedule)
    assert sched.num_parts == num_sm_parts_for(32, 1, 132) == 132
    assert sched.batch == 5 and sched.capacity == 5 + 132
    assert sched.num_q_tokens_per_head_k == 32 and sched.num_heads_k == 1
    assert sched.seqlens_ptr == seqlens.data_ptr() and sched.seqlens_version == seqlens._version
    part_splits, splits, split_offsets = plan_splits(seqlens.tolist(), 132)
    assert sched.part_splits.tolist() == part_splits
    assert sched.split_offsets.tolist() == split_offsets
    assert [tuple(s) for s in sched.splits[: len(splits)].tolist()] == splits
    assert pykernels.get_mla_metadata(seqlens, 128 * 2, 1).num_parts == 132 // 4
    assert pykernels.get_mla_metadata(seqlens, 16, 1, num_sm_parts=3).num_parts == 3


# ---- argument checks ----------------------------------------------------------------------------------

def good_args():
    q, cache, table, seqlens, _, _ = make_batch([70, 5], 2, 4, "cpu")
    return dict(q=q, kv_cache=cache, block_table=table, cache_seqlens=seqlens)


def with_entry(table, row, col, value):
    table = table.clone()
    table[row, col] = value
    return table


@pytest.mark.parametrize("change,exc,pattern", [
    (lambda a: dict(q=a["q"].float()), TypeError, "q: expected dtype bfloat16"),
    (lambda a: dict(q=torch.zeros(2, 2, 4, 512, dtype=torch.bfloat16)), ValueError, "q: expected head dim 576"),
    (lambda a: dict(q=torch.zeros(2, 5, 4, 576, dtype=torch.bfloat16)), ValueError, "q: expected s_q"),
    (lambda a: dict(q=torch.zeros(2, 1, 129, 576, dtype=torch.bfloat16)), ValueError, "q: expected h_q"),
    (lambda a: dict(q=a["q"].transpose(1, 2)), ValueError, "q: expected a contiguous"),
    (lambda a: dict(kv_cache=a["kv_cache"].half()), TypeError, "kv_cache: expected dtype"),
    (lambda a: dict(kv_cache=torch.zeros(8, 64, 1, 512, dtype=torch.bfloat16)), ValueError, "kv_cache: expected head dim 576"),
    (lambda a: dict(kv_cache=torch.zeros(8, 32, 1, 576, dtype=torch.bfloat16)), ValueError, "kv_cache: expected page size 64"),
    (lambda a: dict(kv_cache=torch.zeros(8, 64, 2, 576, dtype=torch.bfloat16)), ValueError, "kv_cache: expected 1 KV head"),
    (lambda a: dict(kv_cache=a["kv_cache"][..., 0]), ValueError, "kv_cache: expected 4 dimensions"),
    (lambda a: dict(block_table=a["block_table"].long()), TypeError, "block_table: expected dtype int32"),
    (lambda a: dict(block_table=a["block_table"][:1]), ValueError, "block_table: expected shape"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens: expected dtype int32"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "cache_seqlens: expected shape"),
    (lambda a: dict(cache_seqlens=torch.tensor([70, -1], dtype=torch.int32)), ValueError,
     "cache_seqlens: expected every length in 0..2147483647 .* got -1"),
    (lambda a: dict(cache_seqlens=torch.tensor([70, 64 * 4 + 1], dtype=torch.int32)), ValueError, "cache_seqlens: expected lengths <= 256"),
    (lambda a: dict(block_table=with_entry(a["block_table"], 0, 1, 10 ** 6)), ValueError,
     "block_table: expected page ids in 0..5 .* got 1000000"),
    (lambda a: dict(block_table=with_entry(a["block_table"], 1, 0, -1)), ValueError,
     "block_table: expected page ids in 0..5 .* got -1"),
    (lambda a: dict(head_dim_v=576), ValueError, "head_dim_v: expected 512"),
    (lambda a: dict(head_dim_v=512.0), TypeError, "head_dim_v: expected an int"),
    (lambda a: dict(softmax_scale=-1.0), ValueError, "softmax_scale: expected a finite positive"),
    (lambda a: dict(softmax_scale="0.1"), TypeError, "softmax_scale: expected a float"),
    (lambda a: dict(causal=1), TypeError, "causal: expected a bool"),
    (lambda a: dict(kv_scale=torch.ones(1)), TypeError, "kv_scale: expected None"),
    (lambda a: dict(kv_cache=a["kv_cache"].to(FP8)), TypeError, "kv_scale: expected a float or a float32 tensor"),
    (lambda a: dict(kv_cache=a["kv_cache"].to(FP8), kv_scale="0.5"), TypeError, "kv_scale: expected a float or"),
    (lambda a: dict(kv_cache=a["kv_cache"].to(FP8), kv_scale=0.0), ValueError, "kv_scale: expected a finite positive"),
    (lambda a: dict(kv_cache=a["kv_cache"].to(FP8), kv_scale=float("nan")), ValueError,
     "kv_scale: expected a finite positive"),
    (lambda a: dict(kv_cache=a["kv_cache"].to(FP8), kv_scale=torch.ones(1, dtype=torch.float64)), TypeError,
     "kv_scale: expected dtype float32"),
    (lambda a: dict(kv_cache=a["kv_cache"].to(FP8), kv_scale=torch.ones(2)), ValueError, "kv_scale: expected one element"),
    (lambda a: dict(metadata=object()), TypeError, "metadata: expected an MlaSchedule"),
    (lambda a: dict(metadata=pykernels.get_mla_metadata(torch.tensor([5], dtype=torch.int32), 8, 1)), ValueError,
     "metadata: expected a schedule planned for 2 requests"),
    (lambda a: dict(metadata=pykernels.get_mla_metadata(a["cache_seqlens"], 4, 1)), ValueError,
     r"metadata: expected a schedule planned for s_q \* h_q = 8 query rows .* got 4 rows"),
    (lambda a: dict(metadata=pykernels.get_mla_metadata(a["cache_seqlens"].clone(), 8, 1)), ValueError,
     "metadata: expected a schedule planned from this cache_seqlens tensor"),
    (lambda a: dict(backend="cudnn"), ValueError, "backend: expected one of"),
])
def test_argument_errors(change, exc, pattern):
    args = good_args()
    args.update(change(args))
    backend = args.pop("backend", "torch")
    with pytest.raises(exc, match=pattern):
        pykernels.mla_decode(**args, backend=backend)


def test_wrong_device_is_rejected():
    args = good_args()
    args["block_table"] = args["block_table"].to("meta")
    with pytest.raises(ValueError, match="block_table: expected a tensor on cpu"):
        pykernels.mla_decode(**args, backend="torch")


def test_meta_tensors_are_rejected():
    args = {name: t.to("meta") for name, t in good_args().items()}
    with pytest.raises(ValueError, match="q: expected a tensor on cpu or cuda, got one on meta"):
        pykernels.mla_decode(**args, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stale_schedule_is_refused(backend):
    """A schedule planned for 1-token requests, used after the lengths were written in place (to 190: the
    plan would cover one page of each, silently): refused by the version counter, for the whole tensor and
    through a view, with no value read."""
    q, cache, table, seqlens, _, _ = make_batch([190, 190], 2, 4, "cpu")
    lens = torch.ones(2, dtype=torch.int32)
    sched = pykernels.get_mla_metadata(lens, 8, 1)
    lens.copy_(seqlens)
    with pytest.raises(ValueError, match="metadata: expected a schedule planned for the current cache_seqlens.*"
                                         "call get_mla_metadata again"):
        pykernels.mla_decode(q, cache, table, lens, metadata=sched, backend=backend)
    sched = pykernels.get_mla_metadata(lens, 8, 1)
    lens[1:].fill_(100)
    with pytest.raises(ValueError, match="written in place"):
        pykernels.mla_decode(q, cache, table, lens, metadata=sched, backend=backend)


def test_schedule_of_an_inference_tensor_checks_what_it_can():
    """Under torch.inference_mode a tensor has no version counter: the pointer, batch and rows still hold."""
    args = good_args()
    with torch.inference_mode():
        lens = args.pop("cache_seqlens").clone()
        sched = pykernels.get_mla_metadata(lens, 8, 1)
    assert sched.seqlens_version is None
    pykernels.mla_decode(**args, cache_seqlens=lens, metadata=sched, backend="torch")
    with pytest.raises(ValueError, match="another tensor"):
        pykernels.mla_decode(**args, cache_seqlens=lens.clone(), metadata=sched, backend="torch")


def test_get_mla_metadata_errors():
    lens = torch.tensor([3, 9], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_seqlens: expected dtype int32"):
        pykernels.get_mla_metadata(lens.long(), 16, 1)
    with pytest.raises(ValueError, match="cache_seqlens: expected every length in 0..2147483647 .* got -2"):
        pykernels.get_mla_metadata(torch.tensor([3, -2], dtype=torch.int32), 16, 1)
    with pytest.raises(ValueError, match="cache_seqlens: expected a tensor on cpu or cuda, got one on meta"):
        pykernels.get_mla_metadata(lens.to("meta"), 16, 1)
    with pytest.raises(ValueError, match="num_heads_k: expected an int in 1..1"):
        pykernels.get_mla_metadata(lens, 16, 2)
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k"):
        pykernels.get_mla_metadata(lens, 0, 1)
    with pytest.raises(TypeError, match="num_sm_parts: expected an int"):
        pykernels.get_mla_metadata(lens, 16, 1, num_sm_parts=2.0)


def test_cuda_launcher_checks_run_before_any_launch():
    """The launcher validates on any machine (CPU tensors reach it through DLPack): dtype and shape errors
    name the argument, and a CPU tensor is refused before anything is enqueued."""
    ext = _extension()
    q = torch.zeros(1, 1, 16, 576, dtype=torch.bfloat16)
    cache = torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16)
    table = torch.zeros(1, 2, dtype=torch.int32)
    seqlens = torch.tensor([5], dtype=torch.int32)
    sched = pykernels.get_mla_metadata(seqlens, 16, 1, num_sm_parts=4)
    out = torch.empty(1, 1, 16, 512, dtype=torch.bfloat16)
    lse = torch.empty(1, 16, 1)
    partial, lse_partial = torch.empty(sched.capacity, 16, 512), torch.empty(sched.capacity, 16)

    def call(q=q, cache=cache, kv_scale=None, out=out):
        ext.mla_decode(q, cache, table, seqlens, kv_scale, sched.part_splits, sched.splits, sched.split_offsets, out,
                       lse, partial, lse_partial, 0.1, False, 0)

    with pytest.raises(TypeError, match="q: expected dtype bfloat16"):
        call(q=q.float())
    with pytest.raises(TypeError, match="kv_scale: expected a float32 tensor"):
        call(cache=cache.to(FP8))
    with pytest.raises(ValueError, match="kv_cache: expected size 64 in dim 1"):
        call(cache=cache[:, :32].contiguous())
    with pytest.raises(ValueError, match="out: expected size 512 in dim 3"):
        call(out=torch.empty(1, 1, 16, 576, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="q: expected a CUDA tensor"):
        call()
    with pytest.raises(ValueError, match="cache_seqlens: expected a CUDA tensor"):
        ext.mla_plan_splits_device(seqlens, sched.part_splits, sched.splits, sched.split_offsets, 0)


def test_explicit_cuda_backend_says_why():
    args = good_args()
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        pykernels.mla_decode(**args, backend="cuda")


# ---- Triton (interpreter on CPU, compiled on a GPU) vs float64 ------------------------------------------

TRITON_LENGTHS = [1, 63, 64, 65, 900]  # a long request among short ones, ends mid-page and on page ends


@pytest.mark.parametrize("h_q", [1, 3, 16, 64, 128])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, False), (2, True)])
def test_triton_bf16(device, h_q, s_q, causal):
    """A peaked softmax (DeepSeek-V3's scale, q of norm 3 per element): each output is a few rows of V."""
    lengths = TRITON_LENGTHS if h_q <= 16 else [65, 1, 300]
    q, cache, table, seqlens, _, dense = make_batch(lengths, s_q, h_q, device, q_norm=3.0)
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, softmax_scale=V3_SCALE, causal=causal,
                                    backend="triton")
    assert_close(out, lse, *float64_attention(q, dense, s_q, causal, V3_SCALE))


@pytest.mark.parametrize("h_q,s_q,causal", [(1, 1, False), (16, 1, False), (3, 2, True), (64, 2, False), (128, 2, True)])
def test_triton_fp8(device, h_q, s_q, causal):
    lengths = [1, 64, 65, 400] if h_q <= 16 else [130, 2]
    q, cache, table, seqlens, kv_scale, dense = make_batch(lengths, s_q, h_q, device, fp8=True)
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, causal=causal, kv_scale=kv_scale, backend="triton")
    assert_close(out, lse, *float64_attention(q, dense, s_q, causal, 576 ** -0.5))


@pytest.mark.parametrize("num_sm_parts", [1, 5])
def test_triton_with_precomputed_metadata(device, num_sm_parts):
    """Few parts: long requests stay whole (written directly) or split in a few pieces; the schedule object
    is reused for two calls. A flat softmax (default scale, unit q)."""
    lengths = [700, 1, 64, 130]
    q, cache, table, seqlens, _, dense = make_batch(lengths, 2, 8, device)
    sched = pykernels.get_mla_metadata(seqlens, 16, 1, num_sm_parts=num_sm_parts)
    want = float64_attention(q, dense, 2, True, 576 ** -0.5)
    for _ in range(2):
        out, lse = pykernels.mla_decode(q, cache, table, seqlens, causal=True, metadata=sched, backend="triton")
        assert_close(out, lse, *want)


def test_triton_long_request_among_short(device):
    lengths = [1, 3000, 2, 64]
    q, cache, table, seqlens, _, dense = make_batch(lengths, 1, 16, device, q_norm=2.0)
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, softmax_scale=V3_SCALE, backend="triton")
    assert_close(out, lse, *float64_attention(q, dense, 1, False, V3_SCALE))


def test_triton_rows_without_keys(device):
    """Length-0 requests (their block_table rows all garbage, never read) and causal tokens that see no key
    come out 0 with lse +inf; the 130-token request is cut after its second page, so token 0 sees no key of
    the second split and the combine must weigh that split 0."""
    lengths = [0, 1, 2, 130, 0]
    q, cache, table, seqlens, _, dense = make_batch(lengths, 3, 5, device, q_norm=3.0)
    table[0] = -(10 ** 6)
    table[4] = 10 ** 9
    sched = pykernels.get_mla_metadata(seqlens, 15, 1, num_sm_parts=16)
    assert sched.split_offsets.tolist() == [0, 1, 2, 3, 5, 6]
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, softmax_scale=V3_SCALE, causal=True, metadata=sched,
                                    backend="triton")
    assert_close(out, lse, *float64_attention(q, dense, 3, True, V3_SCALE))
    assert bool((lse[[0, 4]] == float("inf")).all()) and bool((lse[1, :, :2] == float("inf")).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_q_propagates(device, backend):
    """One rule on every backend: a NaN in a query row makes that row's out and lse NaN, and only that row
    (request 0 is split, so the NaN also passes through the combine)."""
    q, cache, table, seqlens, _, dense = make_batch([700, 5], 1, 4, device)
    q[0, 0, 1, 7] = float("nan")
    sched = pykernels.get_mla_metadata(seqlens, 4, 1, num_sm_parts=4)
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, metadata=sched, backend=backend)
    bad = torch.zeros(2, 1, 4, dtype=torch.bool, device=out.device)
    bad[0, 0, 1] = True
    assert bool(out[bad].isnan().all()) and bool(lse.transpose(1, 2)[bad].isnan().all())
    want_out, want_lse, p_error = float64_attention(q, dense, 1, False, 576 ** -0.5)
    out, lse, bad = out.cpu().double(), lse.cpu().double(), bad.cpu()
    for x in (out, want_out):  # the NaN row, checked above; every other row is held to the usual checks
        x[bad] = 0.0
    for x in (lse, want_lse):
        x.transpose(1, 2)[bad] = 0.0
    assert_close(out, lse, want_out, want_lse, p_error)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_scale_forms(device, backend):
    """kv_scale as a float or as a float32 tensor of one element of any shape: the same answer."""
    q, cache, table, seqlens, kv_scale, dense = make_batch([70, 5], 1, 4, device, fp8=True)
    want = float64_attention(q, dense, 1, False, 576 ** -0.5)
    for form in (kv_scale.item(), kv_scale.reshape(1, 1, 1), kv_scale.reshape(())):
        assert_close(*pykernels.mla_decode(q, cache, table, seqlens, kv_scale=form, backend=backend), *want)


class SyncCounter(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (a device synchronization on a GPU)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal", "aten.is_nonzero",
               "aten.unique", "aten._unique")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith("aten.index.") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name.startswith(self.SYNCING) or boolean_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_triton_reads_no_value_with_metadata(monkeypatch):
    """With a schedule, nothing is read back to the host: no .item()/int()/nonzero/min-max, no tolist()
    (which bypasses dispatch on the CPU, so it is counted at the Python level). Planning and the checks of a
    call without a schedule do read, which shows the counter sees them. A dispatch mode sees the exported
    function's torch.library op as one node, so both levels are counted: the exported call (what it does
    around the op) and the module's implementation that the op runs."""
    q, cache, table, seqlens, _, _ = make_batch([70, 0], 2, 2, "cpu")
    tolist = torch.Tensor.tolist
    counter = SyncCounter()
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: counter.seen.append("tolist") or tolist(self))
    with counter:
        sched = pykernels.get_mla_metadata(seqlens, 4, 1, num_sm_parts=2)
    assert "aten._local_scalar_dense.default" in counter.seen and "tolist" in counter.seen
    for call in (pykernels.mla_decode, mla_decode_implementation):
        counter.seen.clear()
        with counter:
            call(q, cache, table, seqlens, causal=True, metadata=sched, backend="triton")
        assert counter.seen == [], call
    counter.seen.clear()
    with counter, pytest.raises(ValueError, match="block_table: expected page ids"):
        mla_decode_implementation(q, cache, table.neg(), seqlens, causal=True, backend="triton")
    assert "aten._local_scalar_dense.default" in counter.seen


def test_triton_runs_a_replanned_schedule(device):
    """Lengths written in place, then planned again: the new schedule holds (the old one is refused)."""
    q, cache, table, seqlens, _, dense = make_batch([190, 3], 2, 4, device, q_norm=3.0)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    stale = pykernels.get_mla_metadata(lens, 8, 1)
    lens.copy_(seqlens)
    with pytest.raises(ValueError, match="call get_mla_metadata again"):
        pykernels.mla_decode(q, cache, table, lens, metadata=stale, backend="triton")
    sched = pykernels.get_mla_metadata(lens, 8, 1)
    out, lse = pykernels.mla_decode(q, cache, table, lens, softmax_scale=V3_SCALE, causal=True, metadata=sched,
                                    backend="triton")
    assert_close(out, lse, *float64_attention(q, dense, 2, True, V3_SCALE))


# ---- Triton: the configs the host picks and the audit's page-loop rule ---------------------------------


def test_triton_split_configs_are_audited():
    """Every split config the host launches is compiled for sm_90 by the audit, with the page-loop rule at
    one page of that cache's dtype."""
    audited = {(k.constexprs["FP8"], k.constexprs["BLOCK_M"], k.num_warps, k.num_stages,
                k.expect.get("mma_loop_load_bytes")) for k in triton_mla.AOT_KERNELS if "split" in k.name}
    for dtype, cfg in triton_mla.SPLIT_CONFIGS.items():
        page = PAGE_SIZE * 576 * dtype.itemsize
        assert (dtype == FP8, cfg.block_m, cfg.num_warps, cfg.num_stages, page) in audited


def _page_loop_listing(body, loop_head=("DEPBAR.LE SB0, 0x0",)):
    """parse_listing's instructions for a function whose page loop holds `body`: set-up loads, the loop
    (an HMMA, `body`, the back-edge), then a store and EXIT."""
    lines = ["LDG.E R4, desc[UR20][R2.64]", "LDG.E.128 R8, desc[UR20][R6.64]"]
    start = len(lines)
    lines += [*loop_head, "HMMA.16816.F32.BF16 R40, R40, R76, RZ", *body]
    lines += [f"@P0 BRA {16 * start:#x}", "STG.E.128 desc[UR20][R2.64], R40", "EXIT"]
    text = "\t\tFunction : _Zfake\n" + "\n".join(f"        /*{16 * i:04x}*/                   {line} ;   /* 0x0 */"
                                                for i, line in enumerate(lines))
    return audit.parse_listing(text)["_Zfake"]


def test_audit_page_loop_loads_one_page():
    """The rule the MLA kernels are audited with: per iteration of the loop around the MMAs, 16-byte tile
    loads times threads make one page; a 4-byte page-id load does not count."""
    tile = ["LDGSTS.E.BYPASS.128 [R137+0x1000], desc[UR20][R38.64], P0"] * 18  # 18 x 16 B x 256 = a bf16 page
    once = audit.mma_loop_loads(_page_loop_listing([*tile, "@P1 LDG.E R5, desc[UR20][R9.64]"]))
    assert (once["start"], once["loads"], once["vector_bytes"], once["nested_loads"]) == (32, 19, 288, 0)
    assert audit.mma_loop_load_failures(once, 256, 73728) == []
    fp8 = audit.mma_loop_loads(_page_loop_listing(["@!P2 LDG.E.128 R48, desc[UR22][R64.64+0x200]"] * 8 +
                                                  ["LDGSTS.E.BYPASS.128 [R7], desc[UR20][R36.64], P2"]))
    assert audit.mma_loop_load_failures(fp8, 256, 36864) == []


def test_audit_page_loop_rule_rejects_a_second_read_of_the_page():
    """V loaded apart from K (16 more 16-byte loads per thread: 64 x 512 bfloat16), K fetched in chunks by
    an inner loop (one static load, many iterations), a narrower load, and no MMA loop at all: each fails."""
    tile = ["LDGSTS.E.BYPASS.128 [R137], desc[UR20][R36.64], P2"] * 18
    twice = audit.mma_loop_loads(_page_loop_listing([*tile, *["LDG.E.128 R48, desc[UR22][R64.64]"] * 16]))
    (why,) = audit.mma_loop_load_failures(twice, 256, 73728)
    assert "loads 139264 B per iteration (544 B per thread), expected 73728 B" in why
    chunk_loop = ["LDGSTS.E.BYPASS.128 [R137], desc[UR20][R36.64], P2", "HMMA.16816.F32.BF16 R8, R8, R76, RZ",
                  "@P3 BRA 0x40"]  # back to the chunk load: an inner loop
    nested = audit.mma_loop_loads(_page_loop_listing([*chunk_loop, *tile[:16]]))
    (why,) = audit.mma_loop_load_failures(nested, 256, 73728)
    assert "1 global loads in an inner loop" in why
    narrow = audit.mma_loop_loads(_page_loop_listing([*tile[:17], "LDG.E.64 R48, desc[UR22][R64.64]"]))
    assert audit.mma_loop_load_failures(narrow, 256, 73728)
    assert audit.global_load_bytes("LDG.E.U8") == 1 and audit.global_load_bytes("STG.E.128") == 0
    no_loop = [(0, "HMMA.16816.F32.BF16", "R40, R40, R76, RZ"), (16, "EXIT", "")]
    assert audit.mma_loop_loads(no_loop) is None
    assert "no loop holds the MMAs" in audit.mma_loop_load_failures(None, 256, 73728)[0]


def test_audit_page_loop_rule_wants_the_next_page_in_flight():
    """One cp.async wait per iteration that leaves a group pending (DEPBAR.LE SB0, N >= 1) passes; a wait
    for all copies, a wait per chunk, or none fails."""
    tile = ["LDGSTS.E.BYPASS.128 [R137], desc[UR20][R36.64], P2"] * 18
    pending = audit.mma_loop_loads(_page_loop_listing(tile, loop_head=("DEPBAR.LE SB0, 0x3",)))
    assert pending["copy_waits"] == [3] and audit.mma_loop_pipeline_failures(pending) == []
    drained = audit.mma_loop_loads(_page_loop_listing(tile, loop_head=("DEPBAR.LE SB0, 0x0",)))
    assert "waits for all its cp.async copies" in audit.mma_loop_pipeline_failures(drained)[0]
    per_chunk = audit.mma_loop_loads(_page_loop_listing([*tile, "DEPBAR.LE SB0, 0x1"],
                                                        loop_head=("DEPBAR.LE SB0, 0x1",)))
    assert "2 cp.async waits per iteration, expected 1" in audit.mma_loop_pipeline_failures(per_chunk)[0]
    unwaited = audit.mma_loop_loads(_page_loop_listing(tile, loop_head=()))
    assert "0 cp.async waits" in audit.mma_loop_pipeline_failures(unwaited)[0]
    assert audit.mma_loop_pipeline_failures(None)


def test_compiled_triton_kernels_load_each_page_once():
    """The split kernels as the audit compiles them for sm_90 (in a process without the interpreter): no
    local memory, the page loop fetches exactly one page per iteration (K once, V from it) and waits once per
    page with copies left in flight."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pykernels.audit", "--triton-only", "--json", "--match",
                           "mla_decode_split_kernel"], capture_output=True, text=True, env=env, timeout=600)
    result = json.loads(proc.stdout)
    kernels = {k["name"]: k for k in result["kernels"]}
    assert set(kernels) == {k.name for k in triton_mla.AOT_KERNELS if "split" in k.name}
    assert proc.returncode == 0 and result["ok"], [(k["name"], k["failures"]) for k in result["kernels"]]
    for aot in triton_mla.AOT_KERNELS:
        if aot.name in kernels:
            k = kernels[aot.name]
            assert k["stack_bytes"] == k["local_bytes"] == 0
            assert k["mma_loop"]["vector_bytes"] * k["threads_per_block"] == aot.expect["mma_loop_load_bytes"]
            assert len(k["mma_loop"]["copy_waits"]) == 1 and k["mma_loop"]["copy_waits"][0] >= 1


# ---- GPU: CUDA and compiled Triton on FlashMLA's sweep ---------------------------------------------------

def flashmla_lengths(b, s_k, varlen, generator):
    if not varlen:
        return [s_k] * b
    lens = torch.normal(float(s_k), s_k / 2, (b,), generator=generator).clamp(min=1, max=2 * s_k).int()
    return lens.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("s_k", [4096, 8192, 16384])
@pytest.mark.parametrize("h_q", [16, 32, 64, 128])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_flashmla_sweep(backend, s_k, h_q, s_q, varlen):
    gen = torch.Generator().manual_seed(s_k * 1000 + h_q * 10 + s_q)
    lengths = flashmla_lengths(128, s_k, varlen, gen)
    q, cache, table, seqlens, _, _ = make_batch(lengths, s_q, h_q, "cuda", extra_pages=64, keep_dense=False)
    sched = pykernels.get_mla_metadata(seqlens, s_q * h_q, 1)
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, causal=True, metadata=sched, backend=backend)
    assert_close(out, lse, *ref.mla_decode(q, cache, table, seqlens, causal=True, compute_dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("h_q,s_q", [(16, 1), (128, 2), (3, 2)])
def test_gpu_fp8_cache(backend, h_q, s_q):
    lengths = [4096, 1, 63, 65, 100_000, 777] + [2048] * 26
    q, cache, table, seqlens, kv_scale, dense = make_batch(lengths, s_q, h_q, "cuda", fp8=True, keep_dense=False)
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, causal=True, kv_scale=kv_scale, backend=backend)
    assert_close(out, lse, *ref.mla_decode(q, cache, table, seqlens, causal=True, kv_scale=kv_scale,
                                           compute_dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("h_q", [1, 3, 16, 64, 128])
@pytest.mark.parametrize("q_norm,scale", [(1.0, 576 ** -0.5), (3.0, V3_SCALE)])
def test_gpu_small_cases_vs_float64(backend, h_q, q_norm, scale):
    lengths = [1, 63, 64, 65, 100_000, 5, 64 * 7, 0]
    q, cache, table, seqlens, _, dense = make_batch(lengths, 2, h_q, "cuda", q_norm=q_norm)
    out, lse = pykernels.mla_decode(q, cache, table, seqlens, softmax_scale=scale, causal=True, backend=backend)
    assert_close(out, lse, *float64_attention(q, dense, 2, True, scale))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    """Plan once, capture the decode, replay after the cache contents change: the replay must see them."""
    lengths = [4096, 1, 65, 8000, 300] * 4
    q, cache, table, seqlens, _, _ = make_batch(lengths, 2, 64, "cuda", keep_dense=False)
    sched = pykernels.get_mla_metadata(seqlens, 2 * 64, 1)
    pykernels.mla_decode(q, cache, table, seqlens, causal=True, metadata=sched, backend=backend)  # warm-up, checks
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = pykernels.mla_decode(q, cache, table, seqlens, causal=True, metadata=sched, backend=backend)
    q.copy_(torch.randn_like(q, dtype=torch.float32).bfloat16())
    used = torch.isfinite(cache.float())
    cache.copy_(torch.where(used, torch.randn_like(cache, dtype=torch.float32), cache.float()).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, lse, *ref.mla_decode(q, cache, table, seqlens, causal=True, compute_dtype=torch.float64))


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_empty_padding_slots():
    """Plan and decode inside one graph, then replay with two slots emptied (length 0, as a serving loop pads
    its batch): no check sees those lengths; the other requests must come out right and the empty ones as
    output 0, lse +inf."""
    lengths = [4096, 70, 65, 8000, 300] * 4
    q, cache, table, seqlens, _, _ = make_batch(lengths, 1, 16, "cuda", keep_dense=False)
    pykernels.mla_decode(q, cache, table, seqlens, backend="cuda")  # warm-up, checks
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = pykernels.mla_decode(q, cache, table, seqlens, backend="cuda")  # plans on the GPU, captured
    empty = torch.zeros(len(lengths), dtype=torch.bool, device="cuda")
    empty[[1, 7]] = True
    seqlens.masked_fill_(empty, 0)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, lse, *ref.mla_decode(q, cache, table, seqlens, compute_dtype=torch.float64))
    assert bool((out[empty] == 0).all()) and bool((lse[empty] == float("inf")).all())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_sync_with_metadata(backend):
    """With a schedule the call reads nothing back: any synchronizing torch op raises in this mode."""
    q, cache, table, seqlens, _, _ = make_batch([4096, 0, 65, 3], 2, 16, "cuda", keep_dense=False)
    sched = pykernels.get_mla_metadata(seqlens, 32, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = pykernels.mla_decode(q, cache, table, seqlens, causal=True, metadata=sched, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(out, lse, *ref.mla_decode(q, cache, table, seqlens, causal=True, compute_dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_after_in_place_lengths(backend):
    """The serving-loop order: lengths written in place (eagerly: the version moves), planned again, then the
    decode captured with that schedule. Capture must accept it, and a replay after an in-place write of new
    lengths replanned inside the graph must see them; the schedule from before the write is refused."""
    lengths = [4096, 1, 65, 300, 0, 2000]
    q, cache, table, seqlens, _, _ = make_batch(lengths, 2, 16, "cuda", keep_dense=False)
    lens = torch.ones_like(seqlens)
    stale = pykernels.get_mla_metadata(lens, 32, 1)
    lens.copy_(seqlens)
    with pytest.raises(ValueError, match="call get_mla_metadata again"):
        pykernels.mla_decode(q, cache, table, lens, causal=True, metadata=stale, backend=backend)
    sched = pykernels.get_mla_metadata(lens, 32, 1)
    pykernels.mla_decode(q, cache, table, lens, causal=True, metadata=sched, backend=backend)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = pykernels.mla_decode(q, cache, table, lens, causal=True, metadata=sched, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, lse, *ref.mla_decode(q, cache, table, lens, causal=True, compute_dtype=torch.float64))
    if _backend.extension()[0] is None:
        return  # replanning inside a graph needs the CUDA planner
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replanned = pykernels.get_mla_metadata(lens, 32, 1)
        out, lse = pykernels.mla_decode(q, cache, table, lens, causal=True, metadata=replanned, backend=backend)
    lens.copy_(torch.tensor([4000, 0, 64, 129, 0, 1999], dtype=torch.int32, device="cuda"))  # within each row's pages
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, lse, *ref.mla_decode(q, cache, table, lens, causal=True, compute_dtype=torch.float64))


@pytest.mark.gpu
def test_gpu_device_planner_matches_python():
    lengths = [1, 63, 64, 65, 100_000] + [4096] * 60
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    sched = pykernels.get_mla_metadata(seqlens, 32, 1)
    part_splits, splits, split_offsets = plan_splits(lengths, sched.num_parts)
    assert sched.part_splits.tolist() == part_splits
    assert sched.split_offsets.tolist() == split_offsets
    assert [tuple(s) for s in sched.splits[: len(splits)].tolist()] == splits


@pytest.mark.gpu
def test_gpu_cuda_argument_errors_before_launch():
    q, cache, table, seqlens, _, _ = make_batch([70], 1, 16, "cuda")
    ext = _extension()
    sched = pykernels.get_mla_metadata(seqlens, 16, 1)
    out = torch.empty(1, 1, 16, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(1, 16, 1, device="cuda")
    part = torch.empty(sched.capacity, 16, 512, device="cuda")
    lpart = torch.empty(sched.capacity, 16, device="cuda")
    with pytest.raises(ValueError, match="q: expected size 576"):
        ext.mla_decode(q[..., :512].contiguous(), cache, table, seqlens, None, sched.part_splits, sched.splits,
                       sched.split_offsets, out, lse, part, lpart, 0.1, False, 0)
    with pytest.raises(TypeError, match="kv_scale"):
        ext.mla_decode(q, cache.to(FP8), table, seqlens, None, sched.part_splits, sched.splits,
                       sched.split_offsets, out, lse, part, lpart, 0.1, False, 0)


def test_cuda_kernel_layout_assumptions():
    """The CUDA kernel reads V through an MN-major view of the K tile and maps accumulator values to rows
    by a compile-time formula; both are checked against CuTe's layouts on the host."""
    assert _extension().mla_layouts_consistent()
