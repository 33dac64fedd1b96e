"""`python -m bench.model`: one DeepSeek-V3 layer, and the whole model, composed from the suite's ops and their
cost model (pykernels.hardware), on each GPU of pykernels.hardware.

What one GPU does in one step, with attention data-parallel (each GPU serves its own `batch` sequences with all
128 heads) and the routed experts spread over `ep` GPUs:

- attention, decode: FP8 GEMMs q_a, kv_a, q_b; the absorbed up-projections as FP8 GEMMs grouped over the 128
  heads (q_nope x W_UK, 128 -> 512, before; out x W_UV, 512 -> 128, after); MLA decode over a paged BF16 latent
  cache of `context` tokens (s_q = 1 + mtp query tokens per sequence); o_proj. Each GEMM's activation is
  quantized per 128 channels first.
- attention, prefill (`batch` prompts of `context` tokens): q_a, kv_a, q_b; kv_b (the latent expanded to
  per-head keys and values, 512 -> 128 x 256); causal attention over 128 heads (q·k 192, v 128 wide) in BF16,
  for which the suite has no kernel (roofline only); o_proj.
- MoE layer: the router (BF16 GEMM to 256 logits), the FP8 quantization of its input (shared by the dispatch and
  the shared expert), dispatch (FP8) to the `ep` ranks, permute into the grouped GEMM's layout, the grouped FP8
  GEMMs gate/up (7168 -> 2 x 2048) and down (2048 -> 7168), masked in decode and contiguous in prefill, with
  SiLU·up and the quantization of its output between them, unpermute (the weighted sum per token), combine
  (BF16); the shared expert as plain FP8 GEMMs. With --ep 1 there is no dispatch and no combine.
- the first 3 layers are dense (an 18432-wide MLP in place of the MoE); the step ends with the LM head (BF16,
  vocab 129280), over every token in decode and the last token of each prompt in prefill.

Left out: embeddings, RMSNorms, RoPE, the KV-cache write, residual adds, top-k selection, the multi-token
prediction module's own layer (--mtp 1 only makes s_q 2), sampling. Ops run one after another: nothing
overlaps (serving systems overlap communication with compute, so the sum is an upper bound for a given set of
per-op times). Routing is uniform at random (DeepSeek-V3's node-limited routing sends tokens to fewer ranks).
EP above 8 spans nodes of 8 GPUs, one 400 Gb/s RDMA NIC per GPU (50 GB/s each way, DeepEP's test systems); a
token goes once to each other node it needs (over RDMA to the GPU of the same index) and is forwarded over
NVLink to the GPUs it targets there.

Each op's time is its roofline on the GPU's datasheet peaks (pure roofline, labelled so), or, with --results,
the roofline divided by the fraction of roofline a measurement of that op reached (from the kernel time; the
measured shape nearest in arithmetic intensity, or in bytes moved for ops without tensor math; the same GPU
preferred, else another GPU's fraction carried over). Tokens per second count query tokens
processed (with --mtp 1, two per sequence per step; accepted tokens depend on the draft acceptance rate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pykernels import hardware


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 7168
    layers: int = 61
    dense_layers: int = 3
    routed_experts: int = 256
    topk: int = 8
    shared_experts: int = 1
    moe_intermediate: int = 2048
    dense_intermediate: int = 18432
    q_lora: int = 1536
    kv_lora: int = 512
    heads: int = 128
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    vocab: int = 129280

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers


DEEPSEEK_V3 = ModelConfig()
GPUS_PER_NODE = 8
RDMA_GBPS = 50.0     # per GPU, one direction: a ConnectX-7 400 Gb/s NIC per GPU
PHASES = ("decode", "prefill")
DEFAULT_BATCH = {"decode": 64, "prefill": 4}  # sequences per GPU: 64 decoding, 4 prompts of --context tokens

# The chart's stacking order and colours: each component belongs to one group.
GROUPS = {"attention GEMMs": "#1f77b4", "attention core": "#aec7e8", "quant + SiLU": "#c7c7c7",
          "router": "#8c564b", "dispatch + combine": "#d62728", "permute + unpermute": "#ff9896",
          "expert GEMMs": "#2ca02c", "shared expert": "#98df8a", "dense MLP": "#9467bd"}


@dataclass(frozen=True)
class Op:
    """One component of a layer: its cost and what it is."""
    name: str
    group: str
    kind: str | None     # the bench op whose measurements scale it (bench/cases.py OPS); None: no suite kernel
    cost: hardware.Cost
    dtype: str = "fp8"   # tensor math for the roofline
    rdma_bytes: float = 0.0


@dataclass
class Timed:
    op: Op
    seconds: float
    bound: str
    source: str          # "roofline" or how a measurement scaled it


@dataclass
class Phase:
    """One phase of one configuration: the ops of a MoE layer, a dense layer and the head."""
    name: str
    batch: int
    s_q: int
    context: int
    ep: int
    tokens: int                                  # tokens per GPU per step
    moe_layer: list = field(default_factory=list)
    dense_layer: list = field(default_factory=list)
    head: list = field(default_factory=list)


# ---- costs the suite's cost model has no entry for ----

def _bf16_gemm_cost(m: float, n: int, k: int, out_bytes: int = 2) -> hardware.Cost:
    """A BF16 GEMM reading its operands once: [m, k] @ [k, n] -> [m, n]."""
    return hardware.Cost(2.0 * m * n * k, float(2 * m * k + 2 * n * k + out_bytes * m * n), 0.0)


def silu_mul_quant_cost(rows: float, intermediate: int) -> hardware.Cost:
    """SiLU(gate) * up over [rows, 2 x intermediate] bf16, written as FP8 with one float32 scale per 128."""
    scales = 4 * math.ceil(intermediate / hardware.SCALE_BLOCK)
    return hardware.Cost(0.0, float(rows * (2 * intermediate * 2 + intermediate + scales)), 0.0)


def prefill_attention_cost(cfg: ModelConfig, batch: int, length: int) -> hardware.Cost:
    """Causal attention over `batch` prompts of `length` tokens, all heads: FLOPs of QK^T and PV over the
    length·(length+1)/2 visible (query, key) pairs; bytes: q, k, v read once, the output written once (bf16)."""
    qk = cfg.qk_nope + cfg.qk_rope
    pairs = batch * length * (length + 1) / 2
    flops = 2.0 * cfg.heads * pairs * (qk + cfg.v_head)
    tokens = batch * length
    hbm = 2 * tokens * cfg.heads * (2 * qk + 2 * cfg.v_head)
    return hardware.Cost(flops, float(hbm), 0.0)


def active_experts(local: int, num_experts: int, topk: int, tokens_routed: float) -> float:
    """Expected number of a rank's `local` experts that receive at least one of `tokens_routed` tokens, each
    picking topk distinct experts of num_experts uniformly: an expert is missed by one token with probability
    1 - topk/num_experts."""
    return local * (1.0 - (1.0 - topk / num_experts) ** tokens_routed)


def ep_comm_cost(op: str, cfg: ModelConfig, tokens: int, ep: int) -> tuple[hardware.Cost, float]:
    """(cost with NVLink bytes, RDMA bytes) of one rank's dispatch or combine. Up to 8 ranks: one node, every
    remote row over NVLink (pykernels.hardware.cost). Beyond: rows for other nodes cross RDMA once per
    destination node and are forwarded over NVLink to every target GPU there but the receiving one."""
    dtype = "fp8" if op == "moe_dispatch" else "bf16"
    c = hardware.cost(op, tokens=tokens, hidden=cfg.hidden, topk=cfg.topk, num_experts=cfg.routed_experts,
                      world=ep, dtype=dtype)
    if ep <= GPUS_PER_NODE:
        return c, 0.0
    row = hardware.dispatch_row_bytes(cfg.hidden, dtype)
    nodes = ep // GPUS_PER_NODE
    remote_rows = c.link_bytes / row
    other_nodes = (ep - GPUS_PER_NODE) / (ep - 1)
    nvlink_rows = remote_rows * (1 - other_nodes) + remote_rows * other_nodes * (GPUS_PER_NODE - 1) / GPUS_PER_NODE
    rdma_rows = tokens * hardware.occupied_ranks_per_token(cfg.topk, cfg.routed_experts, nodes) * (nodes - 1) / nodes
    return hardware.Cost(c.flops, c.hbm_bytes, nvlink_rows * row), rdma_rows * row


# ---- the layers ----

def _quant(name, group, m, k) -> Op:
    return Op(name, group, "per_token_group_quant_fp8", hardware.cost("per_token_group_quant_fp8", m=m, k=k), "bf16")


def _gemm(name, group, m, n, k) -> Op:
    return Op(name, group, "fp8_gemm_nt", hardware.cost("fp8_gemm", m=m, n=n, k=k))


def attention_ops(cfg: ModelConfig, phase: str, batch: int, s_q: int, context: int) -> list[Op]:
    g, q = "attention GEMMs", "quant + SiLU"
    h, heads = cfg.hidden, cfg.heads
    qk = cfg.qk_nope + cfg.qk_rope
    t = batch * s_q if phase == "decode" else batch * context
    ops = [_quant("attn input quant", q, t, h),
           _gemm("q_a_proj", g, t, cfg.q_lora, h),
           _gemm("kv_a_proj", g, t, cfg.kv_lora + cfg.qk_rope, h),
           _quant("q_b input quant", q, t, cfg.q_lora),
           _gemm("q_b_proj", g, t, heads * qk, cfg.q_lora)]
    if phase == "decode":
        per_head = [t] * heads
        ops += [_quant("k_up input quant", q, t * heads, cfg.qk_nope),
                Op("k_up (absorbed)", g, "m_grouped_fp8_gemm_nt_masked",
                   hardware.cost("fp8_gemm_masked", masked_m=per_head, n=cfg.kv_lora, k=cfg.qk_nope)),
                Op("mla_decode", "attention core", "mla_decode",
                   hardware.cost("mla_decode", batch=batch, s_q=s_q, h_q=heads, seqlen=context, kv_dtype="bf16"),
                   "bf16"),
                _quant("v_up input quant", q, t * heads, cfg.kv_lora),
                Op("v_up (absorbed)", g, "m_grouped_fp8_gemm_nt_masked",
                   hardware.cost("fp8_gemm_masked", masked_m=per_head, n=cfg.v_head, k=cfg.kv_lora))]
    else:
        ops += [_quant("kv_b input quant", q, t, cfg.kv_lora),
                _gemm("kv_b_proj", g, t, heads * (cfg.qk_nope + cfg.v_head), cfg.kv_lora),
                Op("attention (prefill)", "attention core", None, prefill_attention_cost(cfg, batch, context),
                   "bf16")]
    ops += [_quant("o_proj input quant", q, t, heads * cfg.v_head),
            _gemm("o_proj", g, t, h, heads * cfg.v_head)]
    return ops


def moe_ops(cfg: ModelConfig, phase: str, tokens: int, ep: int) -> list[Op]:
    h, e, k, inter = cfg.hidden, cfg.routed_experts, cfg.topk, cfg.moe_intermediate
    local = e // ep
    received = tokens * hardware.occupied_ranks_per_token(k, e, ep)   # rows per rank, by symmetry
    pairs = tokens * k                                                # (token, expert) pairs per rank
    groups = active_experts(local, e, k, tokens * ep)
    layout = "m_grouped_fp8_gemm_nt_masked" if phase == "decode" else "m_grouped_fp8_gemm_nt_contiguous"
    ops = [Op("router", "router", None, _bf16_gemm_cost(tokens, e, h, out_bytes=4), "bf16"),
           _quant("moe input quant", "quant + SiLU", tokens, h)]
    if ep > 1:
        c, rdma = ep_comm_cost("moe_dispatch", cfg, tokens, ep)
        ops.append(Op("dispatch", "dispatch + combine", "moe_dispatch", c, "bf16", rdma))
    ops += [Op("permute", "permute + unpermute", "moe_permute",
               hardware.cost("moe_permute", rows=received, pairs=pairs, hidden=h, dtype="fp8"), "bf16"),
            Op("expert gate/up", "expert GEMMs", layout,
               hardware.expected_grouped_gemm_cost(pairs, groups, 2 * inter, h)),
            Op("expert SiLU+quant", "quant + SiLU", None, silu_mul_quant_cost(pairs, inter), "bf16"),
            Op("expert down", "expert GEMMs", layout, hardware.expected_grouped_gemm_cost(pairs, groups, h, inter)),
            Op("unpermute", "permute + unpermute", "moe_unpermute",
               hardware.cost("moe_unpermute", rows=received, pairs=pairs, hidden=h), "bf16")]
    if ep > 1:
        c, rdma = ep_comm_cost("moe_combine", cfg, tokens, ep)
        ops.append(Op("combine", "dispatch + combine", "moe_combine", c, "bf16", rdma))
    s = "shared expert"
    width = cfg.shared_experts * inter
    ops += [_gemm("shared gate/up", s, tokens, 2 * width, h),
            Op("shared SiLU+quant", s, None, silu_mul_quant_cost(tokens, width), "bf16"),
            _gemm("shared down", s, tokens, h, width)]
    return ops


def dense_mlp_ops(cfg: ModelConfig, tokens: int) -> list[Op]:
    g, inter = "dense MLP", cfg.dense_intermediate
    return [_quant("mlp input quant", g, tokens, cfg.hidden),
            _gemm("dense gate/up", g, tokens, 2 * inter, cfg.hidden),
            Op("dense SiLU+quant", g, None, silu_mul_quant_cost(tokens, inter), "bf16"),
            _gemm("dense down", g, tokens, cfg.hidden, inter)]


def head_ops(cfg: ModelConfig, rows: int) -> list[Op]:
    return [Op("lm_head", "head", None, _bf16_gemm_cost(rows, cfg.vocab, cfg.hidden, out_bytes=4), "bf16")]


def compose(cfg: ModelConfig, phase: str, batch: int, context: int, mtp: int, ep: int) -> Phase:
    if phase not in PHASES:
        raise ValueError(f"--phase: expected one of {', '.join(PHASES)}, got {phase!r}")
    if cfg.routed_experts % ep or (ep > GPUS_PER_NODE and ep % GPUS_PER_NODE):
        raise ValueError(f"--ep: expected a divisor of {cfg.routed_experts}, a multiple of {GPUS_PER_NODE} above "
                         f"{GPUS_PER_NODE}, got {ep}")
    if batch < 1 or context < 1 or mtp not in (0, 1):
        raise ValueError(f"--batch, --context, --mtp: expected >= 1, >= 1, 0 or 1, got {batch}, {context}, {mtp}")
    s_q = 1 + mtp if phase == "decode" else 1
    tokens = batch * s_q if phase == "decode" else batch * context
    attn = attention_ops(cfg, phase, batch, s_q, context)
    return Phase(phase, batch, s_q, context, ep, tokens, attn + moe_ops(cfg, phase, tokens, ep),
                 attn + dense_mlp_ops(cfg, tokens), head_ops(cfg, tokens if phase == "decode" else batch))


# ---- times ----

def roofline(op: Op, gpu) -> tuple[float, str]:
    """The op's roofline time on `gpu` and its binding roof; RDMA is a fourth roof, for EP across nodes."""
    p = hardware.project(op.cost, gpu, op.dtype)
    rdma = op.rdma_bytes / (RDMA_GBPS * 1e9)
    return (rdma, "rdma") if rdma > p.seconds else (p.seconds, p.bound)


