"""DeepEP's V1 (legacy) Buffer over pykernels.moe.Buffer, mirroring deepseek-ai/DeepEP @dd758ca
(deep_ep/buffers/legacy.py) for intranode expert parallelism:

    buffer = deep_ep.Buffer(group)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=..., is_token_in_rank=..., num_tokens_per_expert=..., topk_idx=..., topk_weights=...)
    combined_x, combined_topk_weights, event = buffer.combine(y, handle, topk_weights=recv_topk_weights)

As there: layout counts are int32 (int32 or int64 accepted back), x is bfloat16 or an FP8 (x, scales) pair
whose scales may be column-major, recv_x keeps x's form, rows arrive grouped by source rank, recv_topk_idx
holds local expert ids (-1 for other ranks' experts, whose weights arrive 0), the per-expert list is rounded
up to expert_alignment, handle[0] is the rank prefix matrix (rows from ranks 0..i to rank j) and handle[4]
is_token_in_rank, dispatch(x, handle=handle) repeats a dispatch's routing for new x, and combine sums over
ranks without weights (reducing topk_weights alike, adding bias). Any torch.distributed group works: NCCL on
GPUs, gloo on CPUs. pykernels runs every stage on the caller's current stream, so the events returned are
already complete for it; async_finish and previous_event are accepted to that effect.

Absent here and raising NotImplementedError: low-latency mode, internode (RDMA) buffers, num_worst_tokens
(pykernels' transport reads the counts on the host), mpi4py communicators and shrink mode. The handle's
entries 1, 2, 3 and 5 (DeepEP's channel prefix matrices, source indices and send heads, specific to its
NVLink kernels) are None.
"""

from __future__ import annotations

from typing import Optional

import torch

import pykernels
from pykernels import _validate
from pykernels.compat import backend, missing

ANCHOR = "DeepEP"
topk_idx_t = torch.int64


class Config:
    """DeepEP's performance-tuning config (SMs, chunk sizes): accepted and unused."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class EventOverlap:
    """The event DeepEP returns. Every pykernels stage is ordered on the caller's current stream, so there is
    nothing to wait for: current_stream_wait() and the context manager do nothing."""

    def __init__(self, event=None, extra_tensors=None):
        self.event, self.extra_tensors = event, extra_tensors

    def current_stream_wait(self, release_handle: bool = False) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        return None


class DispatchHandle(tuple):
    """dispatch's handle, a tuple shaped as DeepEP's: (rank_prefix_matrix [W, W] int32, None, None, None,
    is_token_in_rank [T, W] bool, None), carrying pykernels' own handle and the routing a cached dispatch
    repeats."""

    def __new__(cls, rank_prefix_matrix, is_token_in_rank, inner, routing):
        self = super().__new__(cls, (rank_prefix_matrix, None, None, None, is_token_in_rank, None))
        self.inner, self.routing = inner, routing
        return self


def _payload(x):
    """x as pykernels takes it: FP8 scales made row-major (DeepEP accepts them column-major)."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise TypeError(f"x: expected a tensor or an (x_fp8, scales) pair, got a tuple of {len(x)}")
        return x[0], _validate.tensor(x[1], "x[1]").contiguous()
    return x


