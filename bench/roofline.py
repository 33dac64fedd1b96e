"""Roofline plots from results files.

    python bench/roofline.py results/*.json -o results/

Per GPU present in the data: a log-log roofline (FP8 and BF16 tensor roofs, the HBM slope) with every GPU
measurement as a point coloured by op and marked by backend, beside a bandwidth panel for ops that do no
tensor math (quantizers, permutes, MoE communication) against the HBM and NVLink roofs. Then the cross-GPU
chart: roofline time of DeepSeek-V3 cases on H100 / H800 / H20 / H200, with measured times and the
projections scaled from them. CPU figures and projections never appear on a GPU roofline.
Accepts `python -m bench` documents and pytest-benchmark JSON written by `pytest bench/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pykernels import hardware  # noqa: E402
from bench import projection  # noqa: E402

GPU_COLORS = {"H100 SXM5": "#1f77b4", "H800 SXM5": "#ff7f0e", "H20": "#d62728", "H200 SXM": "#2ca02c"}
BACKEND_MARKERS = {"cuda": "o", "triton": "s", "torch": "v", "torch-sdpa": "<", "torch-scaled-mm": ">", "torch-dequant-mm": "^",
                   "deep_gemm": "D", "flash_mla": "D", "deep_ep": "D", "flashinfer": "P", "vllm-triton": "X"}
# The cases the cross-GPU chart shows: one or two per regime, so it stays readable.
CHART_CASES = [
    ("fp8_gemm_nt", "M=4096 N=7168 K=16384", "fp8"),
    ("fp8_gemm_nt", "M=64 N=7168 K=16384", "fp8"),
    ("m_grouped_fp8_gemm_nt_contiguous", "4x8192 N=4096 K=7168", "fp8"),
    ("m_grouped_fp8_gemm_nt_masked", "4x256/256 N=4096 K=7168", "fp8"),
    ("mla_decode", "b=128 s_k=8192 h_q=16 s_q=1", "bf16 cache"),
    ("mla_decode", "b=128 s_k=8192 h_q=16 s_q=1", "fp8 cache"),
    ("mla_decode", "b=128 s_k=8192 h_q=128 s_q=2", "bf16 cache"),
    ("per_token_group_quant_fp8", "M=4096 K=7168", "bf16->fp8"),
    ("moe_permute", "T=4096 H=7168 top8/256 local=32", "bf16"),
    ("moe_dispatch", "T=4096 H=7168 top8/256 EP8", "fp8"),
    ("moe_combine", "T=4096 H=7168 top8/256 EP8", "bf16"),
]


def load_records(path) -> tuple[list, str]:
    """(records, device description) from a bench document or a pytest-benchmark file."""
    doc = json.loads(Path(path).read_text())
    if "records" in doc:
        return doc["records"], doc.get("device", {}).get("name", "?")
    if "benchmarks" in doc:  # pytest-benchmark: the record rides in extra_info
        recs = [b["extra_info"] for b in doc["benchmarks"] if "op" in b.get("extra_info", {})]
        return recs, doc.get("machine_info", {}).get("gpu", {}).get("name", "?")
    raise ValueError(f"{path}: neither a `python -m bench` document nor pytest-benchmark JSON")


def _rooflines(ax, gpu: hardware.GPU, x):
    bw = gpu.hbm_bytes_per_s
    for dtype, style in (("fp8", "-"), ("bf16", "--")):
        peak = gpu.peak_flops(dtype)
        ax.plot(x, np.minimum(peak, x * bw) / 1e12, style, color="0.25", lw=1.6)
        ridge = peak / bw
        above = dtype == "fp8"  # the BF16 label goes under its roof, clear of the FP8 GEMM points above it
        ax.text(ridge * 1.15, peak / 1e12 * (1.1 if above else 0.88), f"{dtype.upper()} {peak / 1e12:.0f} TFLOPS "
                f"(ridge {ridge:.0f} FLOP/B)", ha="left", va="bottom" if above else "top", fontsize=8, color="0.25")
    ax.text(x[0] * 1.5, x[0] * 1.5 * bw / 1e12 * 1.35, f"HBM {gpu.hbm_tbps:g} TB/s", fontsize=8, color="0.25",
            ha="left", va="bottom")


def _legend_for(ax, ops, backends, op_colors):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=op_colors[o], label=o) for o in ops]
    handles += [Line2D([], [], ls="", marker=BACKEND_MARKERS.get(b, "o"), color="0.3", mfc="none", label=b)
                for b in backends]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.9)


def plot_gpu(records: list, gpu: hardware.GPU, path: Path) -> Path:
    ops = sorted({r["op"] for r in records})
    cmap = plt.get_cmap("tab10")
    op_colors = {o: cmap(i % 10) for i, o in enumerate(ops)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    tensor = [r for r in records if r["flops"]]
    streams = [r for r in records if not r["flops"]]
    intensities = [r["flops"] / r["hbm_bytes"] for r in tensor] or [1.0]
    x = np.logspace(np.log10(min(0.5, min(intensities) / 2)), np.log10(max(2e4, max(intensities) * 10)), 200)
    _rooflines(ax, gpu, x)
    for r in tensor:
        point = (r["flops"] / r["hbm_bytes"], r["flops"] / r["time_s"]["median"] / 1e12)
        ax.plot(*point, BACKEND_MARKERS.get(r["backend"], "o"), color=op_colors[r["op"]], ms=7, mec="k", mew=0.5,
                alpha=0.85)
        if len(tensor) <= 16:
            ax.annotate(f"{r['op']}/{r['backend']} [{r['label']}]", point, fontsize=6, xytext=(6, -2),
                        textcoords="offset points", va="center")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs per HBM byte, compulsory traffic)",
           ylabel="achieved TFLOPS", title=f"{gpu.name}: tensor-core ops")
    ax.set_ylim(bottom=min([0.5] + [r["flops"] / r["time_s"]["median"] / 1e12 / 2 for r in tensor]),
                top=gpu.fp8_tflops * 2)
    ax.grid(True, which="both", alpha=0.25)
    _legend_for(ax, sorted({r["op"] for r in tensor}), sorted({r["backend"] for r in tensor}), op_colors)

    sizes = [r["link_bytes"] or r["hbm_bytes"] for r in streams] or [1e6, 1e9]
    span = [min(sizes) / 3, max(sizes) * 30]
    bx.axhline(gpu.hbm_tbps * 1e3, color="0.25", lw=1.6)
    bx.text(span[0], gpu.hbm_tbps * 1e3 * 1.06, f"HBM {gpu.hbm_tbps:g} TB/s", fontsize=8, color="0.25")
    bx.axhline(gpu.nvlink_gbps, color="0.25", lw=1.6, ls=":")
    bx.text(span[0], gpu.nvlink_gbps * 1.06, f"NVLink {gpu.nvlink_gbps:g} GB/s per direction", fontsize=8,
            color="0.25")
    for r in streams:
        t = r["time_s"]["median"]
        over_link = bool(r["link_bytes"])
        moved = r["link_bytes"] if over_link else r["hbm_bytes"]
        bx.plot(moved, moved / t / 1e9, BACKEND_MARKERS.get(r["backend"], "o"), color=op_colors[r["op"]], ms=7,
                mec=op_colors[r["op"]] if over_link else "k", mew=1.5 if over_link else 0.5, alpha=0.85,
                mfc="none" if over_link else op_colors[r["op"]])
        if len(streams) <= 16:
            bx.annotate(f"{r['op']}/{r['backend']} [{r['label']}]", (moved, moved / t / 1e9), fontsize=6,
                        xytext=(6, -2), textcoords="offset points", va="center")
    bx.set(xscale="log", yscale="log", xlim=span, xlabel="bytes moved per call (HBM; hollow: NVLink bytes on the wire)",
           ylabel="achieved GB/s", title=f"{gpu.name}: bandwidth-bound and communication ops")
    bx.set_ylim(bottom=min([10.0] + [(max(r["link_bytes"] or 0, 0) or r["hbm_bytes"]) / r["time_s"]["median"] / 1e9 / 2
                                      for r in streams]), top=gpu.hbm_tbps * 1e3 * 2)
    bx.grid(True, which="both", alpha=0.25)
    bx.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    _legend_for(bx, sorted({r["op"] for r in streams}), sorted({r["backend"] for r in streams}), op_colors)
    if not streams:
        bx.text(0.5, 0.5, "no bandwidth-bound measurements", transform=bx.transAxes, ha="center", color="0.4")
    fig.suptitle(f"Roofline, {gpu.name} (dense datasheet peaks; points = median of timed runs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_comparison(records: list, path: Path) -> Path:
    """Horizontal bars: roofline time per GPU for the chosen DeepSeek-V3 cases, with the binding roof and
    the slow-down against H100; measured times (filled) and projections scaled from them (hollow)."""
    proj = {}
    for r in records:
        if r["measured_on"] == "projection" and r["backend"] == "roofline":
            proj[(r["op"], r["label"], r["gpu"], r["dtype"])] = r
    chosen = [(op, label, d) for op, label, d in CHART_CASES if (op, label, "H100 SXM5", d) in proj]
    if not chosen:
        chosen = list(dict.fromkeys((o, lab, d) for (o, lab, _, d) in proj))[:10]
    gpus = hardware.COMPARISON
    fig, ax = plt.subplots(figsize=(12, 0.24 * len(chosen) * len(gpus) + 1.6))
    height = 0.8 / len(gpus)
    for i, (op, label, dtype) in enumerate(chosen):
        base = proj[(op, label, "H100 SXM5", dtype)]["time_s"]["median"]
        for j, g in enumerate(gpus):
            r = proj.get((op, label, g, dtype))
            if r is None:
                continue
            y = i + (j - (len(gpus) - 1) / 2) * height
            t = r["time_s"]["median"] * 1e6
            ax.barh(y, t, height=height * 0.92, color=GPU_COLORS[g], label=g if i == 0 else None)
            ends = [t]
            for m in records:
                if (m["op"], m["label"], m["dtype"], m.get("gpu")) != (op, label, dtype, g) or m["status"] != "ok":
                    continue
                if m["measured_on"] == "gpu":
                    ax.plot(m["time_s"]["median"] * 1e6, y, "o", color="k", ms=5)
                elif m["measured_on"] == "projection" and m["backend"] != "roofline":
                    ax.plot(m["time_s"]["median"] * 1e6, y, "D", mfc="none", mec="k", ms=5)
                else:
                    continue
                ends.append(m["time_s"]["median"] * 1e6)
            ax.text(max(ends) * 1.12, y, f"{t / (base * 1e6):.2f}x  {r['bound']}", va="center", fontsize=7)
    ax.set_yticks(range(len(chosen)))
    ax.set_yticklabels([f"{op}\n{label} ({dtype})" for op, label, dtype in chosen], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time per call, microseconds (log): bars = roofline at datasheet peaks")
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker="o", color="k", label="measured"),
                Line2D([], [], ls="", marker="D", mfc="none", mec="k", label="projected from a measurement")]
    ax.legend(handles=handles, fontsize=8, loc="lower right", framealpha=0.9)
    xmin, xmax = ax.get_xlim()
    ax.set_xlim(xmin, xmax * 4)
    ax.grid(True, axis="x", which="both", alpha=0.25)
    ax.set_title("DeepSeek-V3 shapes across Hopper parts (EP8 for MoE): labels give time relative to H100 SXM5 "
                 "and the binding roof", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def plot_records(records: list, out: Path, sources: str) -> list:
    """Writes the PNGs; returns human-readable lines saying what was drawn and what was not, and why."""
    out.mkdir(parents=True, exist_ok=True)
    messages = []
    ok = [r for r in records if r.get("status") == "ok"]
    gpu_recs = [r for r in ok if r["measured_on"] == "gpu" and r.get("gpu")]
    unknown = [r for r in ok if r["measured_on"] == "gpu" and not r.get("gpu")]
    if unknown:
        messages.append(f"{len(unknown)} GPU measurements come from a GPU with no spec row (see the device's "
                        f"detection field; --gpu names it): no roofline drawn for them")
    for name in sorted({r["gpu"] for r in gpu_recs}):
        path = plot_gpu([r for r in gpu_recs if r["gpu"] == name], hardware.get(name),
                        out / f"roofline-{_slug(name)}.png")
        messages.append(f"wrote {path}")
    if not gpu_recs:
        cpu = sum(1 for r in ok if r["measured_on"] == "cpu")
        messages.append(f"No GPU measurements in {sources}" + (f" ({cpu} CPU records)" if cpu else "")
                        + ": CPU and interpreter figures are never drawn on a GPU roofline, so no roofline "
                          "plot; drawing the cross-GPU projection chart only.")
    if not any(r["measured_on"] == "projection" and r["backend"] == "roofline" for r in ok):
        ok = ok + projection.projection_records([])
    messages.append(f"wrote {plot_comparison(ok, out / 'cross-gpu.png')}")
    return messages


def plot_documents(docs: list, out: Path) -> list:
    records = [r for d in docs for r in d["records"]]
    return plot_records(records, Path(out), f"{len(docs)} results document(s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Example: python bench/roofline.py results/*.json -o results/")
    p.add_argument("files", nargs="*", help="results JSON files (python -m bench or pytest-benchmark)")
    p.add_argument("-o", "--out", default="results", help="directory for the PNGs (default: results/)")
    args = p.parse_args(argv)
    records = []
    for f in args.files:
        try:
            recs, _ = load_records(f)
        except (OSError, ValueError) as exc:
            print(f"skipping {f}: {exc}")
            continue
        records += recs
    if not args.files:
        print("No results files given: drawing the analytic cross-GPU projection only.")
    for line in plot_records(records, Path(args.out), f"{len(args.files)} file(s)"):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
