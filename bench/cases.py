"""Benchmark cases: for each (op, shape) the inputs, the cost, and one zero-argument callable per backend.

Backends are pykernels' own ("torch", "triton", "cuda"), baselines written with torch ("torch-sdpa",
"torch-dequant-mm"), and
peers when importable ("deep_gemm", "vllm-triton", "torch-scaled-mm", "flash_mla", "flashinfer", "deep_ep").
A peer's output is compared once with pykernels' torch reference before it is timed, so a peer called the
wrong way is reported as failed, never timed as if it did the same work.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch

import pykernels
from pykernels import _backend, hardware

FP8 = torch.float8_e4m3fn
OWN_BACKENDS = ("torch", "triton", "cuda")
NOT_IN_BUILD = "op not in this build"


# (op, backend) pairs whose calls block the host on device data out of the torch dispatcher's sight: never
# captured into a CUDA graph (capture would wait on kernels that do not run); the profiler times their kernels.
# DeepEP's low-latency kernels read nothing on the host and are captured like ours.
NOT_CAPTURABLE = {(op, "deep_ep"): "DeepEP's normal-mode dispatch and combine wait on the host for the receive counts"
                  for op in ("moe_dispatch", "moe_combine")}
# Inside a torch.library op the reads are out of the sync counter's sight; a capture attempt would fail on them
# after the layer's collective was already recorded.
NOT_CAPTURABLE[("moe_decode_layer", "torch")] = "the torch masked GEMM reads each group's row count on the host"


def capture_blocker(op: str, backend: str) -> str | None:
    """Why (op, backend) must not be captured into a CUDA graph, or None when the timer may try."""
    return NOT_CAPTURABLE.get((op, backend))


class Skip(Exception):
    """This (case, backend) cannot run here; the message says why."""


def _require_backend(backend: str, device, op: str) -> None:
    """Raises Skip, with the reason, when `backend` cannot run `op` on `device`."""
    try:
        _backend.resolve(backend, device, op)
    except RuntimeError as exc:
        raise Skip(str(exc).split(": ", 1)[-1]) from None


# op -> (kind of math for the roofline, the pykernels attribute path it needs, extra backends)
OPS = {
    "per_token_group_quant_fp8": ("bf16", "per_token_group_quant_fp8", ()),
    "per_block_quant_fp8": ("bf16", "per_block_quant_fp8", ()),
    "fp8_gemm_nt": ("fp8", "fp8_gemm_nt", ("torch-dequant-mm", "deep_gemm", "vllm-triton", "torch-scaled-mm")),
    "m_grouped_fp8_gemm_nt_contiguous": ("fp8", "m_grouped_fp8_gemm_nt_contiguous", ("deep_gemm",)),
    "m_grouped_fp8_gemm_nt_masked": ("fp8", "m_grouped_fp8_gemm_nt_masked", ("deep_gemm",)),
    "mla_decode": ("bf16", "mla_decode", ("torch-sdpa", "flash_mla", "flashinfer")),
    "moe_dispatch": ("bf16", "moe.Buffer", ("deep_ep",)),
    "moe_combine": ("bf16", "moe.Buffer", ("deep_ep",)),
    "moe_ll_dispatch": ("bf16", "moe.Buffer.low_latency_dispatch", ("deep_ep",)),
    "moe_ll_combine": ("bf16", "moe.Buffer.low_latency_combine", ("deep_ep",)),
    "moe_decode_layer": ("fp8", "moe.Buffer.low_latency_dispatch", ()),
    "moe_permute": ("bf16", "moe.permute_to_experts", ()),
    "moe_unpermute": ("bf16", "moe.unpermute_from_experts", ()),
}
ALL_BACKENDS = OWN_BACKENDS + tuple(dict.fromkeys(b for _, _, extra in OPS.values() for b in extra))


def op_function(op: str):
    """The pykernels callable (or class) behind `op`, or None when this build lacks it."""
    obj = pykernels
    for part in OPS[op][1].split("."):
        nxt = getattr(obj, part, None)
        if nxt is None and obj is pykernels:
            try:
                nxt = importlib.import_module(f"pykernels.{part}")
            except ImportError:
                nxt = None
        if nxt is None:
            return None
        obj = nxt
    return obj


def _cdiv(a, b):
    return -(-a // b)


@dataclass
class Case:
    op: str
    shape: dict

    @property
    def math_dtype(self) -> str:
        return OPS[self.op][0]

    @property
    def dtype(self) -> str:
        """What the record's dtype column says: the data type that sets the op's traffic."""
        if self.op.startswith(("fp8_gemm", "m_grouped")):
            return "fp8"
        if self.op == "mla_decode":
            return f"{self.shape['kv_dtype']} cache"
        if self.op.startswith("per_"):
            return "bf16->fp8"
        if self.op == "moe_decode_layer":
            return "fp8"
        return self.shape.get("dtype", "bf16")

    @property
    def label(self) -> str:
        s = self.shape
        if self.op.startswith("per_token"):
            return f"M={s['m']} K={s['k']}"
        if self.op.startswith("per_block"):
            return f"N={s['n']} K={s['k']}"
        if self.op == "fp8_gemm_nt":
            return f"M={s['m']} N={s['n']} K={s['k']}"
        if self.op.endswith("contiguous"):
            ms = s["ms"]
            rows = f"{len(ms)}x{ms[0]}" if len(set(ms)) == 1 else "+".join(map(str, ms))
            return f"{rows} N={s['n']} K={s['k']}"
        if self.op.endswith("masked"):
            ms = s["masked_m"]
            rows = f"{len(ms)}x{ms[0]}" if len(set(ms)) == 1 else "+".join(map(str, ms))
            return f"{rows}/{s['m_max']} N={s['n']} K={s['k']}"
        if self.op == "mla_decode":
            lens = s["seqlen"]
            sk = f"s_k={lens}" if isinstance(lens, int) else "s_k=" + "+".join(map(str, lens))
            return f"b={s['batch']} {sk} h_q={s['h_q']} s_q={s['s_q']}"
        if self.op in ("moe_dispatch", "moe_combine"):
            return f"T={s['tokens']} H={s['hidden']} top{s['topk']}/{s['num_experts']} EP{s.get('world', '?')}"
        if self.op in LOW_LATENCY_OPS:
            cap = f"/{s['max_tokens']}" if s.get("max_tokens", s["tokens"]) != s["tokens"] else ""
            inter = f" I={s['intermediate']}" if "intermediate" in s else ""
            return (f"T={s['tokens']}{cap} H={s['hidden']}{inter} top{s['topk']}/{s['num_experts']} "
                    f"EP{s.get('world', '?')}")
        return f"T={s['tokens']} H={s['hidden']} top{s['topk']}/{s['num_experts']} local={s['local_experts']}"

    @property
    def key(self) -> tuple:
        return (self.op, self.label, self.dtype)

    def cost(self) -> hardware.Cost:
        """The analytic cost; for MoE, the expectation under uniform random routing."""
        s = self.shape
        if self.op == "fp8_gemm_nt":
            return hardware.cost("fp8_gemm", m=s["m"], n=s["n"], k=s["k"])
        if self.op.endswith("contiguous"):
            return hardware.cost("fp8_gemm_contiguous", ms=s["ms"], n=s["n"], k=s["k"])
        if self.op.endswith("masked"):
            return hardware.cost("fp8_gemm_masked", masked_m=s["masked_m"], n=s["n"], k=s["k"])
        if self.op == "mla_decode":
            return hardware.cost("mla_decode", batch=s["batch"], s_q=s["s_q"], h_q=s["h_q"], seqlen=s["seqlen"],
                                 kv_dtype=s["kv_dtype"])
        if self.op in ("moe_dispatch", "moe_combine"):
            return hardware.cost(self.op, tokens=s["tokens"], hidden=s["hidden"], topk=s["topk"],
                                 num_experts=s["num_experts"], world=s["world"], dtype=s["dtype"])
        if self.op in LOW_LATENCY_OPS:
            return expected_low_latency_cost(self.op, s)
        if self.op in ("moe_permute", "moe_unpermute"):
            e, k, local = s["num_experts"], s["topk"], s["local_experts"]
            rows = s["tokens"] * (1 - math.comb(e - local, k) / math.comb(e, k))
            return hardware.cost(self.op, rows=rows, pairs=s["tokens"] * k * local / e, hidden=s["hidden"])
        if self.op.startswith("per_token"):
            return hardware.cost(self.op, m=s["m"], k=s["k"])
        return hardware.cost(self.op, n=s["n"], k=s["k"])


@dataclass
class Prepared:
    """Inputs built once per case. `make(backend)` returns the timed callable or raises Skip; `cost` is
    the actual cost of these inputs (MoE: counted from the drawn routing, not the expectation); `extra` holds
    figures beside the cost (DeepEP's logical bytes, row and pair counts) and, for the low-latency cases, the
    inputs, so that their results can be checked against an independent computation."""
    case: Case
    cost: hardware.Cost
    makers: dict
    reference: object = None          # zero-argument callable: pykernels' torch result, for peer checks
    compare: object = None            # (peer output, reference output) -> error metric
    extra: dict = field(default_factory=dict)

    def make(self, backend: str):
        if backend not in self.makers:
            raise Skip(f"{backend} has no {self.case.op} implementation")
        fn = self.makers[backend]()
        if backend not in OWN_BACKENDS and self.reference is not None:
            err = self.compare(fn(), self.reference())
            if not err < 1e-3:
                raise RuntimeError(f"{backend} output differs from the torch reference (error {err:.3g}); "
                                   f"not timed: the adapter or the peer's API has changed")
        return fn


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2) in float64: 0 for equal tensors, scale-free (DeepGEMM's metric)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


def _own(op_fn, *args, **kwargs):
    """Makers for pykernels' own backends: each resolves first, so an unavailable backend says why."""
    device = kwargs.pop("_device")
    name = kwargs.pop("_name")

    def maker(backend):
        def make():
            _require_backend(backend, device, name)
            return lambda: op_fn(*args, backend=backend, **kwargs)
        return make
    return {b: maker(b) for b in OWN_BACKENDS}


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # a peer's import may fail for any reason (missing CUDA libs, ABI mismatch)
        raise Skip(f"{name} is not importable: {type(exc).__name__}: {exc}") from None


def _need_hopper(device, peer):
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        raise Skip(f"{peer} needs a compute-capability 9.0 GPU")


# ---- quantizers ----

def _prepare_quant(case, device):
    s = case.shape
    fn = op_function(case.op)
    if case.op == "per_token_group_quant_fp8":
        x = torch.randn(s["m"], s["k"], device=device, dtype=torch.bfloat16)
    else:
        x = torch.randn(s["n"], s["k"], device=device, dtype=torch.bfloat16)
    return Prepared(case, case.cost(), _own(fn, x, _device=device, _name=case.op))


# ---- FP8 GEMMs ----

def _quantized_operands(a, b):
    a8, sa = pykernels.per_token_group_quant_fp8(a)
    b8, sb = pykernels.per_block_quant_fp8(b)
    return (a8, sa), (b8, sb)


def _deep_gemm(case, device, a, b, out, extra_args):
    _need_hopper(device, "deep_gemm")
    dg = _import("deep_gemm")
    names = {"fp8_gemm_nt": ("fp8_gemm_nt", "gemm_fp8_fp8_bf16_nt"),
             "m_grouped_fp8_gemm_nt_contiguous": ("m_grouped_fp8_gemm_nt_contiguous",
                                                  "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"),
             "m_grouped_fp8_gemm_nt_masked": ("m_grouped_fp8_gemm_nt_masked",
                                              "m_grouped_gemm_fp8_fp8_bf16_nt_masked")}[case.op]
    if hasattr(dg, names[0]):  # DeepGEMM >= 2: takes row-major float32 scales and lays them out itself
        f = getattr(dg, names[0])
        return lambda: f(a, b, out, *extra_args)
    if hasattr(dg, names[1]):  # DeepGEMM 1: activation scales transposed and TMA-aligned by the caller
        f = getattr(dg, names[1])
        a_t = (a[0], dg.get_col_major_tma_aligned_tensor(a[1]))
        return lambda: f(a_t, b, out, *extra_args)
    raise Skip(f"deep_gemm {getattr(dg, '__version__', '?')} has neither {names[0]} nor {names[1]}")


def _vllm_triton(device, a, b):
    if device.type != "cuda":
        raise Skip("vLLM's Triton block-scaled GEMM needs a CUDA GPU")
    mod = _import("vllm.model_executor.layers.quantization.utils.fp8_utils")
    f = getattr(mod, "w8a8_triton_block_scaled_mm", None) or getattr(mod, "w8a8_block_fp8_matmul", None)
    if f is None:
        raise Skip("vllm's fp8_utils has no block-scaled Triton GEMM under a known name")
    return lambda: f(a[0], b[0], a[1], b[1], [128, 128], torch.bfloat16)


def _dequant_mm(a, b):
    """The baseline without an FP8 GEMM: dequantize both operands to bf16 (timed too), then a bf16 matmul."""
    from pykernels.reference.fp8_quant import dequantize_blocks, dequantize_token_groups

    (a8, sa), (b8, sb) = a, b
    return lambda: dequantize_token_groups(a8, sa).to(torch.bfloat16) @ dequantize_blocks(b8, sb).to(torch.bfloat16).t()


def _scaled_mm(device, a, b, want):
    """torch._scaled_mm with 1x128 activation and 128x128 weight scales: cuBLASLt >= 12.9 on SM90. The
    scale layouts it wants have changed across releases, so each candidate is checked before use."""
    _need_hopper(device, "torch._scaled_mm blockwise")
    (a8, sa), (b8, sb) = a, b
    sa_outer = sa.t().contiguous().t()  # (M, K/128) with M fastest, as cuBLASLt's 1x128 mode reads it
    errors = []
    for scale_b in (sb.t().contiguous(), sb.t(), sb):
        try:
            fn = lambda sb_=scale_b: torch._scaled_mm(a8, b8.t(), scale_a=sa_outer, scale_b=sb_,
                                                      out_dtype=torch.bfloat16)
            if calc_diff(fn(), want()) < 1e-3:
                return fn
            errors.append("wrong result")
        except Exception as exc:  # unsupported layouts raise RuntimeError with cuBLASLt's reason
            errors.append(str(exc).splitlines()[0][:120])
    raise Skip(f"torch._scaled_mm blockwise unsupported here ({'; '.join(dict.fromkeys(errors))})")


def _prepare_gemm(case, device):
    s = case.shape
    n, k = s["n"], s["k"]
    fn = op_function(case.op)
    common = dict(_device=device, _name=case.op)
    if case.op == "fp8_gemm_nt":
        a, b = _quantized_operands(torch.randn(s["m"], k, device=device, dtype=torch.bfloat16),
                                   torch.randn(n, k, device=device, dtype=torch.bfloat16))
        out = torch.empty(s["m"], n, device=device, dtype=torch.bfloat16)
        makers = _own(fn, a, b, out=out, **common)
        extra_args, valid = (), slice(None)
        plan = (s["m"], 1, "plain")
    elif case.op.endswith("contiguous"):
        align = getattr(pykernels, "GROUPED_M_ALIGNMENT", 128)
        ms = s["ms"]
        padded = [_cdiv(m, align) * align for m in ms]
        idx = torch.cat([torch.tensor([g] * m + [-1] * (p - m), dtype=torch.int32) for g, (m, p) in
                         enumerate(zip(ms, padded))]).to(device)
        a, b = _quantized_operands(torch.randn(sum(padded), k, device=device, dtype=torch.bfloat16),
                                   torch.randn(len(ms), n, k, device=device, dtype=torch.bfloat16))
        out = torch.empty(sum(padded), n, device=device, dtype=torch.bfloat16)
        makers = _own(fn, a, b, idx, out=out, **common)
        extra_args, valid = (idx,), idx >= 0
        plan = (sum(padded), 1, "contiguous")
    else:
        ms, m_max = s["masked_m"], s["m_max"]
        a, b = _quantized_operands(torch.randn(len(ms), m_max, k, device=device, dtype=torch.bfloat16),
                                   torch.randn(len(ms), n, k, device=device, dtype=torch.bfloat16))
        masked_m = torch.tensor(ms, dtype=torch.int32, device=device)
        expected_m = max(1, round(sum(ms) / len(ms)))
        out = torch.empty(len(ms), m_max, n, device=device, dtype=torch.bfloat16)
        makers = _own(fn, a, b, masked_m, expected_m, out=out, **common)
        extra_args = (masked_m, expected_m)
        valid = torch.arange(m_max, device=device)[None, :] < masked_m[:, None]
        plan = (expected_m, len(ms), "masked")

    def reference():
        return fn(a, b, backend="torch")[valid].clone()

    makers["deep_gemm"] = lambda: _deep_gemm(case, device, a, b, out, extra_args)
    extra = {"cuda_config": _cuda_gemm_config(*plan, n, k, device)}
    if case.op == "fp8_gemm_nt":
        makers["torch-dequant-mm"] = lambda: _dequant_mm(a, b)
        makers["vllm-triton"] = lambda: _vllm_triton(device, a, b)
        makers["torch-scaled-mm"] = lambda: _scaled_mm(device, a, b, reference)
    return Prepared(case, case.cost(), makers, reference,
                    lambda got, want: calc_diff((got if got is not None else out)[valid], want), extra=extra)


def _cuda_gemm_config(m: int, groups: int, layout: str, n: int, k: int, device) -> str | None:
    """The tile the CUDA kernel runs for a GEMM planned as `m` rows (M, M_total or expected_m) x `groups`
    in `layout` (its launcher's own choice, fp8_gemm_config), for the record's note: a timing then says
    which instantiation it measured. None without the extension."""
    if getattr(pykernels, "fp8_gemm_config", None) is None:
        return None
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    try:
        cfg = pykernels.fp8_gemm_config(m, n, k, groups, num_sms=sms, layout=layout)
    except RuntimeError:  # the extension is not built here
        return None
    multicast = "" if cfg["multicast"] == "none" else f", 2-CTA multicast of {cfg['multicast'].upper()}"
    waves = f"{cfg['num_waves']} wave" + ("s" if cfg["num_waves"] != 1 else "")
    return (f"CUDA tile {cfg['block_m']}x{cfg['block_n']}, {cfg['num_stages']} stages, {waves} "
            f"(last {cfg['wave_utilization']:.0%}){multicast}")


# ---- MLA decode ----

PAGE = 64


def _prepare_mla(case, device):
    s = case.shape
    b, s_q, h_q = s["batch"], s["s_q"], s["h_q"]
    lens = [s["seqlen"]] * b if isinstance(s["seqlen"], int) else list(s["seqlen"])
    pages = [_cdiv(n, PAGE) for n in lens]
    num_blocks = sum(pages)
    # pages of each sequence scattered over the cache, as a serving system's allocator leaves them
    order = torch.randperm(num_blocks)
    block_table = torch.zeros(b, max(pages), dtype=torch.int32)
    start = 0
    for i, p in enumerate(pages):
        block_table[i, :p] = order[start:start + p]
        start += p
    block_table = block_table.to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(b, s_q, h_q, hardware.MLA_HEAD_DIM, device=device, dtype=torch.bfloat16)
    kv = torch.randn(num_blocks, PAGE, 1, hardware.MLA_HEAD_DIM, device=device, dtype=torch.bfloat16)
    kv_scale = None
    if s["kv_dtype"] == "fp8":
        scale = float(kv.float().abs().amax()) / 448.0
        kv_scale = torch.tensor([scale], dtype=torch.float32, device=device)
        kv = (kv.float() / scale).to(FP8)
    causal = s_q > 1
    fn = op_function("mla_decode")
    get_md = getattr(pykernels, "get_mla_metadata", None)
    metadata = get_md(seqlens, s_q * h_q, 1) if get_md is not None else None
    makers = _own(fn, q, kv, block_table, seqlens, head_dim_v=hardware.MLA_HEAD_DIM_V, causal=causal,
                  kv_scale=kv_scale, metadata=metadata, _device=device, _name="mla_decode")

    def dequantized_cache():
        return kv if kv_scale is None else (kv.float() * kv_scale).to(torch.bfloat16)

    def sdpa():
        if len(set(lens)) != 1:
            raise Skip("the SDPA baseline covers uniform lengths only (varlen needs per-request masks)")
        n = lens[0]
        softmax_scale = hardware.MLA_HEAD_DIM ** -0.5
        mask = None
        if causal:  # query row r = t * h_q + head sees keys [0, n - s_q + t]
            t = torch.arange(s_q * h_q, device=device)[:, None] // h_q
            mask = torch.arange(n, device=device)[None, :] <= (n - s_q + t)

        def run():
            # One latent KV head: fold heads and query tokens into one query axis of a single-head attention,
            # so no per-head copy of the cache is ever materialized.
            cache = dequantized_cache() if kv_scale is not None else kv
            keys = cache[block_table.long()].reshape(b, 1, -1, hardware.MLA_HEAD_DIM)[:, :, :n]
            out = torch.nn.functional.scaled_dot_product_attention(
                q.reshape(b, 1, s_q * h_q, hardware.MLA_HEAD_DIM), keys, keys[..., :hardware.MLA_HEAD_DIM_V],
                attn_mask=mask, scale=softmax_scale)
            return out.reshape(b, s_q, h_q, hardware.MLA_HEAD_DIM_V)
        return run

    def flash_mla():
        _need_hopper(device, "flash_mla")
        if kv_scale is not None:
            raise Skip("FlashMLA has no dense FP8-cache decode on SM90")
        fm = _import("flash_mla")
        md, splits = fm.get_mla_metadata(seqlens, s_q * h_q, 1)
        return lambda: fm.flash_mla_with_kvcache(q, kv, block_table, seqlens, hardware.MLA_HEAD_DIM_V, md, splits,
                                                 causal=causal)

    def flashinfer():
        if device.type != "cuda":
            raise Skip("flashinfer needs a CUDA GPU")
        if kv_scale is not None or s_q != 1:
            raise Skip("the flashinfer adapter covers a bf16 cache with s_q=1")
        fi = _import("flashinfer.mla")
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        wrapper = fi.BatchMLAPagedAttentionWrapper(workspace)
        page_counts = torch.tensor(pages, dtype=torch.int32, device=device)
        kv_indptr = torch.nn.functional.pad(torch.cumsum(page_counts, 0, dtype=torch.int32), (1, 0))
        kv_indices = torch.cat([block_table[i, :p] for i, p in enumerate(pages)])
        qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=device)
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, seqlens, h_q, hardware.MLA_HEAD_DIM_V,
                     hardware.MLA_HEAD_DIM - hardware.MLA_HEAD_DIM_V, PAGE, False, hardware.MLA_HEAD_DIM ** -0.5,
                     q.dtype, kv.dtype)
        ckv = kv[:, :, 0, :hardware.MLA_HEAD_DIM_V].contiguous()
        kpe = kv[:, :, 0, hardware.MLA_HEAD_DIM_V:].contiguous()
        q_nope = q[:, 0, :, :hardware.MLA_HEAD_DIM_V].contiguous()
        q_pe = q[:, 0, :, hardware.MLA_HEAD_DIM_V:].contiguous()
        return lambda: wrapper.run(q_nope, q_pe, ckv, kpe).unsqueeze(1)

    makers.update({"torch-sdpa": sdpa, "flash_mla": flash_mla, "flashinfer": flashinfer})

    def reference():
        return fn(q, kv, block_table, seqlens, head_dim_v=hardware.MLA_HEAD_DIM_V, causal=causal, kv_scale=kv_scale,
                  backend="torch")[0]

    def compare(got, want):
        return calc_diff(got[0] if isinstance(got, tuple) else got, want)
    return Prepared(case, case.cost(), makers, reference, compare)


