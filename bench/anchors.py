"""The anchors' published figures, printed beside our GPU figures for the same shapes.

Every figure is an H800 SXM5 measurement by its authors, copied from the repository named with the commit it
was read at. Units are the anchors' own: TFLOPS (2·M·N·K summed over groups, per second), GB/s (FlashMLA: the
bytes of `pykernels.hardware.cost("mla_decode")`; DeepEP: "logical" bytes, received rows including the
rank's own times the row size on the wire), microseconds (DeepEP low-latency kernels).
"""

from __future__ import annotations

from typing import NamedTuple


class Source(NamedTuple):
    repo: str
    commit: str
    date: str
    where: str


class Anchor(NamedTuple):
    value: float
    unit: str           # "TFLOPS", "GB/s" or "us"
    source: Source
    note: str = ""

    def text(self) -> str:
        return f"{self.value:g} {self.unit}"


# The last revision of DeepGEMM's README with its performance table (later revisions replace the table with a
# "up to 1550 TFLOPS" note). H800 SXM5, NVCC 12.8, "all shapes potentially used in DeepSeek-V3/R1 inference
# ... without tensor parallelism".
DEEPGEMM = Source("deepseek-ai/DeepGEMM", "327ec92f6977e7fee022cb76a8f273b75483c3d8", "2025-04-09",
                  "README.md, Performance")
DEEPGEMM_NORMAL = {  # (M, N, K) -> TFLOPS
    (64, 2112, 7168): 206, (64, 24576, 1536): 289, (64, 32768, 512): 219, (64, 7168, 16384): 336,
    (64, 4096, 7168): 287, (64, 7168, 2048): 295,
    (128, 2112, 7168): 352, (128, 24576, 1536): 535, (128, 32768, 512): 358, (128, 7168, 16384): 645,
    (128, 4096, 7168): 533, (128, 7168, 2048): 510,
    (4096, 2112, 7168): 1127, (4096, 24576, 1536): 1212, (4096, 32768, 512): 775, (4096, 7168, 16384): 1520,
    (4096, 4096, 7168): 1410, (4096, 7168, 2048): 1168,
}
DEEPGEMM_CONTIGUOUS = {  # (groups, M per group, N, K) -> TFLOPS
    (4, 8192, 4096, 7168): 1346, (4, 8192, 7168, 2048): 1214,
    (8, 4096, 4096, 7168): 1346, (8, 4096, 7168, 2048): 1214,
}
DEEPGEMM_MASKED = {  # (groups, M per group, N, K) -> TFLOPS; every group full (masked_m = M)
    (1, 1024, 4096, 7168): 1233, (1, 1024, 7168, 2048): 925,
    (2, 512, 4096, 7168): 1040, (2, 512, 7168, 2048): 916,
    (4, 256, 4096, 7168): 932, (4, 256, 7168, 2048): 815,
}

FLASHMLA = Source("deepseek-ai/FlashMLA", "9241ae3ef9bac614dd25e45e507e089f888280e0", "2026-04-29",
                  "README.md (the 660 TFLOPS figure since c2067be, 2025-04-22)")
FLASHMLA_MEMORY_GBPS = 3000      # memory-bound configurations: h_q * s_q <= 64, BF16 cache
FLASHMLA_COMPUTE_TFLOPS = 660    # compute-bound: h_q = 128, s_q = 2, b = 128, s_k 4096-16384, BF16 cache

DEEPEP = Source("deepseek-ai/DeepEP", "567632dd59810d77b3cc05553df953cc0f779799", "2026-02-03",
                "README.md, Performance (the last revision with the V1 tables)")
# Normal kernels, 4096 tokens, hidden 7168, top-4 groups, top-8 experts, FP8 dispatch, BF16 combine:
# EP -> (dispatch GB/s, combine GB/s), bottleneck bandwidth (NVLink intranode, RDMA internode)
DEEPEP_NORMAL = {8: (153, 158), 16: (43, 43), 32: (58, 57), 64: (51, 50)}
# Low-latency kernels, 128 tokens, hidden 7168, top-8, FP8 dispatch, BF16 combine, pure RDMA:
# EP -> (dispatch us, combine us)
DEEPEP_LOW_LATENCY = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314), 128: (192, 369),
                      256: (194, 360)}
DSV3_ROUTING = {"hidden": 7168, "topk": 8, "num_experts": 256}


def _uniform(ms) -> int | None:
    ms = list(ms)
    return ms[0] if ms and all(m == ms[0] for m in ms) else None


