"""FP8 block-scaled GEMM: the reference against float64 arithmetic, the API's argument checks, the
Triton kernels (through the interpreter on CPU) against the reference, the CUDA kernel's host-side tile
heuristic and scheduler, and on a GPU every backend on DeepSeek-V3's shapes.

Tolerances:
- reference vs float64 (dequantized operands): the reference rounds once to bfloat16 (relative 2^-9) after a
  float32 accumulation whose error is at most about K * 2^-24 * sum|a*b| (summation order); the bound used is
  2^-8 * |exact| + K * 2^-23 * (|A| @ |B|^T).
- a kernel vs the reference: both accumulate the same exact fp8 products in float32 per 128-K block, in a
  different order, then round to bfloat16; they may differ by one bfloat16 step plus the accumulation-order
  term: |got - ref| <= 2^-7 * |ref| + K * 2^-22 * (|A| @ |B|^T).
- a kernel vs float64 (dequantized operands): 2^-8 * |exact| + K * 2^-22 * (|A| @ |B|^T), used with scales that
  differ by orders of magnitude between blocks, where a scale applied to the wrong block is far outside it.
- against the unquantized product: DeepGEMM's calc_diff < 1e-3 (fp8 quantization error, typically 7e-4);
  against the reference, vLLM's rel_diff = mean|out - ref| / mean|ref| < 1e-3.
Outputs are poisoned with NaN before each call; rows a grouped layout does not compute must come back zero
(torch, Triton).
"""

import math

import pytest
import torch
import triton
import triton.language as tl

import pykernels
from pykernels.reference import fp8_gemm as ref
from pykernels.reference import fp8_quant
from pykernels.triton.fp8_gemm import _raster

FP8 = torch.float8_e4m3fn
HAS_GPU = torch.cuda.is_available()


def quantized_pair(x):
    return fp8_quant.per_token_group_quant_fp8(x, 128)


def quantized_weights(w):
    return fp8_quant.per_block_quant_fp8(w, 128)


def random_problem(m, n, k, groups=None, device="cpu"):
    """Unquantized float32 operands (rows with varying magnitude) and their fp8 pairs."""
    lead = () if groups is None else (groups,)
    x = torch.randn(lead + (m, k)) * torch.exp(torch.randn(lead + (m, 1)))
    w = torch.randn(lead + (n, k))  # one scale per 128x128 block: rows of like magnitude, as in real weights
    a, sa = quantized_pair(x)
    b, sb = quantized_weights(w)
    return x, w, (a.to(device), sa.to(device)), (b.to(device), sb.to(device))


def magnitude_bound(a, sa, b, sb):
    """(|A| @ |B|^T) of the dequantized operands in float64, the scale of the accumulation-order error."""
    return ref.dequantized_product(a.abs(), sa.abs(), b.abs(), sb.abs())


def assert_matches_reference(got, want, a, sa, b, sb, rows=None):
    """got vs the reference for rows `rows` (all when None): one bfloat16 step plus accumulation order."""
    got, want = got.cpu().double(), want.cpu().double()
    mag = magnitude_bound(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())
    if rows is not None:
        got, want, mag = got[rows], want[rows], mag[rows]
    assert bool(torch.isfinite(got).all()), "non-finite values in valid rows"
    k = a.shape[-1]
    bound = want.abs() * 2 ** -7 + mag * k * 2 ** -22
    excess = (got - want).abs() - bound
    assert float(excess.max()) <= 0, f"max excess {float(excess.max()):.3e} over the bound"


def assert_uncomputed_rows(rows_out, backend):
    """Rows a grouped layout does not compute (m_indices -1, at or past masked_m): zeros from the torch and
    Triton backends. The CUDA kernel leaves them unspecified: it may keep the NaN poison or write zeros,
    nothing else."""
    rows_out = rows_out.float().cpu()
    if backend == "cuda":
        assert bool((torch.isnan(rows_out) | (rows_out == 0)).all()), "uncomputed rows hold data"
    else:
        assert bool((rows_out == 0).all()), "uncomputed rows are not zero"


def assert_close_to_float64(got, a, sa, b, sb, rows=None):
    """got vs the product of the dequantized operands in float64: one bfloat16 rounding (2^-8 relative)
    plus the float32 accumulation term."""
    got = got.cpu().double()
    exact = ref.dequantized_product(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())
    bound = exact.abs() * 2 ** -8 + magnitude_bound(a.cpu(), sa.cpu(), b.cpu(), sb.cpu()) * a.shape[-1] * 2 ** -22
    assert bool(torch.isfinite(got).all()), "non-finite values"
    excess = (got - exact).abs() - bound
    assert float(excess.max()) <= 0, f"max excess {float(excess.max()):.3e} over the float64 bound"


# ---- reference ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,k", [(1, 128, 128), (7, 320, 512), (129, 200, 384), (64, 2112, 1024)])
def test_reference_vs_float64(m, n, k):
    x, w, (a, sa), (b, sb) = random_problem(m, n, k)
    got = ref.fp8_gemm_nt(a, sa, b, sb)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    exact = ref.dequantized_product(a, sa, b, sb)
    bound = exact.abs() * 2 ** -8 + magnitude_bound(a, sa, b, sb) * k * 2 ** -23
    assert bool(((got.double() - exact).abs() <= bound).all())
    # With quantization: against the unquantized float64 product (DeepGEMM's acceptance metric).
    assert ref.calc_diff(got, x.double() @ w.double().T) < 1e-3


def test_reference_promotes_per_k_block():
    """Scales applied per 128-K block: blocks with wildly different scales must not mix before scaling."""
    m, n, k = 3, 130, 256
    a = torch.full((m, k), 1.0).to(FP8)
    b = torch.full((n, k), 1.0).to(FP8)
    sa = torch.tensor([[1.0, 2.0 ** 20]] * m)
    sb = torch.tensor([[1.0, 1.0], [3.0, 0.5]])
    got = ref.fp8_gemm_nt(a, sa, b, sb).double()
    # columns < 128 use sb row 0, columns 128.. (the partial block) row 1.
    want = torch.empty(m, n, dtype=torch.float64)
    want[:, :128] = 128 * 1.0 + 128 * 2.0 ** 20
    want[:, 128:] = 128 * 3.0 + 128 * 2.0 ** 20 * 0.5
    torch.testing.assert_close(got, want.to(torch.bfloat16).double(), rtol=0, atol=0)


def test_calc_diff():
    x = torch.randn(100, dtype=torch.float64)
    assert ref.calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert ref.calc_diff(x, -x) == pytest.approx(2.0)
    assert ref.calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0


# ---- argument checks ---------------------------------------------------------------------------------

def _plain(m=8, n=256, k=256):
    _, _, ap, bp = random_problem(m, n, k)
    return ap, bp


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_gemm_nt_bad_arguments(backend):
    (a, sa), (b, sb) = _plain()
    call = pykernels.fp8_gemm_nt
    with pytest.raises(TypeError, match=r"\(a, sa\): expected a \(tensor, scales\) pair"):
        call(a, (b, sb), backend=backend)
    with pytest.raises(TypeError, match="a: expected dtype float8_e4m3fn, got bfloat16"):
        call((a.to(torch.bfloat16), sa), (b, sb), backend=backend)
    with pytest.raises(TypeError, match="sa: expected dtype float32, got float16"):
        call((a, sa.half()), (b, sb), backend=backend)
    with pytest.raises(TypeError, match="b: expected a torch.Tensor"):
        call((a, sa), (None, sb), backend=backend)
    with pytest.raises(ValueError, match="a: expected 2 dimensions"):
        call((a[None], sa[None]), (b, sb), backend=backend)
    with pytest.raises(ValueError, match="a: expected K .* multiple of 128, got 200"):
        call((a[:, :200].contiguous(), sa[:, :2]), (b, sb), backend=backend)
    with pytest.raises(ValueError, match=r"b: expected K = 256 \(as in a\), got 384"):
        (b3, sb3) = _plain(n=256, k=384)[1]
        call((a, sa), (b3, sb3), backend=backend)
    with pytest.raises(ValueError, match=r"sa: expected shape \[8, 2\] \(one per row per 128 columns of a\)"):
        call((a, sa[:, :1].contiguous()), (b, sb), backend=backend)
    with pytest.raises(ValueError, match=r"sb: expected shape \[2, 2\] \(one per 128x128 block of b\)"):
        call((a, sa), (b, sb.repeat(2, 1)), backend=backend)
    with pytest.raises(ValueError, match="a: expected a contiguous tensor"):
        wide = torch.zeros(8, 512, dtype=FP8)
        call((wide[:, :256], sa), (b, sb), backend=backend)
    with pytest.raises(ValueError, match="sb: expected a contiguous tensor"):
        call((a, sa), (b, sb.t().contiguous().t()), backend=backend)
    with pytest.raises(TypeError, match="out: expected dtype bfloat16, got float32"):
        call((a, sa), (b, sb), out=torch.empty(8, 256), backend=backend)
    with pytest.raises(ValueError, match=r"out: expected shape \[8, 256\]"):
        call((a, sa), (b, sb), out=torch.empty(8, 255, dtype=torch.bfloat16), backend=backend)
    with pytest.raises(ValueError, match="backend: expected one of"):
        call((a, sa), (b, sb), backend="cublas")


@pytest.mark.skipif(not HAS_GPU, reason="needs tensors on two devices")
def test_fp8_gemm_nt_wrong_device():
    (a, sa), (b, sb) = _plain()
    with pytest.raises(ValueError, match="b: expected a tensor on cuda"):
        pykernels.fp8_gemm_nt((a.cuda(), sa.cuda()), (b, sb))
    with pytest.raises(ValueError, match="sa: expected a tensor on"):
        pykernels.fp8_gemm_nt((a.cuda(), sa), (b.cuda(), sb.cuda()))


