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


_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype, _new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype, _capsule_is_valid.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # DLManagedTensor deleter and capsule destructor alike


class FakeCudaDLPack:
    """A DLPack producer claiming CUDA memory that does not exist, for dtypes __cuda_array_interface__
    cannot express (bfloat16, float8). Codes from dlpack.h: float 2, bfloat 4, float8_e4m3fn 10. The
    keyword arguments make it malformed: another device type, an ndim that disagrees with the shape array,
    no shape array at all (shape=None), explicit strides, a null data pointer."""

    def __init__(self, shape, code, bits, ptr=0x20000, device_type=2, ndim=None, strides=None):
        self._shape = None if shape is None else (ctypes.c_int64 * len(shape))(*shape)
        self._strides = None if strides is None else (ctypes.c_int64 * len(strides))(*strides)
        self._managed = _DLManagedTensor()
        t = self._managed.dl_tensor
        t.data, t.device = ptr, _DLDevice(device_type, 0)
        t.ndim = ndim if ndim is not None else len(shape)
        t.dtype, t.shape, t.strides, t.byte_offset = _DLDataType(code, bits, 1), self._shape, self._strides, 0

    def __dlpack__(self, stream=None):
        return _new_capsule(ctypes.addressof(self._managed), b"dltensor", None)


_DL_INT = {torch.int64: (0, 64), torch.int32: (0, 32), torch.float32: (2, 32)}


class FreshBufferDLPack:
    """A CPU DLPack producer that exports a new buffer at every __dlpack__ (as a producer that converts on
    export does) and lets it go when the consumer releases the capsule: its deleter copies the buffer into
    `released` and then scribbles over it, as free() and the next malloc() may. A consumer that releases the
    capsule before it is done reads the scribbles and its writes are lost from `released`."""

    def __init__(self, values: torch.Tensor):
        self.values = values.contiguous()
        self.released = []
        self._exports = []  # the ctypes objects of every export, so that scribbling never touches freed memory

    def __dlpack__(self, stream=None):
        nbytes = self.values.numel() * self.values.element_size()
        buf = (ctypes.c_uint8 * nbytes).from_buffer_copy(self.values.numpy().tobytes())
        shape = (ctypes.c_int64 * self.values.dim())(*self.values.shape)
        managed = _DLManagedTensor()
        t = managed.dl_tensor
        t.data, t.device, t.ndim = ctypes.addressof(buf), _DLDevice(1, 0), self.values.dim()
        t.dtype, t.shape, t.strides, t.byte_offset = _DLDataType(*_DL_INT[self.values.dtype], 1), shape, None, 0

        def deleter(_):
            self.released.append(torch.frombuffer(bytearray(buf), dtype=self.values.dtype).reshape(self.values.shape))
            ctypes.memset(buf, 0x5A, nbytes)

        def destructor(capsule):
            if _capsule_is_valid(capsule, b"dltensor"):  # not consumed: releasing it is the capsule's job
                deleter(None)

        callbacks = (_CALLBACK(deleter), _CALLBACK(destructor))
        managed.deleter = ctypes.cast(callbacks[0], ctypes.c_void_p)
        self._exports.append((buf, shape, managed, callbacks))
        return _new_capsule(ctypes.addressof(managed), b"dltensor", ctypes.cast(callbacks[1], ctypes.c_void_p))


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


@needs_ext
def test_capsules_and_their_buffers_live_until_the_call_returns():
    # moe_plan_expert_ranks reads topk_idx and writes counts and rank on the host. With every tensor a fresh
    # export, a capsule released early shows as scribbled ids (rejected) or as writes missing below.
    topk_idx = torch.tensor([[0, 2], [1, -1], [2, 2], [0, 1]], dtype=torch.int64)
    ids, counts, rank = (FreshBufferDLPack(t) for t in (topk_idx, torch.full((3,), -7, dtype=torch.int64),
                                                        torch.full((4, 2), -7, dtype=torch.int32)))
    EXT.moe_plan_expert_ranks(ids, counts, rank)
    assert len(counts.released) == 1 and len(rank.released) == 1, "each capsule is released exactly once"
    assert counts.released[0].tolist() == [2, 2, 3]
    assert rank.released[0].tolist() == [[0, 0], [0, -1], [1, 2], [1, 1]]


# Malformed producers, each run in a child process: a regression here is a segfault, not an exception.
MALFORMED_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
from test_foundation import EXT, FakeCudaDLPack, FakeCudaArray

class Raw:
    def __init__(self, cai):
        self.__cuda_array_interface__ = cai

