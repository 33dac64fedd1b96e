"""The torch.library layer (pykernels/torch_ops.py): every public op is a custom op in the `pykernels`
namespace that passes torch.library.opcheck, the exported functions go through them so that
torch.compile(fullgraph=True) traces a decode step whole, and argument errors keep the project's form."""

import importlib

import pytest
import torch

import pykernels
from pykernels import torch_ops
from pykernels.mla_decode import HEAD_DIM_K, HEAD_DIM_V

from conftest import HAS_HOPPER

OP_NAMES = ("per_token_group_quant_fp8", "per_block_quant_fp8", "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous",
            "m_grouped_fp8_gemm_nt_masked", "mla_decode", "permute_to_experts", "unpermute_from_experts")
# A finite poison in outputs the op leaves partly unwritten (rows the kernels skip): opcheck compares its
# runs' outputs with assert_close, which treats NaN as a mismatch.
POISON = -3.0


def _quantized(shape, block=False):
    x = torch.randn(shape) * 2
    return pykernels.per_block_quant_fp8(x, backend="torch") if block else \
        pykernels.per_token_group_quant_fp8(x, backend="torch")


def _mla_inputs(fp8: bool = False):
    b, h_q = 2, 3
    kv = torch.randn(4, 64, 1, HEAD_DIM_K).to(torch.bfloat16)
    kv_scale = None
    if fp8:
        kv_scale = torch.tensor([0.5])
        kv = (kv.float() / kv_scale).to(torch.float8_e4m3fn)
    kv[1, 9:] = float("nan")  # the unused tail of request 1's only page
    q = torch.randn(b, 1, h_q, HEAD_DIM_K).to(torch.bfloat16)
    block_table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    seqlens = torch.tensor([70, 9], dtype=torch.int32)
    schedule = pykernels.get_mla_metadata(seqlens, h_q, 1, num_sm_parts=3)
    return q, kv, block_table, seqlens, kv_scale, schedule


def _gemm_case(backend):
    a, sa = _quantized((5, 256))
    b, sb = _quantized((130, 256), block=True)
    return a, sa, b, sb, _poisoned(5, 130), backend


def _contiguous_case(backend):
    a, sa = _quantized((256, 256))
    b, sb = _quantized((3, 130, 256), block=True)
    m_indices = torch.full((256,), -1, dtype=torch.int32)
    m_indices[:70], m_indices[128:] = 2, 0
    return a, sa, b, sb, m_indices, _poisoned(256, 130), backend


def _masked_case(backend):
    a, sa = _quantized((2, 9, 256))
    b, sb = _quantized((2, 130, 256), block=True)
    return a, sa, b, sb, torch.tensor([9, 4], dtype=torch.int32), 6, _poisoned(2, 9, 130), backend


def _planned_for(schedule):
    version = -1 if schedule.seqlens_version is None else schedule.seqlens_version
    return [schedule.num_q_tokens_per_head_k, schedule.num_heads_k, schedule.seqlens_ptr, version]


def _mla_case(backend):
    """Without a schedule: a schedule is bound to the cache_seqlens tensor it was planned from and refuses a
    copy of it (the stale-schedule guard), and opcheck runs the op on copies of its inputs. The op with a
    schedule is checked by test_mla_decode_op_takes_its_schedule_and_refuses_a_stale_one."""
    q, kv, block_table, seqlens, kv_scale, _ = _mla_inputs()
    return (q, kv, block_table, seqlens, HEAD_DIM_V, 0.135, False, kv_scale, None, None, None, [], backend)


RECV_IDX = [[0, 2], [1, -1], [2, 2], [-1, -1], [0, 1], [2, 0], [1, 1]]


def _unpermute_case(backend):
    recv_x = torch.randn(7, 256).to(torch.bfloat16)
    y_sorted, _, perm = pykernels.permute_to_experts(recv_x, torch.tensor(RECV_IDX), alignment=16, backend="torch")
    return y_sorted, perm, torch.rand(7, 2), backend


def _poisoned(*shape):
    return torch.full(shape, POISON, dtype=torch.bfloat16)


