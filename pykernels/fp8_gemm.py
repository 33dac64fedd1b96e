"""FP8 block-scaled GEMM, D = A @ B^T in bfloat16 (DeepSeek-V3 recipe): plain, grouped contiguous (MoE
prefill) and grouped masked (MoE decode). See pykernels/reference/fp8_gemm.py for the exact arithmetic.

Operands come as (tensor, scales) pairs: activations float8_e4m3fn with one float32 scale per row per 128
columns, weights float8_e4m3fn with one float32 scale per 128 x 128 block, both K-major ("NT") and
contiguous. Weight scales are row-major; activation scales either row-major or, as DeepGEMM takes them,
MN-major and TMA-aligned (see get_mn_major_tma_aligned_tensor). K must be a multiple of 128; M and N are
free (N's last scale block may be partial). Every output row is written: rows a grouped layout does not
compute (m_indices -1, rows at or past masked_m[g]) come back as zeros from the torch and Triton backends.
"""

from __future__ import annotations

import torch

from pykernels import _backend, _validate
from pykernels._validate import FP8, cdiv
from pykernels.reference import fp8_gemm as reference
from pykernels.reference.fp8_quant import column_major_scales_rows, empty_token_group_scales

BLOCK_K = 128
# Each group's rows in the contiguous layout start at a multiple of this (padding rows carry index -1),
# so that no M tile of a kernel straddles two groups.
GROUPED_M_ALIGNMENT = 128
_H800_SMS = 132


