"""FP8 quantizers in Triton (DeepSeek-V3 fine-grained scaling), same arithmetic as the reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pykernels.triton.aot import AotKernel
from pykernels.triton.common import fp8_scale_from_amax, quantize_e4m3


@triton.jit
def group_amax(x, axis):
    """max |x| of float32 `x` along `axis`, NaN when the values hold a NaN (tl.max may skip NaN, as the GPU's
    max instruction does) and +inf when they hold an infinity."""
    amax = tl.max(tl.abs(x), axis=axis)
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) != 0
    return tl.where(has_nan, float("nan"), amax)


@triton.jit
def finite_scale(amax, UE8M0: tl.constexpr):
    """fp8_scale_from_amax for finite amax; a NaN or infinite amax is the scale as it is (with or without
    UE8M0), as in the reference."""
    return tl.where(amax < float("inf"), fp8_scale_from_amax(amax, UE8M0), amax)


@triton.jit
def e4m3_codes(x, scale):
    """quantize_e4m3(x, scale) as float8_e4m3fn code bytes (uint8), every code of a group whose scale is not
    finite being NaN (0x7F), the reference's rule. The NaN code is set as bits: the interpreter's float ->
    e4m3 cast does not keep NaN, while the GPU's satfinite conversion does."""
    codes = quantize_e4m3(x, scale).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(tl.abs(scale) < float("inf"), codes, 0x7F).to(tl.uint8)


@triton.jit
def store_codes(q_ptr, offs, x, scale, mask):
    """Stores e4m3_codes(x, scale) through a float8_e4m3fn pointer."""
    tl.store(q_ptr.to(tl.pointer_type(tl.uint8)) + offs, e4m3_codes(x, scale), mask=mask)


@triton.jit
def per_token_group_quant_fp8_kernel(
    x_ptr,  # [rows, K] float32/float16/bfloat16, contiguous
    q_ptr,  # [rows, K] float8_e4m3fn
    s_ptr,  # scales of (row, group) at (row // rows_per_batch) * s_batch + (row % rows_per_batch) * s_row + group * s_group
    rows,  # number of rows (all leading dimensions flattened)
    k,  # row length K
    rows_per_batch,  # M of x [..., M, K] for column-major scales; rows for row-major
    s_batch,  # scale strides, in elements: between batches of rows_per_batch rows,
    s_row,  # between rows,
    s_group,  # between the groups of a row
    GROUP_SIZE: tl.constexpr,  # elements per group, a power of two
    BLOCK_M: tl.constexpr,  # rows per program
    UE8M0: tl.constexpr,  # round scales up to powers of two
):
    pid_m = tl.program_id(0)
    group = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    mask = (offs_m[:, None] < rows) & (offs_k[None, :] < k)
    offs = offs_m[:, None].to(tl.int64) * k + offs_k[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = finite_scale(group_amax(x, 1), UE8M0)
    store_codes(q_ptr, offs, x, scale[:, None], mask)
    rows64 = offs_m.to(tl.int64)
    s_offs = (rows64 // rows_per_batch) * s_batch + (rows64 % rows_per_batch) * s_row + group.to(tl.int64) * s_group
    tl.store(s_ptr + s_offs, scale, mask=offs_m < rows)


@triton.jit
def per_block_quant_fp8_kernel(
    w_ptr,  # [G, N, K] float32/float16/bfloat16, contiguous
    q_ptr,  # [G, N, K] float8_e4m3fn
    s_ptr,  # [G, ceil(N / BLOCK), ceil(K / BLOCK)] float32
    n,  # rows per group
    k,  # row length
    BLOCK: tl.constexpr,  # block edge, a power of two
    UE8M0: tl.constexpr,
):
    kb = tl.program_id(0)
    nb = tl.program_id(1)
    g = tl.program_id(2)
    offs_n = nb * BLOCK + tl.arange(0, BLOCK)
    offs_k = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n[:, None] < n) & (offs_k[None, :] < k)
    offs = (g.to(tl.int64) * n + offs_n[:, None]) * k + offs_k[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = finite_scale(group_amax(group_amax(w, 1), 0), UE8M0)
    store_codes(q_ptr, offs, w, scale, mask)
    tl.store(s_ptr + (g * tl.num_programs(1) + nb) * tl.num_programs(0) + kb, scale)


def _block_m(group_size: int) -> int:
    # About 4K elements per program: enough bytes in flight without spilling the tile.
    return max(1, min(64, 4096 // group_size))


def per_token_group_quant_fp8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group_size: int,
                              ue8m0: bool, column_major_scales: bool = False) -> None:
    """scales: [..., groups], contiguous or (column_major_scales) with strides (..., M_pad * groups, 1, M_pad)."""
    k = x.shape[-1]
    rows = x.numel() // k
    groups_per_row = scales.shape[-1]
    if column_major_scales:
        rows_per_batch = x.shape[-2]
        s_batch = scales.stride(-3) if scales.dim() >= 3 else 0
        s_row, s_group = scales.stride(-2), scales.stride(-1)
    else:
        rows_per_batch, s_batch, s_row, s_group = rows, 0, groups_per_row, 1
    block_m = _block_m(group_size)
    grid = (triton.cdiv(rows, block_m), groups_per_row)
    per_token_group_quant_fp8_kernel[grid](x, q, scales, rows, k, rows_per_batch, s_batch, s_row, s_group,
                                           GROUP_SIZE=group_size, BLOCK_M=block_m, UE8M0=ue8m0, num_warps=4)


def per_block_quant_fp8(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block_size: int, ue8m0: bool) -> None:
    n, k = w.shape[-2:]
    groups = w.numel() // (n * k)
    grid = (scales.shape[-1], scales.shape[-2], groups)
    per_block_quant_fp8_kernel[grid](w, q, scales, n, k, BLOCK=block_size, UE8M0=ue8m0,
                                     num_warps=8 if block_size >= 128 else 4)


# Configs compiled ahead of time for sm_90 by the static audit: the ones the wrappers above launch for
# DeepSeek-V3's shapes (group/block 128, bf16 activations, float32 weights before quantization).
AOT_KERNELS = [
    AotKernel(
        name="per_token_group_quant_fp8_kernel[bf16,G128]",
        fn=per_token_group_quant_fp8_kernel,
        signature={"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "rows": "i32", "k": "i32:16",
                   "rows_per_batch": "i32", "s_batch": "i32", "s_row": "i32", "s_group": "i32"},
        constexprs={"GROUP_SIZE": 128, "BLOCK_M": _block_m(128), "UE8M0": False},
        num_warps=4,
        expect={"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    ),
    AotKernel(
        name="per_block_quant_fp8_kernel[bf16,B128]",
        fn=per_block_quant_fp8_kernel,
        signature={"w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "n": "i32", "k": "i32:16"},
        constexprs={"BLOCK": 128, "UE8M0": False},
        num_warps=8,
        expect={"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    ),
]