def _intensity(flops: float, hbm_bytes: float) -> float:
    return flops / hbm_bytes if flops else hbm_bytes


def measured_fractions(records: list) -> dict:
    """{op kind: [(gpu, intensity, fraction, label)]} from GPU measurements with a roofline fraction."""
    out = {}
    for r in records:
        if r.get("status") != "ok" or r.get("measured_on") != "gpu" or not r.get("roofline_fraction"):
            continue
        out.setdefault(r["op"], []).append((r["gpu"], _intensity(r["flops"] or 0.0, r["hbm_bytes"]),
                                            r["roofline_fraction"], f"{r['backend']} [{r['label']}]"))
    return out


def time_op(op: Op, gpu: hardware.GPU, fractions: dict) -> Timed:
    seconds, bound = roofline(op, gpu)
    found = fractions.get(op.kind) if op.kind else None
    if not found:
        return Timed(op, seconds, bound, "roofline")
    same = [f for f in found if f[0] == gpu.name] or found
    want = math.log(max(_intensity(op.cost.flops, op.cost.hbm_bytes), 1e-30))
    best = min(same, key=lambda f: (abs(math.log(max(f[1], 1e-30)) - want), -f[2]))
    where = "" if best[0] == gpu.name else f" on {best[0]}"
    return Timed(op, seconds / best[2], bound, f"roofline / {best[2]:.0%} measured{where}: {best[3]}")


