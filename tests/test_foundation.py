"""The package itself: the extension's boundary (DLPack and __cuda_array_interface__), its error
translation, the backend report, and the static audit."""

import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

import pykernels
from pykernels import _backend

EXT, EXT_WHY = _backend.extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"CUDA extension not built: {EXT_WHY}")


class FakeCudaArray:
    """Speaks only __cuda_array_interface__ (as Numba or CuPy arrays do), pointing at memory that does not
    exist: every check must fire before anything is launched."""

    def __init__(self, shape, typestr, ptr=0x10000, strides=None):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                         "strides": strides, "version": 3}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class FakeCudaDLPack:
    """A DLPack producer claiming CUDA memory that does not exist, for dtypes __cuda_array_interface__
    cannot express (bfloat16, float8). Codes from dlpack.h: float 2, bfloat 4, float8_e4m3fn 10."""

    def __init__(self, shape, code, bits, ptr=0x20000):
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._managed = _DLManagedTensor()
        t = self._managed.dl_tensor
        t.data, t.device, t.ndim = ptr, _DLDevice(2, 0), len(shape)
        t.dtype, t.shape, t.strides, t.byte_offset = _DLDataType(code, bits, 1), self._shape, None, 0

    def __dlpack__(self, stream=None):
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype, new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new_capsule(ctypes.addressof(self._managed), b"dltensor", None)


def test_build_info_is_recorded():
    info_path = os.path.join(os.path.dirname(pykernels.__file__), "_build_info.json")
    if EXT is not None:
        assert EXT.compiled_archs == ("sm_90a",)
    else:
        assert os.path.isfile(info_path), "a pure-Python install records why the extension is missing"
        assert json.load(open(info_path))["cuda_extension"] is False


def test_backends_report_says_what_and_why():
    report = pykernels.backends()
    assert set(report) >= {"cuda", "triton", "torch", "gpus"}
    assert report["torch"]["available"] is True
    assert report["cuda"]["extension_built"] == (EXT is not None)
    if not report["cuda"]["available"]:
        assert report["cuda"]["reason"]
    if not torch.cuda.is_available():
        assert report["triton"]["interpreter"] is True  # conftest set TRITON_INTERPRET=1


@needs_ext
def test_device_info_never_raises():
    info = EXT.device_info()
    assert info["runtime_version"] >= 12030
    if not torch.cuda.is_available():
        assert info["devices"] == [] and info["error"]


@needs_ext
@pytest.mark.parametrize("dtype,name", [(torch.float32, "float32"), (torch.float16, "float16"),
                                        (torch.bfloat16, "bfloat16"), (torch.float8_e4m3fn, "float8_e4m3fn"),
                                        (torch.float8_e5m2, "float8_e5m2"), (torch.int32, "int32"),
                                        (torch.int64, "int64"), (torch.uint8, "uint8"), (torch.bool, "bool")])
def test_dlpack_boundary_reads_every_dtype(dtype, name):
    base = torch.zeros(6, 10, dtype=torch.float32).to(dtype)
    view = base[1:5, 2:9:3]  # non-contiguous, offset view
    d = EXT.describe_tensor(view)
    assert d["dtype"] == name
    assert d["shape"] == (4, 3) and d["strides"] == (10, 3)
    assert d["device"] == "cpu"
    assert d["data_ptr"] == view.data_ptr()


@needs_ext
def test_cuda_array_interface_boundary():
    fake = FakeCudaArray((4, 8), "<f2", strides=(32, 2))
    d = EXT.describe_tensor(fake)
    assert d["dtype"] == "float16" and d["shape"] == (4, 8) and d["strides"] == (16, 1)
    assert d["device"].startswith("cuda")
    with pytest.raises(TypeError, match="tensor: expected a supported __cuda_array_interface__ typestr"):
        EXT.describe_tensor(FakeCudaArray((4,), "<c8"))
    with pytest.raises(TypeError, match="tensor: expected a tensor supporting __dlpack__"):
        EXT.describe_tensor(object())


