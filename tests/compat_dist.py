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
