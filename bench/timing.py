"""Timing: on a GPU, the op's kernels alone (CUDA-graph replay, or the profiler's kernel durations where the
call cannot be captured) and the eager call as a user makes it, both after an L2 flush; perf_counter on a CPU;
host work per call (device syncs, kernel launches); the statistics every record carries."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pykernels import torch_ops

L2_FLUSH_BYTES = 256 << 20  # larger than any Hopper L2 (50-60 MB): zeroing it evicts the previous run's data
THROTTLE_FRACTION = 0.75    # nvbench's rule: a sample whose SM clock is below 75% of the maximum is discarded
CALL_RANGE = "pykernels.bench.call"  # profiler range around one call: its kernels are the call's kernels
LAUNCH_COUNT_REPS = 3       # profiled calls when the profiler only counts launches (graph replay gives the time)
KERNEL_METHODS = ("cuda-graph", "profiler")


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


# ---- host syncs ----

# Ops after which the host waits for the device: a scalar read (item(), bool(), int() of a tensor) and ops whose
# output size depends on device data.
_SYNCING_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive",
                          "unique_dim"})


def _is_device_to_host(func, args, kwargs) -> bool:
    """Copies into host memory, and boolean-mask indexing (its size comes from the mask's contents; the
    nonzero it runs inside the kernel is not dispatched where a mode sees it)."""
    name = func.overloadpacket.__name__
    if name in ("index", "index_put_") and len(args) >= 2 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name == "copy_" and len(args) >= 2 and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        target = kwargs.get("device")
        return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    return False


class HostSyncCounter(TorchDispatchMode):
    """Counts, at the torch dispatcher, the ops that make the host wait for the device: scalar reads, ops
    with data-dependent output sizes, copies from device to host memory, inside pykernels' torch.library
    ops too. Work a C++ extension does without torch ops is invisible here."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        implementation = torch_ops.IMPLEMENTATIONS.get(func)
        if implementation is not None:
            # A pykernels op is one node to the dispatcher: count what its implementation does, inside it.
            with self:
                return implementation(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _SYNCING_OPS or _is_device_to_host(func, args, kwargs):
            self.count += 1
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **kwargs)


def count_host_syncs(fn) -> HostSyncCounter:
    """Runs fn once under a HostSyncCounter and returns the counter."""
    with HostSyncCounter() as counter:
        fn()
    return counter


# ---- the profiler's view of a call ----

def _kernels_under(event) -> list:
    """Every device kernel launched inside a profiler event, its nested CPU events included."""
    found = list(getattr(event, "kernels", ()) or ())
    for child in getattr(event, "cpu_children", ()) or ():
        found += _kernels_under(child)
    return found


def calls_from_profile(events, label: str = CALL_RANGE) -> list[tuple[float, int]]:
    """(seconds of kernel time, kernel launches) for each profiler range called `label`: the durations of the
    kernels launched inside the range, summed (gaps between kernels are not counted)."""
    out = []
    for event in events:
        if event.name != label:
            continue
        kernels = _kernels_under(event)
        out.append((sum(k.duration for k in kernels) / 1e6, len(kernels)))  # profiler durations are microseconds
    return out


# ---- GPU ----

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


class CudaRuntime:
    """What GpuTimer asks of the device: an L2 flush, event-timed regions, graph capture, profiling, clocks.
    Tests replace it with a fake that simulates a device on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        self.clocks = Clocks(device.index if device.index is not None else torch.cuda.current_device())
        self.max_mhz = self.clocks.max_mhz

    def flush(self):
        self.flush_buffer.zero_()

    def synchronize(self):
        torch.cuda.synchronize(self.device)

    def elapsed(self, fn) -> float:
        """Seconds between CUDA events recorded around fn on the current stream."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def capture(self, fn):
        """fn captured into a CUDA graph; returns the replay. Raises when fn cannot be captured."""
        # One call on the capture stream first: per-stream state (library handles, workspaces) must exist before
        # capture begins, as torch.cuda.graph's documentation asks.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        self.synchronize()
        return graph.replay

    def profile(self, fn, rep: int) -> list[tuple[float, int]]:
        """(kernel seconds, launches) of `rep` calls, each after an L2 flush outside the call's range."""
        from torch.profiler import ProfilerActivity, profile, record_function

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(rep):
                self.flush()
                with record_function(CALL_RANGE):
                    fn()
            self.synchronize()
        return calls_from_profile(prof.events())

    def sm_mhz(self) -> int | None:
        return self.clocks.sm_mhz()