@needs_ext
def test_launcher_checks_raise_before_launch():
    f32, fp8 = "<f4", "|u1"
    x, q, s = FakeCudaArray((4, 256), f32), FakeCudaArray((4, 256), fp8), FakeCudaArray((4, 2), f32)
    with pytest.raises(TypeError, match="out: expected dtype float8_e4m3fn, got uint8"):
        EXT.per_token_group_quant_fp8(x, q, s, 128, False, 0)
    # torch fp8 on the CPU passes the dtype check; the device check must stop it.
    q_cpu = torch.empty(4, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="out: expected a tensor on cuda"):
        EXT.per_token_group_quant_fp8(x, q_cpu, s, 128, False, 0)
    with pytest.raises(TypeError, match="x: expected dtype float32, float16 or bfloat16, got int32"):
        EXT.per_token_group_quant_fp8(FakeCudaArray((4, 256), "<i4"), q, s, 128, False, 0)
    with pytest.raises(ValueError, match="group_size: expected a power of two, got 100"):
        EXT.per_token_group_quant_fp8(torch.zeros(4, 256), q_cpu, torch.zeros(4, 2), 100, False, 0)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor, got a tensor on cpu"):
        EXT.per_token_group_quant_fp8(torch.zeros(4, 256), q_cpu, torch.zeros(4, 2), 128, False, 0)
    with pytest.raises(ValueError, match="w: expected 2 or 3 dimensions"):
        EXT.per_block_quant_fp8(FakeCudaArray((256,), f32), FakeCudaDLPack((256,), 10, 8), s, 128, False, 0)
    with pytest.raises(ValueError, match=r"scales: expected size 2 in dim 1 \(ceil\(K / group_size\)\)"):
        EXT.per_token_group_quant_fp8(x, FakeCudaDLPack((4, 256), 10, 8), FakeCudaArray((4, 3), f32), 128, False, 0)
    with pytest.raises(ValueError, match=r"out: expected size 256 in dim 1 \(same as x\)"):
        EXT.per_token_group_quant_fp8(x, FakeCudaDLPack((4, 255), 10, 8), s, 128, False, 0)


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="would launch on fake pointers; the no-driver path is tested")
def test_cuda_errors_become_exceptions_naming_the_call():
    # Every argument is valid, so the launcher goes on to ask the runtime for the device, which has no driver.
    bf16_x = FakeCudaDLPack((2, 128, 128), 4, 16)
    q = FakeCudaDLPack((2, 128, 128), 10, 8)
    s = FakeCudaArray((2, 1, 1), "<f4")
    with pytest.raises(RuntimeError, match=r"cudaGetDevice\(&device\) failed: cudaError") as info:
        EXT.per_token_group_quant_fp8(bf16_x, q, FakeCudaArray((2, 128, 1), "<f4"), 128, False, 0)
    assert isinstance(info.value, EXT.CudaError)
    # The block quantizer's grid does not depend on the device, so its launch itself is what fails.
    with pytest.raises(EXT.CudaError, match="launch of per_block_quant_fp8_kernel failed"):
        EXT.per_block_quant_fp8(bf16_x, q, s, 128, False, 0)


def test_audit_passes_and_covers_the_quantizers():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pykernels.audit", "--json"], capture_output=True, text=True,
                          env=env, timeout=1200)
    result = json.loads(proc.stdout)
    failures = [(k["name"], k["failures"]) for k in result["kernels"] if k["failures"]]
    assert proc.returncode == 0 and result["ok"], (failures, result["problems"])
    names = [k["name"] for k in result["kernels"]]
    assert any("per_token_group_quant_fp8_kernel[" in n for n in names)  # Triton, AOT for sm_90
    assert any("per_block_quant_fp8_kernel[" in n for n in names)
    for k in result["kernels"]:
        assert k["local_bytes"] == 0 and k["stack_bytes"] == 0, k["name"]
    if EXT is not None:
        cuda = [k for k in result["kernels"] if k["source"] == "cuda"]
        assert any("per_token_group_quant_fp8_kernel<__nv_bfloat16, 8" in k["name"] and k["instructions"].get("LDG.128")
                   for k in cuda), "the bf16 quantizer must use 16-byte loads"


def test_every_kernel_launch_makes_the_inputs_device_current(monkeypatch):
    """Triton and the extension launch on the current CUDA device; each op must switch to its inputs'
    device first (inputs on cuda:1 while cuda:0 is current would otherwise launch on the wrong GPU). On
    the CPU the guard is recorded instead of entered: each op's Triton path must pass through it."""
    import contextlib

    seen = []
    monkeypatch.setattr(_backend, "on_device", lambda device: seen.append((device.type, device.index))
                        or contextlib.nullcontext())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = (dev.type, dev.index)

    x = torch.randn(3, 256, device=dev, dtype=torch.bfloat16)
    a = pykernels.per_token_group_quant_fp8(x, backend="triton")
    b = pykernels.per_block_quant_fp8(torch.randn(128, 256, device=dev), backend="triton")
    pykernels.fp8_gemm_nt(a, b, backend="triton")
    idx = torch.tensor([[0, 1], [1, -1], [0, 0]], device=dev)
    x_sorted, _, perm = pykernels.permute_to_experts(x, idx, backend="triton")
    pykernels.unpermute_from_experts(x_sorted, perm, torch.ones(3, 2, device=dev), backend="triton")
    kv = torch.randn(2, 64, 1, 576, device=dev, dtype=torch.bfloat16)
    q = torch.randn(1, 1, 3, 576, device=dev, dtype=torch.bfloat16)
    pykernels.mla_decode(q, kv, torch.tensor([[1, 0]], dtype=torch.int32, device=dev),
                         torch.tensor([70], dtype=torch.int32, device=dev), backend="triton")
    assert len(seen) >= 6 and all(s == expected for s in seen), seen