def evaluate(ph: Phase, gpu, fractions: dict, cfg: ModelConfig = DEEPSEEK_V3) -> dict:
    """Times of one phase on one GPU: per component of a MoE layer, and the step totals."""
    gpu = hardware.get(gpu)
    layer = [time_op(op, gpu, fractions) for op in ph.moe_layer]
    dense = [time_op(op, gpu, fractions) for op in ph.dense_layer]
    head = [time_op(op, gpu, fractions) for op in ph.head]
    layer_s = sum(t.seconds for t in layer)
    dense_s = sum(t.seconds for t in dense)
    head_s = sum(t.seconds for t in head)
    step_s = cfg.dense_layers * dense_s + cfg.moe_layers * layer_s + head_s
    return {"gpu": gpu.name, "phase": ph.name, "batch": ph.batch, "s_q": ph.s_q, "context": ph.context, "ep": ph.ep,
            "tokens_per_step": ph.tokens, "layer_s": layer_s, "dense_layer_s": dense_s, "head_s": head_s,
            "step_s": step_s, "time_per_token_s": step_s / ph.tokens, "tokens_per_s": ph.tokens / step_s,
            "components": {t.op.name: t.seconds for t in layer},
            "groups": {t.op.name: t.op.group for t in layer},
            "bounds": {t.op.name: t.bound for t in layer},
            "sources": {t.op.name: t.source for t in layer + dense + head if t.source != "roofline"},
            "cost": {t.op.name: {"flops": t.op.cost.flops, "hbm_bytes": t.op.cost.hbm_bytes,
                                 "nvlink_bytes": t.op.cost.link_bytes, "rdma_bytes": t.op.rdma_bytes}
                     for t in layer}}


