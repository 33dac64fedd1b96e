"""Arrays from other libraries in, the caller's kind of array out, without copies.

Every public op accepts, wherever it takes a tensor, any object speaking DLPack (`__dlpack__`: CuPy, JAX,
NumPy on the CPU, ...) or `__cuda_array_interface__` (Numba, older CuPy), imported zero-copy through
torch.from_dlpack / torch.as_tensor. When any input is such an array, every tensor the op returns goes back
through the first foreign input's own library (its module's `from_dlpack`), so CuPy in gives CuPy out; an
output that is a caller's buffer (`out=`) comes back as the caller's very object. A library without
`from_dlpack` (a __cuda_array_interface__-only producer) gets torch tensors.

bfloat16 and float8_e4m3fn, which NumPy and CuPy lack, cross as their bits: such outputs come back as uint16
and uint8 arrays when the caller's library refuses the dtype, and a foreign uint16 / uint8 array is read as
bfloat16 / float8_e4m3fn (no op takes unsigned integers, so the reading is unambiguous). Torch tensors are
never reinterpreted.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

_SCALARS = (torch.Tensor, bool, int, float, str, type(None))
# dtypes foreign libraries commonly lack -> the unsigned integer of the same width carrying their bits
_AS_BITS = {torch.bfloat16: torch.uint16, torch.float8_e4m3fn: torch.uint8}
_FROM_BITS = {bits: dtype for dtype, bits in _AS_BITS.items()}


def is_foreign_array(obj) -> bool:
    """True for an array of another library that pykernels takes zero-copy."""
    if isinstance(obj, _SCALARS):
        return False
    return hasattr(obj, "__dlpack__") or hasattr(obj, "__cuda_array_interface__")


def to_torch(obj, name: str) -> torch.Tensor:
    """A torch view of a foreign array's memory (no copy), its unsigned bits read as bfloat16 / float8."""
    try:
        if hasattr(obj, "__dlpack__"):
            tensor = torch.from_dlpack(obj)
        else:
            tensor = torch.as_tensor(obj, device="cuda")
    except Exception as exc:  # noqa: BLE001 - every refusal means the same to the caller
        protocol = "__dlpack__" if hasattr(obj, "__dlpack__") else "__cuda_array_interface__"
        raise ValueError(f"{name}: expected an array torch can import zero-copy through {protocol}, got a "
                         f"{type(obj).__module__}.{type(obj).__name__} it refused ({exc})") from exc
    bits_of = _FROM_BITS.get(tensor.dtype)
    return tensor.view(bits_of) if bits_of is not None else tensor


def from_torch(tensor: torch.Tensor, like):
    """`tensor` as an array of `like`'s library, sharing its memory."""
    module = sys.modules.get(type(like).__module__.split(".")[0])
    from_dlpack = getattr(module, "from_dlpack", None)
    if from_dlpack is None:
        return tensor
    try:
        return from_dlpack(tensor)
    except (TypeError, ValueError, RuntimeError, BufferError):
        bits = _AS_BITS.get(tensor.dtype)
        if bits is None:
            raise
        return from_dlpack(tensor.view(bits))


class _Conversion:
    """The foreign arrays of one call: their torch views, and how outputs go back."""

    def __init__(self, fn):
        self.fn = fn
        self.like = None
        self.originals = {}  # id(torch view) -> the caller's object

    def argument(self, obj, position):
        if isinstance(obj, (tuple, list)):
            converted = [self.argument(item, (position, i)) for i, item in enumerate(obj)]
            return type(obj)(converted) if any(a is not b for a, b in zip(converted, obj)) else obj
        if not is_foreign_array(obj):
            return obj
        tensor = to_torch(obj, _argument_name(self.fn, position))
        self.like = obj if self.like is None else self.like
        self.originals[id(tensor)] = obj
        return tensor

    def result(self, value):
        if isinstance(value, torch.Tensor):
            original = self.originals.get(id(value))
            return original if original is not None else from_torch(value, self.like)
        if isinstance(value, tuple):
            return tuple(self.result(item) for item in value)
        return value


def _argument_name(fn, position) -> str:
    """The parameter name of a positional index or keyword (an element of a pair as name[i])."""
    index = None
    if isinstance(position, tuple):
        position, index = position
    name = position
    if isinstance(position, int):
        params = list(inspect.signature(fn).parameters)
        name = params[position] if position < len(params) else f"argument {position}"
    return name if index is None else f"{name}[{index}]"


def accepts_foreign_arrays(fn):
    """Wraps a public op so that it takes foreign arrays and returns the caller's kind (see the module)."""

    @functools.wraps(fn)
    def op(*args, **kwargs):
        if not any(_has_foreign(a) for a in args) and not any(_has_foreign(v) for v in kwargs.values()):
            return fn(*args, **kwargs)
        conversion = _Conversion(fn)
        args = [conversion.argument(a, i) for i, a in enumerate(args)]
        kwargs = {k: conversion.argument(v, k) for k, v in kwargs.items()}
        return conversion.result(fn(*args, **kwargs))

    return op


def _has_foreign(obj) -> bool:
    if isinstance(obj, (tuple, list)):
        return any(is_foreign_array(item) for item in obj)
    return is_foreign_array(obj)
