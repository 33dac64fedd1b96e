"""FP8 block-scaled GEMM in Triton: one kernel for the plain, grouped-contiguous and grouped-masked
layouts, the same arithmetic as the reference (each 128-K block's dot product starts from zero and is
added to the float32 accumulator after scaling by sa[m, kb] * sb[n // 128, kb])."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pykernels.triton.aot import AotKernel

BLOCK_K = 128
LAYOUTS = {"plain": 0, "contiguous": 1, "masked": 2}


@triton.jit
def _raster(tile, m_blocks, n_blocks, GROUP_M: tl.constexpr):
    """Tile index -> (m block, n block), GROUP_M m-blocks at a time: consecutive tiles share B columns
    within a raster group and A rows across it, so both stay in L2. Same order as the CUDA scheduler's
    raster_tile (csrc/fp8_gemm/fp8_gemm_schedule.h)."""
    tiles_per_raster = GROUP_M * n_blocks
    first_m = (tile // tiles_per_raster) * GROUP_M
    rows = tl.minimum(m_blocks - first_m, GROUP_M)
    within = tile % tiles_per_raster
    return first_m + within % rows, within // rows


@triton.jit
def fp8_gemm_kernel(
    a_ptr,  # [G_a * m_rows, K] float8_e4m3fn (G_a = G for masked, else 1)
    sa_ptr,  # [G_a * m_rows, K / 128] float32
    b_ptr,  # [G, N, K] float8_e4m3fn
    sb_ptr,  # [G, ceil(N / 128), K / 128] float32
    c_ptr,  # [G_a * m_rows, N] bfloat16, rows as in a
    group_ptr,  # int32: m_indices [m_rows] (contiguous), masked_m [G] (masked), unused (plain)
    m_rows,  # rows of A per group: M (plain, contiguous) or M_max (masked)
    n,  # N
    k,  # K, a multiple of 128
    num_groups,  # G
    LAYOUT: tl.constexpr,  # 0 plain, 1 contiguous, 2 masked
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # divides 128, so one weight scale block covers the tile's columns
    GROUP_M: tl.constexpr,  # m-blocks per raster group
):
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(m_rows, BLOCK_M)
    n_blocks = tl.cdiv(n, BLOCK_N)
    g = 0
    tile = pid
    row_limit = m_rows
    if LAYOUT == 2:
        g = pid // (m_blocks * n_blocks)
        tile = pid % (m_blocks * n_blocks)
    pid_m, pid_n = _raster(tile, m_blocks, n_blocks, GROUP_M)
    k_blocks = k // 128
    # Tiles with nothing to compute run zero K blocks and store nothing (row_limit 0): an early return
    # here would split the kernel's control flow and cost the pipelined loop ~60 registers.
    if LAYOUT == 1:
        # Segments are GROUPED_M_ALIGNMENT-aligned: a tile's first row names the group of all its rows.
        g = tl.load(group_ptr + pid_m * BLOCK_M)
        valid = (g >= 0) & (g < num_groups)
        g = tl.where(valid, g, 0)
        row_limit = tl.where(valid, m_rows, 0)
    if LAYOUT == 2:
        row_limit = tl.minimum(tl.load(group_ptr + g), m_rows)
    k_iters = tl.where(pid_m * BLOCK_M < row_limit, k_blocks, 0)
    n_scale_blocks = tl.cdiv(n, 128)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    mask_m = offs_m < row_limit
    mask_n = offs_n < n
    a_group_rows = g * m_rows if LAYOUT == 2 else 0
    # Scalar 64-bit tile bases, 32-bit offsets within the tile: per-element 64-bit pointers would hold
    # two registers per loaded vector and push the kernel into spilling.
    first_row = (a_group_rows + pid_m * BLOCK_M).to(tl.int64)
    a_base = a_ptr + first_row * k
    b_base = b_ptr + (g * n + pid_n * BLOCK_N).to(tl.int64) * k
    a_offs = tl.arange(0, BLOCK_M)[:, None] * k + offs_k[None, :]
    b_offs = tl.arange(0, BLOCK_N)[:, None] * k + offs_k[None, :]
    sa_base = sa_ptr + first_row * k_blocks + tl.arange(0, BLOCK_M) * k_blocks
    sb_base = sb_ptr + (g * n_scale_blocks + (pid_n * BLOCK_N) // 128).to(tl.int64) * k_blocks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_iters):
        a = tl.load(a_base + a_offs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_base + b_offs, mask=mask_n[:, None], other=0.0)
        sa = tl.load(sa_base + kb, mask=mask_m, other=0.0)
        sb = tl.load(sb_base + kb)
        # A fresh fp32 dot per 128-K block, promoted after scaling (never accumulated across blocks in
        # the tensor core).
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)
        a_base += 128
        b_base += 128
    c_base = c_ptr + first_row * n + pid_n * BLOCK_N
    c_offs = tl.arange(0, BLOCK_M)[:, None] * n + tl.arange(0, BLOCK_N)[None, :]
    tl.store(c_base + c_offs, acc.to(tl.bfloat16), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class TritonConfig:
    block_m: int
    block_n: int
    group_m: int
    num_warps: int
    num_stages: int


def triton_config(m: int, n: int) -> TritonConfig:
    """Tiles per shape, deterministic: a 64-row tile with one warpgroup for small M (decode, masked MoE),
    else 128x128 with two warpgroups (a 128x128x128 fp8 tile spills with 4 warps)."""
    if m <= 64:
        return TritonConfig(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=4)
    return TritonConfig(block_m=128, block_n=128, group_m=8, num_warps=8, num_stages=3)


def fp8_gemm(layout: str, a, sa, b, sb, out, group_info, expected_m: int) -> None:
    """Launches fp8_gemm_kernel. a/sa/out keep their layout's shape ([M, ...] or [G, M_max, ...]); b/sb are
    [G, N, K] / [G, ceil(N/128), K/128]; group_info is m_indices, masked_m or None."""
    k = a.shape[-1]
    groups, n = b.shape[0], b.shape[1]
    m_rows = a.shape[-2]
    cfg = triton_config(min(expected_m, m_rows), n)
    tiles = triton.cdiv(m_rows, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    grid = (tiles * (groups if layout == "masked" else 1),)
    group_ptr = group_info if group_info is not None else sa
    fp8_gemm_kernel[grid](a, sa, b, sb, out, group_ptr, m_rows, n, k, groups, LAYOUT=LAYOUTS[layout],
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _aot(layout: str, m: int) -> AotKernel:
    cfg = triton_config(m, 4096)
    return AotKernel(
        name=f"fp8_gemm_kernel[{layout},{cfg.block_m}x{cfg.block_n}x128,w{cfg.num_warps},s{cfg.num_stages}]",
        fn=fp8_gemm_kernel,
        signature={"a_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "b_ptr": "*fp8e4nv", "sb_ptr": "*fp32", "c_ptr": "*bf16",
                   "group_ptr": "*i32", "m_rows": "i32", "n": "i32", "k": "i32:16", "num_groups": "i32"},
        constexprs={"LAYOUT": LAYOUTS[layout], "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                    "GROUP_M": cfg.group_m},
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        expect={"no_local_memory": True, "min_instructions": {"QGMMA": 1}, "max_shared_bytes": 232448},
    )


# Both configs triton_config hands out, for every layout (N and M unaligned: the runtime specializations
# real shapes such as N=2112 get).
AOT_KERNELS = [_aot(layout, m) for layout in LAYOUTS for m in (64, 4096)]