CAI = {{"shape": (4, 8), "typestr": "<f4", "data": (0x10000, False), "version": 3}}
cases = {{
    "null shape": FakeCudaDLPack(None, 2, 32, ndim=2),
    "negative ndim": FakeCudaDLPack((4,), 2, 32, ndim=-1),
    "nine dims": FakeCudaDLPack((1,) * 9, 2, 32),
    "negative size": FakeCudaDLPack((4, -8), 2, 32),
    "null data": FakeCudaDLPack((4, 8), 2, 32, ptr=0),
    "overflowing shape": FakeCudaDLPack((2**62, 8), 2, 32),
    "overflowing strides": FakeCudaDLPack((4, 8), 2, 32, strides=(2**62, 1)),
    "rocm": FakeCudaDLPack((4,), 2, 32, device_type=10),
    "unknown device": FakeCudaDLPack((4,), 2, 32, device_type=99),
    "cai not a dict": Raw([1, 2]),
    "cai without typestr": Raw({{k: v for k, v in CAI.items() if k != "typestr"}}),
    "cai without shape": Raw({{k: v for k, v in CAI.items() if k != "shape"}}),
    "cai without data": Raw({{k: v for k, v in CAI.items() if k != "data"}}),
    "cai typestr not a str": Raw(dict(CAI, typestr=4)),
    "cai shape of floats": Raw(dict(CAI, shape=(4.0, 8))),
    "cai huge size": Raw(dict(CAI, shape=(2**70, 8))),
    "cai short data": Raw(dict(CAI, data=(0x10000,))),
    "cai data a list": Raw(dict(CAI, data=[0x10000, False])),
    "cai pointer a str": Raw(dict(CAI, data=("0x10000", False))),
    "cai strides too short": Raw(dict(CAI, strides=(4,))),
    "cai negative size": Raw(dict(CAI, shape=(4, -1))),
    "cai null data": Raw(dict(CAI, data=(0, False))),
    "cai mask": Raw(dict(CAI, mask=object())),
}}
out = {{}}
for name, obj in cases.items():
    print(name, flush=True)  # the last name printed is the culprit if the process dies
    try:
        EXT.describe_tensor(obj)
        out[name] = ["no error", ""]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print("RESULT " + json.dumps(out))
"""

MALFORMED_EXPECTED = {
    "null shape": ("ValueError", "tensor: expected a DLPack tensor with a shape array, got a null shape for 2 dimensions"),
    "negative ndim": ("ValueError", "tensor: expected 0 to 8 dimensions, got -1"),
    "nine dims": ("ValueError", "tensor: expected 0 to 8 dimensions, got 9"),
    "negative size": ("ValueError", "tensor: expected non-negative sizes, got size -8 in dim 1"),
    "null data": ("ValueError", "tensor: expected a data pointer for 32 elements, got a null pointer"),
    "overflowing shape": ("ValueError", "tensor: expected at most 2^63 - 1 elements"),
    "overflowing strides": ("ValueError", "tensor: expected strides whose extent fits in 64 bits"),
    "rocm": ("ValueError", "tensor: expected a tensor on cpu or cuda, got a tensor on rocm:0"),
    "unknown device": ("ValueError", "tensor: expected a tensor on cpu or cuda, got a tensor on DLPack device type 99:0"),
    "cai not a dict": ("TypeError", "tensor: expected a __cuda_array_interface__ dict, got list"),
    "cai without typestr": ("ValueError", "tensor: expected a __cuda_array_interface__ with 'typestr', got none"),
    "cai without shape": ("ValueError", "tensor: expected a __cuda_array_interface__ with 'shape', got none"),
    "cai without data": ("ValueError", "tensor: expected a __cuda_array_interface__ with 'data', got none"),
    "cai typestr not a str": ("TypeError", "tensor: expected __cuda_array_interface__['typestr'] a str, got int"),
    "cai shape of floats": ("TypeError", "tensor: expected __cuda_array_interface__['shape'][0] as an int, got float"),
    "cai huge size": ("ValueError", "tensor: expected __cuda_array_interface__['shape'][0] within 64 bits"),
    "cai short data": ("ValueError", "tensor: expected __cuda_array_interface__['data'] as (pointer, read_only)"),
    "cai data a list": ("TypeError", "tensor: expected __cuda_array_interface__['data'] a tuple"),
    "cai pointer a str": ("TypeError", "tensor: expected __cuda_array_interface__['data'][0] as an int, got str"),
    "cai strides too short": ("ValueError", "tensor: expected __cuda_array_interface__['strides'] as None or a tuple of 2"),
    "cai negative size": ("ValueError", "tensor: expected non-negative sizes, got size -1 in dim 1"),
    "cai null data": ("ValueError", "tensor: expected a data pointer for 32 elements, got a null pointer"),
    "cai mask": ("ValueError", "tensor: expected a __cuda_array_interface__ without a mask, got a mask"),
}


@needs_ext
def test_malformed_producers_raise_in_the_projects_form():
    script = MALFORMED_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    assert proc.returncode == 0, f"the boundary crashed (exit {proc.returncode}) on: {last[0]}\n{proc.stderr[-2000:]}"
    got = json.loads(last[0].removeprefix("RESULT "))
    assert set(got) == set(MALFORMED_EXPECTED)
    for name, (kind, message) in MALFORMED_EXPECTED.items():
        assert got[name][0] == kind and got[name][1].startswith(message), (name, got[name])


@needs_ext
def test_dlpack_device_types_are_reported_truthfully():
    pinned = FakeCudaDLPack((4,), 2, 32, device_type=3)
    assert EXT.describe_tensor(pinned)["device"] == "cuda_host"
    with pytest.raises(ValueError, match="x: expected a CUDA tensor, got a tensor on cuda_host"):
        EXT.per_token_group_quant_fp8(FakeCudaDLPack((4, 128), 2, 32, device_type=3), FakeCudaDLPack((4, 128), 10, 8),
                                      FakeCudaArray((4, 1), "<f4"), 128, False, 0)
    with pytest.raises(ValueError, match=r"tensor: expected a tensor that __dlpack__\(\) can export, got BufferError"):
        EXT.describe_tensor(torch.empty(4, device="meta"))

