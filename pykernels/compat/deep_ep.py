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

dispatch(num_worst_tokens=N) returns N rows without reading any tensor value on the host, as DeepEP's; its
per-expert list is empty (handle.inner.num_recv_tokens_per_expert holds the counts on the device).

Low-latency mode (Buffer(group, num_rdma_bytes=..., low_latency_mode=True, num_qps_per_rank=...)):

    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(x, topk_idx, M, E)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(recv_x, weights, y, recv_count, expected_m)
    combined_x, event, hook = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)

over pykernels.moe.Buffer.low_latency_dispatch / low_latency_combine: one equal-split all-to-all each way,
no host reads. The buffer sizes (num_nvl_bytes, num_rdma_bytes, get_low_latency_rdma_size_hint) and
num_qps_per_rank have no meaning over torch.distributed, where each call allocates its own buffers: they are
accepted and unused, and clean_low_latency_buffer has nothing to clean. The FP8 scales come MN-major and
TMA-aligned, the layout DeepEP hands DeepGEMM's masked GEMM (and pykernels' masked GEMM accepts);
cumulative_local_expert_recv_stats is accumulated from recv_count on the device; hook is None.

Absent here and raising NotImplementedError: internode (RDMA) kernels, mpi4py communicators, shrink mode,
and in low-latency mode power-of-two / UE8M0 scales (round_scale, use_ue8m0), the split send/receive phases
(return_recv_hook=True), LogFMT combine, zero-copy combine and the wait-time statistics. The normal handle's
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


class LowLatencyHandle(tuple):
    """low_latency_dispatch's handle, a tuple shaped as DeepEP's: (src_info [L, W * M] int32, layout_range
    [L, W] int64, M, H, num_experts), carrying pykernels' own handle. Both tensors are derived on the device
    from where pykernels placed each received row, so building them reads nothing on the host."""

    def __new__(cls, inner: pykernels.moe.LowLatencyHandle, world: int):
        row, m = inner.row, inner.max_tokens_per_rank
        rows = world * m
        num_local = inner.num_experts // world
        ids = inner.recv[:, row.id_word:row.id_word + row.topk].long()
        pos = inner.pos.long()
        placed = pos >= 0
        # Every write has a fixed shape: the -1 slots land in one spare entry past the L * S real ones.
        dest = torch.where(placed, ids.clamp(min=0) * rows + pos, num_local * rows)
        token = (torch.arange(rows, device=ids.device) % m).to(torch.int32)
        src_info = torch.zeros(num_local * rows + 1, dtype=torch.int32, device=ids.device)
        src_info[dest.view(-1)] = token.unsqueeze(1).expand(rows, row.topk).reshape(-1)
        experts = torch.arange(num_local, device=ids.device)
        holds = ((ids.unsqueeze(2) == experts) & placed.unsqueeze(2)).any(dim=1)  # [S, L]
        counts = holds.view(world, m, num_local).sum(dim=1).T.contiguous()  # [L, W]
        begins = torch.cumsum(counts, dim=1) - counts
        layout_range = (begins << 32) | counts
        self = super().__new__(cls, (src_info[:num_local * rows].view(num_local, rows), layout_range, m,
                                     row.hidden, inner.num_experts))
        self.inner = inner
        return self


