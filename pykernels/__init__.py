"""pykernels: FP8 GEMM, MLA decode and MoE dispatch kernels for NVIDIA Hopper (sm_90a), each in CUDA C++
and Triton beside a torch reference. Every op takes backend="auto" | "cuda" | "triton" | "torch";
pykernels.backends() says which can run on this machine and why not.

Each op is also a torch.library custom op (torch.ops.pykernels.*, pykernels/torch_ops.py) that torch.compile
traces whole, and takes CuPy / DLPack arrays as well as torch tensors (pykernels/interop.py). Code written
for DeepGEMM, FlashMLA or DeepEP can import pykernels.compat.deep_gemm, .flash_mla or .deep_ep instead."""

import warnings as _warnings

import torch as _torch

from pykernels import mla_decode as _mla_decode_module
from pykernels import moe
from pykernels import torch_ops as _torch_ops
from pykernels._backend import backends
from pykernels._backend import extension as _extension
from pykernels.fp8_gemm import GROUPED_M_ALIGNMENT, fp8_gemm_config
from pykernels.fp8_gemm import get_mn_major_tma_aligned_tensor as _get_mn_major_tma_aligned_tensor
from pykernels.interop import accepts_foreign_arrays as _accepts_foreign_arrays
from pykernels.mla_decode import MlaSchedule

# The ops as exported go through their torch.library custom ops, so torch.compile traces them whole, and take
# CuPy / DLPack / __cuda_array_interface__ arrays as well as torch tensors, returning the caller's kind.
fp8_gemm_nt = _accepts_foreign_arrays(_torch_ops.fp8_gemm_nt)
m_grouped_fp8_gemm_nt_contiguous = _accepts_foreign_arrays(_torch_ops.m_grouped_fp8_gemm_nt_contiguous)
m_grouped_fp8_gemm_nt_masked = _accepts_foreign_arrays(_torch_ops.m_grouped_fp8_gemm_nt_masked)
mla_decode = _accepts_foreign_arrays(_torch_ops.mla_decode)
per_block_quant_fp8 = _accepts_foreign_arrays(_torch_ops.per_block_quant_fp8)
per_token_group_quant_fp8 = _accepts_foreign_arrays(_torch_ops.per_token_group_quant_fp8)
permute_to_experts = _accepts_foreign_arrays(_torch_ops.permute_to_experts)
unpermute_from_experts = _accepts_foreign_arrays(_torch_ops.unpermute_from_experts)
get_mla_metadata = _accepts_foreign_arrays(_mla_decode_module.get_mla_metadata)
get_mn_major_tma_aligned_tensor = _accepts_foreign_arrays(_get_mn_major_tma_aligned_tensor)

__version__ = "0.1.0"

__all__ = [
    "GROUPED_M_ALIGNMENT",
    "MlaSchedule",
    "backends",
    "fp8_gemm_config",
    "fp8_gemm_nt",
    "get_mla_metadata",
    "get_mn_major_tma_aligned_tensor",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "mla_decode",
    "moe",
    "per_block_quant_fp8",
    "per_token_group_quant_fp8",
    "permute_to_experts",
    "unpermute_from_experts",
]

# A GPU machine without the extension is almost always an install that found no nvcc: say so once, here,
# since pip hides the build's own message. CPU-only machines are expected to lack it and stay quiet.
if _extension()[0] is None and _torch.cuda.is_available():
    _warnings.warn(f"pykernels: the CUDA backend is unavailable: {_extension()[1]}. Reinstall with nvcc >= 12.3 "
                   "on PATH to build it; the Triton and torch backends work meanwhile.", stacklevel=2)
