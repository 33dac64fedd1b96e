"""Hopper spec sheets and roofline arithmetic: what each op costs, and how fast a GPU could run it.

    get("H800")                       -> the spec row (aliases "H100", "H800", "H200" mean the SXM parts)
    cost("fp8_gemm", m=, n=, k=)      -> Cost(flops, hbm_bytes, link_bytes)
    project(cost, "H20", "fp8")       -> Projection(seconds, bound), bound in {"compute", "memory", "interconnect"}
    detect()                          -> Detection(gpu, reason, candidates) for the running device

Only dense tensor-core figures are used: datasheets print sparse ones (twice as large) with an asterisk.
Peaks are the datasheet's; real clocks under tensor load are lower (FlashMLA's H800s settle near 1600 MHz,
about 87% of the BF16 peak), so a roofline fraction of 0.85 is already excellent for a compute-bound kernel.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from dataclasses import dataclass
from typing import NamedTuple, Sequence

SCALE_BLOCK = 128  # DeepSeek-V3 recipe: 1x128 activation groups, 128x128 weight blocks, float32 scales
MLA_HEAD_DIM = 576  # 512 latent (c_KV) + 64 RoPE (k_pe)
MLA_HEAD_DIM_V = 512


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    fp8_tflops: float       # dense
    bf16_tflops: float      # dense
    hbm_gb: float
    hbm_tbps: float
    l2_mb: float
    nvlink_gbps: float      # per direction, theoretical (bidirectional figures are twice this)
    nvlink_note: str = ""

    def peak_flops(self, dtype: str) -> float:
        if dtype == "fp8":
            return self.fp8_tflops * 1e12
        if dtype == "bf16":
            return self.bf16_tflops * 1e12
        raise ValueError(f"dtype: expected 'fp8' or 'bf16', got {dtype!r}")

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12

    @property
    def link_bytes_per_s(self) -> float:
        return self.nvlink_gbps * 1e9


GPUS = {
    # NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), SXM column: 3,958 TFLOPS
    # FP8 and 1,979 BF16 "with sparsity", i.e. 1,979 / 989 dense; 3.35 TB/s HBM3; NVLink 900 GB/s
    # bidirectional. 50 MB L2: NVIDIA Hopper architecture whitepaper.
    "H100 SXM5": GPU("H100 SXM5", 132, 1979, 989, 80, 3.35, 50, 450),
    # Same datasheet, PCIe column: 3,026 / 1,513 sparse; 2.0 TB/s HBM2e; 600 GB/s NVLink bridge (2 cards).
    "H100 PCIe": GPU("H100 PCIe", 114, 1513, 756, 80, 2.0, 50, 300, "NVLink bridge between card pairs"),
    # H800 SXM5: an H100 SXM5 with NVLink cut to 400 GB/s bidirectional. DeepSeek, DeepSeek-V3 issue 28: "400
    # GB/s is the bidirectional theoretical value, 160 GB/s is our measured unidirectional value". L2 is not
    # published; it is the same GH100 die as H100 SXM5.
    "H800 SXM5": GPU("H800 SXM5", 132, 1979, 989, 80, 3.35, 50, 200, "about 160 GB/s achieved one way"),
    # H20: no NVIDIA datasheet. Press spec tables and NVIDIA's performance-model configs: 296 FP8 / 148 BF16
    # dense TFLOPS, 96 GB HBM3 at 4.0 TB/s, 60 MB L2, 900 GB/s NVLink bidirectional. Devices report 78 SMs and
    # 97,285 MB. The tensor peak is capped per SM: never derive it from SM count x clock.
    "H20": GPU("H20", 78, 296, 148, 96, 4.0, 60, 450),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200), SXM column: same tensor peaks as H100 SXM5,
    # 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional; 60 MB L2.
    "H200 SXM": GPU("H200 SXM", 132, 1979, 989, 141, 4.8, 60, 450),
}
ALIASES = {"H100": "H100 SXM5", "H800": "H800 SXM5", "H200": "H200 SXM"}
COMPARISON = ("H100 SXM5", "H800 SXM5", "H20", "H200 SXM")  # the cross-GPU question, in plot order


def get(name: str) -> GPU:
    """The spec row called `name` (case-insensitive; "H100"/"H800"/"H200" are the SXM parts)."""
    if isinstance(name, GPU):
        return name
    key = {k.lower(): k for k in list(GPUS) + list(ALIASES)}.get(str(name).strip().lower())
    if key is None:
        raise ValueError(f"gpu: expected one of {', '.join(list(GPUS) + list(ALIASES))}, got {name!r}")
    return GPUS[ALIASES.get(key, key)]


class Cost(NamedTuple):
    flops: float
    hbm_bytes: float
    link_bytes: float


class Projection(NamedTuple):
    seconds: float
    bound: str  # "compute", "memory" or "interconnect"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gemm_cost(ms: Sequence[int], n: int, k: int, weight_groups: int) -> Cost:
    """Block-scaled FP8 GEMM over groups of `ms` rows sharing K and N: each row reads its K fp8 values and
    K/128 scales once, writes N bf16 values; each of `weight_groups` weight matrices is read once with its
    128x128 block scales. Compulsory traffic only: re-reads through L2 are the kernel's problem."""
    rows = sum(ms)
    kb = _cdiv(k, SCALE_BLOCK)
    weights = weight_groups * (n * k + 4 * _cdiv(n, SCALE_BLOCK) * kb)
    activations = rows * (k + 4 * kb)
    return Cost(2.0 * rows * n * k, float(activations + weights + 2 * rows * n), 0.0)


