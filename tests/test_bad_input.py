"""Bad input against every public op: each argument of a valid call is replaced in turn by a wrong type,
a wrong shape, a wrong dtype, a tensor on the wrong device (meta) and extreme values (NaN, inf, 1e38, 2**40,
negative numbers). The op must either raise TypeError / ValueError as "<argument>: expected ..., got ..."
naming that argument (or one it is checked against), or return a defined result: never crash, hang or
raise anything else. A new op is covered by adding one entry to OPS.
"""

from __future__ import annotations

import dataclasses
import re
import signal
from typing import Callable

import pytest
import torch

import pykernels
from pykernels import hardware
from pykernels.reference import fp8_quant as ref_quant

FP8 = torch.float8_e4m3fn


@dataclasses.dataclass
class Entry:
    """One public op: `call` builds fresh valid keyword arguments; a tuple argument (an FP8 pair) is swept
    element by element under `pair_names`. `related` maps an argument to the others an error about it may
    name (a shape is often checked against a partner). `backends` lists those swept ("torch" unless the
    op takes none)."""

    name: str
    fn: Callable
    call: Callable[[], dict]
    pair_names: dict = dataclasses.field(default_factory=dict)
    related: dict = dataclasses.field(default_factory=dict)
    backends: tuple = ("torch",)
    accepts: dict = dataclasses.field(default_factory=dict)  # argument -> perturbations that are valid input
    check: Callable | None = None  # called as check(result, perturbation) when a value case returns


def _quantized(shape, block=False):
    x = torch.randn(shape)
    return ref_quant.per_block_quant_fp8(x, 128) if block else ref_quant.per_token_group_quant_fp8(x, 128)


def _gemm_nt():
    return {"a_pair": _quantized((5, 256)), "b_pair": _quantized((20, 256), block=True), "out": None}


def _gemm_contiguous():
    m_indices = torch.full((256,), -1, dtype=torch.int32)
    m_indices[:50], m_indices[128:200] = 0, 1  # one group per 128-row block, then -1 padding
    return {"a_pair": _quantized((256, 128)), "b_pair": _quantized((2, 20, 128), block=True),
            "m_indices": m_indices, "out": None}


def _gemm_masked():
    return {"a_pair": _quantized((2, 8, 256)), "b_pair": _quantized((2, 20, 256), block=True),
            "masked_m": torch.tensor([3, 8], dtype=torch.int32), "expected_m": 8, "out": None}


def _mla_decode():
    return {"q": torch.randn(1, 1, 2, 576, dtype=torch.bfloat16), "kv_cache": torch.randn(2, 64, 1, 576, dtype=torch.bfloat16),
            "block_table": torch.tensor([[1, 0]], dtype=torch.int32), "cache_seqlens": torch.tensor([70], dtype=torch.int32),
            "head_dim_v": 512, "softmax_scale": None, "causal": False, "kv_scale": None, "metadata": None}


def _mla_decode_planned():
    kwargs = _mla_decode()
    kwargs["metadata"] = pykernels.get_mla_metadata(kwargs["cache_seqlens"], 2, 1)
    return kwargs


def _mla_decode_fp8():
    kwargs = _mla_decode()
    kwargs["kv_cache"] = (kwargs["kv_cache"].float() / 2).to(FP8)
    kwargs["kv_scale"] = torch.tensor([2.0])
    return kwargs


def _permute():
    return {"recv_x": torch.randn(3, 256, dtype=torch.bfloat16),
            "recv_topk_idx": torch.tensor([[0, 1], [1, -1], [0, 0]]), "alignment": 128, "num_local_experts": None}


def _unpermute():
    x_sorted, _, perm = pykernels.permute_to_experts(torch.randn(3, 256, dtype=torch.bfloat16),
                                                     torch.tensor([[0, 1], [1, -1], [0, 0]]), backend="torch")
    return {"y_sorted": x_sorted, "perm": perm, "recv_topk_weights": torch.rand(3, 2)}


def _quant_nan_check(result, perturbation):
    """The quantizers' documented rule: a group holding NaN or inf dequantizes to NaN."""
    if perturbation in ("nan", "inf"):
        q, s = result
        assert bool(q.float().isnan().any()) and not bool(torch.isfinite(s).all())


