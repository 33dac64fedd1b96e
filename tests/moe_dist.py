"""Multi-process harness for the MoE tests: CPU ranks over gloo, and the programs each rank runs.

run_ranks(world, program, *args) spawns `world` processes, each joining a gloo group on a fresh local port,
runs program(rank, world, *args) in each and returns their results in rank order. It never hangs: the first
rank to fail (or to die, or a run past `timeout`) terminates all the others, and its traceback is raised.
Collectives time out on their own too (the group's timeout), so a rank stuck in one cannot outlive the test.

Every rank builds the inputs of all ranks from the same seed, so each can compute the expected result of
the whole exchange by itself, in float64, without trusting any collective.
"""

from __future__ import annotations

import math
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta

import torch

GROUP_TIMEOUT_S = 60
# Where a rank's tensors live: the CPU over gloo, the rank's own GPU over NCCL (set by _rank_main).
DEVICE = torch.device("cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, program, args, results, dist_backend):
    import torch.distributed as dist

    global DEVICE
    try:
        torch.set_num_threads(1)  # world processes share two cores
        if dist_backend == "nccl":
            torch.cuda.set_device(rank)
            DEVICE = torch.device("cuda", rank)
        dist.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        out = program(rank, world, *args)
        results.put(("ok", rank, out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, whatever it is
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, program, *args, timeout: float = 120.0, dist_backend: str = "gloo"):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, program, args, results, dist_backend),
                         daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    done = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [r for r in range(world) if r not in done]
                raise TimeoutError(f"ranks {missing} of {world} did not finish within {timeout:.0f} s")
            try:
                status, rank, payload = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a report")
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} of {world} failed:\n{payload}")
            done[rank] = payload
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return [done[r] for r in range(world)]


# ---- inputs ------------------------------------------------------------------------------------------------

def make_routing(tokens: int, topk: int, experts: int, gen: torch.Generator, allowed=None, drop: float = 0.2):
    """topk_idx [T, k]: distinct experts per token (from `allowed` if given), a fraction `drop` of the slots
    set to -1, every 5th token routed nowhere. topk_weights [T, k]: positive, 0 in -1 slots."""
    pool = torch.arange(experts) if allowed is None else torch.as_tensor(allowed, dtype=torch.int64)
    scores = torch.rand((tokens, pool.numel()), generator=gen)
    idx = pool[scores.topk(min(topk, pool.numel()), dim=1).indices]
    if idx.shape[1] < topk:
        idx = torch.cat([idx, torch.full((tokens, topk - idx.shape[1]), -1, dtype=idx.dtype)], dim=1)
    idx = torch.where(torch.rand((tokens, topk), generator=gen) < drop, -1, idx)
    idx[::5] = -1
    weights = torch.where(idx >= 0, torch.rand((tokens, topk), generator=gen) + 0.05, 0.0)
    return idx.contiguous(), weights.float().contiguous()


def make_inputs(seed: int, token_counts, hidden: int, topk: int, experts: int, allowed=None):
    """Per rank: (x bf16 [T_r, H], topk_idx, topk_weights), the same on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in token_counts:
        x = (torch.randn((t, hidden), generator=gen) * torch.exp(torch.randn((t, 1), generator=gen))).bfloat16()
        idx, w = make_routing(t, topk, experts, gen, allowed)
        out.append((x, idx, w))
    return out


def expected_receive(inputs, rank: int, world: int, experts: int):
    """What `rank` must receive: (rows [R, H], local ids [R, k], weights [R, k], source (rank, token) per row)."""
    num_local = experts // world
    lo, hi = rank * num_local, (rank + 1) * num_local
    rows, ids, weights, sources = [], [], [], []
    for src, (x, idx, w) in enumerate(inputs):
        mine = (idx >= lo) & (idx < hi)
        for t in torch.nonzero(mine.any(dim=1), as_tuple=True)[0].tolist():
            rows.append(x[t])
            ids.append(torch.where(mine[t], idx[t] - lo, -1))
            weights.append(torch.where(mine[t], w[t], 0.0))
            sources.append((src, t))
    hidden, topk = inputs[0][0].shape[1], inputs[0][1].shape[1]
    if not rows:
        return (torch.empty((0, hidden), dtype=torch.bfloat16), torch.empty((0, topk), dtype=torch.int64),
                torch.empty((0, topk)), sources)
    return torch.stack(rows), torch.stack(ids), torch.stack(weights), sources


def fp8_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two fp8 tensors in e4m3 codes (sign-magnitude, so -0 and +0 are equal)."""
    def ordinal(t):
        u = t.view(torch.uint8).to(torch.int32)
        return torch.where(u & 0x80 != 0, -(u & 0x7F), u & 0x7F)
    return int((ordinal(a) - ordinal(b)).abs().max()) if a.numel() else 0


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric in float64: 0 for identical tensors."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


