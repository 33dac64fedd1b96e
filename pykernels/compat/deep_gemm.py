"""DeepGEMM's FP8 GEMM interface over pykernels, mirroring deepseek-ai/DeepGEMM @54e2261 (csrc/apis/gemm.hpp,
csrc/apis/layout.hpp, deep_gemm/utils/layout.py) for the SM90 recipe: FP8 E4M3 operands, float32 scales per
1 x 128 (A) and 128 x 128 (B), bfloat16 output written into `d`, nothing returned.

    deep_gemm.fp8_gemm_nt((a, sfa), (b, sfb), d)                                       # d = a @ b.T
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices)       # MoE prefill
    deep_gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, expected_m)  # MoE decode

Scale layouts: as DeepGEMM, SFA may be row-major [M, K/128] or MN-major and TMA-aligned (strides (1, M rounded
up to 4)), which get_mn_major_tma_aligned_tensor builds; SFB row-major or transposed. Rows marked -1 in the
contiguous layout come out 0 (DeepGEMM's tests compare the whole output with them included). Features of
DeepGEMM's interface pykernels lacks raise NotImplementedError naming them: FP32 output and accumulation
(c=), the NN/TN/TT layouts, k-grouped GEMMs, the PSUM contiguous layout, packed UE8M0 (SM100) scales and
other recipes. The tuning arguments (compiled_dims, disable_ue8m0_cast) choose among DeepGEMM's JIT
kernels and have no meaning here.
"""

from __future__ import annotations

import torch

import pykernels
from pykernels import _validate
from pykernels.compat import backend, missing

ANCHOR = "DeepGEMM"
_RECIPE = (1, 128, 128)


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """x rounded up so that x elements of `element_size` bytes fill whole 16-byte TMA units."""
    return align(x, 16 // element_size)


# pykernels' own helper has DeepGEMM's semantics: the same layout, returned as is when already so laid out.
get_mn_major_tma_aligned_tensor = pykernels.get_mn_major_tma_aligned_tensor


def get_mk_alignment_for_contiguous_layout() -> int:
    """Rows per group segment in the contiguous layout: pykernels' GROUPED_M_ALIGNMENT, fixed."""
    return pykernels.GROUPED_M_ALIGNMENT


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None) -> int:
    return pykernels.GROUPED_M_ALIGNMENT


def set_mk_alignment_for_contiguous_layout(new_value: int) -> None:
    if new_value != pykernels.GROUPED_M_ALIGNMENT:
        raise missing(f"a contiguous-layout alignment of {new_value} rows (pykernels' kernels use "
                      f"{pykernels.GROUPED_M_ALIGNMENT})", ANCHOR)


get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout


def _scales(sf: torch.Tensor, name: str) -> torch.Tensor:
    """DeepGEMM's float32 scale layouts as pykernels' GEMMs take them: SFA row-major or MN-major TMA-aligned
    as given (every backend reads both); SFB row-major, or transposed into row-major (a small copy)."""
    if isinstance(sf, torch.Tensor) and sf.dtype == torch.int32:
        raise missing(f"{name}: packed UE8M0 scales (int32, the SM100 recipe)", ANCHOR)
    _validate.tensor(sf, name, (torch.float32,))
    if name == "sfa" and sf.dim() in (2, 3) and get_mn_major_tma_aligned_tensor(sf) is sf:
        return sf
    return sf.contiguous()


def _operands(a, b):
    pairs = []
    for pair, name, scales_name in ((a, "a", "sfa"), (b, "b", "sfb")):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{name}: expected a (tensor, scales) pair, got {type(pair).__name__}")
        pairs.append((pair[0], _scales(pair[1], scales_name)))
    return pairs


def _check_recipe(recipe, recipe_a, recipe_b) -> None:
    given = (tuple(recipe) if recipe is not None else None, tuple(recipe_a) if recipe_a is not None else None,
             tuple(recipe_b) if recipe_b is not None else None)
    if given not in ((None, None, None), (_RECIPE, None, None), (None, (1, 128), (128, 128))):
        raise missing(f"recipe={recipe}, recipe_a={recipe_a}, recipe_b={recipe_b} (pykernels implements "
                      f"{_RECIPE}: 1x128 activation and 128x128 weight scales)", ANCHOR)