def _seqlens(batch: int, seqlen) -> list[int]:
    if isinstance(seqlen, int):
        return [seqlen] * batch
    lens = [int(s) for s in seqlen]
    if batch is not None and len(lens) != batch:
        raise ValueError(f"seqlen: expected {batch} lengths (one per batch entry), got {len(lens)}")
    return lens


def occupied_ranks_per_token(topk: int, num_experts: int, world: int) -> float:
    """Expected number of distinct ranks a token is sent to when its top-k experts are k distinct experts
    drawn uniformly from num_experts, spread evenly over `world` ranks (num_experts / world per rank).

    A given rank hosts none of the k experts with probability C(E - E/W, k) / C(E, k) (hypergeometric: the
    k experts are distinct, so this is the exact form of the with-replacement approximation (1 - 1/W)^k).
    By linearity the expected number of occupied ranks is W * (1 - C(E - E/W, k) / C(E, k)). DeepSeek-V3's
    node-limited routing (top-4 groups) concentrates tokens on fewer ranks; this is the uniform baseline.
    """
    if num_experts % world:
        raise ValueError(f"num_experts: expected a multiple of world={world}, got {num_experts}")
    other = num_experts - num_experts // world
    p_empty = math.comb(other, topk) / math.comb(num_experts, topk)
    return world * (1.0 - p_empty)


def _dispatch_rows(tokens: int, topk: int, num_experts: int, world: int) -> tuple[float, float]:
    """(rows received per rank including its own, rows sent per rank to other ranks) under uniform routing
    with every rank holding `tokens` tokens: by symmetry each rank receives what it sends."""
    per_rank = tokens * occupied_ranks_per_token(topk, num_experts, world) / world
    return per_rank * world, per_rank * (world - 1)


