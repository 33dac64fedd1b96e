"""FP8 quantization with DeepSeek-V3's fine-grained scaling: the definition the kernels are held to.

Per group (1 x group_size along the last dimension for activations, block x block for weights):
    amax  = max |x| over the group's elements (float32; a partial last group covers only what exists)
    scale = max(amax, 1e-4) / 448                      (float32 division)
    scale = 2 ** ceil(log2(scale))   when ue8m0        (exact: exponent bump when any mantissa bit is set)
    q     = e4m3fn(clamp(x / scale, -448, 448))        (float32 division, round to nearest even)

Non-finite input: a group holding a NaN gets scale NaN, one holding an infinity (and no NaN) scale +inf,
with or without ue8m0 (the power-of-two rounding applies to finite scales only; a packed UE8M0 byte would
hold 0xFF, its NaN, for both), and every code of such a group is NaN, so the dequantized group is NaN.
Other groups are unaffected.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def scale_from_amax(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    scale = torch.clamp(amax.float(), min=AMAX_FLOOR) / FP8_MAX  # clamp keeps NaN, inf / 448 stays inf
    if ue8m0:
        bits = scale.view(torch.int32)
        mantissa = bits & 0x007FFFFF
        # NaN's mantissa is non-zero: bumping its exponent field would make it -0.0.
        bump = (mantissa != 0) & torch.isfinite(scale)
        bits = torch.where(bump, (bits & ~0x007FFFFF) + 0x00800000, bits)
        scale = bits.view(torch.float32)
    return scale


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX)
    # A group with a non-finite scale holds a NaN or an infinity: all its codes are NaN (an infinite scale
    # alone would turn its finite elements into zeros).
    q = torch.where(torch.isfinite(scale), q, torch.nan)
    return q.to(torch.float8_e4m3fn)


def column_major_scales_rows(m: int) -> int:
    """M rounded up to 4 floats (16 bytes): the padded column length of column-major scales, as TMA needs."""
    return -(-m // 4) * 4


def empty_token_group_scales(lead: tuple, groups: int, column_major: bool, device) -> torch.Tensor:
    """An uninitialized float32 scales tensor [*lead, groups]; column_major (lead = (..., M)) gives DeepGEMM's
    MN-major layout: strides (..., M_pad * groups, 1, M_pad), M_pad = column_major_scales_rows(M)."""
    if not column_major:
        return torch.empty((*lead, groups), dtype=torch.float32, device=device)
    *batch, m = lead
    m_pad = column_major_scales_rows(m)
    batches = 1
    for b in batch:
        batches *= b
    strides = [1, m_pad]
    step = m_pad * groups
    for b in reversed(batch):
        strides.insert(0, step)
        step *= b
    storage = torch.empty(batches * m_pad * groups, dtype=torch.float32, device=device)
    return storage.as_strided((*lead, groups), strides)


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, ue8m0: bool = False,
                              column_major_scales: bool = False):
    """x [..., K] -> (q [..., K] float8_e4m3fn, scales [..., ceil(K / group_size)] float32), the scales
    row-major or (column_major_scales, x [..., M, K]) in empty_token_group_scales's column-major layout."""
    k = x.shape[-1]
    groups = -(-k // group_size)
    group_size = min(group_size, k) if groups == 1 else group_size  # a lone group covers only what exists
    padded = torch.nn.functional.pad(x.float(), (0, groups * group_size - k))  # zeros never raise an amax
    grouped = padded.reshape(*x.shape[:-1], groups, group_size)
    scales = scale_from_amax(grouped.abs().amax(dim=-1), ue8m0)
    q = _quantize(grouped, scales.unsqueeze(-1)).reshape(*x.shape[:-1], groups * group_size)[..., :k]
    if column_major_scales:
        scales = empty_token_group_scales(tuple(x.shape[:-1]), groups, True, x.device).copy_(scales)
    return q.contiguous(), scales


def per_block_quant_fp8(w: torch.Tensor, block_size: int = 128, ue8m0: bool = False):
    """w [N, K] or [G, N, K] -> (q of w's shape, scales [(G,) ceil(N / block), ceil(K / block)] float32)."""
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(0) if squeeze else w
    g, n, k = w3.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    if nb == 1 and kb == 1:  # a lone block covers only what exists
        block_size = max(n, k)
    padded = torch.nn.functional.pad(w3.float(), (0, kb * block_size - k, 0, nb * block_size - n))
    blocks = padded.reshape(g, nb, block_size, kb, block_size)
    scales = scale_from_amax(blocks.abs().amax(dim=(2, 4)), ue8m0)
    q = _quantize(blocks, scales[:, :, None, :, None]).reshape(g, nb * block_size, kb * block_size)[:, :n, :k]
    q = q.contiguous()
    return (q[0], scales[0]) if squeeze else (q, scales)


def dequantize_token_groups(q: torch.Tensor, scales: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Inverse of per_token_group_quant_fp8, in float32."""
    expanded = scales.repeat_interleave(group_size, dim=-1)[..., : q.shape[-1]]
    return q.float() * expanded


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """Inverse of per_block_quant_fp8, in float32."""
    n, k = q.shape[-2:]
    expanded = scales.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return q.float() * expanded[..., :n, :k]
