"""Every public op as a torch.library custom op in the `pykernels` namespace, so that torch.compile
(fullgraph=True included) and CUDA graphs (mode="reduce-overhead") see each op as one opaque node.

    torch.ops.pykernels.per_token_group_quant_fp8(x, group_size, ue8m0, column_major_scales, backend)
        -> (x_fp8, scales)
    torch.ops.pykernels.per_block_quant_fp8(w, block_size, ue8m0, backend) -> (w_fp8, scales)
    torch.ops.pykernels.fp8_gemm_nt(a, sa, b, sb, out!, backend)
    torch.ops.pykernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, out!, backend)
    torch.ops.pykernels.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, expected_m, out!, backend)
    torch.ops.pykernels.mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                   kv_scale, part_splits, splits, split_offsets, planned_for, backend)
        -> (out, lse)
    torch.ops.pykernels.permute_to_experts(x, x_scales, topk_idx, alignment, num_local_experts, check_ids, backend)
        -> (x_sorted, s_sorted, m_indices, perm)
    torch.ops.pykernels.unpermute_from_experts(y_sorted, perm, weights, backend) -> out

A schema holds only tensors and scalars, so the Python functions below (the ones pykernels exports) flatten
(tensor, scales) pairs and MlaSchedule objects at the boundary, allocate the GEMMs' output (the ops write into
`out`, declared mutated), and check the kinds of their arguments before the call: a wrong kind raises the
project's `<argument>: expected X, got Y` here rather than the dispatcher's schema error. Everything else is
checked eagerly by the op modules, which the ops' implementations call unchanged; the fake (meta)
implementations derive output shapes only, as they see no data.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pykernels import _backend, _validate
from pykernels import fp8_gemm as _gemm
from pykernels import fp8_quant as _quant
from pykernels import moe as _moe
from pykernels.mla_decode import HEAD_DIM_V, MlaSchedule, _check_kv_scale
from pykernels.mla_decode import mla_decode as _mla_decode
from pykernels._validate import FP8, cdiv
from pykernels.reference.fp8_quant import empty_token_group_scales

NAMESPACE = "pykernels"

# The ops are defined through torch.library.Library with explicit schemas rather than
# torch.library.custom_op: the latter wraps every call in a Python autograd layer that costs tens of
# microseconds, as much as a decode-sized kernel. None of the ops has a gradient.
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
# Each op's Python implementation, by op: a TorchDispatchMode sees an op as one node, and counters of host
# syncs (bench/timing.py, the tests) run the implementation under themselves to see inside it.
IMPLEMENTATIONS: dict = {}


def _define_op(schema: str):
    """Defines pykernels::<schema> with the decorated function as its implementation on every device;
    returns the op (OpOverload), which the fake implementation is then registered for."""
    def define(impl):
        name = schema.split("(", 1)[0]
        _LIBRARY.define(schema)
        _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
        op = getattr(getattr(torch.ops, NAMESPACE), name).default
        IMPLEMENTATIONS[op] = impl
        return op

    return define


def _backend_name(backend) -> str:
    if not isinstance(backend, str) or backend not in _backend.BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, _backend.BACKENDS))}, got {backend!r}")
    return backend


def _pair(pair, name: str, scales_name: str):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"({name}, {scales_name}): expected a (tensor, scales) pair, got {type(pair).__name__}"
                        + (f" of length {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
    x, s = pair
    _validate.tensor(x, name)
    _validate.tensor(s, scales_name)
    return x, s


def _gemm_operands(a_pair, b_pair, a_ndim: int, b_ndim: int, **others):
    """The two operand pairs, with the dtypes and ranks the output's shape is read from checked as the op
    module checks them (the op checks everything again, and the rest, when it runs), and every tensor on a's
    device: the dispatcher would otherwise route a call mixing in a meta tensor to the fake implementation."""
    a, sa = _pair(a_pair, "a", "sa")
    b, sb = _pair(b_pair, "b", "sb")
    _on_a_device(_validate.tensor(a, "a", (FP8,), ndim=a_ndim), "a")
    _validate.tensor(b, "b", (FP8,), ndim=b_ndim)
    _validate.same_device(a, "a", sa=sa)
    _validate.same_device(b, "b", sb=sb)
    _validate.same_device(a, "a", b=b, **others)
    return a, sa, b, sb


def _on_a_device(x: Tensor, name: str) -> Tensor:
    """A meta tensor would be routed by the dispatcher to the fake implementation and come back as an
    unchecked result; the op modules refuse it, so the layer does too, before dispatch. (Under
    torch.compile the traced FakeTensors report their real device.)"""
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a tensor on cpu or cuda, got one on {x.device.type}")
    return x


def _optional_tensor(x, name: str):
    return None if x is None else _validate.tensor(x, name)


# ---- FP8 quantization ---------------------------------------------------------------------------------

@_define_op("per_token_group_quant_fp8(Tensor x, int group_size, bool ue8m0, bool column_major_scales, "
            "str backend) -> (Tensor, Tensor)")
def _per_token_group_quant_fp8_op(x: Tensor, group_size: int, ue8m0: bool, column_major_scales: bool,
                                  backend: str) -> tuple[Tensor, Tensor]:
    # Column-major scales keep their TMA-aligned strides, which the fake implementation states too.
    return _quant.per_token_group_quant_fp8(x, group_size, ue8m0=ue8m0, column_major_scales=column_major_scales,
                                            backend=backend)


@torch.library.register_fake(_per_token_group_quant_fp8_op, lib=_LIBRARY)
def _(x, group_size, ue8m0, column_major_scales, backend):
    return (torch.empty(x.shape, dtype=FP8, device=x.device),
            empty_token_group_scales(tuple(x.shape[:-1]), cdiv(x.shape[-1], group_size), column_major_scales,
                                     x.device))


def per_token_group_quant_fp8(x: Tensor, group_size: int = 128, ue8m0: bool = False,
                              column_major_scales: bool = False, backend: str = "auto"):
    _on_a_device(_validate.tensor(x, "x"), "x")
    _validate.integer(group_size, "group_size", low=1)
    _validate.boolean(ue8m0, "ue8m0")
    _validate.boolean(column_major_scales, "column_major_scales")
    return _per_token_group_quant_fp8_op(x, group_size, ue8m0, column_major_scales, _backend_name(backend))


@_define_op("per_block_quant_fp8(Tensor w, int block_size, bool ue8m0, str backend) -> (Tensor, Tensor)")
def _per_block_quant_fp8_op(w: Tensor, block_size: int, ue8m0: bool, backend: str) -> tuple[Tensor, Tensor]:
    q, s = _quant.per_block_quant_fp8(w, block_size, ue8m0=ue8m0, backend=backend)
    return q.contiguous(), s.contiguous()


@torch.library.register_fake(_per_block_quant_fp8_op, lib=_LIBRARY)
def _(w, block_size, ue8m0, backend):
    n, k = w.shape[-2:]
    return (torch.empty(w.shape, dtype=FP8, device=w.device),
            w.new_empty((*w.shape[:-2], cdiv(n, block_size), cdiv(k, block_size)), dtype=torch.float32))


def per_block_quant_fp8(w: Tensor, block_size: int = 128, ue8m0: bool = False, backend: str = "auto"):
    _on_a_device(_validate.tensor(w, "w", ndim=(2, 3)), "w")
    _validate.integer(block_size, "block_size", low=1)
    _validate.boolean(ue8m0, "ue8m0")
    return _per_block_quant_fp8_op(w, block_size, ue8m0, _backend_name(backend))


# ---- FP8 GEMMs: the ops write into `out`, allocated here when the caller gives none ----------------------

@_define_op("fp8_gemm_nt(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out, str backend) -> ()")
def _fp8_gemm_nt_op(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, out: Tensor, backend: str) -> None:
    _gemm.fp8_gemm_nt((a, sa), (b, sb), out=out, backend=backend)


@torch.library.register_fake(_fp8_gemm_nt_op, lib=_LIBRARY)
def _(a, sa, b, sb, out, backend):
    return None


def fp8_gemm_nt(a_pair, b_pair, out: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    a, sa, b, sb = _gemm_operands(a_pair, b_pair, 2, 2, out=_optional_tensor(out, "out"))
    if out is None:
        out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16, device=a.device)
    _fp8_gemm_nt_op(a, sa, b, sb, _validate.tensor(out, "out"), _backend_name(backend))
    return out


@_define_op("m_grouped_fp8_gemm_nt_contiguous(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor m_indices, "
            "Tensor(a!) out, str backend) -> ()")
def _m_grouped_contiguous_op(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, m_indices: Tensor, out: Tensor,
                             backend: str) -> None:
    _gemm.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), m_indices, out=out, backend=backend)


@torch.library.register_fake(_m_grouped_contiguous_op, lib=_LIBRARY)
def _(a, sa, b, sb, m_indices, out, backend):
    return None


def m_grouped_fp8_gemm_nt_contiguous(a_pair, b_pair, m_indices: Tensor, out: Optional[Tensor] = None,
                                     backend: str = "auto") -> Tensor:
    a, sa, b, sb = _gemm_operands(a_pair, b_pair, 2, 3, m_indices=_validate.tensor(m_indices, "m_indices"),
                                  out=_optional_tensor(out, "out"))
    if out is None:
        out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    _m_grouped_contiguous_op(a, sa, b, sb, m_indices, _validate.tensor(out, "out"), _backend_name(backend))
    return out


@_define_op("m_grouped_fp8_gemm_nt_masked(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor masked_m, "
            "int expected_m, Tensor(a!) out, str backend) -> ()")
def _m_grouped_masked_op(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, masked_m: Tensor, expected_m: int,
                         out: Tensor, backend: str) -> None:
    _gemm.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), masked_m, expected_m, out=out, backend=backend)


@torch.library.register_fake(_m_grouped_masked_op, lib=_LIBRARY)
def _(a, sa, b, sb, masked_m, expected_m, out, backend):
    return None


def m_grouped_fp8_gemm_nt_masked(a_pair, b_pair, masked_m: Tensor, expected_m: int, out: Optional[Tensor] = None,
                                 backend: str = "auto") -> Tensor:
    a, sa, b, sb = _gemm_operands(a_pair, b_pair, 3, 3, masked_m=_validate.tensor(masked_m, "masked_m"),
                                  out=_optional_tensor(out, "out"))
    _validate.integer(expected_m, "expected_m", low=None, high=None)
    if out is None:
        out = torch.empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    _m_grouped_masked_op(a, sa, b, sb, masked_m, expected_m, _validate.tensor(out, "out"), _backend_name(backend))
    return out


# ---- MLA decode: the schedule crosses as its three int32 tensors ---------------------------------------

@_define_op("mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
            "float? softmax_scale, bool causal, Tensor? kv_scale, Tensor? part_splits, Tensor? splits, "
            "Tensor? split_offsets, int[] planned_for, str backend) -> (Tensor, Tensor)")
def _mla_decode_op(q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int,
                   softmax_scale: Optional[float], causal: bool, kv_scale: Optional[Tensor],
                   part_splits: Optional[Tensor], splits: Optional[Tensor], split_offsets: Optional[Tensor],
                   planned_for: list[int], backend: str) -> tuple[Tensor, Tensor]:
    metadata = None
    if part_splits is not None:
        rows, heads_k, seqlens_ptr, seqlens_version = planned_for
        metadata = MlaSchedule(batch=split_offsets.shape[0] - 1, num_parts=part_splits.shape[0] - 1,
                               part_splits=part_splits, splits=splits, split_offsets=split_offsets,
                               num_q_tokens_per_head_k=rows, num_heads_k=heads_k, seqlens_ptr=seqlens_ptr,
                               seqlens_version=None if seqlens_version < 0 else seqlens_version)
    out, lse = _mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                               kv_scale, metadata, backend)
    return out.contiguous(), lse.contiguous()


@torch.library.register_fake(_mla_decode_op, lib=_LIBRARY)
def _(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, kv_scale, part_splits, splits,
      split_offsets, planned_for, backend):
    b, s_q, h_q, _ = q.shape
    return q.new_empty((b, s_q, h_q, head_dim_v)), q.new_empty((b, h_q, s_q), dtype=torch.float32)


def mla_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
               head_dim_v: int = HEAD_DIM_V, softmax_scale: Optional[float] = None, causal: bool = False,
               kv_scale: Optional[Tensor] = None, metadata: Optional[MlaSchedule] = None,
               backend: str = "auto"):
    _on_a_device(_validate.tensor(q, "q", ndim=4), "q")
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        _validate.tensor(t, name)
    _validate.integer(head_dim_v, "head_dim_v")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
        softmax_scale = float(softmax_scale)
    _validate.boolean(causal, "causal")
    if kv_scale is not None and not isinstance(kv_scale, torch.Tensor):
        # A Python number crosses the schema as the float32 tensor the module makes of it (checked there).
        kv_scale = _check_kv_scale(kv_scale, kv_cache, q.device)
    schedule = (None, None, None, [])
    if metadata is not None:
        if not isinstance(metadata, MlaSchedule):
            raise TypeError(f"metadata: expected an MlaSchedule from get_mla_metadata, got {type(metadata).__name__}")
        # What the schedule was planned for crosses too, so the op refuses a stale schedule as the module does.
        version = -1 if metadata.seqlens_version is None else metadata.seqlens_version
        schedule = (metadata.part_splits, metadata.splits, metadata.split_offsets,
                    [metadata.num_q_tokens_per_head_k, metadata.num_heads_k, metadata.seqlens_ptr, version])
    _validate.same_device(q, "q", kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                          kv_scale=kv_scale)
    return _mla_decode_op(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, kv_scale,
                          *schedule, _backend_name(backend))


# ---- MoE permute / unpermute --------------------------------------------------------------------------

@_define_op("permute_to_experts(Tensor x, Tensor? x_scales, Tensor topk_idx, int alignment, "
            "int? num_local_experts, bool check_ids, str backend) -> (Tensor, Tensor, Tensor, Tensor)")
def _permute_to_experts_op(x: Tensor, x_scales: Optional[Tensor], topk_idx: Tensor, alignment: int,
                           num_local_experts: Optional[int], check_ids: bool,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    recv_x = x if x_scales is None else (x, x_scales)
    sorted_x, m_indices, perm = _moe.permute_to_experts(recv_x, topk_idx, alignment, num_local_experts,
                                                        backend=backend, check_ids=check_ids)
    if x_scales is None:
        # A schema cannot return an optional tensor: no scales travel as an empty [M, 0] tensor.
        sorted_scales = torch.empty((sorted_x.shape[0], 0), dtype=torch.float32, device=x.device)
    else:
        sorted_x, sorted_scales = sorted_x
    return sorted_x.contiguous(), sorted_scales.contiguous(), m_indices.contiguous(), perm.contiguous()


@torch.library.register_fake(_permute_to_experts_op, lib=_LIBRARY)
def _(x, x_scales, topk_idx, alignment, num_local_experts, check_ids, backend):
    # The row count depends on how many tokens each expert received: a size only the data can tell.
    rows = torch.library.get_ctx().new_dynamic_size()
    scale_cols = 0 if x_scales is None else x_scales.shape[1]
    return (x.new_empty((rows, x.shape[1])), x.new_empty((rows, scale_cols), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.int32), x.new_empty(topk_idx.shape, dtype=torch.int32))


def permute_to_experts(recv_x, recv_topk_idx: Tensor, alignment: int = 128, num_local_experts: Optional[int] = None,
                       backend: str = "auto", check_ids: bool = True):
    if isinstance(recv_x, (tuple, list)):
        if len(recv_x) != 2:
            raise TypeError(f"recv_x: expected a tensor or a (x_fp8, scales) pair, got a sequence of {len(recv_x)}")
        data, scales = _validate.tensor(recv_x[0], "recv_x[0]"), _validate.tensor(recv_x[1], "recv_x[1]")
        _validate.same_device(data, "recv_x[0]", **{"recv_x[1]": scales})
    else:
        data, scales = _validate.tensor(recv_x, "recv_x"), None
    _validate.tensor(recv_topk_idx, "recv_topk_idx")
    _on_a_device(data, "recv_x")
    _validate.same_device(data, "recv_x", recv_topk_idx=recv_topk_idx)
    _validate.power_of_two(alignment, "alignment")
    if num_local_experts is not None:
        _validate.integer(num_local_experts, "num_local_experts", low=None, high=None)
    _validate.boolean(check_ids, "check_ids")
    sorted_x, sorted_scales, m_indices, perm = _permute_to_experts_op(data, scales, recv_topk_idx, alignment,
                                                                      num_local_experts, check_ids,
                                                                      _backend_name(backend))
    return (sorted_x if scales is None else (sorted_x, sorted_scales)), m_indices, perm


@_define_op("unpermute_from_experts(Tensor y_sorted, Tensor perm, Tensor recv_topk_weights, str backend) -> Tensor")
def _unpermute_from_experts_op(y_sorted: Tensor, perm: Tensor, recv_topk_weights: Tensor, backend: str) -> Tensor:
    return _moe.unpermute_from_experts(y_sorted, perm, recv_topk_weights, backend).contiguous()


@torch.library.register_fake(_unpermute_from_experts_op, lib=_LIBRARY)
def _(y_sorted, perm, recv_topk_weights, backend):
    return y_sorted.new_empty((perm.shape[0], y_sorted.shape[1]))


def unpermute_from_experts(y_sorted: Tensor, perm: Tensor, recv_topk_weights: Tensor, backend: str = "auto") -> Tensor:
    for name, t in (("y_sorted", y_sorted), ("perm", perm), ("recv_topk_weights", recv_topk_weights)):
        _validate.tensor(t, name)
    _on_a_device(y_sorted, "y_sorted")
    _validate.same_device(y_sorted, "y_sorted", perm=perm, recv_topk_weights=recv_topk_weights)
    return _unpermute_from_experts_op(y_sorted, perm, recv_topk_weights, _backend_name(backend))


for _public, _module_function in ((per_token_group_quant_fp8, _quant.per_token_group_quant_fp8),
                                  (per_block_quant_fp8, _quant.per_block_quant_fp8),
                                  (fp8_gemm_nt, _gemm.fp8_gemm_nt),
                                  (m_grouped_fp8_gemm_nt_contiguous, _gemm.m_grouped_fp8_gemm_nt_contiguous),
                                  (m_grouped_fp8_gemm_nt_masked, _gemm.m_grouped_fp8_gemm_nt_masked),
                                  (mla_decode, _mla_decode),
                                  (permute_to_experts, _moe.permute_to_experts),
                                  (unpermute_from_experts, _moe.unpermute_from_experts)):
    _public.__doc__ = _module_function.__doc__
del _public, _module_function