def _payload(x):
    """x as pykernels takes it: FP8 scales made row-major (DeepEP accepts them column-major)."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise TypeError(f"x: expected a tensor or an (x_fp8, scales) pair, got a tuple of {len(x)}")
        return x[0], _validate.tensor(x[1], "x[1]").contiguous()
    return x


class Buffer:
    """DeepEP's V1 Buffer, normal (intranode) and low-latency modes, over a torch.distributed group
    (pykernels.moe.Buffer underneath)."""

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None) -> None:
        if comm is not None:
            raise missing("mpi4py communicators (comm=...)", ANCHOR)
        if enable_shrink:
            raise missing("shrink mode (enable_shrink=True)", ANCHOR)
        _validate.integer(num_nvl_bytes, "num_nvl_bytes", low=0, high=None)
        _validate.integer(num_rdma_bytes, "num_rdma_bytes", low=0, high=None)
        _validate.boolean(low_latency_mode, "low_latency_mode")
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
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

    def _gathered_counts(self, num_tokens_per_rank: torch.Tensor, num_tokens_per_expert: torch.Tensor):
        """One all-gather of every rank's layout counts -> (rank prefix matrix [W, W] int32: entry (i, j)
        counts the rows ranks 0..i send to rank j; rows each local expert receives [L] int32), both on the
        device."""
        mine = torch.cat([num_tokens_per_rank.to(torch.int32), num_tokens_per_expert.to(torch.int32)]).contiguous()
        gathered = [torch.empty_like(mine) for _ in range(self.group_size)]
        self._dist.all_gather(gathered, mine, group=self._moe.transport.group)
        table = torch.stack(gathered)
        world = self.group_size
        num_local = num_tokens_per_expert.shape[0] // world
        local = table[:, world + self.rank * num_local:world + (self.rank + 1) * num_local]
        return torch.cumsum(table[:, :world], dim=0).to(torch.int32), local.sum(dim=0).to(torch.int32)

    def dispatch(self, x, handle: Optional[DispatchHandle] = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0, config=None,
                 previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event); the
        middle four are None for a cached dispatch (handle=...), and the index and weights None when
        topk_idx is not given. num_worst_tokens=N: recv_x has N rows (every rank must pass the same N, at
        least the rows any rank receives; rows past it are dropped), the rows past the received count carry
        ids -1, weights 0 and a zero payload, the per-expert list is empty, and no tensor value is read on
        the host."""
        if num_tokens_per_rdma_rank is not None:
            raise missing("internode dispatch (num_tokens_per_rdma_rank)", ANCHOR)
        _validate.integer(expert_alignment, "expert_alignment", low=1)
        _validate.integer(num_worst_tokens, "num_worst_tokens", low=0)
        payload = _payload(x)
        buffer = self._buffer()
        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise TypeError(f"handle: expected the handle dispatch returned, got {type(handle).__name__}")
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx, topk_weights: expected None with handle= (a cached dispatch repeats the "
                                 "handle's routing), got tensors")
            routing_idx, routing_weights, num_experts, layout, worst = handle.routing
            recv_x, _, _, _, _ = buffer.dispatch(payload, routing_idx, routing_weights, num_experts, layout=layout,
                                                 num_worst_tokens=worst)
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
        worst = num_worst_tokens or None
        recv_x, recv_topk_idx, recv_topk_weights, _, inner = buffer.dispatch(
            payload, topk_idx, topk_weights, num_experts, layout=layout, num_worst_tokens=worst)
        # As DeepEP: the per-expert counts come from the senders' num_tokens_per_expert (the received ids
        # cannot give them when topk_idx is not sent).
        rank_prefix_matrix, per_expert = self._gathered_counts(num_tokens_per_rank, num_tokens_per_expert)
        if worst is None:
            per_expert = [-(-count // expert_alignment) * expert_alignment for count in per_expert.tolist()]
        else:
            per_expert = []
        handle = DispatchHandle(rank_prefix_matrix, is_token_in_rank, inner,
                                (topk_idx, topk_weights, num_experts, layout, worst))
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

    def _require_low_latency_mode(self, op: str) -> None:
        if not self.low_latency_mode:
            raise ValueError(f"low_latency_mode: expected True for {op} (as DeepEP requires), got False")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: every low-latency call allocates its buffers afresh, so no state survives a call."""
        self._require_low_latency_mode("clean_low_latency_buffer")
        _validate.integer(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", low=1)
        _validate.integer(hidden, "hidden", low=1)
        _validate.integer(num_experts, "num_experts", low=1)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """The bytes of the largest tensor one low-latency dispatch allocates, its bf16 recv_x
        [num_experts / num_ranks, num_ranks * M, hidden] (= num_experts * M * hidden * 2). Buffer reserves
        nothing up front (any num_rdma_bytes is accepted), so this is a guide to the memory the mode
        takes per call, not a size to pass."""
        m = _validate.integer(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", low=1)
        _validate.integer(hidden, "hidden", low=1)
        _validate.integer(num_ranks, "num_ranks", low=1)
        _validate.integer(num_experts, "num_experts", low=1)
        if num_experts % num_ranks:
            raise ValueError(f"num_experts: expected a multiple of num_ranks = {num_ranks}, got {num_experts}")
        return num_experts * m * hidden * 2

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """-> (recv_x, recv_count [L] int32, handle, event, None). recv_x is [L, W * M, H]: an (FP8 e4m3,
        scales float32 [L, W * M, H / 128]) pair when use_fp8, the scales MN-major and TMA-aligned (strides
        (M_pad * H / 128, 1, M_pad), M_pad = W * M rounded up to 4: DeepGEMM's masked-GEMM layout), else
        bf16. recv_x[e, :recv_count[e]] are the tokens for local expert e, by source rank then token; later
        rows are unspecified. handle = (src_info [L, W * M] int32: each row's token index on its source
        rank; layout_range [L, W] int64: (first row << 32) | rows, per source rank; M, H, num_experts).
        cumulative_local_expert_recv_stats (int32 [L]) is incremented by recv_count on the device."""
        self._require_low_latency_mode("low_latency_dispatch")
        if dispatch_wait_recv_cost_stats is not None:
            raise missing("receive wait-time statistics (dispatch_wait_recv_cost_stats)", ANCHOR)
        if round_scale or use_ue8m0:
            raise missing("power-of-two (round_scale) and UE8M0 (use_ue8m0) scales in low-latency dispatch", ANCHOR)
        if return_recv_hook:
            raise missing("split send and receive phases (return_recv_hook=True)", ANCHOR)
        if cumulative_local_expert_recv_stats is not None:
            num_local = _validate.integer(num_experts, "num_experts", low=1) // self.group_size
            _validate.tensor(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats", (torch.int32,),
                             ndim=1, contiguous=True)
            _validate.shape(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats", (num_local,),
                            "[num_local_experts]")
        recv_x, recv_scales, recv_count, inner = self._buffer().low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=use_fp8)
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats.add_(recv_count)
        if use_fp8:
            recv_x = (recv_x, pykernels.get_mn_major_tma_aligned_tensor(recv_scales))
        return recv_x, recv_count, LowLatencyHandle(inner, self.group_size), EventOverlap(), None

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """x: bf16 [L, W * M, H], the experts' outputs in the dispatch's receive layout -> (combined_x bf16
        [T, H] = sum over each token's slots of topk_weights times its expert's output (float32, rounded
        once), event, None); written into `out` when given."""
        self._require_low_latency_mode("low_latency_combine")
        if use_logfmt:
            raise missing("LogFMT combine (use_logfmt=True)", ANCHOR)
        if zero_copy:
            raise missing("zero-copy combine (zero_copy=True, get_next_low_latency_combine_buffer)", ANCHOR)
        if return_recv_hook:
            raise missing("split send and receive phases (return_recv_hook=True)", ANCHOR)
        if combine_wait_recv_cost_stats is not None:
            raise missing("receive wait-time statistics (combine_wait_recv_cost_stats)", ANCHOR)
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle low_latency_dispatch returned, got {type(handle).__name__}")
        if out is not None:
            _validate.tensor(x, "x", ndim=3)
            _validate.tensor(topk_idx, "topk_idx", ndim=2)
            _validate.tensor(out, "out", (torch.bfloat16,))
            _validate.shape(out, "out", (topk_idx.shape[0], x.shape[2]), "[num_tokens, hidden]")
        combined = self._buffer().low_latency_combine(x, topk_idx, topk_weights, handle.inner)
        if out is None:
            return combined, EventOverlap(), None
        out.copy_(combined)
        return out, EventOverlap(), None

    def get_next_low_latency_combine_buffer(self, handle):
        raise missing("zero-copy combine (get_next_low_latency_combine_buffer)", ANCHOR)
