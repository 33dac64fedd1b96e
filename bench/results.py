"""The results store: one JSON document per run, schema in results/README.md. Records say where their
time came from (`measured_on`: "gpu", "cpu" or "projection"), so a CPU figure is never read as a GPU one."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

import torch

from pykernels import hardware
from bench.timing import KERNEL_METHODS

SCHEMA = "pykernels-bench/2"
MEASURED_ON = ("gpu", "cpu", "projection")
STATUSES = ("ok", "skipped", "failed")
RECORD_KEYS = ("op", "backend", "shape", "label", "dtype", "status", "reason", "measured_on", "device", "gpu", "time_s",
               "kernel_s", "call_s", "kernel_method", "host_overhead_s", "launches_per_call", "syncs_per_call",
               "flops", "hbm_bytes", "link_bytes", "tflops", "gbps", "link_gbps", "logical_gbps", "roofline_s",
               "roofline_fraction", "bound", "note")
PEER_PACKAGES = ("deep_gemm", "flash_mla", "deep_ep", "flashinfer-python", "flashinfer", "vllm", "pynvml",
                 "nvidia-ml-py")


def git_commit(root: Path | None = None) -> str | None:
    root = root or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    import pykernels

    found = {"python": platform.python_version(), "torch": torch.__version__, "pykernels": pykernels.__version__,
             "cuda": torch.version.cuda}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    for name in PEER_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def device_block(device: torch.device, gpu_override: str | None = None) -> dict:
    """What ran the benchmark: for a GPU its name, SM count, memory, capability, clocks and driver, and the
    spec row it was identified as (or why none was)."""
    if device.type != "cuda":
        return {"kind": "cpu", "name": _cpu_name(), "cores": _cpu_count(),
                "gpu": None, "detection": "no CUDA GPU: these are CPU figures, never held against a GPU roofline"}
    props = torch.cuda.get_device_properties(device)
    det = hardware.detect(device, gpu_override)
    block = {"kind": "gpu", "name": props.name, "sm_count": props.multi_processor_count,
             "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
             "gpu": det.gpu.name if det.gpu else None, "detection": det.reason,
             "candidates": list(det.candidates)}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        block["driver"] = pynvml.nvmlSystemGetDriverVersion()
        block["max_sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        block["max_mem_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    except Exception:  # clocks are optional: NVML may be missing or not permitted
        pass
    return block


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count():
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def new_document(name: str, device: dict, shape_set: str, args: dict) -> dict:
    return {"schema": SCHEMA, "name": name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device, "versions": versions(), "git_commit": git_commit(), "shape_set": shape_set,
            "args": args, "records": []}


def record(**fields) -> dict:
    """A record with every schema key present (None where it does not apply)."""
    unknown = set(fields) - set(RECORD_KEYS)
    if unknown:
        raise ValueError(f"record: unknown fields {sorted(unknown)}")
    rec = {key: fields.get(key) for key in RECORD_KEYS}
    validate_record(rec)
    return rec


def validate_record(rec: dict) -> None:
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise ValueError(f"record: missing fields {missing}")
    if rec["status"] not in STATUSES:
        raise ValueError(f"record status: expected one of {STATUSES}, got {rec['status']!r}")
    if rec["measured_on"] not in MEASURED_ON:
        raise ValueError(f"record measured_on: expected one of {MEASURED_ON}, got {rec['measured_on']!r}")
    if rec["status"] == "ok":
        for key in ("time_s", "kernel_s", "call_s"):
            t = rec[key]
            if t is None and key != "time_s":
                continue
            if not isinstance(t, dict) or not {"median", "min", "max", "n"} <= set(t):
                raise ValueError(f"record {key}: expected median/min/max/n, got {t!r}")
            if not t["min"] <= t["median"] <= t["max"]:
                raise ValueError(f"record {key}: expected min <= median <= max, got {t!r}")
        if rec["kernel_method"] not in (None,) + KERNEL_METHODS:
            raise ValueError(f"record kernel_method: expected one of {KERNEL_METHODS} or null, "
                             f"got {rec['kernel_method']!r}")
        if (rec["kernel_s"] is None) != (rec["kernel_method"] is None):
            state = "absent" if rec["kernel_s"] is None else "present"
            raise ValueError(f"record kernel_method: expected a method exactly when kernel_s is present, got "
                             f"{rec['kernel_method']!r} with kernel_s {state}")


def validate(doc: dict) -> dict:
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema: expected {SCHEMA!r}, got {doc.get('schema')!r}")
    for key in ("name", "created", "device", "versions", "git_commit", "shape_set", "records"):
        if key not in doc:
            raise ValueError(f"document: missing {key!r}")
    for rec in doc["records"]:
        validate_record(rec)
    return doc


def save(doc: dict, path: Path) -> Path:
    validate(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return path


def upgrade(doc: dict) -> dict:
    """A version-1 document in version 2's form: its times were eager-call times (CUDA events around one call
    on a GPU), so they become `call_s`, with no kernel time and no host counts."""
    if doc.get("schema") != "pykernels-bench/1":
        return doc
    for rec in doc.get("records", []):
        measured = rec.get("status") == "ok" and rec.get("measured_on") != "projection"
        rec.update(kernel_s=None, call_s=rec.get("time_s") if measured else None, kernel_method=None,
                   host_overhead_s=None, launches_per_call=None, syncs_per_call=None)
    doc["schema"] = SCHEMA
    return doc


def load(path) -> dict:
    """A results document (version 1 documents upgraded), validated."""
    return validate(upgrade(json.loads(Path(path).read_text())))