# ---- output ----

def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def table(res: dict, label: str) -> str:
    head = (f"{res['gpu']}, {res['phase']}: {res['batch']} sequences x s_q {res['s_q']}, context {res['context']}, "
            f"EP{res['ep']} ({label})")
    rows = [(name, _fmt_time(s), res["bounds"][name], f"{100 * s / res['layer_s']:.1f}%",
             "measured" if name in res["sources"] else "roofline")
            for name, s in res["components"].items()]
    widths = [max(len(r[i]) for r in rows + [("component", "time", "bound", "share", "from")]) for i in range(5)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 2, 4) else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [head, fmt.format("component", "time", "bound", "share", "from"), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in rows]
    lines += [f"  one MoE layer {_fmt_time(res['layer_s'])}, one dense layer {_fmt_time(res['dense_layer_s'])}, "
              f"LM head {_fmt_time(res['head_s'])}",
              f"  step (3 dense + 58 MoE layers + head) {_fmt_time(res['step_s'])} for {res['tokens_per_step']} "
              f"tokens: {_fmt_time(res['time_per_token_s'])} per token, {res['tokens_per_s']:,.0f} tokens/s per GPU"]
    return "\n".join(lines)


def summary(results: dict) -> str:
    """One line per GPU and phase: the totals side by side."""
    rows = [(gpu, phase, _fmt_time(r["layer_s"]), _fmt_time(r["step_s"]), _fmt_time(r["time_per_token_s"]),
             f"{r['tokens_per_s']:,.0f}") for gpu, per in results.items() for phase, r in per.items()]
    header = ("GPU", "phase", "MoE layer", "step", "per token", "tokens/s per GPU")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


