"""MoE expert-parallel dispatch and combine over torch.distributed, with DeepEP's semantics, and the bridge
to the grouped FP8 GEMM (permute_to_experts / unpermute_from_experts).

    buffer = Buffer(group)                      # NCCL on GPUs, gloo on CPUs
    recv_x, recv_idx, recv_w, per_expert, handle = buffer.dispatch(x, topk_idx, topk_weights, num_experts)
    x_sorted, m_indices, perm = permute_to_experts(recv_x, recv_idx)
    y_sorted = m_grouped_fp8_gemm_nt_contiguous(x_sorted, weights, m_indices)
    y = unpermute_from_experts(y_sorted, perm, recv_w)
    out = buffer.combine(y, handle)             # [T, H] on the source ranks

Decode (low-latency mode, fixed-size buffers, no host reads, CUDA-graph capturable):

    recv_x, recv_scales, recv_count, h = buffer.low_latency_dispatch(x, topk_idx, max_tokens, num_experts)
    y = m_grouped_fp8_gemm_nt_masked((recv_x, recv_scales), weights, recv_count, expected_m)
    out = buffer.low_latency_combine(y, topk_idx, topk_weights, h)

The stage definitions are in pykernels/reference/moe.py. On the checked paths every rank joins a small
agreement header before any rows move, even when its own arguments were refused, so a bad call or a
disagreement between ranks raises on every rank instead of leaving some waiting in a collective; the paths
that read nothing on the host (num_worst_tokens, low-latency mode) check arguments locally only (the
README's MoE section lists what each mode promises).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass

import torch

from pykernels import _backend, _validate
from pykernels._validate import FP8
from pykernels.reference import moe as reference

SCALE_GROUP = reference.SCALE_GROUP
# Limits of the CUDA kernels (csrc/moe/moe.cuh); beyond them the CUDA backend declines the call.
CUDA_MAX_WORLD = 64
CUDA_MAX_EXPERTS = 4096
CUDA_MAX_LOCAL_EXPERTS = 256
CUDA_MAX_TOPK = 32
PAYLOAD_DTYPES = (torch.bfloat16,)
# The most local experts permute_to_experts keeps counters for (per call, on any backend).
MAX_LOCAL_EXPERTS = 1 << 16
# The largest per-expert row alignment permute_to_experts pads to.
MAX_ALIGNMENT = 1 << 20
COMBINE_DTYPES = (torch.bfloat16, torch.float32)


# ---- transport -----------------------------------------------------------------------------------------

class Transport(abc.ABC):
    """Moves rows between the ranks of a group. Buffer talks to its transport through these two calls only,
    so a direct NVLink transport (CUDA IPC peer buffers) can replace the all-to-all one without any change
    to Buffer's API."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """counts [W, C] int64 (row r goes to rank r) -> [W, C] (row r came from rank r)."""

    @abc.abstractmethod
    def exchange_rows(self, send: torch.Tensor, send_splits: list, recv_splits: list) -> torch.Tensor:
        """send [sum(send_splits), ...], rows grouped by destination rank -> [sum(recv_splits), ...], rows
        grouped by source rank in rank order, each source's rows in the order it sent them."""

    @property
    def header_device(self) -> torch.device:
        """Where the small agreement header is exchanged when a rank has no valid tensor to place it by."""
        return torch.device("cpu")

    def exchange_equal(self, send: torch.Tensor) -> torch.Tensor:
        """send [W * n, ...], block r (n rows) for rank r -> [W * n, ...], block r from rank r. The split
        is fixed by the shape, so no count is read: the low-latency mode's only collective."""
        rows = send.shape[0] // self.world_size
        splits = [rows] * self.world_size
        return self.exchange_rows(send, splits, splits)


class AllToAllTransport(Transport):
    """torch.distributed all_to_all_single with uneven splits on the group's stream (NCCL on GPUs, gloo on
    CPUs, where the list form of all_to_all is missing in most releases). Rows travel as raw bytes, so every
    payload dtype (fp8 included) crosses backends that know only a few of them."""

    def __init__(self, group):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._nccl = dist.get_backend(group) == "nccl"

    @property
    def header_device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self._nccl else torch.device("cpu")

    def exchange_counts(self, counts):
        out = torch.empty_like(counts)
        self._dist.all_to_all_single(out, counts, group=self.group)
        return out

    def exchange_rows(self, send, send_splits, recv_splits):
        row_shape = send.shape[1:]
        row_bytes = math.prod(row_shape) * send.element_size()
        send_bytes = send.contiguous().view(torch.uint8).reshape(send.shape[0], row_bytes)
        recv_bytes = torch.empty((sum(recv_splits), row_bytes), dtype=torch.uint8, device=send.device)
        self._dist.all_to_all_single(recv_bytes, send_bytes, output_split_sizes=list(recv_splits),
                                     input_split_sizes=list(send_splits), group=self.group)
        return recv_bytes.view(send.dtype).reshape(-1, *row_shape)

    def exchange_equal(self, send):
        send_bytes = send.contiguous().view(torch.uint8)
        recv_bytes = torch.empty_like(send_bytes)
        self._dist.all_to_all_single(recv_bytes, send_bytes, group=self.group)
        return recv_bytes.view(send.dtype)


# ---- stage implementations per backend -------------------------------------------------------------------

def _stages(which: str):
    """The module implementing the stages for a resolved backend (same functions as the reference)."""
    if which == "torch":
        return reference
    if which == "triton":
        from pykernels.triton import moe as triton_moe

        return triton_moe
    return _cuda_stages


