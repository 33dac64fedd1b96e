"""Which backends can run here, and the choice each op makes between them.

backend="auto" picks cuda when the extension is built for sm_90a and a compute-capability 9.0 GPU holds
the tensors, else triton on a GPU (or on CPU tensors under TRITON_INTERPRET=1), else torch. An explicit
backend that cannot run raises RuntimeError saying why; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
_PACKAGE_DIR = Path(__file__).resolve().parent


def triton_interpret() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1 at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def extension():
    """(module, None) when pykernels._C imports, else (None, reason)."""
    try:
        from pykernels import _C
    except ImportError as exc:
        info_path = _PACKAGE_DIR / "_build_info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            if not info.get("cuda_extension", False):
                return None, f"pykernels was installed without the CUDA extension ({info.get('reason')})"
        return None, f"pykernels._C failed to import: {exc}"
    return _C, None


@functools.lru_cache(maxsize=None)
def triton_module():
    """(triton, None) when Triton imports, else (None, reason)."""
    try:
        import triton
    except ImportError as exc:
        return None, f"triton is not importable: {exc}"
    return triton, None


def _gpu_description() -> str:
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU visible to torch"
    names = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        names.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return "this machine has " + ", ".join(names)


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """Why backend='cuda' cannot run on tensors living on `device`, or None when it can."""
    ext, why = extension()
    if ext is None:
        return f"backend='cuda' needs pykernels._C: {why}"
    if device.type != "cuda":
        return f"backend='cuda' needs CUDA tensors, got tensors on {device}; {_gpu_description()}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return (f"backend='cuda' needs a compute-capability 9.0 (Hopper) GPU for its sm_90a kernels; "
                f"{device} is {torch.cuda.get_device_name(device)} (sm_{major}{minor})")
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why backend='triton' cannot run on tensors living on `device`, or None when it can."""
    _, why = triton_module()
    if why is not None:
        return f"backend='triton' needs Triton: {why}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return (f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"pykernels is imported; got tensors on {device}")


def resolve(backend: str, device: torch.device, op: str, cuda_ok: bool = True, triton_ok: bool = True) -> str:
    """The backend an op call runs on. `cuda_ok` / `triton_ok` let an op declare a backend it lacks
    for this particular call (for example a dtype one backend does not cover)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    reasons = {
        "cuda": cuda_unavailable_reason(device) if cuda_ok else f"{op} has no CUDA kernel for these arguments",
        "triton": triton_unavailable_reason(device) if triton_ok else f"{op} has no Triton kernel for these arguments",
        "torch": None,
    }
    if backend == "auto":
        for candidate in ("cuda", "triton", "torch"):
            if reasons[candidate] is None:
                # Under the interpreter Triton is a verification tool, far slower than torch on CPU.
                if candidate == "triton" and device.type == "cpu":
                    continue
                return candidate
        return "torch"
    if reasons[backend] is not None:
        raise RuntimeError(f"{op}: {reasons[backend]}")
    return backend


def on_device(device: torch.device):
    """Makes `device` the current CUDA device for a launch (a no-op for CPU tensors). Triton launches, and
    the extension's launchers size grids and set kernel attributes, on the current device, while the stream
    they are given belongs to the tensors' device: the two must agree when the inputs are not on the
    current GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def current_stream(device: torch.device) -> int:
    """The caller's current CUDA stream on `device`, as the integer handle the extension takes."""
    return torch.cuda.current_stream(device).cuda_stream


def backends() -> dict:
    """What can run on this machine and why not: the extension (built? for which archs?), Triton (and
    whether it interprets), the GPUs (names and compute capabilities)."""
    ext, ext_why = extension()
    triton, triton_why = triton_module()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                         "sm_count": props.multi_processor_count})
    hopper = any(g["capability"] == "9.0" for g in gpus)
    report = {
        "cuda": {
            "available": ext is not None and hopper,
            "extension_built": ext is not None,
            "archs": list(ext.compiled_archs) if ext is not None else [],
            "reason": (ext_why if ext is None else
                       None if hopper else "no compute-capability 9.0 GPU: " + _gpu_description()),
        },
        "triton": {
            "available": triton is not None and (bool(gpus) or triton_interpret()),
            "version": getattr(triton, "__version__", None),
            "interpreter": triton_interpret(),
            "reason": (triton_why if triton is None else
                       None if gpus else
                       "runs on CPU tensors through the interpreter" if triton_interpret() else
                       "no GPU; set TRITON_INTERPRET=1 before importing pykernels to run it through the interpreter"),
        },
        "torch": {"available": True, "version": torch.__version__, "reason": None},
        "gpus": gpus,
    }
    if ext is not None:
        report["cuda"]["runtime"] = ext.device_info()
    return report
