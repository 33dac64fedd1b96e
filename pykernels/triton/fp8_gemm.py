"""FP8 block-scaled GEMM in Triton: one kernel for the plain, grouped-contiguous and grouped-masked
layouts, the same arithmetic as the reference (each 128-K block's dot product starts from zero and is
added to the float32 accumulator after scaling by sa[m, kb] * sb[n // 128, kb])."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pykernels.triton.aot import AotKernel
from pykernels.triton.common import round_to_bf16

BLOCK_K = 128
H800_SMS = 132  # the grid size basis for the persistent masked layout when no GPU is at hand
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
def _gemm_tile(
    a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr,
    g,  # the tile's group: selects B, and A's scales through stride_sa_g
    pid_m, pid_n,
    row_ok,  # [BLOCK_M] bool: rows computed; the others are written as zeros
    has_rows,  # False: nothing is computed or loaded, the tile stores zeros (row_ok then does not matter)
    a_group_rows,  # row of A (and of the output) where the tile's group starts
    m_rows, n, k,
    stride_sa_g, stride_sa_m, stride_sa_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Computes and stores one BLOCK_M x BLOCK_N output tile. Rows outside row_ok are stored as zeros
    without loading anything for them."""
    # wgmma has 64-row instructions: a tile with fewer rows is computed transposed, B's columns taking
    # the instruction's 64-row side and A's few rows its N side (8..256).
    SWAP_AB: tl.constexpr = BLOCK_M < 64
    SCALAR_SB: tl.constexpr = 128 % BLOCK_N == 0  # the tile's columns share one weight scale block
    k_blocks = k // 128
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    mask_n = offs_n < n
    # Scalar 64-bit tile bases, 32-bit offsets within the tile: per-element 64-bit pointers would hold
    # two registers per loaded vector and push the kernel into spilling.
    first_row = (a_group_rows + pid_m * BLOCK_M).to(tl.int64)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A tile without rows to compute loads nothing: it only stores zeros.
    if has_rows:
        a_base = a_ptr + first_row * k
        b_base = b_ptr + (g * n + pid_n * BLOCK_N).to(tl.int64) * k
        a_offs = tl.arange(0, BLOCK_M)[:, None] * k + offs_k[None, :]
        b_offs = tl.arange(0, BLOCK_N)[:, None] * k + offs_k[None, :]
        # A's scales through their strides: row-major [.., M, K/128] or MN-major TMA-aligned.
        sa_base = sa_ptr + ((g * stride_sa_g).to(tl.int64) + (pid_m * BLOCK_M).to(tl.int64) * stride_sa_m)
        sa_offs = tl.arange(0, BLOCK_M) * stride_sa_m
        sb_group = sb_ptr + (g * tl.cdiv(n, 128)).to(tl.int64) * k_blocks
        if SCALAR_SB:
            sb_base = sb_group + ((pid_n * BLOCK_N) // 128) * k_blocks
        else:
            sb_base = sb_group + (offs_n // 128) * k_blocks
        for kb in range(0, k_blocks):
            a = tl.load(a_base + a_offs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_base + b_offs, mask=mask_n[:, None], other=0.0)
            sa = tl.load(sa_base + sa_offs, mask=row_ok, other=0.0)
            if SCALAR_SB:
                sb = tl.load(sb_base + kb)
            else:
                sb = tl.load(sb_base + kb, mask=mask_n, other=0.0)
            # A fresh fp32 dot per 128-K block, promoted after scaling (never accumulated across blocks
            # in the tensor core).
            if SWAP_AB:
                if SCALAR_SB:
                    scale = sa[None, :] * sb
                else:
                    scale = sb[:, None] * sa[None, :]
                acc += tl.dot(b, tl.trans(a)) * scale
            else:
                if SCALAR_SB:
                    scale = sa[:, None] * sb
                else:
                    scale = sa[:, None] * sb[None, :]
                acc += tl.dot(a, tl.trans(b)) * scale
            a_base += 128
            b_base += 128
            sa_base += stride_sa_k
    if SWAP_AB:
        acc = tl.trans(acc)
    acc = tl.where(row_ok[:, None], acc, 0.0)
    c_base = c_ptr + first_row * n
    # Built from offs_n rather than a bare arange: offsets that do not depend on the tile are hoisted out
    # of the persistent loop and held in registers through the K loop.
    c_offs = tl.arange(0, BLOCK_M)[:, None] * n + offs_n[None, :]
    # Rounded here so that every target stores the nearest bfloat16 (the interpreter's cast truncates).
    tl.store(c_base + c_offs, round_to_bf16(acc).to(tl.bfloat16),
             mask=(offs_m < m_rows)[:, None] & mask_n[None, :])


@triton.jit
def fp8_gemm_kernel(
    a_ptr,  # [G_a * m_rows, K] float8_e4m3fn (G_a = G for masked, else 1)
    sa_ptr,  # [G_a, m_rows, K / 128] float32, strides (stride_sa_g, stride_sa_m, stride_sa_k)
    b_ptr,  # [G, N, K] float8_e4m3fn
    sb_ptr,  # [G, ceil(N / 128), K / 128] float32
    c_ptr,  # [G_a * m_rows, N] bfloat16, rows as in a
    group_ptr,  # int32: m_indices [m_rows] (contiguous), masked_m [G] (masked), unused (plain)
    m_rows,  # rows of A per group: M (plain, contiguous) or M_max (masked)
    n,  # N
    k,  # K, a multiple of 128
    num_groups,  # G
    stride_sa_g,  # 0 unless masked
    stride_sa_m,  # K / 128 (row-major) or 1 (MN-major)
    stride_sa_k,  # 1 (row-major) or M rounded up to 4 (MN-major)
    LAYOUT: tl.constexpr,  # 0 plain, 1 contiguous, 2 masked
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,  # m-blocks per raster group (plain, contiguous)
):
    """Every output row is written: computed rows with D, the others (m_indices -1, rows at or past
    masked_m[g]) with zeros."""
    m_blocks = tl.cdiv(m_rows, BLOCK_M)
    n_blocks = tl.cdiv(n, BLOCK_N)
    if LAYOUT == 2 and BLOCK_M < 64:
        # Decode sizes, persistent: the grid is sized for the expected rows, not for M_max. Tiles run
        # m-block-major across groups, so the tiles that hold rows (the first m-blocks of every group) are
        # spread evenly over the programs; a tile past masked_m[g] stores zeros and loads nothing. (With
        # 64- and 128-row tiles this loop spills: the compiler hoists the tile's store offsets out of it.)
        tiles_per_m_block = num_groups * n_blocks
        for tile in range(tl.program_id(0), m_blocks * tiles_per_m_block, tl.num_programs(0)):
            pid_m = tile // tiles_per_m_block
            g = (tile % tiles_per_m_block) // n_blocks
            pid_n = tile % n_blocks
            row_limit = tl.minimum(tl.load(group_ptr + g), m_rows)
            row_ok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M) < row_limit
            _gemm_tile(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, g, pid_m, pid_n, row_ok, pid_m * BLOCK_M < row_limit,
                       g * m_rows, m_rows, n, k, stride_sa_g, stride_sa_m, stride_sa_k, BLOCK_M, BLOCK_N)
    elif LAYOUT == 2:
        tiles_per_group = m_blocks * n_blocks
        g = tl.program_id(0) // tiles_per_group
        pid_m, pid_n = _raster(tl.program_id(0) % tiles_per_group, m_blocks, n_blocks, GROUP_M)
        row_limit = tl.minimum(tl.load(group_ptr + g), m_rows)
        row_ok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M) < row_limit
        _gemm_tile(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, g, pid_m, pid_n, row_ok, pid_m * BLOCK_M < row_limit,
                   g * m_rows, m_rows, n, k, stride_sa_g, stride_sa_m, stride_sa_k, BLOCK_M, BLOCK_N)
    else:
        pid_m, pid_n = _raster(tl.program_id(0), m_blocks, n_blocks, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if LAYOUT == 1:
            # Segments are GROUPED_M_ALIGNMENT-aligned: a tile's first row names the group of all its
            # rows, and its rows are that group's followed by -1 padding.
            first = tl.load(group_ptr + pid_m * BLOCK_M)
            has_rows = (first >= 0) & (first < num_groups)
            # Without has_rows nothing is computed and every row stores zero whatever row_ok says.
            row_ok = tl.load(group_ptr + offs_m, mask=offs_m < m_rows, other=-1) == first
            g = tl.where(has_rows, first, 0)
            _gemm_tile(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, g, pid_m, pid_n, row_ok, has_rows,
                       0, m_rows, n, k, stride_sa_g, stride_sa_m, stride_sa_k, BLOCK_M, BLOCK_N)
        else:
            _gemm_tile(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, 0, pid_m, pid_n, offs_m < m_rows, True,
                       0, m_rows, n, k, stride_sa_g, stride_sa_m, stride_sa_k, BLOCK_M, BLOCK_N)


@dataclass(frozen=True)
class TritonConfig:
    block_m: int
    block_n: int
    group_m: int
    num_warps: int
    num_stages: int


def triton_config(m: int, n: int) -> TritonConfig:
    """Tiles per shape, deterministic. Up to 32 rows (decode): a 16- or 32-row tile computed transposed
    (see _gemm_tile) over 64 columns, so that even N = 2112 gives 33 programs streaming B; up to 64 rows
    one warpgroup on 64x128; else 128x128 with two warpgroups (a 128x128x128 fp8 tile spills with 4 warps)."""
    if m <= 16:
        return TritonConfig(block_m=16, block_n=64, group_m=8, num_warps=4, num_stages=5)
    if m <= 32:
        return TritonConfig(block_m=32, block_n=64, group_m=8, num_warps=4, num_stages=5)
    if m <= 64:
        return TritonConfig(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=4)
    return TritonConfig(block_m=128, block_n=128, group_m=8, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H800_SMS


def fp8_gemm(layout: str, a, sa, b, sb, out, group_info, expected_m: int, config: TritonConfig | None = None) -> None:
    """Launches fp8_gemm_kernel. a/sa/out keep their layout's shape ([M, ...] or [G, M_max, ...]), sa either
    row-major or MN-major TMA-aligned (read through its strides); b/sb are [G, N, K] / [G, ceil(N/128), K/128];
    group_info is m_indices, masked_m or None. `config` overrides triton_config (any power-of-two BLOCK_N)."""
    k = a.shape[-1]
    groups, n = b.shape[0], b.shape[1]
    m_rows = a.shape[-2]
    cfg = config or triton_config(min(expected_m, m_rows), n)
    m_blocks, n_blocks = triton.cdiv(m_rows, cfg.block_m), triton.cdiv(n, cfg.block_n)
    if layout == "masked" and cfg.block_m < 64:
        # Persistent (see fp8_gemm_kernel): enough programs for the tiles expected to hold rows (at least
        # one per SM); each walks its share of the rest.
        expected_tiles = groups * triton.cdiv(min(expected_m, m_rows), cfg.block_m) * n_blocks
        grid = (min(groups * m_blocks * n_blocks, max(expected_tiles, _num_sms(a.device))),)
    else:
        grid = ((groups if layout == "masked" else 1) * m_blocks * n_blocks,)
    stride_sa_g = sa.stride(0) if sa.dim() == 3 else 0
    group_ptr = group_info if group_info is not None else sa
    fp8_gemm_kernel[grid](a, sa, b, sb, out, group_ptr, m_rows, n, k, groups,
                          stride_sa_g, sa.stride(-2), sa.stride(-1), LAYOUT=LAYOUTS[layout],
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _aot(layout: str, m: int, sa_mn_major: bool) -> AotKernel:
    cfg = triton_config(m, 4096)
    # The runtime specializes a stride of 1 into a constant: K/128 scales per row is row-major's, the
    # padded M MN-major's.
    strides = {"stride_sa_g": "i32", "stride_sa_m": "i32", "stride_sa_k": "i32"}
    unit_stride = "stride_sa_m" if sa_mn_major else "stride_sa_k"
    del strides[unit_stride]
    return AotKernel(
        name=f"fp8_gemm_kernel[{layout},{cfg.block_m}x{cfg.block_n}x128,w{cfg.num_warps},s{cfg.num_stages}"
             f"{',sa-mn' if sa_mn_major else ''}]",
        fn=fp8_gemm_kernel,
        signature={"a_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "b_ptr": "*fp8e4nv", "sb_ptr": "*fp32", "c_ptr": "*bf16",
                   "group_ptr": "*i32", "m_rows": "i32", "n": "i32", "k": "i32:16", "num_groups": "i32", **strides},
        constexprs={"LAYOUT": LAYOUTS[layout], "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                    "GROUP_M": cfg.group_m, unit_stride: 1},
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        expect={"no_local_memory": True, "min_instructions": {"QGMMA": 1}, "max_shared_bytes": 232448},
    )


# Every config triton_config hands out, for every layout and both activation scale layouts (N and M
# unaligned: the runtime specializations real shapes such as N=2112 get).
AOT_CONFIG_ROWS = (16, 32, 64, 4096)
AOT_KERNELS = [_aot(layout, m, mn_major) for mn_major in (False, True) for layout in LAYOUTS for m in AOT_CONFIG_ROWS]