class _CudaStages:
    """The reference's stage functions, run by the pykernels._C kernels on the caller's stream."""

    @staticmethod
    def _ext():
        ext, _ = _backend.extension()
        return ext

    def dispatch_layout(self, topk_idx, num_experts, world):
        t = topk_idx.shape[0]
        per_rank = torch.empty(world, dtype=torch.int64, device=topk_idx.device)
        per_expert = torch.empty(num_experts, dtype=torch.int64, device=topk_idx.device)
        slots = torch.empty((t, world), dtype=torch.int32, device=topk_idx.device)
        self._ext().moe_dispatch_layout(topk_idx, per_rank, per_expert, slots, num_experts,
                                        _backend.current_stream(topk_idx.device))
        return per_rank, per_expert, slots

    def pack(self, x, x_scales, topk_idx, topk_weights, token_slots, send_offsets, num_send, num_local,
             quantize=False):
        fp8 = x_scales is not None or quantize
        k = topk_idx.shape[1]
        send_x = torch.empty((num_send, x.shape[1]), dtype=FP8 if fp8 else x.dtype, device=x.device)
        meta = torch.empty((num_send, reference.meta_width(k, x.shape[1] if fp8 else None)), dtype=torch.int32,
                           device=x.device)
        self._ext().moe_pack(x, x_scales, topk_idx, topk_weights, token_slots, send_offsets, send_x, meta,
                             num_local, bool(quantize), _backend.current_stream(x.device))
        return send_x, meta

    def combine_reduce(self, buf, token_slots, send_offsets):
        out = torch.empty((token_slots.shape[0], buf.shape[1]), dtype=buf.dtype, device=buf.device)
        self._ext().moe_combine_reduce(buf, token_slots, send_offsets, out, _backend.current_stream(buf.device))
        return out

    def expert_ranks(self, topk_idx, num_local):
        counts = torch.empty(num_local, dtype=torch.int64, device=topk_idx.device)
        rank = torch.empty(topk_idx.shape, dtype=torch.int32, device=topk_idx.device)
        chunks = self._ext().moe_expert_rank_chunks(topk_idx.numel())
        workspace = torch.empty((chunks, num_local), dtype=torch.int32, device=topk_idx.device)
        self._ext().moe_expert_ranks(topk_idx, counts, rank, workspace, _backend.current_stream(topk_idx.device))
        return counts, rank

    def permute(self, x, x_scales, topk_idx, rank, starts, total_rows):
        x_sorted = torch.zeros((total_rows, x.shape[1]), dtype=x.dtype, device=x.device)
        s_sorted = None if x_scales is None else torch.zeros((total_rows, x_scales.shape[1]), dtype=torch.float32,
                                                             device=x.device)
        m_indices = torch.full((total_rows,), -1, dtype=torch.int32, device=x.device)
        pos = torch.empty(topk_idx.shape, dtype=torch.int32, device=x.device)
        self._ext().moe_permute(x, x_scales, topk_idx, rank, starts, x_sorted, s_sorted, m_indices, pos,
                                _backend.current_stream(x.device))
        return x_sorted, s_sorted, m_indices, pos

    def unpermute(self, y_sorted, pos, weights):
        out = torch.empty((pos.shape[0], y_sorted.shape[1]), dtype=y_sorted.dtype, device=y_sorted.device)
        self._ext().moe_unpermute(y_sorted, pos, weights, out, _backend.current_stream(y_sorted.device))
        return out


    # Low-latency stages (the reference's ll_* definitions).
    def ll_pack(self, x, topk_idx, num_experts, world, max_tokens, row):
        send = torch.empty((world * max_tokens, row.words), dtype=torch.int32, device=x.device)
        self._ext().moe_ll_pack(x, topk_idx, send, num_experts, world, max_tokens, row.scale_word, row.id_word,
                                row.fp8, _backend.current_stream(x.device))
        return send

    def ll_positions(self, recv, num_local, row):
        ids = recv[:, row.id_word:row.id_word + row.topk].long()
        valid = (ids >= 0) & (ids < num_local)
        # A row naming one expert twice takes one row of its block: rank only each id's first slot (the
        # CUDA expert-ranks kernels), then give the later slots the first one's row.
        first_slot = (ids.unsqueeze(2) == ids.unsqueeze(1)).int().argmax(dim=2)
        first = first_slot == torch.arange(row.topk, device=recv.device)
        counts, rank = self.expert_ranks(torch.where(valid & first, ids, -1), num_local)
        pos = torch.where(valid, rank.gather(1, first_slot), -1)
        return counts.to(torch.int32), pos.to(torch.int32)

    def ll_unpack(self, recv, pos, num_local, row):
        rows = recv.shape[0]
        recv_x = torch.empty((num_local, rows, row.hidden), dtype=row.payload_dtype, device=recv.device)
        recv_s = torch.empty((num_local, rows, row.num_scales), dtype=torch.float32, device=recv.device) \
            if row.fp8 else None
        self._ext().moe_ll_unpack(recv, pos, recv_x, recv_s, row.scale_word, row.id_word,
                                  _backend.current_stream(recv.device))
        return recv_x, recv_s

    def ll_combine_pack(self, y, recv, pos, row):
        ret = torch.empty((y.shape[1], row.topk, y.shape[2]), dtype=y.dtype, device=y.device)
        self._ext().moe_ll_combine_pack(y, recv, pos, ret, row.id_word, _backend.current_stream(y.device))
        return ret

    def ll_combine_reduce(self, returned, topk_idx, topk_weights, num_experts):
        out = torch.empty((topk_idx.shape[0], returned.shape[3]), dtype=returned.dtype, device=returned.device)
        self._ext().moe_ll_combine_reduce(returned, topk_idx, topk_weights, out, num_experts,
                                          _backend.current_stream(returned.device))
        return out


_cuda_stages = _CudaStages()


# ---- argument checks -------------------------------------------------------------------------------------

