"""pykernels: FP8 GEMM, MLA decode and MoE dispatch kernels for NVIDIA Hopper (sm_90a), each in CUDA C++
and Triton beside a torch reference. Every op takes backend="auto" | "cuda" | "triton" | "torch";
pykernels.backends() says which can run on this machine and why not."""

from pykernels._backend import backends
from pykernels.fp8_quant import per_block_quant_fp8, per_token_group_quant_fp8
from pykernels.mla_decode import MlaSchedule, get_mla_metadata, mla_decode

__version__ = "0.1.0"

__all__ = [
    "MlaSchedule",
    "backends",
    "get_mla_metadata",
    "mla_decode",
    "per_block_quant_fp8",
    "per_token_group_quant_fp8",
]