# (op name, a function of the backend building the torch.ops call's arguments): one small odd-sized case of
# every op, two for permute_to_experts (bf16 rows, and FP8 rows with their scales).
CASES = [
    ("per_token_group_quant_fp8", lambda backend: (torch.randn(3, 5, 200).to(torch.bfloat16), 128, True, False,
                                                   backend)),
    ("per_token_group_quant_fp8", lambda backend: (torch.randn(3, 5, 200).to(torch.bfloat16), 128, False, True,
                                                   backend)),
    ("per_block_quant_fp8", lambda backend: (torch.randn(2, 130, 200), 128, False, backend)),
    ("fp8_gemm_nt", _gemm_case),
    ("m_grouped_fp8_gemm_nt_contiguous", _contiguous_case),
    ("m_grouped_fp8_gemm_nt_masked", _masked_case),
    ("mla_decode", _mla_case),
    ("permute_to_experts", lambda backend: (torch.randn(7, 256).to(torch.bfloat16), None, torch.tensor(RECV_IDX), 16,
                                            None, True, backend)),
    ("permute_to_experts", lambda backend: (*_quantized((7, 256)), torch.tensor(RECV_IDX), 16, 4, False, backend)),
    ("unpermute_from_experts", _unpermute_case),
]


def _bytes(t):
    return t.detach().contiguous().view(torch.uint8).clone()


def _opcheck(name, args):
    op = getattr(torch.ops.pykernels, name).default
    tensors = [x for x in args if isinstance(x, torch.Tensor)]
    if any(t.dtype == torch.float8_e4m3fn for t in tensors):
        # opcheck's schema test compares inputs with allclose, which CPU float8 lacks: check instead that
        # exactly the declared arguments (`out`) change, byte for byte.
        before = [_bytes(t) for t in tensors]
        op(*[x.clone() if isinstance(x, torch.Tensor) else x for x in args])  # warm, on copies
        op(*args)
        mutated = {i for i, arg in enumerate(op._schema.arguments) if arg.alias_info and arg.alias_info.is_write}
        changed = {i for i, x in enumerate(args) if isinstance(x, torch.Tensor)
                   and not torch.equal(_bytes(x), before[[id(t) for t in tensors].index(id(x))])}
        assert changed <= mutated, (name, changed, mutated)
        utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    else:
        utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=utils)


def test_every_public_op_is_registered():
    for name in OP_NAMES:
        op = getattr(torch.ops.pykernels, name).default
        assert "backend" in [a.name for a in op._schema.arguments], name
        assert getattr(pykernels, name).__wrapped__ is getattr(torch_ops, name)  # exported through the layer
    assert sorted({name for name, _ in CASES}) == sorted(OP_NAMES)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_opcheck_torch_backend(case):
    name, build = CASES[case]
    _opcheck(name, build("torch"))


@pytest.mark.parametrize("name", ["per_token_group_quant_fp8", "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_masked",
                                  "mla_decode", "permute_to_experts", "unpermute_from_experts"])
def test_opcheck_triton_backend(name):
    """The Triton kernels through the same layer (under the interpreter on a CPU): the ops that are quick
    there; the remaining ones share every line of the layer with their torch-backend cases."""
    _opcheck(name, next(build for n, build in CASES if n == name)("triton"))


def test_mla_decode_op_takes_its_schedule_and_refuses_a_stale_one():
    q, kv, block_table, seqlens, kv_scale, schedule = _mla_inputs()
    op = torch.ops.pykernels.mla_decode.default
    args = (q, kv, block_table, seqlens, HEAD_DIM_V, 0.135, False, kv_scale)
    planned = op(*args, schedule.part_splits, schedule.splits, schedule.split_offsets, _planned_for(schedule),
                 "torch")
    unplanned = op(*args, None, None, None, [], "torch")
    assert all(torch.equal(x, y) for x, y in zip(planned, unplanned))
    seqlens.add_(1)  # written in place after planning: the schedule no longer describes these lengths
    with pytest.raises(ValueError, match="metadata: .*get_mla_metadata again"):
        op(*args, schedule.part_splits, schedule.splits, schedule.split_offsets, _planned_for(schedule), "torch")