def _payload(x, name: str):
    """x as (data [T, H], scales [T, H/128] or None), checked: bf16, or an FP8 pair with H % 128 == 0."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise TypeError(f"{name}: expected a tensor or a (x_fp8, scales) pair, got a sequence of {len(x)}")
        data, scales = x
        _validate.tensor(data, f"{name}[0]", (FP8,), ndim=2, contiguous=True)
        _validate.tensor(scales, f"{name}[1]", (torch.float32,), ndim=2, contiguous=True)
        if data.shape[1] % SCALE_GROUP:
            raise ValueError(f"{name}[0]: expected a hidden size that is a multiple of {SCALE_GROUP} for FP8, "
                             f"got {data.shape[1]}")
        _validate.shape(scales, f"{name}[1]", (data.shape[0], data.shape[1] // SCALE_GROUP), "[T, H / 128]")
        _validate.same_device(data, f"{name}[0]", **{f"{name}[1]": scales})
        return data, scales
    _validate.tensor(x, name, PAYLOAD_DTYPES, ndim=2, contiguous=True)
    return x, None


def _routing(topk_idx, topk_weights, data, data_name: str, num_experts=None, idx_name: str = "topk_idx"):
    _validate.tensor(topk_idx, idx_name, (torch.int64,), ndim=2, contiguous=True)
    if topk_idx.shape[0] != data.shape[0]:
        raise ValueError(f"{idx_name}: expected {data.shape[0]} rows (one per token of {data_name}), "
                         f"got {topk_idx.shape[0]}")
    if topk_idx.shape[1] == 0:
        raise ValueError(f"{idx_name}: expected at least one expert slot per token, got 0")
    _validate.same_device(data, data_name, **{idx_name: topk_idx})
    if topk_weights is not None:
        _validate.tensor(topk_weights, "topk_weights", (torch.float32,), ndim=2, contiguous=True)
        _validate.shape(topk_weights, "topk_weights", tuple(topk_idx.shape), "same as topk_idx")
        _validate.same_device(topk_idx, "topk_idx", topk_weights=topk_weights)
    if num_experts is not None and topk_idx.numel():
        # One read of two scalars: the price of refusing a bad id before it corrupts another rank's buffers.
        lo, hi = _range_of(topk_idx)
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            raise ValueError(f"{idx_name}: expected expert ids in [0, {num_experts}) or -1, got {bad}")


def _range_of(t: torch.Tensor):
    """(min, max) of a non-empty integer tensor in one host read."""
    return tuple(torch.stack(torch.aminmax(t)).tolist())


def _num_experts(num_experts, world: int) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts: expected an int, got {type(num_experts).__name__}")
    if num_experts <= 0 or num_experts % world:
        raise ValueError(f"num_experts: expected a positive multiple of the group size {world}, got {num_experts}")
    return num_experts


# The agreement header's fields (see Buffer._agree), and how dtypes travel in it.
_DISPATCH_FIELDS = ("num_experts", "hidden size", "top-k", "payload dtype")
_COMBINE_FIELDS = ("hidden size", "combine dtype")
_DTYPE_CODES = {torch.bfloat16: 1, FP8: 2, torch.float32: 3}
_DTYPE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}


def _show(field: str, value: int) -> str:
    return _DTYPE_NAMES.get(value, str(value)) if field.endswith("dtype") else str(value)


def _device_of(*candidates) -> torch.device | None:
    for c in candidates:
        if isinstance(c, (tuple, list)) and c:
            c = c[0]
        if isinstance(c, torch.Tensor):
            return c.device
    return None


def _topk_of(handle, topk_idx) -> int:
    return (handle.topk_idx if handle is not None else topk_idx).shape[1]


def _join_rows(send_x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """[n, H] payload and [n, m] int32 metadata -> [n, bytes] uint8 rows: the payload padded to 4 bytes,
    then the metadata, so that one exchange carries both."""
    payload = send_x.view(torch.uint8).reshape(send_x.shape[0], send_x.shape[1] * send_x.element_size())
    pad = -payload.shape[1] % 4
    parts = [payload, meta.view(torch.uint8).reshape(meta.shape[0], meta.shape[1] * 4)]
    if pad:
        parts.insert(1, payload.new_zeros((payload.shape[0], pad)))
    return torch.cat(parts, dim=1)


def _split_rows(joined: torch.Tensor, dtype: torch.dtype, hidden: int, meta_width: int):
    """The inverse of _join_rows: ([n, H] of dtype, [n, meta_width] int32)."""
    payload_bytes = hidden * torch.empty((), dtype=dtype).element_size()
    meta_start = payload_bytes + (-payload_bytes % 4)
    data = joined[:, :payload_bytes].contiguous().view(dtype)
    meta = joined[:, meta_start:meta_start + 4 * meta_width].contiguous().view(torch.int32)
    return data, meta


# ---- layout and handle -----------------------------------------------------------------------------------

class DispatchLayout(tuple):
    """(num_tokens_per_rank [W], num_tokens_per_expert [E], is_token_in_rank [T, W] bool), as DeepEP returns
    them, carrying also token_slots [T, W] int32 (each token's row in its destinations' send segments)."""

    def __new__(cls, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, token_slots):
        self = super().__new__(cls, (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank))
        self.token_slots = token_slots
        return self

    num_tokens_per_rank = property(lambda self: self[0])
    num_tokens_per_expert = property(lambda self: self[1])
    is_token_in_rank = property(lambda self: self[2])


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs to send every row back and sum it into its token."""

    token_slots: torch.Tensor  # [T, W] int32, -1 where the token did not go
    send_offsets: torch.Tensor  # [W] int64 on the tokens' device: first send row of each destination
    send_splits: tuple  # rows sent to each rank
    recv_splits: tuple  # rows received from each rank
    topk_idx: torch.Tensor  # the routing, resent by dispatch(x, handle=...)
    topk_weights: torch.Tensor
    num_experts: int
    num_recv_tokens_per_expert: object  # list of L ints, or an int32 [L] device tensor (num_worst_tokens)
    num_worst_tokens: int | None = None
    recv_rows: torch.Tensor | None = None  # num_worst_tokens: output row of each received block row (spare = R)
    num_recv_tokens: torch.Tensor | None = None  # num_worst_tokens: int32 device scalar, rows received


@dataclass(frozen=True)
class LowLatencyHandle:
    """What low_latency_combine needs: the received rows (for their expert ids) and where each landed."""

    recv: torch.Tensor  # [W * M, row words] int32, the rows as received
    pos: torch.Tensor  # [W * M, k] int32: each received (row, slot)'s row in its expert's block, -1 = none
    row: reference.LowLatencyRow
    num_experts: int
    max_tokens_per_rank: int
    num_tokens: int  # T on this rank


