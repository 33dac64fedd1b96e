"""Named shape sets. Each entry is (op, shape): the shape dict is what the record stores and what
pykernels.hardware.cost receives (through bench.cases). `deepseek-v3` holds the real model's shapes, the
ones the kernel issues quote figures for; `smoke` holds tiny ones with odd sizes and tails, for CPUs."""

from __future__ import annotations

# DeepSeek-V3 linear layers (N, K) as DeepGEMM benchmarks them, at M = 64, 128 (decode) and 4096 (prefill).
DSV3_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]

# MoE routing of DeepSeek-V3: 256 routed experts, top-8, hidden 7168; EP8 is the intranode deployment.
DSV3_MOE = {"hidden": 7168, "topk": 8, "num_experts": 256}
DSV3_EXPERT_INTERMEDIATE = 2048  # each routed expert: gate/up 7168 -> 2 x 2048, down 2048 -> 7168


def _deepseek_v3():
    cases = []
    for m, k in [(4096, 7168), (128, 7168), (4096, 2048)]:
        cases.append(("per_token_group_quant_fp8", {"m": m, "k": k}))
    for n, k in [(7168, 2048), (4096, 7168)]:
        cases.append(("per_block_quant_fp8", {"n": n, "k": k}))
    for m in (64, 128, 4096):
        for n, k in DSV3_NK:
            cases.append(("fp8_gemm_nt", {"m": m, "n": n, "k": k}))
    # DeepGEMM's published grouped shapes (bench/anchors.py): contiguous for prefill, masked for decode
    for groups, m in [(4, 8192), (8, 4096)]:
        for n, k in [(4096, 7168), (7168, 2048)]:
            cases.append(("m_grouped_fp8_gemm_nt_contiguous", {"ms": [m] * groups, "n": n, "k": k}))
    for n, k in [(4096, 7168), (7168, 2048)]:
        for groups, m in [(1, 1024), (2, 512), (4, 256)]:
            cases.append(("m_grouped_fp8_gemm_nt_masked", {"masked_m": [m] * groups, "m_max": m, "n": n, "k": k}))
    # FlashMLA's sweep: b=128, s_k in {4096, 8192, 16384}, h_q in {16, 32, 64, 128}, s_q in {1, 2}
    for kv_dtype in ("bf16", "fp8"):
        for seqlen in (4096, 8192, 16384):
            for h_q in (16, 32, 64, 128):
                for s_q in (1, 2):
                    cases.append(("mla_decode", {"batch": 128, "s_q": s_q, "h_q": h_q, "seqlen": seqlen,
                                                 "kv_dtype": kv_dtype}))
    for tokens in (4096, 128):
        cases.append(("moe_dispatch", {"tokens": tokens, **DSV3_MOE, "dtype": "fp8"}))
        cases.append(("moe_dispatch", {"tokens": tokens, **DSV3_MOE, "dtype": "bf16"}))
        cases.append(("moe_combine", {"tokens": tokens, **DSV3_MOE, "dtype": "bf16"}))
    # Decode (low-latency mode) at DeepEP's low-latency benchmark shape, 128 tokens per rank; and the whole
    # decode MoE layer around it (with every expert on one GPU at world 1: 11 GB of FP8 expert weights)
    cases.append(("moe_ll_dispatch", {"tokens": 128, **DSV3_MOE, "dtype": "fp8"}))
    cases.append(("moe_ll_dispatch", {"tokens": 128, **DSV3_MOE, "dtype": "bf16"}))
    cases.append(("moe_ll_combine", {"tokens": 128, **DSV3_MOE, "dtype": "bf16"}))
    cases.append(("moe_decode_layer", {"tokens": 128, **DSV3_MOE, "intermediate": DSV3_EXPERT_INTERMEDIATE}))
    # One EP8 rank's share after dispatch: its 32 local experts out of 256
    cases.append(("moe_permute", {"tokens": 4096, **DSV3_MOE, "local_experts": 32}))
    cases.append(("moe_unpermute", {"tokens": 4096, **DSV3_MOE, "local_experts": 32}))
    return cases


def _smoke():
    return [
        ("per_token_group_quant_fp8", {"m": 33, "k": 300}),
        ("per_block_quant_fp8", {"n": 200, "k": 384}),
        ("fp8_gemm_nt", {"m": 7, "n": 200, "k": 256}),
        ("m_grouped_fp8_gemm_nt_contiguous", {"ms": [37, 0, 5], "n": 160, "k": 256}),
        ("m_grouped_fp8_gemm_nt_masked", {"masked_m": [5, 0, 17], "m_max": 24, "n": 160, "k": 256}),
        ("mla_decode", {"batch": 2, "s_q": 1, "h_q": 16, "seqlen": [65, 130], "kv_dtype": "bf16"}),
        ("mla_decode", {"batch": 2, "s_q": 2, "h_q": 3, "seqlen": [63, 63], "kv_dtype": "fp8"}),
        ("moe_dispatch", {"tokens": 40, "hidden": 256, "topk": 4, "num_experts": 16, "dtype": "fp8"}),
        ("moe_dispatch", {"tokens": 40, "hidden": 256, "topk": 4, "num_experts": 16, "dtype": "bf16"}),
        ("moe_combine", {"tokens": 40, "hidden": 256, "topk": 4, "num_experts": 16, "dtype": "bf16"}),
        # 13 tokens in buffers sized for 16: the receive blocks' unused tail rows
        ("moe_ll_dispatch", {"tokens": 13, "max_tokens": 16, "hidden": 256, "topk": 4, "num_experts": 16,
                             "dtype": "fp8"}),
        ("moe_ll_dispatch", {"tokens": 13, "max_tokens": 16, "hidden": 256, "topk": 4, "num_experts": 16,
                             "dtype": "bf16"}),
        ("moe_ll_combine", {"tokens": 13, "max_tokens": 16, "hidden": 256, "topk": 4, "num_experts": 16,
                            "dtype": "bf16"}),
        ("moe_decode_layer", {"tokens": 13, "max_tokens": 16, "hidden": 256, "topk": 4, "num_experts": 16,
                              "intermediate": 128}),
        ("moe_permute", {"tokens": 40, "hidden": 256, "topk": 4, "num_experts": 16, "local_experts": 16}),
        ("moe_unpermute", {"tokens": 40, "hidden": 256, "topk": 4, "num_experts": 16, "local_experts": 16}),
    ]


SHAPE_SETS = {"deepseek-v3": _deepseek_v3, "smoke": _smoke}


def shape_set(name: str) -> list:
    if name not in SHAPE_SETS:
        raise ValueError(f"--shapes: expected one of {', '.join(SHAPE_SETS)}, got {name!r}")
    return SHAPE_SETS[name]()


def projection_world() -> int:
    """The world size the cross-GPU projection assumes for MoE communication: one node of 8 GPUs."""
    return 8
