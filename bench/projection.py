"""The cross-GPU projection: roofline time of every DeepSeek-V3 case on each comparison GPU, and the other GPUs'
times scaled from GPU measurements. `python -m bench` adds these records to its document; bench/roofline.py
draws them, computing them itself when it reads files that lack them."""

from __future__ import annotations

from pykernels import hardware
from bench import cases as C
from bench import results, shapes


def projection_cases() -> list:
    return C.cases_for(shapes.shape_set("deepseek-v3"), shapes.projection_world())


def point(seconds: float) -> dict:
    """A time_s block for a computed time (n = 0: nothing was measured)."""
    return {"median": seconds, "min": seconds, "max": seconds, "mean": seconds, "n": 0, "spread": 0.0}


def projection_records(measured: list) -> list:
    """Roofline time of every DeepSeek-V3 case on each comparison GPU, and, for each GPU measurement of the
    same case, the other GPUs' times scaled by the fraction of roofline that measurement reached."""
    out = []
    by_key = {}
    for rec in measured:
        if rec["measured_on"] == "gpu" and rec["status"] == "ok" and rec["roofline_fraction"]:
            by_key.setdefault((rec["op"], rec["label"], rec["dtype"]), []).append(rec)
    for case in projection_cases():
        cost = case.cost()
        for name in hardware.COMPARISON:
            proj = hardware.project(cost, name, case.math_dtype)
            out.append(results.record(
                op=case.op, backend="roofline", shape=case.shape, label=case.label, dtype=case.dtype, status="ok",
                measured_on="projection", gpu=name, time_s=point(proj.seconds), flops=cost.flops,
                hbm_bytes=cost.hbm_bytes, link_bytes=cost.link_bytes, roofline_s=proj.seconds,
                roofline_fraction=1.0, bound=proj.bound, note="analytic roofline: peak datasheet rates"))
            for rec in by_key.get(case.key, []):
                if rec["gpu"] == name:
                    continue
                f = rec["roofline_fraction"]
                out.append(results.record(
                    op=case.op, backend=rec["backend"], shape=case.shape, label=case.label, dtype=case.dtype,
                    status="ok", measured_on="projection", gpu=name, time_s=point(proj.seconds / f),
                    flops=cost.flops, hbm_bytes=cost.hbm_bytes, link_bytes=cost.link_bytes,
                    roofline_s=proj.seconds, roofline_fraction=f, bound=proj.bound,
                    note=f"projection: {name} roofline / the {f:.0%} of roofline measured on {rec['gpu']}"))
    return out