class Buffer:
    """Expert-parallel dispatch and combine over a torch.distributed process group.

    group: a ProcessGroup (None = the default group). backend: which kernels run the local stages
    ("auto" | "cuda" | "triton" | "torch", chosen per call from the tensors' device). transport: how rows
    cross ranks; AllToAllTransport(group) unless given.
    """

    def __init__(self, group=None, backend: str = "auto", transport: Transport | None = None):
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(map(repr, _backend.BACKENDS))}, got {backend!r}")
        if transport is None:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise RuntimeError("Buffer: torch.distributed is not initialized; call "
                                   "torch.distributed.init_process_group first (nccl on GPUs, gloo on CPUs)")
            transport = AllToAllTransport(group if group is not None else dist.group.WORLD)
        elif not isinstance(transport, Transport):
            raise TypeError(f"transport: expected a pykernels.moe.Transport, got {type(transport).__name__}")
        self.group = group
        self.backend = backend
        self.transport = transport
        self.rank = transport.rank
        self.world_size = transport.world_size

    def _resolve(self, device, op, num_experts=None):
        cuda_ok = self.world_size <= CUDA_MAX_WORLD and (num_experts is None or num_experts <= CUDA_MAX_EXPERTS)
        return _backend.resolve(self.backend, device, op, cuda_ok=cuda_ok)

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """-> (num_tokens_per_rank [W] int64, num_tokens_per_expert [E] int64, is_token_in_rank [T, W] bool).
        Local: no communication."""
        _num_experts(num_experts, self.world_size)
        _validate.tensor(topk_idx, "topk_idx", (torch.int64,), ndim=2, contiguous=True)
        _routing(topk_idx, None, topk_idx, "topk_idx", num_experts)
        return self._layout(topk_idx, num_experts,
                            self._resolve(topk_idx.device, "moe get_dispatch_layout", num_experts))

    def _layout(self, topk_idx, num_experts, which) -> DispatchLayout:
        with _backend.on_device(topk_idx.device):
            per_rank, per_expert, slots = _stages(which).dispatch_layout(topk_idx, num_experts, self.world_size)
        return DispatchLayout(per_rank, per_expert, slots >= 0, slots)

    def _check_layout(self, layout, topk_idx, num_experts, host_reads=True):
        if not isinstance(layout, (tuple, list)) or len(layout) != 3:
            raise TypeError("layout: expected the (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank) "
                            f"that get_dispatch_layout returns, got {type(layout).__name__}")
        per_rank, per_expert, in_rank = layout
        t, w = topk_idx.shape[0], self.world_size
        for name, tensor, dtypes, shape in (("layout[0]", per_rank, (torch.int64, torch.int32), (w,)),
                                            ("layout[1]", per_expert, (torch.int64, torch.int32), (num_experts,)),
                                            ("layout[2]", in_rank, (torch.bool,), (t, w))):
            _validate.tensor(tensor, name, dtypes)
            _validate.shape(tensor, name, shape)
            _validate.same_device(topk_idx, "topk_idx", **{name: tensor})
        slots = getattr(layout, "token_slots", None)
        if slots is None:  # a layout built elsewhere: its slots follow from is_token_in_rank
            # The send buffer is sized from num_tokens_per_rank and filled from is_token_in_rank: counts that
            # disagree would put rows past its end. One host read, skipped where the caller asked for none
            # (num_worst_tokens: blocks of a fixed size, which no slot can overrun).
            implied = in_rank.sum(dim=0)
            if host_reads and not torch.equal(per_rank.to(implied.dtype), implied):
                raise ValueError(f"layout[0]: expected num_tokens_per_rank to count the tokens of layout[2] "
                                 f"(is_token_in_rank), {implied.tolist()}, got {per_rank.tolist()}")
            slots = torch.where(in_rank, torch.cumsum(in_rank.long(), 0) - 1, -1).to(torch.int32)
        return DispatchLayout(per_rank.long(), per_expert.long(), in_rank, slots)

    def dispatch(self, x, topk_idx: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                 num_experts: int | None = None, layout=None, *, handle: "DispatchHandle | None" = None,
                 quantize_fp8: bool = False, check_ids: bool = True, num_worst_tokens: int | None = None):
        """Sends each token once to every rank hosting one of its experts.

        x: bf16 [T, H], or (x_fp8 [T, H] float8_e4m3fn, scales [T, H / 128] float32) with H % 128 == 0.
        topk_idx: int64 [T, k], expert ids in [0, num_experts) or -1. topk_weights: float32 [T, k].
        layout: get_dispatch_layout's result for these topk_idx, to skip recomputing it.
        handle: an earlier dispatch's handle: x (T rows, any hidden size and form) is sent with that call's
        routing, without layout or counts exchange; topk_idx, topk_weights, num_experts and layout are then
        not given.
        quantize_fp8: quantize a bf16 x to FP8 (groups of 128) while packing, halving the bytes sent; the
        result is per_token_group_quant_fp8's, NaN and infinite groups included.
        check_ids: read the range of topk_idx (one host sync on a GPU) to refuse bad ids before any
        communication; False skips that read, and ids outside [0, num_experts) then count as -1.
        num_worst_tokens: a bound on the rows any rank receives, the same on every rank. The call then reads
        no tensor value on the host (ids are not checked; ids outside [0, num_experts) count as -1): each
        rank sends a fixed block of num_worst_tokens rows to every rank and the receive side compacts them on
        the device.

        Returns (recv_x, recv_topk_idx [R, k] int64 with local expert ids (-1 for other ranks' experts),
        recv_topk_weights [R, k] float32 (0 where the id is -1), num_recv_tokens_per_expert, handle). recv_x
        has x's form (an FP8 pair when x is one or quantize_fp8 is set); rows are grouped by source rank in
        rank order, each source's tokens in ascending order. num_recv_tokens_per_expert is a list of L ints;
        with num_worst_tokens it is an int32 [L] device tensor, R = num_worst_tokens, the rows past the
        received count (handle.num_recv_tokens, an int32 device scalar) have ids -1, weights 0 and a zero
        payload, and rows a rank would receive past the bound are dropped.
        Rows and their metadata (ids, weights, FP8 scales) travel in one all-to-all, after one exchange of
        the per-rank and per-expert counts (none with num_worst_tokens or a handle).
        """
        worst_handle = isinstance(handle, DispatchHandle) and handle.num_worst_tokens is not None
        if num_worst_tokens is not None or worst_handle:
            # The caller asked for no host reads: checked locally, no agreement header.
            return self._dispatch_checked(x, topk_idx, topk_weights, num_experts, layout, handle, quantize_fp8,
                                          check_ids, num_worst_tokens)
        error, checked = None, None
        try:
            checked = self._dispatch_checked(x, topk_idx, topk_weights, num_experts, layout, handle, quantize_fp8,
                                             check_ids, None)
        except (TypeError, ValueError, RuntimeError) as exc:
            error = exc
        if checked is None:
            self._agree("dispatch", _DISPATCH_FIELDS, None, None, _device_of(x, topk_idx), error)  # raises
        data, scales, handle, which, layout = checked
        world = self.world_size
        fp8 = scales is not None or quantize_fp8
        fields = [handle.num_experts if handle is not None else num_experts, data.shape[1], _topk_of(handle, topk_idx),
                  _DTYPE_CODES[FP8 if fp8 else data.dtype]]
        if handle is not None:
            self._agree("dispatch", _DISPATCH_FIELDS, fields, None, data.device, None)
            return self._send(data, scales, handle, quantize_fp8, which)
        send_splits, recv_splits = self._agree("dispatch", _DISPATCH_FIELDS, fields, layout.num_tokens_per_rank,
                                               data.device, None)
        handle = DispatchHandle(layout.token_slots, reference.exclusive_cumsum(layout.num_tokens_per_rank),
                                send_splits, recv_splits, topk_idx, topk_weights, num_experts, None)
        out = self._send(data, scales, handle, quantize_fp8, which)
        # Rows per local expert, counted from the ids that arrived (the counts exchange carries only the
        # per-rank counts, so that its size does not depend on num_experts and every rank can check it).
        recv_idx = out[1]
        num_local = num_experts // world
        per_expert = torch.zeros(num_local + 1, dtype=torch.int64, device=recv_idx.device)
        per_expert.index_add_(0, torch.where(recv_idx >= 0, recv_idx, num_local).view(-1),
                              torch.ones(recv_idx.numel(), dtype=torch.int64, device=recv_idx.device))
        handle = dataclasses.replace(handle, num_recv_tokens_per_expert=per_expert[:num_local].tolist())
        return out[0], out[1], out[2], handle.num_recv_tokens_per_expert, handle

    def _dispatch_checked(self, x, topk_idx, topk_weights, num_experts, layout, handle, quantize_fp8, check_ids,
                          num_worst_tokens):
        """Checks dispatch's arguments; with num_worst_tokens (or a handle of such a call) also runs it.
        Otherwise returns (data, scales, handle or None, backend, layout or None)."""
        data, scales = _payload(x, "x")
        hidden = data.shape[1]
        world = self.world_size
        _validate.boolean(quantize_fp8, "quantize_fp8")
        _validate.boolean(check_ids, "check_ids")
        if quantize_fp8 and (scales is not None or hidden % SCALE_GROUP):
            raise ValueError(f"quantize_fp8: expected a bf16 x with a hidden size that is a multiple of "
                             f"{SCALE_GROUP}, got {'an FP8 pair' if scales is not None else f'hidden {hidden}'}")
        if handle is not None:
            which = self._check_cached(data, handle, topk_idx, topk_weights, num_experts, layout, num_worst_tokens)
            if handle.num_worst_tokens is None:
                return data, scales, handle, which, None
            out = self._dispatch_worst(data, scales, handle.topk_idx, handle.topk_weights, handle.num_experts,
                                       handle.token_slots, handle.num_worst_tokens, quantize_fp8, which)
            return out[:4] + (handle,)
        _num_experts(num_experts, world)
        _validate.tensor(topk_weights, "topk_weights", (torch.float32,))
        worst = None
        if num_worst_tokens is not None:
            worst = _validate.integer(num_worst_tokens, "num_worst_tokens", 1)
            _validate.integer(worst * world, "num_worst_tokens * world size")
        _routing(topk_idx, topk_weights, data, "x", num_experts if check_ids and worst is None else None)
        which = self._resolve(data.device, "moe dispatch", num_experts)
        if layout is None:
            layout = self._layout(topk_idx, num_experts, which)
        else:
            layout = self._check_layout(layout, topk_idx, num_experts, host_reads=worst is None)
        if worst is not None:
            return self._dispatch_worst(data, scales, topk_idx, topk_weights, num_experts, layout.token_slots,
                                        worst, quantize_fp8, which)

        return data, scales, None, which, layout

    def _send(self, data, scales, handle, quantize_fp8, which):
        """Packs and exchanges with a handle's routing and splits (the uneven-split path)."""
        topk = handle.topk_idx.shape[1]
        with _backend.on_device(data.device):
            send_x, send_meta = _stages(which).pack(data, scales, handle.topk_idx, handle.topk_weights,
                                                    handle.token_slots, handle.send_offsets, sum(handle.send_splits),
                                                    handle.num_experts // self.world_size, quantize_fp8)
        joined = self.transport.exchange_rows(_join_rows(send_x, send_meta), handle.send_splits, handle.recv_splits)
        recv_x, recv_meta = _split_rows(joined, send_x.dtype, data.shape[1], send_meta.shape[1])
        recv_idx, recv_weights, recv_scales = reference.unpack_meta(recv_meta, topk)
        out_x = recv_x if recv_scales is None else (recv_x, recv_scales)
        return out_x, recv_idx, recv_weights, handle.num_recv_tokens_per_expert, handle

    def _dispatch_worst(self, data, scales, topk_idx, topk_weights, num_experts, token_slots, worst, quantize_fp8,
                        which):
        """num_worst_tokens: fixed blocks of `worst` rows per destination, compacted on the receive side."""
        world = self.world_size
        device = data.device
        topk = topk_idx.shape[1]
        num_local = num_experts // world
        slots = torch.where(token_slots < worst, token_slots, -1)
        send_offsets = torch.arange(world, device=device, dtype=torch.int64) * worst
        with _backend.on_device(device):
            send_x, send_meta = _stages(which).pack(data, scales, topk_idx, topk_weights, slots, send_offsets,
                                                    world * worst, num_local, quantize_fp8)
        # Rows no token took carry ids -1: the receiver tells real rows by a local id >= 0.
        sent = (slots >= 0).sum(dim=0)
        taken = (torch.arange(worst, device=device) < sent.view(world, 1)).view(-1, 1)
        send_meta[:, :topk] = torch.where(taken, send_meta[:, :topk], -1)
        joined = self.transport.exchange_equal(_join_rows(send_x, send_meta))
        recv_x, recv_meta = _split_rows(joined, send_x.dtype, data.shape[1], send_meta.shape[1])
        real = (recv_meta[:, :topk] >= 0).any(dim=1)
        position = torch.cumsum(real, dim=0) - 1
        # Each received row's output row; the spare row `worst` takes the padding and any rows past the bound.
        out_row = torch.where(real & (position < worst), position, worst)
        out_x = torch.zeros((worst + 1, recv_x.shape[1]), dtype=recv_x.dtype, device=device)
        out_x.view(torch.uint8)[out_row] = recv_x.view(torch.uint8)
        out_meta = torch.zeros((worst + 1, recv_meta.shape[1]), dtype=torch.int32, device=device)
        out_meta[:, :topk] = -1
        out_meta[out_row] = recv_meta
        out_meta[worst] = 0  # the spare row took the padding: it goes back to "no expert"
        out_meta[worst, :topk] = -1
        recv_idx, recv_weights, recv_scales = reference.unpack_meta(out_meta[:worst], topk)
        local = recv_idx.clamp(min=0)
        per_expert = torch.zeros(num_local + 1, dtype=torch.int32, device=device)
        per_expert.index_add_(0, torch.where(recv_idx >= 0, local, num_local).view(-1),
                              torch.ones(recv_idx.numel(), dtype=torch.int32, device=device))
        splits = (worst,) * world
        handle = DispatchHandle(slots, send_offsets, splits, splits, topk_idx, topk_weights, num_experts,
                                per_expert[:num_local], worst, out_row, real.sum().clamp(max=worst).to(torch.int32))
        body = out_x[:worst]
        out = body if recv_scales is None else (body, recv_scales)
        return out, recv_idx, recv_weights, handle.num_recv_tokens_per_expert, handle

    def _check_cached(self, data, handle, topk_idx, topk_weights, num_experts, layout, num_worst_tokens):
        """Checks dispatch(x, handle=...); returns the backend."""
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the DispatchHandle that dispatch returned, got {type(handle).__name__}")
        for name, value in (("topk_idx", topk_idx), ("topk_weights", topk_weights), ("num_experts", num_experts),
                            ("layout", layout), ("num_worst_tokens", num_worst_tokens)):
            if value is not None:
                raise ValueError(f"{name}: expected None with handle= (the handle's routing is reused), "
                                 f"got {type(value).__name__}")
        tokens = handle.token_slots.shape[0]
        if data.shape[0] != tokens:
            raise ValueError(f"x: expected {tokens} rows (as in the dispatch that made the handle), "
                             f"got {data.shape[0]}")
        _validate.same_device(data, "x", **{"handle.token_slots": handle.token_slots})
        return self._resolve(data.device, "moe dispatch", handle.num_experts)

    def _agree(self, op, names, fields, counts, device, error):
        """The agreement header: one fixed-size exchange in which every rank, valid input or not, sends
        [valid, fields..., rows for that rank] to every rank. Raises the same way on every rank when one
        rejected its input or the fields differ; else returns (send_splits, recv_splits) as tuples."""
        world = self.world_size
        width = 2 + len(names)
        mine = torch.zeros((world, width), dtype=torch.int64, device=device or self.transport.header_device)
        if error is None:
            mine[:, 0] = 1
            mine[:, 1:1 + len(names)] = torch.tensor(fields, dtype=torch.int64)
            if counts is not None:
                mine[:, -1] = counts
        table = torch.cat([mine, self.transport.exchange_counts(mine)]).tolist()  # the one host read
        if error is not None:
            raise error
        theirs = table[world:]
        rejected = [r for r in range(world) if theirs[r][0] != 1]
        if rejected:
            raise ValueError(f"{op}: expected valid arguments on every rank, got an error on rank "
                             f"{', '.join(map(str, rejected))} of {world} (that rank's own error says which); "
                             f"no rows were exchanged")
        for i, name in enumerate(names):
            values = [row[1 + i] for row in theirs]
            if len(set(values)) > 1:
                shown = ", ".join(f"rank {r}: {_show(name, v)}" for r, v in enumerate(values))
                raise ValueError(f"{op}: expected the same {name} on every rank, got {shown}; no rows were exchanged")
        return tuple(row[-1] for row in table[:world]), tuple(row[-1] for row in theirs)

    def combine(self, y: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """y: [R, N] bf16 (or float32), one row per received token in dispatch's receive order -> [T, N] on
        the source ranks: each token's rows summed over the ranks it was sent to, in float32, in rank order.

        topk_weights: float32 [R], one factor per received row, applied before the rows are sent back (the
        product rounded to y's dtype); without it the sum is unweighted, as in DeepEP (weight the expert
        outputs first, e.g. with unpermute_from_experts). bias: [T, N] in y's dtype, added to each token's
        sum once that sum is rounded to y's dtype (the addition in float32, rounded once more).
        With a num_worst_tokens handle, R = num_worst_tokens and padding rows are never read."""
        if isinstance(handle, DispatchHandle) and handle.num_worst_tokens is not None:
            return self._combine_rows(*self._combine_checked(y, handle, topk_weights, bias))
        error, checked = None, None
        try:
            checked = self._combine_checked(y, handle, topk_weights, bias)
        except (TypeError, ValueError, RuntimeError) as exc:
            error = exc
        fields = None if checked is None else [y.shape[1], _DTYPE_CODES[y.dtype]]
        self._agree("combine", _COMBINE_FIELDS, fields, None, _device_of(y), error)
        return self._combine_rows(*checked)

    def _combine_checked(self, y, handle, topk_weights, bias):
        """Checks combine's arguments -> (y with the row factors applied, handle, bias, backend)."""
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the DispatchHandle that dispatch returned, got {type(handle).__name__}")
        _validate.tensor(y, "y", COMBINE_DTYPES, ndim=2, contiguous=True)
        received = handle.num_worst_tokens if handle.num_worst_tokens is not None else sum(handle.recv_splits)
        if y.shape[0] != received:
            raise ValueError(f"y: expected {received} rows (one per token this rank received), got {y.shape[0]}")
        _validate.same_device(y, "y", **{"handle.token_slots": handle.token_slots})
        if topk_weights is not None:
            _validate.tensor(topk_weights, "topk_weights", (torch.float32,), ndim=1, contiguous=True)
            _validate.shape(topk_weights, "topk_weights", (received,), "one per received row")
            _validate.same_device(y, "y", topk_weights=topk_weights)
        tokens = handle.token_slots.shape[0]
        if bias is not None:
            _validate.tensor(bias, "bias", (y.dtype,), ndim=2, contiguous=True)
            _validate.shape(bias, "bias", (tokens, y.shape[1]), "[T, N] of this rank's tokens")
            _validate.same_device(y, "y", bias=bias)
        which = self._resolve(y.device, "moe combine")
        if topk_weights is not None:
            y = (y.float() * topk_weights.unsqueeze(1)).to(y.dtype)
        return y, handle, bias, which

    def _combine_rows(self, y, handle, bias, which):
        if handle.num_worst_tokens is None:
            buf = self.transport.exchange_rows(y, handle.recv_splits, handle.send_splits)
        else:
            # Back to the fixed blocks the rows arrived in; the spare row feeds the unused block rows.
            spread = torch.cat([y, y.new_zeros((1, y.shape[1]))])[handle.recv_rows]
            buf = self.transport.exchange_equal(spread)
        with _backend.on_device(buf.device):
            out = _stages(which).combine_reduce(buf, handle.token_slots, handle.send_offsets)
        if bias is not None:
            out = (out.float() + bias.float()).to(out.dtype)
        return out

    # ---- low-latency mode: fixed-size buffers, one equal-split collective each way, no host reads ----

    def _resolve_low_latency(self, device, op, num_local, topk, widths, tensors):
        """The CUDA low-latency kernels copy 16-byte units: every row width a multiple of 8 bf16 elements and
        every tensor 16-byte aligned (both read from shapes and pointers, never from values)."""
        cuda_ok = (self.world_size <= CUDA_MAX_WORLD and num_local <= CUDA_MAX_LOCAL_EXPERTS
                   and topk <= CUDA_MAX_TOPK and all(w % 8 == 0 for w in widths)
                   and all(t.data_ptr() % 16 == 0 for t in tensors))
        return _backend.resolve(self.backend, device, op, cuda_ok=cuda_ok)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, max_tokens_per_rank: int,
                             num_experts: int, use_fp8: bool = True):
        """Decode-time dispatch into fixed per-expert receive blocks, for m_grouped_fp8_gemm_nt_masked.

        x: bf16 [T, H] with T <= max_tokens_per_rank (and H % 128 == 0 when use_fp8). topk_idx: int64 [T, k];
        ids outside [0, num_experts) are ignored (there is no host read to refuse them). Every rank of the
        group must pass the same max_tokens_per_rank, num_experts, H, k and use_fp8.

        Returns (recv_x [L, W * M, H], recv_scales [L, W * M, H / 128] float32 or None, recv_count int32 [L]
        on the device, handle). recv_x is FP8 e4m3 (quantized in the pack, 1x128 scales, as
        per_token_group_quant_fp8 quantizes, NaN and infinite groups included) when use_fp8, else bf16;
        recv_x[e, :recv_count[e]] are the tokens routed to local expert e, ordered by source rank then
        source token; later rows are unspecified. (recv_x, recv_scales) is the A operand of
        m_grouped_fp8_gemm_nt_masked with masked_m = recv_count. No tensor value is read on the host and
        every buffer's size is fixed by (W, M, H, k), so the call can be captured in a CUDA graph.
        """
        _validate.tensor(x, "x", PAYLOAD_DTYPES, ndim=2, contiguous=True)
        _validate.boolean(use_fp8, "use_fp8")
        world = self.world_size
        _num_experts(num_experts, world)
        max_tokens = _validate.integer(max_tokens_per_rank, "max_tokens_per_rank", 1)
        tokens, hidden = x.shape
        if tokens > max_tokens:
            raise ValueError(f"x: expected at most max_tokens_per_rank = {max_tokens} tokens, got {tokens}")
        if use_fp8 and hidden % SCALE_GROUP:
            raise ValueError(f"x: expected a hidden size that is a multiple of {SCALE_GROUP} for use_fp8=True, "
                             f"got {hidden}")
        _routing(topk_idx, None, x, "x")
        num_local = num_experts // world
        _validate.integer(num_local * world * max_tokens, "num_local_experts * world * max_tokens_per_rank")
        row = reference.LowLatencyRow(hidden, topk_idx.shape[1], use_fp8)
        stages = _stages(self._resolve_low_latency(x.device, "moe low_latency_dispatch", num_local, row.topk,
                                                   (hidden,), (x,)))
        with _backend.on_device(x.device):
            send = stages.ll_pack(x, topk_idx, num_experts, world, max_tokens, row)
        recv = self.transport.exchange_equal(send)
        with _backend.on_device(recv.device):
            recv_count, pos = stages.ll_positions(recv, num_local, row)
            recv_x, recv_scales = stages.ll_unpack(recv, pos, num_local, row)
        handle = LowLatencyHandle(recv, pos, row, num_experts, max_tokens, tokens)
        return recv_x, recv_scales, recv_count, handle

    def low_latency_combine(self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle) -> torch.Tensor:
        """y: bf16 [L, W * M, N], the experts' outputs in low_latency_dispatch's receive layout (rows past
        recv_count are never read). topk_idx / topk_weights: this rank's routing of that dispatch ([T, k]
        int64 / float32). Returns bf16 [T, N]: out[t] = sum over t's slots of topk_weights[t, j] times the
        output of expert topk_idx[t, j] for t, in float32, rounded once. No host reads; graph-capturable."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the LowLatencyHandle that low_latency_dispatch returned, "
                            f"got {type(handle).__name__}")
        world = self.world_size
        num_local = handle.num_experts // world
        rows = world * handle.max_tokens_per_rank
        _validate.tensor(y, "y", (torch.bfloat16,), ndim=3, contiguous=True)
        if y.shape[:2] != (num_local, rows):
            raise ValueError(f"y: expected shape [{num_local}, {rows}, N] (local experts, W * max_tokens_per_rank), "
                             f"got {list(y.shape)}")
        _validate.tensor(topk_idx, "topk_idx", (torch.int64,), ndim=2, contiguous=True)
        _validate.shape(topk_idx, "topk_idx", (handle.num_tokens, handle.row.topk), "as in the dispatch")
        _validate.tensor(topk_weights, "topk_weights", (torch.float32,), ndim=2, contiguous=True)
        _validate.shape(topk_weights, "topk_weights", tuple(topk_idx.shape), "same as topk_idx")
        _validate.same_device(y, "y", topk_idx=topk_idx, topk_weights=topk_weights,
                              **{"handle.recv": handle.recv})
        stages = _stages(self._resolve_low_latency(y.device, "moe low_latency_combine", num_local, handle.row.topk,
                                                   (y.shape[2],), (y,)))
        with _backend.on_device(y.device):
            ret = stages.ll_combine_pack(y, handle.recv, handle.pos, handle.row)
        returned = self.transport.exchange_equal(ret)
        with _backend.on_device(y.device):
            return stages.ll_combine_reduce(returned.view(world, handle.max_tokens_per_rank, handle.row.topk, -1),
                                            topk_idx, topk_weights, handle.num_experts)

# ---- expert-sorted layout for the grouped GEMM ----------------------------------------------------------

def permute_to_experts(recv_x, recv_topk_idx: torch.Tensor, alignment: int = 128, num_local_experts=None,
                       backend: str = "auto", check_ids: bool = True):
    """Expands received tokens into one row per (token, local expert) pair, grouped by expert in expert order
    and padded per expert to `alignment` rows: the layout m_grouped_fp8_gemm_nt_contiguous takes.

    recv_x: bf16 [R, H] or an FP8 pair (x_fp8 [R, H], scales [R, H / 128]). recv_topk_idx: int64 [R, k] of
    local expert ids or -1. num_local_experts: L, at most MAX_LOCAL_EXPERTS (default: the largest id + 1,
    within the same bound). check_ids: refuse ids outside [-1, L) (one host read); False skips the read,
    needs num_local_experts, and ids outside [0, L) then count as -1 on every backend.
    Returns (x_sorted of recv_x's form with M rows, m_indices int32 [M] (the expert of each row, -1 on
    padding rows, whose payload and scales are zero), perm int32 [R, k]: the row of each pair, -1 for id -1).
    """
    data, scales = _payload(recv_x, "recv_x")
    _routing(recv_topk_idx, None, data, "recv_x", idx_name="recv_topk_idx")
    _validate.power_of_two(alignment, "alignment")
    # Every expert's segment is padded to `alignment` rows and the grouped GEMM indexes rows in int32:
    # beyond 2^20 rows of padding per expert a few experts would already overflow it.
    _validate.integer(alignment, "alignment", 1, MAX_ALIGNMENT)
    _validate.boolean(check_ids, "check_ids")
    if num_local_experts is not None:
        _validate.integer(num_local_experts, "num_local_experts", 1, MAX_LOCAL_EXPERTS)
    elif not check_ids:
        raise ValueError("num_local_experts: expected an int with check_ids=False (it bounds the ids), got None")
    if check_ids and recv_topk_idx.numel():
        lo, hi = _range_of(recv_topk_idx)
    else:
        lo, hi = -1, -1
    num_local = num_local_experts if num_local_experts is not None else max(hi + 1, 1)
    if num_local_experts is None and num_local > MAX_LOCAL_EXPERTS:
        # Per-expert state is sized by the expert count: an inferred one is bounded like a given one.
        raise ValueError(f"recv_topk_idx: expected local expert ids below {MAX_LOCAL_EXPERTS} when "
                         f"num_local_experts is not given, got {hi}; pass num_local_experts")
    if lo < -1 or hi >= num_local:
        raise ValueError(f"recv_topk_idx: expected local expert ids in [0, {num_local}) or -1, "
                         f"got {lo if lo < -1 else hi}")
    cuda_ok = num_local <= CUDA_MAX_LOCAL_EXPERTS and recv_topk_idx.shape[1] <= CUDA_MAX_TOPK
    stages = _stages(_backend.resolve(backend, data.device, "permute_to_experts", cuda_ok=cuda_ok))
    with _backend.on_device(data.device):
        counts, rank = stages.expert_ranks(recv_topk_idx, num_local)
        # Segment starts stay on the device; only the total row count (the output's size) is read.
        padded = (counts + alignment - 1) // alignment * alignment
        starts = reference.exclusive_cumsum(padded)
        total = int(padded.sum())
        x_sorted, s_sorted, m_indices, perm = stages.permute(data, scales, recv_topk_idx, rank, starts, total)
    return (x_sorted if scales is None else (x_sorted, s_sorted)), m_indices, perm


def unpermute_from_experts(y_sorted: torch.Tensor, perm: torch.Tensor, recv_topk_weights: torch.Tensor,
                           backend: str = "auto") -> torch.Tensor:
    """The inverse of permute_to_experts with the routing weights applied: out[i] = sum_j
    recv_topk_weights[i, j] * y_sorted[perm[i, j]] over the pairs with perm >= 0, in float32, ->
    [R, N] in y_sorted's dtype (bf16 or float32), ready for Buffer.combine."""
    _validate.tensor(y_sorted, "y_sorted", COMBINE_DTYPES, ndim=2, contiguous=True)
    _validate.tensor(perm, "perm", (torch.int32,), ndim=2, contiguous=True)
    _validate.tensor(recv_topk_weights, "recv_topk_weights", (torch.float32,), ndim=2, contiguous=True)
    _validate.shape(recv_topk_weights, "recv_topk_weights", tuple(perm.shape), "same as perm")
    _validate.same_device(y_sorted, "y_sorted", perm=perm, recv_topk_weights=recv_topk_weights)
    if perm.numel():
        lo, hi = _range_of(perm)
        if lo < -1 or hi >= y_sorted.shape[0]:
            raise ValueError(f"perm: expected rows in [0, {y_sorted.shape[0]}) of y_sorted or -1, "
                             f"got {lo if lo < -1 else hi}")
    cuda_ok = perm.shape[1] <= CUDA_MAX_TOPK
    stages = _stages(_backend.resolve(backend, y_sorted.device, "unpermute_from_experts", cuda_ok=cuda_ok))
    with _backend.on_device(y_sorted.device):
        return stages.unpermute(y_sorted, perm, recv_topk_weights)


