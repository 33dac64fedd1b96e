"""The benchmark suite on a CPU: statistics, the results schema round-trip, every case's input builder
against stand-ins that check the public API contract of each op (so the cases are right before the ops
land on this branch), the projection records, the plotting script on a small fixture, the pytest-benchmark
job, and `python -m bench --shapes smoke` end to end."""

import json
import math
import statistics
import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

import pykernels
from bench import cases as C
from bench import anchors, harness, model, projection, results, roofline, shapes, timing
from pykernels import hardware
from pykernels.reference import fp8_quant as qref

ROOT = Path(__file__).resolve().parent.parent
FP8 = torch.float8_e4m3fn


def run_cli(*args, timeout=240):
    # the jobs as a machine without a GPU runs them, also when the test suite runs on a GPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


# ---- statistics and timers ----

def test_summarize():
    s = timing.summarize([3.0, 1.0, 2.0, 4.0, 100.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 100.0, 5)
    assert s["mean"] == pytest.approx(22.0)
    assert s["spread"] == pytest.approx((4.0 - 2.0) / 3.0)  # interquartile range over the median
    assert timing.summarize([2.0])["spread"] == 0.0
    with pytest.raises(ValueError, match="samples: expected at least one"):
        timing.summarize([])


def test_cpu_timer_takes_at_least_three_samples():
    calls = []
    out = timing.CpuTimer(budget_s=0.0)(lambda: calls.append(1), warmup=2, rep=10)
    assert len(out["samples"]) == 3 and len(calls) == 6  # 2 warm-up, 1 counting host syncs, 3 timed
    assert all(t >= 0 for t in out["samples"]) and out["syncs"] == 0


def test_host_sync_counter():
    x = torch.randn(37)
    assert timing.count_host_syncs(lambda: (x * 2).sum()).count == 0
    assert timing.count_host_syncs(lambda: x[torch.tensor([3, 1])] + x[2:4]).count == 0  # integer indexing
    counter = timing.count_host_syncs(lambda: (x.sum().item(), x[x > 0], int(x.argmax()), bool(x.any()),
                                               x.nonzero()))
    # item, boolean-mask indexing, int(), bool(), nonzero: five waits for the device on a GPU
    assert counter.count == 5 and counter.ops == {"_local_scalar_dense": 3, "index": 1, "nonzero": 1}


def test_host_sync_counter_sees_inside_pykernels_ops():
    """The exported ops are torch.library ops, one node to a dispatch mode: the counter runs their
    implementation under itself, so a read inside one counts. MLA decode without a schedule reads the
    lengths and page ids back to check them; with one (Triton path) it reads nothing."""
    lengths = torch.tensor([70, 5], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 576).to(torch.bfloat16)
    kv = torch.randn(3, 64, 1, 576).to(torch.bfloat16)
    table = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    unplanned = timing.count_host_syncs(lambda: pykernels.mla_decode(q, kv, table, lengths, backend="triton"))
    assert unplanned.count > 0, unplanned.ops
    schedule = pykernels.get_mla_metadata(lengths, 4, 1)
    planned = timing.count_host_syncs(lambda: pykernels.mla_decode(q, kv, table, lengths, metadata=schedule,
                                                                   backend="triton"))
    assert planned.count == 0, planned.ops


def _fake_kernel(name, us):
    return types.SimpleNamespace(name=name, duration=us)


def _fake_event(name, kernels=(), children=()):
    return types.SimpleNamespace(name=name, kernels=list(kernels), cpu_children=list(children))


def test_calls_from_profile_sums_the_kernels_of_each_call():
    launch = _fake_event("cudaLaunchKernel", [_fake_kernel("gemm", 30.0)])
    op = _fake_event("aten::mm", [_fake_kernel("mm", 7.5)], [_fake_event("cudaLaunchKernel", [_fake_kernel("x", 2.5)])])
    events = [_fake_event("aten::zero_", [_fake_kernel("flush", 500.0)]),  # the L2 flush, outside the range
              _fake_event(timing.CALL_RANGE, [], [launch, op]),
              _fake_event(timing.CALL_RANGE, [], [_fake_event("cudaLaunchKernel", [_fake_kernel("gemm", 31.0)])]),
              launch, op]  # the profiler also lists nested events at top level: they must not count twice
    got = timing.calls_from_profile(events)
    assert got == [(pytest.approx(40e-6), 3), (pytest.approx(31e-6), 1)]
    assert timing.calls_from_profile([]) == []


class FakeRuntime:
    """A simulated device: an op appends kernel durations to `launched` and host time to `host`; event timing
    sees both, a graph replay only the kernels; capture fails on request; clocks come from a list."""

    max_mhz = 1980

    def __init__(self, clocks=None, capture_error=None, profile_error=None):
        self.launched, self.host, self.flushes = [], 0.0, 0
        self.clocks = iter(clocks) if clocks is not None else None
        self.capture_error, self.profile_error = capture_error, profile_error

    def flush(self):
        self.flushes += 1

    def synchronize(self):
        pass

    def elapsed(self, fn):
        self.launched, self.host = [], 0.0
        fn()
        return sum(self.launched) + self.host

    def capture(self, fn):
        if self.capture_error:
            raise self.capture_error
        self.launched = []
        fn()
        kernels = list(self.launched)
        return lambda: self.launched.extend(kernels)

    def profile(self, fn, rep):
        if self.profile_error:
            raise self.profile_error
        out = []
        for _ in range(rep):
            self.flush()
            self.launched = []
            fn()
            out.append((sum(self.launched), len(self.launched)))
        return out

    def sm_mhz(self):
        return next(self.clocks) if self.clocks is not None else None


def _fake_op(rt, kernels_us=(30.0, 10.0), host_us=25.0, sync=False):
    x = torch.ones(3)

    def op():
        rt.host += host_us * 1e-6
        rt.launched.extend(k * 1e-6 for k in kernels_us)
        if sync:
            x.sum().item()
    return op


def test_gpu_timer_kernel_time_from_graph_replay():
    rt = FakeRuntime()
    out = timing.GpuTimer(None, rt)(_fake_op(rt), warmup=2, rep=7)
    assert out["kernel_method"] == "cuda-graph" and out["kernel_note"] is None
    assert out["kernel_samples"] == [pytest.approx(40e-6)] * 7 and out["samples"] == [pytest.approx(65e-6)] * 7
    assert out["launches"] == 2 and out["syncs"] == 0 and out["discarded_throttled"] == 0
    assert rt.flushes >= 14  # one before every timed sample, eager and replayed
    case = C.Case("fp8_gemm_nt", {"m": 64, "n": 7168, "k": 2048})
    rec = harness.measured_record(case, "cuda", C.Prepared(case, case.cost(), {}), out, "gpu", hardware.get("H800"))
    assert rec["kernel_s"]["median"] == pytest.approx(40e-6) and rec["call_s"]["median"] == pytest.approx(65e-6)
    assert rec["time_s"] == {**rec["kernel_s"], "discarded_throttled": 0}
    assert rec["host_overhead_s"] == pytest.approx(25e-6) and rec["kernel_method"] == "cuda-graph"
    assert rec["roofline_fraction"] == pytest.approx(hardware.project(case.cost(), "H800", "fp8").seconds / 40e-6)
    assert rec["tflops"] == pytest.approx(2 * 64 * 7168 * 2048 / 40e-6 / 1e12)


def test_cuda_gemm_records_name_the_tile_the_launcher_runs():
    """A CUDA GEMM timing says which instantiation it measured (the launcher's own choice, from
    fp8_gemm_config); other backends' records do not carry it."""
    if not pykernels.backends()["cuda"]["extension_built"]:
        pytest.skip("the CUDA extension is not built here: fp8_gemm_config needs it")
    cpu = torch.device("cpu")
    plain = C.Case("fp8_gemm_nt", {"m": 64, "n": 24576, "k": 1536})
    cfg = pykernels.fp8_gemm_config(64, 24576, 1536)
    note = C._cuda_gemm_config(64, 1, "plain", 24576, 1536, cpu)
    assert note.startswith(f"CUDA tile {cfg['block_m']}x{cfg['block_n']}, {cfg['num_stages']} stages, 1 wave ")
    assert "multicast" not in note
    cfg = pykernels.fp8_gemm_config(8192 + 384, 4096, 7168, layout="contiguous")
    assert cfg["multicast"] != "none"
    assert (f"2-CTA multicast of {cfg['multicast'].upper()}"
            in C._cuda_gemm_config(8192 + 384, 1, "contiguous", 4096, 7168, cpu))
    # The prepared cases plan as their launches do: M_total padded per group; expected_m the mean, rounded.
    for op, shape, planned in [
        ("m_grouped_fp8_gemm_nt_contiguous", {"ms": [129, 0, 1], "n": 256, "k": 256}, (256 + 128, 1, "contiguous")),
        ("m_grouped_fp8_gemm_nt_masked", {"masked_m": [100, 0, 2], "m_max": 128, "n": 256, "k": 256},
         (34, 3, "masked")),
    ]:
        case = C.Case(op, shape)
        assert C._prepare_gemm(case, cpu).extra["cuda_config"] == C._cuda_gemm_config(*planned, 256, 256, cpu)
    # ... and those plans are told apart (unpadded rows, or the largest group instead of the mean, tile otherwise).
    assert C._cuda_gemm_config(130, 1, "contiguous", 256, 256, cpu) != C._cuda_gemm_config(384, 1, "contiguous", 256,
                                                                                          256, cpu)
    assert C._cuda_gemm_config(100, 3, "masked", 256, 256, cpu) != C._cuda_gemm_config(34, 3, "masked", 256, 256, cpu)
    prep = C.Prepared(plain, plain.cost(), {}, extra={"cuda_config": note})
    run = {"samples": [1e-3, 1e-3, 1e-3]}
    assert note in harness.measured_record(plain, "cuda", prep, run, "cpu", None)["note"]
    assert note not in (harness.measured_record(plain, "triton", prep, run, "cpu", None)["note"] or "")


@pytest.mark.parametrize("why", ["sync", "capture", "no-profiler", "declared"])
def test_gpu_timer_falls_back_to_the_profiler(why):
    rt = FakeRuntime(capture_error=RuntimeError("operation not permitted when stream is capturing\nmore")
                     if why in ("capture", "declared") else None,
                     profile_error=RuntimeError("CUPTI busy") if why == "no-profiler" else None)
    blocker = C.capture_blocker("moe_dispatch", "deep_ep") if why == "declared" else None
    out = timing.GpuTimer(None, rt)(_fake_op(rt, sync=why == "sync"), warmup=1, rep=5, not_capturable=blocker)
    if why == "declared":
        assert out["kernel_method"] == "profiler"
        assert out["kernel_note"] == f"not captured: {C.capture_blocker('moe_dispatch', 'deep_ep')}"
        return
    if why == "no-profiler":
        assert out["kernel_method"] == "cuda-graph" and out["launches"] is None
        assert "profiler unavailable: RuntimeError: CUPTI busy" in out["kernel_note"]
        return
    assert out["kernel_method"] == "profiler" and out["kernel_samples"] == [pytest.approx(40e-6)] * 5
    assert out["launches"] == 2 and out["syncs"] == (1 if why == "sync" else 0)
    assert out["kernel_note"] == ("not captured: 1 host syncs per call" if why == "sync" else
                                  "capture failed: RuntimeError: operation not permitted when stream is capturing")


def test_gpu_timer_drops_throttled_samples():
    rt = FakeRuntime(clocks=[1980, 1000, 1980, 1980] + [1100] * 2 + [1980] * 2)
    out = timing.GpuTimer(None, rt)(_fake_op(rt), warmup=0, rep=4)
    assert len(out["samples"]) == 3 and len(out["kernel_samples"]) == 2 and out["discarded_throttled"] == 3
    assert out["sm_clock_mhz"] == 1980


# ---- results schema ----

def _doc():
    doc = results.new_document("fixture", {"kind": "cpu", "name": "test cpu", "gpu": None}, "smoke", {})
    case = C.Case("fp8_gemm_nt", {"m": 7, "n": 200, "k": 256})
    prep = C.Prepared(case, case.cost(), {})
    doc["records"].append(harness.measured_record(case, "torch", prep, {"samples": [2e-3, 1e-3, 3e-3]}, "cpu", None))
    doc["records"].append(harness.status_record(case, "cuda", "skipped", "no GPU", "cpu"))
    doc["records"] += projection.projection_records([])
    return doc


def test_schema_round_trip(tmp_path):
    doc = _doc()
    path = results.save(doc, tmp_path / "r.json")
    assert results.load(path) == json.loads(json.dumps(doc))
    rec = doc["records"][0]
    assert rec["measured_on"] == "cpu" and rec["time_s"]["median"] == 2e-3 and rec["time_s"]["n"] == 3
    assert rec["roofline_fraction"] is None and "CPU figure" in rec["note"]
    assert rec["gbps"] == pytest.approx(rec["hbm_bytes"] / 2e-3 / 1e9)
    assert rec["tflops"] == pytest.approx(2 * 7 * 200 * 256 / 2e-3 / 1e12)
    assert set(rec) == set(results.RECORD_KEYS)


@pytest.mark.parametrize("field,value,message", [
    ("status", "maybe", "status: expected one of"),
    ("measured_on", "tpu", "measured_on: expected one of"),
    ("time_s", {"median": 1.0, "min": 2.0, "max": 3.0, "n": 3}, "min <= median <= max"),
])
def test_schema_rejects_bad_records(field, value, message):
    doc = _doc()
    doc["records"][0][field] = value
    with pytest.raises(ValueError, match=message):
        results.validate(doc)
    del doc["records"][0]["bound"]
    with pytest.raises(ValueError, match="missing fields"):
        results.validate_record(doc["records"][0])


def test_gpu_record_fraction_and_scaled_projection():
    case = C.Case("fp8_gemm_nt", {"m": 4096, "n": 7168, "k": 16384})
    prep = C.Prepared(case, case.cost(), {})
    roof = hardware.project(case.cost(), "H800", "fp8").seconds
    rec = harness.measured_record(case, "cuda", prep, {"samples": [roof / 0.8] * 5, "discarded_throttled": 2},
                                  "gpu", hardware.get("H800"))
    assert rec["roofline_fraction"] == pytest.approx(0.8) and rec["bound"] == "compute"
    assert "2 throttled runs discarded" in rec["note"]
    proj = projection.projection_records([rec])
    scaled = [r for r in proj if r["backend"] == "cuda"]
    assert {r["gpu"] for r in scaled} == {"H100 SXM5", "H20", "H200 SXM"}  # not the GPU it was measured on
    h20 = next(r for r in scaled if r["gpu"] == "H20")
    assert h20["measured_on"] == "projection" and "projection" in h20["note"]
    assert h20["time_s"]["median"] == pytest.approx(hardware.project(case.cost(), "H20", "fp8").seconds / 0.8)
    roofs = [r for r in proj if r["backend"] == "roofline"]
    assert len(roofs) == len(projection.projection_cases()) * len(hardware.COMPARISON)


def test_shape_sets_cover_every_op():
    for name in shapes.SHAPE_SETS:
        todo = C.cases_for(shapes.shape_set(name), world=1)
        assert {c.op for c in todo} == set(C.OPS)
        assert len({c.key for c in todo}) == len(todo)  # labels tell cases apart
        for c in todo:
            cost = c.cost()
            assert cost.hbm_bytes > 0 and all(math.isfinite(v) for v in cost)
    with pytest.raises(ValueError, match="--shapes: expected one of"):
        shapes.shape_set("llama")


# ---- the cases against stand-ins for the ops of the other issues ----

def _dequant_a(a, sa):
    return qref.dequantize_token_groups(a, sa)


def _dequant_b(b, sb):
    return qref.dequantize_blocks(b, sb)


def fake_fp8_gemm_nt(a_pair, b_pair, out=None, backend="auto"):
    (a, sa), (b, sb) = a_pair, b_pair
    m, k = a.shape
    n = b.shape[0]
    assert a.dtype == b.dtype == FP8 and sa.shape == (m, -(-k // 128)) and sb.shape == (-(-n // 128), -(-k // 128))
    d = (_dequant_a(a, sa) @ _dequant_b(b, sb).T).to(torch.bfloat16)
    return out.copy_(d) if out is not None else d


def fake_contiguous(a_pair, b_pair, m_indices, out=None, backend="auto"):
    (a, sa), (b, sb) = a_pair, b_pair
    assert m_indices.dtype == torch.int32 and m_indices.shape == (a.shape[0],) and b.dim() == 3
    assert a.shape[0] % 128 == 0
    d = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    for g in range(b.shape[0]):
        rows = m_indices == g
        d[rows] = (_dequant_a(a[rows], sa[rows]) @ _dequant_b(b[g], sb[g]).T).to(torch.bfloat16)
    return out.copy_(d) if out is not None else d


def fake_masked(a_pair, b_pair, masked_m, expected_m, out=None, backend="auto"):
    (a, sa), (b, sb) = a_pair, b_pair
    assert a.dim() == 3 and sa.shape[:2] == a.shape[:2] and masked_m.shape == (a.shape[0],)
    assert isinstance(expected_m, int) and expected_m >= 1
    d = torch.stack([(_dequant_a(a[g], sa[g]) @ _dequant_b(b[g], sb[g]).T).to(torch.bfloat16)
                     for g in range(a.shape[0])])
    return out.copy_(d) if out is not None else d


def fake_get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
    assert cache_seqlens.dtype == torch.int32 and num_heads_k == 1
    return ("schedule", num_q_tokens_per_head_k)


def fake_mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v=512, softmax_scale=None, causal=False,
                    kv_scale=None, metadata=None, backend="auto"):
    b, s_q, h, d = q.shape
    assert d == 576 and head_dim_v == 512 and kv_cache.shape[1:] == (64, 1, 576) and q.dtype == torch.bfloat16
    assert block_table.dtype == cache_seqlens.dtype == torch.int32
    assert (kv_cache.dtype == FP8) == (kv_scale is not None)
    assert metadata is None or metadata[0] == "schedule"
    scale = softmax_scale or d ** -0.5
    out = torch.empty(b, s_q, h, head_dim_v, dtype=q.dtype)
    lse = torch.empty(b, h, s_q)
    for i in range(b):
        n = int(cache_seqlens[i])
        k = kv_cache[block_table[i, :-(-n // 64)].long()].reshape(-1, d)[:n].float()
        if kv_scale is not None:
            k = k * kv_scale
        s = torch.einsum("thd,nd->thn", q[i].float(), k) * scale
        if causal:
            allowed = torch.arange(n)[None, :] <= (n - s_q + torch.arange(s_q)[:, None])
            s = s.masked_fill(~allowed[:, None, :], float("-inf"))
        out[i] = (torch.softmax(s, -1) @ k[:, :head_dim_v]).to(q.dtype)
        lse[i] = torch.logsumexp(s, -1).T
    return out, lse


class FakeBuffer:
    """One-rank stand-in for pykernels.moe.Buffer's normal mode: every token delivered to rank 0."""

    def __init__(self, group, backend="auto"):
        import torch.distributed as dist

        assert dist.get_world_size(group) == 1
        self.backend = backend

    def get_dispatch_layout(self, topk_idx, num_experts):
        assert topk_idx.dtype == torch.int64
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
        in_rank = (topk_idx >= 0).any(1, keepdim=True)
        return in_rank.sum(0), per_expert, in_rank

    def dispatch(self, x, topk_idx, topk_weights, num_experts, layout=None):
        assert layout is not None and len(layout) == 3
        rows = (topk_idx >= 0).any(1)
        if isinstance(x, tuple):
            assert x[0].dtype == FP8 and x[1].shape == (x[0].shape[0], x[0].shape[1] // 128)
            recv = (x[0][rows], x[1][rows])
        else:
            recv = x[rows]
        counts = torch.bincount(topk_idx[rows][topk_idx[rows] >= 0], minlength=num_experts).tolist()
        return recv, topk_idx[rows], topk_weights[rows], counts, rows

    def combine(self, y, handle):
        assert y.shape[0] == int(handle.sum())
        out = torch.zeros(handle.shape[0], y.shape[1], dtype=y.dtype)
        out[handle] = y
        return out


def fake_permute(recv_x, recv_topk_idx, alignment=128, backend="auto"):
    r, k = recv_topk_idx.shape
    num_local = int(recv_topk_idx.max()) + 1
    perm = torch.full((r, k), -1, dtype=torch.int64)
    rows, m_indices = [], []
    for e in range(num_local):
        pairs = (recv_topk_idx == e).nonzero()
        start = len(m_indices)
        for j, (t, slot) in enumerate(pairs.tolist()):
            perm[t, slot] = start + j
            rows.append(t)
        padded = -(-len(pairs) // alignment) * alignment
        m_indices += [e] * len(pairs) + [-1] * (padded - len(pairs))
        rows += [0] * (padded - len(pairs))
    return recv_x[torch.tensor(rows)], torch.tensor(m_indices, dtype=torch.int32), perm


def fake_unpermute(y_sorted, perm, recv_topk_weights, backend="auto"):
    assert perm.shape == recv_topk_weights.shape
    gathered = y_sorted[perm.clamp(min=0)].float() * (recv_topk_weights * (perm >= 0))[..., None]
    return gathered.sum(1).to(y_sorted.dtype)


@pytest.fixture
def fake_ops(monkeypatch):
    moe = types.SimpleNamespace(Buffer=FakeBuffer, permute_to_experts=fake_permute,
                                unpermute_from_experts=fake_unpermute)
    for name, fn in [("fp8_gemm_nt", fake_fp8_gemm_nt), ("m_grouped_fp8_gemm_nt_contiguous", fake_contiguous),
                     ("m_grouped_fp8_gemm_nt_masked", fake_masked), ("mla_decode", fake_mla_decode),
                     ("get_mla_metadata", fake_get_mla_metadata), ("moe", moe)]:
        monkeypatch.setattr(pykernels, name, fn, raising=False)


@pytest.fixture(scope="module")
def group():
    import torch.distributed as dist

    made = not dist.is_initialized()
    g, why = harness.process_group(torch.device("cpu"))
    assert g is not None, why
    yield g
    if made:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", [c for c in C.cases_for(shapes.shape_set("smoke"), world=1)
                                  if c.op not in C.LOW_LATENCY_OPS], ids=lambda c: f"{c.op}-{c.label}")
def test_smoke_cases_build_and_run(case, fake_ops, group):
    prep = C.prepare(case, torch.device("cpu"), group)
    prep.make("torch")()
    for peer in ("deep_gemm", "flash_mla", "flashinfer", "deep_ep", "vllm-triton", "torch-scaled-mm"):
        if peer in prep.makers:
            with pytest.raises(C.Skip, match="GPU"):
                prep.make(peer)
    with pytest.raises(C.Skip, match="cuda"):
        prep.make("cuda")
    if case.op == "mla_decode":
        # the SDPA baseline must agree with the op (checked inside make before it may be timed)
        if len(set(case.shape["seqlen"])) == 1:
            prep.make("torch-sdpa")()
        else:
            with pytest.raises(C.Skip, match="uniform lengths"):
                prep.make("torch-sdpa")
    if case.op in ("moe_dispatch", "moe_combine"):
        assert prep.cost.link_bytes == 0 and prep.extra["received_rows"] <= case.shape["tokens"]


# ---- the low-latency (decode) cases, through the real pykernels.moe.Buffer on a one-rank gloo group ----

LL_SMOKE = [c for c in C.cases_for(shapes.shape_set("smoke"), world=1) if c.op in C.LOW_LATENCY_OPS]


def _dequantized_x(x):
    q, sq = qref.per_token_group_quant_fp8(x, 128)
    return qref.dequantize_token_groups(q, sq).double()


def _decode_layer_by_hand(inputs, inter):
    """Each token through its experts one by one in float64 (FP8 activations as the layer quantizes them),
    with no dispatch machinery: sum_j w[t, j] * down_e(SiLU(gate_e(x_t)) * up_e(x_t))."""
    x, idx, w = inputs["x"], inputs["topk_idx"], inputs["topk_weights"]
    (w13, s13), (w2, s2) = inputs["w13"], inputs["w2"]
    xq = _dequantized_x(x)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in idx.unique().tolist():
        tokens, slots = (idx == e).nonzero(as_tuple=True)
        h = xq[tokens] @ qref.dequantize_blocks(w13[e], s13[e]).double().T
        act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(torch.bfloat16)
        y = _dequantized_x(act) @ qref.dequantize_blocks(w2[e], s2[e]).double().T
        out.index_add_(0, tokens, w[tokens, slots].double().unsqueeze(1) * y)
    return out


@pytest.mark.parametrize("case", LL_SMOKE, ids=lambda c: f"{c.op}-{c.label}-{c.dtype}")
def test_low_latency_cases_run_and_deliver(case, group):
    torch.manual_seed(0)
    prep = C.prepare(case, torch.device("cpu"), group)
    got = prep.make("torch")()
    inputs = prep.extra["inputs"]
    x, idx, w = inputs["x"], inputs["topk_idx"], inputs["topk_weights"]
    if case.op == "moe_ll_dispatch":
        counts, sums = C.low_latency_dispatch_summary(*got[:3])
        assert torch.equal(counts, torch.bincount(idx.view(-1), minlength=case.shape["num_experts"]))
        rows = _dequantized_x(x) if case.dtype == "fp8" else x.double()
        want = torch.stack([rows[(idx == e).any(1)].sum(0) for e in range(case.shape["num_experts"])])
        assert C.calc_diff(sums, want) < 1e-12
        # rows past each expert's count are unspecified: NaN there must not reach the summary
        poisoned = got[0].clone()
        tail = torch.arange(poisoned.shape[1])[None, :] >= counts[:, None]
        poisoned.view(torch.uint8).view(*poisoned.shape[:2], -1)[tail] = 0xFF  # NaN in FP8 e4m3 and in bf16
        assert torch.equal(C.low_latency_dispatch_summary(poisoned, *got[1:3])[1], sums)
        # the check a peer's output must pass before it is timed: a wrong expert's rows fail it
        assert prep.compare(got, prep.reference()) == 0.0
        assert prep.compare((got[0].roll(1, 0),) + got[1:], prep.reference()) > 1e-3
    elif case.op == "moe_ll_combine":
        # the experts' output is the dispatched row itself: every token comes back times its weights' sum
        assert C.calc_diff(got, x.double() * w.double().sum(1, keepdim=True)) < 1e-5
    else:
        assert C.calc_diff(got, _decode_layer_by_hand(inputs, case.shape["intermediate"])) < 1e-3
    with pytest.raises(C.Skip, match="cuda"):
        prep.make("cuda")
    if "deep_ep" in C.OPS[case.op][2]:
        with pytest.raises(C.Skip, match="GPU"):
            prep.make("deep_ep")


@pytest.mark.parametrize("case", LL_SMOKE, ids=lambda c: f"{c.op}-{c.label}-{c.dtype}")
def test_low_latency_cases_take_the_graph_path(case, group):
    """No host reads: the timer captures every own backend (and DeepEP's low-latency kernels) into a graph; the
    decode layer's torch backend alone is declared uncapturable (its masked GEMM reads counts on the host inside
    a torch.library op, where the sync counter cannot see it)."""
    torch.manual_seed(0)
    prep = C.prepare(case, torch.device("cpu"), group)
    fn = prep.make("torch")  # the real call, standing in for each backend's on the simulated device
    assert timing.count_host_syncs(fn).count == 0
    rt = FakeRuntime()
    for backend in C.ALL_BACKENDS:
        blocker = C.capture_blocker(case.op, backend)
        out = timing.GpuTimer(None, rt)(fn, warmup=0, rep=2, not_capturable=blocker)
        if (case.op, backend) == ("moe_decode_layer", "torch"):
            assert out["kernel_method"] == "profiler" and "row count on the host" in out["kernel_note"]
        else:
            assert out["kernel_method"] == "cuda-graph" and out["kernel_note"] is None and out["syncs"] == 0
    assert C.capture_blocker("moe_dispatch", "deep_ep") and C.capture_blocker("moe_combine", "deep_ep")


def test_low_latency_costs_by_hand(group):
    """DeepEP's count (tests/test_low_latency.py): per (token, expert) pair, an FP8 message of H + 4·H/128 + 16
    bytes, a BF16 combine message of 2·H; HBM counts each message sent and received, NVLink the remote ones."""
    assert hardware.low_latency_message_bytes(7168, "fp8") == 7168 + 56 * 4 + 16 == 7408
    assert hardware.low_latency_message_bytes(7168, "bf16") == 2 * 7168 + 16
    assert hardware.low_latency_message_bytes(7168, "bf16", combine=True) == 14336
    with pytest.raises(ValueError, match="dtype: expected 'bf16' for combine"):
        hardware.low_latency_message_bytes(7168, "fp8", combine=True)
    with pytest.raises(ValueError, match="pairs_remote: expected at most"):
        hardware.low_latency_cost(10, 10, 11, 256, "fp8")
    # DeepSeek-V3 at EP8, 128 tokens per rank: 1024 pairs each way, 7 in 8 to other ranks
    todo = {(c.op, c.dtype): c for c in C.cases_for(shapes.shape_set("deepseek-v3"), world=8)}
    d = todo[("moe_ll_dispatch", "fp8")].cost()
    assert (d.flops, d.hbm_bytes, d.link_bytes) == (0.0, 2 * 1024 * 7408, 896 * 7408)
    c = todo[("moe_ll_combine", "bf16")].cost()
    assert (c.hbm_bytes, c.link_bytes) == (2 * 1024 * 14336, 896 * 14336)
    # the layer: both exchanges, the GEMMs over 1024 pairs with all 32 local experts' weights, SiLU + quant
    layer = todo[("moe_decode_layer", "fp8")].cost()
    gate_up = 2 * 1024 * 4096 * 7168 + 2 * 1024 * 7168 * 2048
    weights = 32 * (4096 * 7168 + 4 * 32 * 56) + 32 * (7168 * 2048 + 4 * 56 * 16)
    acts = 1024 * (7168 + 4 * 56) + 1024 * (2048 + 4 * 16)          # FP8 A operands with their scales
    outs = 1024 * 4096 * 2 + 1024 * 7168 * 2                           # bf16 GEMM outputs
    silu = 1024 * (4096 * 2 + 2048 + 4 * 16)                           # read gate/up, write FP8 + scales
    assert layer.flops == gate_up
    assert layer.hbm_bytes == pytest.approx(d.hbm_bytes + c.hbm_bytes + weights + acts + outs + silu)
    assert layer.link_bytes == d.link_bytes + c.link_bytes
    # measured records count the routing they drew: smoke, 13 tokens x top-4 on one rank
    for case in LL_SMOKE:
        torch.manual_seed(0)
        prep = C.prepare(case, torch.device("cpu"), group)
        assert prep.extra["pairs_sent"] == prep.extra["pairs_received"] == 52
        message = {"fp8": 256 + 2 * 4 + 16, "bf16": 2 * 256 + (0 if case.op == "moe_ll_combine" else 16)}[case.dtype]
        if case.op != "moe_decode_layer":
            assert (prep.cost.hbm_bytes, prep.cost.link_bytes) == (2 * 52 * message, 0)
            assert prep.extra["logical_bytes"] == 52 * message
        assert prep.cost == case.cost()  # top-k picks distinct experts: the drawn count is the expected one


def test_low_latency_cases_skip_without_the_mode(monkeypatch, group):
    monkeypatch.setattr(pykernels.moe, "Buffer", FakeBuffer)  # a Buffer with normal mode only
    for case in LL_SMOKE:
        with pytest.raises(C.Skip, match=C.NOT_IN_BUILD):
            C.prepare(case, torch.device("cpu"), group)


def test_low_latency_job_on_cpu(tmp_path):
    proc = run_cli("-m", "bench", "--ops", "moe_ll,moe_decode", "--quick", "--out", str(tmp_path), "--name", "ll",
                   "--no-plots")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [r for r in results.load(tmp_path / "ll.json")["records"] if r["measured_on"] != "projection"]
    assert {r["op"] for r in recs} == set(C.LOW_LATENCY_OPS) and all(r["measured_on"] == "cpu" for r in recs)
    torch_recs = [r for r in recs if r["backend"] == "torch"]
    assert len(torch_recs) == len(LL_SMOKE) and all(r["status"] == "ok" for r in torch_recs)
    assert all(r["syncs_per_call"] == 0 for r in torch_recs)
    assert all(r["logical_gbps"] for r in torch_recs if r["op"] != "moe_decode_layer")
    cuda = [r for r in recs if r["backend"] == "cuda"]
    assert cuda and all(r["status"] == "skipped" for r in cuda)
    assert "moe_decode_layer" in proc.stdout and "moe_ll_combine" in proc.stdout


def test_missing_op_is_skipped_with_the_reason(monkeypatch, group):
    monkeypatch.delattr(pykernels, "fp8_gemm_nt", raising=False)
    with pytest.raises(C.Skip, match=C.NOT_IN_BUILD):
        C.prepare(C.Case("fp8_gemm_nt", {"m": 7, "n": 200, "k": 256}), torch.device("cpu"), group)


def test_peer_with_wrong_output_is_never_timed(fake_ops, group):
    case = C.Case("fp8_gemm_nt", {"m": 7, "n": 200, "k": 256})
    prep = C.prepare(case, torch.device("cpu"), group)
    prep.makers["deep_gemm"] = lambda: (lambda: torch.zeros(7, 200, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="differs from the torch reference"):
        prep.make("deep_gemm")


# ---- plots ----

def _gpu_fixture(gpu):
    doc = results.new_document("gpu-fixture", {"kind": "gpu", "name": "NVIDIA H800", "gpu": gpu}, "deepseek-v3", {})
    moe = {"tokens": 4096, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "fp8"}
    todo = C.cases_for([("fp8_gemm_nt", {"m": 4096, "n": 7168, "k": 2048}),
                        ("fp8_gemm_nt", {"m": 64, "n": 7168, "k": 2048}),
                        ("mla_decode", {"batch": 128, "s_q": 1, "h_q": 16, "seqlen": 8192, "kv_dtype": "bf16"}),
                        ("per_token_group_quant_fp8", {"m": 4096, "k": 7168}), ("moe_dispatch", moe)], world=8)
    for case, frac in zip(todo, (0.7, 0.4, 0.8, 0.6, 0.5)):
        prep = C.Prepared(case, case.cost(), {}, extra={"logical_bytes": 1e8} if case.op == "moe_dispatch" else {})
        for backend, f in (("cuda", frac), ("triton", frac * 0.7)):
            t = hardware.project(case.cost(), gpu, case.math_dtype).seconds / f
            doc["records"].append(harness.measured_record(case, backend, prep, {"samples": [t, t * 1.02, t * 0.99]},
                                                          "gpu", hardware.get(gpu)))
    doc["records"] += projection.projection_records(doc["records"])
    return doc


def test_roofline_script_on_fixture(tmp_path):
    h800, h20 = _gpu_fixture("H800 SXM5"), _gpu_fixture("H20")
    cpu = _doc()
    for i, doc in enumerate((h800, h20, cpu)):
        results.save(doc, tmp_path / f"in{i}.json")
    out = tmp_path / "plots"
    proc = run_cli("bench/roofline.py", *[str(tmp_path / f"in{i}.json") for i in range(3)], "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("roofline-h800-sxm5.png", "roofline-h20.png", "cross-gpu.png"):
        assert (out / name).stat().st_size > 20_000, name  # a drawn figure, not an empty canvas
    assert not (out / "roofline-h100-sxm5.png").exists()


def test_roofline_on_cpu_only_or_empty_input_says_so(tmp_path):
    messages = roofline.plot_documents([_doc()], tmp_path)
    assert any("No GPU measurements" in m and "projection chart only" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cross-gpu.png"]
    empty = roofline.plot_records([], tmp_path / "empty", "0 files")
    assert any("No GPU measurements" in m for m in empty) and (tmp_path / "empty" / "cross-gpu.png").exists()


# ---- the jobs, end to end ----

def test_main_job_smoke_on_cpu(tmp_path):
    proc = run_cli("-m", "bench", "--shapes", "smoke", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = results.load(tmp_path / "cpu-smoke.json")
    assert doc["device"]["kind"] == "cpu" and doc["shape_set"] == "smoke"
    measured = [r for r in doc["records"] if r["measured_on"] != "projection"]
    assert measured and all(r["measured_on"] == "cpu" and r["device"] == "cpu" for r in measured)
    assert {r["op"] for r in measured} == set(C.OPS)
    assert any(r["status"] == "ok" and r["backend"] == "torch" for r in measured)
    for header in ("kernel (±IQR)", "call (±IQR)", "host/call", "TFLOPS", "GB/s", "% roof", "bound", "anchor, H800",
                   "vs torch", "H800 SXM5", "H20"):
        assert header in proc.stdout
    assert "never comparable with GPU figures" in proc.stdout
    # the printed projection holds DeepEP's low-latency figures beside the EP8 roofline of the same cases
    printed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("moe_ll_", "moe_decode_layer"))]
    assert any("77 us = " in ln for ln in printed) and any("114 us = " in ln for ln in printed)
    assert any(ln.startswith("moe_decode_layer") and "EP8" in ln for ln in printed)
    assert (tmp_path / "cross-gpu.png").exists() and (tmp_path / "cpu-smoke-projection.txt").exists()
    again = run_cli("-m", "bench", "--ops", "per_token", "--quick", "--interpret", "--out", str(tmp_path),
                    "--name", "again", "--compare", str(tmp_path / "cpu-smoke.json"), "--no-plots")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Speed-up against cpu-smoke" in again.stdout
    rec = {r["backend"]: r for r in results.load(tmp_path / "again.json")["records"] if r["measured_on"] == "cpu"}
    assert rec["torch"]["status"] == "ok" and rec["triton"]["status"] == "ok"  # through the interpreter


def test_pytest_benchmark_job(tmp_path):
    skipped = run_cli("-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider")
    assert skipped.returncode == 0, skipped.stdout[-3000:]
    assert "passed" not in skipped.stdout and "pass --interpret" in skipped.stdout
    out = tmp_path / "pb.json"
    smoke = run_cli("-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider", "--interpret",
                    "--bench-ops", "per_token_group", f"--benchmark-json={out}")
    assert smoke.returncode == 0, smoke.stdout[-3000:]
    data = json.loads(out.read_text())
    assert data["machine_info"]["gpu"]["kind"] == "cpu" and "versions" in data["machine_info"]
    infos = [b["extra_info"] for b in data["benchmarks"]]
    assert {i["backend"] for i in infos} == {"torch", "triton"}
    assert all(i["measured_on"] == "cpu" and i["hbm_bytes"] > 0 for i in infos)
    recs, _ = roofline.load_records(out)
    assert len(recs) == 2


def test_plain_pytest_run_does_not_collect_bench():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


# ---- the anchors' figures ----

def test_every_deepgemm_shape_is_benchmarked_and_finds_its_anchor():
    todo = C.cases_for(shapes.shape_set("deepseek-v3"), world=8)
    found = {}
    for c in todo:
        a = anchors.lookup(c.op, c.shape)
        if a is not None and a.source is anchors.DEEPGEMM:
            found[(c.op, c.label)] = a.value
    listed = len(anchors.DEEPGEMM_NORMAL) + len(anchors.DEEPGEMM_CONTIGUOUS) + len(anchors.DEEPGEMM_MASKED)
    assert listed == 18 + 4 + 6 and len(found) == listed
    assert found[("fp8_gemm_nt", "M=4096 N=7168 K=16384")] == 1520
    assert found[("m_grouped_fp8_gemm_nt_contiguous", "8x4096 N=7168 K=2048")] == 1214
    assert found[("m_grouped_fp8_gemm_nt_masked", "4x256/256 N=4096 K=7168")] == 932
    assert anchors.DEEPGEMM.commit.startswith("327ec92") and len(anchors.DEEPGEMM.commit) == 40


@pytest.mark.parametrize("op,shape,want", [
    ("fp8_gemm_nt", {"m": 65, "n": 2112, "k": 7168}, None),
    ("m_grouped_fp8_gemm_nt_masked", {"masked_m": [256, 200, 256, 256], "m_max": 256, "n": 4096, "k": 7168}, None),
    ("m_grouped_fp8_gemm_nt_masked", {"masked_m": [256] * 4, "m_max": 512, "n": 4096, "k": 7168}, None),
    ("mla_decode", {"batch": 128, "s_q": 1, "h_q": 64, "seqlen": 4096, "kv_dtype": "bf16"}, (3000, "GB/s")),
    ("mla_decode", {"batch": 128, "s_q": 2, "h_q": 32, "seqlen": 8192, "kv_dtype": "bf16"}, (3000, "GB/s")),
    ("mla_decode", {"batch": 128, "s_q": 1, "h_q": 64, "seqlen": 4096, "kv_dtype": "fp8"}, None),
    ("mla_decode", {"batch": 128, "s_q": 2, "h_q": 128, "seqlen": 16384, "kv_dtype": "bf16"}, (660, "TFLOPS")),
    ("mla_decode", {"batch": 128, "s_q": 1, "h_q": 128, "seqlen": 16384, "kv_dtype": "bf16"}, None),
    ("mla_decode", {"batch": 64, "s_q": 2, "h_q": 128, "seqlen": 16384, "kv_dtype": "bf16"}, None),
    # DeepEP's low-latency figures belong to the low-latency cases, not to normal mode at 128 tokens
    ("moe_dispatch", {"tokens": 128, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "fp8", "world": 8},
     None),
    ("moe_ll_dispatch", {"tokens": 128, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "fp8", "world": 8},
     (77, "us")),
    ("moe_ll_combine", {"tokens": 128, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "bf16", "world": 8},
     (114, "us")),
    ("moe_ll_combine", {"tokens": 128, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "bf16", "world": 64},
     (314, "us")),
    ("moe_ll_dispatch", {"tokens": 128, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "bf16", "world": 8},
     None),
    ("moe_ll_dispatch", {"tokens": 128, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "fp8", "world": 1},
     None),
    ("moe_ll_dispatch", {"tokens": 128, "max_tokens": 256, "hidden": 7168, "topk": 8, "num_experts": 256,
                         "dtype": "fp8", "world": 8}, None),
    ("moe_ll_dispatch", {"tokens": 128, "hidden": 4096, "topk": 8, "num_experts": 256, "dtype": "fp8", "world": 8},
     None),
    ("moe_decode_layer", {"tokens": 128, "hidden": 7168, "topk": 8, "num_experts": 256, "intermediate": 2048,
                          "world": 8}, None),
    ("moe_dispatch", {"tokens": 4096, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "fp8", "world": 8},
     (153, "GB/s")),
    ("moe_combine", {"tokens": 4096, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "bf16", "world": 32},
     (57, "GB/s")),
    ("moe_dispatch", {"tokens": 4096, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "bf16", "world": 8},
     None),
    ("moe_dispatch", {"tokens": 128, "hidden": 7168, "topk": 8, "num_experts": 256, "dtype": "fp8", "world": 1},
     None),
    ("moe_permute", {"tokens": 4096, "hidden": 7168, "topk": 8, "num_experts": 256, "local_experts": 32}, None),
])
def test_anchor_lookup(op, shape, want):
    got = anchors.lookup(op, shape)
    assert (None if got is None else (got.value, got.unit)) == want


def test_measured_table_prints_the_anchor_beside_our_gpu_figure():
    doc = results.new_document("t", {"kind": "gpu", "name": "NVIDIA H800", "gpu": "H800 SXM5"}, "deepseek-v3", {})
    todo = C.cases_for([("fp8_gemm_nt", {"m": 4096, "n": 7168, "k": 16384}),
                        ("moe_ll_dispatch", {"tokens": 128, **shapes.DSV3_MOE, "dtype": "fp8"}),
                        ("fp8_gemm_nt", {"m": 7, "n": 200, "k": 256})], world=8)
    t_gemm = 2 * 4096 * 7168 * 16384 / 1216e12  # 0.80 of DeepGEMM's 1520 TFLOPS
    for case, t in zip(todo, (t_gemm, 154e-6, 1e-5)):
        run = {"samples": [t * 1.3] * 3, "kernel_samples": [t] * 3, "kernel_method": "cuda-graph", "launches": 1,
               "syncs": 0}
        doc["records"].append(harness.measured_record(case, "cuda", C.Prepared(case, case.cost(), {}), run, "gpu",
                                                      hardware.get("H800")))
    lines = harness.measured_table(doc).splitlines()
    row = {ln.split()[0] + ln.split()[1]: ln for ln in lines if ln.startswith(("fp8_gemm_nt", "moe_ll_dispatch"))}
    assert "1520 TFLOPS (0.80x)" in row["fp8_gemm_ntM=4096"] and "1.22e+03" in row["fp8_gemm_ntM=4096"]
    assert "77 us (0.50x)" in row["moe_ll_dispatchT=128"]  # 154 us against DeepEP's 77 us
    assert row["fp8_gemm_ntM=7"].split()[-2] == "-"  # no published figure for this shape
    gemm = row["fp8_gemm_ntM=4096"]
    assert f"{t_gemm * 1e6:.1f} us g" in gemm and f"{t_gemm * 1.3e3:.2f} ms" in gemm and "1L 0S" in gemm


def test_calls_from_profile_reads_real_profiler_events():
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(33, 33)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with record_function(timing.CALL_RANGE):
                (x @ x).sum()
    assert timing.calls_from_profile(prof.events()) == [(0.0, 0)] * 3  # no device, no kernels: but the ranges are found


# ---- the DeepSeek-V3 model ----

def _gemm_by_hand(m, n, k, weight_groups=1):
    """FLOPs and bytes of a block-scaled FP8 GEMM, written out: fp8 A and B, fp32 scales, bf16 out."""
    kb, nb = -(-k // 128), -(-n // 128)
    return 2 * m * n * k, m * k + 4 * m * kb + weight_groups * (n * k + 4 * nb * kb) + 2 * m * n


def _quant_by_hand(m, k):
    return 0, m * k * 2 + m * k + 4 * m * -(-k // 128)


def _costs(res):
    return {name: (c["flops"], c["hbm_bytes"]) for name, c in res["cost"].items()}


def test_model_decode_costs_by_hand():
    # decode, 4 sequences, s_q 1, context 1000, EP8
    res = model.evaluate(model.compose(model.DEEPSEEK_V3, "decode", 4, 1000, 0, 8), "H800", {})
    got = _costs(res)
    occ = 8 * (1 - math.comb(224, 8) / math.comb(256, 8))      # ranks a token reaches
    received = 4 * occ
    active = 32 * (1 - (1 - 8 / 256) ** (4 * 8))              # local experts hit by the 32 tokens of 8 ranks
    want = {
        "attn input quant": _quant_by_hand(4, 7168),
        "q_a_proj": _gemm_by_hand(4, 1536, 7168),
        "kv_a_proj": _gemm_by_hand(4, 576, 7168),
        "q_b input quant": _quant_by_hand(4, 1536),
        "q_b_proj": _gemm_by_hand(4, 128 * 192, 1536),
        "k_up input quant": _quant_by_hand(4 * 128, 128),
        "k_up (absorbed)": _gemm_by_hand(4 * 128, 512, 128, weight_groups=128),
        "mla_decode": (2 * 128 * 4 * 1000 * (576 + 512), 2 * 576 * 4 * 1000 + 2 * (576 + 512) * 4 * 128),
        "v_up input quant": _quant_by_hand(4 * 128, 512),
        "v_up (absorbed)": _gemm_by_hand(4 * 128, 128, 512, weight_groups=128),
        "o_proj input quant": _quant_by_hand(4, 16384),
        "o_proj": _gemm_by_hand(4, 7168, 16384),
        "router": (2 * 4 * 256 * 7168, 2 * 4 * 7168 + 2 * 256 * 7168 + 4 * 4 * 256),
        "moe input quant": _quant_by_hand(4, 7168),
        "dispatch": (0, 2 * received * (7168 + 4 * 56)),
        "permute": (0, (received + 32) * 7168),
        "expert gate/up": (2 * 32 * 4096 * 7168,
                           32 * (7168 + 4 * 56) + active * (4096 * 7168 + 4 * 32 * 56) + 2 * 32 * 4096),
        "expert SiLU+quant": (0, 32 * (4096 * 2 + 2048 + 4 * 16)),
        "expert down": (2 * 32 * 7168 * 2048, 32 * (2048 + 4 * 16) + active * (7168 * 2048 + 4 * 56 * 16)
                        + 2 * 32 * 7168),
        "unpermute": (0, (received + 32) * 7168 * 2),
        "combine": (0, 2 * received * 7168 * 2),
        "shared gate/up": _gemm_by_hand(4, 4096, 7168),
        "shared SiLU+quant": (0, 4 * (4096 * 2 + 2048 + 4 * 16)),
        "shared down": _gemm_by_hand(4, 7168, 2048),
    }
    assert list(got) == list(want)
    for name, (flops, hbm) in want.items():
        assert got[name] == (pytest.approx(flops, rel=1e-12), pytest.approx(hbm, rel=1e-12)), name
    remote = received * 7 / 8
    assert res["cost"]["dispatch"]["nvlink_bytes"] == pytest.approx(remote * (7168 + 4 * 56))
    assert res["cost"]["combine"]["nvlink_bytes"] == pytest.approx(remote * 7168 * 2)
    assert res["cost"]["combine"]["rdma_bytes"] == 0
    # the dense layers and the head
    ph = model.compose(model.DEEPSEEK_V3, "decode", 4, 1000, 0, 8)
    dense = {op.name: (op.cost.flops, op.cost.hbm_bytes) for op in ph.dense_layer}
    assert dense["dense gate/up"] == _gemm_by_hand(4, 2 * 18432, 7168)
    assert dense["dense down"] == _gemm_by_hand(4, 7168, 18432)
    assert "router" not in dense and "mla_decode" in dense
    head = ph.head[0].cost
    assert (head.flops, head.hbm_bytes) == (2 * 4 * 129280 * 7168, 2 * 4 * 7168 + 2 * 129280 * 7168 + 4 * 4 * 129280)


def test_model_prefill_mtp_and_internode_by_hand():
    pre = model.compose(model.DEEPSEEK_V3, "prefill", 2, 300, 0, 32)
    ops = {op.name: op for op in pre.moe_layer}
    assert pre.tokens == 600 and "k_up (absorbed)" not in ops
    assert (ops["kv_b_proj"].cost.flops, ops["kv_b_proj"].cost.hbm_bytes) == _gemm_by_hand(600, 128 * 256, 512)
    att = ops["attention (prefill)"].cost
    assert att.flops == 2 * 128 * (2 * 300 * 301 / 2) * (192 + 128)
    assert att.hbm_bytes == 2 * 600 * 128 * (192 + 192 + 128 + 128)
    assert ops["expert gate/up"].kind == "m_grouped_fp8_gemm_nt_contiguous"
    # EP32 = 4 nodes of 8: each token crosses RDMA once per other node it needs
    nodes_reached = 4 * (1 - math.comb(192, 8) / math.comb(256, 8))
    row = 7168 + 4 * 56
    assert ops["dispatch"].rdma_bytes == pytest.approx(600 * nodes_reached * 3 / 4 * row)
    remote = 600 * 32 * (1 - math.comb(248, 8) / math.comb(256, 8)) * 31 / 32
    assert ops["dispatch"].cost.link_bytes == pytest.approx(remote * (7 / 31 + 24 / 31 * 7 / 8) * row)
    assert model.roofline(ops["dispatch"], "H800") == (pytest.approx(ops["dispatch"].rdma_bytes / 50e9), "rdma")
    dec = model.compose(model.DEEPSEEK_V3, "decode", 3, 500, 1, 1)
    names = [op.name for op in dec.moe_layer]
    assert dec.tokens == dec.s_q * 3 == 6 and "dispatch" not in names and "combine" not in names
    mla = next(op for op in dec.moe_layer if op.name == "mla_decode").cost
    assert mla.flops == 2 * 2 * 128 * 3 * 500 * 1088  # s_q = 2
    assert next(op for op in dec.moe_layer if op.name == "permute").cost.hbm_bytes == (6 + 6 * 8) * 7168


@pytest.mark.parametrize("phase,batch,mtp,ep", [("decode", 64, 0, 8), ("decode", 1, 1, 1), ("prefill", 4, 0, 32),
                                                ("prefill", 1, 0, 8)])
def test_model_components_sum_to_the_totals(phase, batch, mtp, ep):
    ph = model.compose(model.DEEPSEEK_V3, phase, batch, 2048, mtp, ep)
    for gpu in hardware.COMPARISON:
        res = model.evaluate(ph, gpu, {})
        assert sum(res["components"].values()) == pytest.approx(res["layer_s"], rel=1e-12)
        assert res["step_s"] == pytest.approx(3 * res["dense_layer_s"] + 58 * res["layer_s"] + res["head_s"])
        assert res["tokens_per_s"] * res["step_s"] == pytest.approx(res["tokens_per_step"])
        assert res["time_per_token_s"] == pytest.approx(res["step_s"] / res["tokens_per_step"])
        for name, s in res["components"].items():
            op = next(o for o in ph.moe_layer if o.name == name)
            assert s == model.roofline(op, gpu)[0] > 0 and res["bounds"][name] == model.roofline(op, gpu)[1]
        assert res["sources"] == {}


def _measured(op, gpu, frac, flops, hbm, label="x"):
    return {"status": "ok", "measured_on": "gpu", "op": op, "gpu": gpu, "roofline_fraction": frac, "flops": flops,
            "hbm_bytes": hbm, "backend": "cuda", "label": label}


def test_a_measured_record_changes_only_its_own_component():
    ph = model.compose(model.DEEPSEEK_V3, "decode", 64, 4096, 0, 8)
    base = {g: model.evaluate(ph, g, {}) for g in ("H800", "H20")}
    mla = _measured("mla_decode", "H800 SXM5", 0.5, 1e12, 3e8)
    fractions = model.measured_fractions([mla, {**mla, "measured_on": "cpu"}, {**mla, "status": "failed"}])
    for g in ("H800", "H20"):
        res = model.evaluate(ph, g, fractions)
        for name, s in res["components"].items():
            assert s == pytest.approx(base[g]["components"][name] * (2 if name == "mla_decode" else 1)), name
        assert list(res["sources"]) == ["mla_decode"]
        assert ("on H800" in res["sources"]["mla_decode"]) == (g == "H20")
    # a GEMM record scales exactly the plain FP8 GEMMs; of two shapes, the one nearest in intensity applies
    near = _measured("fp8_gemm_nt", "H800 SXM5", 0.8, 2 * 64 * 7168 * 16384, 1.2e8)
    far = _measured("fp8_gemm_nt", "H800 SXM5", 0.25, 2 * 4096 * 7168 * 16384, 3e8)
    res = model.evaluate(ph, "H800", model.measured_fractions([far, near]))
    gemms = {op.name for op in ph.moe_layer if op.kind == "fp8_gemm_nt"}
    assert gemms == {"q_a_proj", "kv_a_proj", "q_b_proj", "o_proj", "shared gate/up", "shared down"}
    for name, s in res["components"].items():
        assert s == pytest.approx(base["H800"]["components"][name] / (0.8 if name in gemms else 1)), name


def test_model_cli_writes_json_and_chart(tmp_path, capsys):
    assert model.main(["--out", str(tmp_path), "--gpus", "H800,h20", "--batch", "8", "--context", "1024"]) == 0
    printed = capsys.readouterr().out
    assert "pure roofline" in printed and "tokens/s per GPU" in printed and "expert gate/up" in printed
    lines = printed.splitlines()
    first = lines.index(next(ln for ln in lines if ln.startswith("GPU ")))
    summary = [ln.split() for ln in lines[first + 2:first + 6]]
    assert [s[:3] for s in summary[:2]] == [["H800", "SXM5", "decode"], ["H800", "SXM5", "prefill"]]
    assert [s[:2] for s in summary[2:]] == [["H20", "decode"], ["H20", "prefill"]]
    doc = json.loads((tmp_path / "model.json").read_text())
    assert set(doc["results"]) == {"H800 SXM5", "H20"}
    for per in doc["results"].values():
        assert set(per) == {"decode", "prefill"}
        for res in per.values():
            assert sum(res["components"].values()) == pytest.approx(res["layer_s"])
            assert res["step_s"] > 58 * res["layer_s"] and res["tokens_per_s"] > 0
    assert (tmp_path / "model.png").stat().st_size > 20_000
    rec = _measured("moe_dispatch", "H800 SXM5", 0.25, 0.0, 1e8)
    (tmp_path / "in.json").write_text(json.dumps({"records": [rec]}))
    assert model.main(["--out", str(tmp_path), "--name", "m2", "--phase", "decode", "--gpus", "H800",
                       "--results", str(tmp_path / "in.json"), "--no-plot"]) == 0
    again = json.loads((tmp_path / "m2.json").read_text())["results"]["H800 SXM5"]
    assert list(again) == ["decode"] and list(again["decode"]["sources"]) == ["dispatch"]
    assert "scaled by the fractions measured" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--ep: expected a divisor of 256"):
        model.main(["--ep", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--ep: expected"):
        model.main(["--ep", "4", "--ep", "12", "--out", str(tmp_path)])


def test_expected_grouped_gemm_cost_matches_the_exact_one():
    exact = hardware.cost("fp8_gemm_contiguous", ms=[30, 0, 5, 2], n=160, k=256)
    assert hardware.expected_grouped_gemm_cost(37, 3, 160, 256) == exact
    half = hardware.expected_grouped_gemm_cost(18.5, 1.5, 160, 256)  # linear in rows and in groups
    assert half.flops == exact.flops / 2 and half.hbm_bytes == pytest.approx(exact.hbm_bytes / 2)


@pytest.mark.gpu
def test_gpu_timer_on_a_gpu():
    device = torch.device("cuda", torch.cuda.current_device())
    timer = timing.GpuTimer(device)
    a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
    out = timer(lambda: a @ a, warmup=2, rep=10)
    assert out["kernel_method"] == "cuda-graph" and out["syncs"] == 0 and out["launches"] >= 1
    k, c = statistics.median(out["kernel_samples"]), statistics.median(out["samples"])
    assert 0 < k <= c * 1.05  # the eager call holds at least the kernel
    flops = 2 * 2048 ** 3
    assert flops / k < 2.5 * 989e12  # no Hopper part runs bf16 faster than twice its datasheet peak
    synced = timer(lambda: (a @ a).sum().item(), warmup=1, rep=5)
    assert synced["kernel_method"] == "profiler" and synced["syncs"] == 1 and synced["launches"] >= 2
    assert 0 < statistics.median(synced["kernel_samples"]) <= statistics.median(synced["samples"])


@pytest.mark.gpu
def test_low_latency_cases_are_graph_replayed_on_a_gpu(tmp_path):
    """On a GPU (one-rank NCCL group made by the harness) every own backend of the low-latency cases is timed
    from graph replay, with no host syncs; the decode layer too, except on the torch backend, whose masked
    GEMM reads the per-group counts on the host and is timed by the profiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--shapes", "smoke", "--ops", "moe_ll,moe_decode",
                           "--quick", "--no-plots", "--out", str(tmp_path), "--name", "ll"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [r for r in results.load(tmp_path / "ll.json")["records"]
            if r["measured_on"] == "gpu" and r["backend"] in C.OWN_BACKENDS]
    assert len(recs) == 3 * len(LL_SMOKE)
    for r in recs:
        assert r["status"] == "ok", (r["op"], r["backend"], r["reason"])
        if r["op"] == "moe_decode_layer" and r["backend"] == "torch":
            assert r["kernel_method"] == "profiler" and "reads each group's row count" in r["note"]
            continue
        assert r["kernel_method"] == "cuda-graph" and r["syncs_per_call"] == 0, (r["op"], r["backend"], r["note"])
        assert r["launches_per_call"] >= 1 and 0 < r["kernel_s"]["median"] <= r["call_s"]["median"] * 1.05


def test_projection_table_sets_each_anchor_against_the_h800_roofline():
    text = harness.projection_table({"records": projection.projection_records([])})

    def row(*parts):
        return next(ln for ln in text.splitlines() if all(p in ln.split() for p in parts))

    # compute-bound GEMM: DeepGEMM's TFLOPS over the FP8 peak
    assert row("fp8_gemm_nt", "M=4096", "N=7168", "K=16384").endswith(f"1520 TFLOPS = {100 * 1520 / 1979:.0f}%")
    # memory-bound MLA decode: FlashMLA's GB/s over the HBM bandwidth; none for the FP8 cache
    assert row("mla_decode", "s_k=8192", "h_q=16", "s_q=1", "bf16").endswith(f"3000 GB/s = {100 * 3000 / 3350:.0f}%")
    assert row("mla_decode", "s_k=8192", "h_q=16", "s_q=1", "fp8").endswith(" -")
    # DeepEP low-latency dispatch: the NVLink roofline of the remote (token, expert) messages over its 77 us;
    # normal-mode dispatch at 128 tokens has no published figure
    roof = 128 * 8 * 7 / 8 * (7168 + 4 * 56 + 16) / 200e9
    assert row("moe_ll_dispatch", "T=128", "fp8").endswith(f"77 us = {100 * roof / 77e-6:.0f}%")
    roof = 128 * 8 * 7 / 8 * 2 * 7168 / 200e9
    assert row("moe_ll_combine", "T=128", "bf16").endswith(f"114 us = {100 * roof / 114e-6:.0f}%")
    assert row("moe_dispatch", "T=128", "fp8").endswith(" -")
    assert "H800 anchor" in text.splitlines()[1]


def test_version_1_documents_still_load(tmp_path):
    doc = _doc()
    old = json.loads(json.dumps(doc))
    old["schema"] = "pykernels-bench/1"
    for rec in old["records"]:
        for key in ("kernel_s", "call_s", "kernel_method", "host_overhead_s", "launches_per_call", "syncs_per_call"):
            del rec[key]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    got = results.load(tmp_path / "v1.json")
    assert got["schema"] == results.SCHEMA
    measured, skipped = got["records"][0], got["records"][1]
    assert measured["call_s"] == measured["time_s"] and measured["kernel_s"] is None
    assert skipped["call_s"] is None and got["records"][-1]["call_s"] is None  # a projection measured nothing
    assert "Speed-up against fixture" in harness.compare_table(doc, got)