OPS = [
    Entry("per_token_group_quant_fp8", pykernels.per_token_group_quant_fp8,
          lambda: {"x": torch.randn(3, 200), "group_size": 128, "ue8m0": False, "column_major_scales": False},
          backends=("torch", "triton"), accepts={"x": ("shape",)}, check=_quant_nan_check),
    Entry("per_block_quant_fp8", pykernels.per_block_quant_fp8,
          lambda: {"w": torch.randn(2, 130, 200), "block_size": 128, "ue8m0": False},
          backends=("torch", "triton"), check=_quant_nan_check),
    Entry("fp8_gemm_nt", pykernels.fp8_gemm_nt, _gemm_nt, pair_names={"a_pair": ("a", "sa"), "b_pair": ("b", "sb")},
          related={"a": ("sa", "b"), "sa": ("a",), "b": ("sb", "a"), "sb": ("b",)}),
    Entry("m_grouped_fp8_gemm_nt_contiguous", pykernels.m_grouped_fp8_gemm_nt_contiguous, _gemm_contiguous,
          pair_names={"a_pair": ("a", "sa"), "b_pair": ("b", "sb")},
          related={"a": ("sa", "b", "m_indices"), "sa": ("a",), "b": ("sb", "a", "m_indices"), "sb": ("b",),
                   "m_indices": ("a",)}),
    Entry("m_grouped_fp8_gemm_nt_masked", pykernels.m_grouped_fp8_gemm_nt_masked, _gemm_masked,
          pair_names={"a_pair": ("a", "sa"), "b_pair": ("b", "sb")},
          related={"a": ("sa", "b", "masked_m"), "sa": ("a",), "b": ("sb", "a", "masked_m"), "sb": ("b",),
                   "masked_m": ("a",)}),
    Entry("fp8_gemm_config", pykernels.fp8_gemm_config,
          lambda: {"M": 256, "N": 4096, "K": 7168, "num_groups": 1, "num_sms": 132}, backends=()),
    Entry("get_mla_metadata", pykernels.get_mla_metadata,
          lambda: {"cache_seqlens": torch.tensor([70, 1, 300], dtype=torch.int32), "num_q_tokens_per_head_k": 16,
                   "num_heads_k": 1, "num_sm_parts": None}, backends=(), accepts={"cache_seqlens": ("shape-",)}),
    Entry("mla_decode", pykernels.mla_decode, _mla_decode,
          related={"q": ("kv_cache",), "kv_cache": ("q", "kv_scale"), "block_table": ("cache_seqlens", "q"),
                   "cache_seqlens": ("block_table", "q")}),
    Entry("mla_decode[planned]", pykernels.mla_decode, _mla_decode_planned,
          related={"q": ("kv_cache", "metadata"), "kv_cache": ("q",), "block_table": ("cache_seqlens", "q"),
                   "cache_seqlens": ("block_table", "q", "metadata"), "metadata": ("cache_seqlens",)}),
    Entry("mla_decode[fp8]", pykernels.mla_decode, _mla_decode_fp8,
          related={"q": ("kv_cache",), "kv_cache": ("q", "kv_scale"), "kv_scale": ("kv_cache",),
                   "block_table": ("cache_seqlens", "q"), "cache_seqlens": ("block_table", "q")},
          accepts={"kv_scale": ("shape", "shape-")}),  # documented as one element, of any shape
    Entry("permute_to_experts", pykernels.permute_to_experts, _permute,
          related={"recv_x": ("recv_topk_idx",), "recv_topk_idx": ("recv_x",)}),
    Entry("unpermute_from_experts", pykernels.unpermute_from_experts, _unpermute,
          related={"y_sorted": ("perm",), "perm": ("y_sorted", "recv_topk_weights"),
                   "recv_topk_weights": ("perm",)}),
    Entry("hardware.cost", lambda **kw: hardware.cost("fp8_gemm", **kw), lambda: {"m": 256, "n": 4096, "k": 7168},
          backends=()),
    Entry("hardware.project", hardware.project,
          lambda: {"c": hardware.Cost(1e12, 1e9, 0.0), "gpu": "H800", "dtype": "fp8"}, backends=()),
    Entry("hardware.get", hardware.get, lambda: {"name": "H20"}, related={"name": ("gpu",)}, backends=()),
    Entry("hardware.identify", hardware.identify,
          lambda: {"name": "NVIDIA H20", "sms": 78, "memory_bytes": 97_285 * 2**20, "capability": (9, 0),
                   "override": None}, related={"override": ("gpu",)}, backends=()),
]


# ---- perturbations -----------------------------------------------------------------------------------

def _other_dtype(t: torch.Tensor) -> torch.dtype:
    return {torch.float32: torch.float64, torch.bfloat16: torch.float16, torch.float16: torch.float32,
            FP8: torch.float8_e5m2, torch.int32: torch.int64, torch.int64: torch.int32}.get(t.dtype, torch.float64)