# What the static audit requires of this op's CUDA kernels (matched by substring of the demangled name):
# row stages move 16-byte vectors both ways; nothing may touch local memory.
_VECTOR_COPY = {"no_local_memory": True, "min_instructions": {"LDG.128": 1, "STG.128": 1}}
CUDA_AUDIT = {
    "pykernels::moe::pack_kernel<uint4>": _VECTOR_COPY,
    "pykernels::moe::permute_kernel<uint4>": _VECTOR_COPY,
    "pykernels::moe::pack_quantize_kernel": {"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    "pykernels::moe::combine_reduce_kernel<__nv_bfloat16, 8>": _VECTOR_COPY,
    "pykernels::moe::combine_reduce_kernel<float, 4>": _VECTOR_COPY,
    "pykernels::moe::unpermute_kernel<__nv_bfloat16, 8>": _VECTOR_COPY,
    "pykernels::moe::unpermute_kernel<float, 4>": _VECTOR_COPY,
    "pykernels::moe::dispatch_layout_kernel": {"no_local_memory": True},
    "pykernels::moe::expert_ranks_kernel": {"no_local_memory": True},
    "pykernels::moe::expert_chunk_counts_kernel": {"no_local_memory": True},
    "pykernels::moe::expert_chunk_offsets_kernel": {"no_local_memory": True},
    "pykernels::moe::ll_pack_kernel<false>": _VECTOR_COPY,
    "pykernels::moe::ll_pack_kernel<true>": {"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
    "pykernels::moe::ll_unpack_kernel": _VECTOR_COPY,
    "pykernels::moe::ll_combine_pack_kernel": _VECTOR_COPY,
    "pykernels::moe::ll_combine_reduce_kernel": {"no_local_memory": True, "min_instructions": {"LDG.128": 1}},
}
