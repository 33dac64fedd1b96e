"""FP8 quantization with DeepSeek-V3's fine-grained scaling: 1 x group_size activation groups and
block x block weight blocks. See pykernels/reference/fp8_quant.py for the exact arithmetic."""

from __future__ import annotations

import torch

from pykernels import _backend, _validate
from pykernels._validate import FLOAT_INPUTS, FP8, cdiv
from pykernels.reference import fp8_quant as reference


def _kernel_group(group_size: int, extent: int) -> int:
    """The group edge a kernel tiles with: group_size, or the power of two covering `extent` when one group
    already covers it (same groups and scales; a tile of 2**30 elements would not fit anywhere)."""
    return min(group_size, 1 << max(extent - 1, 0).bit_length())


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, ue8m0: bool = False,
                              column_major_scales: bool = False, backend: str = "auto"):
    """Quantizes activations to float8_e4m3fn with one float32 scale per `group_size` consecutive
    elements of the last dimension.

    x: [..., K] float32, float16 or bfloat16, contiguous; K need not be a multiple of group_size (the last
    group is partial). Returns (x_fp8 [..., K] float8_e4m3fn, scales [..., ceil(K / group_size)] float32)
    with x ~= x_fp8 * scales (broadcast per group). scale = max(amax, 1e-4) / 448; ue8m0=True rounds each
    scale up to a power of two.

    column_major_scales=True (x [..., M, K], at least 2-D) gives the scales in DeepGEMM's MN-major,
    TMA-aligned layout for the GEMM's A operand: same shape, strides (..., M_pad * groups, 1, M_pad) with
    M_pad = M rounded up to a multiple of 4 (16 bytes); the padding rows are left unwritten.

    Non-finite input: a group holding a NaN gets scale NaN, one holding an infinity scale +inf, with or
    without ue8m0 (rounding to a power of two applies to finite scales only), and every code of that group
    is NaN, so it dequantizes to NaN; the other groups are quantized as usual. Every backend follows this.
    """
    _validate.tensor(x, "x", FLOAT_INPUTS, contiguous=True)
    _validate.integer(group_size, "group_size", 1)
    _validate.power_of_two(group_size, "group_size")
    _validate.boolean(ue8m0, "ue8m0")
    _validate.boolean(column_major_scales, "column_major_scales")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: expected a non-empty last dimension, got shape {list(x.shape)}")
    if column_major_scales and x.dim() < 2:
        raise ValueError(f"x: expected at least 2 dimensions ([..., M, K]) for column_major_scales=True, "
                         f"got shape {list(x.shape)}")
    k = x.shape[-1]
    which = _backend.resolve(backend, x.device, "per_token_group_quant_fp8")
    if which == "torch":
        return reference.per_token_group_quant_fp8(x, group_size, ue8m0, column_major_scales)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scales = reference.empty_token_group_scales(tuple(x.shape[:-1]), cdiv(k, group_size), column_major_scales,
                                                x.device)
    if x.numel() == 0:
        return q, scales
    kernel_group = _kernel_group(group_size, k)
    with _backend.on_device(x.device):
        if which == "cuda":
            ext, _ = _backend.extension()
            ext.per_token_group_quant_fp8(x, q, scales, kernel_group, ue8m0, _backend.current_stream(x.device),
                                          column_major_scales=column_major_scales)
        else:
            from pykernels.triton import fp8_quant as triton_fp8_quant

            triton_fp8_quant.per_token_group_quant_fp8(x, q, scales, kernel_group, ue8m0, column_major_scales)
    return q, scales


def per_block_quant_fp8(w: torch.Tensor, block_size: int = 128, ue8m0: bool = False, backend: str = "auto"):
    """Quantizes weights to float8_e4m3fn with one float32 scale per block_size x block_size block.

    w: [N, K] or [G, N, K] (grouped experts), float32, float16 or bfloat16, contiguous; edge blocks may be
    partial. Returns (w_fp8 of w's shape, scales [(G,) ceil(N / block_size), ceil(K / block_size)] float32).
    A block holding a NaN or an infinity follows per_token_group_quant_fp8's rule for such groups.
    """
    _validate.tensor(w, "w", FLOAT_INPUTS, ndim=(2, 3), contiguous=True)
    _validate.integer(block_size, "block_size", 1)
    _validate.power_of_two(block_size, "block_size")
    _validate.boolean(ue8m0, "ue8m0")
    n, k = w.shape[-2:]
    if n == 0 or k == 0:
        raise ValueError(f"w: expected non-empty N and K, got shape {list(w.shape)}")
    which = _backend.resolve(backend, w.device, "per_block_quant_fp8")
    if which == "torch":
        return reference.per_block_quant_fp8(w, block_size, ue8m0)
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scales = torch.empty((*w.shape[:-2], cdiv(n, block_size), cdiv(k, block_size)), dtype=torch.float32,
                         device=w.device)
    if w.numel() == 0:
        return q, scales
    block_size = _kernel_group(block_size, max(n, k))
    with _backend.on_device(w.device):
        if which == "cuda":
            ext, _ = _backend.extension()
            ext.per_block_quant_fp8(w, q, scales, block_size, ue8m0, _backend.current_stream(w.device))
        else:
            from pykernels.triton import fp8_quant as triton_fp8_quant

            triton_fp8_quant.per_block_quant_fp8(w, q, scales, block_size, ue8m0)
    return q, scales


# What the static audit requires of this op's CUDA kernels (matched by substring of the demangled name).
CUDA_AUDIT = {
    "per_token_group_quant_fp8_kernel<__nv_bfloat16, 8": {"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    "per_token_group_quant_fp8_kernel": {"no_local_memory": True},
    "per_block_quant_fp8_kernel<__nv_bfloat16, 8": {"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    "per_block_quant_fp8_kernel": {"no_local_memory": True},
}