# ---- rank programs ----------------------------------------------------------------------------------------

def program_dispatch_combine(rank, world, backend, seed, token_counts, hidden, topk, experts, allowed=None):
    """Dispatch bf16, check every received row and count against the routing, then combine twice: the
    received rows as they are (DeepEP's check: x times the number of destination ranks) and identity experts
    weighted through permute/unpermute (x times the sum of its weights)."""
    from pykernels import moe
    from pykernels.reference import moe as ref

    inputs = make_inputs(seed, token_counts, hidden, topk, experts, allowed)
    x, idx, w = inputs[rank]
    buffer = moe.Buffer(None, backend=backend)
    layout = buffer.get_dispatch_layout(idx.to(DEVICE), experts)
    want_rank, want_expert, _ = ref.dispatch_layout(idx, experts, world)
    assert torch.equal(layout.num_tokens_per_rank.cpu(), want_rank), (layout.num_tokens_per_rank, want_rank)
    assert torch.equal(layout.num_tokens_per_expert.cpu(), want_expert)
    recv_x, recv_idx, recv_w, per_expert, handle = buffer.dispatch(x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE),
                                                                   experts, layout=layout)

    rows, ids, weights, _ = expected_receive(inputs, rank, world, experts)
    assert recv_x.shape == rows.shape, (recv_x.shape, rows.shape)
    assert torch.equal(recv_x.cpu(), rows), "received rows differ from the routed tokens"
    assert torch.equal(recv_idx.cpu(), ids), "recv_topk_idx differs from the source routing"
    assert torch.equal(recv_w.cpu(), weights), "recv_topk_weights differ from the source routing"
    num_local = experts // world
    want_per_expert = [int((ids == e).sum()) for e in range(num_local)]
    assert per_expert == want_per_expert, (per_expert, want_per_expert)

    # DeepEP's check: combining the rows as received gives x times the number of ranks each token went to.
    back = buffer.combine(recv_x, handle).cpu()
    fanout = sum(((idx >= 0) & (idx // num_local == r)).any(1).long() for r in range(world))
    want = x.double() * fanout.double().unsqueeze(1)
    # Up to world bf16 addends summed in float32, rounded once to bf16: within 2^-8 relative.
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    assert bool(((back.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-30).all())

    # Identity experts weighted by the router: combine(unpermute(permute(recv))) = x * sum of its weights.
    x_sorted, m_indices, perm = moe.permute_to_experts(recv_x, recv_idx, alignment=16,
                                                       num_local_experts=num_local, backend=backend)
    assert x_sorted.shape[0] % 16 == 0 and m_indices.shape == (x_sorted.shape[0],)
    y = moe.unpermute_from_experts(x_sorted, perm, recv_w, backend=backend)
    out = buffer.combine(y, handle).cpu()
    want = x.double() * w.double().sum(1, keepdim=True)
    # Two bf16 roundings (after the weighted sum, after the combine), each 2^-9 relative, weights positive.
    assert bool(((out.double() - want).abs() <= want.abs() * 2 ** -7 + 1e-30).all())
    return {"received": int(recv_x.shape[0]), "sent": sum(handle.send_splits)}


def program_fp8(rank, world, backend, seed, token_counts, hidden, topk, experts):
    """FP8 dispatch both ways: a pre-quantized (x_fp8, scales) pair arrives bit-exact, and quantize_fp8=True
    arrives as the quantizer's output, within FP8 error of the bf16 tokens; the permuted FP8 rows carry
    their scales."""
    from pykernels import moe, per_token_group_quant_fp8
    from pykernels.reference import fp8_quant as fq

    inputs = make_inputs(seed, token_counts, hidden, topk, experts)
    x, idx, w = inputs[rank]
    rows, ids, weights, sources = expected_receive(inputs, rank, world, experts)
    buffer = moe.Buffer(None, backend=backend)

    dx, didx, dw = (t.to(DEVICE) for t in (x, idx, w))
    pair = per_token_group_quant_fp8(dx, backend="torch")
    (rx, rs), recv_idx, recv_w, _, handle = buffer.dispatch(pair, didx, dw, experts)
    (drx, drs), drecv_idx = (rx, rs), recv_idx
    rx, rs, recv_idx, recv_w = rx.cpu(), rs.cpu(), recv_idx.cpu(), recv_w.cpu()
    want_q, want_s = fq.per_token_group_quant_fp8(rows)
    assert rx.dtype == torch.float8_e4m3fn and rs.shape == (rows.shape[0], hidden // 128)
    assert torch.equal(rx.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(rs, want_s)
    assert torch.equal(recv_idx, ids) and torch.equal(recv_w, weights)

    (qx, qs), recv_idx2, _, _, _ = buffer.dispatch(dx, didx, dw, experts, quantize_fp8=True, check_ids=False)
    qx, qs = qx.cpu(), qs.cpu()
    assert torch.equal(recv_idx2.cpu(), ids)
    assert torch.equal(qs, want_s), "on-the-fly scales differ from per_token_group_quant_fp8"
    # The bytes may differ from the quantizer's by one e4m3 step where a value lies on a rounding tie.
    assert fp8_steps(qx, want_q) <= 1
    deq = fq.dequantize_token_groups(qx, qs).double()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal spacing of 2^-9 * scale.
    bound = rows.double().abs() * 2 ** -4 + qs.double().repeat_interleave(128, 1) * 2 ** -9
    assert bool(((deq - rows.double()).abs() <= bound * (1 + 1e-9)).all())

    (xs, ss), m_indices, perm = moe.permute_to_experts((drx, drs), drecv_idx, num_local_experts=experts // world,
                                                       backend=backend)
    xs, ss, m_indices, perm = xs.cpu(), ss.cpu(), m_indices.cpu(), perm.cpu()
    valid = perm >= 0
    r_of_pair = torch.nonzero(valid, as_tuple=True)[0]
    assert torch.equal(xs[perm[valid].long()].view(torch.uint8), rx[r_of_pair].view(torch.uint8))
    assert torch.equal(ss[perm[valid].long()], rs[r_of_pair])
    assert torch.equal(m_indices[perm[valid].long()].long(), recv_idx[valid])
    del handle
    return int(rx.shape[0])


def program_moe_layer(rank, world, backend, seed, token_counts, hidden, inter, topk, experts):
    """One MoE layer end to end: FP8 dispatch -> permute_to_experts -> grouped FP8 GEMM with this rank's
    expert weights -> unpermute (routing weights) -> combine, against a dense single-process float64
    reference built from the same quantized operands."""
    import pykernels
    from pykernels import moe
    from pykernels.reference import fp8_quant as fq

    inputs = make_inputs(seed, token_counts, hidden, topk, experts)
    gen = torch.Generator().manual_seed(seed + 1)
    w_all = torch.randn((experts, inter, hidden), generator=gen) / math.sqrt(hidden)
    wq, ws = fq.per_block_quant_fp8(w_all)
    num_local = experts // world
    mine = slice(rank * num_local, (rank + 1) * num_local)

    x, idx, w = inputs[rank]
    buffer = moe.Buffer(None, backend=backend)
    recv_x, recv_idx, recv_w, per_expert, handle = buffer.dispatch(x, idx, w, experts, quantize_fp8=True)
    x_sorted, m_indices, perm = moe.permute_to_experts(recv_x, recv_idx, alignment=128,
                                                       num_local_experts=num_local, backend=backend)
    y_sorted = pykernels.m_grouped_fp8_gemm_nt_contiguous(
        x_sorted, (wq[mine].contiguous(), ws[mine].contiguous()), m_indices, backend="torch")
    y = moe.unpermute_from_experts(y_sorted, perm, recv_w, backend=backend)
    out = buffer.combine(y, handle)

    xq, xs = fq.per_token_group_quant_fp8(x)
    a = fq.dequantize_token_groups(xq, xs).double()
    b = fq.dequantize_blocks(wq, ws).double()
    want = torch.zeros((x.shape[0], inter), dtype=torch.float64)
    for j in range(topk):
        valid = idx[:, j] >= 0
        e = idx[valid, j]
        want[valid] += w[valid, j].double().unsqueeze(1) * torch.einsum("th,tnh->tn", a[valid], b[e])
    assert out.shape == (x.shape[0], inter) and out.dtype == torch.bfloat16
    # bf16 roundings of the GEMM output, the weighted sum and the combine; FP8 operands are shared.
    diff = calc_diff(out, want)
    assert diff < 1e-4, diff
    if want.numel():
        assert bool(((out.double() - want).abs() <= want.abs().max() * 2 ** -6).all())
    return diff


def program_bad_calls_then_dispatch(rank, world, backend):
    """Every rank makes bad calls (which must raise locally, with no collective entered), then all ranks
    dispatch normally: had any bad call reached a collective, this exchange would hang or mismatch."""
    from pykernels import moe

    buffer = moe.Buffer(None, backend=backend)
    x = torch.randn(6, 256).bfloat16()
    idx = torch.tensor([[0, 1], [2, -1], [-1, -1], [3, 0], [1, 2], [3, -1]])
    w = torch.rand(6, 2)
    errors = 0
    for call, exc in ((lambda: buffer.dispatch(x, idx + 4, w, 4), ValueError),
                      (lambda: buffer.dispatch(x, idx, w, 5), ValueError),
                      (lambda: buffer.dispatch(x[:5], idx, w, 4), ValueError),
                      (lambda: buffer.dispatch(x.float(), idx, w, 4), TypeError)):
        try:
            call()
        except exc:
            errors += 1
    recv_x, _, _, _, handle = buffer.dispatch(x, idx, w, 4)
    out = buffer.combine(recv_x, handle)
    assert out.shape == x.shape
    return errors


def program_fails_on_rank_1(rank, world):
    """Rank 1 fails while rank 0 waits in a collective that can never complete: the harness must report
    rank 1's error and end rank 0."""
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()


def program_low_latency_layer(rank, world, backends, seed, token_counts, hidden, inter, topk, experts, max_tokens):
    """A decode MoE layer in low-latency mode: low_latency_dispatch (FP8) -> masked grouped GEMM (gate/up)
    -> SiLU-mul -> per-token-group quantization -> masked grouped GEMM (down) -> low_latency_combine,
    against a dense float64 reference that rounds where the pipeline rounds (bf16 GEMM outputs, the
    activation's FP8 quantization). Each backend runs with its own routing through the same group."""
    import pykernels
    from pykernels import moe
    from pykernels.reference import fp8_quant as fq

    gen = torch.Generator().manual_seed(seed + 1)
    w13q, w13s = fq.per_block_quant_fp8(torch.randn((experts, 2 * inter, hidden), generator=gen) / math.sqrt(hidden))
    w2q, w2s = fq.per_block_quant_fp8(torch.randn((experts, hidden, inter), generator=gen) / math.sqrt(inter))
    num_local = experts // world
    mine = slice(rank * num_local, (rank + 1) * num_local)
    local_w13 = (w13q[mine].contiguous().to(DEVICE), w13s[mine].contiguous().to(DEVICE))
    local_w2 = (w2q[mine].contiguous().to(DEVICE), w2s[mine].contiguous().to(DEVICE))
    diffs = []
    dense = {}  # dequantized weights of the experts the reference has used
    for step, backend in enumerate(backends):
        gemm_backend = "torch" if backend == "torch" else "auto"
        buffer = moe.Buffer(None, backend=backend)
        inputs = make_inputs(seed + 100 * step, token_counts, hidden, topk, experts)
        x, idx, w = inputs[rank]
        recv_x, recv_s, recv_count, handle = buffer.low_latency_dispatch(x.to(DEVICE), idx.to(DEVICE), max_tokens,
                                                                         experts)
        want_count = [len(b) for b in expected_blocks([i for _, i, _ in inputs], rank, world, experts)]
        assert recv_count.tolist() == want_count, (recv_count, want_count)
        gate_up = pykernels.m_grouped_fp8_gemm_nt_masked((recv_x, recv_s), local_w13, recv_count, max_tokens,
                                                         backend=gemm_backend)
        act = (torch.nn.functional.silu(gate_up[..., :inter].float()) * gate_up[..., inter:].float()).bfloat16()
        act_q = pykernels.per_token_group_quant_fp8(act, backend=gemm_backend)
        down = pykernels.m_grouped_fp8_gemm_nt_masked(act_q, local_w2, recv_count, max_tokens, backend=gemm_backend)
        out = buffer.low_latency_combine(down, idx.to(DEVICE), w.to(DEVICE), handle).cpu()

        xq, xs = fq.per_token_group_quant_fp8(x)
        a = fq.dequantize_token_groups(xq, xs).double()
        want = torch.zeros((x.shape[0], hidden), dtype=torch.float64)
        for t in range(x.shape[0]):
            for j in range(topk):
                e = int(idx[t, j])
                if e < 0:
                    continue
                if e not in dense:
                    dense[e] = (fq.dequantize_blocks(w13q[e], w13s[e]).double(),
                                fq.dequantize_blocks(w2q[e], w2s[e]).double())
                h1 = (a[t] @ dense[e][0].T).bfloat16().float()
                h = (torch.nn.functional.silu(h1[:inter]) * h1[inter:]).bfloat16()
                hq, hs = fq.per_token_group_quant_fp8(h.unsqueeze(0))
                h = fq.dequantize_token_groups(hq, hs).double()[0]
                want[t] += float(w[t, j]) * (h @ dense[e][1].T).bfloat16().double()
        assert out.shape == (x.shape[0], hidden) and out.dtype == torch.bfloat16
        diff = calc_diff(out, want)
        assert diff < 1e-4, diff
        if want.numel():
            assert bool(((out.double() - want).abs() <= want.abs().max() * 2 ** -6).all())
        diffs.append(diff)
    return max(diffs)


def expected_blocks(idxs, rank, world, experts):
    """Independent loops: for each local expert of `rank`, the (source rank, token) pairs routed to it, in
    the order the receive block holds them."""
    num_local = experts // world
    blocks = [[] for _ in range(num_local)]
    for src, idx in enumerate(idxs):
        for t, ids in enumerate(idx.tolist()):
            for e in dict.fromkeys(e for e in ids if 0 <= e < experts and e // num_local == rank):
                blocks[e - rank * num_local].append((src, t))
    return blocks


class CountHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of tensor values on the host: aten._local_scalar_dense (.item(), int(), bool())
    and Tensor.tolist."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))

    # Tensor.tolist reads values without going through the dispatcher: count it by wrapping it.
    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def counted_tolist(tensor):
            counter.reads += 1
            return counter._tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def program_worst_cached_weighted(rank, world, backends, seed, token_counts, hidden, topk, experts):
    """For each backend: the checked dispatch; the same routing resent with handle= (a different x); the
    num_worst_tokens dispatch (no host reads, padded, equal to the checked one on its real rows); combine
    with per-row weights and a bias through both handles, against float64 sums."""
    from pykernels import moe

    inputs = make_inputs(seed, token_counts, hidden, topk, experts)
    x, idx, w = inputs[rank]
    rows, ids, weights, sources = expected_receive(inputs, rank, world, experts)
    num_local = experts // world
    dests = [sorted({int(e) // num_local for e in idx[t] if e >= 0}) for t in range(x.shape[0])]
    bias = (torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + rank)) * 0.5).bfloat16()
    row_factor = lambda r, t: 0.5 + 0.125 * r + 0.0625 * (t % 5)  # exact in bf16 and float32
    want = torch.stack([x[t].double() * sum(row_factor(r, t) for r in dests[t]) + bias[t].double()
                        for t in range(x.shape[0])]) if x.shape[0] else torch.zeros((0, hidden), dtype=torch.float64)
    factors = torch.tensor([row_factor(rank, t) for _, t in sources], dtype=torch.float32)
    for backend in backends:
        buffer = moe.Buffer(None, backend=backend)
        dx, didx, dw = x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE)
        recv_x, recv_idx, recv_w, per_expert, handle = buffer.dispatch(dx, didx, dw, experts)
        assert torch.equal(recv_x.cpu(), rows) and torch.equal(recv_idx.cpu(), ids)

        again, again_idx, again_w, again_counts, same = buffer.dispatch(2 * dx, handle=handle)
        assert same is handle and again_counts == per_expert
        assert torch.equal(again.cpu(), 2 * rows) and torch.equal(again_idx.cpu(), ids)
        assert torch.equal(again_w.cpu(), weights)

        worst = sum(token_counts) + 2  # the same on every rank: any value >= the rows any rank receives
        counter = CountHostReads()
        with counter:
            wx, widx, ww, wcount, whandle = buffer.dispatch(dx, didx, dw, experts, num_worst_tokens=worst)
        assert counter.reads == 0, f"{counter.reads} host reads with num_worst_tokens"
        r = rows.shape[0]
        assert wx.shape == (worst, hidden) and int(whandle.num_recv_tokens) == r
        assert torch.equal(wx[:r].cpu(), rows) and torch.equal(widx[:r].cpu(), ids)
        assert torch.equal(ww[:r].cpu(), weights)
        assert bool((widx[r:] == -1).all()) and not bool(ww[r:].any()) and not bool(wx[r:].float().any())
        assert wcount.tolist() == per_expert

        for y, h in ((recv_x, handle), (wx, whandle)):
            f = torch.zeros(y.shape[0])
            f[:r] = factors
            if y.shape[0] > r:
                y = y.clone()
                y[r:] = float("nan")  # padding rows are never read
            out = buffer.combine(y, h, topk_weights=f.to(DEVICE), bias=bias.to(DEVICE)).cpu()
            # Each weighted row rounded to bf16, summed in float32, rounded; then the bias, rounded: a few
            # bf16 ulps of the largest term.
            scale = x.double().abs() * 4 + bias.double().abs()
            assert out.dtype == torch.bfloat16 and not bool(out.isnan().any())
            assert bool(((out.double() - want).abs() <= scale * 2 ** -7 + 1e-30).all())
    return int(rows.shape[0])


def program_disagreements(rank, world, backend):
    """Calls on which the ranks disagree (num_experts, hidden size, top-k, payload dtype, combine dtype and
    hidden size) or on which one rank's input is bad: every rank must raise, none may hang or return a
    wrong sum, and the group must still work afterwards. Returns each scenario's error message."""
    from pykernels import moe

    buffer = moe.Buffer(None, backend=backend)
    gen = torch.Generator().manual_seed(5 + rank)
    x = torch.randn((7, 256), generator=gen).bfloat16()
    idx, w = make_routing(7, 2, 4, gen)
    odd = rank == world - 1
    scenarios = {
        "num_experts": lambda: buffer.dispatch(x, idx, w, 8 if odd else 4),
        "hidden size": lambda: buffer.dispatch(x[:, :128].contiguous() if odd else x, idx, w, 4),
        "top-k": lambda: buffer.dispatch(x, idx[:, :1].contiguous() if odd else idx,
                                         w[:, :1].contiguous() if odd else w, 4),
        "payload dtype": lambda: buffer.dispatch(x, idx, w, 4, quantize_fp8=odd),
        "bad input": lambda: buffer.dispatch(x, idx + 100 if odd else idx, w, 4),
    }
    messages = {}
    for name, call in scenarios.items():
        try:
            call()
        except ValueError as exc:
            messages[name] = str(exc)
        else:
            raise AssertionError(f"{name}: dispatch returned on rank {rank}")
    recv_x, _, _, _, handle = buffer.dispatch(x, idx, w, 4)
    for name, y in (("combine dtype", recv_x.float() if odd else recv_x),
                    ("combine hidden size", recv_x[:, :128].contiguous() if odd else recv_x),
                    ("combine bad input", recv_x[:0] if odd else recv_x)):
        try:
            buffer.combine(y, handle)
        except ValueError as exc:
            messages[name] = str(exc)
        else:
            raise AssertionError(f"{name}: combine returned on rank {rank}")
    out = buffer.combine(recv_x, handle)  # the group still works
    fanout = sum(((idx >= 0) & (idx // 2 == r)).any(1).long() for r in range(world))
    assert torch.equal(out.double(), (x.double() * fanout.double().unsqueeze(1)).bfloat16().double())
    return messages
