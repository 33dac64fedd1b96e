"""Rank programs for the DeepEP compat tests (spawned by tests/moe_dist.run_ranks over gloo): a port of the
checks of DeepEP's tests/legacy/test_intranode.py, with references built on every rank from the same seed
(moe_dist.make_inputs) and from all-reduced counts."""

from __future__ import annotations

import os

import torch

import moe_dist


def _fp8_with_column_major_scales(x):
    import pykernels

    q, scales = pykernels.per_token_group_quant_fp8(x, backend="torch")
    return q, scales.T.contiguous().T


def _cast_back(x):
    if not isinstance(x, tuple):
        return x
    q, scales = x
    return (q.float() * scales.repeat_interleave(128, dim=1)).to(torch.bfloat16)


def program_deep_ep_intranode(rank, world, backend, seed, token_counts, hidden, topk, experts):
    import torch.distributed as dist

    os.environ["PYKERNELS_BACKEND"] = backend
    from pykernels.compat import deep_ep

    inputs = moe_dist.make_inputs(seed, token_counts, hidden, topk, experts)
    x_rand, topk_idx, topk_weights = inputs[rank]
    tokens, num_local = x_rand.shape[0], experts // world
    x_rank = torch.full((tokens, hidden), float(rank), dtype=torch.bfloat16)
    buffer = deep_ep.Buffer(None)

    # The layout against a torch computation, counts against all-reduced references.
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    dest = torch.where(topk_idx >= 0, topk_idx // num_local, -1)
    ref_in_rank = torch.stack([(dest == r).any(dim=1) for r in range(world)], dim=1)
    assert per_rdma_rank is None and per_rank.dtype == per_expert.dtype == torch.int32
    assert torch.equal(in_rank, ref_in_rank)
    assert torch.equal(per_rank, ref_in_rank.sum(dim=0).int())
    assert torch.equal(per_expert, torch.bincount(topk_idx[topk_idx >= 0], minlength=experts).int())
    gbl_per_rank, gbl_per_expert = per_rank.clone(), per_expert.clone()
    dist.all_reduce(gbl_per_rank)
    dist.all_reduce(gbl_per_expert)
    want_rows, want_ids, want_weights, _ = moe_dist.expected_receive(inputs, rank, world, experts)
    destinations = in_rank.sum(dim=1, keepdim=True)
    sent = destinations[:, 0] > 0

    checks = 0
    for current_x in (x_rand, x_rank, _fp8_with_column_major_scales(x_rank)):
        for with_topk in (False, True):
            args = {"x": current_x, "num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank,
                    "num_tokens_per_expert": per_expert, "async_finish": with_topk,
                    "previous_event": buffer.capture()}
            if with_topk:
                args.update(topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=4)
            recv_x, recv_idx, recv_weights, counts, handle, event = buffer.dispatch(**args)
            event.current_stream_wait()
            assert isinstance(recv_x, tuple) == isinstance(current_x, tuple)
            recv_x = _cast_back(recv_x)
            assert recv_x.shape[0] == int(gbl_per_rank[rank])
            alignment = 4 if with_topk else 1
            assert counts == [-(-c // alignment) * alignment for c in gbl_per_expert.view(world, -1)[rank].tolist()]
            if current_x is x_rand:
                assert torch.equal(recv_x, want_rows)
            else:
                # Rows carry their source rank: those from rank i sit in handle[0][i - 1, rank]..handle[0][i, rank].
                start = 0
                for i in range(world):
                    end = int(handle[0][i][rank])
                    assert bool((recv_x[start:end].float() == i).all()), (i, start, end)
                    start = end
                assert start == recv_x.shape[0]
            if with_topk:
                assert torch.equal(recv_idx, want_ids) and torch.equal(recv_weights, want_weights)
                for e, count in enumerate(gbl_per_expert.view(world, -1)[rank].tolist()):
                    assert int(recv_idx.eq(e).sum()) == count
            else:
                assert recv_idx is None and recv_weights is None
                cached, *rest = buffer.dispatch(current_x, handle=handle)
                assert all(r is None for r in rest[:4])
                assert torch.equal(_cast_back(cached), recv_x)
            combined, combined_weights, _ = buffer.combine(recv_x, handle,
                                                          topk_weights=recv_weights if with_topk else None)
            ref_x = x_rand if current_x is x_rand else x_rank
            check_x = combined.float()[sent] / destinations[sent]
            assert moe_dist.calc_diff(check_x, ref_x.float()[sent]) < 5e-6
            assert bool((combined[~sent] == 0).all())
            if with_topk:
                assert moe_dist.calc_diff(combined_weights, topk_weights) < 1e-9
                biases = (torch.randn(tokens, hidden).bfloat16(), torch.randn(tokens, hidden).bfloat16())
                with_bias, _, _ = buffer.combine(recv_x, handle, bias=biases)
                want = (combined.float() + biases[0].float() + biases[1].float()).bfloat16()
                assert torch.equal(with_bias, want)
            checks += 1
    return checks


def _per_token_cast_back(q, scales):
    """DeepEP's per_token_cast_back: FP8 rows times their 1x128 scales, in float32."""
    return q.float() * scales.float().repeat_interleave(128, dim=-1)


def program_deep_ep_low_latency(rank, world, backend, seed, token_counts, hidden, topk, experts):
    """A port of DeepEP's tests/legacy/test_low_latency.py checks: rows per expert, counts, src_info and
    layout_range against a reference from the all-gathered inputs; FP8 rows dequantized within e4m3's error;
    combine against x times the summed weights at DeepEP's tolerances (calc_diff < 1e-5 for a bf16 dispatch,
    9e-4 for FP8, here without DeepEP's +1 shift, so stricter); then num_worst_tokens through dispatch."""
    import torch.distributed as dist

    os.environ["PYKERNELS_BACKEND"] = backend
    from pykernels.compat import deep_ep

    gen = torch.Generator().manual_seed(seed + rank)
    tokens, num_local = token_counts[rank], experts // world
    max_tokens = max(token_counts) + 1  # every rank's M; an odd W * M exercises the scales' TMA padding
    rows = world * max_tokens
    # As upstream: x holds (rank - 128) in every column but the last 128, which hold the token index.
    x_struct = torch.full((tokens, hidden), float(rank - 128), dtype=torch.bfloat16)
    x_struct[:, -128:] = torch.arange(tokens, dtype=torch.bfloat16).view(-1, 1)
    x_rand = (torch.randn((tokens, hidden), generator=gen) * torch.exp(torch.randn((tokens, 1), generator=gen))).bfloat16()
    scores = torch.rand((tokens, experts), generator=gen) + 1
    topk_idx = scores.topk(topk, dim=1).indices.contiguous()
    topk_idx[torch.rand((tokens, topk), generator=gen) < 0.25] = -1
    topk_weights = torch.rand((tokens, topk), generator=gen) + 0.05

    def gather(t, fill):
        padded = torch.full((max_tokens,) + tuple(t.shape[1:]), fill, dtype=t.dtype)
        padded[:t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded)
        return out

    all_idx = gather(topk_idx, -1)
    stats_size = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, world, experts)
    assert stats_size == experts * max_tokens * hidden * 2
    buffer = deep_ep.Buffer(None, num_rdma_bytes=stats_size, low_latency_mode=True, num_qps_per_rank=num_local)
    buffer.clean_low_latency_buffer(max_tokens, hidden, experts)

    # Where each local expert's rows must come from: (source rank, token), by source rank then token.
    sources = [[(src, t) for src in range(world) for t in range(token_counts[src])
                if rank * num_local + e in all_idx[src][t].tolist()] for e in range(num_local)]
    checks = 0
    for current_x in (x_struct, x_rand):
        all_x = gather(current_x, 0.0)
        for use_fp8 in (False, True):
            stats = torch.zeros(num_local, dtype=torch.int32)
            counter = moe_dist.CountHostReads()
            for _ in range(2):  # the statistics accumulate over calls
                with counter:
                    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
                        current_x, topk_idx, max_tokens, experts, cumulative_local_expert_recv_stats=stats,
                        use_fp8=use_fp8, async_finish=True)
                event.current_stream_wait()
                assert hook is None
            assert counter.reads == 0, f"{counter.reads} host reads in low_latency_dispatch"
            assert recv_count.dtype == torch.int32 and recv_count.tolist() == [len(s) for s in sources]
            assert torch.equal(stats, 2 * recv_count)
            src_info, layout_range, m, h, e_total = handle
            assert (m, h, e_total) == (max_tokens, hidden, experts)
            assert src_info.shape == (num_local, rows) and layout_range.shape == (num_local, world)
            if use_fp8:
                q, scales = recv_x
                assert q.dtype == torch.float8_e4m3fn and q.shape == (num_local, rows, hidden)
                m_pad = -(-rows // 4) * 4
                assert scales.shape == (num_local, rows, hidden // 128)
                assert scales.stride() == (m_pad * hidden // 128, 1, m_pad)
                received = _per_token_cast_back(q, scales)
            else:
                assert recv_x.dtype == torch.bfloat16 and recv_x.shape == (num_local, rows, hidden)
                received = recv_x.float()
            simulated_gemm_x = received.clone()
            for e in range(num_local):
                count = len(sources[e])
                want = torch.stack([all_x[s][t].float() for s, t in sources[e]]) if count else None
                got = received[e, :count]
                if count and use_fp8:
                    # e4m3 keeps 3 mantissa bits (half an ulp: 2^-4 relative); the subnormal step of a scaled
                    # group is scale * 2^-9.
                    bound = want.abs() * 2 ** -4 + scales[e, :count].repeat_interleave(128, dim=-1) * 2 ** -9
                    assert bool(((got - want).abs() <= bound * 1.01).all())
                elif count:
                    assert torch.equal(got, want)
                assert src_info[e, :count].tolist() == [t for _, t in sources[e]]
                begin = 0
                for src in range(world):
                    n = sum(1 for s, _ in sources[e] if s == src)
                    assert int(layout_range[e, src]) == (begin << 32 | n)
                    if current_x is x_struct and n and not use_fp8:
                        assert bool((got[begin:begin + n, :-128] == src - 128).all())
                    begin += n
                simulated_gemm_x[e, count:] = float("nan")  # rows past recv_count are never read
            for expert_scaled in (False, True):
                # Identity experts (upstream's check), then experts scaling by 2^(e - 4) (exact in bf16), which
                # a mix-up of two experts' rows would change.
                factors = 2.0 ** (torch.arange(experts, dtype=torch.float64) - 4) if expert_scaled \
                    else torch.ones(experts, dtype=torch.float64)
                mine = factors[rank * num_local:(rank + 1) * num_local].float().view(-1, 1, 1)
                y = (simulated_gemm_x * mine).bfloat16().contiguous()
                out = torch.full((tokens, hidden), float("nan"), dtype=torch.bfloat16)
                with counter:
                    combined, event, hook = buffer.low_latency_combine(y, topk_idx, topk_weights, handle, out=out)
                assert combined is out and hook is None and counter.reads == 0
                valid = topk_idx >= 0
                token_factor = torch.where(valid, topk_weights.double() * factors[topk_idx.clamp(min=0)], 0.0).sum(1)
                want = current_x.double() * token_factor.view(-1, 1)
                assert not bool(combined.isnan().any())
                diff = moe_dist.calc_diff(combined, want)
                assert diff < (9e-4 if use_fp8 else 1e-5), diff
                if not use_fp8:
                    # bf16 rows: weighted products and their sum in float32, rounded once to bf16.
                    assert bool(((combined.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-30).all())
                checks += 1
    checks += _check_num_worst_tokens(buffer, x_rand, topk_idx, topk_weights, experts, sum(token_counts) + 3)
    return checks


def _check_num_worst_tokens(buffer, x, topk_idx, topk_weights, experts, worst):
    """dispatch(num_worst_tokens=N) against the plain dispatch: the same rows first, then padding (ids -1,
    weights 0, zero payload), an empty per-expert list, no host reads; its handle's cached dispatch and
    combine give the plain ones' results. worst: the same on every rank, at least the rows any receives."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, **args)
    r = recv_x.shape[0]
    counter = moe_dist.CountHostReads()
    with counter:
        wx, widx, ww, wcounts, whandle, _ = buffer.dispatch(x, num_worst_tokens=worst, **args)
    assert counter.reads == 0, counter.reads
    assert wcounts == [] and wx.shape == (worst, x.shape[1])
    assert torch.equal(wx[:r], recv_x) and torch.equal(widx[:r], recv_idx) and torch.equal(ww[:r], recv_w)
    assert bool((widx[r:] == -1).all()) and not bool(ww[r:].any()) and not bool(wx[r:].float().any())
    assert torch.equal(whandle[0], handle[0])
    assert torch.equal(whandle.inner.num_recv_tokens_per_expert, torch.tensor(counts, dtype=torch.int32))
    cached, *rest = buffer.dispatch(2 * x, handle=whandle)
    assert torch.equal(cached[:r], 2 * recv_x) and not bool(cached[r:].float().any())
    y = wx.clone()
    y[r:] = float("nan")  # padding rows are never read
    want, want_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    got, got_w, _ = buffer.combine(y, whandle, topk_weights=ww)
    assert torch.equal(got, want) and torch.equal(got_w, want_w)
    return 1
