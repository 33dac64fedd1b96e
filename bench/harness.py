"""`python -m bench`: run every available (op, backend) pair of a shape set, write results/<name>.json and
plots, print the table, the cross-GPU projection and (with --compare) the speed-ups against an earlier run."""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from pathlib import Path

import torch

from pykernels import hardware
from bench import cases as C
from bench import anchors, projection, results, roofline, shapes, timing

GPU_RUNS = {"warmup": 5, "rep": 30}
GPU_QUICK = {"warmup": 2, "rep": 8}
CPU_RUNS = {"warmup": 1, "rep": 10}
CPU_QUICK = {"warmup": 1, "rep": 3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--ops", help="comma-separated op names or prefixes (default: all); one of "
                                 + ", ".join(C.OPS))
    p.add_argument("--backends", help="comma-separated backends (default: all available); one of "
                                      + ", ".join(C.ALL_BACKENDS))
    p.add_argument("--shapes", choices=sorted(shapes.SHAPE_SETS),
                   help="shape set (default: deepseek-v3 on a GPU, smoke on a CPU)")
    p.add_argument("--out", default="results", help="directory for the JSON file and plots (default: results/)")
    p.add_argument("--name", help="results file name without .json (default: <device>-<shapes>)")
    p.add_argument("--compare", metavar="FILE", help="an earlier results JSON: print speed-ups against it")
    p.add_argument("--quick", action="store_true", help="fewer warm-up and timed runs")
    p.add_argument("--interpret", action="store_true",
                   help="on a CPU, also run the Triton backend through the Triton interpreter (slow)")
    p.add_argument("--gpu", help="which spec row this GPU is, when detection cannot tell (also $PYKERNELS_GPU): "
                                 + ", ".join(list(hardware.GPUS) + list(hardware.ALIASES)))
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return p.parse_args(argv)


def process_group(device: torch.device):
    """(group, None) for the running torch.distributed job, or a one-rank group made here (gloo on a CPU,
    NCCL on a GPU); (None, reason) when neither is possible."""
    import torch.distributed as dist

    if not dist.is_available():
        return None, "torch.distributed is not available in this torch build"
    if dist.is_initialized():
        return dist.group.WORLD, None
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:  # launched by torchrun
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    except Exception as exc:  # NCCL or gloo may be missing or unable to bind
        return None, f"could not make a {backend} process group: {exc}"
    return dist.group.WORLD, None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def measured_record(case: C.Case, backend: str, prep: C.Prepared, run: dict, measured_on: str,
                    gpu: hardware.GPU | None, device_name: str | None = None) -> dict:
    """A record from a timer's result: `samples` (eager calls), and from a GPU `kernel_samples` with
    `kernel_method`, `launches`; `syncs` from either. Derived figures use the kernel time where there is one."""
    call = timing.summarize(run["samples"])
    kernel = timing.summarize(run["kernel_samples"]) if run.get("kernel_samples") else None
    stats = dict(kernel or call)
    t = stats["median"]
    stats["discarded_throttled"] = run.get("discarded_throttled", 0)
    if "sm_clock_mhz" in run:
        stats["sm_clock_mhz"] = run["sm_clock_mhz"]
    cost = prep.cost
    fields = dict(op=case.op, backend=backend, shape=case.shape, label=case.label, dtype=case.dtype, status="ok",
                  measured_on=measured_on, device=device_name or measured_on, gpu=gpu.name if gpu else None,
                  time_s=stats, kernel_s=kernel, call_s=call,
                  kernel_method=run.get("kernel_method") if kernel else None,
                  host_overhead_s=call["median"] - kernel["median"] if kernel else None,
                  launches_per_call=run.get("launches"), syncs_per_call=run.get("syncs"), flops=cost.flops,
                  hbm_bytes=cost.hbm_bytes, link_bytes=cost.link_bytes,
                  tflops=cost.flops / t / 1e12 if cost.flops else None, gbps=cost.hbm_bytes / t / 1e9,
                  link_gbps=cost.link_bytes / t / 1e9 if cost.link_bytes else None,
                  logical_gbps=prep.extra["logical_bytes"] / t / 1e9 if "logical_bytes" in prep.extra else None)
    notes = []
    if stats["discarded_throttled"]:
        notes.append(f"{stats['discarded_throttled']} throttled runs discarded")
    if run.get("kernel_note"):
        notes.append(run["kernel_note"])
    if backend == "cuda" and prep.extra.get("cuda_config"):
        notes.append(prep.extra["cuda_config"])
    if measured_on == "gpu" and kernel is None:
        notes.append("no kernel time: figures use the eager call time")
    if gpu is not None:
        proj = hardware.project(cost, gpu, case.math_dtype)
        fields.update(roofline_s=proj.seconds, roofline_fraction=proj.seconds / t, bound=proj.bound)
    elif measured_on == "cpu":
        notes.append("CPU figure: not comparable with any GPU roofline")
    else:
        notes.append("GPU without a spec row (see device.detection; --gpu names it): no roofline")
    fields["note"] = "; ".join(notes) or None
    return results.record(**fields)


