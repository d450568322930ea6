"""qmoe: a quantized runtime for Mixture-of-Experts LLMs with pre-attention expert prediction.

    import qmoe
    m = qmoe.load("model.gguf")
    print(m.generate("def main(", max_tokens=32))

The engine (torch, numba) is imported on first use, so tools that need only the
GGUF reader or the error classes (the converter, `qmoe info`) start fast.
"""

import os

# How long OpenMP's idle threads spin before they sleep. numba's and torch's OpenMP threads
# take turns on the same cores, beside the store's transfer and predictor threads, and a
# decode step runs a few parallel loops per layer with well under a millisecond between
# them. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every loop wait for a sleeping
# thread to wake: 30-130 us a loop on the 2-core development VM, against 13 us for a
# thread still spinning. Spinning for long (libgomp's default, about 11 ms there, or
# ACTIVE: forever) takes the core from those other threads when they need it. So: about
# 1.5 ms, GOMP_SPINCOUNT for GNU libgomp (Linux) and KMP_BLOCKTIME (ms) for LLVM's and
# Intel's runtimes. Set before either runtime loads, unless the user chose.
# OPENMP_DEFAULTS is what was set here, so that benchmarks can give other engines the
# user's own environment.
OPENMP_DEFAULTS: dict[str, str] = {}
if not any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")):
    OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "30000", "KMP_BLOCKTIME": "2"}
    os.environ.update(OPENMP_DEFAULTS)

from qmoe.errors import QmoeError  # noqa: E402

__all__ = ["Model", "QmoeError", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Model", "load"):
        from qmoe import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'qmoe' has no attribute {name!r}")
