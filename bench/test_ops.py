"""Every (op, shape, backend) case of bench/cases.py through pytest-benchmark's pedantic mode: the L2 is
flushed in the untimed setup of each round and the timed call synchronizes the GPU, because
pytest-benchmark times with a wall clock. On a GPU the case is then timed as `python -m bench` times it
(kernel time from a CUDA-graph replay or the profiler, call time from CUDA events); that record, with its
derived figures (FLOPs, bytes, TFLOPS, GB/s, fraction of roofline, bound), goes to extra_info."""

import pytest
import torch

from bench import cases, harness, timing
from pykernels import hardware

from bench.conftest import HAS_GPU

ROUNDS = {"gpu": (5, 30), "cpu": (1, 3)}  # (warm-up rounds, timed rounds)
_state = {}


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if HAS_GPU else torch.device("cpu")


def _prepared(case):
    """Inputs are built once per case and shared by its backends (the parametrization keeps them adjacent)."""
    if _state.get("key") != case.key:
        _state.clear()
        torch.manual_seed(0)
        group, why = harness.process_group(_device())
        try:
            _state.update(key=case.key, prep=cases.prepare(case, _device(), group))
        except cases.Skip as exc:
            _state.update(key=case.key, skip=str(exc) if group is not None or "moe" not in case.op else why)
    if "skip" in _state:
        pytest.skip(_state["skip"])
    return _state["prep"]


@pytest.fixture(scope="session")
def gpu_timer():
    return timing.GpuTimer(_device()) if HAS_GPU else None


def test_op(benchmark, bench_case, request, gpu_timer):
    case, backend = bench_case
    if not HAS_GPU and not request.config.getoption("--interpret"):
        pytest.skip("no CUDA GPU: benchmark figures need one; pass --interpret for a CPU smoke run "
                    "(torch, and Triton through the interpreter)")
    prep = _prepared(case)
    try:
        fn = prep.make(backend)
    except cases.Skip as exc:
        pytest.skip(str(exc))
    if HAS_GPU:
        def target():
            fn()
            torch.cuda.synchronize()
        setup = gpu_timer.flush
    else:
        target, setup = fn, None
    warmup, rounds = ROUNDS["gpu" if HAS_GPU else "cpu"]
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    det = hardware.detect(override=request.config.getoption("--gpu")) if HAS_GPU else None
    # pytest-benchmark's wall clock includes a device sync per round; the record takes the kernel and call
    # times the way `python -m bench` does
    blocker = cases.capture_blocker(case.op, backend)
    timed = (gpu_timer(fn, warmup=0, rep=rounds, not_capturable=blocker) if HAS_GPU
             else {"samples": list(benchmark.stats.stats.data)})
    record = harness.measured_record(case, backend, prep, timed,
                                     "gpu" if HAS_GPU else "cpu", det.gpu if det else None,
                                     torch.cuda.get_device_name() if HAS_GPU else "cpu")
    benchmark.extra_info.update(record)