def _check_d(d, c) -> None:
    if c is not None:
        raise missing("accumulation into d (c=...; the FP32 weight-gradient path)", ANCHOR)
    _validate.tensor(d, "d")
    if d.dtype == torch.float32:
        raise missing("a float32 output d (pykernels' GEMMs write bfloat16)", ANCHOR)


def _into(d: torch.Tensor, run) -> None:
    """Runs `run(out)` writing d: directly when d is contiguous, else through a contiguous buffer (DeepGEMM
    accepts any N-major d; pykernels' kernels write dense rows)."""
    if d.is_contiguous():
        run(d)
    else:
        out = torch.empty(d.shape, dtype=d.dtype, device=d.device)
        run(out)
        d.copy_(out)


def fp8_gemm_nt(a, b, d: torch.Tensor, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False) -> None:
    """d = a @ b.T. a: (fp8 [M, K], sfa float32 [M, K/128]); b: (fp8 [N, K], sfb float32 [ceil(N/128), K/128]);
    d: bfloat16 [M, N]."""
    _check_recipe(recipe, recipe_a, recipe_b)
    _check_d(d, c)
    a_pair, b_pair = _operands(a, b)
    _into(d, lambda out: pykernels.fp8_gemm_nt(a_pair, b_pair, out=out, backend=backend()))


def m_grouped_fp8_gemm_nt_contiguous(a, b, d: torch.Tensor, grouped_layout: torch.Tensor, recipe=None,
                                     recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                                     disable_ue8m0_cast: bool = False, use_psum_layout: bool = False,
                                     ensure_zero_padding: bool = True, expected_m_for_psum_layout=None) -> None:
    """d[r] = a[r] @ b[grouped_layout[r]].T; rows with grouped_layout -1 (each group's padding to
    get_mk_alignment_for_contiguous_layout() rows) come out 0 on every backend."""
    if use_psum_layout or expected_m_for_psum_layout is not None:
        raise missing("the PSUM contiguous layout (use_psum_layout=True)", ANCHOR)
    _check_recipe(recipe, recipe_a, recipe_b)
    _check_d(d, None)
    a_pair, b_pair = _operands(a, b)
    _into(d, lambda out: pykernels.m_grouped_fp8_gemm_nt_contiguous(a_pair, b_pair, grouped_layout, out=out,
                                                                    backend=backend()))


def m_grouped_fp8_gemm_nt_masked(a, b, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int, recipe=None,
                                 recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                                 disable_ue8m0_cast: bool = False) -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T; rows past masked_m[g] come out 0."""
    _check_recipe(recipe, recipe_a, recipe_b)
    _check_d(d, None)
    a_pair, b_pair = _operands(a, b)
    _into(d, lambda out: pykernels.m_grouped_fp8_gemm_nt_masked(a_pair, b_pair, masked_m, expected_m, out=out,
                                                                backend=backend()))


def _layout_missing(name: str, what: str):
    def call(*args, **kwargs):
        raise missing(f"{name} ({what})", ANCHOR)

    call.__name__ = name
    call.__doc__ = f"Not implemented by pykernels: {what}; raises NotImplementedError."
    return call


fp8_gemm_nn = _layout_missing("fp8_gemm_nn", "an MN-major B operand")
fp8_gemm_tn = _layout_missing("fp8_gemm_tn", "MN-major operands")
fp8_gemm_tt = _layout_missing("fp8_gemm_tt", "an MN-major A operand")
m_grouped_fp8_gemm_nn_contiguous = _layout_missing("m_grouped_fp8_gemm_nn_contiguous", "MN-major B operands")
k_grouped_fp8_gemm_nt_contiguous = _layout_missing("k_grouped_fp8_gemm_nt_contiguous", "the k-grouped GEMM")
k_grouped_fp8_gemm_tn_contiguous = _layout_missing("k_grouped_fp8_gemm_tn_contiguous", "the k-grouped GEMM")
