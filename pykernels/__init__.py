"""pykernels: FP8 GEMM, MLA decode and MoE dispatch kernels for NVIDIA Hopper (sm_90a), each in CUDA C++
and Triton beside a torch reference. Every op takes backend="auto" | "cuda" | "triton" | "torch";
pykernels.backends() says which can run on this machine and why not."""

from pykernels._backend import backends
from pykernels.fp8_gemm import (GROUPED_M_ALIGNMENT, fp8_gemm_config, fp8_gemm_nt, m_grouped_fp8_gemm_nt_contiguous,
                                m_grouped_fp8_gemm_nt_masked)
from pykernels.fp8_quant import per_block_quant_fp8, per_token_group_quant_fp8

__version__ = "0.1.0"

__all__ = [
    "GROUPED_M_ALIGNMENT",
    "backends",
    "fp8_gemm_config",
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "per_block_quant_fp8",
    "per_token_group_quant_fp8",
]