def test_wrong_device_is_named_before_launch(monkeypatch):
    """Device mismatches, checked without a GPU: a meta-device scale tensor stands in for another device."""
    (a, sa), (b, sb) = _plain()
    with pytest.raises(ValueError, match="sa: expected a tensor on cpu"):
        pykernels.fp8_gemm_nt((a, sa.to("meta")), (b, sb), backend="torch")
    with pytest.raises(ValueError, match="b: expected a tensor on cpu"):
        pykernels.fp8_gemm_nt((a, sa), (b.to("meta"), sb.to("meta")), backend="torch")
    with pytest.raises(ValueError, match="out: expected a tensor on cpu"):
        pykernels.fp8_gemm_nt((a, sa), (b, sb), out=torch.empty(8, 256, dtype=torch.bfloat16, device="meta"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_contiguous_bad_arguments(backend):
    _, _, (a, sa), (b, sb) = random_problem(256, 160, 256, groups=None)
    _, _, _, (bg, sbg) = random_problem(1, 160, 256, groups=3)
    idx = torch.zeros(256, dtype=torch.int32)
    call = pykernels.m_grouped_fp8_gemm_nt_contiguous
    with pytest.raises(ValueError, match="b: expected 3 dimensions"):
        call((a, sa), (b, sb), idx, backend=backend)
    with pytest.raises(ValueError, match="a: expected M_total a multiple of GROUPED_M_ALIGNMENT = 128"):
        call((a[:200], sa[:200]), (bg, sbg), idx[:200], backend=backend)
    with pytest.raises(TypeError, match="m_indices: expected dtype int32, got int64"):
        call((a, sa), (bg, sbg), idx.long(), backend=backend)
    with pytest.raises(ValueError, match=r"m_indices: expected shape \[256\]"):
        call((a, sa), (bg, sbg), idx[:128], backend=backend)
    with pytest.raises(ValueError, match=r"m_indices: expected values in \[-1, 3\)"):
        call((a, sa), (bg, sbg), torch.full((256,), 3, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"m_indices: expected each 128-row block to hold one group"):
        mixed = idx.clone()
        mixed[100:128] = 1
        call((a, sa), (bg, sbg), mixed, backend=backend)
    with pytest.raises(ValueError, match=r"sb: expected shape \[3, 2, 2\]"):
        call((a, sa), (bg, sbg[:, :1].contiguous()), idx, backend=backend)
    with pytest.raises(ValueError, match=r"out: expected shape \[256, 160\]"):
        call((a, sa), (bg, sbg), idx, out=torch.empty(256, 128, dtype=torch.bfloat16), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_bad_arguments(backend):
    _, _, (a, sa), (b, sb) = random_problem(16, 160, 256, groups=2)
    masked = torch.tensor([3, 16], dtype=torch.int32)
    call = pykernels.m_grouped_fp8_gemm_nt_masked
    with pytest.raises(ValueError, match=r"b: expected 2 groups \(as in a\), got 1"):
        call((a, sa), (b[:1].contiguous(), sb[:1].contiguous()), masked[:1], 4, backend=backend)
    with pytest.raises(ValueError, match="a: expected 3 dimensions"):
        call((a[0], sa[0]), (b, sb), masked, 4, backend=backend)
    with pytest.raises(TypeError, match="masked_m: expected dtype int32"):
        call((a, sa), (b, sb), masked.float(), 4, backend=backend)
    with pytest.raises(ValueError, match=r"masked_m: expected shape \[2\]"):
        call((a, sa), (b, sb), masked[:1], 4, backend=backend)
    with pytest.raises(ValueError, match=r"masked_m: expected values in \[0, 16\]"):
        call((a, sa), (b, sb), torch.tensor([0, 17], dtype=torch.int32), 4, backend=backend)
    with pytest.raises(TypeError, match="expected_m: expected an int, got float"):
        call((a, sa), (b, sb), masked, 4.0, backend=backend)
    with pytest.raises(ValueError, match="expected_m: expected a positive row count hint, got 0"):
        call((a, sa), (b, sb), masked, 0, backend=backend)
    with pytest.raises(ValueError, match=r"sa: expected shape \[2, 16, 2\]"):
        call((a, sa[:, :, :1].contiguous()), (b, sb), masked, 4, backend=backend)


@pytest.mark.skipif(HAS_GPU, reason="checks the error a CPU-only machine gives")
def test_explicit_cuda_backend_without_gpu_says_why():
    (a, sa), (b, sb) = _plain()
    with pytest.raises(RuntimeError, match="fp8_gemm_nt: backend='cuda' needs"):
        pykernels.fp8_gemm_nt((a, sa), (b, sb), backend="cuda")


def test_empty_m_returns_empty():
    (a, sa), (b, sb) = _plain()
    out = pykernels.fp8_gemm_nt((a[:0], sa[:0]), (b, sb), backend="torch")
    assert out.shape == (0, 256) and out.dtype == torch.bfloat16


# ---- torch backend through the API ---------------------------------------------------------------------

def test_torch_backend_layouts_agree_with_plain_reference():
    _, _, (a, sa), (b, sb) = random_problem(256, 320, 256)
    _, _, _, (bg, sbg) = random_problem(1, 320, 256, groups=2)
    idx = torch.full((256,), -1, dtype=torch.int32)
    idx[:100] = 1
    idx[128:200] = 0
    out = torch.full((256, 320), float("nan"), dtype=torch.bfloat16)
    pykernels.m_grouped_fp8_gemm_nt_contiguous((a, sa), (bg, sbg), idx, out=out, backend="torch")
    assert torch.equal(out[:100], ref.fp8_gemm_nt(a[:100], sa[:100], bg[1], sbg[1]))
    assert torch.equal(out[128:200], ref.fp8_gemm_nt(a[128:200], sa[128:200], bg[0], sbg[0]))
    assert bool((out[100:128] == 0).all()) and bool((out[200:] == 0).all())  # rows marked -1
    masked = torch.tensor([0, 5], dtype=torch.int32)
    a3, sa3 = a[:64].reshape(2, 32, 256), sa[:64].reshape(2, 32, 2)
    out3 = torch.full((2, 32, 320), float("nan"), dtype=torch.bfloat16)
    got = pykernels.m_grouped_fp8_gemm_nt_masked((a3, sa3), (bg, sbg), masked, 4, out=out3, backend="torch")
    assert torch.equal(got[1, :5], ref.fp8_gemm_nt(a3[1, :5], sa3[1, :5], bg[1], sbg[1]))
    assert bool((got[0] == 0).all()) and bool((got[1, 5:] == 0).all())  # rows past masked_m


# ---- Triton (interpreter on CPU, compiled on a GPU) vs the reference -------------------------------------

# Every M in {1, 7, 30, 64, 129, 300}, N in {128, 200, 320, 2112} and K in {128, 256, 512, 1024, 7168} appears;
# M and N tails of every tile configuration, N's partial scale block (200, 320, 2112 = 16.5 x 128), and a
# 56-block K.
PLAIN_SHAPES = [(1, 2112, 7168), (7, 320, 512), (30, 200, 256), (64, 128, 128), (129, 2112, 512), (300, 320, 1024),
                (300, 128, 128)]


KERNEL_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
GROUPED_BACKENDS = ["torch"] + KERNEL_BACKENDS


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("m,n,k", PLAIN_SHAPES)
def test_plain_matches_reference(backend, m, n, k, device):
    _, _, (a, sa), (b, sb) = random_problem(m, n, k, device=device)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    got = pykernels.fp8_gemm_nt((a, sa), (b, sb), out=out, backend=backend)
    assert got is out
    assert_matches_reference(got, ref.fp8_gemm_nt(a.cpu(), sa.cpu(), b.cpu(), sb.cpu()), a, sa, b, sb)


def contiguous_indices(segments, trailing_padding_blocks=0):
    """m_indices for groups of `segments` rows each (0 = empty group), padded to 128 with -1."""
    align = pykernels.GROUPED_M_ALIGNMENT
    parts = []
    for g, rows in enumerate(segments):
        padded = -(-rows // align) * align
        part = torch.full((padded,), -1, dtype=torch.int32)
        part[:rows] = g
        parts.append(part)
    parts.append(torch.full((trailing_padding_blocks * align,), -1, dtype=torch.int32))
    return torch.cat(parts)


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("segments,n,k", [([130, 0, 5, 128], 320, 256), ([64, 1], 2112, 128)])
def test_contiguous_matches_reference(backend, segments, n, k, device):
    idx = contiguous_indices(segments, trailing_padding_blocks=1)
    m_total, groups = idx.numel(), len(segments)
    _, _, (a, sa), _ = random_problem(m_total, n, k)
    _, _, _, (b, sb) = random_problem(1, n, k, groups=groups)
    out = torch.full((m_total, n), float("nan"), dtype=torch.bfloat16, device=device)
    got = pykernels.m_grouped_fp8_gemm_nt_contiguous((a.to(device), sa.to(device)), (b.to(device), sb.to(device)),
                                                     idx.to(device), out=out, backend=backend)
    valid = idx >= 0
    want = ref.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, idx)
    for g in range(groups):
        rows = idx == g
        if bool(rows.any()):
            assert_matches_reference(got.cpu()[rows], want[rows], a[rows], sa[rows], b[g], sb[g])
    assert int(valid.sum()) == sum(segments)
    assert_uncomputed_rows(got[~valid.to(device)], backend)
    if backend != "cuda":  # the whole output, DeepGEMM's way
        assert ref.calc_diff(got.cpu(), want) < 1e-5


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("masked,m_max,n,k,expected_m", [([0, 70, 1, 33], 70, 192, 384, 32),
                                                         ([130, 0, 77], 130, 320, 256, 100)])
def test_masked_matches_reference(backend, masked, m_max, n, k, expected_m, device):
    groups = len(masked)
    _, _, (a, sa), (b, sb) = random_problem(m_max, n, k, groups=groups)
    masked_m = torch.tensor(masked, dtype=torch.int32)
    out = torch.full((groups, m_max, n), float("nan"), dtype=torch.bfloat16, device=device)
    got = pykernels.m_grouped_fp8_gemm_nt_masked((a.to(device), sa.to(device)), (b.to(device), sb.to(device)),
                                                 masked_m.to(device), expected_m, out=out, backend=backend)
    assert got is out
    got = got.cpu()
    for g, rows in enumerate(masked):
        if rows:
            want = ref.fp8_gemm_nt(a[g, :rows], sa[g, :rows], b[g], sb[g])
            assert_matches_reference(got[g, :rows], want, a[g, :rows], sa[g, :rows], b[g], sb[g])
        assert_uncomputed_rows(got[g, rows:], backend)


def test_triton_configs_cover_aot_list():
    """Every config the wrapper can pick is among the configs the audit compiles for sm_90."""
    from pykernels.triton import fp8_gemm as tri

    audited = {(k.constexprs["BLOCK_M"], k.constexprs["BLOCK_N"], k.num_warps, k.num_stages) for k in tri.AOT_KERNELS}
    for m in (1, 16, 17, 32, 33, 64, 65, 4096):
        cfg = tri.triton_config(m, 7168)
        assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) in audited
        assert cfg.block_m >= m or cfg.block_m == 128


# ---- activation scales: row-major or MN-major TMA-aligned (DeepGEMM's layout) ----------------------------

@pytest.mark.parametrize("shape", [(1, 3), (5, 2), (8, 4), (2, 7, 3), (3, 4, 1)])
def test_get_mn_major_tma_aligned_tensor(shape):
    sf = torch.randn(shape)
    got = pykernels.get_mn_major_tma_aligned_tensor(sf)
    m, kb = shape[-2], shape[-1]
    m_pad = -(-m // 4) * 4
    assert torch.equal(got, sf)
    want_strides = (m_pad * kb, 1, m_pad)[-len(shape):]
    assert all(size == 1 or st == want for size, st, want in zip(got.shape, got.stride(), want_strides))
    assert pykernels.get_mn_major_tma_aligned_tensor(got) is got  # already aligned: no copy
    groups = shape[0] if len(shape) == 3 else 1
    assert got.untyped_storage().nbytes() == 4 * groups * kb * m_pad  # a fresh, padded buffer


def test_get_mn_major_tma_aligned_tensor_bad_arguments():
    with pytest.raises(TypeError, match="sf: expected dtype float32, got float16"):
        pykernels.get_mn_major_tma_aligned_tensor(torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="sf: expected 2 or 3 dimensions, got 1"):
        pykernels.get_mn_major_tma_aligned_tensor(torch.zeros(4))


def _strided_scales(sa, m_stride_pad):
    """sa's values MN-major with the M stride padded to M + m_stride_pad (not TMA-aligned unless 4 | it)."""
    *lead, m, kb = sa.shape
    storage = torch.zeros(lead + [kb, m + m_stride_pad])
    view = storage[..., :m].transpose(-1, -2)
    view.copy_(sa)
    return view


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sa_layouts_accepted_and_rejected(backend):
    _, _, (a, sa), (b, sb) = random_problem(7, 128, 256)
    call = pykernels.fp8_gemm_nt
    layouts = "row-major contiguous scales .* or MN-major TMA-aligned ones"
    with pytest.raises(ValueError, match=rf"sa: expected {layouts} \(strides \[1, 8\].*got strides \[1, 7\]"):
        call((a, _strided_scales(sa, 0)), (b, sb), backend=backend)  # MN-major, M stride not padded
    with pytest.raises(ValueError, match=rf"sa: expected {layouts}.*got strides \[1, 16\]"):
        call((a, _strided_scales(sa, 9)), (b, sb), backend=backend)  # padded past 16 bytes
    wide = torch.zeros(7, 4)
    with pytest.raises(ValueError, match=rf"sa: expected {layouts}.*got strides \[4, 1\]"):
        call((a, wide[:, :2]), (b, sb), backend=backend)
    _, _, (a3, sa3), (b3, sb3) = random_problem(6, 128, 256, groups=2)
    masked = torch.tensor([6, 2], dtype=torch.int32)
    loose = torch.zeros(2, 2, 16)[:, :, :6].transpose(1, 2)
    loose.copy_(sa3)  # each group MN-major and aligned, but the groups 32 floats apart instead of 16
    with pytest.raises(ValueError, match=rf"sa: expected {layouts} \(strides \[16, 1, 8\].*got strides \[32, 1, 16\]"):
        pykernels.m_grouped_fp8_gemm_nt_masked((a3, loose), (b3, sb3), masked, 4, backend=backend)


def _with_scale_layout(sa, layout):
    return pykernels.get_mn_major_tma_aligned_tensor(sa) if layout == "mn_major" else sa


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plain_mn_major_scales(backend):
    """M = 7 and 30 (not multiples of 4): MN-major scales give the row-major result bit for bit."""
    for m in (7, 30):
        _, _, (a, sa), (b, sb) = random_problem(m, 200, 384)
        row_major = pykernels.fp8_gemm_nt((a, sa), (b, sb), backend=backend)
        mn = pykernels.get_mn_major_tma_aligned_tensor(sa)
        assert mn.stride() == (1, -(-m // 4) * 4)
        out = torch.full((m, 200), float("nan"), dtype=torch.bfloat16)
        got = pykernels.fp8_gemm_nt((a, mn), (b, sb), out=out, backend=backend)
        assert torch.equal(got, row_major)
        assert_close_to_float64(got, a, sa, b, sb)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["row_major", "mn_major"])
def test_grouped_scale_layouts(backend, layout):
    """Contiguous (M_total = 256) and 3-D masked (M_max = 13) with either scale layout, whole outputs."""
    idx = contiguous_indices([5, 0, 70])
    _, _, (a, sa), _ = random_problem(idx.numel(), 96, 256)
    _, _, _, (b, sb) = random_problem(1, 96, 256, groups=3)
    out = torch.full((idx.numel(), 96), float("nan"), dtype=torch.bfloat16)
    got = pykernels.m_grouped_fp8_gemm_nt_contiguous((a, _with_scale_layout(sa, layout)), (b, sb), idx, out=out,
                                                     backend=backend)
    want = ref.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, idx)
    for g in (0, 2):
        rows = idx == g
        assert_close_to_float64(got[rows], a[rows], sa[rows], b[g], sb[g])
        assert_matches_reference(got[rows], want[rows], a[rows], sa[rows], b[g], sb[g])
    assert_uncomputed_rows(got[idx < 0], backend)

    masked = [13, 0, 6]
    _, _, (a3, sa3), (b3, sb3) = random_problem(13, 96, 256, groups=3)
    sa3_in = _with_scale_layout(sa3, layout)
    if layout == "mn_major":
        assert sa3_in.stride() == (16 * 2, 1, 16)
    out3 = torch.full((3, 13, 96), float("nan"), dtype=torch.bfloat16)
    got3 = pykernels.m_grouped_fp8_gemm_nt_masked((a3, sa3_in), (b3, sb3), torch.tensor(masked, dtype=torch.int32),
                                                  8, out=out3, backend=backend)
    for g, rows in enumerate(masked):
        if rows:
            assert_close_to_float64(got3[g, :rows], a3[g, :rows], sa3[g, :rows], b3[g], sb3[g])
        assert_uncomputed_rows(got3[g, rows:], backend)


# ---- NaN propagation, rounding, and inputs that make a wrong answer visible -------------------------------

def _poke_nan(x, *index):
    """Sets one float8_e4m3fn element to a NaN code (0x7F, or 0xFF with the sign bit)."""
    x.view(torch.uint8)[index] = 0x7F if sum(index) % 2 else 0xFF


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_nan_out(backend):
    """NaN in A's row r reaches every column of row r, NaN in B's row c every row of column c; nothing else."""
    m, n, k = 20, 192, 256
    _, _, (a, sa), (b, sb) = random_problem(m, n, k)
    _poke_nan(a, 3, 200)
    _poke_nan(b, 150, 7)
    got = pykernels.fp8_gemm_nt((a, sa), (b, sb), backend=backend).float()
    want_nan = torch.zeros(m, n, dtype=torch.bool)
    want_nan[3, :] = True
    want_nan[:, 150] = True
    assert torch.equal(torch.isnan(got), want_nan)
    assert torch.equal(torch.isnan(ref.fp8_gemm_nt(a, sa, b, sb).float()), want_nan)
    # NaN in rows the masked layout does not compute never reaches the output.
    _, _, (a3, sa3), (b3, sb3) = random_problem(9, 64, 128, groups=2)
    _poke_nan(a3, 0, 5, 1)
    _poke_nan(a3, 1, 2, 0)
    got3 = pykernels.m_grouped_fp8_gemm_nt_masked((a3, sa3), (b3, sb3), torch.tensor([5, 2], dtype=torch.int32), 4,
                                                  backend=backend).float()
    assert bool(torch.isnan(got3[1, 2:]).sum() == 0) and bool(torch.isfinite(got3[0]).all())
    assert bool(torch.isnan(got3[1, :2]).sum() == 0) and bool((got3[1, 2:] == 0).all())


def test_triton_rounds_to_nearest_bf16():
    """vLLM's rel_diff = mean|out - ref| / mean|ref| < 1e-3 against the torch reference (bfloat16 too): a
    store that truncates moves about half the outputs one bfloat16 step toward zero and fails it; and
    DeepGEMM's calc_diff < 1e-3 against the unquantized product."""
    x, w, (a, sa), (b, sb) = random_problem(48, 256, 512)
    got = pykernels.fp8_gemm_nt((a, sa), (b, sb), backend="triton").double()
    want = ref.fp8_gemm_nt(a, sa, b, sb).double()
    assert float((got - want).abs().mean() / want.abs().mean()) < 1e-3
    # Truncation would also bias: the mean signed error, relative to the mean step, stays near zero.
    assert abs(float(((got - want) * want.sign()).mean() / want.abs().mean())) < 2e-4
    assert ref.calc_diff(got, x.double() @ w.double().T) < 1e-3


def hostile_problem(m, n, k, groups=None):
    """Operands whose scales span orders of magnitude: A's 128-column groups scaled by 10^-3 .. 10^3 (varying
    along rows and K groups), B's 128x128 blocks by 0.1, 1 or 10 (neighbours 10x and 100x apart), so that
    a scale applied to the wrong block, row or column is far outside the tolerance."""
    lead = () if groups is None else (groups,)
    kb, nb = k // 128, -(-n // 128)
    rows, cols = torch.arange(m)[:, None], torch.arange(kb)[None, :]
    a_exponent = ((rows + 2 * cols) % 7 - 3).float()  # [m, kb]
    x = torch.randn(lead + (m, k)) * (10.0 ** a_exponent).repeat_interleave(128, -1)
    b_exponent = ((torch.arange(nb)[:, None] + torch.arange(kb)[None, :]) % 3 - 1).float()  # [nb, kb]
    w = torch.randn(lead + (n, k)) * (10.0 ** b_exponent).repeat_interleave(128, 0)[:n].repeat_interleave(128, -1)
    return quantized_pair(x), quantized_weights(w)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hostile_scales_plain(backend):
    (a, sa), (b, sb) = hostile_problem(37, 300, 640)
    out = torch.full((37, 300), float("nan"), dtype=torch.bfloat16)
    got = pykernels.fp8_gemm_nt((a, pykernels.get_mn_major_tma_aligned_tensor(sa)), (b, sb), out=out, backend=backend)
    assert_close_to_float64(got, a, sa, b, sb)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hostile_scales_masked(backend):
    (a, sa), (b, sb) = hostile_problem(19, 200, 384, groups=3)
    masked = [19, 1, 0]
    out = torch.full((3, 19, 200), float("nan"), dtype=torch.bfloat16)
    got = pykernels.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), torch.tensor(masked, dtype=torch.int32), 16,
                                                 out=out, backend=backend)
    for g, rows in enumerate(masked):
        if rows:
            assert_close_to_float64(got[g, :rows], a[g, :rows], sa[g, :rows], b[g], sb[g])
        assert_uncomputed_rows(got[g, rows:], backend)


@pytest.mark.parametrize("block_m,block_n", [(16, 256), (32, 32), (64, 256), (16, 16)])
def test_triton_any_block_n(block_m, block_n):
    """Tiles whose columns span several weight scale blocks (BLOCK_N = 256: scales looked up per column)
    or part of one, and both the transposed (BLOCK_M < 64) and direct tile, on hostile scales with tails;
    the masked layout's persistent loop with a grid smaller than its tiles."""
    from pykernels.triton import fp8_gemm as tri

    config = tri.TritonConfig(block_m=block_m, block_n=block_n, group_m=2, num_warps=4, num_stages=2)
    (a, sa), (b, sb) = hostile_problem(3, 300, 256, groups=2)
    masked = torch.tensor([3, 1], dtype=torch.int32)
    out = torch.full((2, 3, 300), float("nan"), dtype=torch.bfloat16)
    tri.fp8_gemm("masked", a, sa, b, sb, out, masked, 1, config=config)
    assert_close_to_float64(out[0], a[0], sa[0], b[0], sb[0])
    assert_close_to_float64(out[1, :1], a[1, :1], sa[1, :1], b[1], sb[1])
    assert_uncomputed_rows(out[1, 1:], "triton")
    (a, sa), (b, sb) = hostile_problem(20, 300, 256)
    out = torch.full((20, 300), float("nan"), dtype=torch.bfloat16)
    tri.fp8_gemm("plain", a, sa, b[None], sb[None], out, None, 20, config=config)
    assert_close_to_float64(out, a, sa, b, sb)


def test_masked_persistent_grid_is_sized_by_expected_m():
    """At decode sizes the masked grid follows expected_m, not G * ceil(M_max / BLOCK_M)."""
    from pykernels.triton import fp8_gemm as tri

    launched = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched["grid"] = grid
                launched["block"] = (kwargs["BLOCK_M"], kwargs["BLOCK_N"])
            return launch

    groups, m_max, n, k = 32, 1024, 4096, 256
    a = torch.empty(groups, m_max, k, dtype=FP8)
    sa = torch.empty(groups, m_max, k // 128)
    b = torch.empty(groups, n, k, dtype=FP8)
    sb = torch.empty(groups, n // 128, k // 128)
    original = tri.fp8_gemm_kernel
    tri.fp8_gemm_kernel = Recorder()
    try:
        tri.fp8_gemm("masked", a, sa, b, sb, None, torch.zeros(groups, dtype=torch.int32), 8)
        decode = dict(launched)
        tri.fp8_gemm("masked", a, sa, b, sb, None, torch.zeros(groups, dtype=torch.int32), 30)
        decode_32 = dict(launched)
        tri.fp8_gemm("masked", a, sa, b, sb, None, torch.zeros(groups, dtype=torch.int32), 200)
    finally:
        tri.fp8_gemm_kernel = original
    assert decode["block"] == (16, 64)
    assert decode["grid"] == (groups * 1 * (n // 64),)  # one program per expected tile, not 64x that
    assert decode_32["block"] == (32, 64) and decode_32["grid"] == (groups * (n // 64),)
    # Larger tiles run one program per tile (a persistent loop spills them).
    assert launched["block"] == (128, 128) and launched["grid"] == (groups * (m_max // 128) * (n // 128),)


# ---- the CUDA kernel's host-side index math (runs without a GPU) -----------------------------------------

def _extension():
    from pykernels import _backend

    ext, why = _backend.extension()
    if ext is None:
        pytest.skip(f"pykernels._C is not built: {why}")
    return ext


def python_raster(tile, m_blocks, n_blocks, group):
    per_raster = group * n_blocks
    first = (tile // per_raster) * group
    rows = min(m_blocks - first, group)
    return first + (tile % per_raster) % rows, (tile % per_raster) // rows


@pytest.mark.parametrize("m,n,k,groups,sms", [(256, 7168, 7168, 1, 132), (4096, 2112, 7168, 1, 132),
                                              (1, 24576, 1536, 1, 132), (64, 7168, 2048, 4, 78),
                                              (300, 320, 512, 1, 114), (128, 32768, 512, 1, 132)])
def test_config_minimizes_padded_work(m, n, k, groups, sms):
    ext = _extension()
    cfg = pykernels.fp8_gemm_config(m, n, k, num_groups=groups, num_sms=sms)
    assert cfg == pykernels.fp8_gemm_config(m, n, k, num_groups=groups, num_sms=sms)  # deterministic
    block_m = 64 if m <= 64 else 128
    assert cfg["block_m"] == block_m and cfg["num_math_warpgroups"] == block_m // 64 and cfg["block_k"] == 128

    def cost(bn):  # the busiest SM's tiles, each priced at its width plus 32 columns of fixed cost
        tiles = groups * -(-m // block_m) * -(-n // bn)
        waves = -(-tiles // sms)
        return waves * (bn + 32), -(tiles - (waves - 1) * sms) / sms, -bn

    assert cost(cfg["block_n"]) == min(cost(bn) for bn in ext.fp8_gemm_block_n_choices())
    tiles = groups * -(-m // block_m) * -(-n // cfg["block_n"])
    assert cfg["num_tiles"] == tiles and cfg["num_waves"] == -(-tiles // sms)
    assert cfg["wave_utilization"] == pytest.approx((tiles - (cfg["num_waves"] - 1) * sms) / sms)
    assert 2 <= cfg["num_stages"] <= 8
    assert cfg["smem_bytes"] <= 232448 - 1024  # dynamic, beside 1 KB of static shared memory
    assert cfg["num_stages"] * (block_m + cfg["block_n"]) * 128 <= cfg["smem_bytes"]


def test_config_picks_unaligned_block_n_when_it_fills_the_sms():
    _extension()
    # DeepGEMM's example: M=256, N=7168 gives 128 tiles of width 112 in one wave on 132 SMs.
    assert pykernels.fp8_gemm_config(256, 7168, 7168, num_sms=132)["block_n"] == 112
    assert pykernels.fp8_gemm_config(64, 4096, 7168, num_sms=132)["block_m"] == 64


def test_config_bad_arguments():
    with pytest.raises(ValueError, match="K: expected a positive multiple of 128, got 100"):
        pykernels.fp8_gemm_config(64, 128, 100)
    with pytest.raises(ValueError, match="M, N, num_groups: expected positive values"):
        pykernels.fp8_gemm_config(0, 128, 128)
    with pytest.raises(TypeError, match="N: expected an int"):
        pykernels.fp8_gemm_config(1, 128.0, 128)
    with pytest.raises(ValueError, match="num_sms: expected a positive int"):
        pykernels.fp8_gemm_config(1, 128, 128, num_sms=0)


def test_index_math_bindings_reject_what_would_divide_by_zero():
    ext = _extension()
    with pytest.raises(ValueError, match=r"num_sms: expected an int in \[1, 65536\], got 0"):
        ext.fp8_gemm_config(1, 128, 128, 1, 0)
    with pytest.raises(ValueError, match="k: expected a positive multiple of 128, got 100"):
        ext.fp8_gemm_config(1, 128, 100, 1, 132)
    with pytest.raises(ValueError, match="num_ctas: expected positive tile sizes and non-negative counts"):
        ext.fp8_gemm_tile_order(0, 10, 10, 1, 0, 112, 1, [])
    with pytest.raises(ValueError, match="num_ctas: expected positive tile sizes"):
        ext.fp8_gemm_tile_order(0, 10, 10, 1, 64, 0, 1, [])


def _expected_tiles(layout, m_rows, n, groups, bm, bn, info):
    n_blocks = -(-n // bn)
    if layout == 0:
        return {(0, mb, nb) for mb in range(-(-m_rows // bm)) for nb in range(n_blocks)}
    if layout == 1:
        return {(info[mb * bm], mb, nb) for mb in range(-(-m_rows // bm)) for nb in range(n_blocks)
                if 0 <= info[mb * bm] < groups}
    return {(g, mb, nb) for g in range(groups) for mb in range(-(-min(max(info[g], 0), m_rows) // bm))
            for nb in range(n_blocks)}


SCHEDULES = [
    (0, 300, 2112, 1, []),
    (0, 1, 7168, 1, []),
    (1, 640, 320, 4, contiguous_indices([130, 0, 5, 128], trailing_padding_blocks=1).tolist()),
    (1, 256, 4096, 3, contiguous_indices([0, 0, 200]).tolist()),
    (2, 70, 192, 4, [0, 70, 1, 33]),
    (2, 256, 7168, 3, [0, 0, 0]),
    (2, 512, 2112, 5, [512, 3, 0, 129, 64]),
]


@pytest.mark.parametrize("layout,m_rows,n,groups,info", SCHEDULES)
@pytest.mark.parametrize("bm,bn", [(64, 112), (128, 128), (128, 160)])
@pytest.mark.parametrize("num_ctas", [1, 7, 132])
def test_scheduler_visits_every_tile_once(layout, m_rows, n, groups, info, bm, bn, num_ctas):
    ext = _extension()
    per_cta = ext.fp8_gemm_tile_order(layout, m_rows, n, groups, bm, bn, num_ctas, info)
    assert len(per_cta) == num_ctas
    visited = [tuple(t[:3]) for tiles in per_cta for t in tiles]
    assert len(visited) == len(set(visited)), "a tile was visited twice"
    assert set(visited) == _expected_tiles(layout, m_rows, n, groups, bm, bn, info)
    for g, mb, nb, valid in (t for tiles in per_cta for t in tiles):
        assert 0 <= g < groups and 0 <= nb * bn < n and 0 <= mb * bm < valid <= m_rows
        if layout == 2:
            assert valid == info[g]
    # Balanced: no CTA holds more than one tile above the even share (contiguous padding tiles are skipped
    # where they fall, so only the tile indices are balanced there).
    counts = [len(t) for t in per_cta]
    if layout != 1:
        assert max(counts) - min(counts) <= 1


# ---- 2-CTA clusters with TMA multicast of the shared operand --------------------------------------------

def _multicast_compiled(mode, bm, bn):
    """Whether the extension has the kernel of this multicast mode (1: A, 2: B) for the tile."""
    return (bm // 64, bn) in pykernels.fp8_gemm.GEMM_INSTANTIATIONS[f"(pykernels::fp8_gemm::Multicast){mode}"]


def _multicast_allowed(mode, layout, m_blocks, n_blocks, bn):
    """A pairs in every layout (an odd last column block with a load_only partner); B needs row pairs."""
    return mode == 1 or (layout == 0 and m_blocks % 2 == 0 and bn % 16 == 0)


def _contiguous_with_foreign_groups():
    """m_indices with a padding-only block and a block of group 6 (>= G = 4, skipped by the kernel)."""
    idx = contiguous_indices([130, 0, 5, 128], trailing_padding_blocks=1)
    return torch.cat([idx[:384], torch.full((128,), 6, dtype=torch.int32), idx[384:]]).tolist()


# (layout, m_rows, n, groups, group_info, block_m, block_n): DeepSeek-V3 shapes, odd M and N, contiguous
# padding (-1) and foreign groups, masked groups with masked_m 0, 1, partial and full.
CLUSTER_SHAPES = [
    (0, 4096, 7168, 1, [], 128, 112),
    (0, 4096, 2112, 1, [], 128, 160),
    (0, 1000, 3000, 1, [], 128, 144),   # 8 row blocks, 21 column blocks
    (0, 300, 2112, 1, [], 128, 160),    # 3 row blocks (no B pairs), 14 column blocks
    (0, 300, 2000, 1, [], 128, 128),    # 3 row blocks, 16 column blocks
    (0, 77, 24576, 1, [], 64, 128),
    (1, 768, 320, 4, _contiguous_with_foreign_groups(), 128, 160),
    (1, 896, 4096, 3, contiguous_indices([0, 260, 500]).tolist(), 128, 128),
    (1, 384, 7168, 2, contiguous_indices([1, 200]).tolist(), 64, 112),
    (1, 384, 7168, 2, contiguous_indices([1, 200]).tolist(), 128, 160),   # 45 column blocks
    (1, 768, 1100, 4, _contiguous_with_foreign_groups(), 64, 128),        # 9 column blocks
    (2, 256, 7168, 3, [0, 200, 256], 128, 112),
    (2, 256, 7168, 3, [0, 200, 256], 128, 160),                           # 45 column blocks
    (2, 512, 2112, 5, [512, 3, 0, 129, 64], 128, 96),
    (2, 70, 4096, 4, [0, 70, 1, 33], 64, 128),
    (2, 64, 7168, 8, [0, 0, 0, 0, 0, 0, 0, 0], 64, 144),
]


def _delivered(loads_of_ctas, cta, operand):
    """Shared-memory rows of `operand` that the loads of every CTA of a cluster write into CTA `cta`, as
    (smem_row, global row, group) per row, and the bytes they complete on its barrier."""
    rows, total = [], 0
    for loads in loads_of_ctas:
        for name, group, row, smem_row, count, mask, nbytes in loads:
            if mask >> cta & 1:
                total += nbytes
                if name == operand:
                    rows += [(smem_row + i, row + i, group) for i in range(count)]
    return sorted(rows), total


@pytest.mark.parametrize("shape", CLUSTER_SHAPES, ids=lambda s: f"L{s[0]}-{s[1]}x{s[2]}-{s[5]}x{s[6]}")
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("num_ctas", [2, 14, 132])
def test_cluster_pairs_stay_in_lockstep(shape, mode, num_ctas):
    """Both CTAs of every cluster, step by step: the same number of tiles, each step's tiles agree on zero
    or not, on the k-block count and on the shared operand's group and block (the other operand's block
    differs by the CTA's rank); the two halves of the shared tile, one load from each CTA, together with each
    CTA's own loads fill every row of each CTA's A and B tiles once, from the tile's rows, and the bytes
    they deliver to each CTA are its barrier's expected transaction count. With A shared and an odd number
    of column blocks, the rank-1 CTA of each row's last pair is load_only: its half of A, its scales, no B,
    no output. Every tile is produced once."""
    ext = _extension()
    layout, m_rows, n, groups, info, bm, bn = shape
    k = 7168 if layout == 0 else 512
    m_blocks, n_blocks = -(-m_rows // bm), -(-n // bn)
    if mode and not _multicast_allowed(mode, layout, m_blocks, n_blocks, bn):
        with pytest.raises(ValueError, match="multicast: expected a mode this shape allows"):
            ext.fp8_gemm_cluster_steps(layout, m_rows, n, k, groups, bm, bn, num_ctas, info, mode, False)
        return
    size = 2 if mode else 1
    shared = {0: None, 1: "a", 2: "b"}[mode]
    load_only_steps = 0
    for sa_by_tma in (False, True):
        per_cta = ext.fp8_gemm_cluster_steps(layout, m_rows, n, k, groups, bm, bn, num_ctas, info, mode, sa_by_tma)
        produced = []
        for first in range(0, num_ctas, size):
            walks = per_cta[first:first + size]
            assert len({len(w) for w in walks}) == 1, "the CTAs of a cluster walk different numbers of tiles"
            for steps in zip(*walks):
                assert len({(zero, kb) for _, _, _, zero, _, kb, _, _ in steps}) == 1
                for rank, (g, mb, nb, zero, load_only, kb, _, loads) in enumerate(steps):
                    assert kb == (0 if zero else k // 128) and bool(loads) == (kb > 0)
                    assert load_only == (mode == 1 and n_blocks % 2 == 1 and nb == n_blocks)
                    if not load_only:
                        produced.append((g, mb, nb))
                    if mode == 1:
                        assert (g, mb, nb // 2, nb % 2) == (steps[0][0], steps[0][1], steps[0][2] // 2, rank)
                    if mode == 2:
                        assert (g, nb, mb // 2, mb % 2) == (steps[0][0], steps[0][2], steps[0][1] // 2, rank)
                load_only_steps += steps[-1][4]
                if not steps[0][5]:
                    continue
                all_loads = [step[7] for step in steps]
                for rank, loads in enumerate(all_loads):
                    for name, _, _, _, count, mask, _ in loads:
                        assert mask == (3 if name == shared else 1 << rank), (name, mask)
                        if name == shared:
                            assert count == (bm if name == "a" else bn) // 2
                for cta, (g, mb, nb, _, load_only, _, tx_bytes, _) in enumerate(steps):
                    a_group = g if layout == 2 else 0
                    a_rows, delivered = _delivered(all_loads, cta, "a")
                    b_rows, _ = _delivered(all_loads, cta, "b")
                    assert a_rows == [(i, mb * bm + i, a_group) for i in range(bm)]
                    assert b_rows == ([] if load_only else [(i, nb * bn + i, g) for i in range(bn)])
                    b_bytes = 0 if load_only else bn * 128
                    assert delivered == tx_bytes == bm * 128 + b_bytes + (bm * 4 if sa_by_tma else 0)
        assert len(produced) == len(set(produced)), "a tile was produced twice"
        per_cta_off = ext.fp8_gemm_tile_order(layout, m_rows, n, groups, bm, bn, 1, info, include_zero_tiles=True)
        assert set(produced) == {tuple(t[:3]) for t in per_cta_off[0]}
    if mode == 1 and n_blocks % 2:
        assert load_only_steps > 0


def test_cluster_steps_reject_what_the_kernel_cannot_run():
    ext = _extension()
    with pytest.raises(ValueError, match="num_ctas: expected positive tile sizes, non-negative counts and a "
                                         "positive num_ctas, even with multicast"):
        ext.fp8_gemm_cluster_steps(0, 256, 256, 128, 1, 128, 128, 3, [], 1, False)
    with pytest.raises(ValueError, match="multicast: expected a mode this shape allows"):
        ext.fp8_gemm_cluster_steps(1, 256, 256, 128, 1, 128, 128, 2, [0] * 256, 2, False)
    with pytest.raises(ValueError, match=r"multicast: expected 0 \(off\), 1 \(A shared\) or 2"):
        ext.fp8_gemm_cluster_steps(0, 256, 256, 128, 1, 128, 128, 2, [], 3, False)
    with pytest.raises(ValueError, match="k: expected a multiple of 128, got 100"):
        ext.fp8_gemm_cluster_steps(0, 256, 256, 100, 1, 128, 128, 2, [], 1, False)


@pytest.mark.parametrize("layout", ["plain", "contiguous", "masked"])
@pytest.mark.parametrize("m,n,groups,sms", [(4096, 7168, 1, 132), (4096, 2112, 1, 132), (1000, 3000, 1, 132),
                                            (300, 2112, 1, 132), (256, 7168, 1, 132), (128, 24576, 1, 78),
                                            (32, 7168, 64, 132), (100, 4096, 8, 114), (4096, 7168, 1, 131),
                                            (64, 2112, 1, 132), (512, 32768, 4, 132)])
def test_config_multicast_choice(layout, m, n, groups, sms):
    """Multicast on exactly when the tiles make more than one wave on an even SM count, the width is one
    compiled with the cluster launch and the shape pairs the tiles; the larger tile is the shared one (B on
    a tie), else the other when only it pairs up; B never in a grouped layout."""
    _extension()
    if layout != "masked":
        groups = 1
    cfg = pykernels.fp8_gemm_config(m, n, 7168, num_groups=groups, num_sms=sms, layout=layout)
    bm, bn = cfg["block_m"], cfg["block_n"]
    m_blocks, n_blocks = -(-m // bm), -(-n // bn)
    code = {"plain": 0, "contiguous": 1, "masked": 2}[layout]
    expected = "none"
    if cfg["num_waves"] > 1 and sms % 2 == 0:
        order = (1, 2) if bm > bn else (2, 1)
        mode = next((x for x in order if _multicast_compiled(x, bm, bn)
                     and _multicast_allowed(x, code, m_blocks, n_blocks, bn)), 0)
        expected = {0: "none", 1: "a", 2: "b"}[mode]
    assert cfg["multicast"] == expected
    assert cfg["cluster_size"] == (1 if expected == "none" else 2)
    if layout != "plain":
        assert cfg["multicast"] != "b"


def test_config_multicast_on_deepseek_prefill_shapes():
    _extension()
    # 32 x 45 tiles of 128 x 160 on 132 SMs: 11 waves, B (160 rows) is the larger tile.
    assert pykernels.fp8_gemm_config(4096, 7168, 7168, num_sms=132)["multicast"] == "b"
    # 128 x 128 tiles in the grouped layouts: B would be preferred on the tie, but only A pairs up there.
    assert pykernels.fp8_gemm_config(4096, 4096, 7168, num_sms=132, layout="contiguous")["multicast"] == "a"
    assert pykernels.fp8_gemm_config(256, 4096, 7168, 8, num_sms=132, layout="masked")["multicast"] == "a"
    # One wave (M=256, N=7168: 128 tiles): no cluster.
    assert pykernels.fp8_gemm_config(256, 7168, 7168, num_sms=132)["multicast"] == "none"
    with pytest.raises(ValueError, match="layout: expected one of"):
        pykernels.fp8_gemm_config(256, 7168, 7168, num_sms=132, layout="grouped")


@triton.jit
def raster_probe(out_ptr, m_blocks, n_blocks, GROUP_M: tl.constexpr):
    """Writes the Triton kernel's (m block, n block) for each program id."""
    pid = tl.program_id(0)
    pm, pn = _raster(pid, m_blocks, n_blocks, GROUP_M)
    tl.store(out_ptr + 2 * pid, pm)
    tl.store(out_ptr + 2 * pid + 1, pn)


def test_scheduler_raster_matches_triton_kernel(device):
    """The CUDA scheduler's plain-layout order is the Triton kernel's _raster order (same L2 plan)."""
    ext = _extension()
    m_rows, n, bm, bn = 1300, 2112, 128, 128
    m_blocks, n_blocks = -(-m_rows // bm), -(-n // bn)
    probe = torch.empty(2 * m_blocks * n_blocks, dtype=torch.int32, device=device)
    raster_probe[(m_blocks * n_blocks,)](probe, m_blocks, n_blocks, GROUP_M=8)
    (cuda_order,) = ext.fp8_gemm_tile_order(0, m_rows, n, 1, bm, bn, 1, [])
    assert [(t[1], t[2]) for t in cuda_order] == [tuple(p) for p in probe.cpu().view(-1, 2).tolist()]
    assert [(t[1], t[2]) for t in cuda_order] == [python_raster(i, m_blocks, n_blocks, 8)
                                                  for i in range(m_blocks * n_blocks)]


def test_extension_bad_arguments_raise_before_launch():
    """The launchers' own checks (the CUDA path's last line of defence), reachable without a GPU."""
    ext = _extension()
    (a, sa), (b, sb) = _plain()
    out = torch.empty(8, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="a: expected a CUDA tensor"):
        ext.fp8_gemm_nt(a, sa, b, sb, out, 0)


# ---- GPU: CUDA and compiled Triton on DeepSeek-V3's shapes ---------------------------------------------

DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
GPU_BACKENDS = ["cuda", "triton"]


def gpu_problem(m, n, k, groups=None):
    lead = () if groups is None else (groups,)
    x = torch.randn(lead + (m, k), device="cuda")
    w = torch.randn(lead + (n, k), device="cuda")
    a, sa = fp8_quant.per_token_group_quant_fp8(x, 128)
    b, sb = fp8_quant.per_block_quant_fp8(w, 128)
    return x, w, (a, sa), (b, sb)


def assert_accurate(got, x, w, a, sa, b, sb):
    """DeepGEMM's acceptance: calc_diff < 1e-3 against the unquantized product (typical 7e-4), and a relative
    error (Frobenius) < 1e-2 against the product of the dequantized operands."""
    exact = x.float() @ w.float().T
    assert ref.calc_diff(got, exact) < 1e-3
    deq = (a.float() * sa.repeat_interleave(128, dim=-1)) @ \
        (b.float() * sb.repeat_interleave(128, 0)[: b.shape[0]].repeat_interleave(128, 1)).T
    assert float((got.float() - deq).norm() / deq.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n,k", DEEPSEEK_NK)
@pytest.mark.parametrize("m", [1, 64, 128, 4096])
def test_gpu_deepseek_shapes(backend, m, n, k):
    x, w, (a, sa), (b, sb) = gpu_problem(m, n, k)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = pykernels.fp8_gemm_nt((a, sa), (b, sb), out=out, backend=backend)
    torch.cuda.synchronize()
    assert bool(torch.isfinite(got).all())
    assert_accurate(got, x, w, a, sa, b, sb)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("groups,m_per_group,n,k", [(4, 8192, 4096, 7168), (8, 4096, 7168, 2048)])
def test_gpu_contiguous(backend, groups, m_per_group, n, k):
    # Uneven segments around the nominal size, each padded to 128 rows with -1.
    sizes = [m_per_group + d for d in ([-100, 37, 0, 63] * 2)[:groups]]
    idx = contiguous_indices(sizes).cuda()
    m_total = idx.numel()
    x = torch.randn(m_total, k, device="cuda")
    w = torch.randn(groups, n, k, device="cuda")
    a, sa = fp8_quant.per_token_group_quant_fp8(x, 128)
    b, sb = fp8_quant.per_block_quant_fp8(w, 128)
    out = torch.full((m_total, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = pykernels.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), idx, out=out, backend=backend)
    torch.cuda.synchronize()
    for g in range(groups):
        rows = idx == g
        assert_accurate(got[rows], x[rows], w[g], a[rows], sa[rows], b[g], sb[g])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("groups,expected_m", [(1, 1024), (2, 512), (4, 256)])
@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)])
def test_gpu_masked(backend, groups, expected_m, n, k):
    m_max = 2 * expected_m
    x, w, (a, sa), (b, sb) = gpu_problem(m_max, n, k, groups=groups)
    masked = torch.randint(int(expected_m * 0.7), int(expected_m * 1.3) + 1, (groups,), dtype=torch.int32)
    out = torch.full((groups, m_max, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = pykernels.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), masked.cuda(), expected_m, out=out,
                                                 backend=backend)
    torch.cuda.synchronize()
    for g, rows in enumerate(masked.tolist()):
        assert_accurate(got[g, :rows], x[g, :rows], w[g], a[g, :rows], sa[g, :rows], b[g], sb[g])
        assert_uncomputed_rows(got[g, rows:], backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_masked_cuda_graph(backend):
    """The masked path reads masked_m on the device: a captured graph follows new counts on replay."""
    groups, m_max, n, k = 4, 256, 4096, 7168
    x, w, (a, sa), (b, sb) = gpu_problem(m_max, n, k, groups=groups)
    masked = torch.tensor([256, 0, 17, 128], dtype=torch.int32, device="cuda")
    out = torch.zeros((groups, m_max, n), dtype=torch.bfloat16, device="cuda")
    call = lambda: pykernels.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), masked, 128, out=out,  # noqa: E731
                                                          backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up outside capture (Triton compiles, the extension sets its shared-memory limit)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for counts in ([1, 200, 0, 64], [256, 256, 256, 256], [0, 0, 0, 3]):
        masked.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for g, rows in enumerate(counts):
            if rows:
                assert_accurate(out[g, :rows], x[g, :rows], w[g], a[g, :rows], sa[g, :rows], b[g], sb[g])
            assert_uncomputed_rows(out[g, rows:], backend)


@pytest.mark.gpu
def test_gpu_cuda_matches_triton():
    """CUDA and Triton agree with each other within the kernel-vs-reference bound on an odd shape."""
    _, _, (a, sa), (b, sb) = gpu_problem(300, 2112, 7168)
    cuda = pykernels.fp8_gemm_nt((a, sa), (b, sb), backend="cuda")
    tri = pykernels.fp8_gemm_nt((a, sa), (b, sb), backend="triton")
    assert_matches_reference(cuda, tri.cpu(), a, sa, b, sb)


# ---- CUDA kernel: tile instantiations, scale split, decode-size config, SASS promotion audit --------------

from pykernels import audit  # noqa: E402

DSV3_DECODE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


@pytest.mark.parametrize("m", [1, 7, 64, 65, 100, 128])
@pytest.mark.parametrize("n,k", DSV3_DECODE_NK)
def test_config_fills_the_sms_at_decode_sizes(m, n, k):
    """M <= 128 on 132 SMs: the last wave of the chosen tiles keeps >= 85% of the SMs busy, and the
    reported wave_utilization is exactly that share."""
    ext = _extension()
    cfg = pykernels.fp8_gemm_config(m, n, k, num_sms=132)
    assert cfg["block_n"] in ext.fp8_gemm_block_n_choices()
    tiles = -(-m // cfg["block_m"]) * -(-n // cfg["block_n"])
    waves = -(-tiles // 132)
    assert (cfg["num_tiles"], cfg["num_waves"]) == (tiles, waves)
    last_wave = (tiles - (waves - 1) * 132) / 132
    assert cfg["wave_utilization"] == pytest.approx(last_wave)
    assert last_wave >= 0.85, cfg


@pytest.mark.parametrize("m", [1, 64, 200, 4096])
@pytest.mark.parametrize("n", [200, 576, 1536, 2112, 4096, 7168, 24576, 32768])
@pytest.mark.parametrize("groups,sms", [(1, 132), (4, 78), (8, 114)])
def test_config_picks_only_instantiated_tiles(m, n, groups, sms):
    ext = _extension()
    cfg = pykernels.fp8_gemm_config(m, n, 512, num_groups=groups, num_sms=sms)
    assert cfg["block_m"] in (64, 128) and cfg["block_n"] in ext.fp8_gemm_block_n_choices()
    # Stages and shared memory are the instantiation's compile-time plan: per stage A and B tiles plus A
    # scales, beside the epilogue's bf16 output tile (block_m x block_n) outside the ring.
    per_stage = (cfg["block_m"] + cfg["block_n"]) * 128 + cfg["block_m"] * 4
    output = cfg["block_m"] * cfg["block_n"] * 2
    # Four stages (512 K in flight) at the widest tile, 128 x 192; five or more at every other.
    assert cfg["num_stages"] == min(8, (232448 - 1024 - 2048 - output) // per_stage) >= 4
    assert cfg["num_stages"] >= 5 or (cfg["block_m"], cfg["block_n"]) == (128, 192)
    assert cfg["smem_bytes"] == cfg["num_stages"] * per_stage + output + 2048 <= 232448 - 1024


@pytest.mark.parametrize("m,n,groups,block_n,waves,multicast", [
    (64, 24576, 1, 192, 1, "none"),      # one wave of 128 tiles, where 96 columns took two
    (128, 24576, 1, 192, 1, "none"),
    (4096, 2112, 1, 192, 3, "b"),        # 3 waves of 352 tiles, where 144 columns took 4
    (8192, 32768, 1, 192, 83, "b"),
    (320, 32768, 1, 192, 4, "a"),        # 3 row blocks cannot pair B: A pairs, the last column's alone
    (8192, 7168, 1, 160, 22, "b"),       # 192: 64 x 38 tiles, 19 waves of 224 columns against 22 of 192
])
def test_config_picks_192_columns_where_it_fills_the_waves(m, n, groups, block_n, waves, multicast):
    """The widest tile wins where it takes fewer waves for the same work; with several waves it runs as a
    cluster like the other wide tiles."""
    cfg = pykernels.fp8_gemm_config(m, n, 7168, num_groups=groups, num_sms=132)
    assert (cfg["block_n"], cfg["num_waves"], cfg["multicast"]) == (block_n, waves, multicast), cfg


def test_block_n_choices_span_at_most_two_scale_blocks():
    ext = _extension()
    widths = ext.fp8_gemm_block_n_choices()
    assert widths == sorted(set(widths)) and widths[0] == 16 and all(w % 8 == 0 for w in widths)
    for w in widths:
        assert 128 - _gcd(w, 128) + w <= 256, w  # the worst offset within a block plus the width


@pytest.mark.parametrize("block_n", [16, 32, 48, 56, 64, 96, 112, 128, 144, 160, 192])
def test_split_columns_matches_the_scale_blocks(block_n):
    """The host's split_columns (the k-loop instance a tile runs) against the scale block of each column."""
    ext = _extension()
    splits = set()
    for n0 in range(0, 40 * block_n, block_n):
        split = ext.fp8_gemm_split_columns(n0, block_n)
        blocks = [(n0 + c) // 128 for c in range(block_n)]
        assert all(b == blocks[0] for b in blocks[:split]) and all(b == blocks[0] + 1 for b in blocks[split:])
        assert split % 8 == 0  # whole 8-column fragment chunks on each side
        splits.add(split)
    # Exactly the instances the kernel compiles: multiples of gcd(block_n, 128) up to min(block_n, 128).
    step = _gcd(block_n, 128)
    assert splits == set(range(step, min(block_n, 128) + 1, step))
    with pytest.raises(ValueError, match="n0, block_n: expected block_n > 0 and n0 a non-negative multiple"):
        ext.fp8_gemm_split_columns(block_n + 8, block_n)


@pytest.mark.parametrize("value", [2 ** 30, 2 ** 31 - 1, 2 ** 31, 2 ** 40])
def test_config_rejects_dimensions_the_kernel_cannot_index(value):
    ext = _extension()
    for name, args in (("M", (value, 128, 128)), ("N", (1, value, 128)), ("num_groups", (1, 128, 128, value))):
        with pytest.raises(ValueError, match=rf"{name}: expected an int in \[1, 1073741823\], got {value}"):
            pykernels.fp8_gemm_config(*args, num_sms=132) if len(args) == 3 else \
                pykernels.fp8_gemm_config(*args[:3], num_groups=args[3], num_sms=132)
    with pytest.raises(ValueError, match=rf"n: expected an int in \[1, 1073741823\], got {value}"):
        ext.fp8_gemm_config(1, value, 128, 1, 132)
    with pytest.raises(ValueError, match=rf"m: expected an int in \[1, 1073741823\], got {value}"):
        ext.fp8_gemm_config(value, 128, 128, 1, 132)
    # The largest accepted sizes give sane counts (no int32 wrap-around).
    cfg = pykernels.fp8_gemm_config(2 ** 30 - 1, 2 ** 30 - 1, 128, num_sms=132)
    assert cfg["num_tiles"] > 0 and cfg["num_waves"] > 0 and 0 < cfg["wave_utilization"] <= 1


def test_force_tile_accepts_only_instantiated_shapes():
    ext = _extension()
    for bm, bn in ((96, 128), (64, 120), (128, 0), (0, 128)):
        with pytest.raises(ValueError, match="block_m, block_n: expected an instantiated tile"):
            ext.fp8_gemm_force_tile(bm, bn)
    ext.fp8_gemm_force_tile(64, 56)
    ext.fp8_gemm_force_tile(0, 0)


def _sass(body: str) -> str:
    """A cuobjdump -sass listing of one function from 'address: instruction' lines."""
    lines = ["\t\tFunction : _Zfake"]
    for line in body.strip().splitlines():
        address, instruction = line.split(":", 1)
        lines.append(f"        /*{int(address, 16):04x}*/                   {instruction.strip()} ;"
                     f"   /* 0x000000000000000000 */")
    return "\n".join(lines)


def _promotion_listing(promotion_lines, head=()):
    """A k-loop as ptxas lays it out: (head,) wait, 4 QGMMA, scale products, promotion, back-edge; the
    wait's retry sits after EXIT and branches back into the loop. Returns parse_listing's instructions."""
    body = [*head, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x10], R3", "@!P0 BRA RETRY",
            "QGMMA.64x16x32.F32.E4M3.E4M3 R24, gdesc[UR8], RZ, !UPT",
            "QGMMA.64x16x32.F32.E4M3.E4M3 R24, gdesc[UR12], R24",
            "QGMMA.64x16x32.F32.E4M3.E4M3 R24, gdesc[UR16], R24",
            "QGMMA.64x16x32.F32.E4M3.E4M3 R24, gdesc[UR20], R24, gsb0",
            "AFTER_WAIT: WARPGROUP.DEPBAR.LE gsb0, 0x0", "FMUL R4, R2, R5", "FMUL R6, R7, R5",
            *promotion_lines, "ISETP.NE.AND P1, PT, R9, R10, PT", "@P1 BRA 0x0", "EXIT",
            "RETRY: SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x10], R3", "@!P0 BRA RETRY", "BRA AFTER_WAIT"]
    labels = {line.split(":")[0]: 16 * i for i, line in enumerate(body) if line.split(":")[0].isupper()
              and ":" in line and " " not in line.split(":")[0]}
    lines = []
    for i, line in enumerate(body):
        line = line.split(": ", 1)[1] if line.split(":")[0] in labels else line
        for label, address in labels.items():
            line = line.replace(f"BRA {label}", f"BRA {address:#x}")
        lines.append(f"{16 * i:x}: {line}")
    return audit.parse_listing(_sass("\n".join(lines)))["_Zfake"]


def test_audit_hot_loop_is_the_shortest_loop_around_the_mma():
    """The k-loop, not the longer 'loop' an out-of-line wait retry forms by branching back into it."""
    instructions = _promotion_listing([f"FFMA R{40 + i}, R{24 + i}, R4, R{40 + i}" for i in range(8)])
    (loop,) = audit.hot_loops(instructions)
    assert loop["start"] == 0 and loop["QGMMA"] == 4 and loop["k_steps"] == 1 and loop["qgmma_n"] == 16
    assert (loop["FFMA"], loop["FMUL"], loop["FSEL"]) == (8, 2, 0)
    assert loop["instructions"] == 19  # wait, retry branch, 4 QGMMA, DEPBAR, 2 FMUL, 8 FFMA, ISETP, BRA
    assert audit.promotion_failures([loop]) == []


def test_audit_fails_promotion_with_selects_or_extra_multiplies():
    """A run-time scale split shows as FSEL plus FMUL per element: the audit must reject it."""
    selecting = []
    for i in range(8):
        selecting += [f"FSEL R{60 + i}, R4, R6, P2", f"FMUL R{70 + i}, R{24 + i}, R{60 + i}",
                      f"FADD R{40 + i}, R{40 + i}, R{70 + i}"]
    failures = audit.promotion_failures(audit.hot_loops(_promotion_listing(selecting)))
    assert any("8 FSEL in promotion" in f for f in failures)
    assert any("10 FMUL in promotion (expected at most 4)" in f for f in failures)
    assert any("0 FFMA (expected 8" in f for f in failures)
    short = _promotion_listing([f"FFMA R{40 + i}, R{24 + i}, R4, R{40 + i}" for i in range(7)])
    assert any("7 FFMA (expected 8" in f for f in audit.promotion_failures(audit.hot_loops(short)))


def test_audit_fails_scale_loads_outside_the_stage():
    """The A scales are read from the stage between its full-barrier wait and its empty-barrier release; a
    load the compiler hoisted above the wait or sank below the release is a race the audit must reject."""
    ffma = [f"FFMA R{40 + i}, R{24 + i}, R4, R{40 + i}" for i in range(8)]
    release = "SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR4+0x40], RZ"
    inside = _promotion_listing(["LDS R2, [R14+0x100]", release, *ffma])
    (loop,) = audit.hot_loops(inside)
    assert loop["unordered_lds"] == 0 and audit.promotion_failures([loop]) == []
    # LDS after the release (sunk), and LDS after the release of the previous iteration, wrapping around
    # the back-edge to the top of the loop (hoisted above the wait).
    sunk = audit.hot_loops(_promotion_listing([release, "LDS R2, [R14+0x100]", *ffma]))
    assert sunk[0]["unordered_lds"] == 1
    generic = audit.hot_loops(_promotion_listing([release, "LD.E R2, desc[UR6][R14.64+0x100]", *ffma]))
    assert generic[0]["unordered_lds"] == 1
    assert any("1 shared-memory loads outside" in f for f in audit.promotion_failures(sunk))
    (loop,) = audit.hot_loops(_promotion_listing([release, *ffma], head=["LDS R2, [R14+0x100]"]))
    assert loop["start"] == 0 and loop["unordered_lds"] == 1
    # Loops without mbarrier waits (Triton's cp.async pipelines) are not judged by this rule.
    assert audit.unordered_shared_loads(["LDS", "FFMA", "BAR.SYNC"]) == 0


def test_audit_counts_multicast_tma_loads_and_requires_them_of_cluster_kernels():
    """A listing's UTMALDG.3D.MULTICAST counts as a TMA load and as a multicast one; the cluster kernels'
    expectation fails without one, the unicast kernels' with one."""
    listing = _sass("""
        0000: UTMALDG.3D [UR8], [UR20], desc[UR18]
        0010: UTMALDG.3D.MULTICAST [UR8], [UR22], UR18, desc[UR20]
        0020: @!P0 UTMALDG.3D.MULTICAST [UR8], [UR22], UR18, desc[UR20]
    """)
    counts = audit.parse_sass(listing)["_Zfake"]
    assert counts["UTMALDG"] == 3 and counts["UTMALDG.MULTICAST"] == 2
    unicast_only = audit.parse_sass(_sass("0000: UTMALDG.3D [UR8], [UR20], desc[UR18]"))["_Zfake"]
    assert unicast_only["UTMALDG.MULTICAST"] == 0
    expectations = pykernels.fp8_gemm.CUDA_AUDIT
    cluster = expectations["fp8_gemm_kernel<2, 160, (pykernels::fp8_gemm::Multicast)2>"]
    plain = expectations["fp8_gemm_kernel<2, 160, (pykernels::fp8_gemm::Multicast)0>"]
    synchronized = {"SYNCS.ARRIVE.REMOTE": 4, "SYNCS.ARRIVE.LOCAL": 1, "UCGABAR_WAIT": 2}
    for expect, instructions, failing in ((cluster, {**unicast_only, **synchronized}, True),
                                          (cluster, {**counts, **synchronized}, False),
                                          (plain, counts, True), (plain, unicast_only, False)):
        report = audit.KernelReport(name="fake", source="cuda", instructions=dict(instructions))
        audit.check_expectations(report, expect)
        assert bool(report.failures) == failing, (expect, report.failures)
        if failing:
            assert "UTMALDG.MULTICAST" in report.failures[0]


def test_audit_requires_cluster_releases_and_barriers_of_cluster_kernels():
    """The stage release of a cluster kernel's math warps is an arrive through a cluster address (RED); an
    arrive on the CTA's own barrier (the A-scale warp's on "full") may appear once. A cluster kernel that
    releases a stage locally (the peer's producer would overwrite it unreleased), lacks the exit cluster
    barrier or releases nothing remotely fails; a unicast kernel with a cluster arrive or barrier fails."""
    counts = audit.parse_sass(_sass("""
        0000: SYNCS.ARRIVE.TRANS64 RZ, [UR4+0x33c00], RZ
        0010: @!P1 SYNCS.ARRIVE.TRANS64.A1T0 RZ, [R8+URZ], RZ
        0020: @!P2 SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ, [R24+URZ], RZ
        0030: UCGABAR_ARV
        0040: UCGABAR_WAIT
        0050: SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R189+URZ+0x33c00], R24
    """))["_Zfake"]
    assert counts["SYNCS.ARRIVE.LOCAL"] == 1 and counts["SYNCS.ARRIVE.REMOTE"] == 1
    assert counts["UCGABAR_WAIT"] == 1 and counts["SYNCS"] == 4
    expectations = pykernels.fp8_gemm.CUDA_AUDIT
    cluster = expectations["fp8_gemm_kernel<1, 112, (pykernels::fp8_gemm::Multicast)1>"]
    plain = expectations["fp8_gemm_kernel<1, 112, (pykernels::fp8_gemm::Multicast)0>"]
    good = {"UTMALDG.MULTICAST": 2, "SYNCS.ARRIVE.REMOTE": 8, "SYNCS.ARRIVE.LOCAL": 1, "UCGABAR_WAIT": 6}
    cases = [(cluster, good, None), (cluster, {**good, "SYNCS.ARRIVE.LOCAL": 2}, "SYNCS.ARRIVE.LOCAL"),
             (cluster, {**good, "UCGABAR_WAIT": 1}, "UCGABAR_WAIT"),
             (cluster, {**good, "SYNCS.ARRIVE.REMOTE": 0}, "SYNCS.ARRIVE.REMOTE"),
             (plain, {"SYNCS.ARRIVE.LOCAL": 8}, None), (plain, {"SYNCS.ARRIVE.REMOTE": 1}, "SYNCS.ARRIVE.REMOTE"),
             (plain, {"UCGABAR_WAIT": 1}, "UCGABAR_WAIT")]
    for expect, instructions, failing in cases:
        report = audit.KernelReport(name="fake", source="cuda", instructions=instructions)
        audit.check_expectations(report, expect)
        assert [failing in f for f in report.failures] == ([True] if failing else []), (instructions, report.failures)


def test_audit_finds_the_multicast_load_in_every_cluster_kernel():
    """The built extension (static SASS): every cluster kernel multicasts its shared operand's half, releases
    stages through cluster addresses only and has the cluster barrier at init and exit; the unicast kernels
    do none of it; all keep their registers without local memory."""
    reports = audit._reports_from_binary(_extension().__file__, "cuda")
    gemm = {r.name.split("fp8_gemm_kernel<", 1)[1].split(">(", 1)[0]: r for r in reports if "fp8_gemm_kernel<" in r.name}
    for mode, shapes in pykernels.fp8_gemm.GEMM_INSTANTIATIONS.items():
        for wg, bn in shapes:
            r = gemm[f"{wg}, {bn}, {mode}"]
            multicast = r.instructions.get("UTMALDG.MULTICAST", 0)
            assert (multicast > 0) == (not mode.endswith("0")), (r.name, multicast)
            assert r.local_bytes == 0 and r.stack_bytes == 0 and not r.instructions.get("STL"), r.name
            audit.check_expectations(r, pykernels.fp8_gemm.CUDA_AUDIT[f"fp8_gemm_kernel<{wg}, {bn}, {mode}>"])
            assert not r.failures, (r.name, r.failures)


def test_audit_reports_pure_ffma_promotion_for_every_gemm_instantiation():
    """The built extension: one FFMA per accumulator element per 128-K step in every k-loop instance of
    every tile shape, no FSEL, at most 4 FMUL (static SASS figures)."""
    ext = _extension()
    reports = audit._reports_from_binary(ext.__file__, "cuda")
    gemm = {r.name: r for r in reports if "fp8_gemm_kernel<" in r.name}
    widths = ext.fp8_gemm_block_n_choices()
    instantiations = pykernels.fp8_gemm.GEMM_INSTANTIATIONS
    assert instantiations["(pykernels::fp8_gemm::Multicast)0"] == [(wg, bn) for wg in (1, 2) for bn in widths]
    assert len(gemm) == sum(len(shapes) for shapes in instantiations.values())
    for name, r in gemm.items():
        block_n = int(name.split("fp8_gemm_kernel<", 1)[1].split(",")[1].split(">")[0])
        assert r.hot_loops, name
        assert audit.promotion_failures(r.hot_loops) == [], name
        step = _gcd(block_n, 128)
        assert len(r.hot_loops) == len(range(step, min(block_n, 128) + 1, step)), name  # one per split
        for loop in r.hot_loops:
            assert loop["qgmma_n"] == block_n and loop["FFMA"] == block_n // 2 * loop["k_steps"]
            assert loop["FSEL"] == 0 and loop["FMUL"] <= 4 * loop["k_steps"]
            assert loop["unordered_lds"] == 0, name


def test_setmaxnreg_fits_every_gemm_instantiations_register_allocation():
    """The producer warpgroup drops to 40 registers and each math warpgroup rises to 232 (setmaxnreg).
    The rise only completes if the block's launch allocation (ptxas's register count times the threads)
    covers both, and both must fit the 64K-register file: otherwise the math warps wait forever."""
    producer, math = 40, 232  # kProducerRegisters, kMathRegisters in csrc/fp8_gemm/fp8_gemm.cuh
    reports = audit._reports_from_binary(_extension().__file__, "cuda")
    gemm = [r for r in reports if "fp8_gemm_kernel<" in r.name]
    assert gemm
    for r in gemm:
        math_warpgroups = int(r.name.split("fp8_gemm_kernel<", 1)[1].split(",")[0])
        assert r.threads_per_block == 128 * (1 + math_warpgroups), r.name
        needed = 128 * producer + 128 * math * math_warpgroups
        assert needed <= r.registers * r.threads_per_block <= 65536, (r.name, r.registers)


def _blocky_problem(m, n, k, device="cuda"):
    """Operands whose 128-column groups (activations) and 128x128 blocks (weights) differ in magnitude by
    up to 100x: a scale taken from the wrong block is then a visible error."""
    x = torch.randn(m, k, device=device) * 10.0 ** torch.randint(-1, 2, (m, k // 128), device=device) \
        .repeat_interleave(128, dim=1)
    nb = -(-n // 128)
    mag = 10.0 ** torch.randint(-1, 2, (nb, k // 128), device=device).float()
    w = torch.randn(n, k, device=device) * mag.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    a, sa = fp8_quant.per_token_group_quant_fp8(x, 128)
    b, sb = fp8_quant.per_block_quant_fp8(w, 128)
    return (a, sa), (b, sb)


def assert_close_to_dequantized(got, a, sa, b, sb):
    """Against the float64 product of the dequantized operands: elementwise within one bfloat16 step plus
    the accumulation-order term, and the Frobenius error beyond the output's own bfloat16 rounding
    (relative to the exact product) below 1e-3."""
    exact = ref.dequantized_product(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())
    got = got.cpu().double()
    assert bool(torch.isfinite(got).all())
    mag = magnitude_bound(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())
    bound = exact.abs() * 2 ** -7 + mag * a.shape[-1] * 2 ** -22
    assert bool(((got - exact).abs() <= bound).all()), float(((got - exact).abs() - bound).max())
    rounded = exact.to(torch.bfloat16).double()
    assert float((got - rounded).norm() / exact.norm()) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("store,n_tail", [("tma", 40), ("registers", 41)])
@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("block_n", [16, 32, 48, 56, 64, 96, 112, 128, 144, 160, 192])
def test_gpu_every_instantiation_against_float64(block_m, block_n, store, n_tail):
    """Each tile shape, forced, on a shape whose tiles start at every offset within a scale block (every
    k-loop instance runs), with row and column tails; N % 8 == 0 takes the TMA-store epilogue (the last
    box clipped), an odd N the register stores (and their unpaired-store path)."""
    ext = _extension()
    lcm = block_n * 128 // _gcd(block_n, 128)
    m, n, k = 2 * block_m - 37, lcm + n_tail, 640
    (a, sa), (b, sb) = _blocky_problem(m, n, k)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert ext.fp8_gemm_output_tma_storable(n, out.data_ptr()) == (store == "tma")
    ext.fp8_gemm_force_tile(block_m, block_n)
    try:
        pykernels.fp8_gemm_nt((a, sa), (b, sb), out=out, backend="cuda")
        torch.cuda.synchronize()
    finally:
        ext.fp8_gemm_force_tile(0, 0)
    assert_close_to_dequantized(out, a, sa, b, sb)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 128])
@pytest.mark.parametrize("n,k", DSV3_DECODE_NK)
def test_gpu_decode_shapes_with_the_configs_tile(m, n, k):
    (a, sa), (b, sb) = _blocky_problem(m, n, k)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    pykernels.fp8_gemm_nt((a, sa), (b, sb), out=out, backend="cuda")
    torch.cuda.synchronize()
    assert_close_to_dequantized(out, a, sa, b, sb)


# ---- CUDA kernel: A scales row-major or MN-major (DeepGEMM's TMA-aligned layout) -------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("store,n_tail", [("tma", 8), ("registers", 9)])
@pytest.mark.parametrize("mode,block_m,block_n", [(0, 128, 128), (1, 128, 128), (2, 128, 128), (1, 128, 160),
                                                  (2, 128, 160), (2, 128, 112), (0, 64, 112), (1, 64, 112),
                                                  (1, 64, 144), (1, 128, 192), (2, 128, 192), (1, 64, 192)])
def test_gpu_multicast_plain_against_float64(mode, block_m, block_n, store, n_tail):
    """Forced multicast off, A shared and B shared, on shapes of several waves whose row and column tails
    are partial (B pairs: an even number of row blocks; A: an odd number of column blocks), with row-major
    and MN-major A scales (the scale warp and the scale TMA load), through either epilogue: N % 8 == 0
    stores by TMA while the cluster runs the next pair (load_only CTAs skip the store), an odd N from
    registers."""
    ext = _extension()
    # A shared: 21 column blocks, so each row's last pair has a load_only CTA.
    m, n, k = 12 * block_m - 37, (21 if mode == 1 else 22) * block_n - n_tail, 1152
    (a, sa), (b, sb) = _blocky_problem(m, n, k)
    ext.fp8_gemm_force_tile(block_m, block_n)
    ext.fp8_gemm_force_multicast(mode)
    try:
        for scales in (sa, mn_major_scales(sa)):
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            assert ext.fp8_gemm_output_tma_storable(n, out.data_ptr()) == (store == "tma")
            _launch("fp8_gemm_nt", a, scales, b, sb, out)
            assert_close_to_dequantized(out, a, sa, b, sb)
    finally:
        ext.fp8_gemm_force_multicast(-1)
        ext.fp8_gemm_force_tile(0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("block_m", [64, 128])
# N % 8 == 0 takes the TMA store: 8 column blocks of 128 by TMA, 9 by registers (1100) and by TMA (1144), 5 of 192.
@pytest.mark.parametrize("block_n,n", [(128, 1000), (128, 1100), (128, 1144), (192, 904)])
def test_gpu_multicast_grouped_against_float64(mode, block_m, block_n, n):
    """Forced multicast off and A shared in the grouped layouts: contiguous groups with padding rows and
    padding-only blocks, masked groups with masked_m 0, 1, partial and full (zero tiles pair up), an even
    and an odd number of column blocks (load_only CTAs, zero tiles among them), through either epilogue."""
    ext = _extension()
    groups, k = 3, 640
    ws = [_blocky_problem(1, n, k)[1] for _ in range(groups)]
    b, sb = torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws])
    idx = contiguous_indices([300, 0, 77], trailing_padding_blocks=1).cuda()
    (a, sa), _ = _blocky_problem(idx.numel(), 128, k)
    m_max = 200
    masked = torch.tensor([0, 1, 200], dtype=torch.int32, device="cuda")
    pairs = [_blocky_problem(m_max, 128, k)[0] for _ in range(groups)]
    a3, sa3 = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    ext.fp8_gemm_force_tile(block_m, block_n)
    ext.fp8_gemm_force_multicast(mode)
    try:
        for scales, scales3 in ((sa, sa3), (mn_major_scales(sa), mn_major_scales(sa3))):
            out = torch.full((idx.numel(), n), float("nan"), dtype=torch.bfloat16, device="cuda")
            _launch("m_grouped_fp8_gemm_nt_contiguous", a, scales, b, sb, idx, out)
            assert bool((out[idx == -1].float() == 0).all())
            for g in (0, 2):
                rows = idx == g
                assert_close_to_dequantized(out[rows], a[rows], sa[rows], b[g], sb[g])
            out3 = torch.full((groups, m_max, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            _launch("m_grouped_fp8_gemm_nt_masked", a3, scales3, b, sb, masked, 64, out3)
            for g, rows in enumerate(masked.tolist()):
                assert bool((out3[g, rows:].float() == 0).all())
                if rows:
                    assert_close_to_dequantized(out3[g, :rows], a3[g, :rows], sa3[g, :rows], b[g], sb[g])
    finally:
        ext.fp8_gemm_force_multicast(-1)
        ext.fp8_gemm_force_tile(0, 0)


def test_force_multicast_rejects_unknown_modes():
    ext = _extension()
    with pytest.raises(ValueError, match=r"mode: expected -1 \(select_config's\), 0 \(off\)"):
        ext.fp8_gemm_force_multicast(3)
    ext.fp8_gemm_force_multicast(-1)


@pytest.mark.gpu
def test_gpu_force_multicast_refuses_unpaired_shapes():
    ext = _extension()
    (a, sa), (b, sb) = _blocky_problem(3 * 128, 17 * 128, 256)  # 3 row blocks of 128: no B pairs
    out = torch.empty(3 * 128, 17 * 128, dtype=torch.bfloat16, device="cuda")
    try:
        for block_m, block_n in ((128, 128), (128, 96)):  # no cluster kernel for width 96
            ext.fp8_gemm_force_tile(block_m, block_n)
            ext.fp8_gemm_force_multicast(2 if block_n == 128 else 1)
            with pytest.raises(ValueError, match="multicast: expected a mode this shape and tile allow"):
                _launch("fp8_gemm_nt", a, sa, b, sb, out)
    finally:
        ext.fp8_gemm_force_multicast(-1)
        ext.fp8_gemm_force_tile(0, 0)


def mn_major_scales(sa):
    """sa [.., M, K/128] re-laid MN-major and TMA-aligned: stride(-2) 1, stride(-1) M rounded up to 4, the
    padding rows NaN (they must never be read)."""
    *lead, m, kb = sa.shape
    pad = -(-m // 4) * 4
    buffer = torch.full((*lead, kb, pad), float("nan"), dtype=sa.dtype, device=sa.device)
    view = buffer.transpose(-1, -2)[..., :m, :]
    view.copy_(sa)
    return view


@pytest.mark.parametrize("lead,m,kb", [((), 1, 4), ((), 7, 3), ((), 64, 56), ((), 130, 1), ((3,), 33, 12),
                                       ((1,), 5, 2), ((2,), 8, 1)])
def test_scale_a_layout_and_offsets_match_torch_strides(lead, m, kb):
    ext = _extension()
    row_major = torch.zeros(*lead, m, kb)
    mn = mn_major_scales(row_major)
    assert ext.fp8_gemm_scale_a_layout(list(row_major.shape), list(row_major.stride())) == 0
    expected_mn = 0 if kb == 1 else 1  # one K block: both layouts place the scales alike, contiguous
    assert ext.fp8_gemm_scale_a_layout(list(mn.shape), list(mn.stride())) == expected_mn
    groups = lead[0] if lead else 1
    for layout, t in ((0, row_major), (1, mn)):
        strides = t.stride() if lead else (0,) + t.stride()
        for g in range(groups):
            for row in {0, m // 2, m - 1}:
                for k in {0, kb - 1}:
                    want = g * strides[0] + row * strides[1] + k * strides[2]
                    assert ext.fp8_gemm_scale_a_offset(layout, g, row, k, m, kb) == want


@pytest.mark.parametrize("shape,strides", [((7, 3), (1, 7)), ((7, 3), (3, 2)), ((8, 3), (1, 12)),
                                           ((2, 5, 3), (16, 1, 8)), ((2, 5, 3), (24, 1, 4)), ((4, 3), (2, 8))])
def test_scale_a_layout_rejects_other_strides(shape, strides):
    ext = _extension()
    assert ext.fp8_gemm_scale_a_layout(list(shape), list(strides)) == -1


def _fake_gemm_args(m=7, n=256, k=384, sa_strides=None, sa_ptr=0x40000):
    from test_foundation import FakeCudaArray, FakeCudaDLPack

    kb = k // 128
    a = FakeCudaDLPack((m, k), 10, 8)
    b = FakeCudaDLPack((n, k), 10, 8, ptr=0x80000)
    sa = FakeCudaArray((m, kb), "<f4", ptr=sa_ptr, strides=sa_strides)
    sb = FakeCudaArray((-(-n // 128), kb), "<f4", ptr=0x60000)
    out = FakeCudaDLPack((m, n), 4, 16, ptr=0xa0000)
    return a, sa, b, sb, out


def test_launcher_accepts_either_scale_layout_and_rejects_others():
    """Both A-scale layouts pass every check (the call then fails only at the device query, as no driver
    exists here); other strides and a misaligned MN-major base are rejected naming sa."""
    ext = _extension()
    m, kb, pad = 7, 3, 8
    for strides in (None, (4, 4 * pad)):  # bytes: row-major contiguous, MN-major with M_pad = 8
        with pytest.raises(ext.CudaError, match="cudaGetDevice"):
            ext.fp8_gemm_nt(*_fake_gemm_args(m=m, sa_strides=strides), 0)
    with pytest.raises(ValueError, match=r"sa: expected the scales of a row-major \(contiguous\) or MN-major "
                                         r"TMA-aligned \(stride\(-2\) 1, stride\(-1\) M rounded up to 4 = 8\), "
                                         r"got shape \[7, 3\] with strides \(1, 7\)"):
        ext.fp8_gemm_nt(*_fake_gemm_args(m=m, sa_strides=(4, 4 * m)), 0)
    with pytest.raises(ValueError, match="sa: expected a data pointer aligned to 16 bytes"):
        ext.fp8_gemm_nt(*_fake_gemm_args(m=m, sa_strides=(4, 4 * pad), sa_ptr=0x40004), 0)
    # Row-major scales need only float alignment.
    with pytest.raises(ext.CudaError, match="cudaGetDevice"):
        ext.fp8_gemm_nt(*_fake_gemm_args(m=m, sa_ptr=0x40004), 0)


def _launch(name, *args):
    """The extension's launcher itself, on the current stream: the A-scale layouts are its contract (the
    public API may still insist on contiguous scales)."""
    ext = _extension()
    getattr(ext, name)(*args, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (37, 576, 1536), (300, 4096, 512), (129, 7168, 2048)])
def test_gpu_mn_major_scales_plain(m, n, k):
    (a, sa), (b, sb) = _blocky_problem(m, n, k)
    for scales in (sa, mn_major_scales(sa)):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        _launch("fp8_gemm_nt", a, scales, b, sb, out)
        assert_close_to_dequantized(out, a, sa, b, sb)


@pytest.mark.gpu
def test_gpu_mn_major_scales_grouped():
    groups, n, k = 3, 1536, 1024
    idx = contiguous_indices([130, 0, 77]).cuda()
    m_total = idx.numel()
    (a, sa), _ = _blocky_problem(m_total, 128, k)
    ws = [_blocky_problem(1, n, k)[1] for _ in range(groups)]
    b, sb = torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws])
    out = torch.full((m_total, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    _launch("m_grouped_fp8_gemm_nt_contiguous", a, mn_major_scales(sa), b, sb, idx, out)
    for g in (0, 2):
        rows = idx == g
        assert_close_to_dequantized(out[rows], a[rows], sa[rows], b[g], sb[g])
    assert bool((out[idx == -1].float() == 0).all())
    m_max = 70
    masked = torch.tensor([70, 0, 33], dtype=torch.int32, device="cuda")
    pairs = [_blocky_problem(m_max, 128, k)[0] for _ in range(groups)]
    a3, sa3 = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    out3 = torch.full((groups, m_max, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    _launch("m_grouped_fp8_gemm_nt_masked", a3, mn_major_scales(sa3), b, sb, masked, 64, out3)
    for g, rows in enumerate(masked.tolist()):
        assert bool((out3[g, rows:].float() == 0).all())
        if rows:
            assert_close_to_dequantized(out3[g, :rows], a3[g, :rows], sa3[g, :rows], b[g], sb[g])


# ---- CUDA kernel: rows without data are written as zeros ------------------------------------------------

@pytest.mark.parametrize("layout,m_rows,n,groups,info", SCHEDULES)
@pytest.mark.parametrize("bm,bn", [(64, 56), (128, 144)])
@pytest.mark.parametrize("num_ctas", [1, 5, 132])
def test_scheduler_zero_tiles_cover_every_row_without_data(layout, m_rows, n, groups, info, bm, bn, num_ctas):
    """With zero tiles, the walk covers the whole output once: every row block of every masked group (the
    blocks past masked_m as zero tiles, dealt after all computed tiles) and every contiguous block whose
    first row is padding (-1)."""
    ext = _extension()
    per_cta = ext.fp8_gemm_tile_order(layout, m_rows, n, groups, bm, bn, num_ctas, info, include_zero_tiles=True)
    computed_only = ext.fp8_gemm_tile_order(layout, m_rows, n, groups, bm, bn, num_ctas, info)
    assert [[t[:4] for t in tiles if not t[4]] for tiles in per_cta] == computed_only
    visited = [(t[0], t[1], t[2]) for tiles in per_cta for t in tiles]
    assert len(visited) == len(set(visited)), "a tile was visited twice"
    m_blocks, n_blocks = -(-m_rows // bm), -(-n // bn)
    if layout == 0:
        expected = {(0, mb, nb): False for mb in range(m_blocks) for nb in range(n_blocks)}
    elif layout == 1:
        expected = {(info[mb * bm], mb, nb): info[mb * bm] == -1 for mb in range(m_blocks) for nb in range(n_blocks)
                    if -1 <= info[mb * bm] < groups}
    else:
        expected = {(g, mb, nb): mb * bm >= info[g] for g in range(groups) for mb in range(m_blocks)
                    for nb in range(n_blocks)}
    assert {(t[0], t[1], t[2]): t[4] for tiles in per_cta for t in tiles} == expected
    if layout == 2:
        for tiles in per_cta:  # each CTA's computed tiles come before its zero tiles
            flags = [t[4] for t in tiles]
            assert flags == sorted(flags)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [712, 713])  # TMA-store and register-store epilogues
@pytest.mark.parametrize("block_m", [64, 128])
def test_gpu_contiguous_padding_rows_are_zero(block_m, n):
    """The whole output is compared: padding rows (m_indices -1, inside a group's last block and whole
    padding blocks) come back as zeros over a NaN-poisoned buffer."""
    ext = _extension()
    groups, k = 3, 512
    idx = contiguous_indices([77, 0, 130], trailing_padding_blocks=1).cuda()
    m_total = idx.numel()
    (a, sa), _ = _blocky_problem(m_total, 128, k)
    ws = [_blocky_problem(1, n, k)[1] for _ in range(groups)]
    b, sb = torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws])
    out = torch.full((m_total, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    ext.fp8_gemm_force_tile(block_m, 56)
    try:
        pykernels.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), idx, out=out, backend="cuda")
        torch.cuda.synchronize()
    finally:
        ext.fp8_gemm_force_tile(0, 0)
    assert bool((out[idx == -1].float() == 0).all())
    for g in (0, 2):
        rows = idx == g
        assert_close_to_dequantized(out[rows], a[rows], sa[rows], b[g], sb[g])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1000, 1001])  # TMA-store and register-store epilogues
@pytest.mark.parametrize("expected_m", [16, 100])
def test_gpu_masked_rows_past_masked_m_are_zero(expected_m, n):
    groups, m_max, k = 4, 200, 384
    pairs = [_blocky_problem(m_max, 128, k)[0] for _ in range(groups)]
    a, sa = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    ws = [_blocky_problem(1, n, k)[1] for _ in range(groups)]
    b, sb = torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws])
    masked = torch.tensor([0, 1, 130, 200], dtype=torch.int32, device="cuda")
    out = torch.full((groups, m_max, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    pykernels.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), masked, expected_m, out=out, backend="cuda")
    torch.cuda.synchronize()
    for g, rows in enumerate(masked.tolist()):
        assert bool((out[g, rows:].float() == 0).all())
        if rows:
            assert_close_to_dequantized(out[g, :rows], a[g, :rows], sa[g, :rows], b[g], sb[g])


# ---- CUDA kernel: the epilogue's stmatrix -> shared-memory tile -> TMA store --------------------------------

GEMM_WIDTHS = [16, 32, 48, 56, 64, 96, 112, 128, 144, 160, 192]


def tma_swizzled_byte(swizzle_bytes, row_bytes, row, byte):
    """Where TMA puts byte `byte` of box row `row` in shared memory, as the CUDA programming guide's swizzle
    patterns describe it: the box is a stream of swizzle-span-long lines; within a line the 16-byte units
    are permuted by XOR with the line index (128 B: line % 8), every second line (64 B: line // 2 % 4) or
    every fourth (32 B: line // 4 % 2), the pattern repeating every 1024, 512 or 256 bytes. No swizzle:
    rows back to back."""
    linear = row * row_bytes + byte
    if swizzle_bytes == 0:
        return linear
    line, unit, within = linear // swizzle_bytes, linear % swizzle_bytes // 16, linear % 16
    pattern = {128: line % 8, 64: line // 2 % 4, 32: line // 4 % 2}[swizzle_bytes]
    return line * swizzle_bytes + (unit ^ pattern) * 16 + within


def test_tma_box_offset_is_the_documented_swizzle():
    ext = _extension()
    for swizzle, row_bytes in ((128, 128), (64, 64), (32, 32), (0, 112), (0, 32)):
        got = [ext.fp8_gemm_tma_box_offset(swizzle, row_bytes, r, b) for r in range(64) for b in range(row_bytes)]
        assert got == [tma_swizzled_byte(swizzle, row_bytes, r, b) for r in range(64) for b in range(row_bytes)]
        assert sorted(got) == list(range(64 * row_bytes))  # a permutation of the box
    with pytest.raises(ValueError, match="swizzle_bytes, row_bytes, row, byte: expected a span of 0, 32, 64 or 128"):
        ext.fp8_gemm_tma_box_offset(128, 256, 0, 0)
    with pytest.raises(ValueError, match="swizzle_bytes, row_bytes, row, byte: expected"):
        ext.fp8_gemm_tma_box_offset(16, 16, 0, 0)


@pytest.mark.parametrize("block_n", GEMM_WIDTHS)
def test_output_tile_boxes_fit_tma_and_prefer_the_widest_swizzle(block_n):
    ext = _extension()
    tile = ext.fp8_gemm_output_tile(block_n)
    swizzle, box_cols, boxes = tile["swizzle_bytes"], tile["box_cols"], tile["boxes"]
    assert tile["rows"] == 64 and tile["tile_bytes"] == 64 * block_n * 2 and tile["tile_bytes"] % 1024 == 0
    assert box_cols * boxes == block_n and box_cols * 2 % 16 == 0 and box_cols <= 256
    if swizzle:
        assert box_cols * 2 == swizzle  # a box row is exactly the span
        # Each box starts 1024-byte aligned (the tile is), so on its swizzle pattern's period (8 lines of
        # the span): TMA swizzles by shared-memory address bits.
        assert all(b * 64 * box_cols * 2 % 1024 == 0 for b in range(boxes))
        # No wider span divides the row.
        assert all(block_n * 2 % wider for wider in (32, 64, 128) if wider > swizzle)
    else:
        assert block_n * 2 % 32 and boxes == 1
    if block_n % 64 == 0:
        assert swizzle == 128
    with pytest.raises(ValueError, match="block_n: expected an instantiated BLOCK_N"):
        ext.fp8_gemm_output_tile(block_n + 1)


@pytest.mark.parametrize("block_n", GEMM_WIDTHS)
def test_epilogue_stmatrix_lands_where_the_tma_store_reads(block_n):
    """The epilogue's stmatrix against the TMA store, per width: every accumulator element of every thread
    of the warpgroup is written at exactly the byte the output tensor map's box and swizzle read for its
    (row, column), each byte once, and each stmatrix phase (8 row addresses of one 8x8 matrix) covers 8
    distinct 16-byte bank groups. Ownership is modeled from the PTX ISA: the wgmma m64nN f32 fragment (warp
    w, lane t, register 4j+{0,1}: row 16w + t/4, columns 8j + 2(t%4) + {0,1}; 4j+{2,3}: row + 8), and
    stmatrix (lane i gives row i % 8 of matrix i / 8; thread t's register q lands in matrix q, row t / 4,
    bytes 4(t%4)..+3). The kernel (stage_output) passes registers 4j..4j+7 as an x4's matrices 0..3, and an
    odd last chunk's 4j..4j+3 as an x2's."""
    ext = _extension()
    tile = ext.fp8_gemm_output_tile(block_n)
    swizzle, box_cols = tile["swizzle_bytes"], tile["box_cols"]

    def tma_byte(row, col):
        return col // box_cols * 64 * box_cols * 2 + tma_swizzled_byte(swizzle, box_cols * 2, row, col % box_cols * 2)

    written = {}
    chunks = block_n // 8
    for warp in range(4):
        for j in range(0, chunks, 2):
            matrices = 4 if j + 1 < chunks else 2
            lanes = [ext.fp8_gemm_stsm_lane_offset(block_n, warp, i, j) for i in range(8 * matrices)]
            for q in range(matrices):
                phase = lanes[8 * q:8 * q + 8]
                assert all(a % 16 == 0 for a in phase), (warp, j, q)  # stmatrix rows are 16-byte aligned
                assert len({a // 16 % 8 for a in phase}) == 8, f"bank conflict: warp {warp} chunk {j} matrix {q}"
            for t in range(32):
                for q in range(matrices):
                    for e in range(2):
                        register = 4 * j + 2 * q + e
                        row = 16 * warp + t // 4 + 8 * (register % 4 // 2)
                        col = 8 * (register // 4) + 2 * (t % 4) + register % 2
                        byte = lanes[8 * q + t // 4] + 4 * (t % 4) + 2 * e
                        assert byte == tma_byte(row, col), (warp, t, register)
                        assert byte not in written, f"byte {byte} written twice"
                        written[byte] = (row, col)
    assert sorted(written) == list(range(0, tile["tile_bytes"], 2))  # every element of the tile once
    assert all(ext.fp8_gemm_output_tile_offset(block_n, r, c) == tma_byte(r, c)
               for r in range(64) for c in range(block_n))


def test_output_tile_bindings_reject_out_of_range_arguments():
    ext = _extension()
    for args in ((64, 64, 0), (64, 0, 64), (64, -1, 0)):
        with pytest.raises(ValueError, match="row, col: expected a row in"):
            ext.fp8_gemm_output_tile_offset(*args)
    for args in ((64, 4, 0, 0), (64, 0, 32, 0), (64, 0, 0, 8), (56, 0, 0, 7)):
        with pytest.raises(ValueError, match="warp, lane, chunk: expected"):
            ext.fp8_gemm_stsm_lane_offset(*args)


def test_tma_store_is_chosen_only_for_outputs_a_tensor_map_can_take():
    """N bf16 a multiple of 16 bytes and a 16-byte aligned base; anything else takes the register stores."""
    ext = _extension()
    for n in (8, 16, 56, 712, 1000, 7168):
        assert ext.fp8_gemm_output_tma_storable(n, 1 << 20)
        assert not ext.fp8_gemm_output_tma_storable(n, (1 << 20) + 4)
        assert not ext.fp8_gemm_output_tma_storable(n, (1 << 20) + 8)
    for n in (1, 2, 4, 41, 713, 1001, 7170):
        assert not ext.fp8_gemm_output_tma_storable(n, 1 << 20)


def test_audit_requires_stmatrix_and_tma_stores_in_the_gemm():
    """The op's audit expectation rejects a GEMM kernel whose epilogue lost its stmatrix or its TMA store."""
    from pykernels import fp8_gemm as op

    expect = op.CUDA_AUDIT["fp8_gemm_kernel"]
    body = ["QGMMA.64x16x32.F32.E4M3.E4M3 R24, gdesc[UR8], RZ, !UPT", "UTMALDG.3D [UR8], [UR4]",
            "STG.E desc[UR4][R2.64], R5", "EXIT"]
    listing = _sass("\n".join(f"{16 * i:x}: {line}" for i, line in enumerate(body)))
    report = audit.KernelReport(name="fp8_gemm_kernel<1, 16>", source="cuda",
                                instructions=dict(audit.parse_sass(listing)["_Zfake"]))
    audit.check_expectations(report, expect)
    assert "expected at least 1 UTMASTG, found 0" in report.failures
    assert "expected at least 1 STSM, found 0" in report.failures
    body[2:3] = ["STSM.16.M88.4 [R8], R80", "STSM.16.M88.2 [R55], R2", "FENCE.VIEW.ASYNC.S",
                 "UTMASTG.3D [UR20], [UR16]", "UTMACMDFLUSH"]
    listing = _sass("\n".join(f"{16 * i:x}: {line}" for i, line in enumerate(body)))
    report.instructions = dict(audit.parse_sass(listing)["_Zfake"])
    report.failures = []
    assert report.instructions["STSM"] == 2 and report.instructions["UTMASTG"] == 1
    audit.check_expectations(report, expect)
    assert report.failures == []


# The epilogue as ptxas lays it out (fp8_gemm_kernel<2, 56>): the leader's wait for the previous stores'
# reads, barrier, stmatrix, proxy fence, barrier, the store loop, and after the tile loop the final wait.
TMA_STORE_EPILOGUE = [
    "BSSY B2, 0x5d10", "@P0 BRA 0x5d00", "DEPBAR.LE SB0, 0x0", "BSYNC B2", "WARPSYNC.ALL",
    "BAR.SYNC.DEFER_BLOCKING R12, 0x80", "F2FP.BF16.F32.PACK_AB R2, R80, R83", "STSM.16.M88.4 [R6], R80",
    "STSM.16.M88.4 [R6+0x20], R76", "STSM.16.M88.2 [R55], R2", "MEMBAR.ALL.CTA", "FENCE.VIEW.ASYNC.S",
    "BAR.SYNC.DEFER_BLOCKING R12, 0x80", "@P0 BRA 0x200", "UTMASTG.3D [UR20], [UR16]", "@P1 BRA.U.ANY 0xe0",
    "UTMACMDFLUSH", "BRA 0x0", "@P0 EXIT", "DEPBAR.LE SB0, 0x0", "CCTL.IVALL", "EXIT",
]


def _store_order_failures(body):
    listing = _sass("\n".join(f"{16 * i:x}: {line}" for i, line in enumerate(body)))
    return audit.tma_store_protocol_failures(audit.parse_listing(listing)["_Zfake"])


def test_audit_tma_store_protocol_rejects_each_missing_fence_barrier_and_wait():
    """Each ordering step the epilogue needs, removed from the compiled epilogue's shape, is reported; the
    intact epilogue and a kernel without TMA stores pass."""
    assert _store_order_failures(TMA_STORE_EPILOGUE) == []
    assert _store_order_failures([line for line in TMA_STORE_EPILOGUE if "UTMASTG" not in line]) == []

    def without(index):
        return TMA_STORE_EPILOGUE[:index] + TMA_STORE_EPILOGUE[index + 1:]

    fence, barrier_after, wait_before, barrier_before, final_wait = 11, 12, 2, 5, 19
    assert "FENCE.VIEW.ASYNC.S then BAR.SYNC" in " ".join(_store_order_failures(without(fence)))
    assert "FENCE.VIEW.ASYNC.S then BAR.SYNC" in " ".join(_store_order_failures(without(barrier_after)))
    # The barrier ahead of the fence orders nothing the store reads.
    swapped = TMA_STORE_EPILOGUE[:fence] + [TMA_STORE_EPILOGUE[barrier_after], TMA_STORE_EPILOGUE[fence]] + \
        TMA_STORE_EPILOGUE[barrier_after + 1:]
    assert "FENCE.VIEW.ASYNC.S then BAR.SYNC" in " ".join(_store_order_failures(swapped))
    assert "follows no wait" in " ".join(_store_order_failures(without(wait_before)))
    # A wait for all but the newest group does not cover the single output tile.
    partial = TMA_STORE_EPILOGUE[:wait_before] + ["DEPBAR.LE SB0, 0x1"] + TMA_STORE_EPILOGUE[wait_before + 1:]
    assert "follows no wait" in " ".join(_store_order_failures(partial))
    assert "no barrier before it" in " ".join(_store_order_failures(without(barrier_before)))
    assert _store_order_failures(without(final_wait)) == [
        "no EXIT right after a wait for the TMA stores (DEPBAR.LE SB0, 0x0)"]
    # The op declares the protocol, so check_expectations reports it.
    report = audit.KernelReport(name="fp8_gemm_kernel<1, 56>", source="cuda",
                                instructions={"QGMMA": 1, "UTMALDG": 1, "UTMASTG": 1, "STSM": 3},
                                tma_store_order=_store_order_failures(without(fence)))
    from pykernels import fp8_gemm as op

    audit.check_expectations(report, op.CUDA_AUDIT["fp8_gemm_kernel"])
    assert len(report.failures) == 1 and report.failures[0].startswith("TMA store order: UTMASTG at 0xd0")


def test_audit_every_gemm_instantiation_stages_its_output_with_stmatrix_and_tma():
    """The built extension (static SASS counts): one STSM per two 8-column chunks (x4, an x2 for an odd
    last chunk) and one UTMASTG per store box, in every tile shape."""
    ext = _extension()
    gemm = [r for r in audit._reports_from_binary(ext.__file__, "cuda") if "fp8_gemm_kernel<" in r.name]
    assert len(gemm) == sum(len(shapes) for shapes in pykernels.fp8_gemm.GEMM_INSTANTIATIONS.values())
    for r in gemm:
        block_n = int(r.name.split("fp8_gemm_kernel<", 1)[1].split(",")[1].split(">")[0])
        assert r.instructions.get("STSM") == -(-block_n // 16), r.name
        assert r.instructions.get("UTMASTG") == ext.fp8_gemm_output_tile(block_n)["boxes"], r.name
        assert r.tma_store_order == [], r.name


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["tma", "odd_n", "misaligned"])
@pytest.mark.parametrize("layout", ["plain", "contiguous", "masked"])
@pytest.mark.parametrize("block_m,block_n", [(64, 16), (128, 56), (128, 160), (128, 192)])
def test_gpu_epilogue_paths_on_every_layout(layout, store, block_m, block_n):
    """Both epilogues on each layout, with several tiles per CTA (a TMA store still in flight while the next
    tile's result is staged into the same shared-memory tile): the TMA store for N % 8 == 0 and a 16-byte
    aligned output, the register stores for an odd N or an output 4 bytes off 16-byte alignment. The whole
    NaN-poisoned buffer is checked: computed rows against float64, the rest zeros, and nothing written
    outside the output (masked groups end at M_max: TMA clips each group's rows)."""
    ext = _extension()
    n, k = (1001 if store == "odd_n" else 1000), 256
    if layout == "plain":
        (a, sa), (b, sb) = _blocky_problem(300, n, k)
        shape = (300, n)
    elif layout == "contiguous":
        idx = contiguous_indices([200, 0, 77], trailing_padding_blocks=1).cuda()
        (a, sa), _ = _blocky_problem(idx.numel(), 128, k)
        ws = [_blocky_problem(1, n, k)[1] for _ in range(3)]
        b, sb = torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws])
        shape = (idx.numel(), n)
    else:
        groups, m_max = 3, 200
        pairs = [_blocky_problem(m_max, 128, k)[0] for _ in range(groups)]
        a, sa = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        ws = [_blocky_problem(1, n, k)[1] for _ in range(groups)]
        b, sb = torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws])
        masked = torch.tensor([200, 0, 131], dtype=torch.int32, device="cuda")
        shape = (groups, m_max, n)
    numel = math.prod(shape)
    offset = 2 if store == "misaligned" else 0  # 2 bf16: 4-byte aligned, not 16
    buffer = torch.full((numel + 16,), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = buffer[offset:offset + numel].view(shape)
    assert ext.fp8_gemm_output_tma_storable(n, out.data_ptr()) == (store == "tma")
    ext.fp8_gemm_force_tile(block_m, block_n)
    try:
        if layout == "plain":
            pykernels.fp8_gemm_nt((a, sa), (b, sb), out=out, backend="cuda")
        elif layout == "contiguous":
            pykernels.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), idx, out=out, backend="cuda")
        else:
            pykernels.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), masked, 100, out=out, backend="cuda")
        torch.cuda.synchronize()
    finally:
        ext.fp8_gemm_force_tile(0, 0)
    assert bool(buffer[:offset].isnan().all()) and bool(buffer[offset + numel:].isnan().all())
    if layout == "plain":
        assert_close_to_dequantized(out, a, sa, b, sb)
    elif layout == "contiguous":
        assert bool((out[idx == -1].float() == 0).all())
        for g in (0, 2):
            rows = idx == g
            assert_close_to_dequantized(out[rows], a[rows], sa[rows], b[g], sb[g])
    else:
        for g, rows in enumerate(masked.tolist()):
            assert bool((out[g, rows:].float() == 0).all())
            if rows:
                assert_close_to_dequantized(out[g, :rows], a[g, :rows], sa[g, :rows], b[g], sb[g])
