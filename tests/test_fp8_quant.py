"""FP8 quantizers: the reference against float64 arithmetic, then every backend against the reference.

Tolerances: scales must equal the reference's bit for bit on every backend (same float32 operations). FP8
values must too, except that a hardware conversion may round a value lying exactly between two e4m3 codes
differently: such values may differ by one e4m3 step (one unit in the last place of the code), and only
rarely (at most 0.1% of elements).
"""

import math

import pytest
import torch

import pykernels
from pykernels.reference import fp8_quant as ref
from test_foundation import EXT, FakeCudaArray, FakeCudaDLPack, needs_ext

FP8 = torch.float8_e4m3fn
# (leading shape, K, group_size): odd row counts, K with partial last groups, several group sizes.
TOKEN_CASES = [((1,), 128, 128), ((7,), 300, 128), ((3, 5), 1000, 128), ((33,), 7168, 128), ((4,), 96, 32),
               ((2,), 1, 128), ((9,), 520, 256), ((5,), 40, 16)]
BLOCK_CASES = [((128, 128), 128), ((300, 520), 128), ((3, 129, 257), 128), ((2, 64, 96), 32), ((1, 7), 128)]


def float64_token_groups(x, group_size, ue8m0):
    """Scales and dequantization bounds from float64 math, independent of the reference's code path."""
    x64 = x.double()
    k = x.shape[-1]
    groups = math.ceil(k / group_size)
    scales = torch.empty((*x.shape[:-1], groups), dtype=torch.float64)
    for g in range(groups):
        amax = x64[..., g * group_size:(g + 1) * group_size].abs().amax(dim=-1)
        s = torch.clamp(amax, min=1e-4) / 448.0
        if ue8m0:
            s = torch.pow(2.0, torch.ceil(torch.log2(s)))
        scales[..., g] = s
    return scales


def fp8_step_distance(a, b):
    """How many e4m3 codes apart two fp8 tensors are, element-wise (sign-magnitude codes)."""
    def ordinal(t):
        u = t.view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u & 0x80 != 0, -mag, mag)
    return (ordinal(a) - ordinal(b)).abs()


