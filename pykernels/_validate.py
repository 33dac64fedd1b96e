"""Argument checks shared by every public op. Each raises before anything is computed or launched:
TypeError for a wrong dtype or kind of object, ValueError for wrong shapes, strides, devices or values,
always as "<arg>: expected <what>, got <what came>"."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FP8 = torch.float8_e4m3fn
FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(x, name: str, dtypes: Sequence[torch.dtype] | None = None, ndim: int | Sequence[int] | None = None,
           contiguous: bool = False) -> torch.Tensor:
    """Checks that `x` is a tensor of one of `dtypes` with `ndim` dimensions (an int or a choice)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, "
                             f"got {x.dim()} (shape {list(x.shape)})")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), "
                         f"got shape {list(x.shape)} with strides {list(x.stride())}")
    return x


def shape(x: torch.Tensor, name: str, expected: Sequence[int], what: str = "") -> None:
    """Checks x.shape == expected exactly; `what` explains where the expected shape comes from."""
    if tuple(x.shape) != tuple(expected):
        suffix = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {list(expected)}{suffix}, got {list(x.shape)}")


def same_device(reference: torch.Tensor, ref_name: str, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name}: expected a tensor on {reference.device} (where {ref_name} is), got {t.device}")


def boolean(value, name: str) -> bool:
    """Checks a flag is a real bool: a string such as "no" is truthy and would silently mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


# The kernels index with 32-bit integers; a size past this cannot be addressed by them.
INT32_MAX = 2**31 - 1


def integer(value, name: str, low: int | None = None, high: int | None = INT32_MAX) -> int:
    """Checks an int (not a bool) within [low, high]; by default no larger than the kernels can index."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {value}")
    return value


def power_of_two(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two, got {value}")
    return value


def out_tensor(out, name: str, shape_: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Checks a caller-provided output buffer, or allocates one when `out` is None."""
    if out is None:
        return torch.empty(tuple(shape_), dtype=dtype, device=device)
    tensor(out, name, (dtype,), contiguous=True)
    shape(out, name, shape_)
    if out.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {out.device}")
    return out


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
