"""Triton helpers shared by the op kernels."""

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


def _fix_interpreter_bf16_dot() -> None:
    """Makes the interpreter's tl.dot correct for bfloat16 operands.

    Triton 3.9's interpreter keeps bfloat16 tensors as their raw uint16 bits and its create_dot multiplies
    those bits as integers (the result is garbage of order 1e10). Widening to float32 first (exact: a
    bfloat16 is the top half of a float32) gives the product the GPU's HGMMA computes, with float32
    accumulation. Only the interpreter is touched; compiled kernels are unaffected.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_pykernels_bf16", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16 or handle.dtype == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._pykernels_bf16 = True
    builder.create_dot = create_dot


_fix_interpreter_bf16_dot()