# ---- MoE ----

def _routing(tokens, topk, num_experts, device):
    """Uniform random top-k: k distinct experts per token, softmax weights."""
    topk_idx = torch.rand(tokens, num_experts, device=device).topk(topk, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, topk, device=device), dim=-1)
    return topk_idx, weights


def _prepare_moe_comm(case, device, group):
    import torch.distributed as dist

    s = case.shape
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tokens, hidden, e = s["tokens"], s["hidden"], s["num_experts"]
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    topk_idx, weights = _routing(tokens, s["topk"], e, device)
    fp8 = case.op == "moe_dispatch" and s["dtype"] == "fp8"
    x_in = pykernels.per_token_group_quant_fp8(x) if fp8 else x
    buffer_cls = op_function(case.op)
    # rows this rank sends, deduplicated per destination, counted from the drawn routing
    dest = torch.zeros(tokens, world, dtype=torch.bool, device=device)
    dest.scatter_(1, topk_idx // (e // world), True)
    sent = int(dest.sum())
    sent_remote = sent - int(dest[:, rank].sum())
    row = hardware.dispatch_row_bytes(hidden, "fp8" if fp8 else "bf16")
    counts = dest.sum(0).to(torch.int64)
    dist.all_reduce(counts, group=group)
    received = int(counts[rank])
    cost = hardware.Cost(0.0, float((sent + received) * row), float(sent_remote * row))
    # DeepEP's "logical" bytes: received rows, the rank's own included, at their size on the wire
    extra = {"received_rows": received, "logical_bytes": received * row}

    def own(backend):
        def make():
            _require_backend(backend, device, case.op)
            buf = buffer_cls(group, backend=backend)
            layout = buf.get_dispatch_layout(topk_idx, e)
            if case.op == "moe_dispatch":
                return lambda: buf.dispatch(x_in, topk_idx, weights, e, layout=layout)
            recv_x, _, _, _, handle = buf.dispatch(x, topk_idx, weights, e, layout=layout)
            y = torch.randn_like(recv_x)
            return lambda: buf.combine(y, handle)
        return make

    def deep_ep():
        if device.type != "cuda":
            raise Skip("deep_ep needs CUDA GPUs and an NCCL process group")
        de = _import("deep_ep")
        buf = de.Buffer(group, 1 << 30, 0)
        ntpr, ntprr, ntpe, in_rank, _ = buf.get_dispatch_layout(topk_idx, e)
        layout = dict(num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprr, is_token_in_rank=in_rank,
                      num_tokens_per_expert=ntpe)
        if case.op == "moe_dispatch":
            return lambda: buf.dispatch(x_in, topk_idx=topk_idx, topk_weights=weights, **layout)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
        return lambda: buf.combine(recv_x, handle)

    makers = {b: own(b) for b in OWN_BACKENDS}
    makers["deep_ep"] = deep_ep
    return Prepared(case, cost, makers, extra=extra)


# Low-latency (decode) mode: fixed-size buffers, no host reads, so every own backend is timed from graph replay.
LOW_LATENCY_OPS = ("moe_ll_dispatch", "moe_ll_combine", "moe_decode_layer")


def _max_tokens(shape) -> int:
    """The receive buffers' rows per source rank: the shape's max_tokens, else its token count (DeepEP's
    benchmark sizes them to the tokens it sends)."""
    return shape.get("max_tokens", shape["tokens"])


def decode_layer_cost(dispatch: hardware.Cost, combine: hardware.Cost, masked_m, hidden: int,
                      intermediate: int) -> hardware.Cost:
    """One decode MoE layer on one rank: low-latency dispatch (FP8), the masked gate/up GEMM (N = 2·I, K = H),
    SiLU(gate)·up quantized to FP8 over the received pairs, the masked down GEMM (N = H, K = I), combine.
    masked_m: rows per local expert (its sum = pairs received); every local expert's weights are read."""
    from bench.model import silu_mul_quant_cost

    parts = [dispatch, hardware.cost("fp8_gemm_masked", masked_m=masked_m, n=2 * intermediate, k=hidden),
             silu_mul_quant_cost(sum(masked_m), intermediate),
             hardware.cost("fp8_gemm_masked", masked_m=masked_m, n=hidden, k=intermediate), combine]
    return hardware.Cost(*(float(sum(c[i] for c in parts)) for i in range(3)))


def expected_low_latency_cost(op: str, s: dict) -> hardware.Cost:
    """Cost under uniform routing with every rank holding `tokens` tokens: each sends tokens·k pairs and, by
    symmetry, receives as many; (W - 1)/W of them cross to other ranks."""
    world = s["world"]
    pairs = s["tokens"] * s["topk"]
    remote = pairs * (world - 1) / world
    dispatch = hardware.low_latency_cost(pairs, pairs, remote, s["hidden"], s.get("dtype", "fp8"))
    combine = hardware.low_latency_cost(pairs, pairs, remote, s["hidden"], "bf16", combine=True)
    if op == "moe_ll_dispatch":
        return dispatch
    if op == "moe_ll_combine":
        return combine
    local = s["num_experts"] // world
    return decode_layer_cost(dispatch, combine, [pairs / local] * local, s["hidden"], s["intermediate"])


def _low_latency_pairs(topk_idx, num_experts, group):
    """Counted from the drawn routing: (pairs this rank sends, pairs it receives, pairs it sends to other
    ranks, rows per local expert [L] summed over every rank's routing)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = num_experts // world
    valid = topk_idx[(topk_idx >= 0) & (topk_idx < num_experts)]
    per_expert = torch.bincount(valid, minlength=num_experts).to(torch.int64)
    dist.all_reduce(per_expert, group=group)
    sent = int(valid.numel())
    to_self = int(((valid // local) == rank).sum())
    mine = per_expert[rank * local:(rank + 1) * local]
    return sent, int(mine.sum()), sent - to_self, mine.tolist()


def dequantized_rows(recv_x, recv_scales) -> torch.Tensor:
    """[L, S, H] receive rows in float64, FP8 rows times their 1x128 scales."""
    x = recv_x.double()
    if recv_scales is None:
        return x
    return x * recv_scales.double().repeat_interleave(hardware.SCALE_BLOCK, dim=-1)[..., :x.shape[-1]]


def low_latency_dispatch_summary(recv_x, recv_scales, recv_count) -> tuple:
    """(rows per local expert, the sum of each expert's valid rows in float64 [L, H]): what a dispatch delivered,
    independent of the order rows land in within an expert's block (DeepEP orders them by arrival)."""
    counts = recv_count.to(torch.int64).cpu()
    rows = dequantized_rows(recv_x, recv_scales)
    valid = (torch.arange(rows.shape[1])[None, :] < counts[:, None]).to(rows.device)
    # rows past the count are unspecified (NaN bit patterns included): selected away, never multiplied by 0
    return counts, torch.where(valid.unsqueeze(-1), rows, 0.0).sum(dim=1)


def _compare_dispatch(got, want) -> float:
    (c1, s1), (c2, s2) = got, want
    return calc_diff(s1.cpu(), s2.cpu()) if torch.equal(c1, c2) else 1.0


def _random_fp8_weights(groups: int, n: int, k: int, device) -> tuple:
    """Expert weights [G, N, K] as FP8 codes of unit-variance values with 128x128 block scales near 1/sqrt(K),
    so every GEMM output stays near unit size. Drawn a few experts at a time: at DeepSeek-V3 sizes with every
    expert on one GPU the bf16 draw of all of them at once would need twice the FP8 weights' 11 GB."""
    w = torch.empty((groups, n, k), dtype=FP8, device=device)
    for g in range(0, groups, 8):
        w[g:g + 8] = torch.randn((min(8, groups - g), n, k), dtype=torch.bfloat16, device=device).to(FP8)
    scales = (torch.rand((groups, _cdiv(n, 128), _cdiv(k, 128)), device=device) + 0.5) * k ** -0.5
    return w, scales


def _prepare_moe_low_latency(case, device, group):
    import torch.distributed as dist

    s = case.shape
    world = dist.get_world_size(group)
    tokens, hidden, e, max_tokens = s["tokens"], s["hidden"], s["num_experts"], _max_tokens(s)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    topk_idx, weights = _routing(tokens, s["topk"], e, device)
    sent, received, remote, _ = _low_latency_pairs(topk_idx, e, group)
    fp8 = s.get("dtype", "fp8") == "fp8"
    dispatch_cost = hardware.low_latency_cost(sent, received, remote, hidden, "fp8" if fp8 else "bf16")
    # combine returns the pairs dispatch delivered and gets back this rank's own
    combine_cost = hardware.low_latency_cost(received, sent, received - (sent - remote), hidden, "bf16",
                                             combine=True)
    buffer_cls = op_function("moe_dispatch")
    # DeepEP's figures: this rank's (token, expert) pairs x their message bytes, dispatch and combine alike
    message = hardware.low_latency_message_bytes(hidden, "fp8" if fp8 else "bf16",
                                                 combine=case.op != "moe_ll_dispatch")
    extra = {"pairs_sent": sent, "pairs_received": received, "logical_bytes": sent * message,
             "inputs": {"x": x, "topk_idx": topk_idx, "topk_weights": weights}}

    def dispatch_with(buf, use_fp8):
        return buf.low_latency_dispatch(x, topk_idx, max_tokens, e, use_fp8=use_fp8)

    def own(backend):
        def make():
            _require_backend(backend, device, case.op)
            buf = buffer_cls(group, backend=backend)
            if case.op == "moe_ll_dispatch":
                return lambda: dispatch_with(buf, fp8)
            # the experts' output: the dispatched rows themselves, so a combine returns x times its weights' sum
            recv_x, _, _, handle = dispatch_with(buf, False)
            return lambda: buf.low_latency_combine(recv_x, topk_idx, weights, handle)
        return make

    def deep_ep():
        if device.type != "cuda":
            raise Skip("deep_ep needs CUDA GPUs and an NCCL process group")
        de = _import("deep_ep")
        rdma_bytes = de.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, world, e)
        buf = de.Buffer(group, 0, rdma_bytes, low_latency_mode=True, num_qps_per_rank=max(1, e // world))
        if case.op == "moe_ll_dispatch":
            return lambda: buf.low_latency_dispatch(x, topk_idx, max_tokens, e, use_fp8=fp8)
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, max_tokens, e, use_fp8=False)
        return lambda: buf.low_latency_combine(recv_x, topk_idx, weights, handle)

    def reference():
        buf = buffer_cls(group, backend="torch")
        recv_x, recv_s, count, handle = dispatch_with(buf, fp8 if case.op == "moe_ll_dispatch" else False)
        if case.op == "moe_ll_dispatch":
            return low_latency_dispatch_summary(recv_x, recv_s, count)
        return buf.low_latency_combine(recv_x, topk_idx, weights, handle)

    def compare(got, want):
        if case.op == "moe_ll_dispatch":
            if len(got) == 5:  # DeepEP: (recv_x or (recv_x, scales), recv_count, handle, event, hook)
                data, count = got[0], got[1]
                recv_x, recv_s = data if isinstance(data, tuple) else (data, None)
            else:  # ours: (recv_x, recv_scales, recv_count, handle)
                recv_x, recv_s, count = got[:3]
            return _compare_dispatch(low_latency_dispatch_summary(recv_x, recv_s, count), want)
        return calc_diff(got[0] if isinstance(got, tuple) else got, want)

    makers = {b: own(b) for b in OWN_BACKENDS}
    makers["deep_ep"] = deep_ep
    cost = dispatch_cost if case.op == "moe_ll_dispatch" else combine_cost
    return Prepared(case, cost, makers, reference, compare, extra=extra)


def _prepare_decode_layer(case, device, group):
    """low_latency_dispatch (FP8) -> masked gate/up GEMM -> SiLU(gate)·up -> FP8 quantization -> masked down
    GEMM -> low_latency_combine, every stage on the backend under test."""
    import torch.distributed as dist

    s = case.shape
    world = dist.get_world_size(group)
    tokens, hidden, e, inter, max_tokens = s["tokens"], s["hidden"], s["num_experts"], s["intermediate"], \
        _max_tokens(s)
    local = e // world
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    topk_idx, weights = _routing(tokens, s["topk"], e, device)
    sent, received, remote, per_local = _low_latency_pairs(topk_idx, e, group)
    w13 = _random_fp8_weights(local, 2 * inter, hidden, device)
    w2 = _random_fp8_weights(local, hidden, inter, device)
    # the masked GEMM's tile hint: rows an expert receives on average
    expected_m = max(1, round(tokens * world * s["topk"] / e))
    buffer_cls = op_function("moe_dispatch")
    masked = op_function("m_grouped_fp8_gemm_nt_masked")
    quant = op_function("per_token_group_quant_fp8")

    def layer_on(backend):
        buf = buffer_cls(group, backend=backend)

        def layer():
            recv_x, recv_s, count, handle = buf.low_latency_dispatch(x, topk_idx, max_tokens, e, use_fp8=True)
            h = masked((recv_x, recv_s), w13, count, expected_m, backend=backend)
            act = torch.nn.functional.silu(h[..., :inter].float()) * h[..., inter:].float()
            y = masked(quant(act.to(torch.bfloat16), backend=backend), w2, count, expected_m, backend=backend)
            return buf.low_latency_combine(y, topk_idx, weights, handle)
        return layer

    def own(backend):
        def make():
            _require_backend(backend, device, case.op)
            return layer_on(backend)
        return make

    cost = decode_layer_cost(
        hardware.low_latency_cost(sent, received, remote, hidden, "fp8"),
        hardware.low_latency_cost(received, sent, received - (sent - remote), hidden, "bf16", combine=True),
        per_local, hidden, inter)
    # the inputs, for a check of the layer's result against an independent computation
    extra = {"pairs_sent": sent, "pairs_received": received,
             "inputs": {"x": x, "topk_idx": topk_idx, "topk_weights": weights, "w13": w13, "w2": w2}}
    return Prepared(case, cost, {b: own(b) for b in OWN_BACKENDS}, extra=extra)


def _prepare_moe_permute(case, device):
    s = case.shape
    tokens, hidden, e, local = s["tokens"], s["hidden"], s["num_experts"], s["local_experts"]
    topk_idx, weights = _routing(tokens, s["topk"], e, device)
    # what one rank hosting experts [0, local) receives from a dispatch: tokens with a local expert
    is_local = topk_idx < local
    mine = is_local.any(dim=1)
    recv_idx = torch.where(is_local, topk_idx, torch.full_like(topk_idx, -1))[mine]
    recv_w = weights[mine]
    rows, pairs = int(mine.sum()), int(is_local.sum())
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    cost = hardware.cost(case.op, rows=rows, pairs=pairs, hidden=hidden)
    permute = op_function("moe_permute")
    if case.op == "moe_permute":
        makers = _own(permute, x, recv_idx, alignment=128, _device=device, _name=case.op)
    else:
        x_sorted, _, perm = permute(x, recv_idx, alignment=128, backend="torch")
        y = torch.randn_like(x_sorted)
        makers = _own(op_function("moe_unpermute"), y, perm, recv_w, _device=device, _name=case.op)
    return Prepared(case, cost, makers, extra={"rows": rows, "pairs": pairs})


def prepare(case: Case, device: torch.device, group=None) -> Prepared:
    """Builds the case's inputs on `device`; raises Skip when this build lacks the op."""
    if op_function(case.op) is None or (case.op == "moe_unpermute" and op_function("moe_permute") is None):
        raise Skip(NOT_IN_BUILD)
    if case.op.startswith("per_"):
        return _prepare_quant(case, device)
    if case.op.startswith(("fp8_gemm", "m_grouped")):
        return _prepare_gemm(case, device)
    if case.op == "mla_decode":
        return _prepare_mla(case, device)
    if case.op in ("moe_dispatch", "moe_combine") or case.op in LOW_LATENCY_OPS:
        if group is None:
            raise Skip("no torch.distributed process group could be made")
        if case.op == "moe_decode_layer":
            if op_function("m_grouped_fp8_gemm_nt_masked") is None:
                raise Skip(NOT_IN_BUILD)
            return _prepare_decode_layer(case, device, group)
        if case.op in LOW_LATENCY_OPS:
            return _prepare_moe_low_latency(case, device, group)
        return _prepare_moe_comm(case, device, group)
    return _prepare_moe_permute(case, device)


def cases_for(shape_set: list, world: int) -> list:
    """Case objects for a shape set; MoE communication shapes get the process group's world size."""
    out = []
    for op, shape in shape_set:
        shape = dict(shape)
        if op in ("moe_dispatch", "moe_combine") or op in LOW_LATENCY_OPS:
            shape.setdefault("world", world)
        out.append(Case(op, shape))
    return out