class GpuTimer:
    """Times a callable two ways, `rep` samples each after `warmup` untimed calls, the L2 flushed before every
    sample:

    - call: CUDA events around one eager call, as a user makes it (argument checks, host reads and launch gaps
      included);
    - kernel: CUDA events around one replay of the call captured into a CUDA graph, i.e. the op's kernels
      alone; when the call cannot be captured (it reads device data on the host, or capture fails) the
      profiler's kernel durations instead. The result names the method and why the graph was not used.

    Also counts host syncs per call (at the torch dispatcher) and kernel launches per call (profiler).
    Samples taken while the SM clock sat below 75% of its maximum are dropped and counted."""

    def __init__(self, device: torch.device, runtime=None):
        self.runtime = runtime if runtime is not None else CudaRuntime(device)

    def flush(self):
        self.runtime.flush()

    def _events(self, fn, rep: int, clocks: list) -> tuple[list, int]:
        rt = self.runtime
        samples, discarded = [], 0
        for _ in range(rep):
            rt.flush()
            seconds = rt.elapsed(fn)
            mhz = rt.sm_mhz()
            if mhz is not None and rt.max_mhz and mhz < THROTTLE_FRACTION * rt.max_mhz:
                discarded += 1
                continue
            samples.append(seconds)
            if mhz is not None:
                clocks.append(mhz)
        return samples, discarded

    def __call__(self, fn, warmup: int, rep: int, not_capturable: str | None = None) -> dict:
        """`not_capturable`: why fn must not be captured (it blocks the host on device data in a way the torch
        dispatcher cannot see); the profiler then gives the kernel time."""
        rt = self.runtime
        for _ in range(warmup):
            fn()
        rt.synchronize()
        syncs = count_host_syncs(fn).count
        clocks = []
        call, discarded = self._events(fn, rep, clocks)
        result = {"samples": call, "syncs": syncs, "kernel_samples": None, "kernel_method": None,
                  "kernel_note": None, "launches": None}
        replay = None
        if not_capturable:
            result["kernel_note"] = f"not captured: {not_capturable}"
        elif syncs:
            result["kernel_note"] = f"not captured: {syncs} host syncs per call"
        else:
            try:
                replay = rt.capture(fn)
            except Exception as exc:  # capture rejects host syncs, legacy-stream launches, allocations it can't pool
                result["kernel_note"] = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rt.synchronize()
        try:
            profiled = rt.profile(fn, LAUNCH_COUNT_REPS if replay is not None else rep)
        except Exception as exc:  # a profiler that cannot start (CUPTI busy or missing) costs launches only
            profiled = []
            note = f"profiler unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            result["kernel_note"] = "; ".join(filter(None, [result["kernel_note"], note]))
        if profiled:
            result["launches"] = statistics.median(n for _, n in profiled)
        if replay is not None:
            kernel, dropped = self._events(replay, rep, clocks)
            discarded += dropped
            if kernel:
                result.update(kernel_samples=kernel, kernel_method="cuda-graph")
        elif profiled:
            result.update(kernel_samples=[s for s, _ in profiled], kernel_method="profiler")
        result["discarded_throttled"] = discarded
        if clocks:
            result["sm_clock_mhz"] = statistics.median(clocks)
        return result


class CpuTimer:
    """perf_counter around each call, after `warmup` calls, until `rep` samples or `budget_s` have passed
    (at least 3 samples); host syncs counted as on a GPU (scalar reads are host syncs there)."""

    def __init__(self, budget_s: float = 0.25):
        self.budget_s = budget_s

    def __call__(self, fn, warmup: int, rep: int, not_capturable: str | None = None) -> dict:
        for _ in range(warmup):
            fn()
        syncs = count_host_syncs(fn).count
        samples = []
        deadline = time.perf_counter() + self.budget_s
        while len(samples) < rep and (len(samples) < 3 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return {"samples": samples, "discarded_throttled": 0, "syncs": syncs}