def _with_value(t: torch.Tensor, value) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    flat[flat.numel() // 2] = value
    return t


def perturbations(value):
    """(label, replacement) pairs for one argument value."""
    if isinstance(value, torch.Tensor):
        out = [("type", value.tolist()), ("dtype", value.to(_other_dtype(value))),
               ("shape", value.unsqueeze(0)), ("meta", value.to("meta"))]
        if value.dim() > 0:
            out.append(("shape-", value[..., :-1] if value.shape[-1] > 1 else value.squeeze(-1)))
        if value.numel():
            if value.is_floating_point():
                out += [("nan", _with_value(value, float("nan"))), ("1e38", _with_value(value.float(), 1e38).to(value.dtype))]
                if value.dtype != FP8:
                    out.append(("inf", _with_value(value, float("inf"))))
            else:
                big = 2**40 if value.dtype == torch.int64 else 2**31 - 1
                out += [("2**40", _with_value(value, big)), ("negative", _with_value(value, -5))]
        return out
    if isinstance(value, bool):
        return [("type", "no"), ("int", 1)]
    if isinstance(value, int):
        return [("type", str(value)), ("float", float(value)), ("2**40", 2**40), ("negative", -value - 1),
                ("zero", 0)]
    if isinstance(value, float):
        return [("type", str(value)), ("nan", float("nan")), ("inf", float("inf")), ("1e38", 1e38), ("negative", -value)]
    if isinstance(value, str):
        return [("type", 7), ("unknown", value + "?")]
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return [("type", "9.0"), ("shape", value + value), ("negative", tuple(-v for v in value))]
    if isinstance(value, pykernels.MlaSchedule):
        # A schedule planned for other lengths of the same batch: decoding with it would skip or invent pages.
        stale = pykernels.get_mla_metadata(torch.full((value.batch,), 5000, dtype=torch.int32), 2, 1,
                                           num_sm_parts=value.num_parts)
        return [("type", object()), ("stale", stale)]
    if isinstance(value, hardware.Cost):
        return [("type", tuple(value)), ("nan", value._replace(hbm_bytes=float("nan"))),
                ("negative", value._replace(flops=-1.0))]
    if value is None:
        return [("type", "none")]
    return [("type", object())]


def cases():
    for entry in OPS:
        for arg, value in entry.call().items():
            parts = entry.pair_names.get(arg, ())
            targets = [(None, arg, value)] + [(i, part, value[i]) for i, part in enumerate(parts)]
            for index, name, current in targets:
                for label, _ in perturbations(current):
                    for backend in entry.backends or (None,):
                        yield pytest.param(entry, arg, index, name, label, backend,
                                           id=f"{entry.name}-{name}-{label}" + (f"-{backend}" if backend else ""))


# Case id -> the known defect it exposes, for a case that cannot pass yet: marked xfail(strict=True), so the
# mark must go when the defect is fixed. Empty: every case holds.
KNOWN_DEFECTS = {}

FORM = re.compile(r"^(?P<name>[\w.\[\]'(), ]+): expected .+, got ", re.S)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("the call did not return within 60 s")


@pytest.mark.parametrize("entry,key,index,name,label,backend", list(cases()))
def test_bad_input(entry, key, index, name, label, backend, request):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the sweep runs Triton through the interpreter, on CPU tensors")
    case = request.node.callspec.id
    if case in KNOWN_DEFECTS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[case]))
    kwargs = entry.call()
    value = kwargs[key]
    if index is None:
        replacement = dict(perturbations(value))[label]
        kwargs[key] = replacement
    else:
        pair = list(value)
        pair[index] = dict(perturbations(pair[index]))[label]
        kwargs[key] = tuple(pair)
    if backend is not None:
        kwargs["backend"] = backend
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        result = entry.fn(**kwargs)
    except RuntimeError as e:
        # An explicit backend that cannot run these tensors says so (the backend contract), e.g. Triton on meta.
        if label == "meta" and backend not in (None, "torch") and str(e).startswith(f"{entry.name}: backend='{backend}' needs"):
            return
        raise
    except (TypeError, ValueError) as e:
        message = str(e)
        match = FORM.match(message)
        assert match, f"{type(e).__name__} not in the project's form: {message!r}"
        allowed = {name, *entry.related.get(name, ()), *entry.pair_names.get(name, ())}
        named = set(re.split(r"[(), .]+", match.group("name"))) - {""}
        assert named & allowed, f"the error names {match.group('name')!r}, not {name!r}: {message!r}"
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    # A defined result: the perturbation was a value the op accepts.
    if label not in entry.accepts.get(name, ()):
        assert label not in ("type", "dtype", "shape", "shape-", "stale"), f"{name} replaced by a wrong {label} was accepted"
    if entry.check is not None:
        entry.check(result, label)
