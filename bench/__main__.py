"""Entry point of `python -m bench`; see bench/harness.py and `python -m bench --help`."""

import os
import sys

if "--interpret" in sys.argv[1:]:
    import torch

    # Must precede the first import of triton: the interpreter is chosen when kernels are decorated.
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from bench.harness import main  # noqa: E402  (after the interpreter switch above)

sys.exit(main())