def dispatch_row_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one token row on the wire: bf16 values, or fp8 values plus one float32 scale per 128."""
    if dtype == "bf16":
        return 2 * hidden
    if dtype == "fp8":
        return hidden + 4 * _cdiv(hidden, SCALE_BLOCK)
    raise ValueError(f"dtype: expected 'fp8' or 'bf16', got {dtype!r}")


def cost(op: str, **shape) -> Cost:
    """FLOPs, HBM bytes and interconnect bytes (per rank, one direction) of one call of `op`.

    fp8_gemm(m, n, k); fp8_gemm_contiguous(ms=[rows per group], n, k) (valid rows only, padding excluded;
    weights of groups with rows); fp8_gemm_masked(masked_m=[...], n, k) (every group's weights are read);
    mla_decode(batch, s_q, h_q, seqlen: int or list, kv_dtype="bf16"|"fp8") as FlashMLA counts it;
    moe_dispatch / moe_combine(tokens, hidden, topk, num_experts, world, dtype) per rank, intranode;
    moe_permute / moe_unpermute(rows, pairs, hidden, dtype); per_token_group_quant_fp8(m, k);
    per_block_quant_fp8(n, k, groups=1).
    """
    for key, value in shape.items():
        if key not in ("dtype", "kv_dtype") and value is not None:
            _check_sizes(key, value, low=1 if key == "world" else 0)
    if op == "fp8_gemm":
        return _gemm_cost([shape["m"]], shape["n"], shape["k"], 1)
    if op == "fp8_gemm_contiguous":
        ms = list(shape["ms"])
        return _gemm_cost(ms, shape["n"], shape["k"], sum(1 for m in ms if m > 0))
    if op == "fp8_gemm_masked":
        ms = list(shape["masked_m"])
        return _gemm_cost(ms, shape["n"], shape["k"], len(ms))
    if op == "mla_decode":
        lens = _seqlens(shape.get("batch"), shape["seqlen"])
        batch, s_q, h_q = len(lens), shape.get("s_q", 1), shape["h_q"]
        cache_elem = {"bf16": 2, "fp8": 1}[shape.get("kv_dtype", "bf16")]
        q_rows = batch * s_q * h_q
        hbm = cache_elem * MLA_HEAD_DIM * sum(lens) + 2 * (MLA_HEAD_DIM + MLA_HEAD_DIM_V) * q_rows
        flops = 2.0 * s_q * h_q * sum(lens) * (MLA_HEAD_DIM + MLA_HEAD_DIM_V)
        return Cost(flops, float(hbm), 0.0)
    if op in ("moe_dispatch", "moe_combine"):
        default = "fp8" if op == "moe_dispatch" else "bf16"
        row = dispatch_row_bytes(shape["hidden"], shape.get("dtype", default))
        received, sent_remote = _dispatch_rows(shape["tokens"], shape["topk"], shape["num_experts"], shape["world"])
        # dispatch: read the token once per destination, write every received row; combine mirrors it
        return Cost(0.0, float(2 * received * row), float(sent_remote * row))
    if op in ("moe_permute", "moe_unpermute"):
        elem = {"bf16": 2, "fp8": 1}[shape.get("dtype", "bf16")]
        # one row per (token, local expert) pair on the expert side, one per token on the other
        return Cost(0.0, float((shape["rows"] + shape["pairs"]) * shape["hidden"] * elem), 0.0)
    if op == "per_token_group_quant_fp8":
        m, k = shape["m"], shape["k"]
        return Cost(0.0, float(m * k * 2 + m * k + 4 * m * _cdiv(k, SCALE_BLOCK)), 0.0)
    if op == "per_block_quant_fp8":
        g, n, k = shape.get("groups", 1), shape["n"], shape["k"]
        return Cost(0.0, float(g * (n * k * 2 + n * k + 4 * _cdiv(n, SCALE_BLOCK) * _cdiv(k, SCALE_BLOCK))), 0.0)
    raise ValueError(f"op: expected one of fp8_gemm, fp8_gemm_contiguous, fp8_gemm_masked, mla_decode, "
                     f"moe_dispatch, moe_combine, moe_permute, moe_unpermute, per_token_group_quant_fp8, "
                     f"per_block_quant_fp8, got {op!r}")


def _check_sizes(name: str, value, low: int) -> None:
    """A size argument of cost(): a finite real number >= low (an expected count may be fractional), or a
    sequence of them (ms, masked_m, seqlen)."""
    items = value if isinstance(value, (list, tuple, range)) else [value]
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"{name}: expected a number or a sequence of numbers, got bool")
        if not isinstance(item, numbers.Real):
            try:
                item = operator.index(item)  # integer scalars of numpy or torch
            except TypeError:
                raise TypeError(f"{name}: expected a number or a sequence of numbers, "
                                f"got {type(item).__name__}") from None
        if not math.isfinite(item) or item < low:
            raise ValueError(f"{name}: expected a finite number >= {low}, got {item}")


def project(c: Cost, gpu, dtype: str) -> Projection:
    """Roofline time of cost `c` on `gpu` (a name or a GPU row) with tensor math in `dtype` ("fp8" or
    "bf16"): the slowest of compute, HBM traffic and NVLink traffic, which are assumed to overlap fully."""
    if not isinstance(c, Cost):
        raise TypeError(f"c: expected a Cost (from cost()), got {type(c).__name__}")
    for field, value in zip(Cost._fields, c):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"c.{field}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"c.{field}: expected a finite number >= 0, got {value}")
    g = get(gpu)
    times = {
        "compute": c.flops / g.peak_flops(dtype),
        "memory": c.hbm_bytes / g.hbm_bytes_per_s,
        "interconnect": c.link_bytes / g.link_bytes_per_s,
    }
    bound = max(times, key=times.get)
    return Projection(times[bound], bound)


class Detection(NamedTuple):
    gpu: GPU | None
    reason: str
    candidates: tuple = ()


GPU_ENV = "PYKERNELS_GPU"


def _from_override(name: str) -> Detection:
    return Detection(get(name), f"{name!r} named by the user (--gpu or {GPU_ENV})")


def identify(name: str, sms: int, memory_bytes: int, capability=(9, 0), override: str | None = None) -> Detection:
    """Which spec row a device with these properties is.

    The device name decides first: H100 and H800 are the same silicon with the same SM count, memory and
    clocks, and differ only in NVLink, which no device property reveals; they report different names
    ("NVIDIA H100 80GB HBM3" vs "NVIDIA H800"). The SM count then separates the PCIe part (114) and H20 (78).
    When the name says nothing (a renamed or virtualized device) and the other facts fit several rows, the
    answer is None with the candidates, and the caller asks the user for --gpu / PYKERNELS_GPU. Parts with
    no row (H100 NVL, H800 PCIe, H200 NVL: other clocks or power limits) are unknown rather than a wrong row.
    """
    if override:
        return _from_override(override)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name: expected a str or None, got {type(name).__name__}")
    for value, arg in ((sms, "sms"), (memory_bytes, "memory_bytes")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg}: expected an int, got {type(value).__name__}")
    if not (isinstance(capability, (tuple, list)) and len(capability) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in capability)):
        raise TypeError(f"capability: expected a (major, minor) pair of ints, got {capability!r}")
    upper = (name or "").upper()
    gb = memory_bytes / 2**30
    described = f"{name!r} ({sms} SMs, {gb:.0f} GiB, sm_{capability[0]}{capability[1]})"
    if tuple(capability) != (9, 0):
        return Detection(None, f"{described} is not a Hopper GPU; no roofline")
    by_name = None
    if "H800" in upper:
        by_name = "H800 SXM5" if sms == 132 and "PCIE" not in upper else None
    elif "H200" in upper:
        by_name = "H200 SXM" if sms == 132 and "NVL" not in upper else None
    elif "H20" in upper:
        by_name = "H20" if sms == 78 else None
    elif "H100" in upper:
        if "NVL" in upper:
            by_name = None
        elif "PCIE" in upper or sms == 114:
            by_name = "H100 PCIe" if sms == 114 else None
        else:
            by_name = "H100 SXM5" if sms == 132 else None
    else:
        fits = [g.name for g in GPUS.values() if g.sms == sms and abs(g.hbm_gb - gb) / g.hbm_gb < 0.1]
        if len(fits) == 1:
            return Detection(GPUS[fits[0]], f"{described}: only {fits[0]} has {sms} SMs and this memory")
        if fits:
            return Detection(None, f"{described} could be any of {', '.join(fits)} (they differ only in what no "
                                   f"device property shows, such as NVLink bandwidth); name it with --gpu or "
                                   f"{GPU_ENV}", tuple(fits))
        return Detection(None, f"{described} matches no known Hopper part; no roofline (name one with --gpu or "
                               f"{GPU_ENV} if it is one)")
    if by_name is None:
        return Detection(None, f"{described} is a Hopper part with no spec row here (its clocks, SMs or power "
                               f"differ); no roofline rather than a wrong one")
    return Detection(GPUS[by_name], f"{described} by name and SM count")


def detect(device=None, override: str | None = None) -> Detection:
    """Detection for a CUDA device (default: the current one). `override`, else $PYKERNELS_GPU, wins."""
    override = override or os.environ.get(GPU_ENV) or None
    import torch

    if not torch.cuda.is_available():
        if override:
            return _from_override(override)
        return Detection(None, "no CUDA GPU visible; figures from this machine are CPU figures")
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return identify(props.name, props.multi_processor_count, props.total_memory, (props.major, props.minor),
                    override)


def expected_grouped_gemm_cost(rows: float, groups: float, n: int, k: int) -> Cost:
    """Expected cost of a block-scaled grouped FP8 GEMM when only expectations are known (a model of a MoE
    layer under random routing): `rows` activation rows in all, spread over `groups` weight matrices that
    receive at least one row (both may be fractional). The same counts as cost("fp8_gemm_contiguous")."""
    return _gemm_cost([rows], n, k, groups)


# ---- low-latency (decode) MoE dispatch and combine ----

# Bytes DeepEP's low-latency test counts per (token, expert) message beside the row (its tests/test_low_latency.py:
# the source-token and layout fields that travel with each dispatched row).
LOW_LATENCY_MESSAGE_HEADER = 16


def low_latency_message_bytes(hidden: int, dtype: str, combine: bool = False) -> int:
    """Bytes of one (token, expert) message of low-latency dispatch or combine, as DeepEP counts them:
    dispatch FP8 hidden + 4·hidden/128 (scales) + 16, dispatch BF16 2·hidden + 16, combine 2·hidden (a bf16
    expert output row, nothing beside it)."""
    _check_sizes("hidden", hidden, low=1)
    if combine:
        if dtype != "bf16":
            raise ValueError(f"dtype: expected 'bf16' for combine, got {dtype!r}")
        return 2 * hidden
    return dispatch_row_bytes(hidden, dtype) + LOW_LATENCY_MESSAGE_HEADER


def low_latency_cost(pairs_sent: float, pairs_received: float, pairs_remote: float, hidden: int, dtype: str,
                     combine: bool = False) -> Cost:
    """One rank's low-latency dispatch or combine, counted per (token, expert) pair as DeepEP does (one message
    per pair, even where two of a token's experts share a rank): every message is written once where it is
    sent and once where it is received, so HBM bytes = (pairs sent + pairs received) x message bytes; NVLink
    bytes = pairs sent to other ranks x message bytes. In combine the pairs sent are the expert outputs this
    rank returns (the pairs it received in dispatch) and the pairs received are its own tokens' pairs."""
    for name, value in (("pairs_sent", pairs_sent), ("pairs_received", pairs_received),
                        ("pairs_remote", pairs_remote)):
        _check_sizes(name, value, low=0)
    if pairs_remote > pairs_sent:
        raise ValueError(f"pairs_remote: expected at most pairs_sent = {pairs_sent}, got {pairs_remote}")
    message = low_latency_message_bytes(hidden, dtype, combine)
    return Cost(0.0, float((pairs_sent + pairs_received) * message), float(pairs_remote * message))