def lookup(op: str, shape: dict) -> Anchor | None:
    """The anchor's published figure for this op and shape (as bench/shapes.py writes it; the data types are
    in the shape), or None when it publishes none."""
    if op == "fp8_gemm_nt":
        v = DEEPGEMM_NORMAL.get((shape["m"], shape["n"], shape["k"]))
        return Anchor(v, "TFLOPS", DEEPGEMM, "DeepGEMM fp8_gemm_nt") if v else None
    if op == "m_grouped_fp8_gemm_nt_contiguous":
        m = _uniform(shape["ms"])
        v = DEEPGEMM_CONTIGUOUS.get((len(shape["ms"]), m, shape["n"], shape["k"])) if m else None
        return Anchor(v, "TFLOPS", DEEPGEMM, "DeepGEMM contiguous grouped") if v else None
    if op == "m_grouped_fp8_gemm_nt_masked":
        m = _uniform(shape["masked_m"])
        if m is None or m != shape["m_max"]:
            return None
        v = DEEPGEMM_MASKED.get((len(shape["masked_m"]), m, shape["n"], shape["k"]))
        return Anchor(v, "TFLOPS", DEEPGEMM, "DeepGEMM masked grouped") if v else None
    if op == "mla_decode":
        if shape.get("kv_dtype", "bf16") != "bf16":
            return None  # FlashMLA has no dense FP8-cache decode on SM90
        if shape["h_q"] * shape["s_q"] <= 64:
            return Anchor(FLASHMLA_MEMORY_GBPS, "GB/s", FLASHMLA, "FlashMLA, memory-bound (\"up to\")")
        lens = shape["seqlen"]
        uniform = lens if isinstance(lens, int) else _uniform(lens)
        if (shape["h_q"], shape["s_q"], shape["batch"]) == (128, 2, 128) and uniform and 4096 <= uniform <= 16384:
            return Anchor(FLASHMLA_COMPUTE_TFLOPS, "TFLOPS", FLASHMLA, "FlashMLA, compute-bound (\"up to\")")
        return None
    if op in ("moe_dispatch", "moe_combine"):
        if any(shape.get(k) != v for k, v in DSV3_ROUTING.items()):
            return None
        want = "fp8" if op == "moe_dispatch" else "bf16"
        if shape.get("dtype", want) != want:
            return None
        which = 0 if op == "moe_dispatch" else 1
        world = shape.get("world")
        if shape["tokens"] == 4096 and world in DEEPEP_NORMAL:
            link = "NVLink" if world <= 8 else "RDMA"
            return Anchor(DEEPEP_NORMAL[world][which], "GB/s", DEEPEP, f"DeepEP normal kernels, {link} bottleneck, "
                                                                      f"logical bytes")
        return None
    if op in ("moe_ll_dispatch", "moe_ll_combine"):
        # DeepEP's low-latency figures belong to its low-latency kernels: 128 tokens in buffers for 128, at the
        # same EP size (its EP8 figure crosses RDMA between 8 GPUs, which a one-GPU run has no counterpart of)
        if any(shape.get(k) != v for k, v in DSV3_ROUTING.items()):
            return None
        want = "fp8" if op == "moe_ll_dispatch" else "bf16"
        tokens, world = shape["tokens"], shape.get("world")
        if shape.get("dtype", want) != want or tokens != 128 or shape.get("max_tokens", tokens) != tokens:
            return None
        if world not in DEEPEP_LOW_LATENCY:
            return None
        which = 0 if op == "moe_ll_dispatch" else 1
        return Anchor(DEEPEP_LOW_LATENCY[world][which], "us", DEEPEP, "DeepEP low-latency kernels over RDMA")
    return None
    return None


def seconds(anchor: Anchor, flops: float, hbm_bytes: float, op: str) -> float:
    """The time the anchor's figure implies for work of this cost. DeepEP's logical bytes are the received rows
    at their wire size: half of pykernels.hardware's dispatch/combine HBM bytes, which count each received row
    once written by the packing side and once read back."""
    if anchor.unit == "TFLOPS":
        return flops / (anchor.value * 1e12)
    if anchor.unit == "GB/s":
        moved = hbm_bytes / 2 if op in ("moe_dispatch", "moe_combine") else hbm_bytes
        return moved / (anchor.value * 1e9)
    return anchor.value * 1e-6


def ratio(anchor: Anchor, record: dict) -> float | None:
    """Our figure over the anchor's, in the anchor's unit, so that > 1 means ours is faster; None when the
    record has no figure in that unit."""
    if anchor.unit == "TFLOPS":
        ours = record.get("tflops")
        return ours / anchor.value if ours else None
    if anchor.unit == "GB/s":
        ours = record.get("logical_gbps") if record["op"].startswith("moe_") else record.get("gbps")
        return ours / anchor.value if ours else None
    t = record.get("time_s") or {}
    return anchor.value * 1e-6 / t["median"] if t.get("median") else None