def status_record(case: C.Case, backend: str, status: str, reason: str, measured_on: str,
                  device_name: str | None = None) -> dict:
    return results.record(op=case.op, backend=backend, shape=case.shape, label=case.label, dtype=case.dtype,
                          status=status, reason=reason, measured_on=measured_on, device=device_name or measured_on)


def run(args) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    shape_name = args.shapes or ("deepseek-v3" if device.type == "cuda" else "smoke")
    dev = results.device_block(device, args.gpu)
    gpu = hardware.get(dev["gpu"]) if dev.get("gpu") else None
    measured_on = "gpu" if device.type == "cuda" else "cpu"
    device_name = dev["name"] if measured_on == "gpu" else "cpu"
    if measured_on == "gpu" and gpu is None:
        print(f"Which GPU is this? {dev['detection']}. Measurements are kept without a roofline; rerun with "
              f"--gpu NAME (or {hardware.GPU_ENV}=NAME) to get one.", file=sys.stderr)
    group, group_reason = process_group(device)
    world = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    todo = C.cases_for(shapes.shape_set(shape_name), world)
    if args.ops:
        wanted = [w.strip() for w in args.ops.split(",") if w.strip()]
        todo = [c for c in todo if any(c.op == w or c.op.startswith(w) for w in wanted)]
    backends = list(C.ALL_BACKENDS)
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = set(backends) - set(C.ALL_BACKENDS)
        if unknown:
            raise SystemExit(f"--backends: expected names from {', '.join(C.ALL_BACKENDS)}, got {sorted(unknown)}")
    if device.type == "cuda":
        runs, timer = (GPU_QUICK if args.quick else GPU_RUNS), timing.GpuTimer(device)
    else:
        runs, timer = (CPU_QUICK if args.quick else CPU_RUNS), timing.CpuTimer(0.1 if args.quick else 0.25)
    name = args.name or f"{_slug(dev['gpu'] or dev['name'] if measured_on == 'gpu' else 'cpu')}-{shape_name}"
    doc = results.new_document(name, dev, shape_name, {k: v for k, v in vars(args).items()})
    if group is not None and world > 1:
        doc["device"]["world"] = world

    from tqdm import tqdm

    bar = tqdm(total=sum(len([b for b in backends if b in C.OWN_BACKENDS or b in C.OPS[c.op][2]]) for c in todo),
               desc="bench", unit="run", disable=rank != 0, file=sys.stderr, dynamic_ncols=True)
    for case in todo:
        names = [b for b in backends if b in C.OWN_BACKENDS or b in C.OPS[case.op][2]]
        torch.manual_seed(0)
        try:
            prep = C.prepare(case, device, group if group is not None else None)
        except C.Skip as exc:
            reason = str(exc) if group is not None or case.op not in ("moe_dispatch", "moe_combine") \
                else f"{exc} ({group_reason})"
            doc["records"] += [status_record(case, b, "skipped", reason, measured_on, device_name) for b in names]
            bar.update(len(names))
            continue
        except Exception as exc:  # a broken op must not stop the other cases
            doc["records"] += [status_record(case, b, "failed", f"inputs: {type(exc).__name__}: {exc}", measured_on,
                                             device_name)
                               for b in names]
            bar.update(len(names))
            continue
        for backend in names:
            bar.set_description(f"{case.op} [{case.label}] {backend}")
            try:
                fn = prep.make(backend)
                timed = timer(fn, **runs, not_capturable=C.capture_blocker(case.op, backend))
                doc["records"].append(measured_record(case, backend, prep, timed, measured_on, gpu,
                                                      device_name))
            except C.Skip as exc:
                doc["records"].append(status_record(case, backend, "skipped", str(exc), measured_on, device_name))
            except Exception as exc:
                doc["records"].append(status_record(case, backend, "failed", f"{type(exc).__name__}: {exc}",
                                                    measured_on, device_name))
            bar.update(1)
        del prep
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    doc["records"] += projection.projection_records(doc["records"])
    return doc


