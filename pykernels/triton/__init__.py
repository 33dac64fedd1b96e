"""Triton kernels, one file per op, each with the wrapper that launches it and its AOT_KERNELS list.

Import a submodule (pykernels.triton.fp8_quant, ...) only where Triton is needed: under TRITON_INTERPRET=1
the environment variable must be set before these modules are first imported.
"""

# The ops whose Triton kernels the static audit compiles ahead of time.
OPS = ("fp8_quant", "fp8_gemm", "mla_decode", "moe")