def plot(results: dict, path: Path, title: str) -> Path:
    """Stacked bars: time of one MoE layer by component group, one bar per GPU, decode and prefill side by
    side; the labels over the bars give the layer time and tokens/s per GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in PHASES if any(p in per for per in results.values())]
    fig, axes = plt.subplots(1, len(phases), figsize=(6.2 * len(phases), 5.4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        gpus = [g for g in results if phase in results[g]]
        scale, unit = (1e6, "us") if max(results[g][phase]["layer_s"] for g in gpus) < 1e-2 else (1e3, "ms")
        bottoms = [0.0] * len(gpus)
        for group, colour in GROUPS.items():
            heights = [sum(s for n, s in results[g][phase]["components"].items()
                           if results[g][phase]["groups"][n] == group) * scale for g in gpus]
            if not any(heights):
                continue
            ax.bar(range(len(gpus)), heights, 0.62, bottom=bottoms, color=colour, label=group, edgecolor="white",
                   linewidth=0.5)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        top = max(bottoms)
        for i, g in enumerate(gpus):
            r = results[g][phase]
            ax.text(i, bottoms[i] + top * 0.015, f"{r['layer_s'] * scale:.0f} {unit}\n{r['tokens_per_s']:,.0f} tok/s",
                    ha="center", va="bottom", fontsize=8.5)
        r0 = results[gpus[0]][phase]
        what = (f"{r0['batch']} seqs x s_q {r0['s_q']}, KV {r0['context']}" if phase == "decode"
                else f"{r0['batch']} prompts x {r0['context']} tokens")
        ax.set_title(f"{phase}: {what}, EP{r0['ep']}", fontsize=10)
        ax.set_xticks(range(len(gpus)))
        ax.set_xticklabels(gpus, fontsize=9)
        ax.set_ylabel(f"one MoE layer, {unit} per step")
        ax.set_ylim(0, top * 1.18)
        ax.grid(True, axis="y", alpha=0.25)
        ax.set_axisbelow(True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = [labels.index(g) for g in GROUPS if g in labels][::-1]
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="center right", fontsize=8.5,
               frameon=False)
    fig.suptitle(title, fontsize=10.5)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--phase", choices=PHASES + ("both",), default="both")
    p.add_argument("--batch", type=int, help="sequences per GPU (default: 64 decoding, 4 prompts in prefill)")
    p.add_argument("--context", type=int, default=4096,
                   help="KV length in decode, prompt length in prefill (default: 4096)")
    p.add_argument("--mtp", type=int, choices=(0, 1), default=0, help="multi-token prediction: s_q = 1 + mtp")
    p.add_argument("--ep", type=int, default=8,
                   help="expert-parallel ranks (default: 8, one node; 1: no dispatch or combine)")
    p.add_argument("--gpus", default=",".join(hardware.COMPARISON),
                   help="comma-separated names of pykernels.hardware: " + ", ".join(list(hardware.GPUS)
                                                                                  + list(hardware.ALIASES)))
    p.add_argument("--results", metavar="FILE", help="measured records (python -m bench or pytest-benchmark JSON): "
                                                     "each op's measured fraction of roofline scales its time")
    p.add_argument("--out", default="results", help="directory for model.json and model.png (default: results/)")
    p.add_argument("--name", default="model", help="file name stem (default: model)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def run(args, cfg: ModelConfig = DEEPSEEK_V3) -> dict:
    gpus = [hardware.get(g.strip()).name for g in args.gpus.split(",") if g.strip()]
    fractions, label = {}, "pure roofline: datasheet peaks, no measurements"
    if args.results:
        from bench.roofline import load_records

        records, _ = load_records(args.results)
        fractions = measured_fractions(records)
        label = (f"roofline scaled by the fractions measured in {args.results} where an op has one" if fractions
                 else f"pure roofline: {args.results} holds no GPU measurement with a roofline fraction")
    phases = PHASES if args.phase == "both" else (args.phase,)
    out = {gpu: {} for gpu in gpus}
    for phase in phases:
        ph = compose(cfg, phase, args.batch or DEFAULT_BATCH[phase], args.context, args.mtp, args.ep)
        for gpu in gpus:
            out[gpu][phase] = evaluate(ph, gpu, fractions, cfg)
    return {"model": "DeepSeek-V3", "config": cfg.__dict__, "label": label, "results_file": args.results,
            "options": {k: v for k, v in vars(args).items()}, "rdma_gbps": RDMA_GBPS, "results": out}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        doc = run(args)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    for gpu, per in doc["results"].items():
        for res in per.values():
            print(table(res, doc["label"]))
            print()
    print(summary(doc["results"]))
    print()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    if not args.no_plot:
        title = f"DeepSeek-V3, one MoE layer per GPU by component ({doc['label']})"
        print(f"wrote {plot(doc['results'], out / f'{args.name}.png', title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