class Buffer:
    """DeepEP's intranode Buffer over a torch.distributed group (pykernels.moe.Buffer underneath)."""

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None) -> None:
        if low_latency_mode:
            raise missing("low-latency mode (low_latency_mode=True)", ANCHOR)
        if num_rdma_bytes:
            raise missing("RDMA buffers (num_rdma_bytes > 0: internode and low-latency kernels)", ANCHOR)
        if comm is not None:
            raise missing("mpi4py communicators (comm=...)", ANCHOR)
        if enable_shrink:
            raise missing("shrink mode (enable_shrink=True)", ANCHOR)
        import torch.distributed as dist

        self._dist = dist
        self._moe = pykernels.moe.Buffer(group, backend=backend())
        self.group = group
        self.rank, self.group_size = self._moe.rank, self._moe.world_size

    def _buffer(self) -> pykernels.moe.Buffer:
        """pykernels' Buffer with the backend $PYKERNELS_BACKEND names now, over the same transport."""
        return pykernels.moe.Buffer(self.group, backend=backend(), transport=self._moe.transport)

    @staticmethod
    def is_sm90_compiled() -> bool:
        return pykernels.backends()["cuda"]["extension_built"]

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap()

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config()

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config()

    def destroy(self) -> None:
        return None

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """-> (num_tokens_per_rank [W] int32, None (no RDMA ranks), num_tokens_per_expert [E] int32,
        is_token_in_rank [T, W] bool, event)."""
        per_rank, per_expert, in_rank = self._buffer().get_dispatch_layout(topk_idx, num_experts)
        return per_rank.to(torch.int32), None, per_expert.to(torch.int32), in_rank, EventOverlap()

    def _rank_prefix_matrix(self, num_tokens_per_rank: torch.Tensor) -> torch.Tensor:
        """[W, W] int32: entry (i, j) counts the rows ranks 0..i send to rank j (one all-gather of W counts)."""
        mine = num_tokens_per_rank.to(torch.int32).contiguous()
        gathered = [torch.empty_like(mine) for _ in range(self.group_size)]
        self._dist.all_gather(gathered, mine, group=self._moe.transport.group)
        return torch.cumsum(torch.stack(gathered), dim=0).to(torch.int32)

    def dispatch(self, x, handle: Optional[DispatchHandle] = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0, config=None,
                 previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event); the
        middle four are None for a cached dispatch (handle=...), and the index and weights None when
        topk_idx is not given."""
        if num_worst_tokens:
            raise missing("num_worst_tokens (a fixed-size receive without a host sync)", ANCHOR)
        if num_tokens_per_rdma_rank is not None:
            raise missing("internode dispatch (num_tokens_per_rdma_rank)", ANCHOR)
        _validate.integer(expert_alignment, "expert_alignment", low=1)
        payload = _payload(x)
        buffer = self._buffer()
        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise TypeError(f"handle: expected the handle dispatch returned, got {type(handle).__name__}")
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx, topk_weights: expected None with handle= (a cached dispatch repeats the "
                                 "handle's routing), got tensors")
            routing_idx, routing_weights, num_experts, layout = handle.routing
            recv_x, _, _, _, _ = buffer.dispatch(payload, routing_idx, routing_weights, num_experts, layout=layout)
            return recv_x, None, None, None, None, EventOverlap()

        for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
            if value is None:
                raise TypeError(f"{name}: expected the tensor get_dispatch_layout returns, got None")
            _validate.tensor(value, name)
        num_experts = num_tokens_per_expert.shape[0]
        data = payload[0] if isinstance(payload, tuple) else payload
        _validate.tensor(data, "x[0]" if isinstance(payload, tuple) else "x", ndim=2)
        with_topk = topk_idx is not None
        if with_topk:
            _validate.tensor(topk_idx, "topk_idx")
            if topk_weights is None:
                topk_weights = torch.zeros(topk_idx.shape, dtype=torch.float32, device=topk_idx.device)
        else:
            # Routing follows is_token_in_rank alone; no expert ids travel with the rows.
            topk_idx = torch.full((data.shape[0], 1), -1, dtype=torch.int64, device=data.device)
            topk_weights = torch.zeros((data.shape[0], 1), dtype=torch.float32, device=data.device)
        layout = (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank)
        recv_x, recv_topk_idx, recv_topk_weights, per_expert, inner = buffer.dispatch(
            payload, topk_idx, topk_weights, num_experts, layout=layout)
        per_expert = [-(-count // expert_alignment) * expert_alignment for count in per_expert]
        handle = DispatchHandle(self._rank_prefix_matrix(num_tokens_per_rank), is_token_in_rank, inner,
                                (topk_idx, topk_weights, num_experts, layout))
        if not with_topk:
            recv_topk_idx = recv_topk_weights = None
        return recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, EventOverlap()

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias=None, config=None, previous_event=None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """-> (combined_x [T, H], combined_topk_weights [T, k] or None, event): each token's rows (and weights)
        summed over the ranks it was sent to, plus bias (a tensor or a pair of [T, H] tensors)."""
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the handle dispatch returned, got {type(handle).__name__}")
        buffer = self._buffer()
        combined = buffer.combine(x, handle.inner)
        combined_weights = None
        if topk_weights is not None:
            combined_weights = buffer.combine(_validate.tensor(topk_weights, "topk_weights").contiguous(),
                                              handle.inner)
        if bias is not None:
            biases = bias if isinstance(bias, tuple) else (bias,)
            total = combined.float()
            for i, b in enumerate(biases):
                _validate.tensor(b, f"bias[{i}]")
                _validate.shape(b, f"bias[{i}]", tuple(combined.shape), "[num_tokens, hidden]")
                total = total + b.float()
            combined = total.to(combined.dtype)
        return combined, combined_weights, EventOverlap()

    def internode_dispatch(self, *args, **kwargs):
        raise missing("internode dispatch (RDMA)", ANCHOR)

    def internode_combine(self, *args, **kwargs):
        raise missing("internode combine (RDMA)", ANCHOR)

    def low_latency_dispatch(self, *args, **kwargs):
        raise missing("low-latency dispatch", ANCHOR)

    def low_latency_combine(self, *args, **kwargs):
        raise missing("low-latency combine", ANCHOR)

    def clean_low_latency_buffer(self, *args, **kwargs):
        raise missing("low-latency mode", ANCHOR)

    @staticmethod
    def get_low_latency_rdma_size_hint(*args, **kwargs):
        raise missing("low-latency mode", ANCHOR)
