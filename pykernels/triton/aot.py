"""Ahead-of-time compilation of Triton kernels for sm_90, with no GPU, for the static audit.

Each pykernels/triton/<op>.py lists the configs its wrappers launch as AOT_KERNELS. A signature maps every
runtime argument to a Triton type; a ":16" suffix declares the value divisible by 16, the specialization
Triton's JIT makes at run time for such integers (pointers are always taken as 16-byte aligned, which
torch's allocations are). Without those hints the compiled code would not be the code that runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SM90 = ("cuda", 90, 32)


@dataclass
class AotKernel:
    name: str  # label in audit reports, e.g. "fp8_gemm_kernel[128x128x128,w4,s4]"
    fn: object  # the @triton.jit function
    signature: dict  # runtime argument -> Triton type ("*bf16", "i32", "i32:16", "fp32", ...)
    constexprs: dict  # constexpr argument -> value
    num_warps: int = 4
    num_stages: int = 3
    # What the audit must find in the SASS, see pykernels.audit.check_expectations:
    # {"no_local_memory": True, "min_instructions": {"QGMMA": 1}, "max_shared_bytes": 232448}
    expect: dict = field(default_factory=dict)


def _jit_function(fn):
    """The JITFunction behind `fn`, also when TRITON_INTERPRET=1 wrapped it for the interpreter."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    return JITFunction(fn.fn)


def compile_sm90(kernel: AotKernel):
    """Compiles `kernel` for sm_90 and returns (cubin bytes, metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = _jit_function(kernel.fn)
    signature, attrs = {}, {}
    for index, arg in enumerate(jit_fn.arg_names):
        if arg in kernel.constexprs:
            signature[arg] = "constexpr"
            continue
        if arg not in kernel.signature:
            raise ValueError(f"{kernel.name}: argument {arg!r} has neither a type nor a constexpr value")
        spec = kernel.signature[arg]
        ty, _, hint = spec.partition(":")
        signature[arg] = ty
        if ty.startswith("*") or hint == "16":
            attrs[(index,)] = [["tt.divisibility", 16]]
    target = GPUTarget(*SM90)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": kernel.num_warps, "num_stages": kernel.num_stages})
    source = ASTSource(fn=jit_fn, signature=signature, constexprs=dict(kernel.constexprs), attrs=attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    return compiled.asm["cubin"], compiled.metadata
