"""Drop-in modules with the anchors' call shapes, over pykernels' kernels:

    pykernels.compat.deep_gemm   DeepGEMM's FP8 GEMMs (writing into d) and scale-layout helpers
    pykernels.compat.flash_mla   FlashMLA's get_mla_metadata / flash_mla_with_kvcache
    pykernels.compat.deep_ep     DeepEP's V1 Buffer (intranode dispatch / combine, low-latency mode)

`import pykernels.compat.deep_gemm as deep_gemm` lets code written for the anchor run unchanged where their
features overlap; an anchor feature pykernels lacks raises NotImplementedError naming it. The backend comes
from the environment variable PYKERNELS_BACKEND ("auto" when unset), read at every call.
"""

import os

from pykernels import _backend

BACKEND_VARIABLE = "PYKERNELS_BACKEND"


def backend() -> str:
    """The backend the compat modules pass to pykernels: $PYKERNELS_BACKEND, "auto" when unset."""
    value = os.environ.get(BACKEND_VARIABLE, "auto")
    if value not in _backend.BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE}: expected one of {', '.join(map(repr, _backend.BACKENDS))}, "
                         f"got {value!r}")
    return value


def missing(feature: str, anchor: str):
    """The error for an anchor feature pykernels does not implement."""
    return NotImplementedError(f"{anchor}: {feature} is not implemented by pykernels")
