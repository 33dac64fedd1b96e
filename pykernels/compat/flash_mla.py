"""FlashMLA's decode interface over pykernels, mirroring deepseek-ai/FlashMLA @9241ae3
(flash_mla/flash_mla_interface.py) for dense decoding:

    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata()        # any arguments, ignored
    out, lse = flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                                tile_scheduler_metadata, num_splits, causal=True)

As there, get_mla_metadata returns (FlashMLASchedMeta(), None) and the schedule is planned on the first call
that uses it (pykernels' split-KV planner, for these cache_seqlens); reusing it is valid for the same
cache_seqlens tensor while it is not written in place (every layer of one decode step), and a call whose
shapes or flags differ from the first, or whose lengths were rewritten since, raises. q is
bfloat16 [b, s_q, h_q, 576], k_cache [num_blocks, 64, 1, 576] bfloat16, and a request of length 0 gives
out 0 and lse +inf. FlashMLA features pykernels lacks raise NotImplementedError naming them: sparse
attention (indices=, topk_length=, extra_k_cache=, the DeepSeek-V3.2 FP8 cache of 656 bytes per token that
is_fp8_kvcache=True selects), attention sinks, and more than one KV head. pykernels' own dense FP8 cache
(float8_e4m3fn with a per-tensor scale) is reached through pykernels.mla_decode(kv_scale=...).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import pykernels
from pykernels import _validate
from pykernels.compat import backend, missing

ANCHOR = "FlashMLA"


@dataclasses.dataclass
class FlashMLASchedMeta:
    """The schedule get_mla_metadata hands out empty and the first flash_mla_with_kvcache call fills.
    tile_scheduler_metadata and num_splits hold pykernels' counterparts (MlaSchedule.part_splits, the split
    range of each SM part, and MlaSchedule.split_offsets, the splits of each request), for inspection."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]
        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None
    num_splits: Optional[torch.Tensor] = None
    schedule: Optional[pykernels.MlaSchedule] = None


def get_mla_metadata(*args, **kwargs):
    """-> (FlashMLASchedMeta(), None). The arguments of the original interface (cache_seqlens,
    s_q * h_q // h_kv, h_kv) are accepted and unused: planning happens on first use."""
    return FlashMLASchedMeta(), None


def _check_sparse_arguments(is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache,
                            topk_length, extra_topk_length) -> None:
    sparse = {"indices": indices, "extra_k_cache": extra_k_cache, "extra_indices_in_kvcache": extra_indices_in_kvcache,
              "topk_length": topk_length, "extra_topk_length": extra_topk_length}
    for name, value in sparse.items():
        if value is not None:
            raise missing(f"sparse attention ({name}=...)", ANCHOR)
    if attn_sink is not None:
        raise missing("attention sinks (attn_sink=...)", ANCHOR)
    if is_fp8_kvcache:
        raise missing("the FP8 KV cache of is_fp8_kvcache=True (FlashMLA's 656-byte per-token layout with "
                      "per-128 scales; pykernels.mla_decode takes a float8_e4m3fn cache with a per-tensor "
                      "kv_scale instead)", ANCHOR)


def _config(q, k_cache, causal) -> FlashMLASchedMeta.Config:
    return FlashMLASchedMeta.Config(b=q.shape[0], s_q=q.shape[1], h_q=q.shape[2], page_block_size=k_cache.shape[1],
                                    h_k=k_cache.shape[2], causal=causal, is_fp8_kvcache=False, topk=None,
                                    extra_page_block_size=None, extra_topk=None)


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
                           cache_seqlens: Optional[torch.Tensor], head_dim_v: int,
                           tile_scheduler_metadata: FlashMLASchedMeta, num_splits: None = None,
                           softmax_scale: Optional[float] = None, causal: bool = False, is_fp8_kvcache: bool = False,
                           indices: Optional[torch.Tensor] = None, attn_sink: Optional[torch.Tensor] = None,
                           extra_k_cache: Optional[torch.Tensor] = None,
                           extra_indices_in_kvcache: Optional[torch.Tensor] = None,
                           topk_length: Optional[torch.Tensor] = None,
                           extra_topk_length: Optional[torch.Tensor] = None):
    """Dense MLA decode. Returns (out [b, s_q, h_q, head_dim_v] in q's dtype, softmax_lse [b, h_q, s_q]
    float32). softmax_scale defaults to 576 ** -0.5; causal applies when s_q > 1."""
    sched_meta = tile_scheduler_metadata
    if not isinstance(sched_meta, FlashMLASchedMeta):
        raise TypeError("tile_scheduler_metadata: expected the FlashMLASchedMeta that get_mla_metadata returns, "
                        f"got {type(sched_meta).__name__}")
    if num_splits is not None:
        raise TypeError(f"num_splits: expected None (the second value get_mla_metadata returns), "
                        f"got {type(num_splits).__name__}")
    _check_sparse_arguments(is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
                            extra_topk_length)
    if block_table is None or cache_seqlens is None:
        raise TypeError("block_table, cache_seqlens: expected tensors for dense attention, got None")
    _validate.tensor(q, "q", ndim=4)
    _validate.tensor(k_cache, "k_cache", ndim=4)
    _validate.tensor(cache_seqlens, "cache_seqlens", (torch.int32,), ndim=1)
    _validate.tensor(block_table, "block_table", (torch.int32,), ndim=2)
    _validate.boolean(causal, "causal")
    if k_cache.shape[2] != 1:
        raise missing(f"more than one KV head (k_cache has {k_cache.shape[2]} in dim 2)", ANCHOR)
    config = _config(q, k_cache, causal)
    if sched_meta.have_initialized and sched_meta.config != config:
        raise ValueError(f"tile_scheduler_metadata: expected a call consistent with the first one that used it "
                         f"({sched_meta.config}), got {config}; use a fresh get_mla_metadata() per shape")

    # Length-0 requests give out 0 and lse +inf natively, as FlashMLA's; the schedule is planned on first use
    # for this cache_seqlens, which mla_decode then holds every later call to.
    if not sched_meta.have_initialized:
        schedule = pykernels.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1)
        sched_meta.have_initialized, sched_meta.config, sched_meta.schedule = True, config, schedule
        sched_meta.tile_scheduler_metadata, sched_meta.num_splits = schedule.part_splits, schedule.split_offsets
    out, lse = pykernels.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                    metadata=sched_meta.schedule, backend=backend())
    return out, lse
