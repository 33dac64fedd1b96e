"""FP8 block-scaled GEMM (DeepSeek-V3 recipe): the definition the kernels are held to.

Operands are float8_e4m3fn with float32 scales: A [M, K] one scale per row per 128 columns
(sa [M, K/128]), B [N, K] one scale per 128 x 128 block (sb [ceil(N/128), K/128]). With k_b the 128-wide
K blocks, element (m, n) of D = A @ B^T is

    acc = 0                                                       (float32)
    for each K block k_b:
        p    = sum_{k in k_b} A[m, k] * B[n, k]                   (float32: the block's partial product)
        acc += p * (sa[m, k_b] * sb[n // 128, k_b])               (float32, scales applied per K block)
    D[m, n] = bfloat16(acc)                                       (round to nearest even)

The partial product of each K block is promoted to the float32 accumulator after scaling, never summed
over the whole K in lower precision. Products of two e4m3 values are exact in float32, so p differs
between implementations only by the order of its 128 float32 additions.
"""

from __future__ import annotations

import torch

BLOCK_K = 128


def _scale_columns(sb: torch.Tensor, n: int) -> torch.Tensor:
    """[ceil(N/128), KB] block scales -> [N, KB], one row per column of D (the last block may be partial)."""
    return sb.repeat_interleave(BLOCK_K, dim=0)[:n]


def fp8_gemm_nt(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """a [M, K] fp8, sa [M, K/128] f32, b [N, K] fp8, sb [ceil(N/128), K/128] f32 -> bf16 [M, N]."""
    m, k = a.shape
    n = b.shape[0]
    a32, b32 = a.float(), b.float()
    sa32, sb32 = sa.float(), _scale_columns(sb.float(), n)
    acc = torch.zeros((m, n), dtype=torch.float32, device=a.device)
    for kb in range(k // BLOCK_K):
        cols = slice(kb * BLOCK_K, (kb + 1) * BLOCK_K)
        partial = a32[:, cols] @ b32[:, cols].T
        acc += partial * (sa32[:, kb, None] * sb32[None, :, kb])
    return acc.to(torch.bfloat16)


def m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices) -> torch.Tensor:
    """a [M_total, K], b [G, N, K], m_indices [M_total] (group per row, -1 for padding) -> bf16 [M_total, N].
    Rows marked -1 (or naming no group) are left zero here; the API leaves their content unspecified."""
    n = b.shape[1]
    out = torch.zeros((a.shape[0], n), dtype=torch.bfloat16, device=a.device)
    indices = m_indices.long()
    for g in range(b.shape[0]):
        rows = (indices == g).nonzero().flatten()
        if rows.numel():
            out[rows] = fp8_gemm_nt(a[rows], sa[rows], b[g], sb[g])
    return out


def m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m) -> torch.Tensor:
    """a [G, M_max, K], b [G, N, K], masked_m [G] -> bf16 [G, M_max, N]; rows >= masked_m[g] are left
    zero here (the API leaves them unspecified)."""
    g_count, m_max, _ = a.shape
    out = torch.zeros((g_count, m_max, b.shape[1]), dtype=torch.bfloat16, device=a.device)
    for g, valid in enumerate(masked_m.tolist()):
        rows = max(0, min(int(valid), m_max))
        if rows:
            out[g, :rows] = fp8_gemm_nt(a[g, :rows], sa[g, :rows], b[g], sb[g])
    return out


def dequantized_product(a, sa, b, sb) -> torch.Tensor:
    """The exact product of the dequantized operands in float64: what the kernels approximate."""
    n = b.shape[0]
    a64 = a.double() * sa.double().repeat_interleave(BLOCK_K, dim=-1)
    b64 = b.double() * _scale_columns(sb.double(), n).repeat_interleave(BLOCK_K, dim=-1)
    return a64 @ b64.T


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric, 1 - 2*sum(x*y)/sum(x^2+y^2), in float64 (0 when x == y)."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator) if float(denominator) else 0.0