def assert_fp8_close(got, want):
    dist = fp8_step_distance(got, want)
    assert int(dist.max()) <= 1, f"fp8 values differ by {int(dist.max())} steps"
    assert int((dist > 0).sum()) <= max(1, want.numel() // 1000), f"{int((dist > 0).sum())} elements differ by one step"


def random_input(shape, dtype):
    x = torch.randn(shape, dtype=torch.float32) * torch.exp(torch.randn(shape[:-1] + (1,)) * 2)
    return x.to(dtype)


@pytest.mark.parametrize("lead,k,group_size", TOKEN_CASES)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_reference_token_groups_vs_float64(lead, k, group_size, ue8m0):
    x = random_input(lead + (k,), torch.float32)
    q, s = ref.per_token_group_quant_fp8(x, group_size, ue8m0)
    s64 = float64_token_groups(x, group_size, ue8m0)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == s64.shape
    # float32 division of float32 inputs is correctly rounded: within one float32 ulp of float64 math.
    torch.testing.assert_close(s.double(), s64, rtol=2 ** -23, atol=0)
    # e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4); subnormals are 2^-9 apart.
    scale_per_elem = s.double().repeat_interleave(group_size, dim=-1)[..., :k]
    err = (q.double() * scale_per_elem - x.double()).abs()
    bound = x.double().abs() * 2 ** -4 + scale_per_elem * 2 ** -10
    assert bool((err <= bound * (1 + 1e-12)).all())
    if ue8m0:
        assert bool((torch.frexp(s)[0] == 0.5).all()), "ue8m0 scales must be powers of two"


def test_reference_zero_and_partial_groups():
    x = torch.zeros(3, 300)
    x[1, 256:] = torch.randn(44)  # only the partial last group of row 1 is non-zero
    q, s = ref.per_token_group_quant_fp8(x, 128)
    assert s.shape == (3, 3)
    floor = torch.tensor(1e-4, dtype=torch.float32) / 448.0
    assert bool((s[0] == floor).all()) and bool((q[0].float() == 0).all())
    assert float(s[1, 2]) == pytest.approx(float(x[1, 256:].abs().max()) / 448.0, rel=1e-6)
    assert float(q[1, 256:].float().abs().max()) == 448.0


@pytest.mark.parametrize("shape,block", BLOCK_CASES)
def test_reference_blocks_vs_float64(shape, block):
    w = random_input(shape, torch.float32)
    q, s = ref.per_block_quant_fp8(w, block)
    w3 = w.double().reshape((-1,) + tuple(shape[-2:]))
    n, k = shape[-2:]
    want = torch.empty((w3.shape[0], math.ceil(n / block), math.ceil(k / block)), dtype=torch.float64)
    for i in range(want.shape[1]):
        for j in range(want.shape[2]):
            amax = w3[:, i * block:(i + 1) * block, j * block:(j + 1) * block].abs().amax(dim=(1, 2))
            want[:, i, j] = torch.clamp(amax, min=1e-4) / 448.0
    torch.testing.assert_close(s.double().reshape(want.shape), want, rtol=2 ** -23, atol=0)
    deq = ref.dequantize_blocks(q, s, block).double()
    per_elem = (deq - w.double()).abs()
    assert bool((per_elem <= w.double().abs() * 2 ** -4 + float(s.max()) * 2 ** -10).all())


BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,k,group_size", TOKEN_CASES)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_token_groups_match_reference(backend, dtype, lead, k, group_size, ue8m0, device):
    x = random_input(lead + (k,), dtype).to(device)
    x.view(-1)[::97] = 0.0  # exact zeros alongside large values
    q, s = pykernels.per_token_group_quant_fp8(x, group_size, ue8m0, backend=backend)
    q_ref, s_ref = ref.per_token_group_quant_fp8(x.cpu(), group_size, ue8m0)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == s_ref.shape
    assert torch.equal(s.cpu(), s_ref)
    assert_fp8_close(q.cpu(), q_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,block", BLOCK_CASES)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_blocks_match_reference(backend, dtype, shape, block, ue8m0, device):
    w = random_input(shape, dtype).to(device)
    q, s = pykernels.per_block_quant_fp8(w, block, ue8m0, backend=backend)
    q_ref, s_ref = ref.per_block_quant_fp8(w.cpu(), block, ue8m0)
    assert torch.equal(s.cpu(), s_ref)
    assert_fp8_close(q.cpu(), q_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_groups(backend, device):
    x = torch.zeros(5, 260, dtype=torch.bfloat16, device=device)
    q, s = pykernels.per_token_group_quant_fp8(x, backend=backend)
    assert bool((s == torch.tensor(1e-4) / 448.0).all().cpu()) and bool((q.float() == 0).all().cpu())


def test_launches_switch_to_the_inputs_device():
    # Both backends launch on the current device; an input on another GPU must make its device current.
    from pykernels._backend import on_device

    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with on_device(torch.device("cpu")):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_input_on_a_device_that_is_not_current(backend):
    x = random_input((33, 520), torch.bfloat16).to("cuda:1")
    w = random_input((2, 300, 256), torch.bfloat16).to("cuda:1")
    with torch.cuda.device(0):
        q, s = pykernels.per_token_group_quant_fp8(x, backend=backend)
        qw, sw = pykernels.per_block_quant_fp8(w, backend=backend)
    torch.cuda.synchronize(1)
    q_ref, s_ref = ref.per_token_group_quant_fp8(x.cpu(), 128, False)
    qw_ref, sw_ref = ref.per_block_quant_fp8(w.cpu(), 128, False)
    assert q.device == x.device and qw.device == w.device
    assert torch.equal(s.cpu(), s_ref) and torch.equal(sw.cpu(), sw_ref)
    assert_fp8_close(q.cpu(), q_ref)
    assert_fp8_close(qw.cpu(), qw_ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_before_launch(backend):
    with pytest.raises(TypeError, match="x: expected dtype"):
        pykernels.per_token_group_quant_fp8(torch.ones(4, 128, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="x: expected a non-empty last dimension"):
        pykernels.per_token_group_quant_fp8(torch.ones(4, 0), backend=backend)
    with pytest.raises(ValueError, match="group_size: expected a power of two, got 96"):
        pykernels.per_token_group_quant_fp8(torch.ones(4, 128), group_size=96, backend=backend)
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        pykernels.per_token_group_quant_fp8(torch.ones(128, 4).t(), backend=backend)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        pykernels.per_token_group_quant_fp8([1.0, 2.0], backend=backend)
    with pytest.raises(ValueError, match="w: expected 2 or 3 dimensions"):
        pykernels.per_block_quant_fp8(torch.ones(128), backend=backend)
    with pytest.raises(ValueError, match="block_size: expected a power of two, got 100"):
        pykernels.per_block_quant_fp8(torch.ones(128, 128), block_size=100, backend=backend)
    with pytest.raises(ValueError, match="backend: expected one of"):
        pykernels.per_token_group_quant_fp8(torch.ones(4, 128), backend="cudnn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only machine gives")
def test_explicit_cuda_backend_without_gpu_says_why():
    with pytest.raises(RuntimeError, match="backend='cuda' needs"):
        pykernels.per_token_group_quant_fp8(torch.ones(4, 128), backend="cuda")


# ---- non-finite input: the rule in pykernels/reference/fp8_quant.py, on every backend ------------------

def poison_groups(x, group_size):
    """Puts NaN, +inf, -inf and NaN-with-inf into chosen groups of x [rows, K]; returns the expected scale
    kind per (row, group): 'nan', 'inf' or None (finite)."""
    kinds = {}
    rows, k = x.shape
    groups = math.ceil(k / group_size)
    picks = [(0, 0, [float("nan")]), (1, groups - 1, [float("inf")]), (2, 0, [-float("inf")]),
             (rows - 1, groups - 1, [float("nan"), float("inf")])]
    for row, g, values in picks:
        cols = torch.randperm(min(group_size, k - g * group_size))[:len(values)] + g * group_size
        for col, v in zip(cols.tolist(), values):
            x[row, col] = v
        kinds[(row, g)] = "nan" if any(math.isnan(v) for v in values) else "inf"
    return kinds


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_non_finite_groups_are_nan(backend, ue8m0, device):
    x = random_input((5, 300), torch.float32)
    kinds = poison_groups(x, 128)
    clean = x.clone()
    for (row, g) in kinds:
        clean[row, g * 128:(g + 1) * 128] = 1.0
    q, s = pykernels.per_token_group_quant_fp8(x.to(device).bfloat16(), 128, ue8m0, backend=backend)
    q, s = q.cpu(), s.cpu()
    q_clean, s_clean = ref.per_token_group_quant_fp8(clean.bfloat16(), 128, ue8m0)
    for row in range(5):
        for g in range(3):
            codes = q[row, g * 128:(g + 1) * 128].float()
            kind = kinds.get((row, g))
            if kind is None:
                assert float(s[row, g]) == float(s_clean[row, g]), (row, g)
                assert_fp8_close(q[row, g * 128:(g + 1) * 128], q_clean[row, g * 128:(g + 1) * 128])
                continue
            assert bool(codes.isnan().all()), f"group ({row}, {g}) holding {kind} must quantize to NaN codes"
            if kind == "nan":
                assert math.isnan(float(s[row, g]))
            else:
                assert float(s[row, g]) == float("inf")
    deq = ref.dequantize_token_groups(q, s, 128)
    assert bool(deq[0, :128].isnan().all()) and bool(deq[1, 256:].isnan().all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_non_finite_blocks_are_nan(backend, ue8m0, device):
    w = random_input((2, 100, 200), torch.float32)
    w[0, 70, 150] = float("nan")  # block (0, 0, 1)
    w[1, 3, 4] = -float("inf")  # block (1, 0, 0)
    q, s = pykernels.per_block_quant_fp8(w.to(device), 64, ue8m0, backend=backend)
    q, s = q.cpu().float(), s.cpu()
    assert math.isnan(float(s[0, 1, 2])) and float(s[1, 0, 0]) == float("inf")
    assert bool(q[0, 64:100, 128:192].isnan().all()) and bool(q[1, :64, :64].isnan().all())
    finite = torch.isfinite(s)
    assert int(finite.sum()) == s.numel() - 2 and not bool(q[0, :64].isnan().any())


def test_reference_non_finite_rule_keeps_ue8m0_scales_non_finite():
    # Bumping the exponent field of NaN's bits gives -0.0, and dividing by it +-448 codes: the rule forbids it.
    amax = torch.tensor([float("nan"), float("inf"), 3.0, 0.0])
    for ue8m0 in (False, True):
        s = ref.scale_from_amax(amax, ue8m0)
        assert math.isnan(float(s[0])) and float(s[1]) == float("inf") and bool(torch.isfinite(s[2:]).all())


# ---- DeepGEMM's column-major, TMA-aligned activation scales ------------------------------------------

def expected_column_major_strides(lead, groups):
    *batch, m = lead
    m_pad = -(-m // 4) * 4
    strides = [1, m_pad]
    step = m_pad * groups
    for b in reversed(batch):
        strides.insert(0, step)
        step *= b
    return tuple(strides)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,k", [((7,), 300), ((1,), 128), ((3, 5), 520), ((2, 9), 256)])
def test_column_major_scales(backend, lead, k, device):
    x = random_input(lead + (k,), torch.bfloat16).to(device)
    q, s = pykernels.per_token_group_quant_fp8(x, 128, False, column_major_scales=True, backend=backend)
    q_ref, s_ref = ref.per_token_group_quant_fp8(x.cpu(), 128, False)
    groups = math.ceil(k / 128)
    assert s.shape == lead + (groups,)
    assert s.stride() == expected_column_major_strides(lead, groups)
    assert s.stride(-2) == 1 and s.stride(-1) % 4 == 0 and s.data_ptr() % 16 == 0
    assert torch.equal(s.cpu(), s_ref)
    assert_fp8_close(q.cpu(), q_ref)


def test_triton_writes_column_major_scales_through_strides_only(device):
    from pykernels.triton import fp8_quant as tri

    x = random_input((2, 7, 300), torch.float32).to(device)
    s = ref.empty_token_group_scales((2, 7), 3, True, x.device)
    storage = torch.as_strided(s, (s.untyped_storage().nbytes() // 4,), (1,))
    storage.fill_(float("nan"))  # poison: every scale must be written, the padding rows never
    q = torch.full(x.shape, float("nan"), dtype=FP8, device=device)
    tri.per_token_group_quant_fp8(x, q, s, 128, True, column_major_scales=True)
    _, s_ref = ref.per_token_group_quant_fp8(x.cpu(), 128, True)
    assert torch.equal(s.cpu(), s_ref)
    padding = storage.view(2, 3, 8)[:, :, 7:].cpu()
    assert bool(padding.isnan().all()), "the padding rows of M_pad must stay untouched"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_flags_and_sizes_say_which_argument(backend):
    x = torch.randn(3, 256)
    with pytest.raises(TypeError, match="ue8m0: expected a bool, got str 'no'"):
        pykernels.per_token_group_quant_fp8(x, 128, "no", backend=backend)
    with pytest.raises(TypeError, match="ue8m0: expected a bool"):
        pykernels.per_block_quant_fp8(x, 128, 1, backend=backend)
    with pytest.raises(TypeError, match="column_major_scales: expected a bool"):
        pykernels.per_token_group_quant_fp8(x, column_major_scales="yes", backend=backend)
    with pytest.raises(ValueError, match=r"group_size: expected an int in \[1, 2147483647\], got 1099511627776"):
        pykernels.per_token_group_quant_fp8(x, group_size=2**40, backend=backend)
    with pytest.raises(ValueError, match=r"block_size: expected an int in \[1, 2147483647\], got -128"):
        pykernels.per_block_quant_fp8(x, block_size=-128, backend=backend)
    with pytest.raises(ValueError, match="x: expected at least 2 dimensions"):
        pykernels.per_token_group_quant_fp8(torch.randn(256), column_major_scales=True, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_group_wider_than_the_row_is_the_whole_row(backend, device):
    # A huge power-of-two group must neither allocate nor tile 2**30 elements: one group covers the row.
    x = random_input((3, 200), torch.float32)
    q, s = pykernels.per_token_group_quant_fp8(x.to(device), group_size=2**30, backend=backend)
    q_ref, s_ref = ref.per_token_group_quant_fp8(x, 256)
    assert s.shape == (3, 1) and torch.equal(s.cpu(), s_ref)
    assert_fp8_close(q.cpu(), q_ref)
    w = random_input((40, 70), torch.float32)
    qw, sw = pykernels.per_block_quant_fp8(w.to(device), block_size=2**30, backend=backend)
    qw_ref, sw_ref = ref.per_block_quant_fp8(w, 128)
    assert sw.shape == (1, 1) and torch.equal(sw.cpu(), sw_ref)
    assert_fp8_close(qw.cpu(), qw_ref)


# ---- the CUDA path's column-major layout and launcher checks, on the host ---------------------------

def fake_scales(shape, strides, ptr=0x40000):
    """float32 CUDA memory that does not exist, with element strides."""
    return FakeCudaArray(shape, "<f4", ptr=ptr, strides=tuple(4 * s for s in strides))


@needs_ext
@pytest.mark.parametrize("lead,groups", [((7,), 3), ((1,), 1), ((3, 5), 2), ((2, 8), 4)])
def test_cuda_scale_layout_is_the_torch_layout(lead, groups):
    rows = math.prod(lead)
    for column_major in (False, True):
        (m, batch_stride, row_stride, group_stride), offsets = EXT.token_group_scale_layout(
            rows, lead[-1], groups, column_major)
        s = ref.empty_token_group_scales(lead, groups, column_major, "cpu")
        # The element each (row, group) scale lands on, as torch addresses the tensor the wrapper allocates.
        elements = torch.arange(s.untyped_storage().nbytes() // 4)
        want = elements.as_strided(s.shape, s.stride()).reshape(rows, groups).flatten().tolist()
        assert offsets == want
        assert len(set(offsets)) == rows * groups  # no scale written twice


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="would launch on fake pointers; the no-driver path is tested")
def test_cuda_launcher_checks_column_major_scales():
    x, q = FakeCudaArray((2, 7, 300), "<f4"), FakeCudaDLPack((2, 7, 300), 10, 8)
    good = fake_scales((2, 7, 3), (24, 1, 8))
    # Valid arguments get past every check to the runtime, which has no driver here.
    with pytest.raises(EXT.CudaError, match="cudaGetDevice"):
        EXT.per_token_group_quant_fp8(x, q, good, 128, False, 0, column_major_scales=True)
    with pytest.raises(ValueError, match=r"scales: expected column-major strides \[24, 1, 8\] \(M padded to 4\), "
                                         r"got strides \[21, 3, 1\]"):
        EXT.per_token_group_quant_fp8(x, q, fake_scales((2, 7, 3), (21, 3, 1)), 128, False, 0,
                                      column_major_scales=True)
    with pytest.raises(ValueError, match=r"scales: expected column-major strides \[24, 1, 8\]"):
        EXT.per_token_group_quant_fp8(x, q, fake_scales((2, 7, 3), (21, 1, 7)), 128, False, 0,
                                      column_major_scales=True)  # M not padded
    with pytest.raises(ValueError, match="scales: expected a data pointer aligned to 16 bytes"):
        EXT.per_token_group_quant_fp8(x, q, fake_scales((2, 7, 3), (24, 1, 8), ptr=0x40004), 128, False, 0,
                                      column_major_scales=True)
    with pytest.raises(ValueError, match="scales: expected a contiguous tensor"):
        EXT.per_token_group_quant_fp8(x, q, good, 128, False, 0)  # row-major wanted
    rows = 2**31  # past what the scale offsets' 32-bit division covers
    with pytest.raises(ValueError, match="x: expected at most 2\\^31 - 1 rows with column-major scales, got 2147483648"):
        EXT.per_token_group_quant_fp8(FakeCudaArray((rows, 128), "<f4"), FakeCudaDLPack((rows, 128), 10, 8),
                                      fake_scales((rows, 1), (1, rows)), 128, False, 0, column_major_scales=True)
    with pytest.raises(ValueError, match=r"x: expected at least 2 dimensions \(\[..., M, K\]\) for column-major"):
        EXT.per_token_group_quant_fp8(FakeCudaArray((300,), "<f4"), FakeCudaDLPack((300,), 10, 8), fake_scales((3,), (1,)),
                                      128, False, 0, column_major_scales=True)

