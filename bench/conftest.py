"""pytest-benchmark job over the same cases as `python -m bench`:

    pytest bench/ --benchmark-only --benchmark-json=results/<name>.json [--bench-shapes smoke] [--bench-ops fp8_gemm]

On a machine without a CUDA GPU every case skips with the reason, unless --interpret asks for a smoke run
(torch, and Triton through the interpreter, on CPU tensors: CPU figures, labelled so in extra_info).
The plain `python -m pytest` run never collects this directory (pyproject's testpaths = ["tests"]).
"""

import importlib.util
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()


def pytest_addoption(parser):
    group = parser.getgroup("pykernels bench")
    group.addoption("--interpret", action="store_true",
                    help="without a GPU, run the cases on the CPU (Triton through its interpreter) as a smoke test")
    group.addoption("--bench-shapes", default=None, help="shape set: deepseek-v3 (GPU default) or smoke (CPU default)")
    group.addoption("--bench-ops", default=None, help="comma-separated op names or prefixes")
    group.addoption("--gpu", default=None, help="spec row of this GPU when detection cannot tell (or $PYKERNELS_GPU)")


def pytest_configure(config):
    if config.getoption("--interpret") and not HAS_GPU:
        # Must precede the first import of triton: the interpreter is chosen when kernels are decorated.
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    from bench import cases, shapes

    config = metafunc.config
    shape_name = config.getoption("--bench-shapes") or ("deepseek-v3" if HAS_GPU else "smoke")
    todo = cases.cases_for(shapes.shape_set(shape_name), _world())
    wanted = [w for w in (config.getoption("--bench-ops") or "").split(",") if w]
    if wanted:
        todo = [c for c in todo if any(c.op.startswith(w) for w in wanted)]
    params, ids = [], []
    for case in todo:
        for backend in cases.OWN_BACKENDS + cases.OPS[case.op][2]:
            params.append((case, backend))
            ids.append(f"{case.op}[{case.label} {case.dtype}]-{backend}".replace(" ", "_"))
    metafunc.parametrize("bench_case", params, ids=ids)


def _world():
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


if importlib.util.find_spec("pytest_benchmark") is not None:
    def pytest_benchmark_update_machine_info(config, machine_info):
        from bench import results

        device = torch.device("cuda", torch.cuda.current_device()) if HAS_GPU else torch.device("cpu")
        machine_info["gpu"] = results.device_block(device, config.getoption("--gpu"))
        machine_info["versions"] = results.versions()
        machine_info["git_commit"] = results.git_commit()