def test_gemm_writes_into_out_and_returns_it():
    a, b = _quantized((5, 256)), _quantized((130, 256), block=True)
    out = torch.full((5, 130), float("nan"), dtype=torch.bfloat16)
    result = pykernels.fp8_gemm_nt(a, b, out=out, backend="torch")
    assert result is out
    assert torch.equal(out, pykernels.fp8_gemm.fp8_gemm_nt(a, b, backend="torch"))


def test_argument_errors_keep_the_projects_form():
    a, b = _quantized((5, 256)), _quantized((130, 256), block=True)
    with pytest.raises(TypeError, match=r"\(b, sb\): expected a \(tensor, scales\) pair, got str"):
        pykernels.fp8_gemm_nt(a, "b")
    with pytest.raises(TypeError, match="sa: expected a torch.Tensor, got list"):
        pykernels.fp8_gemm_nt((a[0], [1.0]), b)
    with pytest.raises(ValueError, match="backend: expected one of 'auto', 'cuda', 'triton', 'torch', got 'cublas'"):
        pykernels.fp8_gemm_nt(a, b, backend="cublas")
    ga, gb = _quantized((2, 9, 256)), _quantized((2, 130, 256), block=True)
    masked_m = torch.tensor([9, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="expected_m: expected an int, got bool"):
        pykernels.m_grouped_fp8_gemm_nt_masked(ga, gb, masked_m, True)
    # Checks of values run inside the op, eagerly, and still reach the caller unchanged.
    with pytest.raises(ValueError, match=r"masked_m: expected values in \[0, 9\]"):
        pykernels.m_grouped_fp8_gemm_nt_masked(ga, gb, torch.tensor([10, 4], dtype=torch.int32), 4, backend="torch")
    with pytest.raises(TypeError, match="masked_m: expected dtype int32, got int64"):
        pykernels.m_grouped_fp8_gemm_nt_masked(ga, gb, masked_m.long(), 4)
    q, kv, block_table, seqlens, _, _ = _mla_inputs()
    with pytest.raises(TypeError, match="metadata: expected an MlaSchedule from get_mla_metadata, got dict"):
        pykernels.mla_decode(q, kv, block_table, seqlens, metadata={})
    with pytest.raises(TypeError, match="causal: expected a bool, got int"):
        pykernels.mla_decode(q, kv, block_table, seqlens, causal=1)
    with pytest.raises(TypeError, match="softmax_scale: expected a float or None, got str"):
        pykernels.mla_decode(q, kv, block_table, seqlens, softmax_scale="0.1")
    with pytest.raises(ValueError, match=r"cache_seqlens: expected lengths <= 128"):
        pykernels.mla_decode(q, kv, block_table, torch.tensor([129, 9], dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got float"):
        pykernels.per_token_group_quant_fp8(1.0)
    with pytest.raises(TypeError, match="num_local_experts: expected an int, got float"):
        pykernels.permute_to_experts(torch.zeros(2, 128, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.int64),
                                     num_local_experts=2.0)


# ---- torch.compile -----------------------------------------------------------------------------------

B, H_Q, HIDDEN, GROUPS, N_EXPERT = 3, 4, 256, 2, 200


def decode_step(x, wq, kv_cache, block_table, cache_seqlens, schedule, w_experts, masked_m):
    """One MLA decode step cut to its pykernels calls: project queries (FP8 GEMM), attend over the paged
    cache, then feed the latent outputs to per-expert FP8 GEMMs in the masked layout."""
    q = pykernels.fp8_gemm_nt(pykernels.per_token_group_quant_fp8(x), wq).view(B, 1, H_Q, HEAD_DIM_K)
    out, lse = pykernels.mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale=0.135, metadata=schedule)
    latent = pykernels.per_token_group_quant_fp8(out.view(GROUPS, B * H_Q // GROUPS, HEAD_DIM_V))
    y = pykernels.m_grouped_fp8_gemm_nt_masked(latent, w_experts, masked_m, expected_m=4)
    return y, lse


def _step_inputs(device):
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    kv = rand(5, 64, 1, HEAD_DIM_K).to(torch.bfloat16)
    kv[4, 3:] = float("nan")  # unused slots of the last page of request 2
    return [
        rand(B, HIDDEN).to(torch.bfloat16).to(device),
        tuple(t.to(device) for t in pykernels.per_block_quant_fp8(rand(H_Q * HEAD_DIM_K, HIDDEN) / 8)),
        kv.to(device),
        torch.tensor([[3, 1], [0, 2], [4, 0]], dtype=torch.int32, device=device),
        torch.tensor([100, 37, 3], dtype=torch.int32, device=device),
        None,
        tuple(t.to(device) for t in pykernels.per_block_quant_fp8(rand(GROUPS, N_EXPERT, HEAD_DIM_V))),
        torch.tensor([6, 2], dtype=torch.int32, device=device),
    ]


def _valid_rows(y, masked_m):
    return [y[g, :m] for g, m in enumerate(masked_m.tolist())]


def test_compile_traces_every_op_as_one_node():
    """Dynamo's graph holds the pykernels ops themselves: nothing in the layer breaks the graph."""
    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def moe_experts(x, idx, w, experts):
        x_sorted, m_indices, perm = pykernels.permute_to_experts(x, idx, num_local_experts=2)
        y_sorted = pykernels.m_grouped_fp8_gemm_nt_contiguous(x_sorted, experts, m_indices)
        return pykernels.unpermute_from_experts(y_sorted, perm, w)

    torch._dynamo.reset()
    args = _step_inputs("cpu")
    torch.compile(decode_step, backend=recording_backend, fullgraph=True)(*args)
    idx = torch.tensor([[0, 1], [1, -1], [0, 0]])
    torch.compile(moe_experts, backend=recording_backend, fullgraph=True)(
        _quantized((3, 256)), idx, torch.rand(3, 2), _quantized((2, 130, 256), block=True))
    for name in OP_NAMES:
        if name != "per_block_quant_fp8":  # weights are quantized outside the step
            assert any(f"pykernels.{name}" in target for target in seen), (name, seen)


def test_compiled_decode_step_matches_eager():
    torch._dynamo.reset()
    args = _step_inputs("cpu")
    q, kv, block_table, seqlens = args[0], args[2], args[3], args[4]
    args[5] = pykernels.get_mla_metadata(seqlens, H_Q, 1)
    eager_y, eager_lse = decode_step(*args)
    compiled_y, compiled_lse = torch.compile(decode_step, fullgraph=True)(*args)
    masked_m = args[7]
    for got, want in zip(_valid_rows(compiled_y, masked_m), _valid_rows(eager_y, masked_m)):
        assert torch.equal(got, want)
    assert torch.equal(compiled_lse, eager_lse)
    assert torch.isfinite(eager_lse).all() and all(torch.isfinite(r).all() for r in _valid_rows(eager_y, masked_m))
    # The same step through the op modules directly, bypassing the layer: the layer changes nothing.
    direct_q = pykernels.fp8_gemm.fp8_gemm_nt(pykernels.fp8_quant.per_token_group_quant_fp8(q), args[1])
    mla_module = importlib.import_module("pykernels.mla_decode")
    _, direct_lse = mla_module.mla_decode(
        direct_q.view(B, 1, H_Q, HEAD_DIM_K), kv, block_table, seqlens, softmax_scale=0.135)
    assert torch.equal(direct_lse, eager_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a compute-capability 9.0 GPU")
def test_gpu_reduce_overhead_replays_the_decode_step():
    """mode="reduce-overhead" captures the step in a CUDA graph; later calls replay it on new data."""
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, capture, then replays
        args = _step_inputs("cuda")
        args[5] = pykernels.get_mla_metadata(args[4], H_Q, 1)
        want_y, want_lse = decode_step(*args)
        got_y, got_lse = compiled(*args)
        torch.cuda.synchronize()
        for got, want in zip(_valid_rows(got_y, args[7]), _valid_rows(want_y, args[7])):
            assert torch.equal(got, want)
        assert torch.equal(got_lse, want_lse)
