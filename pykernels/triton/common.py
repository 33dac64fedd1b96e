"""Triton helpers shared by the op kernels."""

import os

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(x):
    """Rounds float32 `x` (already within [-448, 448]) to the nearest float8_e4m3fn value, ties to even,
    still as float32, so that the cast to tl.float8e4nv that follows is exact.

    The rounding is done here, in plain float32 adds, because the cast's own rounding differs between
    targets: the GPU's cvt.rn.satfinite is exact round-to-nearest-even, while the Triton interpreter
    truncates or mis-carries at the top of a binade (124.3 became 64). With the value already on the e4m3
    grid every conversion agrees, and the cost is four float ops in kernels bound by memory or tensor cores.
    """
    bits = x.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    # e4m3 keeps 3 mantissa bits; below 2^-6 it is subnormal with a fixed spacing of 2^-9.
    ulp_exponent = tl.maximum(exponent, -6) - 3
    magic = ((ulp_exponent + 127 + 23) << 23).to(tl.float32, bitcast=True) * 1.5  # 1.5 * 2^23 * ulp
    # |x| < 16 ulp, far below 2^22 ulp: adding and subtracting `magic` rounds x to a multiple of ulp.
    return (x + magic) - magic


@triton.jit
def fp8_scale_from_amax(amax, UE8M0: tl.constexpr):
    """max(amax, 1e-4) / 448, then (UE8M0) rounded up to a power of two by bumping the exponent field: the
    DeepSeek-V3 scale rule of pykernels/reference/fp8_quant.py, bit for bit."""
    scale = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if UE8M0:
        bits = scale.to(tl.int32, bitcast=True)
        bits = tl.where((bits & 0x007FFFFF) != 0, (bits & -8388608) + 0x00800000, bits)  # -8388608 == ~0x7fffff
        scale = bits.to(tl.float32, bitcast=True)
    return scale


@triton.jit
def quantize_e4m3(x, scale):
    """x / scale, saturated to +-448 and rounded onto the float8_e4m3fn grid (still float32): the value the
    reference quantizer stores. Division, not multiplication by 1/scale, as the reference divides."""
    return round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0))


@triton.jit
def round_to_bf16(x):
    """Rounds float32 `x` to the nearest bfloat16 value, ties to even, still as float32, so the cast that
    follows is exact: the interpreter's float32 -> bf16 cast truncates while the GPU's rounds. NaN is left
    to the cast, which the bit trick could turn into infinity."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


def _fix_interpreter_dot() -> None:
    """Makes the interpreter's tl.dot correct for bfloat16 and float8_e4m3fn operands.

    Triton 3.9's interpreter keeps bfloat16 tensors as their raw uint16 bits and its create_dot multiplies
    those bits as integers (the result is garbage of order 1e10). Widening to float32 first (exact: a
    bfloat16 is the top half of a float32) gives the product the GPU's HGMMA computes, with float32
    accumulation. Its fp8 path decodes e4m3fn's NaN codes (0x7F, 0xFF) as +-480, so a NaN operand gave a
    finite product where the GPU's QGMMA gives NaN; e4m3fn operands are widened through a table of the 256
    exact float32 values instead. Only the interpreter is touched; compiled kernels are unaffected.
    """
    import numpy as np
    import torch
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_pykernels_widened", False):
        return
    original = builder.create_dot
    e4m3_values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()

    def widen(handle):
        scalar = handle.dtype.scalar if hasattr(handle.dtype, "scalar") else handle.dtype
        if scalar == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        if scalar == tl.float8e4nv:
            return interpreter.TensorHandle(e4m3_values[handle.data.view(np.uint8)], tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._pykernels_widened = True
    builder.create_dot = create_dot


def _fix_interpreter_index() -> None:
    """Lets older interpreters take a runtime scalar as a `range` bound.

    The interpreter holds a scalar as a one-element array and triton 3.6's converts it with int(), which
    NumPy 2 rejects ("only 0-dimensional arrays can be converted"), so any loop over a kernel argument or a
    loaded value failed there. Triton 3.9 squeezes the array first; this does the same where it does not.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_pykernels_squeezed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._pykernels_squeezed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _fix_interpreter_dot()
    _fix_interpreter_index()
