"""Foreign arrays (pykernels/interop.py): every public op takes DLPack and __cuda_array_interface__ producers
zero-copy and answers in the caller's kind. NumPy is the real DLPack producer on the CPU; a minimal
producer library checks the from_dlpack rule with every dtype; the fake CUDA producers of test_foundation
check what a CPU-only torch does with CUDA memory; CuPy runs on a GPU."""

import sys
import types

import numpy as np
import pytest
import torch

import pykernels
from pykernels import interop
from conftest import HAS_GPU
from test_foundation import FakeCudaArray, FakeCudaDLPack


def _tensor(array):
    return interop.to_torch(array, "array")


def test_numpy_round_trip_matches_torch_and_shares_memory():
    x = np.random.default_rng(1).standard_normal((5, 300)).astype(np.float32) * 3
    w = np.random.default_rng(2).standard_normal((130, 300 // 128 * 128)).astype(np.float32)
    x = np.ascontiguousarray(x[:, :256])
    q, s = pykernels.per_token_group_quant_fp8(x, backend="torch")
    assert isinstance(q, np.ndarray) and q.dtype == np.uint8 and s.dtype == np.float32  # fp8 as its bits
    tq, ts = pykernels.per_token_group_quant_fp8(torch.from_numpy(x), backend="torch")
    assert torch.equal(_tensor(q), tq) and torch.equal(torch.from_numpy(s), ts)
    wq = pykernels.per_block_quant_fp8(w, backend="torch")
    out = np.full((5, 130), 0x7FC0, dtype=np.uint16)  # bf16 NaN bits
    assert _tensor(out).data_ptr() == out.ctypes.data  # zero-copy in
    result = pykernels.fp8_gemm_nt((q, s), wq, out=out, backend="torch")
    assert result is out  # the caller's buffer comes back as itself, written in place
    want = pykernels.fp8_gemm_nt((tq, ts), pykernels.per_block_quant_fp8(torch.from_numpy(w), backend="torch"))
    assert torch.equal(_tensor(out), want)
    fresh = pykernels.fp8_gemm_nt((q, s), wq, backend="torch")
    assert isinstance(fresh, np.ndarray) and fresh.dtype == np.uint16 and torch.equal(_tensor(fresh), want)


def test_numpy_through_moe_and_mla():
    idx = np.array([[0, 1], [1, -1], [0, 0]], dtype=np.int64)
    x = torch.randn(3, 256).to(torch.bfloat16)
    x_sorted, m_indices, perm = pykernels.permute_to_experts(x.view(torch.uint16).numpy(), idx, alignment=16)
    want_sorted, want_m, want_perm = pykernels.permute_to_experts(x, torch.from_numpy(idx), alignment=16)
    assert isinstance(x_sorted, np.ndarray) and isinstance(perm, np.ndarray)
    assert torch.equal(_tensor(x_sorted), want_sorted) and torch.equal(torch.from_numpy(m_indices), want_m)
    weights = np.random.default_rng(3).random((3, 2)).astype(np.float32)
    y = pykernels.unpermute_from_experts(x_sorted, perm, weights)
    assert torch.equal(_tensor(y), pykernels.unpermute_from_experts(want_sorted, want_perm, torch.from_numpy(weights)))

    q = torch.randn(1, 1, 3, 576).to(torch.bfloat16)
    kv = torch.randn(2, 64, 1, 576).to(torch.bfloat16)
    table, lengths = np.array([[1, 0]], dtype=np.int32), np.array([70], dtype=np.int32)
    schedule = pykernels.get_mla_metadata(lengths, 3, 1)
    assert isinstance(schedule, pykernels.MlaSchedule)
    out, lse = pykernels.mla_decode(q.view(torch.uint16).numpy(), kv.view(torch.uint16).numpy(), table, lengths,
                                    metadata=schedule)
    want_out, want_lse = pykernels.mla_decode(q, kv, torch.from_numpy(table), torch.from_numpy(lengths))
    assert torch.equal(_tensor(out), want_out) and torch.equal(torch.from_numpy(lse), want_lse)


class _Producer:
    """A foreign array whose library has from_dlpack and every dtype: wraps a tensor, speaks only DLPack."""

    def __init__(self, tensor):
        self._tensor = tensor

    def __dlpack__(self, stream=None, **kwargs):
        return self._tensor.__dlpack__()

    def __dlpack_device__(self):
        return self._tensor.__dlpack_device__()


@pytest.fixture
def producer_library(monkeypatch):
    library = types.ModuleType("arraylib")
    library.from_dlpack = lambda obj: _Producer(torch.from_dlpack(obj))
    monkeypatch.setattr(_Producer, "__module__", "arraylib")
    monkeypatch.setitem(sys.modules, "arraylib", library)
    return library


def test_outputs_go_back_through_the_callers_library(producer_library):
    x = torch.randn(4, 256).to(torch.bfloat16)
    q, s = pykernels.per_token_group_quant_fp8(_Producer(x), backend="torch")
    assert type(q) is _Producer and type(s) is _Producer
    assert _tensor(q).dtype == torch.float8_e4m3fn  # a library that holds float8 gets float8
    want_q, want_s = pykernels.per_token_group_quant_fp8(x, backend="torch")
    assert torch.equal(_tensor(q).view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(_tensor(s), want_s)
    assert _tensor(q).data_ptr() == torch.from_dlpack(q).data_ptr()


def test_argument_errors_name_the_argument():
    with pytest.raises(TypeError, match="x: expected dtype float32 or float16 or bfloat16, got int32"):
        pykernels.per_token_group_quant_fp8(np.zeros((2, 128), dtype=np.int32))
    with pytest.raises(TypeError, match="masked_m: expected dtype int32, got int64"):
        a = pykernels.per_token_group_quant_fp8(torch.randn(2, 3, 128))
        b = pykernels.per_block_quant_fp8(torch.randn(2, 8, 128))
        pykernels.m_grouped_fp8_gemm_nt_masked(a, b, np.array([1, 2]), 2)


@pytest.mark.skipif(HAS_GPU, reason="checks what a CPU-only torch does with CUDA memory")
def test_cuda_producers_without_cuda_say_which_argument():
    with pytest.raises(ValueError, match=r"x: expected an array torch can import zero-copy through "
                                         r"__cuda_array_interface__, got a .*FakeCudaArray"):
        pykernels.per_token_group_quant_fp8(FakeCudaArray((4, 256), "<f4"))
    w = FakeCudaDLPack((128, 256), 4, 16)
    w.__dlpack_device__ = lambda: (2, 0)
    with pytest.raises(ValueError, match=r"w: expected an array torch can import zero-copy through __dlpack__"):
        pykernels.per_block_quant_fp8(w)
    a = pykernels.per_token_group_quant_fp8(torch.randn(2, 128))
    with pytest.raises(ValueError, match=r"b_pair\[1\]: expected an array torch can import"):
        pykernels.fp8_gemm_nt(a, (torch.zeros(8, 128, dtype=torch.float8_e4m3fn), FakeCudaArray((1, 1), "<f4")))


def test_torch_tensors_pass_untouched():
    x = torch.randn(3, 128)
    calls = []
    wrapped = interop.accepts_foreign_arrays(lambda t, *rest: calls.append(t) or t)
    assert wrapped(x, 1, None, "s") is x and calls == [x]


@pytest.mark.gpu
def test_gpu_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    x = cupy.random.standard_normal((37, 512), dtype=cupy.float32)
    w = cupy.random.standard_normal((200, 512), dtype=cupy.float32)
    a, b = pykernels.per_token_group_quant_fp8(x), pykernels.per_block_quant_fp8(w)
    assert isinstance(a[0], cupy.ndarray) and isinstance(b[1], cupy.ndarray)
    d = pykernels.fp8_gemm_nt(a, b)
    assert isinstance(d, cupy.ndarray)
    tx, tw = torch.from_dlpack(x), torch.from_dlpack(w)
    want = pykernels.fp8_gemm_nt(pykernels.per_token_group_quant_fp8(tx), pykernels.per_block_quant_fp8(tw))
    assert torch.equal(_tensor(d), want)
    out = cupy.empty((37, 200), dtype=cupy.uint16)
    assert pykernels.fp8_gemm_nt(a, b, out=out) is out and torch.equal(_tensor(out), want)
