"""Test configuration: on a machine without a CUDA GPU, Triton kernels run through the interpreter and
tests marked @pytest.mark.gpu are skipped with the reason."""

import os
import sys
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Must precede the first import of triton: the interpreter is chosen when kernels are decorated.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before conftest could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

HAS_HOPPER = HAS_GPU and any(torch.cuda.get_device_capability(i) == (9, 0) for i in range(torch.cuda.device_count()))


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compute capability 9.0); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where CPU-tier tests put their tensors: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh data per test, reproducible per test id: a failure can be rerun with the same tensors.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