def _pair(pair, name: str, scales_name: str):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"({name}, {scales_name}): expected a (tensor, scales) pair, got {type(pair).__name__}"
                        + (f" of length {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
    return pair


def _mn_major_strides(shape) -> tuple:
    """The strides of MN-major TMA-aligned scales of `shape` ([M, KB] or [G, M, KB])."""
    m, kb = shape[-2], shape[-1]
    m_pad = column_major_scales_rows(m)
    return (m_pad * kb, 1, m_pad)[-len(shape):]


def _strides_match(x: torch.Tensor, strides) -> bool:
    # As in torch's contiguity: a dimension of size 1 is never stepped over, so its stride is free.
    return all(size == 1 or stride == want for size, stride, want in zip(x.shape, x.stride(), strides))


def _is_mn_major_tma_aligned(x: torch.Tensor) -> bool:
    return _strides_match(x, _mn_major_strides(x.shape))


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """Activation scales `sf` ([M, K/128] or [G, M, K/128] float32) in the layout DeepGEMM's kernels read
    with TMA: MN-major (stride 1 along M) with the M stride padded to 16 bytes, i.e. strides
    (1, M_pad) or (M_pad * K/128, 1, M_pad), M_pad = M rounded up to a multiple of 4. Returns `sf` itself
    when it already has that layout, else a copy. Every fp8 GEMM here accepts either layout for sa."""
    _validate.tensor(sf, "sf", (torch.float32,), ndim=(2, 3))
    if _is_mn_major_tma_aligned(sf):
        return sf
    aligned = empty_token_group_scales(tuple(sf.shape[:-1]), sf.shape[-1], True, sf.device)
    aligned.copy_(sf)
    return aligned


def _activation_scales(s, name: str) -> None:
    """Activation scales come row-major contiguous or MN-major TMA-aligned; the kernels read either."""
    if s.is_contiguous() or _is_mn_major_tma_aligned(s):
        return
    row_major = [s.shape[-1] * s.shape[-2], s.shape[-1], 1][-s.dim():]
    raise ValueError(f"{name}: expected row-major contiguous scales (strides {row_major}) "
                     f"or MN-major TMA-aligned ones (strides {list(_mn_major_strides(s.shape))}, as "
                     f"pykernels.get_mn_major_tma_aligned_tensor returns), got strides {list(s.stride())}")


def _operand(pair, name: str, scales_name: str, ndim: int, rows_are_blocks: bool):
    """Checks an fp8 operand and its scales; returns (x, scales). Rows are scaled one by one (activations,
    scales in either accepted layout) or in blocks of 128 (weights, scales row-major)."""
    x, s = _pair(pair, name, scales_name)
    _validate.tensor(x, name, (FP8,), ndim=ndim, contiguous=True)
    _validate.tensor(s, scales_name, (torch.float32,), ndim=ndim, contiguous=rows_are_blocks)
    k = x.shape[-1]
    if k == 0 or k % BLOCK_K:
        raise ValueError(f"{name}: expected K (the last dimension) a positive multiple of {BLOCK_K}, got {k}; "
                         f"pad K with zeros (and its scales with anything) to a multiple of {BLOCK_K}")
    rows = x.shape[-2]
    lead = list(x.shape[:-2])
    expected = lead + [cdiv(rows, BLOCK_K) if rows_are_blocks else rows, k // BLOCK_K]
    what = ("one per 128x128 block of " if rows_are_blocks else "one per row per 128 columns of ") + name
    _validate.shape(s, scales_name, expected, what)
    if not rows_are_blocks:
        _activation_scales(s, scales_name)
    _validate.same_device(x, name, **{scales_name: s})
    return x, s


def _check_k(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"b: expected K = {a.shape[-1]} (as in a), got {b.shape[-1]} (shape {list(b.shape)})")


def _int_vector(x, name: str, length: int, device: torch.device) -> torch.Tensor:
    _validate.tensor(x, name, (torch.int32,), ndim=1, contiguous=True)
    _validate.shape(x, name, [length])
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where a is), got {x.device}")
    return x


def _launch_triton(layout: str, a, sa, b, sb, out, group_info, expected_m: int) -> None:
    from pykernels.triton import fp8_gemm as triton_fp8_gemm

    with _backend.on_device(a.device):
        triton_fp8_gemm.fp8_gemm(layout, a, sa, b, sb, out, group_info, expected_m)


def fp8_gemm_nt(a_pair, b_pair, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """D = A @ B^T in bfloat16.

    a_pair: (a [M, K] float8_e4m3fn, sa [M, K/128] float32, row-major or MN-major TMA-aligned); b_pair:
    (b [N, K] float8_e4m3fn, sb [ceil(N/128), K/128] float32). out: optional bfloat16 [M, N] buffer.
    Returns bfloat16 [M, N].
    """
    a, sa = _operand(a_pair, "a", "sa", 2, rows_are_blocks=False)
    b, sb = _operand(b_pair, "b", "sb", 2, rows_are_blocks=True)
    _check_k(a, b)
    _validate.same_device(a, "a", b=b, sb=sb)
    m, n = a.shape[0], b.shape[0]
    out = _validate.out_tensor(out, "out", (m, n), torch.bfloat16, a.device)
    which = _backend.resolve(backend, a.device, "fp8_gemm_nt")
    if m == 0 or n == 0:
        return out
    if which == "torch":
        out.copy_(reference.fp8_gemm_nt(a, sa, b, sb))
    elif which == "triton":
        _launch_triton("plain", a, sa, b.unsqueeze(0), sb.unsqueeze(0), out, None, m)
    else:
        ext, _ = _backend.extension()
        with _backend.on_device(a.device):
            ext.fp8_gemm_nt(a, sa, b, sb, out, _backend.current_stream(a.device))
    return out


def m_grouped_fp8_gemm_nt_contiguous(a_pair, b_pair, m_indices: torch.Tensor, out: torch.Tensor | None = None,
                                     backend: str = "auto") -> torch.Tensor:
    """Grouped GEMM over row segments (MoE prefill): row r of A is multiplied by expert m_indices[r]'s B.

    a_pair: (a [M_total, K], sa [M_total, K/128] in either layout); b_pair: (b [G, N, K],
    sb [G, ceil(N/128), K/128]); m_indices: int32 [M_total], each group's rows one segment padded to
    GROUPED_M_ALIGNMENT rows with -1 (M_total is a multiple of GROUPED_M_ALIGNMENT). Rows marked -1 are not
    computed: the torch and Triton backends write them as zeros. Returns bfloat16 [M_total, N]. Indices are
    read on the device; a value outside [-1, G) on a CPU tensor raises, on a GPU tensor its rows are
    skipped (checking would force a host sync).
    """
    a, sa = _operand(a_pair, "a", "sa", 2, rows_are_blocks=False)
    b, sb = _operand(b_pair, "b", "sb", 3, rows_are_blocks=True)
    _check_k(a, b)
    _validate.same_device(a, "a", b=b, sb=sb)
    m_total, (groups, n, _) = a.shape[0], b.shape
    if m_total % GROUPED_M_ALIGNMENT:
        raise ValueError(f"a: expected M_total a multiple of GROUPED_M_ALIGNMENT = {GROUPED_M_ALIGNMENT} "
                         f"(segments padded with m_indices = -1), got {m_total}")
    m_indices = _int_vector(m_indices, "m_indices", m_total, a.device)
    if m_indices.device.type == "cpu" and m_total:
        low, high = int(m_indices.min()), int(m_indices.max())
        if low < -1 or high >= groups:
            raise ValueError(f"m_indices: expected values in [-1, {groups}) (G = {groups} groups), "
                             f"got values in [{low}, {high}]")
        blocks = m_indices.view(-1, GROUPED_M_ALIGNMENT)
        mixed = ((blocks != blocks[:, :1]) & (blocks != -1)).any(dim=1)
        if bool(mixed.any()):
            first = int(mixed.nonzero()[0, 0]) * GROUPED_M_ALIGNMENT
            raise ValueError(f"m_indices: expected each {GROUPED_M_ALIGNMENT}-row block to hold one group "
                             f"followed by -1 padding, got several groups in rows [{first}, "
                             f"{first + GROUPED_M_ALIGNMENT})")
    out = _validate.out_tensor(out, "out", (m_total, n), torch.bfloat16, a.device)
    which = _backend.resolve(backend, a.device, "m_grouped_fp8_gemm_nt_contiguous")
    if m_total == 0 or n == 0 or groups == 0:
        return out
    if which == "torch":
        out.copy_(reference.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices))
    elif which == "triton":
        _launch_triton("contiguous", a, sa, b, sb, out, m_indices, m_total)
    else:
        ext, _ = _backend.extension()
        with _backend.on_device(a.device):
            ext.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, out, _backend.current_stream(a.device))
    return out


