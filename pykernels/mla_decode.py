"""MLA decode over a paged latent KV cache (DeepSeek-V2/V3 with weight absorption), FlashMLA-style:
a split-KV scheduler (get_mla_metadata), a split attention stage and a combine stage.

See pykernels/reference/mla_decode.py for the exact semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pykernels import _backend, _validate
from pykernels._validate import FP8, cdiv
from pykernels.reference import mla_decode as reference

PAGE_SIZE = 64
HEAD_DIM_K = 576
HEAD_DIM_V = 512
ROWS_PER_TILE = 64  # query rows (heads x s_q tokens) per CUDA CTA, the M of its MMAs; the Triton kernel runs a
# tile as 2 (bfloat16 cache) or 4 (float8_e4m3fn) programs of 32 or 16 rows
FIXED_OVERHEAD = 5  # cost of one split, in pages: loading Q, the epilogue and the combine it causes
DEFAULT_SM_COUNT = 132  # H100/H800 SXM5, for schedules planned for CPU tensors
MAX_S_Q = 4
MAX_H_Q = 128
# Longest sequence the kernels index: token and page indices are int32 (the planners round a length up to
# whole pages in 64-bit arithmetic, so the full int32 range is usable).
MAX_SEQLEN = _validate.INT32_MAX


# ---- split-KV scheduler ------------------------------------------------------------------------------
# The same walk as mla_plan_splits in csrc/mla_decode/mla_decode_plan.h; tests compare the two.

def plan_splits(seqlens, num_parts: int):
    """Greedy balanced partition of the batch's KV pages over `num_parts` SM parts.

    A request of L tokens costs ceil(L / 64) + FIXED_OVERHEAD; each part gets a budget of
    ceil(total / num_parts) + FIXED_OVERHEAD and the walk goes through the requests in order, cutting a
    request at a page boundary when the part's budget runs out (the last part takes whatever remains).
    Returns (part_splits [num_parts + 1], splits [(request, first_page, end_page, index in request)],
    split_offsets [b + 1]): part p runs splits part_splits[p] .. part_splits[p + 1] - 1, request i owns splits
    split_offsets[i] .. split_offsets[i + 1] - 1, in page order.
    """
    # A length-0 request (and a negative one, possible only in a replayed CUDA graph that no check sees)
    # still gets one fully masked page, as in mla_decode_plan.h: every split must hold a page.
    pages = [max(1, cdiv(_validate.integer(int(n), "seqlens", high=MAX_SEQLEN), PAGE_SIZE)) for n in seqlens]
    total = sum(p + FIXED_OVERHEAD for p in pages)
    budget = cdiv(total, num_parts) + FIXED_OVERHEAD
    part_splits, splits, split_offsets = [0], [], []
    part, remaining = 0, budget
    for request, n_pages in enumerate(pages):
        split_offsets.append(len(splits))
        page, index = 0, 0
        while True:
            left = n_pages - page
            if left + FIXED_OVERHEAD <= remaining or part == num_parts - 1:
                splits.append((request, page, n_pages, index))
                remaining -= left + FIXED_OVERHEAD
                break
            take = remaining - FIXED_OVERHEAD
            if take > 0:
                splits.append((request, page, page + take, index))
                page += take
                index += 1
            part += 1
            part_splits.append(len(splits))
            remaining = budget
    split_offsets.append(len(splits))
    part_splits += [len(splits)] * (num_parts + 1 - len(part_splits))
    return part_splits, splits, split_offsets


def num_sm_parts_for(num_q_tokens_per_head_k: int, num_heads_k: int, sm_count: int) -> int:
    """SM parts such that parts x KV heads x 64-row query tiles is about one CTA per SM."""
    return max(1, sm_count // num_heads_k // cdiv(num_q_tokens_per_head_k, ROWS_PER_TILE))


@dataclass
class MlaSchedule:
    """A split-KV plan for one batch of cache_seqlens (what get_mla_metadata returns).

    part_splits   int32 [num_parts + 1]: SM part p runs splits part_splits[p] .. part_splits[p+1]-1 (the tile
                  scheduler metadata: one persistent CTA per part and 64-row query tile walks that range)
    splits        int32 [capacity, 4]: (request, first_page, end_page, index within request); entries past
                  part_splits[-1] are unused
    split_offsets int32 [b + 1]: request i owns splits split_offsets[i] .. split_offsets[i+1]-1; a request
                  with one split is written directly, the others through float32 partials and the combine
    capacity      b + num_parts, an upper bound on the number of splits for any lengths (each part boundary
                  cuts at most one request), so buffers sized by it stay valid when a CUDA graph replays the
                  decode after the same tensors were re-planned in place for new lengths.

    What it was planned for, so that mla_decode refuses a schedule that no longer fits its call without
    reading a value back from the device: the query rows per KV head and the KV heads, and the
    cache_seqlens tensor it was planned from, by its data pointer and its version counter (which every
    eager in-place write moves; None for an inference tensor, which has none).
    """

    batch: int
    num_parts: int
    part_splits: torch.Tensor
    splits: torch.Tensor
    split_offsets: torch.Tensor
    num_q_tokens_per_head_k: int
    num_heads_k: int
    seqlens_ptr: int
    seqlens_version: int | None

    @property
    def capacity(self) -> int:
        return self.batch + self.num_parts

    @property
    def device(self) -> torch.device:
        return self.splits.device


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_device(x: torch.Tensor, name: str) -> None:
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a tensor on cpu or cuda, got one on {x.device}")


def _version_of(cache_seqlens: torch.Tensor) -> int | None:
    return None if cache_seqlens.is_inference() else cache_seqlens._version


def _check_lengths(lengths: torch.Tensor, name: str = "cache_seqlens") -> None:
    """Reads the lengths back to the host: only where a value check is allowed (not while capturing)."""
    low, high = int(lengths.min()), int(lengths.max())
    if low < 0 or high > MAX_SEQLEN:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: expected every length in 0..{MAX_SEQLEN} (the kernels index tokens with int32), "
                         f"got {bad}")


def _check_seqlens(cache_seqlens, name: str = "cache_seqlens") -> torch.Tensor:
    _validate.tensor(cache_seqlens, name, (torch.int32,), ndim=1, contiguous=True)
    _check_device(cache_seqlens, name)
    if cache_seqlens.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one request, got shape {list(cache_seqlens.shape)}")
    if not _capturing(cache_seqlens.device):
        _check_lengths(cache_seqlens, name)
    return cache_seqlens


def _positive_int(value, name: str, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1 or (high is not None and value > high):
        raise ValueError(f"{name}: expected an int in 1..{high if high is not None else 'inf'}, got {value}")
    return value


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_sm_parts: int | None = None) -> MlaSchedule:
    """Plans the split-KV schedule for a decode step; pass the result to mla_decode(metadata=...).

    cache_seqlens: int32 [b], every length in 0..2^31 - 1 (a length-0 request gives output 0, lse +inf).
    num_q_tokens_per_head_k: s_q * h_q // h_kv (query rows sharing one KV head); num_heads_k: 1 for MLA.
    num_sm_parts: override of the number of SM parts (default: SMs // h_kv // ceil(rows / 64), with 132 SMs
    assumed for CPU tensors). Planning once per step outside the decode lets a serving loop capture
    mla_decode in a CUDA graph; for CUDA tensors with the extension built the planner runs as a one-thread
    kernel on the current stream, so the planning itself can be captured too. The lengths are checked here
    (read back to the host, except while capturing), not by mla_decode when it is given the schedule.

    The schedule holds for this cache_seqlens tensor until it is written in place: mla_decode refuses it
    after an eager in-place write (the tensor's version counter moved), for another tensor, or for other
    batch, s_q * h_q or num_heads_k, and says to plan again. A CUDA graph replay moves no version counter:
    lengths changed between replays need a planner captured in the same graph (or a replan before replay).
    """
    _check_seqlens(cache_seqlens)
    _positive_int(num_q_tokens_per_head_k, "num_q_tokens_per_head_k", MAX_S_Q * MAX_H_Q)
    _positive_int(num_heads_k, "num_heads_k", 1)
    device = cache_seqlens.device
    if num_sm_parts is None:
        num_sm_parts = num_sm_parts_for(num_q_tokens_per_head_k, num_heads_k, _sm_count(device))
    _positive_int(num_sm_parts, "num_sm_parts")
    b = cache_seqlens.shape[0]
    schedule = MlaSchedule(
        batch=b, num_parts=num_sm_parts,
        part_splits=torch.zeros(num_sm_parts + 1, dtype=torch.int32, device=device),
        splits=torch.zeros(b + num_sm_parts, 4, dtype=torch.int32, device=device),
        split_offsets=torch.zeros(b + 1, dtype=torch.int32, device=device),
        num_q_tokens_per_head_k=num_q_tokens_per_head_k, num_heads_k=num_heads_k,
        seqlens_ptr=cache_seqlens.data_ptr(), seqlens_version=_version_of(cache_seqlens))
    if _backend.cuda_unavailable_reason(device) is None:
        ext, _ = _backend.extension()
        with _backend.on_device(device):
            ext.mla_plan_splits_device(cache_seqlens, schedule.part_splits, schedule.splits, schedule.split_offsets,
                                       _backend.current_stream(device))
        return schedule
    part_splits, splits, split_offsets = plan_splits(cache_seqlens.tolist(), num_sm_parts)
    schedule.part_splits.copy_(torch.tensor(part_splits, dtype=torch.int32))
    schedule.splits[: len(splits)].copy_(torch.tensor(splits, dtype=torch.int32).reshape(-1, 4))
    schedule.split_offsets.copy_(torch.tensor(split_offsets, dtype=torch.int32))
    return schedule


# ---- the op ------------------------------------------------------------------------------------------

def _check_kv_scale(kv_scale, kv_cache: torch.Tensor, device: torch.device):
    """kv_scale as a float32 tensor of shape [1] on `device` (None for a bfloat16 cache)."""
    if kv_cache.dtype != FP8:
        if kv_scale is not None:
            raise TypeError(f"kv_scale: expected None with a {str(kv_cache.dtype).replace('torch.', '')} kv_cache "
                            f"(it scales a float8_e4m3fn cache), got {type(kv_scale).__name__}")
        return None
    if isinstance(kv_scale, (int, float)) and not isinstance(kv_scale, bool):
        if not (math.isfinite(kv_scale) and kv_scale > 0):
            raise ValueError(f"kv_scale: expected a finite positive float, got {kv_scale}")
        return torch.full((1,), float(kv_scale), dtype=torch.float32, device=device)
    if not isinstance(kv_scale, torch.Tensor):
        raise TypeError("kv_scale: expected a float or a float32 tensor of one element with a float8_e4m3fn "
                        f"kv_cache, got {type(kv_scale).__name__}")
    _validate.tensor(kv_scale, "kv_scale", (torch.float32,))
    if kv_scale.numel() != 1:
        raise ValueError(f"kv_scale: expected one element (a per-tensor scale), got shape {list(kv_scale.shape)}")
    return kv_scale.reshape(1)


def _check_schedule(metadata, b: int, rows: int, cache_seqlens: torch.Tensor, device: torch.device) -> None:
    """Refuses a schedule planned for another call, from what it recorded: no value is read."""
    if not isinstance(metadata, MlaSchedule):
        raise TypeError(f"metadata: expected an MlaSchedule from get_mla_metadata, got {type(metadata).__name__}")
    again = "call get_mla_metadata again for this call"
    if metadata.batch != b:
        raise ValueError(f"metadata: expected a schedule planned for {b} requests (b from q), got {metadata.batch}; "
                         f"{again}")
    if metadata.num_q_tokens_per_head_k != rows or metadata.num_heads_k != 1:
        raise ValueError(f"metadata: expected a schedule planned for s_q * h_q = {rows} query rows and 1 KV head, "
                         f"got {metadata.num_q_tokens_per_head_k} rows and {metadata.num_heads_k} KV heads; {again}")
    if metadata.device != device:
        raise ValueError(f"metadata: expected a schedule on {device} (where q is), got {metadata.device}")
    if metadata.seqlens_ptr != cache_seqlens.data_ptr():
        raise ValueError("metadata: expected a schedule planned from this cache_seqlens tensor, got one planned "
                         f"from another tensor; {again}")
    version = _version_of(cache_seqlens)
    if metadata.seqlens_version is not None and version is not None and version != metadata.seqlens_version:
        raise ValueError("metadata: expected a schedule planned for the current cache_seqlens, got one planned "
                         f"before it was written in place (version {metadata.seqlens_version}, now {version}); "
                         f"{again}")


def _check_values(q, kv_cache, block_table, cache_seqlens) -> None:
    """The checks that read lengths and page ids back to the host: run only when mla_decode plans itself."""
    _check_lengths(cache_seqlens)
    num_blocks = kv_cache.shape[0]
    lengths = cache_seqlens.long()
    covered = block_table.shape[1] * PAGE_SIZE
    high = int(lengths.max())
    if high > covered:
        raise ValueError(f"cache_seqlens: expected lengths <= {covered} (block_table has {block_table.shape[1]} "
                         f"pages of {PAGE_SIZE} per request), got {high}")
    used = torch.arange(block_table.shape[1], device=q.device)[None, :] < cdiv_tensor(lengths, PAGE_SIZE)[:, None]
    ids = block_table[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"block_table: expected page ids in 0..{num_blocks - 1} (kv_cache dim 0) for every page "
                         f"a sequence uses, got {bad}")


def _validate_args(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, kv_scale, metadata):
    """Checks every argument; returns kv_scale as a float32 tensor [1] (or None)."""
    _validate.tensor(q, "q", (torch.bfloat16,), ndim=4, contiguous=True)
    _check_device(q, "q")
    _validate.tensor(kv_cache, "kv_cache", (torch.bfloat16, FP8), ndim=4, contiguous=True)
    _validate.tensor(block_table, "block_table", (torch.int32,), ndim=2, contiguous=True)
    _validate.tensor(cache_seqlens, "cache_seqlens", (torch.int32,), ndim=1, contiguous=True)
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int):
        raise TypeError(f"head_dim_v: expected an int, got {type(head_dim_v).__name__}")
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v: expected {HEAD_DIM_V} (the latent c_KV width), got {head_dim_v}")
    b, s_q, h_q, d = q.shape
    if d != HEAD_DIM_K:
        raise ValueError(f"q: expected head dim {HEAD_DIM_K} (512 latent + 64 RoPE) in dim 3, got shape {list(q.shape)}")
    if not 1 <= s_q <= MAX_S_Q:
        raise ValueError(f"q: expected s_q (dim 1) in 1..{MAX_S_Q}, got shape {list(q.shape)}")
    if not 1 <= h_q <= MAX_H_Q:
        raise ValueError(f"q: expected h_q (dim 2) in 1..{MAX_H_Q}, got shape {list(q.shape)}")
    if b == 0:
        raise ValueError(f"q: expected at least one request, got shape {list(q.shape)}")
    num_blocks, page, h_kv, d_kv = kv_cache.shape
    if page != PAGE_SIZE:
        raise ValueError(f"kv_cache: expected page size {PAGE_SIZE} in dim 1, got shape {list(kv_cache.shape)}")
    if h_kv != 1:
        raise ValueError(f"kv_cache: expected 1 KV head in dim 2 (MLA's latent head), got shape {list(kv_cache.shape)}")
    if d_kv != HEAD_DIM_K:
        raise ValueError(f"kv_cache: expected head dim {HEAD_DIM_K} in dim 3, got shape {list(kv_cache.shape)}")
    if num_blocks == 0:
        raise ValueError(f"kv_cache: expected at least one page, got shape {list(kv_cache.shape)}")
    if block_table.shape[0] != b or block_table.shape[1] == 0:
        raise ValueError(f"block_table: expected shape [{b}, max_blocks >= 1] (b from q), got {list(block_table.shape)}")
    _validate.shape(cache_seqlens, "cache_seqlens", [b], "b from q")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
        if not (math.isfinite(softmax_scale) and softmax_scale > 0):
            raise ValueError(f"softmax_scale: expected a finite positive float, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    _validate.same_device(q, "q", kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                          kv_scale=kv_scale if isinstance(kv_scale, torch.Tensor) else None)
    kv_scale = _check_kv_scale(kv_scale, kv_cache, q.device)
    if metadata is not None:
        _check_schedule(metadata, b, s_q * h_q, cache_seqlens, q.device)
    elif not _capturing(q.device):  # a CUDA graph cannot read values back: check them once before capturing
        _check_values(q, kv_cache, block_table, cache_seqlens)
    return kv_scale


def cdiv_tensor(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.div(x + (d - 1), d, rounding_mode="floor")


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int = HEAD_DIM_V, softmax_scale: float | None = None, causal: bool = False,
               kv_scale: torch.Tensor | float | None = None, metadata: MlaSchedule | None = None,
               backend: str = "auto"):
    """Multi-head latent attention decode over a paged cache. Returns (out, lse).

    q             bfloat16 [b, s_q, h_q, 576]: absorbed queries (512 latent + 64 RoPE), s_q in 1..4 (MTP /
                  speculative tokens), h_q in 1..128, contiguous
    kv_cache      [num_blocks, 64, 1, 576] bfloat16, or float8_e4m3fn with kv_scale: pages of 64 tokens, one
                  latent head; K is all 576 columns, V the first 512
    block_table   int32 [b, max_blocks]: page ids of each request in order; only the first ceil(len / 64)
                  entries of a row are read (the rest may hold anything, all of it for a length-0 request)
    cache_seqlens int32 [b]: tokens per request, each in 0..max_blocks * 64
    head_dim_v    512 (the only value: V is the latent part of the cache)
    softmax_scale default 576 ** -0.5. DeepSeek-V3 passes 192 ** -0.5 * mscale ** 2 instead (the scale of its
                  unabsorbed 128 + 64 head dims times the square of its YaRN mscale, about 0.135 with its
                  rope_scaling), so pass the model's own value.
    causal        with s_q > 1, query token t sees keys 0 .. len - s_q + t; ignored when s_q == 1
    kv_scale      with a float8_e4m3fn cache, which holds K / kv_scale: a positive float, or a float32 tensor
                  of one element (any shape) on q's device; None for bfloat16
    metadata      an MlaSchedule from get_mla_metadata(cache_seqlens, s_q * h_q, 1) planned from this
                  cache_seqlens tensor since its last in-place write (a stale one is refused; see
                  get_mla_metadata); None plans here (the CUDA planner on the GPU; the others on the host)
    Returns out [b, s_q, h_q, 512] bfloat16 and lse [b, h_q, s_q] float32 (natural log of the softmax
    denominator of the scaled scores). A query row that sees no key (a length-0 request, or with causal a
    token t with len - s_q + t < 0) gives out 0 and lse +inf, as FlashMLA does; NaN in q or in a visible
    cache row propagates to out and lse.

    Every argument is checked before anything runs. Given `metadata`, the Triton and CUDA backends read no
    value back to the host (no synchronization, capturable in a CUDA graph): the lengths were checked by
    get_mla_metadata, and the page ids in block_table are trusted. Without it, lengths are checked against
    the block table and page ids against num_blocks, reading the small int32 tensors back (skipped while a
    CUDA graph is being captured, so run once before capturing). backend="torch" is the per-request
    reference: it always reads the lengths, and checks them.
    """
    kv_scale = _validate_args(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, kv_scale,
                              metadata)
    b, s_q, h_q, _ = q.shape
    scale = HEAD_DIM_K ** -0.5 if softmax_scale is None else float(softmax_scale)
    causal = causal and s_q > 1
    which = _backend.resolve(backend, q.device, "mla_decode")
    if which == "torch":
        if metadata is not None:
            _check_values(q, kv_cache, block_table, cache_seqlens)
        return reference.mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, kv_scale)
    if metadata is None:
        metadata = get_mla_metadata(cache_seqlens, s_q * h_q, 1)
    out = torch.empty(b, s_q, h_q, HEAD_DIM_V, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    rows = s_q * h_q
    out_partial = torch.empty(metadata.capacity, rows, HEAD_DIM_V, dtype=torch.float32, device=q.device)
    lse_partial = torch.empty(metadata.capacity, rows, dtype=torch.float32, device=q.device)
    scale_tensor = kv_scale.reshape(1) if kv_scale is not None else None
    with _backend.on_device(q.device):
        if which == "cuda":
            ext, _ = _backend.extension()
            ext.mla_decode(q, kv_cache, block_table, cache_seqlens, scale_tensor, metadata.part_splits,
                           metadata.splits, metadata.split_offsets, out, lse, out_partial, lse_partial, scale, causal,
                           _backend.current_stream(q.device))
        else:
            from pykernels.triton import mla_decode as triton_mla

            triton_mla.mla_decode(q, kv_cache, block_table, cache_seqlens, scale_tensor, metadata, out, lse,
                                  out_partial, lse_partial, scale, causal)
    return out, lse


# What the static audit requires of this op's CUDA kernels (matched by substring of the demangled name).
# Pages and Q arrive by TMA from one thread (UTMALDG; an e4m3 page by one bulk copy, UBLKCP), never by
# per-thread cp.async (LDGSTS).
CUDA_AUDIT = {
    "mla_decode_kernel<false": {"no_local_memory": True, "min_instructions": {"HGMMA": 1, "UTMALDG": 1},
                                "max_instructions": {"LDGSTS": 0}},
    "mla_decode_kernel<true": {"no_local_memory": True, "min_instructions": {"HGMMA": 1, "UTMALDG": 1, "UBLKCP": 1},
                               "max_instructions": {"LDGSTS": 0}},
    "mla_combine_kernel": {"no_local_memory": True},
    "mla_plan_splits_kernel": {"no_local_memory": True},
}