# ---- reporting ----

def _fmt_time(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([line.format(*header), line.format(*["-" * w for w in widths])]
                     + [line.format(*map(str, r)) for r in rows])


def _host_cell(r) -> str:
    """Host work per call: what the eager call adds to the kernel time, kernel launches (L), host syncs (S)."""
    parts = []
    if r["host_overhead_s"] is not None:
        parts.append(f"+{_fmt_time(r['host_overhead_s'])}" if r["host_overhead_s"] >= 0
                     else f"-{_fmt_time(-r['host_overhead_s'])}")
    if r["launches_per_call"] is not None:
        parts.append(f"{r['launches_per_call']:g}L")
    if r["syncs_per_call"] is not None:
        parts.append(f"{r['syncs_per_call']}S")
    return " ".join(parts) or "-"


def _anchor_cell(r) -> str:
    found = anchors.lookup(r["op"], r["shape"])
    if found is None:
        return "-"
    rel = anchors.ratio(found, r) if r["measured_on"] == "gpu" else None
    return found.text() + (f" ({rel:.2f}x)" if rel is not None else "")


def measured_table(doc: dict) -> str:
    ok = [r for r in doc["records"] if r["measured_on"] != "projection" and r["status"] == "ok"]
    torch_time = {(r["op"], r["label"], r["dtype"]): r["time_s"]["median"] for r in ok if r["backend"] == "torch"}
    rows = []
    for r in ok:
        t = r["time_s"]["median"]
        base = torch_time.get((r["op"], r["label"], r["dtype"]))
        gbps = r["logical_gbps"] if r["logical_gbps"] is not None else r["gbps"]
        kernel, call = r["kernel_s"], r["call_s"]
        method = {"cuda-graph": "g", "profiler": "p"}.get(r["kernel_method"], "")
        rows.append([r["op"], f"{r['label']} {r['dtype']}", r["backend"],
                     f"{_fmt_time(kernel['median'])} {method} ±{kernel['spread'] * 100:.0f}%" if kernel else "-",
                     f"{_fmt_time(call['median'])} ±{call['spread'] * 100:.0f}%", _host_cell(r),
                     _fmt(r["tflops"], ".3g"), _fmt(gbps, ".4g"),
                     _fmt(r["roofline_fraction"] and 100 * r["roofline_fraction"], ".0f"),
                     r["bound"] or "-", _anchor_cell(r), _fmt(base / t if base else None, ".2f")])
    where = doc["device"]
    head = (f"Measured on {where['kind'].upper()} {where['name']}"
            + (f" = {where['gpu']}" if where.get("gpu") else "")
            + ("  [CPU figures: never comparable with GPU figures]" if where["kind"] == "cpu" else ""))
    body = _table(["op", "shape", "backend", "kernel (±IQR)", "call (±IQR)", "host/call", "TFLOPS", "GB/s",
                   "% roof", "bound", "anchor, H800 (ours/it)", "vs torch"], rows) \
        if rows else "(nothing could be measured)"
    legend = ("kernel: the op's kernels alone (g = CUDA-graph replay, p = profiler kernel durations); call: the eager "
              "call; host/call: call - kernel, kernel launches (L), host syncs (S) per call; TFLOPS, GB/s and % roof "
              "from the kernel time where there is one. Anchor figures: bench/anchors.py (source and commit).")
    skipped = {}
    for r in doc["records"]:
        if r["status"] != "ok":
            skipped.setdefault((r["status"], r["reason"]), set()).add(r["op"] if r["status"] == "skipped"
                                                                     else f"{r['op']}/{r['backend']}")
    lines = [f"  {status} ({', '.join(sorted(ops))}): {reason}" for (status, reason), ops in sorted(skipped.items())]
    return "\n".join([head, body, legend] + (["Not measured:"] + lines if lines else []))


def projection_table(doc: dict, only=None) -> str:
    """The cross-GPU table; `only` = the (op, label, dtype) triples to keep (all when None)."""
    proj = [r for r in doc["records"] if r["measured_on"] == "projection" and r["backend"] == "roofline"]
    by_case = {}
    for r in proj:
        if only is None or (r["op"], r["label"], r["dtype"]) in only:
            by_case.setdefault((r["op"], r["label"], r["dtype"]), {})[r["gpu"]] = r
    rows = []
    for (op, label, dtype), per_gpu in by_case.items():
        h100 = per_gpu["H100 SXM5"]["time_s"]["median"]
        cells = []
        for g in hardware.COMPARISON:
            r = per_gpu[g]
            cells.append(f"{_fmt_time(r['time_s']['median'])} {r['bound'][0]} x{r['time_s']['median'] / h100:.2f}")
        h800 = per_gpu["H800 SXM5"]
        found = anchors.lookup(op, h800["shape"])
        if found is None:
            cells.append("-")
        else:
            took = anchors.seconds(found, h800["flops"], h800["hbm_bytes"], op)
            cells.append(f"{found.text()} = {100 * h800['roofline_s'] / took:.0f}%")
        rows.append([op, label, dtype] + cells)
    scaled = [r for r in doc["records"] if r["measured_on"] == "projection" and r["backend"] != "roofline"]
    note = (f"\n{len(scaled)} projections scaled from GPU measurements (measured_on=projection) are in the JSON."
            if scaled else "")
    return ("Roofline projection, DeepSeek-V3 shapes, EP8 for MoE (c/m/i = compute/memory/interconnect bound; "
            "xN = time relative to H100 SXM5; H800 anchor: the anchor's published H800 figure and the fraction of "
            "the H800 roofline it reaches):\n"
            + _table(["op", "shape", "dtype", *hardware.COMPARISON, "H800 anchor"], rows) + note)


def printed_projection_cases() -> set:
    """The projection rows printed after a run: the chart's cases, and the low-latency ones, whose DeepEP
    figures (per EP size) a one-GPU run can show nowhere else."""
    low_latency = {c.key for c in projection.projection_cases() if c.op in C.LOW_LATENCY_OPS}
    return set(roofline.CHART_CASES) | low_latency


def compare_table(doc: dict, old: dict) -> str:
    before = {(r["op"], r["label"], r["dtype"], r["backend"]): r for r in old["records"]
              if r["status"] == "ok" and r["measured_on"] != "projection"}
    rows = []
    for r in doc["records"]:
        prev = before.get((r["op"], r["label"], r["dtype"], r["backend"]))
        if r["status"] != "ok" or r["measured_on"] == "projection" or prev is None:
            continue
        t0, t1 = prev["time_s"]["median"], r["time_s"]["median"]
        rows.append([r["op"], f"{r['label']} {r['dtype']}", r["backend"], _fmt_time(t0), _fmt_time(t1),
                     f"{t0 / t1:.2f}"])
    warn = ""
    if old["device"].get("name") != doc["device"].get("name"):
        warn = f"  [different devices: {old['device'].get('name')} vs {doc['device'].get('name')}]"
    head = f"Speed-up against {old['name']} ({old['created']}, {old.get('git_commit')}){warn}"
    return head + "\n" + (_table(["op", "shape", "backend", "before", "now", "speed-up"], rows) if rows
                          else "(no (op, shape, backend) in common)")


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = run(args)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    out = Path(args.out)
    path = results.save(doc, out / f"{doc['name']}.json")
    full = out / f"{doc['name']}-projection.txt"
    full.write_text(projection_table(doc) + "\n")
    print(measured_table(doc))
    print()
    print(projection_table(doc, only=printed_projection_cases()))
    print(f"(every DeepSeek-V3 case: {full})")
    if args.compare:
        print()
        print(compare_table(doc, results.load(args.compare)))
    print(f"\nwrote {path}")
    if not args.no_plots:
        for message in roofline.plot_documents([doc], out):
            print(message)
    return 0