def m_grouped_fp8_gemm_nt_masked(a_pair, b_pair, masked_m: torch.Tensor, expected_m: int,
                                 out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Grouped GEMM over padded per-group batches (MoE decode): out[g, :masked_m[g]] = A[g] @ B[g]^T.

    a_pair: (a [G, M_max, K], sa [G, M_max, K/128] in either layout); b_pair: (b [G, N, K], sb [G, ceil(N/128), K/128]);
    masked_m: int32 [G], the valid rows of each group (0 allowed; read on the device by the CUDA and
    Triton kernels, so no host sync and CUDA-graph capture works); expected_m: a positive hint of the
    typical masked_m, used only to choose tiles (and, in Triton, the persistent grid's size). Returns
    bfloat16 [G, M_max, N]; rows >= masked_m[g] are written as zeros by the torch and Triton backends.
    """
    a, sa = _operand(a_pair, "a", "sa", 3, rows_are_blocks=False)
    b, sb = _operand(b_pair, "b", "sb", 3, rows_are_blocks=True)
    _check_k(a, b)
    _validate.same_device(a, "a", b=b, sb=sb)
    groups, m_max, _ = a.shape
    n = b.shape[1]
    if b.shape[0] != groups:
        raise ValueError(f"b: expected {groups} groups (as in a), got {b.shape[0]} (shape {list(b.shape)})")
    masked_m = _int_vector(masked_m, "masked_m", groups, a.device)
    if isinstance(expected_m, bool) or not isinstance(expected_m, int):
        raise TypeError(f"expected_m: expected an int, got {type(expected_m).__name__}")
    if expected_m <= 0:
        raise ValueError(f"expected_m: expected a positive row count hint, got {expected_m}")
    if masked_m.device.type == "cpu" and groups:
        low, high = int(masked_m.min()), int(masked_m.max())
        if low < 0 or high > m_max:
            raise ValueError(f"masked_m: expected values in [0, {m_max}] (M_max), got values in [{low}, {high}]")
    out = _validate.out_tensor(out, "out", (groups, m_max, n), torch.bfloat16, a.device)
    which = _backend.resolve(backend, a.device, "m_grouped_fp8_gemm_nt_masked")
    if groups == 0 or m_max == 0 or n == 0:
        return out
    if which == "torch":
        out.copy_(reference.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m))
    elif which == "triton":
        _launch_triton("masked", a, sa, b, sb, out, masked_m, expected_m)
    else:
        ext, _ = _backend.extension()
        with _backend.on_device(a.device):
            ext.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, int(expected_m), out,
                                             _backend.current_stream(a.device))
    return out


_LAYOUTS = {"plain": 0, "contiguous": 1, "masked": 2}
_MULTICAST = {0: "none", 1: "a", 2: "b"}


def fp8_gemm_config(M: int, N: int, K: int, num_groups: int = 1, num_sms: int | None = None,
                    layout: str = "plain") -> dict:
    """The tile configuration the CUDA kernel uses for `num_groups` GEMMs of M x N x K (grouped layouts: M
    rows per group), on `num_sms` SMs (default: the current GPU's count, else 132 as on H800/H100 SXM), in
    `layout`: "plain" (fp8_gemm_nt), "contiguous" (M = M_total, num_groups 1, as the launcher plans it) or
    "masked" (M = expected_m, num_groups = G).

    Returns block_m, block_n, block_k, num_math_warpgroups, num_stages, raster_group (M tiles per raster
    group), num_tiles, num_waves, wave_utilization (the share of the SMs busy in the last wave: tiles left
    for it / SMs), smem_bytes, multicast ("none", or "a" / "b": the operand each 2-CTA cluster shares, one
    TMA load multicast to both CTAs; on only with more than one wave, an even SM count and a tile compiled
    for it; "b" only in the plain layout with an even number of row blocks)
    and cluster_size (2 with multicast, else 1). Deterministic: no autotuning, the same answer for the same
    arguments. M, N, K and num_groups must be below 2^30: the kernel indexes rows, columns and K in int32.
    """
    max_dim = 2 ** 30 - 1
    for value, name in ((M, "M"), (N, "N"), (K, "K"), (num_groups, "num_groups")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if M <= 0 or N <= 0 or num_groups <= 0:
        raise ValueError(f"M, N, num_groups: expected positive values, got {M}, {N}, {num_groups}")
    if K <= 0 or K % BLOCK_K:
        raise ValueError(f"K: expected a positive multiple of {BLOCK_K}, got {K}")
    for value, name in ((M, "M"), (N, "N"), (K, "K"), (num_groups, "num_groups")):
        _validate.integer(value, name, 1, max_dim)
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
            if torch.cuda.is_available() else _H800_SMS
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms <= 0:
        raise ValueError(f"num_sms: expected a positive int, got {num_sms!r}")
    _validate.integer(num_sms, "num_sms", 1, 2 ** 16)
    if layout not in _LAYOUTS:
        raise ValueError(f"layout: expected one of {sorted(_LAYOUTS)}, got {layout!r}")
    ext, why = _backend.extension()
    if ext is None:
        raise RuntimeError(f"fp8_gemm_config describes the CUDA kernel's choice and needs pykernels._C: {why}")
    cfg = ext.fp8_gemm_config(M, N, K, num_groups, num_sms, _LAYOUTS[layout])
    cfg["multicast"] = _MULTICAST[cfg["multicast"]]
    cfg["cluster_size"] = 1 if cfg["multicast"] == "none" else 2
    return cfg


# The (math warpgroups, BLOCK_N) of the kernels compiled per multicast mode (multicast_instantiated in
# csrc/fp8_gemm/fp8_gemm_schedule.h), as they appear in the demangled kernel names.
_BLOCK_N_CHOICES = (16, 32, 48, 56, 64, 96, 112, 128, 144, 160, 192)
_MULTICAST_BLOCK_N = (112, 128, 144, 160, 192)
GEMM_INSTANTIATIONS = {
    "(pykernels::fp8_gemm::Multicast)0": [(wg, bn) for wg in (1, 2) for bn in _BLOCK_N_CHOICES],
    "(pykernels::fp8_gemm::Multicast)1": [(wg, bn) for wg in (1, 2) for bn in _MULTICAST_BLOCK_N],
    "(pykernels::fp8_gemm::Multicast)2": [(2, bn) for bn in _MULTICAST_BLOCK_N],
}

# The cluster kernels (static SASS): the shared operand arrives by a multicast TMA load; the math warps
# release every stage through cluster addresses (the only arrive on a CTA's own barrier is the A-scale
# warp's on "full"), so the peer's producer waits for both CTAs' releases; the cluster barrier runs twice,
# after barrier init and before exit. The unicast kernels do none of these.
_CLUSTER_AUDIT = {"min_instructions": {"UTMALDG.MULTICAST": 1, "SYNCS.ARRIVE.REMOTE": 1, "UCGABAR_WAIT": 2},
                  "max_instructions": {"SYNCS.ARRIVE.LOCAL": 1}}
_UNICAST_AUDIT = {"max_instructions": {"UTMALDG.MULTICAST": 0, "SYNCS.ARRIVE.REMOTE": 0, "UCGABAR_WAIT": 0}}

# What the static audit requires of this op's CUDA kernels (matched by substring of the demangled name):
# every instantiation exists, with the cluster or unicast expectations above. The epilogue stages each tile
# through shared memory with stmatrix and stores it with TMA, fenced, behind barriers and waits
# (audit.tma_store_protocol_failures).
CUDA_AUDIT = {
    "fp8_gemm_kernel": {"no_local_memory": True,
                        "min_instructions": {"QGMMA": 1, "UTMALDG": 1, "UTMASTG": 1, "STSM": 1},
                        "tma_store_protocol": True},
    **{f"fp8_gemm_kernel<{wg}, {bn}, {mode}>": _UNICAST_AUDIT if mode.endswith("0") else _CLUSTER_AUDIT
       for mode, shapes in GEMM_INSTANTIATIONS.items() for wg, bn in shapes},
}
