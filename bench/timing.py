"""Timing: CUDA events with an L2 flush before every timed run on a GPU, perf_counter on a CPU, and the
statistics every record carries."""

from __future__ import annotations

import statistics
import time

import torch

L2_FLUSH_BYTES = 256 << 20  # larger than any Hopper L2 (50-60 MB): zeroing it evicts the previous run's data
THROTTLE_FRACTION = 0.75    # nvbench's rule: a sample whose SM clock is below 75% of the maximum is discarded


def summarize(samples: list[float]) -> dict:
    """median, min, max, mean, n, and spread = interquartile range / median (robust, unitless)."""
    if not samples:
        raise ValueError("samples: expected at least one time, got none")
    ordered = sorted(samples)
    n = len(ordered)
    median = statistics.median(ordered)
    if n >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median": median, "min": ordered[0], "max": ordered[-1], "mean": statistics.fmean(ordered), "n": n,
            "spread": (q3 - q1) / median if median > 0 else 0.0}


class Clocks:
    """SM clock readings through NVML, when pynvml is importable and the driver answers."""

    def __init__(self, device_index: int):
        self.handle = None
        self.max_mhz = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.max_mhz = pynvml.nvmlDeviceGetMaxClockInfo(self.handle, pynvml.NVML_CLOCK_SM)
        except Exception:  # no pynvml, no driver access (containers), or a GPU NVML does not know
            self.handle = None

    def sm_mhz(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetClockInfo(self.handle, self._nvml.NVML_CLOCK_SM)
        except Exception:
            return None


class GpuTimer:
    """Times a callable with CUDA events: `warmup` untimed calls, then `rep` timed calls, each after the L2
    is flushed by zeroing a 256 MB buffer. Samples taken while the SM clock sat below 75% of its maximum are
    dropped and counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        self.clocks = Clocks(device.index if device.index is not None else torch.cuda.current_device())

    def flush(self):
        self.flush_buffer.zero_()

    def __call__(self, fn, warmup: int, rep: int) -> dict:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(self.device)
        samples, clocks, discarded = [], [], 0
        for _ in range(rep):
            self.flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            mhz = self.clocks.sm_mhz()
            if mhz is not None and self.clocks.max_mhz and mhz < THROTTLE_FRACTION * self.clocks.max_mhz:
                discarded += 1
                continue
            samples.append(start.elapsed_time(end) / 1e3)
            if mhz is not None:
                clocks.append(mhz)
        result = {"samples": samples, "discarded_throttled": discarded}
        if clocks:
            result["sm_clock_mhz"] = statistics.median(clocks)
        return result


class CpuTimer:
    """perf_counter around each call, after `warmup` calls, until `rep` samples or `budget_s` have passed
    (at least 3 samples)."""

    def __init__(self, budget_s: float = 0.25):
        self.budget_s = budget_s

    def __call__(self, fn, warmup: int, rep: int) -> dict:
        for _ in range(warmup):
            fn()
        samples = []
        deadline = time.perf_counter() + self.budget_s
        while len(samples) < rep and (len(samples) < 3 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return {"samples": samples, "discarded_throttled": 0}
